"""HTTP as the bytes on the wire, for what a client library hides (a HEAD's absent body)."""

from __future__ import annotations

import socket


def raw_head(port: int, path: str) -> bytes:
    """Every byte a server on loopback sends for one HEAD (the connection closed after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        got = b""
        while chunk := conn.recv(65536):
            got += chunk
    return got
