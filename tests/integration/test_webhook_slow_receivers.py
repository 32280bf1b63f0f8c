"""A receiver that drips its answer (status line, headers or body a byte at a time, each byte well
within httpx's per-operation timeout) cannot hold a sender past the attempt's deadline: the
attempt is a timeout, and the sender retries it like one. Real sockets on loopback, the sender's
own HTTP client; the deadline is shortened to 1 s so the tests are quick (the drip would take
~10 s without it)."""

from __future__ import annotations

import socketserver
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from adapters.webhooks import store, targets
from adapters.webhooks.sender import WebhookSender

DEADLINE_S = 1.0
DRIP_S = 0.25  # a byte this often: far inside the per-operation timeout, far outside the deadline
WAIT_S = 60.0
BODY = b'{"type":"job.queued"}'
PAD = b"x" * 40  # 40 drips: 10 s


class DripServer(socketserver.ThreadingTCPServer):
    """Answers each request on a connection by sending ``prefix`` at once, then ``drip`` a byte
    every DRIP_S; records each request's webhook-id, the connections, and the answers sent whole."""

    daemon_threads = True

    def __init__(self, prefix: bytes, drip: bytes) -> None:
        self.prefix, self.drip = prefix, drip
        self.ids: list[str] = []
        self.connections = 0
        self.finished = 0
        self.changed = threading.Condition()
        super().__init__(("127.0.0.1", 0), Drip)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def wait_for(self, requests: int) -> list[str]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.ids) >= requests, timeout=WAIT_S), self.ids
            return list(self.ids)

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class Drip(socketserver.StreamRequestHandler):
    server: DripServer

    def handle(self) -> None:
        with self.server.changed:
            self.server.connections += 1
        while (head := self.request_head()) is not None:
            self.rfile.read(int(head.get("content-length", 0)))
            with self.server.changed:
                self.server.ids.append(head.get("webhook-id", ""))
                self.server.changed.notify_all()
            try:
                self.wfile.write(self.server.prefix)
                for byte in self.server.drip:
                    time.sleep(DRIP_S)
                    self.wfile.write(bytes([byte]))
            except OSError:  # the sender hung up: what the deadline is for
                return
            with self.server.changed:
                self.server.finished += 1

    def request_head(self) -> dict[str, str] | None:
        """The next request's headers (None: the connection is closed)."""
        if not self.rfile.readline():
            return None
        head = {}
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            head[name.strip().lower()] = value.strip()
        return head


ANSWERS = {  # what arrives at once, then what drips
    "status line": (b"", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-pad: " + PAD + b"\r\n\r\nok"),
    "headers": (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n", b"x-pad: " + PAD + b"\r\n\r\nok"),
    "body": (b"HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n", b"o" + PAD + b"k"),
}


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets, "TIMEOUT_S", DEADLINE_S)


@pytest.fixture(params=sorted(ANSWERS))
def dripping(request: pytest.FixtureRequest) -> Iterator[DripServer]:
    server = DripServer(*ANSWERS[request.param])
    yield server
    server.close()


def test_a_dripping_answer_is_a_timeout_at_the_attempts_deadline(short_deadline, dripping):
    with targets.client(production=False) as http:
        outcome = targets.post(http, dripping.url, BODY, {"webhook-id": "msg_drip_1"}, production=False)
    assert (outcome.ok, outcome.status_code, outcome.error) == (False, None, "timeout")
    assert dripping.wait_for(1) == ["msg_drip_1"]
    assert outcome.duration_ms >= DEADLINE_S * 1000  # it gave the receiver its whole deadline


def test_a_silent_receiver_is_cut_at_the_attempts_deadline_not_at_its_sockets_timeout(monkeypatch):
    """Each socket operation waits no longer than what is left of the attempt: with the sockets'
    own timeouts at the full 10 s and the deadline at 1 s, a receiver that never answers is a
    timeout after 1 s."""
    server = DripServer(b"", b"")  # reads the request, answers nothing
    sockets_s = targets.TIMEOUT_S
    try:
        with targets.client(production=False) as http:  # its socket timeouts: targets.TIMEOUT_S, 10 s
            monkeypatch.setattr(targets, "TIMEOUT_S", DEADLINE_S)
            outcome = targets.post(http, server.url, BODY, {"webhook-id": "msg_silent_1"}, production=False)
        assert (outcome.ok, outcome.error) == (False, "timeout")
        # Cut at the deadline, far from the sockets' own wait (the slack is for a loaded machine).
        assert DEADLINE_S * 1000 <= outcome.duration_ms < sockets_s * 1000 * 0.8
    finally:
        server.close()


def test_a_kept_connection_serves_the_next_attempt_within_a_deadline_of_its_own(short_deadline):
    server = DripServer(b"HTTP/1.1 204 No Content\r\n\r\n", b"")
    try:
        with targets.client(production=False) as http:
            first = targets.post(http, server.url, BODY, {"webhook-id": "msg_prompt_1"}, production=False)
            time.sleep(DEADLINE_S * 1.5)  # the first attempt's deadline passes (not a wait for anything)
            second = targets.post(http, server.url, BODY, {"webhook-id": "msg_prompt_2"}, production=False)
        assert (first.status_code, second.status_code) == (204, 204)
        assert server.wait_for(2) == ["msg_prompt_1", "msg_prompt_2"]
        assert server.connections == 1  # the second attempt reused the first one's connection
    finally:
        server.close()


def test_the_production_client_keeps_no_connection_for_the_next_attempt():
    """A connection made (its certificate checked) for one name must not carry a request for
    another name at the same address: in production each attempt connects anew."""
    server = DripServer(b"HTTP/1.1 204 No Content\r\n\r\n", b"")
    try:
        with targets.client(production=True) as http:
            for n in (1, 2):
                assert http.post(server.url, content=BODY, headers={"webhook-id": f"msg_fresh_{n}"}).status_code == 204
        assert server.wait_for(2) == ["msg_fresh_1", "msg_fresh_2"]
        assert server.connections == 2
    finally:
        server.close()


def test_the_senders_client_does_not_follow_a_redirect():
    """A 3xx is the attempt's failure: following it would post to an address no check saw (the
    cloud metadata address, say)."""
    elsewhere = DripServer(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n", b"")
    redirecting = DripServer(f"HTTP/1.1 307 Temporary Redirect\r\nlocation: {elsewhere.url}\r\n"
                             "content-length: 0\r\n\r\n".encode(), b"")
    try:
        with targets.client(production=False) as http:
            outcome = targets.post(http, redirecting.url, BODY, {"webhook-id": "msg_moved_1"}, production=False)
        assert (outcome.ok, outcome.status_code) == (False, 307)
        assert redirecting.wait_for(1) == ["msg_moved_1"] and elsewhere.ids == []
    finally:
        redirecting.close()
        elsewhere.close()


def test_the_sender_retries_a_dripping_receiver_as_a_timeout(settings, short_deadline):
    server = DripServer(b"", ANSWERS["status line"][1])
    pool: ConnectionPool[Any] = ConnectionPool(settings.effective_database_url, min_size=1, max_size=4,
                                               kwargs={"autocommit": True}, open=True)
    sender = WebhookSender(pool, targets.client(production=False), (0.1, 0.1, 0.1), production=False,
                           disable_after=100, disable_after_s=0.0, workers=2, poll_s=0.05)
    stop = threading.Event()
    job = uuid.uuid4()
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        store.ensure_schema(conn)
        endpoint = store.create_endpoint(conn, uuid.uuid4(), server.url, ["job.queued"], "whsec_dGVzdA==", 10)["id"]
        store.record(conn, [store.NewDelivery(endpoint, f"msg_{job.hex}_1", job, 1, "job.queued", BODY)])
        sending = threading.Thread(target=sender.run, args=(stop,), daemon=True)
        sending.start()
        try:
            assert server.wait_for(2) == [f"msg_{job.hex}_1"] * 2  # tried, timed out, tried again

            def attempts() -> list[tuple[int | None, str]]:
                return [(r[0], r[1]) for r in conn.execute(
                    "SELECT a.status_code, a.error FROM palette_webhooks.attempts a JOIN palette_webhooks.deliveries d "
                    "ON d.id = a.delivery_id WHERE d.endpoint_id = %s ORDER BY a.n", [endpoint]).fetchall()]

            deadline = time.monotonic() + WAIT_S
            while len(attempts()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert attempts()[:2] == [(None, "timeout"), (None, "timeout")]
            assert server.finished == 0
        finally:
            stop.set()
            sender.wake()
            sending.join(WAIT_S)
            conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s", [endpoint])
            sender.close()
            server.close()
