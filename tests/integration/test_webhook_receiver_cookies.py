"""A receiver's cookies stay with it: the sender's HTTP client (one per webhooks process, shared by
every user's endpoints) keeps none. It kept every ``Set-Cookie`` an answer carried, for as long as
the cookie said: a receiver that set new ones on each answer grew the process without end (and
the Cookie header of every later attempt to it), and cookies ignore the port, so those one user's
receiver set went with the attempts to every other endpoint on that host (in production, that
address: another user's receiver behind the same load balancer). Real sockets on loopback, the
sender's own client."""

from __future__ import annotations

import itertools
import socketserver
import threading
from typing import Any

from adapters.webhooks import targets
from tests.webhook_receiver import Receiver

COOKIES_PER_ANSWER = 20
ATTEMPTS = 5


class CookieSetter(socketserver.ThreadingTCPServer):
    """Answers every request 200 with COOKIES_PER_ANSWER new cookies (long-lived, each a new
    name), keeping the Cookie headers it was sent."""

    daemon_threads = True

    def __init__(self) -> None:
        self.sent_cookies: list[str] = []
        self.answered = itertools.count()
        super().__init__(("127.0.0.1", 0), SetCookies)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class SetCookies(socketserver.StreamRequestHandler):
    server: CookieSetter

    def handle(self) -> None:
        while self.rfile.readline():
            head: dict[str, str] = {}
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                head[name.strip().lower()] = value.strip()
            self.rfile.read(int(head.get("content-length", 0)))
            if "cookie" in head:
                self.server.sent_cookies.append(head["cookie"])
            n = next(self.server.answered)
            cookies = "".join(f"set-cookie: s{n}_{k}=session; Max-Age=31536000; Path=/\r\n"
                              for k in range(COOKIES_PER_ANSWER))
            self.wfile.write(f"HTTP/1.1 200 OK\r\n{cookies}content-length: 0\r\n\r\n".encode())


def test_a_receivers_cookies_are_not_kept_nor_sent_on_to_another_users_endpoint_on_its_host() -> None:
    setter, other = CookieSetter(), Receiver()
    headers: dict[str, Any] = {"webhook-id": "msg_cookies_1"}
    try:
        with targets.client(production=False) as http:
            for _ in range(ATTEMPTS):
                assert targets.post(http, setter.url, b"{}", headers, production=False).ok
            assert targets.post(http, other.url("/other"), b"{}", headers, production=False).ok
            kept = len(http.cookies.jar)
        [received] = other.wait("/other", 1)
        assert (kept, setter.sent_cookies, received.headers.get("cookie")) == (0, [], None)
    finally:
        setter.close()
        other.close()
