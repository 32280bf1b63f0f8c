"""A replay (``/streams``, ``/streams/{id}/events``) whose database goes away midway (a restart, a
failover), served by a real uvicorn: its 200 already sent, the error escaped the stream, a
traceback in the log per open replay at each outage, where an outage is said at most every 10 s.
Ended whole, its NDJSON would read as complete: the transfer is broken off instead."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest

from adapters.api.app import create_app
from adapters.bootstrap import build
from adapters.settings import Settings
from projections.replay import Replayer
from tests.served import served_api


def test_a_replay_the_database_leaves_midway_is_broken_off_not_a_traceback(
    settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    container = build(settings, pool_size=2)  # the stack's PostgreSQL and S3
    user_id, _ = container.service.register(f"device-replay-away-{uuid.uuid4().hex}").value
    plain = Replayer.stream

    def leaving(self: Replayer, stream_id: uuid.UUID) -> Iterator[Any]:
        yield next(plain(self, stream_id))  # the stream's first event, read from the log
        raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")

    monkeypatch.setattr(Replayer, "stream", leaving)
    app = create_app(container)
    token = app.state.tokens.issue(uuid.uuid4(), datetime.now(UTC), role="analyst")
    got = b""
    try:
        with served_api(app) as port:
            caplog.set_level(logging.WARNING)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client, \
                    client.stream("GET", f"/streams/{user_id}/events",
                                  headers={"Authorization": f"Bearer {token}"}) as answer:
                assert answer.status_code == 200
                with pytest.raises(httpx.RemoteProtocolError):  # the last chunk never came
                    for chunk in answer.iter_raw():
                        got += chunk
    finally:
        container.close()
    # served_api's end waited for the server's tasks (uvicorn's shutdown does): whatever it logs is in
    assert got.count(b"\n") == 1 and b'"type":"Registered"' in got, got  # the line read before it went
    assert app.state.database_away.count == 1
    assert app.state.staff_stream_slots._open == {}  # its slot given back
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
