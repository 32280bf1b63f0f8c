"""HEAD on the health routes answers as GET does, without a body: load balancers and uptime
probes send HEAD, and a 405 read as "down"."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
import uvicorn

from adapters.api import http_limits
from adapters.api.app import create_app
from adapters.settings import Settings
from tests.conftest import free_port
from tests.raw_http import raw_head


@pytest.fixture
def served() -> Iterator[tuple[int, dict[str, bool]]]:
    """The API on a loopback port behind the server's own protocol, its dependency checks
    fakes whose answers the test sets."""
    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48)
    container = SimpleNamespace(settings=settings, read_pool=None,
                                service=SimpleNamespace(sealer=SimpleNamespace(evict=lambda _u: None),
                                                        user_views=None))
    app = create_app(container)  # type: ignore[arg-type]
    good = {"postgres": True, "broker": True, "s3": True}

    def check(name: str):  # type: ignore[no-untyped-def]
        async def call() -> bool:
            return good[name]
        return call

    app.state.health_checks = {name: check(name) for name in good}
    port = free_port()
    options = {**http_limits.SERVER_OPTIONS, "http": http_limits.BoundedHttpToolsProtocol}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        threading.Event().wait(0.01)
    try:
        yield port, good
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/health"])
def test_head_on_a_health_route_answers_as_get_does_without_a_body(
        served: tuple[int, dict[str, bool]], path: str) -> None:
    port, _ = served
    got = raw_head(port, path)
    head, _, body = got.partition(b"\r\n\r\n")
    get = httpx.get(f"http://127.0.0.1:{port}{path}")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 200 OK" == f"HTTP/1.1 {get.status_code} OK".encode()
    assert body == b""


def test_head_on_readyz_is_503_when_a_dependency_fails(served: tuple[int, dict[str, bool]]) -> None:
    port, good = served
    good["s3"] = False
    assert httpx.head(f"http://127.0.0.1:{port}/readyz").status_code == 503
    assert httpx.head(f"http://127.0.0.1:{port}/livez").status_code == 200
    assert httpx.head(f"http://127.0.0.1:{port}/health").status_code == 200  # degraded, still an answer


def test_head_is_not_in_the_openapi_schema(served: tuple[int, dict[str, bool]]) -> None:
    """The schema (and schemathesis, which fuzzes it) is the GET routes', as before."""
    port, _ = served
    paths = httpx.get(f"http://127.0.0.1:{port}/openapi.json").json()["paths"]
    assert {method for path in ("/livez", "/readyz", "/health") for method in paths[path]} == {"get"}
