"""A number in a query string, or in Last-Event-ID, is its decimal digits: what pydantic's lax int
and Python's int() also read ("1.0", "+1", " 1", "0_1" as 1) is a 422 wherever one is taken, and the
plain spelling is not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import httpx

from adapters.settings import Settings
from tests.e2e.conftest import Client
from tests.e2e.test_staff_roles import staff_headers

OTHER_SPELLINGS = ("1.0", "+1", " 1", "1 ", "0_1", "1e0", "0x1", "\u0661")  # the last: ARABIC-INDIC DIGIT ONE


def test_a_number_in_a_query_is_its_decimal_digits(client: Client, http: httpx.Client, settings: Settings) -> None:
    analyst, auditor = staff_headers(settings, "analyst"), staff_headers(settings, "auditor")
    period = {"from": (datetime.now(UTC) - timedelta(days=1)).isoformat(),
              "to": (datetime.now(UTC) + timedelta(days=1)).isoformat()}
    routes: list[tuple[str, dict[str, str], str, dict[str, str], int]] = [
        # path, other parameters, the number's name, headers, the answer to its plain spelling
        ("/jobs", {}, "limit", client.headers, 200),
        (f"/webhooks/{uuid4()}/deliveries", {}, "limit", client.headers, 404),  # no such endpoint
        ("/streams", {}, "from", analyst, 200),
        (f"/streams/{client.user_id}/state", {}, "version", analyst, 200),
        ("/audit/ledger", {"user_id": str(client.user_id)}, "limit", auditor, 200),
        ("/audit/report", period, "at", auditor, 200),
    ]
    for path, params, name, headers, plain in routes:
        for spelling in ("1", "01"):
            r = http.get(path, params={**params, name: spelling}, headers=headers)
            assert r.status_code == plain, (path, spelling, r.text)
        for spelling in OTHER_SPELLINGS:  # before: 200 (or the 404) for the first five, read as 1
            r = http.get(path, params={**params, name: spelling}, headers=headers)
            assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_FAILED", (path, spelling, r.text)


def test_last_event_id_is_its_decimal_digits(client: Client, api_url: str) -> None:
    job_id = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
    client.data("POST", f"/jobs/{job_id}/cancel")  # finished: each stream ends after its events
    with httpx.Client(base_url=api_url, headers=client.headers, timeout=10) as http:
        for last in ("1", "01", str(10**19)):
            r = http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": last})
            assert r.status_code in (200, 204), (last, r.text)
        for last in ("1.0", "+1", "-1", "0_1", "1e0", "9" * 21):  # before: "+1", "-1" and "0_1" read as 1, 0 and 1
            r = http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": last})
            assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_FAILED", (last, r.text)
