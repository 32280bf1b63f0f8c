"""A number in a query string is its decimal digits: what pydantic's lax int also reads ("5.0",
"+5", " 5", "5_0" as 50) is a 422 on every route that takes one, and the plain spelling is not."""

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
