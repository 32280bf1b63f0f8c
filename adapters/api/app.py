"""The FastAPI application factory: envelope, error table, body cap, routers. Nothing at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from adapters.api import http_limits, unavailable
from adapters.api.callback_signatures import CallbackSignatures
from adapters.api.deps import VerifiedTokens
from adapters.api.envelope import CODE_BY_STATUS, STATUS_BY_CODE, ApiError, fail, request_id_var
from adapters.api.idempotency import document_keys, unflushed
from adapters.api.links import add_links
from adapters.api.rate_limit import Budget, RateLimited, TokenBuckets
from adapters.api.sibling_writes import SharedLastWrites, siblings_directory
from adapters.bootstrap import Container
from adapters.erasure import ErasedUsers
from adapters.settings import Settings
from adapters.tokens import TokenIssuer
from domain.errors import DomainError, UserNotFound

log = logging.getLogger("palette.api")

THREADS = 256
API_POOL_SIZE = 16  # event store and read-pool connections of one API process

def create_app(container: Container, owns_container: bool = False) -> FastAPI:
    """Build the API around an already-wired container (closed when the server stops if it
    ``owns_container``)."""
    from adapters.api import routes_analysts, routes_jobs, routes_rules, routes_users, routes_webhooks

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Commands wait on the group committer without a thread; the naive path (its commands,
        # data keys and listings) and the analysts' and erasure's reads still take one each.
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        watching = asyncio.create_task(app.state.erased_users.run())
        try:
            yield
        finally:
            watching.cancel()
            if (views := container.service.user_views) is not None:
                await views.versions.close()
            await app.state.callback_signatures.close()
            await app.state.unflushed.close()
            await container.close_loop()
            if owns_container:
                container.close()

    app = FastAPI(
        lifespan=lifespan,
        # RequestEdge owns each request's span: FastAPI's own would be a second span per
        # request (a fifth of a cheap request's time) continuing any client's traceparent.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # "/jobs/" is an unknown path (404, in the envelope), not Starlette's 307 to "/jobs": that
        # answer had no envelope, took its Location from the client's Host header, and under an
        # Idempotency-Key was kept as the key's answer, so the redirected request was a 422.
        redirect_slashes=False,
        title="Palette API",
        version="0.1.0",
        description="Command/query API of Palette. Every response is an envelope "
        "`{success, data, error: {code, message}, meta: {request_id, timestamp}}`. "
        "Error codes: " + ", ".join(f"`{c}` ({s})" for c, s in STATUS_BY_CODE.items()) + ".",
    )
    s = container.settings
    app.state.container = container
    app.state.tokens = TokenIssuer(s.jwt_secret, s.jwt_issuer, s.jwt_audience, s.jwt_ttl_s)
    app.state.verified_tokens = VerifiedTokens(app.state.tokens)
    app.state.erased_users = ErasedUsers(container.read_pool, s.jwt_ttl_s, on_erased=container.service.sealer.evict)

    def as_large_as_jobs() -> Budget:
        return Budget(s.rate_jobs_per_s, s.rate_jobs_burst, s.rate_jobs_per_day,
                      per_address_day=s.rate_jobs_per_address_per_day)

    app.state.job_limits = as_large_as_jobs()
    # Each rule write is an event on the rule's stream: a budget of its own, as large.
    app.state.rule_limits = as_large_as_jobs()
    # Each endpoint creation checks a URL the client chose (its host resolved, in production).
    app.state.webhook_limits = as_large_as_jobs()
    app.state.callback_limits = TokenBuckets(s.rate_callbacks_per_s, s.rate_callbacks_burst)
    app.state.unflushed = unflushed(s.effective_database_url)  # idempotency keys, callback signatures
    app.state.callback_signatures = CallbackSignatures(app.state.unflushed)

    _answer_errors(app)

    # The routes themselves, not include_router: FastAPI matches an included router through a
    # lazily resolved view that walks all its routes twice per request (a tenth of /me's time).
    for module in (routes_users, routes_rules, routes_jobs, routes_analysts, routes_webhooks):
        app.router.routes.extend(module.router.routes)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        return document_keys(add_links(generate()))  # each idempotent on the cached schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


async def _rate_limited(_: Request, e: RateLimited) -> JSONResponse:
    return fail("RATE_LIMITED", str(e), headers={"Retry-After": e.retry_after_header})


async def _domain_error(request: Request, e: DomainError) -> JSONResponse:
    if isinstance(e, UserNotFound) and str(e.user_id) == str(getattr(request.state, "client", None)):
        # the caller erased a moment ago, before this process refused its tokens (within 1 s)
        return fail("AUTH_INVALID", "the token is invalid or expired", headers={"WWW-Authenticate": "Bearer"})
    details = ({"missing": e.missing} if hasattr(e, "missing")
               else {"too_large": e.too_large} if hasattr(e, "too_large") else None)
    return fail(e.code, e.message, details=details)


async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.code.startswith("AUTH") else None
    return fail(e.code, e.message, headers=headers)


async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    if first.get("type") == "json_invalid":  # its loc is a character offset, its reason in ctx
        return fail("VALIDATION_FAILED", f"request: the body is not JSON: {first.get('ctx', {}).get('error', '')}")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return fail("VALIDATION_FAILED", f"{where or 'request'}: {first.get('msg', 'invalid')}")


async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    if e.status_code == 400:  # a body that is not JSON: bad input like any other, one status
        return fail("VALIDATION_FAILED", f"request: {e.detail}")
    code = CODE_BY_STATUS.get(e.status_code, "VALIDATION_FAILED" if e.status_code < 500 else "INTERNAL")
    return fail(code, str(e.detail), status=e.status_code)


async def _unexpected(_: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error (request %s)", request_id_var.get())
    return fail("INTERNAL", "internal error", status=500)


def _answer_away(away: unavailable.Away, is_away: Callable[[Exception], bool],
                 message: Callable[[Exception], str]) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """A handler for a part of the stack's errors: 503 with Retry-After when ``is_away`` (noted in
    ``away``, its log), else a fault of ours under that error's class (500, logged)."""

    async def answer(request: Request, e: Exception) -> JSONResponse:
        if not is_away(e):
            return await _unexpected(request, e)
        away.note(e)
        return fail("UNAVAILABLE", message(e), headers=unavailable.HEADERS)

    return answer


def _answer_errors(app: FastAPI) -> None:
    """Every error a route lets out answered in the envelope with its stable code: the domain's,
    the API's, a request that does not validate, a rate limit, a database (a bug or a limit of ours
    under an OperationalError's class is a 500) or object store (it refused us: credentials, bucket)
    away (503, retry), and anything else (500, logged with its request id)."""
    handlers: list[tuple[type[Exception], Any]] = [
        (RateLimited, _rate_limited), (DomainError, _domain_error), (ApiError, _api_error),
        (RequestValidationError, _invalid), (StarletteHTTPException, _http_error)]
    app.state.database_away = away = unavailable.Away()
    database = _answer_away(away, unavailable.database_away, unavailable.message)
    handlers += [(error, database) for error in unavailable.DATABASE_ERRORS]
    store = _answer_away(unavailable.Away("the object store"), unavailable.store_away,
                         lambda _: unavailable.STORE_MESSAGE)
    handlers += [(error, store) for error in unavailable.OBJECT_STORE_ERRORS]
    handlers.append((Exception, _unexpected))
    for error, handler in handlers:
        app.add_exception_handler(error, handler)


def create_asgi(container: Container, owns_container: bool = False,
                registry: CollectorRegistry | None = None) -> ASGIApp:
    """The app wrapped in the body cap, the request's context (trace, log ids), its metrics
    (into ``registry``, with the group committer's) and Idempotency-Key handling (what uvicorn serves)."""
    from adapters.api.edge import RequestEdge
    from adapters.api.idempotency import IdempotencyKeys, ensure_schema
    from adapters.observability import command_metrics
    from adapters.settings import trusted_networks

    app = create_app(container, owns_container)
    with container.read_pool.connection() as conn:
        ensure_schema(conn)
    s = container.settings
    keys = IdempotencyKeys(app, app.state.unflushed, app.state.verified_tokens, fail, ttl_s=s.idempotency_ttl_s,
                           erased=app.state.erased_users, per_address=s.idempotency_keys_per_address,
                           trusted_proxies=s.trusted_proxies)
    registry = registry or CollectorRegistry()
    if container.committer is not None:
        command_metrics(container.committer, registry)
    return RequestEdge(keys, registry, trusted=trusted_networks(container.settings.trace_trusted_peers))


def bound_connections(settings: Settings) -> None:
    """This process's limits on client connections (adapters.api.http_limits), from settings:
    none per address behind trusted proxies, which every client comes through."""
    http_limits.limit_connections(settings.api_max_connections,
                                  0 if settings.trusted_proxies else settings.api_max_connections_per_peer)


def stop_with_parent() -> None:
    """SIGTERM to this worker process when the `palette serve api` that started it dies: one
    SIGKILLed stops nothing, and its workers went on holding the API's port, so every restart of
    it failed to bind the port ("Address already in use") and they outlived `palette up`."""
    import multiprocessing
    import signal

    from infra import supervisor

    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        supervisor.stop_with_parent(signal.SIGTERM, parent.pid)


def worker_asgi(naive: bool) -> ASGIApp:
    """What one of several API processes serves (PALETTE_API_WORKERS > 1): a container of its
    own, from the environment's settings, closed when that process stops (or its parent dies);
    its own tracer (uvicorn has set up its JSON logs, and the parent its metrics directory: adapters.cli)."""
    import os

    from adapters import bootstrap, tracing
    from adapters.collector import serving_gc
    from adapters.settings import load_settings

    stop_with_parent()
    settings = load_settings()
    bound_connections(settings)
    tracing.configure("api", settings.trace_exporter)
    log.info("API worker process %d serving", os.getpid())
    container = bootstrap.build(settings, naive=naive, pool_size=API_POOL_SIZE)
    if (siblings := siblings_directory()) is not None:  # a caller's writes read back in any worker
        try:
            container.last_writes = SharedLastWrites(siblings)
        except OSError as e:  # a socket's path past 107 bytes (a long TMPDIR), say
            log.warning("read-your-writes within this process only: no socket in %s (%s)", siblings, e)
    asgi = create_asgi(container, owns_container=True)
    serving_gc()
    return asgi


def group_worker_asgi() -> ASGIApp:
    """uvicorn's factory for a worker process of `palette serve api`."""
    return worker_asgi(naive=False)


def naive_worker_asgi() -> ASGIApp:
    """uvicorn's factory for a worker process of `palette serve api --naive`."""
    return worker_asgi(naive=True)
