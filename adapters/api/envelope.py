"""The response envelope and the one table from error code to HTTP status. Envelopes are
encoded with orjson (a tenth of the cost of jsonable_encoder plus json.dumps per response)."""

from __future__ import annotations

import contextvars
import itertools
import secrets
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from domain.text import escaped

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# One table from error code to HTTP status; unknown codes are client errors (400).
STATUS_BY_CODE = {
    "VALIDATION_FAILED": 422,
    "INPUTS_MISSING": 409,
    "INPUT_TOO_LARGE": 422,
    "NOT_FOUND": 404,
    "INVALID_STATE": 409,
    "INSUFFICIENT_CREDITS": 402,
    "CONCURRENCY_LIMIT": 409,
    "RULE_SLOTS_FULL": 403,
    "CONFLICT": 409,
    "PRECONDITION_FAILED": 412,  # an If-Match version the object no longer has
    "AUTH_REQUIRED": 401,
    "AUTH_INVALID": 401,
    "PAYLOAD_TOO_LARGE": 413,
    "RATE_LIMITED": 429,
    "TOO_MANY_CONNECTIONS": 503,  # these three written by adapters.api.http_limits, before any request
    "HEADERS_TOO_LARGE": 431,
    "BAD_HTTP_REQUEST": 400,
    "METHOD_NOT_ALLOWED": 405,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,  # the database did not answer (adapters.api.unavailable): try again
}
CODE_BY_STATUS = {401: "AUTH_REQUIRED", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}


class RequestIds:
    """Request ids unique in this process and across processes: a random prefix per instance and
    a counter (uuid4 per request costs a getrandom call, 4 % of a static route's time)."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFF:08x}"


def _plain(value: Any) -> Any:
    """What orjson does not encode itself: pydantic models (as FastAPI would, by alias), and
    the rest as FastAPI's encoder makes it (Decimal, sets, ...)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(value)


class EnvelopeResponse(JSONResponse):
    """A JSON response encoded with orjson (UUIDs, datetimes, dataclasses and models included)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=_plain, option=orjson.OPT_NON_STR_KEYS)


def meta() -> dict[str, Any]:
    return {"request_id": request_id_var.get(), "timestamp": datetime.now(UTC).isoformat()}


def ok(data: Any, status: int = 200, extra_meta: dict[str, Any] | None = None) -> JSONResponse:
    return EnvelopeResponse(
        {"success": True, "data": data, "error": None, "meta": {**meta(), **(extra_meta or {})}},
        status_code=status,
    )


def _shown(message: str, limit: int = 500) -> str:
    """A message as it can be sent: it may quote the refused input (a lone surrogate cannot
    even be encoded as UTF-8), so what is not readable text is escaped."""
    return escaped(message[:limit])


def fail(code: str, message: str, status: int | None = None, details: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": _shown(message)}
    if details:
        error["details"] = details
    return EnvelopeResponse(
        {"success": False, "data": None, "error": error, "meta": meta()},
        status_code=status or STATUS_BY_CODE.get(code, 400), headers=headers,
    )


class ApiError(Exception):
    """An edge-level refusal (auth, limits) with a stable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BodyTooLarge(ApiError, StarletteHTTPException):
    """The body cap, met while a body is read chunk by chunk (``adapters.api.edge``). An
    HTTPException too: FastAPI turns any other error raised while it parses a body into a 400."""

    def __init__(self, limit: int) -> None:
        ApiError.__init__(self, "PAYLOAD_TOO_LARGE", f"body over {limit} bytes")
        StarletteHTTPException.__init__(self, STATUS_BY_CODE["PAYLOAD_TOO_LARGE"], self.message)
