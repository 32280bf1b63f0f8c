"""The body cap (adapters.api.edge) on a request whose answer is a stream: the stream reads the
request for its client's disconnect, so a body past the cap, sent in chunks while the stream
runs, is met after the answer has begun, where no 413 can be given any more."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from datetime import UTC, datetime

import pytest

from adapters.api.app import create_app
from adapters.api.edge import MAX_BODY_BYTES
from adapters.bootstrap import build
from adapters.settings import Settings
from tests.served import served_api


def test_a_body_past_the_cap_sent_to_a_stream_ends_it_as_a_client_gone_not_with_a_traceback(
    settings: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    """A client's own job's event stream, asked with a chunked body of 80 KB: before, the cap
    raised inside the running stream, which the app logged as an unhandled error and the server
    as an exception in the application, two tracebacks a request, as often as a client liked."""
    container = build(settings, pool_size=2)  # the stack's PostgreSQL and S3
    service = container.service
    user_id, _ = service.register(f"device-stream-body-{uuid.uuid4().hex}").value
    job_id = service.create_job(user_id, "interior", 1).value
    app = create_app(container)
    token = app.state.tokens.issue(user_id, datetime.now(UTC))
    try:
        with served_api(app) as port:
            caplog.set_level(logging.WARNING)
            chunk = b"x" * 8192
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n"
                             "Transfer-Encoding: chunked\r\n\r\n".encode())
                got = conn.recv(65536)
                for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
                    conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    time.sleep(0.02)  # a client sending slowly, the stream running meanwhile: not a wait for anything
                conn.sendall(b"0\r\n\r\n")
                try:
                    while not got.endswith(b"0\r\n\r\n") and (more := conn.recv(65536)):
                        got += more
                except TimeoutError:
                    pass
    finally:
        container.close()
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    assert got.endswith(b"0\r\n\r\n"), got[-200:]  # the stream ended whole, as when its client leaves
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
