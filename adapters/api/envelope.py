"""The response envelope and the one table from error code to HTTP status."""

from __future__ import annotations

import contextvars
from datetime import UTC, datetime
from typing import Any

from fastapi.responses import JSONResponse

from domain.text import escaped

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

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
    "RATE_LIMITED": 429,
    "METHOD_NOT_ALLOWED": 405,
    "INTERNAL": 500,
}
CODE_BY_STATUS = {401: "AUTH_REQUIRED", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}


def meta() -> dict[str, Any]:
    return {"request_id": request_id_var.get(), "timestamp": datetime.now(UTC).isoformat()}


def ok(data: Any, status: int = 200, extra_meta: dict[str, Any] | None = None) -> JSONResponse:
    from fastapi.encoders import jsonable_encoder

    return JSONResponse(
        {"success": True, "data": jsonable_encoder(data), "error": None, "meta": {**meta(), **(extra_meta or {})}},
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
