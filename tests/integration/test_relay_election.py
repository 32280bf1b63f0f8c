"""Several relays of one log: one publishes, the others stand by and take over when it goes."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest

from adapters.dispatcher import Dispatcher
from adapters.relay import RelayState

from .test_stack import wait_until


def test_one_relay_leads_and_a_standby_takes_over_when_its_connection_ends(settings):
    url = settings.effective_database_url
    first, second = RelayState.connect(url), RelayState.connect(url)
    try:
        assert first.lead("election-test")
        assert not second.lead("election-test")
        assert first.lead("election-test")  # holding it, asking again changes nothing
        assert second.lead("another-log")  # one lock per log
        first.conn.close()  # the leader dies (or loses the database)
        wait_until(lambda: second.lead("election-test"), what="the standby to take over")
    finally:
        second.conn.close()



@pytest.mark.parametrize("holder", ["relay", "dispatcher"])
def test_a_lock_holders_session_ends_within_30_s_of_its_peer_going_silent_on_either_end(settings, holder):
    """A relay the network cut off keeps its lead (a dispatcher its ALONE_LOCK) for as long as the
    server keeps its session: with TCP's defaults, two hours or more before the server's first
    keepalive. Both ends of such a connection give a silent peer 25 s idle (keepalives at 10 s,
    every 5 s, 3 missed) and data unacknowledged 30 s. (A cut itself needs a network namespace and
    a PostgreSQL listening on it; measured by hand.)"""
    url = settings.effective_database_url
    if holder == "relay":
        conn = RelayState.connect(url).conn
    else:  # only its connection is asked for
        conn = Dispatcher(None, None, SimpleNamespace(repository=None), url).conn  # type: ignore[arg-type]
        assert conn is not None
    try:
        row = conn.execute("SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'), "
                           "current_setting('tcp_keepalives_count'), current_setting('tcp_user_timeout')").fetchone()
        assert row == ("10", "5", "3", "30000")  # the server's end (seconds, and milliseconds for the last)
        with socket.socket(fileno=os.dup(conn.fileno())) as client:  # the relay's or the dispatcher's end
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
        if holder == "relay":
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
    finally:
        conn.close()
