"""Analyst and auditor tokens read the log and the ledger over HTTP; client tokens see 404 there,
and staff tokens cannot write."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from uuid import uuid4

from adapters.tokens import TokenIssuer
from tests.integration.test_stack import wait_until


def staff_headers(settings, role: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    issuer = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience, 3600)
    return {"Authorization": f"Bearer {issuer.issue(uuid4(), datetime.now(UTC), role=role)}"}


def test_analysts_replay_and_auditors_read_the_ledger(client, http, settings):
    client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 3})
    analyst, auditor = staff_headers(settings, "analyst"), staff_headers(settings, "auditor")

    lines = http.get(f"/streams/{client.user_id}/events", headers=analyst).text.splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["Registered", "CreditsGranted", "CreditsReserved"]
    state = http.get(f"/streams/{client.user_id}/state", params={"version": 2}, headers=analyst).json()["data"]
    assert state["state"]["balance"] == 50 and state["version"] == 2
    assert http.get("/streams", params={"type": "Nope"}, headers=analyst).status_code == 422
    both = http.get(f"/streams/{client.user_id}/state", params={"version": 2, "as_of": datetime.now(UTC).isoformat()},
                    headers=analyst)  # exactly one of them
    assert both.status_code == 422 and both.json()["error"]["code"] == "VALIDATION_FAILED"
    assert http.get("/audit/verify", headers=analyst).status_code == 404  # analysts are not auditors

    def ledger() -> list[dict]:  # the projector may still be folding: wait on the rows, not on time
        r = http.get("/audit/ledger", params={"user_id": client.user_id}, headers=auditor)
        if r.status_code == 404:  # a user the ledger has no row of yet is unknown to it
            return []
        return r.json()["data"]["entries"] if len(r.json()["data"]["entries"]) == 2 else []

    entries = wait_until(ledger, timeout_s=30, what="the ledger rows")
    assert entries[0]["type"] == "grant" and entries[0]["balance"] == 50
    pages, cursor = [], None  # a page at a time: the same entries, the same running balances
    while True:
        page = http.get("/audit/ledger", params={"user_id": client.user_id, "limit": 1,
                                                  **({"cursor": cursor} if cursor else {})}, headers=auditor)
        pages.append(page.json()["data"]["entries"])
        cursor = page.json()["data"]["next_cursor"]
        if cursor is None:
            break
    assert pages == [[e] for e in entries]  # the page holding the last entry has no next cursor
    for bad in ({"cursor": "x1"}, {"cursor": "9" * 11}, {"limit": 0}, {"limit": 10_001}):
        r = http.get("/audit/ledger", params={"user_id": client.user_id, **bad}, headers=auditor)
        assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_FAILED", bad
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    backwards = http.get("/audit/ledger", params={"user_id": client.user_id, "from": future,  # before: 200, none
                                                   "to": datetime.now(UTC).isoformat()}, headers=auditor)
    assert backwards.status_code == 422 and backwards.json()["error"]["code"] == "VALIDATION_FAILED", backwards.text
    balance = http.get("/audit/balance", params={"user_id": client.user_id, "as_of": future}, headers=auditor)
    assert balance.json()["data"]["granted"] == 50
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()  # before the user's first entry: zeros
    before = http.get("/audit/balance", params={"user_id": client.user_id, "as_of": past}, headers=auditor)
    assert before.status_code == 200 and before.json()["data"]["entries"] == before.json()["data"]["balance"] == 0
    unknown = uuid4()  # before: 200 and zeros, as if a user had spent everything
    nobody = http.get("/audit/balance", params={"user_id": unknown, "as_of": future}, headers=auditor)
    assert nobody.status_code == 404 and nobody.json()["error"]["code"] == "NOT_FOUND", nobody.text
    assert str(unknown) in nobody.json()["error"]["message"]
    nowhere = http.get("/audit/ledger", params={"user_id": unknown}, headers=auditor)  # before: 200, no entries
    assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "NOT_FOUND", nowhere.text
    assert http.get("/audit/verify", headers=auditor).json()["data"]["ok"] is True


def test_client_tokens_get_404_and_staff_tokens_cannot_write(client, http, settings):
    for path in (f"/streams/{client.user_id}/events", "/streams", "/audit/verify", "/audit/reconcile"):
        r = client.call("GET", path, params={"user_id": client.user_id})
        assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND", path
    auditor = staff_headers(settings, "auditor")
    r = http.post("/jobs", json={"preset": "interior", "item_count": 1}, headers=auditor)
    assert r.status_code == 401 and r.json()["error"]["code"] == "AUTH_INVALID"
    assert http.get("/me", headers=auditor).status_code == 401
