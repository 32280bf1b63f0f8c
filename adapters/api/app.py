"""The FastAPI application factory: envelope, error table, body cap, routers. Nothing at import time."""

from __future__ import annotations

import contextvars
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.bootstrap import Container
from adapters.tokens import TokenIssuer
from domain.errors import DomainError

log = logging.getLogger("palette.api")

MAX_BODY_BYTES = 64 * 1024
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# One table from error code to HTTP status; unknown codes are client errors (400).
STATUS_BY_CODE = {
    "VALIDATION_FAILED": 422,
    "INPUTS_MISSING": 409,
    "NOT_FOUND": 404,
    "INVALID_STATE": 409,
    "INSUFFICIENT_CREDITS": 402,
    "CONCURRENCY_LIMIT": 409,
    "RULE_SLOTS_FULL": 403,
    "CONFLICT": 409,
    "AUTH_REQUIRED": 401,
    "AUTH_INVALID": 401,
    "PAYLOAD_TOO_LARGE": 413,
    "METHOD_NOT_ALLOWED": 405,
    "INTERNAL": 500,
}
CODE_BY_STATUS = {401: "AUTH_REQUIRED", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}


def meta() -> dict[str, str]:
    return {"request_id": _request_id.get(), "timestamp": datetime.now(UTC).isoformat()}


def ok(data: Any, status: int = 200) -> JSONResponse:
    from fastapi.encoders import jsonable_encoder

    return JSONResponse(
        {"success": True, "data": jsonable_encoder(data), "error": None, "meta": meta()},
        status_code=status,
    )


def fail(code: str, message: str, status: int | None = None, details: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return JSONResponse(
        {"success": False, "data": None, "error": error, "meta": meta()},
        status_code=status or STATUS_BY_CODE.get(code, 400), headers=headers,
    )


class ApiError(Exception):
    """An edge-level refusal (auth, limits) with a stable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BodyLimit:
    """Refuses bodies over the cap with 413 before the app reads them (chunked bodies too)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _request_id.set(uuid.uuid4().hex[:16])
        try:
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                await fail("PAYLOAD_TOO_LARGE", f"body over {self.max_bytes} bytes")(scope, receive, send)
                return
            seen = 0

            async def limited() -> Message:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_bytes:
                        raise ApiError("PAYLOAD_TOO_LARGE", f"body over {self.max_bytes} bytes")
                return message

            await self.app(scope, limited, send)
        finally:
            _request_id.reset(token)


def create_app(container: Container) -> FastAPI:
    """Build the API around an already-wired container."""
    from adapters.api import routes_jobs, routes_rules, routes_users

    app = FastAPI(
        title="Palette API",
        version="0.1.0",
        description="Command/query API of Palette. Every response is an envelope "
        "`{success, data, error: {code, message}, meta: {request_id, timestamp}}`. "
        "Error codes: " + ", ".join(f"`{c}` ({s})" for c, s in STATUS_BY_CODE.items()) + ".",
    )
    s = container.settings
    app.state.container = container
    app.state.tokens = TokenIssuer(s.jwt_secret, s.jwt_issuer, s.jwt_audience, s.jwt_ttl_s)

    @app.exception_handler(DomainError)
    async def _domain(_: Request, e: DomainError) -> JSONResponse:
        details = {"missing": e.missing} if hasattr(e, "missing") else None
        return fail(e.code, e.message, details=details)

    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.code.startswith("AUTH") else None
        return fail(e.code, e.message, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return fail("VALIDATION_FAILED", f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = CODE_BY_STATUS.get(e.status_code, "VALIDATION_FAILED" if e.status_code < 500 else "INTERNAL")
        return fail(code, str(e.detail), status=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error (request %s)", _request_id.get())
        return fail("INTERNAL", "internal error", status=500)

    app.include_router(routes_users.router)
    app.include_router(routes_rules.router)
    app.include_router(routes_jobs.router)
    return app


def create_asgi(container: Container) -> ASGIApp:
    """The app wrapped in the body cap (what uvicorn serves)."""
    app = create_app(container)
    return BodyLimit(app, MAX_BODY_BYTES)
