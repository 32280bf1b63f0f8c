"""GET /streams?from= is a log position, a bigint: one past it is refused (422) before any work.
Taken as it was, psycopg sent it as a numeric, PostgreSQL compared the bigint notification_id
as numeric, no index could serve ``notification_id >= $1``, and each such replay walked the
whole log to find nothing (``/audit/report``'s ``at`` was bounded so already)."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from uuid import uuid4

from fastapi.testclient import TestClient

from adapters.api.app import create_app
from adapters.settings import Settings
from adapters.tokens import TokenIssuer


def _analyst_without_a_database() -> tuple[TestClient, str]:
    """The API with no lifespan and no database (a request that got as far as the log would be a
    500 here), and an analyst's token."""
    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48)
    container = SimpleNamespace(settings=settings, read_pool=None,
                                service=SimpleNamespace(sealer=SimpleNamespace(evict=lambda _u: None),
                                                        user_views=None))
    client = TestClient(create_app(container), raise_server_exceptions=False)  # type: ignore[arg-type]
    token = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience, 3600).issue(
        uuid4(), datetime.now(UTC), role="analyst")
    return client, token


def test_a_replay_from_past_any_log_position_is_refused_before_it_starts() -> None:
    client, token = _analyst_without_a_database()
    for start in (2**63, 10**30):
        answer = client.get("/streams", params={"from": str(start)}, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 422, (start, answer.status_code, answer.text)
        assert answer.json()["error"]["code"] == "VALIDATION_FAILED"


def test_a_replay_window_that_ends_before_it_starts_is_refused_before_it_starts() -> None:
    """As `palette replay all` refuses an --until before its --since: answered 200 with no line,
    the window read as one the log holds no event of."""
    client, token = _analyst_without_a_database()
    answer = client.get("/streams", params={"since": "2026-01-02T00:00:00+00:00", "until": "2026-01-01T23:59:59Z"},
                        headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 422, (answer.status_code, answer.text)
    assert answer.json()["error"]["code"] == "VALIDATION_FAILED" and "until" in answer.json()["error"]["message"]
