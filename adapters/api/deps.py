"""Dependency aliases: the current user, the services, the container; verified tokens remembered."""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, TypeVar
from uuid import UUID

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from adapters.api.envelope import ApiError
from adapters.bootstrap import Container
from adapters.tokens import LEEWAY_S, TokenInvalid, TokenIssuer
from application.services import PaletteService

bearer = HTTPBearer(auto_error=False)
VERIFIED_TOKENS = 50_000  # tokens remembered once verified (~300 bytes each)


def _expiry(token: str, tokens: TokenIssuer) -> float | None:
    """When a token whose signature was verified stops being accepted: its ``exp``, or its issue
    plus the longest the issuer accepts (``TokenIssuer.lifetime_s``); None if it cannot be read."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return min(float(claims["exp"]), float(claims["iat"]) + tokens.lifetime_s(str(claims.get("role", "client"))))
    except (IndexError, ValueError, KeyError, TypeError, binascii.Error):
        return None


class VerifiedTokens:
    """TokenIssuer.verify, remembering what it accepted until the token expires (bounded, the
    oldest forgotten first): a signature check costs ~10 % of a cheap request. The very string was verified, so only its
    expiry (with the issuer's leeway) is checked again; a different string is verified anew."""

    def __init__(self, tokens: TokenIssuer, size: int = VERIFIED_TOKENS,
                 clock: Callable[[], float] = time.time) -> None:
        self.tokens = tokens
        self.size = size
        self.clock = clock
        self._seen: OrderedDict[str, tuple[UUID, str, float]] = OrderedDict()

    def verify(self, token: str) -> tuple[UUID, str]:
        """The token's user id and role; raises TokenInvalid."""
        seen = self._seen.get(token)
        if seen is not None and self.clock() <= seen[2] + LEEWAY_S:
            return seen[0], seen[1]
        self._seen.pop(token, None)
        subject, role = self.tokens.verify(token)
        expiry = _expiry(token, self.tokens)
        if expiry is not None:
            self._seen[token] = (subject, role, expiry)
            if len(self._seen) > self.size:
                self._seen.popitem(last=False)
        return subject, role


T = TypeVar("T")


def made_once(request: Request, name: str, make: Callable[[], T]) -> T:
    """The app's ``name`` (in ``app.state``), made by ``make`` on first use: a rate limit, slots,
    threads, a route needs only once it is asked for. Nothing awaits between the look and the set,
    so no other request interleaves."""
    state = request.app.state
    found: T | None = getattr(state, name, None)
    if found is None:
        found = make()
        setattr(state, name, found)
    return found


# Dependencies are `async def`: they never block, and FastAPI would run plain `def` ones in a
# worker thread (a thread hop per dependency per request).
async def get_container(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


async def get_service(request: Request) -> PaletteService:
    service: PaletteService = request.app.state.container.service
    return service


def verified(request: Request, creds: HTTPAuthorizationCredentials | None) -> tuple[UUID, str]:
    """The bearer token's subject and role, or 401 (missing: AUTH_REQUIRED, bad: AUTH_INVALID)."""
    if creds is None or not creds.credentials:
        raise ApiError("AUTH_REQUIRED", "a Bearer token is required")
    try:
        subject, role = request.app.state.verified_tokens.verify(creds.credentials)
    except TokenInvalid:
        raise ApiError("AUTH_INVALID", "the token is invalid or expired") from None
    return subject, role


class ClientBearer(HTTPBearer):
    """The client a bearer token names, as ONE dependency that is also the bearer scheme OpenAPI
    shows: FastAPI solves each level of dependencies per request (a quarter of a cheap
    request's time), and a dependency on ``bearer`` would be a second level."""

    async def __call__(self, request: Request) -> UUID:  # type: ignore[override]
        scheme, credentials = get_authorization_scheme_param(request.headers.get("Authorization"))
        creds = HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials) \
            if scheme.lower() == "bearer" and credentials else None
        user_id, role = verified(request, creds)
        if role != "client":
            raise ApiError("AUTH_INVALID", "this token cannot act as a client")
        if user_id in request.app.state.erased_users:
            raise ApiError("AUTH_INVALID", "the token is invalid or expired")
        request.state.client = user_id  # a command that finds this user gone answers 401 (app.py)
        return user_id


current_user = ClientBearer(auto_error=False, scheme_name="HTTPBearer")
CurrentUser = Annotated[UUID, Depends(current_user)]
ServiceDep = Annotated[PaletteService, Depends(get_service)]
ContainerDep = Annotated[Container, Depends(get_container)]
