"""Health, anonymous auth, /me and presets."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from adapters.api.deps import ContainerDep, CurrentUser, ServiceDep
from adapters.api.envelope import fail, ok
from adapters.api.schemas import (
    AnonCreate,
    Envelope,
    ErrorBody,
    HealthPublic,
    MePublic,
    PresetPublic,
    TokenPublic,
)
from adapters.bootstrap import Container
from adapters.system import SystemClock
from domain.presets import ACTIONS, PRESETS, TEXTURES, TONES

router = APIRouter()
ERRORS = {code: {"model": Envelope[None], "description": text} for code, text in {
    401: "AUTH_REQUIRED / AUTH_INVALID", 404: "NOT_FOUND", 422: "VALIDATION_FAILED",
}.items()}


def _check_postgres(c: Container) -> bool:
    import psycopg

    try:
        with psycopg.connect(c.settings.effective_database_url, connect_timeout=2) as conn:
            conn.execute("select 1")
        return True
    except psycopg.Error:
        return False


def _check_broker(c: Container) -> bool:
    from adapters.kafka_admin import broker_answers

    return broker_answers(c.settings.effective_kafka_bootstrap)


def _check_s3(c: Container) -> bool:
    try:
        c.s3.head_bucket(Bucket=c.settings.s3_bucket)
        return True
    except Exception:  # noqa: BLE001 - any failure reads as "failing"
        return False


@router.get("/health", response_model=Envelope[HealthPublic], tags=["health"])
async def health(container: ContainerDep) -> JSONResponse:
    """Liveness plus the status of PostgreSQL, the broker and S3. No auth."""
    checks = {"postgres": _check_postgres, "broker": _check_broker, "s3": _check_s3}
    results = await asyncio.gather(*(run_in_threadpool(f, container) for f in checks.values()))
    deps: dict[str, Literal["ok", "failing"]] = {
        name: "ok" if good else "failing" for name, good in zip(checks, results, strict=True)
    }
    return ok(HealthPublic(status="ok" if all(results) else "degraded", dependencies=deps))


@router.post("/auth/anon", response_model=Envelope[TokenPublic], tags=["auth"],
             responses={201: {"model": Envelope[TokenPublic], "description": "registered now"},
                        422: ERRORS[422]})
async def auth_anon(body: AnonCreate, service: ServiceDep, request: Request) -> JSONResponse:
    """Register this device once (idempotent) and issue a client token."""
    committed = await run_in_threadpool(service.register, body.device_hash)
    user_id, created = committed.value
    token = request.app.state.tokens.issue(user_id, SystemClock().now())
    return ok(TokenPublic(token=token, user_id=user_id, created=created), status=201 if created else 200)


@router.get("/me", response_model=Envelope[MePublic], tags=["user"], responses={401: ERRORS[401]})
async def me(user_id: CurrentUser, service: ServiceDep) -> JSONResponse:
    """The caller's plan, credits, active jobs and rule slots (strongly consistent)."""
    view = await run_in_threadpool(service.get_user, user_id)
    return ok(MePublic(
        user_id=view.user_id, plan=view.plan, credits=view.credits, reserved=view.reserved,
        active_jobs=view.active_jobs, max_concurrent_jobs=view.max_concurrency,
        rule_slots={"used": view.rule_slots_used, "max": view.rule_slots_max},  # type: ignore[arg-type]
    ))


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
