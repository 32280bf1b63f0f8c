"""Webhooks: a user's endpoints (signed with a secret shown once), their deliveries, redelivery.

Another user's endpoint is 404 like every object. An endpoint's URL is checked as the sender
checks it (``adapters.webhooks.targets``): in production, https to public addresses only.
Redeliveries are limited per user (each makes the sender POST again, wherever the user points).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from adapters.api.deps import ContainerDep, CurrentUser, made_once
from adapters.api.envelope import ok
from adapters.api.idempotency import id_for_key
from adapters.api.rate_limit import RateLimited, TokenBuckets, request_address
from adapters.api.schemas import Envelope, QueryInt, Strict, Text
from adapters.api.strict_json import StrictJSONRoute
from adapters.bootstrap import Container
from adapters.webhooks import store, targets
from adapters.webhooks.events import EventType
from adapters.webhooks.signing import new_secret
from domain.errors import InvalidState, NotFound, ValidationFailed

router = APIRouter(tags=["webhooks"], route_class=StrictJSONRoute)
_E = Envelope[None]
COMMON: dict[int | str, dict[str, Any]] = {401: {"model": _E, "description": "AUTH_REQUIRED / AUTH_INVALID"},
                                           422: {"model": _E, "description": "VALIDATION_FAILED"}}
OWN: dict[int | str, dict[str, Any]] = {**COMMON,
                                        404: {"model": _E, "description": "NOT_FOUND (also another user's endpoint)"}}


class WebhookCreate(Strict):
    url: Text = Field(min_length=1, max_length=targets.MAX_URL_LENGTH)
    events: list[EventType] = Field(min_length=1, max_length=16)


class WebhookPublic(BaseModel):
    id: UUID
    url: str
    events: list[str]
    enabled: bool
    disabled_at: datetime | None
    created_at: datetime


class WebhookSecretPublic(WebhookPublic):
    secret: str  # shown by this answer only: keep it, it signs every delivery


class WebhookList(BaseModel):
    items: list[WebhookPublic]


class AttemptPublic(BaseModel):
    n: int
    at: datetime
    status_code: int | None
    error: str
    response: str  # the head of the answer (at most 4 KiB)
    duration_ms: int


class DeliveryPublic(BaseModel):
    id: UUID
    message_id: str  # the webhook-id header, the same on every attempt
    event_type: str
    job_id: UUID
    status: str  # pending | succeeded | failed
    attempt_count: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    attempts: list[AttemptPublic]  # the latest first


class DeliveryList(BaseModel):
    items: list[DeliveryPublic]


def _in_db(container: Container, query: Any, *args: Any) -> Any:
    with container.read_pool.connection() as conn:
        return query(conn, *args)


async def _run(container: Container, query: Any, *args: Any) -> Any:
    return await run_in_threadpool(_in_db, container, query, *args)


def _found(row: Any) -> Any:
    if row is None:
        raise NotFound("no such webhook endpoint")
    return row


URL_CHECK_THREADS = 16
URL_CHECK_TIMEOUT_S = 5.0
URL_CHECKS_PER_USER = 2
URL_CHECKS_PER_ADDRESS = 4


class UrlChecks:
    """targets.check on threads of their own, each within ``timeout_s``: in production it
    resolves the host, and a name whose DNS never answers holds a thread for the resolver's whole
    timeout (tens of seconds); on the request threads every route shares, a few hundred such
    requests would stall them all. A check still queued when its time is up is dropped. A user
    holds at most ``per_user`` threads until they are free again, and a client address at most
    ``per_address`` whatever its users (a 429 beyond), so neither one user's silent names nor
    those of the users one client registers can take the threads every other client's
    registration needs."""

    def __init__(self, threads: int = URL_CHECK_THREADS, per_user: int = URL_CHECKS_PER_USER,
                 timeout_s: float = URL_CHECK_TIMEOUT_S, resolver: targets.Resolver = targets.resolve,
                 per_address: int = URL_CHECKS_PER_ADDRESS) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="url-check")
        self.per_user = per_user
        self.per_address = per_address
        self.timeout_s = timeout_s
        self.resolver = resolver
        self._held: Counter[UUID | str] = Counter()
        self._lock = threading.Lock()

    async def check(self, user_id: UUID, url: str, production: bool, address: str = "") -> None:
        with self._lock:
            if self._held[user_id] >= self.per_user or self._held[address] >= self.per_address:
                raise RateLimited(self.timeout_s)
            self._held[user_id] += 1
            self._held[address] += 1
        future = self.pool.submit(targets.check, url, production, self.resolver)
        future.add_done_callback(lambda _: self._release(user_id, address))  # when the thread is free, not before
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except targets.TargetRefused as e:
            raise ValidationFailed(f"url: {e}") from None
        except TimeoutError:
            raise ValidationFailed(f"url: its host did not resolve within {self.timeout_s:g} s") from None

    def _release(self, user_id: UUID, address: str) -> None:
        with self._lock:
            for key in (user_id, address):
                self._held[key] -= 1
                if self._held[key] <= 0:
                    del self._held[key]


@router.post("/webhooks", response_model=Envelope[WebhookSecretPublic], status_code=201,
             responses={**COMMON, 409: {"model": _E, "description": "INVALID_STATE (as many endpoints as allowed)"},
                        429: {"model": _E, "description": "RATE_LIMITED: the user's creations past their "
                                                          "budget, or its (or the client address's) URL checks "
                                                          "all running (Retry-After)"}})
async def create_webhook(body: WebhookCreate, user_id: CurrentUser, container: ContainerDep,
                         request: Request,
                         idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> JSONResponse:
    """Register an endpoint for these event types; the answer holds its signing secret, once. With
    an Idempotency-Key the endpoint is made once, however often the request is retried (its id
    derives from the key, as a job's does: a crash after the insert lost the stored answer)."""
    settings = container.settings
    address = request_address(request, settings.trusted_proxies)
    with request.app.state.webhook_limits.spending(user_id, address) as spending:
        await made_once(request, "url_checks", UrlChecks).check(user_id, body.url, settings.env == "production",
                                                                address)
        try:
            row = await _run(container, store.create_endpoint, user_id, body.url, list(dict.fromkeys(body.events)),
                             new_secret(), settings.webhook_endpoints_per_user,
                             id_for_key(user_id, "webhook", idempotency_key))
        except store.EndpointsFull as e:
            raise InvalidState(str(e)) from None
        except store.KeyReused as e:
            raise ValidationFailed(str(e)) from None
        except store.ChangedSince as e:
            raise InvalidState(str(e)) from None
        spending.recorded = True
    return ok(WebhookSecretPublic(**row), status=201)


@router.get("/webhooks", response_model=Envelope[WebhookList], responses=COMMON)
async def list_webhooks(user_id: CurrentUser, container: ContainerDep) -> JSONResponse:
    rows = await _run(container, store.list_endpoints, user_id)
    return ok(WebhookList(items=[WebhookPublic(**r) for r in rows]))


@router.get("/webhooks/{endpoint_id}", response_model=Envelope[WebhookPublic], responses=OWN)
async def get_webhook(endpoint_id: UUID, user_id: CurrentUser, container: ContainerDep) -> JSONResponse:
    return ok(WebhookPublic(**_found(await _run(container, store.get_endpoint, user_id, endpoint_id))))


@router.delete("/webhooks/{endpoint_id}", response_model=Envelope[dict[str, bool]], responses=OWN)
async def delete_webhook(endpoint_id: UUID, user_id: CurrentUser, container: ContainerDep) -> JSONResponse:
    """Delete the endpoint, its pending deliveries and its delivery history."""
    if not await _run(container, store.delete_endpoint, user_id, endpoint_id):
        raise NotFound("no such webhook endpoint")
    return ok({"deleted": True})


@router.post("/webhooks/{endpoint_id}/rotate-secret", response_model=Envelope[WebhookSecretPublic],
             responses=OWN)
async def rotate_secret(endpoint_id: UUID, user_id: CurrentUser, container: ContainerDep,
                        idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> JSONResponse:
    """A new signing secret, shown once; for 24 h deliveries carry a signature by the old one too.
    With an Idempotency-Key it rotates once, however often the request is retried."""
    rotated_by = str(id_for_key(user_id, "rotate", idempotency_key)) if idempotency_key else None
    row = _found(await _run(container, store.rotate_secret, user_id, endpoint_id, new_secret(), rotated_by))
    return ok(WebhookSecretPublic(**row))


@router.post("/webhooks/{endpoint_id}/enable", response_model=Envelope[WebhookPublic], responses=OWN)
async def enable_webhook(endpoint_id: UUID, user_id: CurrentUser, container: ContainerDep) -> JSONResponse:
    """Enable an endpoint disabled after its failures (or a 410 answer); its pending deliveries go out now."""
    return ok(WebhookPublic(**_found(await _run(container, store.enable_endpoint, user_id, endpoint_id,
                                                             container.settings.webhook_keep_days * 86400))))


@router.get("/webhooks/{endpoint_id}/deliveries", response_model=Envelope[DeliveryList], responses=OWN)
async def list_deliveries(endpoint_id: UUID, user_id: CurrentUser, container: ContainerDep,
                          limit: Annotated[QueryInt, Query(ge=1, le=200)] = 50) -> JSONResponse:
    """The endpoint's latest deliveries, newest first, each with its latest attempts; a page holds
    at most 512 KiB of the attempts' answers (fewer deliveries than ``limit`` then)."""
    rows = _found(await _run(container, store.list_deliveries, user_id, endpoint_id, limit))
    return ok(DeliveryList(items=[DeliveryPublic(**r) for r in rows]))


@router.post("/webhooks/{endpoint_id}/deliveries/{delivery_id}/redeliver", response_model=Envelope[DeliveryPublic],
             status_code=202, responses={**OWN, 429: {"model": _E, "description": "RATE_LIMITED (with Retry-After)"}})
async def redeliver(endpoint_id: UUID, delivery_id: UUID, user_id: CurrentUser, container: ContainerDep,
                    request: Request) -> JSONResponse:
    """Send the delivery again (a new attempt, the same ``webhook-id``), with a fresh retry schedule.
    Limited per user (``PALETTE_RATE_REDELIVER_PER_S``/``_BURST``), tries at unknown deliveries included."""
    s = container.settings
    limits = made_once(request, "redeliver_limits",
                       lambda: TokenBuckets(s.rate_redeliver_per_s, s.rate_redeliver_burst))
    limits.take(user_id)
    row = await _run(container, store.redeliver, user_id, endpoint_id, delivery_id)
    if row is None:
        raise NotFound("no such delivery")
    return ok(DeliveryPublic(**row), status=202)
