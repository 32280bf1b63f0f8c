"""An app served by a real uvicorn on loopback, in a thread of this process: the API as `palette
serve api` serves it (its edge and HTTP limits), for what only a real server shows (an answer cut
off, a connection dropped, what the server logs)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from adapters.api import http_limits
from adapters.api.edge import RequestEdge
from tests.conftest import free_port
from tests.waiting import wait_until


@contextmanager
def served_api(app: Any) -> Iterator[int]:
    """The port ``app`` (``create_app``'s) answers on, behind the request edge, until the block ends."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(RequestEdge(app, CollectorRegistry()), host="127.0.0.1", port=port,
                                           lifespan="off", log_config=None, **http_limits.SERVER_OPTIONS))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout_s=30, what="the server to listen")
        assert server.started, "the server did not start"
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def answering(status: int = 200, body: bytes = b"") -> Iterator[int]:
    """The port of a plain HTTP server on loopback answering every GET ``status`` with ``body``
    (another program's, or a probe's answer as it comes), in a thread, until the block ends."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
