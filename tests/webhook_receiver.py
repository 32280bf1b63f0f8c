"""A webhook receiver on 127.0.0.1 for the tests and the chaos run: it keeps every request it is
sent (path, headers, body) in arrival order and answers 200, or 500 or late where told to."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WAIT_S = 60.0


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def payload(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class Receiver:
    """An HTTP server on 127.0.0.1 that keeps what it is sent; ``fail[path]`` answers 500 that
    many times on that path before answering 200; ``answer[path]`` (a status and headers) answers
    every request to that path so."""

    def __init__(self) -> None:
        self.got: list[Received] = []
        self.fail: dict[str, int] = {}
        self.answer: dict[str, tuple[int, dict[str, str]]] = {}
        self.hold: dict[str, threading.Event] = {}  # a path's answers wait for its event
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.changed:
                    receiver.got.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                 body, time.time()))
                    failing = receiver.fail.get(self.path, 0)
                    receiver.fail[self.path] = max(0, failing - 1)
                    receiver.changed.notify_all()
                held = receiver.hold.get(self.path)
                if held is not None:
                    held.wait(WAIT_S)
                status, headers = receiver.answer.get(self.path, (500 if failing else 200, {}))
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok" if 200 <= status < 300 else b"no")
                except OSError:  # the sender is gone (killed while it waited)
                    return

            def log_message(self, *_: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def wait(self, path: str, count: int) -> list[Received]:
        """The first ``count`` requests to ``path``, waiting for them (up to WAIT_S)."""
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.on(path)) >= count, timeout=WAIT_S), self.on(path)
            return self.on(path)[:count]

    def on(self, path: str) -> list[Received]:
        return [r for r in self.got if r.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
