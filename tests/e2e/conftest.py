"""A real uvicorn API process on the session's embedded stack, and an HTTP client for it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from infra.stack import EmbeddedStack


@pytest.fixture(scope="session")
def api_url(apps: EmbeddedStack) -> Iterator[str]:
    yield f"http://{apps.settings.api_host}:{apps.settings.api_port}"


@pytest.fixture
def http(api_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=30) as client:
        yield client


class Client:
    """One anonymous app user."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        r = http.post("/auth/anon", json={"device_hash": f"device-{uuid.uuid4().hex}"})
        assert r.status_code == 201, r.text
        self.token = r.json()["data"]["token"]
        self.user_id = r.json()["data"]["user_id"]
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kw)

    def data(self, method: str, path: str, status: int = 200, **kw: Any) -> Any:
        r = self.call(method, path, **kw)
        assert r.status_code == status, r.text
        body = r.json()
        assert body["success"] is True and body["error"] is None
        return body["data"]


@pytest.fixture
def client(http: httpx.Client) -> Client:
    return Client(http)


@pytest.fixture
def other(http: httpx.Client) -> Client:
    return Client(http)
