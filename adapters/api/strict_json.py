"""Request bodies read as strict JSON (RFC 8259), on every route that takes one: UTF-8 only, each
object's names unique, no ``NaN`` or ``Infinity``. Python's decoder, as FastAPI calls it, takes
the last of a repeated name, reads UTF-16 and UTF-32 bodies, and reads ``NaN``: a proxy, a
gateway's filter or a log reader that reads the body another way (the first of a name, UTF-8)
would see another request than the route runs. Each is a 422 ``VALIDATION_FAILED``, as any
malformed body is (FastAPI answers a ``JSONDecodeError`` so), and so is a body nested past the
decoder's recursion limit (FastAPI answered its RecursionError with a 400 of its own wording).

FastAPI reads the body before it solves a route's dependencies, so a malformed body was a 422
before the client's token was checked: a route that takes a client's token checks it first, and a
caller without a good one gets its 401 whatever its body."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from adapters.api.deps import current_user


def loads(body: bytes) -> Any:
    """``body`` as strict JSON; JSONDecodeError naming what is wrong (no part of the body)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise json.JSONDecodeError("the body is not UTF-8", "", 0) from e
    try:
        return json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # a repeated name, NaN, an integer past the interpreter's digit limit
        raise json.JSONDecodeError(str(e), "", 0) from None
    except RecursionError:  # arrays or objects nested past the decoder's recursion limit
        raise json.JSONDecodeError("the body is nested too deeply", "", 0) from None


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"the name {name[:64]!r} is given twice in one object")
            seen.add(name)
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class StrictJSONRequest(Request):
    malformed = False  # its body is no strict JSON (a 422, once the caller is known)

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = loads(await self.body())
            except json.JSONDecodeError:
                self.malformed = True
                raise
        return self._json


class StrictJSONRoute(APIRoute):
    """An APIRoute whose body, where it takes one, is read by ``loads``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:  # no body to read: the request as it comes
            return handler

        client = any(d.call is current_user for d in self.dependant.dependencies)

        async def strict(request: Request) -> Response:
            read = StrictJSONRequest(request.scope, request.receive)
            try:
                return await handler(read)
            except RequestValidationError:
                if client and read.malformed:  # read before the token: its 401 first
                    await current_user(read)
                raise

        return strict
