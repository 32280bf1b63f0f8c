"""A path with a trailing slash is a route like any other unknown one: a 404 in the envelope, not
Starlette's 307 to the slashless path. That redirect had no envelope and no error code, its
Location was built from the client's Host header, and under an Idempotency-Key its 307 was kept
as the key's answer for /jobs/: following it (as httpx, curl -L, OkHttp and browsers do for a 307,
method, body and headers kept) was a 422 "Idempotency-Key reused with a different request" at
/jobs, and every retry of the key got the 307 again: the key could never create its job."""

from __future__ import annotations

from types import SimpleNamespace
from uuid import UUID

import pytest
from fastapi.testclient import TestClient

from adapters.api.app import create_app
from adapters.api.idempotency import storable
from adapters.settings import Settings


def _app() -> TestClient:
    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48)
    container = SimpleNamespace(settings=settings, read_pool=None,
                                service=SimpleNamespace(sealer=SimpleNamespace(evict=lambda _u: None),
                                                        user_views=None))
    # No lifespan (no `with`): nothing here touches the database.
    return TestClient(create_app(container), raise_server_exceptions=False)  # type: ignore[arg-type]


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/jobs/"), ("POST", "/jobs/"), ("GET", "/me/"), ("GET", "/webhooks/"), ("POST", "/rules/"),
    ("GET", f"/jobs/{UUID(int=1)}/"),
])
def test_a_trailing_slash_is_a_404_in_the_envelope_never_a_redirect(method: str, path: str) -> None:
    answer = _app().request(method, path, headers={"Host": "evil.example"}, follow_redirects=False)
    assert answer.status_code == 404, (answer.status_code, answer.headers.get("location"))
    assert "location" not in answer.headers
    assert answer.json()["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize("status", [300, 301, 302, 303, 307, 308])
def test_a_redirect_is_never_kept_as_a_keys_answer(status: int) -> None:
    assert storable(status) is False
