"""Dependency aliases: the current user, the services, the container."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from adapters.api.envelope import ApiError
from adapters.bootstrap import Container
from adapters.tokens import TokenInvalid
from application.services import PaletteService

bearer = HTTPBearer(auto_error=False)
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
        subject, role = request.app.state.tokens.verify(creds.credentials)
    except TokenInvalid:
        raise ApiError("AUTH_INVALID", "the token is invalid or expired") from None
    return subject, role


async def current_user(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> UUID:
    user_id, role = verified(request, creds)
    if role != "client":
        raise ApiError("AUTH_INVALID", "this token cannot act as a client")
    return user_id


CurrentUser = Annotated[UUID, Depends(current_user)]
ServiceDep = Annotated[PaletteService, Depends(get_service)]
ContainerDep = Annotated[Container, Depends(get_container)]
