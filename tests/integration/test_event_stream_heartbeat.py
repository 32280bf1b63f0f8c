"""A job's event stream while its job is quiet: a comment line every HEARTBEAT_S with nothing
sent, so a proxy's read timeout does not cut it and its client can tell it alive; the events
themselves, and their ids, as before."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest

from adapters.api import routes_jobs
from adapters.api.app import create_app
from adapters.bootstrap import build
from adapters.settings import Settings
from tests.served import served_api


def test_a_quiet_jobs_stream_sends_a_keep_alive_comment_and_then_its_events_with_their_ids(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, a stream sent nothing while its job waited (up to SSE_MAX_S): the read below
    timed out."""
    monkeypatch.setattr(routes_jobs, "HEARTBEAT_S", 0.5, raising=False)
    monkeypatch.setattr(routes_jobs, "SSE_MAX_S", 20.0)  # a stream that never ends here ends anyway
    container = build(settings, pool_size=2)  # the stack's PostgreSQL and S3
    service = container.service
    user_id, _ = service.register(f"device-heartbeat-{uuid.uuid4().hex}").value
    job_id = service.create_job(user_id, "interior", 1).value  # JobCreated, version 1: then quiet
    app = create_app(container)
    token = app.state.tokens.issue(user_id, datetime.now(UTC))
    try:
        with served_api(app) as port:
            headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": "1"}  # JobCreated seen
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http, \
                    http.stream("GET", f"/jobs/{job_id}/events", headers=headers) as r:
                assert r.status_code == 200
                chunks = r.iter_text()
                started = time.monotonic()
                first = next(chunks)  # before: a ReadTimeout, nothing sent while the job waited
                waited = time.monotonic() - started
                assert first == ": keep-alive\n\n", first
                assert waited >= 0.4, waited  # after HEARTBEAT_S of quiet, not at once
                assert service.cancel_job(user_id, job_id).value
                rest = "".join(chunks)  # the stream ends at the terminal event
    finally:
        container.close()
    blocks = [b for b in (first + rest).split("\n\n") if b]
    comments = [b for b in blocks if b.startswith(":")]
    events = [dict(line.split(": ", 1) for line in b.splitlines()) for b in blocks if not b.startswith(":")]
    assert set(comments) == {": keep-alive"}
    assert [(e["id"], e["event"]) for e in events] == [("2", "JobCanceled")]  # its id: its version
    assert not blocks[-1].startswith(":")  # the stream ends with its terminal event
