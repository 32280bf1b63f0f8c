"""A TCP proxy in front of PostgreSQL that loses the answer to a chosen statement: it forwards the
statement, lets the server run it (and, in autocommit, commit it), then closes the client's
connection without passing the answer on, as a network that fails right after a COMMIT does.

It reads the frontend protocol's message framing (after the untyped start-up messages): a
statement is chosen by a fragment of its text, and recognised again when a later Bind names the
prepared statement a Parse gave that text."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

READY = b"Z\x00\x00\x00\x05"  # ReadyForQuery: the server is done with what it was sent
UNTYPED_REQUESTS = (80877103, 80877104)  # SSLRequest, GSSENCRequest: a start-up message follows


def proxied(listener: socket.socket, upstream_port: int) -> Iterator[tuple[socket.socket, socket.socket]]:
    """Each connection ``listener`` accepts, with one of its own to PostgreSQL on ``upstream_port``
    (a client whose server is not there sees its connection closed), until the listener closes."""
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        try:
            server = socket.create_connection(("127.0.0.1", upstream_port))
        except OSError:
            client.close()
            continue
        yield client, server


class AnswerLosingProxy:
    """Listens on ``port``, passes every connection through to PostgreSQL on ``upstream_port``,
    and loses the answers to the next executions of the statement holding ``fragment`` once
    armed (``lose_next``); ``lost`` and ``lost_failed`` count what was lost."""

    def __init__(self, upstream_port: int, fragment: bytes) -> None:
        self.upstream_port = upstream_port
        self.fragment = fragment
        self.armed = 0  # answers still to lose
        self.lost = 0  # answers lost that said the statement completed (in autocommit: committed)
        self.lost_failed = 0  # answers lost that were the statement's error: nothing committed
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._connections: list[_Connection] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def lose_next(self, count: int = 1) -> None:
        """Lose the answers to the next ``count`` executions of the chosen statement."""
        with self._lock:
            self.armed = count

    def close(self) -> None:
        """Stop listening and close every connection. Closing the listening socket alone leaves
        a thread blocked in accept() holding it, and the port taking connections: shut down, it
        wakes the accept."""
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(5)
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def take(self) -> bool:
        """Whether the execution seen now is one to lose (one armed loss used up)."""
        with self._lock:
            if self.armed <= 0:
                return False
            self.armed -= 1
            return True

    def count_lost(self, answer: bytes) -> None:
        """Count a lost ``answer``: the statement's completion, or its error."""
        kinds = [kind for kind, _ in _split(answer, True)[0]]
        with self._lock:
            if b"C" in kinds and b"E" not in kinds:  # CommandComplete, no ErrorResponse
                self.lost += 1
            else:
                self.lost_failed += 1

    def _accept(self) -> None:
        for client, server in proxied(self._listener, self.upstream_port):
            connection = _Connection(self, client, server)
            with self._lock:
                self._connections.append(connection)
            connection.start()


class _Connection:
    def __init__(self, proxy: AnswerLosingProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.losing = threading.Event()  # the answer now coming is to be lost
        self.prepared: set[bytes] = set()  # names of statements prepared with the chosen text
        self.bound = False  # the portal last bound runs the chosen statement

    def start(self) -> None:
        threading.Thread(target=self._upstream, daemon=True).start()
        threading.Thread(target=self._downstream, daemon=True).start()

    def close(self) -> None:
        for s in (self.client, self.server):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _upstream(self) -> None:
        buffer = b""
        started = False
        with suppress(OSError):
            while chunk := self.client.recv(65536):
                buffer += chunk
                messages, buffer, started = _split(buffer, started)
                if any(self._chosen(kind, body) for kind, body in messages) and self.proxy.take():
                    self.losing.set()
                self.server.sendall(chunk)
        self.close()

    def _chosen(self, kind: bytes, body: bytes) -> bool:
        """Whether this message runs the chosen statement: a simple Query with its text, or an
        Execute of a portal bound to a statement a Parse gave its text (not the Parse itself:
        psycopg prepares a statement in a round trip of its own, and nothing runs then)."""
        if kind == b"Q":
            return self.proxy.fragment in body
        if kind == b"P":  # Parse: statement name, then its text
            name, _, rest = body.partition(b"\x00")
            if self.proxy.fragment in rest:
                self.prepared.add(name)
            else:
                self.prepared.discard(name)  # the unnamed statement, parsed anew
        elif kind == b"B":  # Bind: portal name, then statement name
            self.bound = body.split(b"\x00", 2)[1] in self.prepared
        elif kind == b"E":
            return self.bound
        return False

    def _downstream(self) -> None:
        held = b""
        with suppress(OSError):
            while chunk := self.server.recv(65536):
                if not self.losing.is_set():
                    self.client.sendall(chunk)
                    continue
                held += chunk
                if READY in held:  # the server ran (and committed) it: the client never hears
                    self.proxy.count_lost(held)
                    break
        self.close()


def _split(buffer: bytes, started: bool) -> tuple[list[tuple[bytes, bytes]], bytes, bool]:
    """The whole messages at the head of ``buffer`` (type, body), the rest, and whether the
    start-up messages are behind."""
    messages = []
    while True:
        if not started:
            if len(buffer) < 8:
                return messages, buffer, started
            length, code = struct.unpack("!II", buffer[:8])
            if len(buffer) < length:
                return messages, buffer, started
            buffer = buffer[length:]
            started = code not in UNTYPED_REQUESTS
            continue
        if len(buffer) < 5:
            return messages, buffer, started
        length = struct.unpack("!I", buffer[1:5])[0]
        if len(buffer) < 1 + length:
            return messages, buffer, started
        messages.append((buffer[:1], buffer[5:1 + length]))
        buffer = buffer[1 + length:]


@contextmanager
def answer_losing_proxy(upstream_port: int, fragment: bytes) -> Iterator[AnswerLosingProxy]:
    proxy = AnswerLosingProxy(upstream_port, fragment)
    try:
        yield proxy
    finally:
        proxy.close()
