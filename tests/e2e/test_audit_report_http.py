"""GET /audit/report over HTTP: auditors only, the period's figures at one log position with the
identity checked, and a clear 422 for a period that is not one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.e2e.test_staff_roles import staff_headers
from tests.integration.test_stack import wait_until


def test_auditors_get_the_period_report_and_others_do_not(client, http, settings):
    client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 2})
    auditor, analyst = staff_headers(settings, "auditor"), staff_headers(settings, "analyst")
    period = {"from": (datetime.now(UTC) - timedelta(days=1)).isoformat(),
              "to": (datetime.now(UTC) + timedelta(days=1)).isoformat()}

    def report() -> dict | None:  # the projector may still be folding this client's reservation
        data = http.get("/audit/report", params=period, headers=auditor).json()["data"]
        return data if data["complete"] and data["total"]["placed"] >= 2 else None

    data = wait_until(report, timeout_s=30, what="the period report to include the reservation")
    total = data["total"]
    assert data["ok"] and data["position"] >= 1 and data["identity"] == "opening + granted - spent = closing + reserved"
    assert total["opening"] + total["granted"] - total["spent"] == total["closing"] + total["reserved"]
    assert total["outstanding"] == total["closing"] + total["held_closing"]
    assert {p["plan"] for p in data["plans"]} >= {"free"}
    assert http.get("/audit/report", params=period, headers=analyst).status_code == 404
    assert client.call("GET", "/audit/report", params=period).status_code == 404
    backwards = {"from": period["to"], "to": period["from"]}
    r = http.get("/audit/report", params=backwards, headers=auditor)
    assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_FAILED"
    naive = {"from": "2026-01-01T00:00:00", "to": "2026-02-01T00:00:00"}
    assert http.get("/audit/report", params=naive, headers=auditor).status_code == 422


def test_a_time_without_its_offset_or_not_iso_is_a_422_on_every_staff_route(client, http, settings):
    auditor = staff_headers(settings, "auditor")
    user_id = client.data("GET", "/me", 200)["user_id"]
    naive, aware = "2020-01-01T00:00:00", "2020-01-01T00:00:00+00:00"
    # A bare number is not a time here (pydantic read one as Unix seconds: 20260101 was 1970-08-23),
    # nor one with a NUL after it (datetime.fromisoformat reads up to the NUL).
    for time in (naive, "20260101", "0", "1700000000.5", aware + "\x00"):
        for path, params in [("/streams", {"since": time}), ("/streams", {"until": time}),
                             (f"/streams/{user_id}/state", {"as_of": time}),
                             ("/audit/ledger", {"user_id": user_id, "from": time}),
                             ("/audit/ledger", {"user_id": user_id, "to": time}),
                             ("/audit/balance", {"user_id": user_id, "as_of": time}),
                             ("/audit/report", {"from": time, "to": aware})]:
            r = http.get(path, params=params, headers=auditor)
            assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_FAILED", (path, params, r.text)
            with_offset = {k: (aware if v == time else v) for k, v in params.items()}
            if path != "/audit/report":  # from == to: not a period
                answer = http.get(path, params=with_offset, headers=auditor)
                assert answer.status_code in (200, 404), (path, with_offset, answer.text)


def test_one_whole_log_audit_runs_at_a_time_and_another_is_told_to_wait(settings):
    # Each holds a thread and a read-pool connection for a scan of the whole log, and goes on
    # after its client is gone: 20 at once held the pool a client's reads need.
    from fastapi.testclient import TestClient

    from adapters.api.app import create_app
    from adapters.bootstrap import build

    container = build(settings, pool_size=2)
    try:
        app = create_app(container)
        auditor = staff_headers(settings, "auditor")
        period = {"from": "2020-01-01T00:00:00+00:00", "to": "2020-01-02T00:00:00+00:00"}
        with TestClient(app) as api:
            app.state.audit_scanning = True  # one is running
            for path, params in (("/audit/reconcile", {}), ("/audit/verify", {}), ("/audit/report", period)):
                r = api.get(path, params=params, headers=auditor)
                assert r.status_code == 429 and r.json()["error"]["code"] == "RATE_LIMITED", (path, r.text)
                assert int(r.headers["Retry-After"]) >= 1
            app.state.audit_scanning = False  # it ended
            verified = api.get("/audit/verify", headers=auditor)
            assert verified.status_code == 200 and app.state.audit_scanning is False  # and this one ended too
            assert {k: verified.json()["data"][k] for k in ("ok", "broken", "breaks")} == {
                "ok": True, "broken": 0, "breaks": []}
    finally:
        container.close()
