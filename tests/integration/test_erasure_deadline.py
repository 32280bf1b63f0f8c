"""DELETE /me of a long-lived user: its photos, hundreds of thousands of objects, take minutes to
delete (about a thousand a second), so the request deletes them for a while, answers, and leaves
the rest to the sweeper, which finishes the erasure."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from adapters import bootstrap
from adapters.api import routes_users
from adapters.api.app import create_app
from adapters.bootstrap import build_sweeper
from adapters.objects import PAGE
from adapters.settings import Settings
from domain.contracts.keys import user_prefixes


def _left(settings: Settings, s3: Any, user_id: uuid.UUID) -> int:
    return sum(s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=p).get("KeyCount", 0)
               for p in user_prefixes(user_id))


def _completed(settings: Settings, user_id: uuid.UUID) -> bool:
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        row = conn.execute("SELECT completed_at FROM palette_erasures WHERE user_id = %s", [user_id]).fetchone()
    return row is not None and row[0] is not None


def test_erasing_a_user_with_more_objects_than_its_request_can_delete_answers_202_and_the_sweeper_finishes(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    container = bootstrap.build(settings, pool_size=2)
    sweeper = build_sweeper(settings)
    try:
        user_id = container.service.register(f"heavy-{uuid.uuid4().hex}", plan="pro").value[0]
        keys = [f"inputs/{user_id}/{uuid.uuid4()}/{idx}.jpg" for _ in range(3) for idx in range(200 + PAGE // 3)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: container.s3.put_object(Bucket=settings.s3_bucket, Key=k, Body=b"x"), keys))
        monkeypatch.setattr(routes_users, "ERASURE_REQUEST_S", 0.0, raising=False)  # out of time after the first page
        app = create_app(container)
        token = app.state.tokens.issue(user_id, datetime.now(UTC))
        answer = TestClient(app).delete("/me", headers={"Authorization": f"Bearer {token}"})

        assert answer.status_code == 202, answer.text
        data = answer.json()["data"]
        assert data["erased"] is True and data["finished"] is False and data["objects_deleted"] == PAGE
        assert _left(settings, container.s3, user_id) == len(keys) - PAGE and not _completed(settings, user_id)

        assert sweeper.finish_erasures(0.0) >= 1
        assert _left(settings, container.s3, user_id) == 0 and _completed(settings, user_id)
    finally:
        sweeper.close()
        container.close()
