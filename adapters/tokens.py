"""JWTs for clients (HS256 pinned in code). The GPU callback's HMAC is in ``domain.contracts.callback``."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import jwt

ALGORITHM = "HS256"  # pinned: the header's alg is never trusted
LEEWAY_S = 10
STAFF_TTL_MAX_S = 30 * 86400  # the longest an analyst's or auditor's token lives (`palette token`)


class TokenInvalid(Exception):
    """The token is missing a claim, expired, tampered, or not ours."""


def _b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


# The header jwt.encode writes for HS256 (its keys sorted, no spaces), encoded once.
_HEADER = _b64(json.dumps({"alg": ALGORITHM, "typ": "JWT"}, separators=(",", ":"), sort_keys=True).encode())


class TokenIssuer:
    def __init__(self, secret: str, issuer: str, audience: str, ttl_s: int) -> None:
        self._secret = secret
        # The HMAC with the secret's pads computed once; each token signs with a copy.
        self._mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = ttl_s

    def issue(self, user_id: UUID, now: datetime, role: str = "client", ttl_s: int | None = None) -> str:
        claims = {
            "sub": str(user_id), "iat": int(now.timestamp()), "nbf": int(now.timestamp()),
            "exp": int((now + timedelta(seconds=ttl_s or self.ttl_s)).timestamp()),
            "iss": self.issuer, "aud": self.audience, "role": role,
        }
        return self._signed(claims)

    def _signed(self, claims: dict[str, Any]) -> str:
        """The HS256 JWT of ``claims``, byte for byte what ``jwt.encode`` writes (a test compares
        them), without its checks of the key's format on every call (PEM and SSH patterns tried on
        the secret): ``jwt.encode`` was 15 % of the event loop's time under registrations."""
        signing_input = _HEADER + b"." + _b64(json.dumps(claims, separators=(",", ":")).encode())
        mac = self._mac.copy()
        mac.update(signing_input)
        return (signing_input + b"." + _b64(mac.digest())).decode()

    def lifetime_s(self, role: str) -> int:
        """How long after its issue a token of ``role`` is accepted, whatever its ``exp`` says: no
        longer than this server mints them. A token cannot be revoked but by rotating the secret,
        and erased users' tokens are refused for as long as a client's lives; a lower
        PALETTE_JWT_TTL_S shortens the tokens already out, it does not refuse them at once."""
        return self.ttl_s if role == "client" else STAFF_TTL_MAX_S

    def verify(self, token: str) -> tuple[UUID, str]:
        """The token's user id and role; raises TokenInvalid."""
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], audience=self.audience,
                issuer=self.issuer, leeway=LEEWAY_S,
                options={"require": ["sub", "exp", "iat", "iss", "aud"]},
            )
            role = str(claims.get("role", "client"))
            if time.time() > int(claims["iat"]) + self.lifetime_s(role) + LEEWAY_S:
                raise TokenInvalid("lifetime")
            return UUID(str(claims["sub"])), role
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            raise TokenInvalid(type(e).__name__) from None
