"""The answer-losing proxy of the lost-commit tests leaves nothing behind it: once closed, its
port takes no connection and none of its threads runs on."""

from __future__ import annotations

import socket
import threading

from tests.pg_answer_loss import answer_losing_proxy
from tests.waiting import wait_until


def test_a_closed_proxy_takes_no_connection_and_leaves_no_thread_running() -> None:
    before = set(threading.enumerate())
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        with answer_losing_proxy(upstream.getsockname()[1], b"INSERT") as proxy:
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            server, _ = upstream.accept()
            client.sendall(b"\x00")  # through the proxy: its acceptor is back waiting for the next
            assert server.recv(1) == b"\x00"
        port = proxy.port
        assert client.recv(1) == b"" and server.recv(1) == b""  # its connections closed with it
        client.close()
        server.close()
    wait_until(lambda: set(threading.enumerate()) <= before, timeout_s=5, what="the proxy's threads ended")
    refused = socket.socket()
    try:
        assert refused.connect_ex(("127.0.0.1", port)) != 0
    finally:
        refused.close()


def test_a_proxy_whose_server_is_not_there_closes_the_client_and_accepts_on() -> None:
    with socket.create_server(("127.0.0.1", 0)) as gone:
        port = gone.getsockname()[1]
    with answer_losing_proxy(port, b"INSERT") as proxy:
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
                assert client.recv(1) == b""
