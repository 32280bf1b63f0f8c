"""What the staff routes refuse, as the CLI does: a stream or a version the log does not hold, a
report "at" a position not yet written, and more replays at once than a process keeps open."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from uuid import uuid4

from tests.e2e.test_staff_roles import staff_headers


def test_a_stream_or_a_version_the_log_does_not_hold_is_a_404(client, http, settings):
    analyst = staff_headers(settings, "analyst")
    versions = len(http.get(f"/streams/{client.user_id}/events", headers=analyst).text.splitlines())
    assert versions >= 2
    r = http.get(f"/streams/{client.user_id}/state", params={"version": versions + 1}, headers=analyst)
    assert r.status_code == 404 and f"only {versions} version" in r.json()["error"]["message"]  # was 200, the last
    r = http.get(f"/streams/{client.user_id}/state", params={"version": versions}, headers=analyst)
    assert r.status_code == 200 and r.json()["data"]["version"] == versions
    for path in (f"/streams/{uuid4()}/events", f"/streams/{uuid4()}/state?version=1"):
        r = http.get(path, headers=analyst)  # events: was 200 with no line
        assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND", (path, r.text)


def test_a_report_at_a_position_past_the_log_head_is_a_422(client, http, settings):
    auditor, analyst = staff_headers(settings, "auditor"), staff_headers(settings, "analyst")
    period = {"from": (datetime.now(UTC) - timedelta(days=1)).isoformat(),
              "to": (datetime.now(UTC) + timedelta(days=1)).isoformat()}
    lines = http.get("/streams", headers=analyst).text.splitlines()
    head = json.loads(lines[-1])["id"]  # the log holds at least this
    for at in (head + 1_000_000, 2**62):
        r = http.get("/audit/report", params={**period, "at": at}, headers=auditor)
        assert r.status_code == 422 and "not a position of the log" in r.json()["error"]["message"], r.text
    assert http.get("/audit/report", params={**period, "at": head}, headers=auditor).status_code == 200


def test_replays_past_the_processs_slots_are_told_to_wait_and_a_finished_one_gives_its_slot_back(client, settings):
    from fastapi.testclient import TestClient

    from adapters.api.app import create_app
    from adapters.api.held_responses import StreamSlots
    from adapters.api.routes_analysts import STAFF_STREAMS
    from adapters.bootstrap import build

    container = build(settings, pool_size=2)
    try:
        app = create_app(container)
        analyst = staff_headers(settings, "analyst")
        with TestClient(app) as api:
            slots = app.state.staff_stream_slots = StreamSlots(per_user=STAFF_STREAMS, total=STAFF_STREAMS)
            held = [slots.take("someone") for _ in range(STAFF_STREAMS)]  # clients still reading
            # an unknown stream too: the slot is taken before any of the replay's work
            for path in ("/streams", f"/streams/{client.user_id}/events", f"/streams/{uuid4()}/events"):
                r = api.get(path, headers=analyst)
                assert r.status_code == 429 and r.json()["error"]["code"] == "RATE_LIMITED", (path, r.text)
                assert int(r.headers["Retry-After"]) >= 1
            held.pop()()  # one ends
            r = api.get("/streams", headers=analyst)
            assert r.status_code == 200 and r.text.count("\n") >= 1
            assert api.get(f"/streams/{uuid4()}/events", headers=analyst).status_code == 404
            assert slots.open_streams("someone") == STAFF_STREAMS - 1  # the finished one's and the 404's back
    finally:
        container.close()


def test_one_staff_subject_holds_at_most_its_share_of_the_replay_slots(client, settings):
    """The app's own slots, as it makes them: one analyst's replays still being read take
    STAFF_STREAMS_PER_SUBJECT of them, and another analyst still replays, until all are taken."""
    from fastapi.testclient import TestClient

    from adapters.api.app import create_app
    from adapters.api.routes_analysts import STAFF_STREAMS, STAFF_STREAMS_PER_SUBJECT
    from adapters.bootstrap import build
    from adapters.tokens import TokenIssuer

    assert 0 < STAFF_STREAMS_PER_SUBJECT < STAFF_STREAMS
    issuer = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience, 3600)
    subjects = [uuid4() for _ in range(3)]
    headers = [{"Authorization": f"Bearer {issuer.issue(s, datetime.now(UTC), role='analyst')}"} for s in subjects]
    container = build(settings, pool_size=2)
    try:
        app = create_app(container)
        with TestClient(app) as api:
            assert api.get("/streams", headers=headers[0]).status_code == 200  # the app makes its slots
            slots = app.state.staff_stream_slots
            held = [slots.take(subjects[0]) for _ in range(STAFF_STREAMS_PER_SUBJECT)]  # still being read
            r = api.get("/streams", headers=headers[0])
            assert r.status_code == 429 and r.json()["error"]["code"] == "RATE_LIMITED", r.text
            assert api.get(f"/streams/{client.user_id}/events", headers=headers[1]).status_code == 200
            held += [slots.take(subjects[1]) for _ in range(STAFF_STREAMS - STAFF_STREAMS_PER_SUBJECT)]
            assert api.get("/streams", headers=headers[2]).status_code == 429  # all taken, by two
            held.pop(0)()  # one of the first subject's ends
            assert api.get("/streams", headers=headers[0]).status_code == 200
            for give_back in held:
                give_back()
    finally:
        container.close()
