"""Request bodies are strict JSON: what Python's decoder reads one way and another reader could
read another (a repeated name, UTF-16, NaN) is refused, and every plain body reads as it did."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from adapters.api.strict_json import StrictJSONRoute, loads

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@given(JSON_VALUES)
def test_every_plain_json_body_reads_as_pythons_decoder_reads_it(value: object) -> None:
    body = json.dumps(value).encode()
    assert loads(body) == json.loads(body)


@pytest.mark.parametrize(("body", "why"), [
    (b'{"item_count": 1, "item_count": 200}', "'item_count' is given twice"),
    (b'{"a": {"b": 1, "b": 2}}', "'b' is given twice"),
    ('{"item_count": 1}'.encode("utf-16"), "not UTF-8"),
    ('{"item_count": 1}'.encode("utf-32"), "not UTF-8"),
    (b'{"item_count": NaN}', "NaN is not JSON"),
    (b'{"x": -Infinity}', "-Infinity is not JSON"),
    (b'{"x": ' + b"9" * 5000 + b"}", "digits"),
    (b"\xef\xbb\xbf{}", "BOM"),
    (b"[" * 100_000, "nested"),  # past the decoder's recursion limit
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "nested"),
])
def test_a_body_read_two_ways_or_not_at_all_is_refused_naming_why(body: bytes, why: str) -> None:
    """Python's decoder reads each of these but the last (a ValueError that FastAPI answered with
    a 400 of its own wording)."""
    with pytest.raises(json.JSONDecodeError, match=why):
        loads(body)


class _Body(BaseModel):
    item_count: int


def _app() -> TestClient:
    app = FastAPI()
    router = APIRouter(route_class=StrictJSONRoute)

    @router.post("/jobs")
    async def create(body: _Body) -> dict[str, int]:
        return {"item_count": body.item_count}

    @router.get("/jobs")
    async def listed() -> dict[str, str]:
        return {"ok": "yes"}

    app.include_router(router)
    return TestClient(app)


def test_a_route_with_a_body_reads_it_strictly_and_one_without_is_as_it_was() -> None:
    client = _app()
    assert client.post("/jobs", json={"item_count": 3}).json() == {"item_count": 3}
    r = client.post("/jobs", content=b'{"item_count": 1, "item_count": 200}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and "twice" in r.text
    assert client.get("/jobs").json() == {"ok": "yes"}


class _NoCommands:
    """A service that takes no command: a body refused as it is read never reaches one."""

    user_views = None
    sealer = SimpleNamespace(evict=lambda _user: None)
    ran = 0

    async def run(self, _command: object) -> None:
        self.ran += 1
        raise AssertionError("the callback's body was taken")

    def record_item_result_command(self, *_args: object) -> None:
        return None


@pytest.mark.parametrize("body", [
    b'{"idx": 0, "status": "done", "idempotency_key": "k", "idx": 1}',
    b'{"idx": 0, "status": "failed", "idempotency_key": "k", "error": "a", "error": "b"}',
    '{"idx": 0, "status": "done", "idempotency_key": "k"}'.encode("utf-16"),
])
def test_the_gpu_callback_reads_its_body_strictly_too(body: bytes) -> None:
    """The callback reads its raw body itself (it is authenticated first), so not through the
    route's body field: it is strict JSON all the same (a repeated name is the last for pydantic)."""
    from uuid import uuid4

    from adapters.api.app import create_app
    from adapters.settings import Settings

    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48)
    service = _NoCommands()
    app = create_app(SimpleNamespace(settings=settings, read_pool=None, service=service, s3=None))  # type: ignore[arg-type]
    r = TestClient(app, raise_server_exceptions=False).post(
        f"/jobs/{uuid4()}/callback", content=body,
        headers={"content-type": "application/json", "X-Callback-Secret": settings.callback_secret})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "VALIDATION_FAILED"), r.text
    assert "not JSON" in r.json()["error"]["message"] and service.ran == 0
