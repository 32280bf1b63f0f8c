"""Health, anonymous auth, /me and presets."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from adapters.api.deps import ContainerDep, CurrentUser, ServiceDep, made_once
from adapters.api.envelope import ApiError, fail, ok
from adapters.api.rate_limit import TokenBuckets, request_address
from adapters.api.schemas import (
    AnonCreate,
    Envelope,
    ErasedPublic,
    ErrorBody,
    HealthPublic,
    MePublic,
    PresetPublic,
    TokenPublic,
)
from adapters.api.strict_json import StrictJSONRoute
from adapters.bootstrap import Container
from adapters.erasure import erase
from adapters.system import SystemClock
from application.services import PaletteService
from domain.contracts.edits import ACTIONS, TEXTURES, TONES
from domain.errors import NotFound
from domain.presets import PRESETS

router = APIRouter(route_class=StrictJSONRoute)
ERRORS = {code: {"model": Envelope[None], "description": text} for code, text in {
    401: "AUTH_REQUIRED / AUTH_INVALID", 404: "NOT_FOUND", 422: "VALIDATION_FAILED",
}.items()}


ERASURE_REQUEST_S = 20.0  # DELETE /me deletes objects this long, well within a proxy's timeout
HEALTH_CACHE_S = 1.0  # a flood of /health costs at most one check per dependency per second
HEALTH_TIMEOUT_S = 2.0  # a dependency slower than this to answer reads as failing


def _check_postgres(c: Container) -> bool:
    """A query on a read-pool connection: /health never opens a connection of its own."""
    import psycopg

    try:
        with c.read_pool.connection(timeout=HEALTH_TIMEOUT_S) as conn:
            conn.execute("select 1")
        return True
    except psycopg.Error:  # PoolTimeout too: the pool had no connection to spare in time
        return False


def _check_broker(c: Container) -> bool:
    from infra.kafka_admin import broker_answers

    return broker_answers(c.settings.effective_kafka_bootstrap, timeout_ms=int(HEALTH_TIMEOUT_S * 1000))


def _check_s3(c: Container) -> bool:
    try:
        c.s3.head_bucket(Bucket=c.settings.s3_bucket)
        return True
    except Exception:  # noqa: BLE001 - any failure reads as "failing"
        return False


class CachedCheck:
    """One dependency's status, checked at most once per ``ttl_s`` and never twice at a time: a
    flood of callers shares one check, and a hung dependency holds one thread, not one per call
    (callers wait at most ``timeout_s``, then read it as failing)."""

    def __init__(self, check: Callable[[], bool], ttl_s: float = HEALTH_CACHE_S,
                 timeout_s: float = HEALTH_TIMEOUT_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.check = check
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._result: tuple[float, bool] | None = None  # (when, good)
        self._running: asyncio.Future[bool] | None = None

    async def __call__(self) -> bool:
        if self._result is not None and self.clock() - self._result[0] < self.ttl_s:
            return self._result[1]
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())
        try:
            return await asyncio.wait_for(asyncio.shield(self._running), self.timeout_s)
        except TimeoutError:
            self._result = (self.clock(), False)  # still running: "failing" until it answers
            return False

    async def _run(self) -> bool:
        good = False
        try:
            good = bool(await run_in_threadpool(self.check))
        except Exception:  # noqa: BLE001 - a check that raises reads as "failing"
            good = False
        finally:
            self._result = (self.clock(), good)
            self._running = None
        return good


def _health_checks(request: Request, container: Container) -> dict[str, CachedCheck]:
    """The app's cached dependency checks."""
    return made_once(request, "health_checks", lambda: {
        name: CachedCheck(functools.partial(f, container))
        for name, f in (("postgres", _check_postgres), ("broker", _check_broker), ("s3", _check_s3))})


# HEAD too, as load balancers and uptime probes ask (the server sends GET's status and headers,
# no body); kept out of the schema, which documents the GETs.
@router.head("/health", include_in_schema=False)
@router.get("/health", response_model=Envelope[HealthPublic], tags=["health"])
async def health(container: ContainerDep, request: Request) -> JSONResponse:
    """Liveness plus the status of PostgreSQL, the broker and S3 (each at most 1 s old). No auth."""
    checks = _health_checks(request, container)
    results = await asyncio.gather(*(check() for check in checks.values()))
    deps: dict[str, Literal["ok", "failing"]] = {
        name: "ok" if good else "failing" for name, good in zip(checks, results, strict=True)
    }
    return ok(HealthPublic(status="ok" if all(results) else "degraded", dependencies=deps))


@router.head("/livez", include_in_schema=False)
@router.get("/livez", tags=["health"])
async def livez() -> JSONResponse:
    """The process answers (a liveness probe: nothing else is checked). No auth."""
    return JSONResponse({"status": "alive"})


@router.head("/readyz", include_in_schema=False)
@router.get("/readyz", tags=["health"], responses={503: {"description": "a dependency is failing (named)"}})
async def readyz(container: ContainerDep, request: Request) -> JSONResponse:
    """200 when PostgreSQL, the broker and S3 answer (each checked at most once a second), else
    503 naming the failing ones: a load balancer sends no traffic to this process. No auth."""
    checks = _health_checks(request, container)
    results = await asyncio.gather(*(check() for check in checks.values()))
    failing = [name for name, good in zip(checks, results, strict=True) if not good]
    if failing:
        return JSONResponse({"status": "not ready", "failing": failing}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.post("/auth/anon", response_model=Envelope[TokenPublic], tags=["auth"],
             responses={201: {"model": Envelope[TokenPublic], "description": "registered now"},
                        422: ERRORS[422],
                        429: {"model": Envelope[None], "description": "RATE_LIMITED (with Retry-After)"}})
async def auth_anon(body: AnonCreate, service: ServiceDep, container: ContainerDep,
                    request: Request) -> JSONResponse:
    """Register this device once (idempotent) and issue a client token. Limited per client
    address, repeats included (each issues a token; new ones grant free credits)."""
    s = container.settings
    limits = made_once(request, "register_limits", lambda: TokenBuckets(s.rate_register_per_s, s.rate_register_burst))
    limits.take(request_address(request, s.trusted_proxies))
    committed = await service.register_async(body.device_hash)
    user_id, created = committed.value
    token = request.app.state.tokens.issue(user_id, SystemClock().now())
    return ok(TokenPublic(token=token, user_id=user_id, created=created), status=201 if created else 200)


@router.get("/me", response_model=Envelope[MePublic], tags=["user"], responses={401: ERRORS[401]})
async def me(user_id: CurrentUser, request: Request) -> JSONResponse:
    """The caller's plan, credits, active jobs and rule slots (strongly consistent)."""
    # The service straight from the app, not as a ServiceDep: FastAPI solves each dependency per
    # request (an eighth of this route's time), and /me is the read clients poll.
    service: PaletteService = request.app.state.container.service
    try:
        view = await service.get_user_async(user_id)
    except NotFound:  # erased a moment ago, before this process refused its tokens
        raise ApiError("AUTH_INVALID", "the token is invalid or expired") from None
    # MePublic's fields as a plain dict: the view's types already are the schema's, and building
    # and dumping the model would be a tenth of this route (test_schemathesis checks the shape).
    return ok({
        "user_id": view.user_id, "plan": view.plan, "credits": view.credits, "reserved": view.reserved,
        "active_jobs": view.active_jobs, "max_concurrent_jobs": view.max_concurrency,
        "rule_slots": {"used": view.rule_slots_used, "max": view.rule_slots_max},
    })


@router.delete("/me", response_model=Envelope[ErasedPublic], tags=["user"],
               responses={202: {"model": Envelope[ErasedPublic], "description": "erased; objects left to delete"},
                          401: ERRORS[401], 409: {"model": Envelope[None], "description": "INVALID_STATE"}})
async def erase_me(user_id: CurrentUser, service: ServiceDep, container: ContainerDep,
                   request: Request) -> JSONResponse:
    """Erase the caller (GDPR): unfinished jobs are canceled and refunded, the key sealing the
    caller's personal fields is destroyed (they read as "erased" everywhere from then on), every
    photo, output, mask and preview and every webhook endpoint is deleted, and this token is
    refused (401). The credit history stays, without personal data, for the ledger. The same
    device registering again gets a new user. Objects left after ``ERASURE_REQUEST_S`` (a
    long-lived user's) are the sweeper's to delete: the answer is then a 202, ``finished`` false."""
    # Refused from the tombstone on, even mid-erasure; not before it: an erasure the database
    # cut short before then recorded nothing, and its 503 invites the client to ask again.
    done = await run_in_threadpool(erase, service, container.read_pool, container.s3,
                                   container.settings.s3_bucket, user_id,
                                   tombstoned=request.app.state.erased_users.add,
                                   deadline=time.monotonic() + ERASURE_REQUEST_S)
    return ok(ErasedPublic(erased=True, objects_deleted=done.objects, webhooks_deleted=done.webhooks,
                           finished=done.finished), status=200 if done.finished else 202)


def _preset_public(preset_id: str) -> PresetPublic:
    p = PRESETS[preset_id]
    return PresetPublic(id=p.id, name=p.name, concepts=list(p.concepts), actions=list(ACTIONS),
                        tones=list(TONES), textures=list(TEXTURES))


@router.get("/presets", response_model=Envelope[list[PresetPublic]], tags=["presets"],
            responses={401: ERRORS[401]})
async def list_presets(_: CurrentUser) -> JSONResponse:
    return ok([_preset_public(p) for p in PRESETS])


@router.get("/presets/{preset_id}", response_model=Envelope[PresetPublic], tags=["presets"],
            responses={401: ERRORS[401], 404: ERRORS[404]})
async def get_preset(preset_id: str, _: CurrentUser) -> JSONResponse:
    if preset_id not in PRESETS:
        return fail("NOT_FOUND", f"unknown preset {preset_id[:40]!r}")
    return ok(_preset_public(preset_id))


__all__ = ["ErrorBody", "router"]
