"""JWTs for clients (HS256 pinned in code) and HMAC signatures for GPU callbacks."""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timedelta
from uuid import UUID

import jwt

ALGORITHM = "HS256"  # pinned: the header's alg is never trusted
LEEWAY_S = 10
CALLBACK_WINDOW_S = 300


class TokenInvalid(Exception):
    """The token is missing a claim, expired, tampered, or not ours."""


class TokenIssuer:
    def __init__(self, secret: str, issuer: str, audience: str, ttl_s: int) -> None:
        self._secret = secret
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = ttl_s

    def issue(self, user_id: UUID, now: datetime, role: str = "client", ttl_s: int | None = None) -> str:
        claims = {
            "sub": str(user_id), "iat": int(now.timestamp()), "nbf": int(now.timestamp()),
            "exp": int((now + timedelta(seconds=ttl_s or self.ttl_s)).timestamp()),
            "iss": self.issuer, "aud": self.audience, "role": role,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> tuple[UUID, str]:
        """The token's user id and role; raises TokenInvalid."""
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], audience=self.audience,
                issuer=self.issuer, leeway=LEEWAY_S,
                options={"require": ["sub", "exp", "iat", "iss", "aud"]},
            )
            return UUID(str(claims["sub"])), str(claims.get("role", "client"))
        except (jwt.PyJWTError, ValueError) as e:
            raise TokenInvalid(type(e).__name__) from None


def sign_callback(secret: str, timestamp: int, job_id: str, body: bytes, nonce: str = "") -> str:
    """HMAC-SHA256 over ``timestamp.nonce.job_id.body``: good for one job's URL only, and (with a
    fresh nonce per request) unique, so the API can accept each signature once."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{nonce}.{job_id}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_callback(
    secret: str, now: int, job_id: str, body: bytes, *, shared_secret: str | None = None,
    timestamp: str | None = None, signature: str | None = None, nonce: str | None = None,
    allow_shared_secret: bool = True,
) -> bool:
    """Accept a valid HMAC signature inside the window, or (when allowed, and only when no
    signature is offered) the shared secret, compared in constant time."""
    if signature is not None or timestamp is not None:
        # A signature offered is the whole proof: a wrong or partial one is refused, never
        # excused by a shared secret riding along with it.
        if signature is None or timestamp is None:
            return False
        try:
            ts = int(timestamp)
        except ValueError:
            return False
        if abs(now - ts) > CALLBACK_WINDOW_S:
            return False
        return hmac.compare_digest(sign_callback(secret, ts, job_id, body, nonce or "").encode(),
                                   signature.encode())
    if allow_shared_secret and shared_secret is not None:
        return hmac.compare_digest(shared_secret.encode(), secret.encode())
    return False
