"""Attacks on the running API: forged and mutated tokens, forged and replayed GPU callbacks,
presigned URLs that reach too far, and the input limits. Every attempt must be refused and
change nothing; the counts tried are reported at the end of the run."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.settings import Settings
from domain.contracts.callback import sign_callback
from tests import figures

from .conftest import Client
from .test_lifecycle import create_uploaded_job

EDITS = {"wall": {"action": "tone", "value": "warm"}}
# An RSA public key, as an attacker would fetch from a server that used RS256 (ours does not).
RSA_PUBLIC_PEM = (
    "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1LfVLPHCozMxH2Mo\n"
    "4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u\n-----END PUBLIC KEY-----\n"
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand: any header, any claims, HMAC-SHA256 with ``key`` (or no signature)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest()) if key is not None else ""
    return f"{signing_input}.{signature}"


def claims_for(s: Settings, user_id: str, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": user_id, "iat": now, "nbf": now, "exp": now + 600, "iss": s.jwt_issuer,
            "aud": s.jwt_audience, "role": "client"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def attack_tokens(s: Settings, user_id: str) -> dict[str, str]:
    secret = s.jwt_secret.encode()
    hs = {"alg": "HS256", "typ": "JWT"}
    now = int(time.time())
    return {
        "expired": forge(hs, claims_for(s, user_id, exp=now - 60, iat=now - 700, nbf=now - 700), secret),
        "not yet valid": forge(hs, claims_for(s, user_id, nbf=now + 600), secret),
        "no exp": forge(hs, claims_for(s, user_id, exp=None), secret),
        "no sub": forge(hs, claims_for(s, user_id, sub=None), secret),
        "sub not a uuid": forge(hs, claims_for(s, user_id, sub="admin"), secret),
        "wrong issuer": forge(hs, claims_for(s, user_id, iss="https://evil.example"), secret),
        "wrong audience": forge(hs, claims_for(s, user_id, aud="another-api"), secret),
        "wrong key": forge(hs, claims_for(s, user_id), b"not-the-server-secret-" * 3),
        "alg none": forge({"alg": "none", "typ": "JWT"}, claims_for(s, user_id), None),
        "alg None, signed": forge({"alg": "None", "typ": "JWT"}, claims_for(s, user_id), secret),
        "HS512 with the right key": jwt.encode(claims_for(s, user_id), s.jwt_secret, algorithm="HS512"),
        # HS/RS confusion: an RS256 header over an HMAC made with our secret, and an HMAC keyed
        # with a public key (the classic attack on servers that trust the header's alg).
        "RS256 header, HMAC body": forge({"alg": "RS256", "typ": "JWT"}, claims_for(s, user_id), secret),
        "HS256 keyed with a public key": forge(hs, claims_for(s, user_id), RSA_PUBLIC_PEM.encode()),
        "tampered payload": _tamper(jwt.encode(claims_for(s, user_id), s.jwt_secret, algorithm="HS256"),
                                    claims_for(s, str(uuid.uuid4()))),
        "role escalated": _tamper(jwt.encode(claims_for(s, user_id), s.jwt_secret, algorithm="HS256"),
                                  claims_for(s, user_id, role="auditor")),
        "only a dot": ".",
        "garbage": "not.a.jwt",
    }


def _tamper(token: str, claims: dict[str, Any]) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{b64(json.dumps(claims).encode())}.{signature}"


def _decoded(token: str) -> tuple[bytes, ...] | None:
    try:
        return tuple(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in token.split("."))
    except (ValueError, TypeError):
        return None


def test_forged_tokens_are_all_refused(client: Client, http: httpx.Client, settings: Settings) -> None:
    tried = 0
    for name, token in attack_tokens(settings, client.user_id).items():
        for path in ("/me", "/audit/verify", "/streams"):
            r = http.get(path, headers={"Authorization": f"Bearer {token}"})
            tried += 1
            assert r.status_code == 401, (name, path, r.status_code, r.text)
            assert r.json()["error"]["code"] in ("AUTH_INVALID", "AUTH_REQUIRED"), name
    figures.add("forged tokens tried (0 accepted)", tried)


@pytest.mark.parametrize("role", ["analyst", "auditor"])
def test_a_staff_token_naming_a_clients_id_never_acts_as_that_client(
        client: Client, http: httpx.Client, settings: Settings, role: str) -> None:
    from datetime import UTC, datetime

    from adapters.tokens import TokenIssuer

    issuer = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience, 3600)
    staff = {"Authorization": f"Bearer {issuer.issue(uuid.UUID(client.user_id), datetime.now(UTC), role=role)}"}
    for method, path in (("GET", "/me"), ("GET", "/jobs"), ("GET", "/rules"), ("POST", "/jobs")):
        r = http.request(method, path, headers=staff, json={"preset": "interior", "item_count": 1})
        assert r.status_code == 401 and r.json()["error"]["code"] == "AUTH_INVALID", (role, path, r.text)
    assert client.data("GET", "/me")["active_jobs"] == 0


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_mutated_tokens_are_refused(api_url: str, settings: Settings, data: st.DataObject) -> None:
    """Random edits of a valid token: a flipped, inserted or deleted character, swapped parts."""
    http, token = _mutation_target(api_url, settings)
    chars = list(token)
    kind = data.draw(st.sampled_from(["flip", "insert", "delete", "swap", "truncate"]))
    i = data.draw(st.integers(0, len(chars) - 1))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.="
    if kind == "flip":
        chars[i] = data.draw(st.sampled_from(alphabet))
    elif kind == "insert":
        chars.insert(i, data.draw(st.sampled_from(alphabet)))
    elif kind == "delete":
        del chars[i]
    elif kind == "truncate":
        chars = chars[:i]
    else:
        parts = token.split(".")
        j, k = data.draw(st.permutations(range(3)))[:2]
        parts[j], parts[k] = parts[k], parts[j]
        chars = list(".".join(parts))
    mutant = "".join(chars)
    if _decoded(mutant) == _decoded(token) or not mutant.strip():
        return  # base64's spare bits: the same bytes, so the same token (not a forgery)
    r = http.get("/me", headers={"Authorization": f"Bearer {mutant}"})
    figures.add("mutated tokens tried (0 accepted)")
    assert r.status_code == 401, (kind, mutant, r.text)


_TARGET: dict[str, Any] = {}


def _mutation_target(api_url: str, settings: Settings) -> tuple[httpx.Client, str]:
    """One user and one valid token for every example (hypothesis cannot take fixtures per example)."""
    if "token" not in _TARGET:
        http = httpx.Client(base_url=api_url, timeout=30)
        _TARGET.update(http=http, token=Client(http).token)
    return _TARGET["http"], _TARGET["token"]


# -- GPU callbacks ------------------------------------------------------------------------------
def _events(settings: Settings, stream_id: str) -> int:
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM public.palette_events WHERE originator_id = %s",
                           [stream_id]).fetchone()
    return int(row[0]) if row else 0


def signed(secret: str, job_id: str, body: bytes, ts: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    nonce = uuid.uuid4().hex[:16]
    return {"content-type": "application/json", "X-Palette-Timestamp": str(ts), "X-Palette-Nonce": nonce,
            "X-Palette-Signature": sign_callback(secret, ts, job_id, body, nonce)}


@pytest.fixture
def queued(client: Client) -> Iterator[str]:
    job_id = create_uploaded_job(client, 2)
    client.data("POST", f"/jobs/{job_id}/execute", json={"concepts": EDITS})
    yield job_id


def test_forged_and_replayed_callbacks_are_refused_and_change_nothing(
    client: Client, other: Client, http: httpx.Client, settings: Settings, queued: str
) -> None:
    job_id = queued
    other_job = create_uploaded_job(other, 1)
    body = json.dumps({"idx": 0, "status": "done", "idempotency_key": f"{job_id}:0"}).encode()
    secret = settings.callback_secret
    now = int(time.time())
    flipped = bytearray(body)
    flipped[body.index(b"done")] = ord("D")
    attempts: dict[str, tuple[str, bytes, dict[str, str]]] = {
        "no auth": (job_id, body, {"content-type": "application/json"}),
        "wrong shared secret": (job_id, body, {"content-type": "application/json", "X-Callback-Secret": "guess"}),
        "empty shared secret": (job_id, body, {"content-type": "application/json", "X-Callback-Secret": ""}),
        "wrong signing key": (job_id, body, signed("x" * 64, job_id, body)),
        # 60 s past the window either way: the requests before it take time too
        "stale timestamp": (job_id, body, signed(secret, job_id, body, now - 360)),
        "future timestamp": (job_id, body, signed(secret, job_id, body, now + 360)),
        "timestamp not a number": (job_id, body, {**signed(secret, job_id, body), "X-Palette-Timestamp": "soon"}),
        "flipped body byte": (job_id, bytes(flipped), signed(secret, job_id, body)),
        "nonce changed": (job_id, body, {**signed(secret, job_id, body), "X-Palette-Nonce": "another"}),
        "signature for another job": (other_job, body, signed(secret, job_id, body)),
        "signature without its prefix": (job_id, body, {**signed(secret, job_id, body), "X-Palette-Signature":
                                                        signed(secret, job_id, body)["X-Palette-Signature"][7:]}),
    }
    before = (_events(settings, job_id), _events(settings, other_job))
    for name, (target, content, headers) in attempts.items():
        r = http.post(f"/jobs/{target}/callback", content=content, headers=headers)
        assert r.status_code == 401, (name, r.status_code, r.text)
    assert (_events(settings, job_id), _events(settings, other_job)) == before

    # The genuine callback once, then the very same request again inside the window.
    genuine = signed(secret, job_id, body)
    assert http.post(f"/jobs/{job_id}/callback", content=body, headers=genuine).status_code == 200
    after_genuine = _events(settings, job_id)
    assert after_genuine > before[0]
    for _ in range(3):
        replay = http.post(f"/jobs/{job_id}/callback", content=body, headers=genuine)
        assert replay.status_code == 401 and "replayed" in replay.json()["error"]["message"]
    assert _events(settings, job_id) == after_genuine
    # The same result sent again by a worker (a duplicate task, a retry): a fresh nonce signs it
    # anew, so it is authentic, and its idempotency key makes it change nothing.
    again = http.post(f"/jobs/{job_id}/callback", content=body, headers=signed(secret, job_id, body))
    assert again.status_code == 200 and again.json()["data"]["outcome"] == "duplicate"
    assert _events(settings, job_id) == after_genuine
    figures.add("forged or replayed callbacks tried (0 accepted)", len(attempts) + 3)


def test_a_rotated_callback_secret_is_refused_and_callbacks_are_rate_limited(
    client: Client, settings: Settings, queued: str
) -> None:
    """An API restarted with a new callback secret refuses what the old one signs; a burst of
    callbacks beyond the per-job budget gets 429 with Retry-After."""
    from fastapi.testclient import TestClient

    from adapters.api.app import create_asgi
    from adapters.bootstrap import build

    rotated = settings.model_copy(update={"callback_secret": "rotated-" + uuid.uuid4().hex * 2,
                                          "rate_callbacks_burst": 2, "rate_callbacks_per_s": 0.01})
    container = build(rotated, pool_size=2)
    try:
        with TestClient(create_asgi(container)) as api:
            job_id = queued
            body = json.dumps({"idx": 1, "status": "done", "idempotency_key": f"{job_id}:1"}).encode()
            before = _events(settings, job_id)
            old = api.post(f"/jobs/{job_id}/callback", content=body, headers=signed(settings.callback_secret,
                                                                                      job_id, body))
            assert old.status_code == 401
            old_shared = api.post(f"/jobs/{job_id}/callback", content=body,
                                  headers={"content-type": "application/json",
                                           "X-Callback-Secret": settings.callback_secret})
            assert old_shared.status_code == 401
            assert _events(settings, job_id) == before
            statuses = []
            for i in range(4):
                dup = json.dumps({"idx": 0, "status": "failed", "idempotency_key": f"{job_id}:x{i}"}).encode()
                r = api.post(f"/jobs/{job_id}/callback", content=dup, headers=signed(rotated.callback_secret,
                                                                                   job_id, dup))
                statuses.append(r.status_code)
                if r.status_code == 429:
                    assert int(r.headers["Retry-After"]) >= 1
            assert statuses[:2] == [200, 200] and statuses[2:] == [429, 429], statuses
            figures.add("forged or replayed callbacks tried (0 accepted)", 2)
    finally:
        container.close()


# -- presigned URLs -----------------------------------------------------------------------------
def test_presigned_urls_expire_within_15_minutes_and_stay_in_the_callers_prefix(
    client: Client, other: Client, http: httpx.Client, settings: Settings, queued: str
) -> None:
    uploader = Client(http)
    created = uploader.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 3})
    job_id = created["job_id"]
    assert created["expires_in"] <= 900
    for slot in created["upload"]:
        url = urlsplit(slot["url"])
        assert int(parse_qs(url.query)["X-Amz-Expires"][0]) <= 900
        # The type is signed: a PUT of anything but a JPEG's content type is refused by the store.
        assert slot["content_type"] == "image/jpeg"
        assert "content-type" in parse_qs(url.query)["X-Amz-SignedHeaders"][0].split(";")
        key = url.path.split("/", 2)[2]
        assert key == slot["key"] and key.startswith(f"inputs/{uploader.user_id}/{job_id}/")
    # A result pointing outside the job's own prefix is refused; a proper one gets a 15-min GET.
    for bad in (f"outputs/{other.user_id}/{queued}/0.jpg", f"outputs/{client.user_id}/{uuid.uuid4()}/0.jpg",
                f"inputs/{client.user_id}/{queued}/0.jpg",
                f"outputs/{client.user_id}/{queued}/../../../inputs/{other.user_id}/{queued}/0.jpg",
                f"outputs/{client.user_id}/{queued}/./0.jpg", f"outputs/{client.user_id}/{queued}/",
                f"outputs/{client.user_id}/{queued}/0\n.jpg"):
        body = json.dumps({"idx": 0, "status": "done", "output_key": bad, "preview_key": "",
                           "idempotency_key": f"{queued}:0"}).encode()
        r = http.post(f"/jobs/{queued}/callback", content=body, headers=signed(settings.callback_secret, queued, body))
        assert r.status_code == 422, (bad, r.text)
    good = f"outputs/{client.user_id}/{queued}/0.jpg"
    body = json.dumps({"idx": 0, "status": "done", "output_key": good, "preview_key": "",
                       "idempotency_key": f"{queued}:0"}).encode()
    assert http.post(f"/jobs/{queued}/callback", content=body,
                     headers=signed(settings.callback_secret, queued, body)).status_code == 200
    item = client.data("GET", f"/jobs/{queued}")["items"][0]
    url = urlsplit(item["output_url"])
    assert int(parse_qs(url.query)["X-Amz-Expires"][0]) <= 900
    assert url.path.split("/", 2)[2] == good
    assert other.call("GET", f"/jobs/{queued}").status_code == 404


def test_a_body_that_is_not_json_is_a_422_with_the_stable_code(client: Client) -> None:
    for raw in (b"\xff\xfe\x00N", b"{", b"[1, 2"):
        r = client.call("POST", "/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "VALIDATION_FAILED", r.text


# -- callback auth modes ------------------------------------------------------------------------
def _shared(secret: str) -> dict[str, str]:
    return {"content-type": "application/json", "X-Callback-Secret": secret}


def _result(job_id: str, idx: int) -> bytes:
    return json.dumps({"idx": idx, "status": "failed", "error": "x", "idempotency_key": f"{job_id}:{idx}"}).encode()


def _bogus_signatures() -> dict[str, dict[str, str]]:
    """Signature headers that sign nothing, sent next to the right shared secret."""
    now = str(int(time.time()))
    return {
        "any signature, no timestamp": {"X-Palette-Signature": "sha256=" + "0" * 64},
        "garbage signature, no timestamp": {"X-Palette-Signature": "x"},
        "empty signature": {"X-Palette-Signature": ""},
        "bad signature with a timestamp": {"X-Palette-Signature": "sha256=" + "0" * 64, "X-Palette-Timestamp": now},
        "timestamp only": {"X-Palette-Timestamp": now},
    }


def test_with_signatures_optional_both_ways_pass_but_a_bad_signature_never_rides_on_the_secret(
    http: httpx.Client, settings: Settings, queued: str
) -> None:
    assert settings.callback_require_signature is False
    job_id = queued
    before = _events(settings, job_id)
    for name, bogus in _bogus_signatures().items():
        r = http.post(f"/jobs/{job_id}/callback", content=_result(job_id, 0),
                      headers={**_shared(settings.callback_secret), **bogus})
        assert r.status_code == 401, (name, r.status_code, r.text)
    assert _events(settings, job_id) == before
    shared = http.post(f"/jobs/{job_id}/callback", content=_result(job_id, 0),
                       headers=_shared(settings.callback_secret))
    assert shared.status_code == 200 and shared.json()["data"]["outcome"] == "recorded", shared.text
    body = _result(job_id, 1)
    signed_only = http.post(f"/jobs/{job_id}/callback", content=body,
                            headers=signed(settings.callback_secret, job_id, body))
    assert signed_only.status_code == 200 and signed_only.json()["data"]["outcome"] == "recorded", signed_only.text
    figures.add("forged or replayed callbacks tried (0 accepted)", len(_bogus_signatures()))


def test_with_signatures_required_the_shared_secret_is_refused_whatever_rides_with_it(
    settings: Settings, queued: str
) -> None:
    """An API started with PALETTE_CALLBACK_REQUIRE_SIGNATURE=true accepts only a valid HMAC."""
    from fastapi.testclient import TestClient

    from adapters.api.app import create_asgi
    from adapters.bootstrap import build

    strict = settings.model_copy(update={"callback_require_signature": True})
    container = build(strict, pool_size=2)
    try:
        with TestClient(create_asgi(container)) as api:
            job_id = queued
            before = _events(settings, job_id)
            attempts = {"shared secret alone": {}, **_bogus_signatures()}
            for name, extra in attempts.items():
                r = api.post(f"/jobs/{job_id}/callback", content=_result(job_id, 0),
                             headers={**_shared(settings.callback_secret), **extra})
                assert r.status_code == 401, (name, r.status_code, r.text)
                assert r.json()["error"]["code"] == "AUTH_INVALID"
            assert _events(settings, job_id) == before
            body = _result(job_id, 0)
            good = api.post(f"/jobs/{job_id}/callback", content=body, headers=signed(settings.callback_secret,
                                                                                   job_id, body))
            assert good.status_code == 200 and good.json()["data"]["outcome"] == "recorded", good.text
            assert _events(settings, job_id) > before
            figures.add("forged or replayed callbacks tried (0 accepted)", len(attempts))
    finally:
        container.close()



def test_a_remembered_token_is_checked_anew_once_it_expires_and_a_tampered_one_is_never_remembered():
    """The API remembers verified tokens (adapters.api.deps.VerifiedTokens): what it remembers
    must not outlive the token, and only the very string verified is remembered."""
    from datetime import UTC, datetime

    from adapters.api.deps import VerifiedTokens
    from adapters.tokens import LEEWAY_S, TokenInvalid, TokenIssuer

    class CountingIssuer(TokenIssuer):
        calls = 0

        def verify(self, token: str) -> tuple[uuid.UUID, str]:
            self.calls += 1
            return super().verify(token)

    issuer = CountingIssuer("s" * 48, "palette", "palette-app", ttl_s=60)
    now = [time.time()]
    tokens = VerifiedTokens(issuer, clock=lambda: now[0])
    user_id = uuid.uuid4()
    token = issuer.issue(user_id, datetime.fromtimestamp(now[0], UTC))
    assert [tokens.verify(token), tokens.verify(token)] == [(user_id, "client")] * 2
    assert issuer.calls == 1  # the second was remembered
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged = f"{head}.{b64(json.dumps({**claims, 'role': 'analyst'}).encode())}.{signature}"
    for _ in range(2):
        with pytest.raises(TokenInvalid):
            tokens.verify(forged)
    assert issuer.calls == 3  # refused each time, never remembered
    now[0] = claims["exp"] + LEEWAY_S + 1  # past its expiry and the issuer's leeway
    tokens.verify(token)  # (the real clock has not moved: the issuer still accepts it)
    assert issuer.calls == 4  # checked anew, not answered from memory
