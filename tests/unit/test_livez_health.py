"""`palette up` asks each application process whether it is alive (``EmbeddedStack.livez``, wired by
``adapters.bootstrap.livez_url``): one that does not answer HEALTH_FAILURES times in a row is
wedged — stopped whole, or its API's event loop blocked — and the supervisor starts it again (its
restart on failed checks is tests/unit/test_supervisor.py's). A leader relay frozen so held its
lock, and the standby never took over. Real sockets on loopback: the probe's answers as they come."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.bootstrap import embedded_stack, livez_url
from adapters.settings import load_settings
from infra.stack import alive, answers
from tests.served import answering


@contextlib.contextmanager
def _server(status: int) -> Iterator[str]:
    """An HTTP server on loopback answering every GET with ``status``; its /livez URL."""
    with answering(status) as port:
        yield f"http://127.0.0.1:{port}/livez"


@contextlib.contextmanager
def _listener(reply: bytes | None) -> Iterator[str]:
    """A socket that takes connections and answers ``reply`` raw (None: never answers, as a frozen
    process's kernel still accepts on its behalf); its /livez URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        accepted: list[socket.socket] = []

        def serve() -> None:
            with contextlib.suppress(OSError):
                conn, _ = sock.accept()
                accepted.append(conn)
                if reply is not None:
                    conn.recv(4096)
                    conn.sendall(reply)
                    conn.close()

        threading.Thread(target=serve, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/livez"
        finally:
            for conn in accepted:
                conn.close()


def test_a_process_answering_200_is_alive_and_ready() -> None:
    with _server(200) as url:
        assert alive(url) and answers(url)


@pytest.mark.parametrize("status", [503, 404, 500])
def test_a_process_answering_anything_else_is_alive_but_not_ready(status: int) -> None:
    """Its answer is its own (the API's 503 at its connection limits): it runs, though ready it is not."""
    with _server(status) as url:
        assert alive(url) and not answers(url)


@pytest.mark.parametrize("check", [alive, answers])
def test_a_process_that_takes_the_connection_and_never_answers_is_not_within_the_timeout(check: Any) -> None:
    with _listener(None) as url:
        started = time.monotonic()
        assert not check(url, timeout_s=0.3)
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("check", [alive, answers])
def test_an_answer_that_is_not_http_is_not_alive(check: Any) -> None:
    with _listener(b"hello\r\n\r\n") as url:
        assert not check(url, timeout_s=2)


@pytest.mark.parametrize("check", [alive, answers])
def test_nobody_listening_is_not_alive(check: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        assert not check(f"http://127.0.0.1:{port}/livez")


def test_the_api_is_asked_on_its_own_port_and_the_others_on_their_metrics_port(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, api_port=18123, metrics_port=19400)
    assert livez_url(settings, "api") == "http://127.0.0.1:18123/livez"  # its event loop answers
    assert livez_url(settings, "relay") == "http://127.0.0.1:19401/livez"
    assert livez_url(settings, "checkpointer") == "http://127.0.0.1:19406/livez"
    assert livez_url(settings, "sweeper") is None  # it serves no probes


def test_without_metrics_ports_only_the_api_is_asked(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, metrics_port=0)
    assert livez_url(settings, "projector") is None
    assert livez_url(settings, "api") is not None


@pytest.mark.parametrize(("host", "expected"), [("0.0.0.0", "127.0.0.1"), ("::", "[::1]"),  # noqa: S104
                                                 ("::1", "[::1]"), ("10.1.2.3", "10.1.2.3")])
def test_a_wildcard_host_is_asked_on_its_own_loopback(tmp_path: Path, host: str, expected: str) -> None:
    settings = load_settings(data_dir=tmp_path, metrics_host=host, metrics_port=19400)
    assert livez_url(settings, "webhooks") == f"http://{expected}:19405/livez"


def test_each_application_process_is_checked_at_its_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stack's specs carry the check: it asks the URL the composition root gives for that process."""
    stack = embedded_stack(load_settings(data_dir=tmp_path, metrics_port=19400))
    asked: list[str] = []

    def refused(url: str, timeout: float) -> Any:
        asked.append(url)
        raise OSError("refused")

    monkeypatch.setattr("infra.stack.urllib.request.urlopen", refused)
    for name in ("api", "relay", "gpu"):
        healthy = stack._app_spec(name).healthy
        assert healthy is not None and healthy() is False
    assert asked == [livez_url(stack.settings, name) for name in ("api", "relay", "gpu")]
    assert stack._app_spec("sweeper").healthy is None
