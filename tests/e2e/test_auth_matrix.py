"""Every route of the OpenAPI document against every kind of caller, on the running API.

The expectations are written here from the contract (ARCHITECTURE.md section 3, the README's
"For analysts and auditors"), not read from the routes: no token is 401 AUTH_REQUIRED; a token
the API did not mint as it mints them (another secret, issuer or audience, older than it mints
them, an erased user's) is 401 AUTH_INVALID; a staff token is 401 on every client route, a
client token 404 on every staff route, an analyst 404 on the auditors' routes; another user's
object is 404; a role the API does not mint (any other spelling) is no role. A route added to
the document without a place here fails the test."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest

from adapters.settings import Settings
from adapters.tokens import STAFF_TTL_MAX_S

from .conftest import Client

PUBLIC = {("get", "/health"), ("get", "/livez"), ("get", "/readyz"), ("post", "/auth/anon")}
CALLBACK = ("post", "/jobs/{job_id}/callback")  # callback auth: a bearer token is never what it reads
ANALYSTS = {("get", "/streams"), ("get", "/streams/{stream_id}/events"), ("get", "/streams/{stream_id}/state")}
AUDITORS = {("get", "/audit/ledger"), ("get", "/audit/balance"), ("get", "/audit/reconcile"),
            ("get", "/audit/verify"), ("get", "/audit/report")}
# Client routes that name one of the owner's objects: 404 for anyone else.
OWNED_ID = ("{job_id}", "{rule_id}", "{endpoint_id}")
ERASE = ("delete", "/me")


def _token(s: Settings, sub: str, role: object = "client", *, age_s: int = 0, **changes: Any) -> str:
    now = int(time.time()) - age_s
    claims: dict[str, Any] = {"sub": sub, "iat": now, "nbf": now, "exp": now + age_s + 600,
                              "iss": s.jwt_issuer, "aud": s.jwt_audience}
    if role is not None:
        claims["role"] = role
    claims.update(changes)
    return jwt.encode(claims, s.jwt_secret, algorithm="HS256")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# What each kind of caller gets from each kind of route: a (status, code) pair, or None for
# "served" (below 400, or the owner's own domain answers: never 401, 403, 404 or 5xx).
AUTH_REQUIRED = (401, "AUTH_REQUIRED")
AUTH_INVALID = (401, "AUTH_INVALID")
NOT_FOUND = (404, "NOT_FOUND")
OK = None


def _expected(kind: str, route: tuple[str, str]) -> tuple[int, str] | None:
    method, path = route
    if route in PUBLIC:
        return OK  # whatever the Authorization header holds
    if route == CALLBACK:
        return AUTH_INVALID  # no callback secret, no signature: a JWT proves nothing here
    if kind == "none":
        return AUTH_REQUIRED
    if kind in {"forged", "other issuer", "other audience", "expired client", "expired staff", "sub not a uuid"}:
        return AUTH_INVALID
    staff_route = route in ANALYSTS or route in AUDITORS
    if staff_route:
        if kind == "auditor" or (kind == "analyst" and route in ANALYSTS):
            return OK
        return NOT_FOUND  # client tokens (erased ones too), analysts on auditors' routes, unknown roles
    if kind in {"analyst", "auditor", "role Auditor", "role list", "erased client"}:
        return AUTH_INVALID
    if kind == "other client":
        return NOT_FOUND if any(i in path for i in OWNED_ID) else OK
    raise AssertionError(f"no expectation for {kind} on {method.upper()} {path}")


@pytest.fixture
def world(client: Client, http: httpx.Client, settings: Settings) -> dict[str, Any]:
    """The owner's objects, and a token of every kind."""
    job_id = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
    rule_id = client.data("POST", "/rules", 201, json={
        "name": "mine", "preset_id": "interior", "concepts": {"wall": {"action": "remove"}}})["id"]
    endpoint_id = client.data("POST", "/webhooks", 201, json={
        "url": "http://127.0.0.1:9/mine", "events": ["job.queued"]})["id"]
    erased = Client(http)
    erased.data("DELETE", "/me")
    owner = client.user_id
    s = settings
    tokens: dict[str, str | None] = {
        "none": None,
        "other client": Client(http).token,
        "analyst": _token(s, owner, "analyst"),  # naming the owner: still no client
        "auditor": _token(s, owner, "auditor"),
        "role Auditor": _token(s, owner, "Auditor"),
        "role list": _token(s, owner, ["auditor"]),
        "erased client": erased.token,
        "expired client": _token(s, owner, age_s=s.jwt_ttl_s + 120),
        "expired staff": _token(s, owner, "auditor", age_s=STAFF_TTL_MAX_S + 120),
        "sub not a uuid": _token(s, "admin", "auditor"),
        "other issuer": _token(s, owner, iss="someone-else"),
        "other audience": _token(s, owner, "auditor", aud=["someone-else"]),
        "forged": jwt.encode({"sub": owner, "iat": int(time.time()), "exp": int(time.time()) + 600,
                              "iss": s.jwt_issuer, "aud": s.jwt_audience, "role": "auditor"},
                             "not-the-server-secret-" * 3, algorithm="HS256"),
    }
    return {"job_id": job_id, "rule_id": rule_id, "endpoint_id": endpoint_id, "tokens": tokens,
            "mine": (job_id, rule_id, endpoint_id, "mine")}


def _code(r: httpx.Response) -> str | None:
    """The envelope's error code (None for an answer without one: a success, NDJSON)."""
    if not r.headers.get("content-type", "").startswith("application/json"):
        return None
    return (r.json().get("error") or {}).get("code")


def _request(http: httpx.Client, world: dict[str, Any], owner: str, route: tuple[str, str],
             token: str | None) -> httpx.Response:
    method, path = route
    now = datetime.now(UTC)
    url = (path.replace("{job_id}", world["job_id"]).replace("{rule_id}", world["rule_id"])
           .replace("{endpoint_id}", world["endpoint_id"]).replace("{delivery_id}", str(uuid.uuid4()))
           .replace("{stream_id}", owner).replace("{preset_id}", "interior"))
    params: dict[str, Any] = {
        "/audit/ledger": {"user_id": owner}, "/audit/balance": {"user_id": owner, "as_of": now.isoformat()},
        "/audit/report": {"from": (now - timedelta(days=1)).isoformat(), "to": now.isoformat()},
        "/streams/{stream_id}/state": {"version": 1},
    }.get(path, {})
    bodies: dict[tuple[str, str], Any] = {
        ("post", "/auth/anon"): {"device_hash": f"device-{uuid.uuid4().hex}"},
        ("post", "/jobs"): {"preset": "interior", "item_count": 1},
        ("post", "/jobs/{job_id}/execute"): {"concepts": {"wall": {"action": "tone", "value": "warm"}}},
        ("post", "/jobs/{job_id}/callback"): {"idx": 0, "status": "done", "idempotency_key": "x"},
        ("post", "/rules"): {"name": "theirs", "preset_id": "interior", "concepts": {"lamp": {"action": "remove"}}},
        ("put", "/rules/{rule_id}"): {"name": "stolen", "concepts": {"lamp": {"action": "remove"}}},
        ("post", "/webhooks"): {"url": "http://127.0.0.1:9/theirs", "events": ["job.queued"]},
    }
    return http.request(method.upper(), url, params=params, json=bodies.get(route),
                        headers=_bearer(token) if token is not None else {})


def test_every_route_answers_every_kind_of_caller_as_the_contract_says(
        client: Client, http: httpx.Client, world: dict[str, Any]) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    routes = [(m, p) for p, methods in paths.items() for m in methods]
    assert len(routes) >= 38, routes
    wrong: list[str] = []
    tried = 0

    def check(kind: str, route: tuple[str, str], r: httpx.Response,
              expected: tuple[int, str] | None) -> None:
        nonlocal tried
        tried += 1
        what = f"{kind:>15} {route[0].upper():>6} {route[1]}: {r.status_code} {r.text[:160]}"
        if r.status_code >= 500:
            wrong.append(what)
        elif expected is None:
            if r.status_code in (401, 403) or (r.status_code == 404 and "{delivery_id}" not in route[1]):
                wrong.append(what)
        elif (r.status_code, _code(r)) != expected:
            wrong.append(f"{what} (wanted {expected})")
        staff_route = route in ANALYSTS or route in AUDITORS
        if kind != "owner" and not staff_route and r.status_code < 500:
            leaked = [m for m in world["mine"] if m in r.text]
            if leaked:
                wrong.append(f"{what} shows the owner's {leaked}")

    # Everyone but the owner first (a caller's own DELETE /me last: it ends that caller), then the owner.
    for route in sorted(routes, key=lambda r: r == ERASE):
        for kind, token in world["tokens"].items():
            check(kind, route, _request(http, world, client.user_id, route, token), _expected(kind, route))
    for route in sorted(routes, key=lambda r: (r == ERASE, r[0] == "delete")):  # its objects deleted last
        if route not in PUBLIC and route != CALLBACK and route not in ANALYSTS and route not in AUDITORS:
            check("owner", route, _request(http, world, client.user_id, route, client.token), OK)
        elif route in ANALYSTS or route in AUDITORS:
            check("owner", route, _request(http, world, client.user_id, route, client.token), NOT_FOUND)
    assert not wrong, "\n".join(wrong)
    r = client.call("GET", "/me")  # the owner erased itself last
    assert (r.status_code, r.json()["error"]["code"]) == AUTH_INVALID, r.text
    assert tried == len(routes) * (len(world["tokens"]) + 1) - len(PUBLIC) - 1  # the owner: all but public, callback


@pytest.mark.parametrize(("header", "expected"), [
    (lambda t: f"bearer {t}", 200),
    (lambda t: f"BEARER {t}", 200),
    (lambda t: f"Bearer   {t}", 200),  # spaces around the token are no part of it
    (lambda t: f"Bearer\t{t}", 401),
    (lambda t: f"Bearer{t}", 401),
    (lambda t: f"Basic {t}", 401),
    (lambda t: "Bearer", 401),
    (lambda t: f"Bearer {t} {t}", 401),
    (lambda t: f"Bearer {t}.", 401),
    (lambda t: f"Bearer {t}" + "A" * 60_000, 401),  # long, under the head's cap: refused, not a 5xx
])
def test_only_a_bearer_token_in_its_header_authenticates(client: Client, http: httpx.Client,
                                                           header: Callable[[str], str], expected: int) -> None:
    for path in ("/me", "/streams"):
        r = http.get(path, headers={"Authorization": header(client.token)})
        wanted = 404 if (path, expected) == ("/streams", 200) else expected  # a client on a staff route
        assert r.status_code == wanted, (path, r.status_code, r.text[:200])
        assert r.json()["error"] is None or r.json()["error"]["code"] in ("AUTH_REQUIRED", "AUTH_INVALID", "NOT_FOUND")


def test_of_two_authorization_headers_the_first_is_read_and_a_keyed_request_is_refused(
        client: Client, http: httpx.Client) -> None:
    """The routes read the first of a repeated header (adapters.api.idempotency's docstring); a
    request under an Idempotency-Key whose owner would be a guess is a 422 that runs nothing."""
    good, bad = f"Bearer {client.token}", "Bearer not.a.token"
    assert http.get("/me", headers=[("Authorization", good), ("Authorization", bad)]).status_code == 200
    r = http.get("/me", headers=[("Authorization", bad), ("Authorization", good)])
    assert (r.status_code, r.json()["error"]["code"]) == AUTH_INVALID, r.text
    r = http.post("/jobs", json={"preset": "interior", "item_count": 1},
                  headers=[("Authorization", good), ("Authorization", good), ("Idempotency-Key", "twice")])
    assert (r.status_code, r.json()["error"]["code"]) == (422, "VALIDATION_FAILED"), r.text
    assert client.data("GET", "/me")["active_jobs"] == 0


@pytest.mark.parametrize("body", [b"{", b'{"a": 1, "a": 2}', b"\xff"])
def test_a_malformed_body_is_a_401_before_a_422_for_a_caller_without_a_good_token(
        client: Client, http: httpx.Client, world: dict[str, Any], body: bytes) -> None:
    """FastAPI reads a body before it checks the token: a caller with none (or a forged one) got
    a 422 for a malformed body on every client route taking one, learning of the route's body
    before being told it may not call it. The token first; the owner still gets the 422."""
    paths = http.get("/openapi.json").json()["paths"]
    routes = [(m, p) for p, methods in paths.items() for m, op in methods.items()
              if "requestBody" in op and (m, p) not in PUBLIC and (m, p) != CALLBACK]
    assert len(routes) >= 5, routes
    tokens = world["tokens"]
    for route in routes:
        method, path = route
        url = (path.replace("{job_id}", world["job_id"]).replace("{rule_id}", world["rule_id"])
               .replace("{endpoint_id}", world["endpoint_id"]))
        for kind, token, expected in [("none", None, AUTH_REQUIRED), ("forged", tokens["forged"], AUTH_INVALID),
                                      ("analyst", tokens["analyst"], AUTH_INVALID),
                                      ("owner", client.token, (422, "VALIDATION_FAILED"))]:
            headers = {"content-type": "application/json", **(_bearer(token) if token is not None else {})}
            r = http.request(method.upper(), url, content=body, headers=headers)
            assert (r.status_code, _code(r)) == expected, (kind, method, path, r.text[:200])
