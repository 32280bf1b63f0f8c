"""Read-only routes for analysts (stream replay, state as of) and auditors (billing ledger).

Tokens with role ``analyst`` or ``auditor`` are minted by ``palette token``. A client token gets
404 here (these routes do not exist for it); staff tokens cannot call any client route."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from typing import Annotated, Any, TypeVar
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BeforeValidator
from starlette.concurrency import iterate_in_threadpool

from adapters.api import unavailable
from adapters.api.deps import ContainerDep, bearer, made_once, verified
from adapters.api.edge import broke_off
from adapters.api.envelope import ApiError, ok
from adapters.api.held_responses import SlotStream, StreamSlots
from adapters.api.rate_limit import RateLimited
from adapters.api.schemas import Envelope, QueryInt
from adapters.api.strict_json import StrictJSONRoute
from adapters.bootstrap import Container
from domain.contracts.envelope import MAX_POSITION
from domain.text import TimeTooFine, iso_time
from projections import audit
from projections.replay import Replayer, as_jsonl

router = APIRouter(route_class=StrictJSONRoute)
_E = Envelope[None]
STAFF_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": _E, "description": "AUTH_REQUIRED / AUTH_INVALID"},
                404: {"model": _E, "description": "NOT_FOUND (also for client tokens)"},
                422: {"model": _E, "description": "VALIDATION_FAILED"}}
SCAN_ERRORS: dict[int | str, dict[str, Any]] = {
    **STAFF_ERRORS, 429: {"model": _E, "description": "RATE_LIMITED: another whole-log audit is running"}}
STAFF_STREAM_ERRORS: dict[int | str, dict[str, Any]] = {
    **STAFF_ERRORS,
    429: {"model": _E, "description": "RATE_LIMITED: the process's replays, or the caller's share of them, are open"}}
SCAN_RETRY_S = 5.0  # what an audit refused while another runs is told to wait
STAFF_STREAMS = 8  # replays open at once in one API process
STAFF_STREAMS_PER_SUBJECT = 4  # of them, one staff token's subject's: one analyst's script cannot take them all
T = TypeVar("T")


async def _one_scan(request: Request, work: Callable[[], T]) -> T:
    """``work``, a whole-log audit (reconcile, verify, a period report), on a thread, one at a
    time in this API process: each holds a thread and a read-pool connection for its whole scan,
    and goes on after its client is gone, so one started while another runs is a 429."""
    state = request.app.state
    if getattr(state, "audit_scanning", False):
        raise RateLimited(SCAN_RETRY_S)
    state.audit_scanning = True  # no await since the check: no other request interleaves
    try:
        return await run_in_threadpool(work)
    finally:
        state.audit_scanning = False


def staff(*roles: str) -> Callable[..., Any]:
    """The staff token's subject, when its role is one of ``roles`` (else 404, as for a client)."""
    async def check(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> UUID:
        subject, role = verified(request, creds)
        if role not in roles:
            raise ApiError("NOT_FOUND", "not found")
        return subject
    return check


Analyst = Annotated[UUID, Depends(staff("analyst", "auditor"))]
Auditor = Annotated[UUID, Depends(staff("auditor"))]
NDJSON: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/x-ndjson": {}}, "description": "event envelopes, one JSON per line"}}


def _replayer(container: Container) -> Replayer:
    """A replayer that shows erased users' sealed fields as erased (reads the tombstones: call
    on a thread)."""
    from adapters.keyring import all_erased

    with container.read_pool.connection() as conn:
        return Replayer(container.app, all_erased(conn))


def _iso_time(value: object) -> object:
    """A time in a query is ISO 8601 text, read as the CLI's ``--as-of`` is (``iso_time``):
    pydantic alone also took a bare number for Unix seconds, so ``as_of=20260101`` was
    1970-08-23, with an offset, where ``2026-01-01`` is refused as naive."""
    if isinstance(value, str):
        try:
            return iso_time(value)
        except TimeTooFine as e:
            raise ValueError(f"an ISO 8601 time {e}") from None
        except ValueError:
            raise ValueError("not an ISO 8601 time (e.g. 2026-01-01T00:00:00+00:00)") from None
    return value


Moment = Annotated[datetime, BeforeValidator(_iso_time)]


def _aware(**moments: datetime | None) -> None:
    """422 for a time without its UTC offset: the log's times carry theirs, and a naive one
    cannot be compared with them."""
    naive = [name for name, moment in moments.items() if moment is not None and moment.tzinfo is None]
    if naive:
        raise ApiError("VALIDATION_FAILED", f"{' and '.join(naive)} must carry a UTC offset")


async def _replay(request: Request, subject: UUID,
                  lines: Callable[[], Awaitable[Iterator[bytes]]]) -> StreamingResponse:
    """The NDJSON answer of ``lines`` in one of this process's replay slots (at most
    STAFF_STREAMS_PER_SUBJECT of them ``subject``'s), taken before any of its work (reading the
    tombstones, finding its first position, a stream's events) and given back however the replay
    ends; each holds a page of the log while its client reads."""
    slots = made_once(request, "staff_stream_slots",
                      lambda: StreamSlots(per_user=STAFF_STREAMS_PER_SUBJECT, total=STAFF_STREAMS))
    give_back = slots.take(subject)
    try:
        return SlotStream(_cut_if_away(request, await lines()), give_back, media_type="application/x-ndjson")
    except BaseException:
        give_back()
        raise


async def _cut_if_away(request: Request, lines: Iterator[bytes]) -> AsyncIterator[bytes]:
    """``lines``, read on a thread; the database going away midway (a restart, a failover) is
    noted as an outage and the answer broken off (adapters.api.edge): its 200 sent, no 503 can be,
    an error escaping was a traceback per replay, and an NDJSON ended whole would read as the
    complete log."""
    try:
        async for line in iterate_in_threadpool(lines):
            yield line
    except unavailable.DATABASE_ERRORS as e:
        if not unavailable.noted_away(e, request.app.state.database_away):
            raise
        broke_off(request.scope)


@router.get("/streams", tags=["analysts"], responses={**NDJSON, **STAFF_STREAM_ERRORS})
async def replay_all(subject: Analyst, container: ContainerDep, request: Request,
                     from_position: Annotated[QueryInt, Query(alias="from", ge=1, le=MAX_POSITION)] = 1,
                     since: Moment | None = None, until: Moment | None = None,
                     type: Annotated[list[str] | None, Query()] = None) -> StreamingResponse:
    """The global log in commit order as envelope JSON lines. At most STAFF_STREAMS replays at
    once in an API process, STAFF_STREAMS_PER_SUBJECT of them one staff token subject's; one
    more is a 429."""
    _aware(since=since, until=until)
    if since is not None and until is not None and until < since:
        # as `palette replay all` refuses its --since/--until: an empty answer would read as "no events then"
        raise ApiError("VALIDATION_FAILED", "the period's end (until) must be after its start (since)")

    async def lines() -> Iterator[bytes]:
        replayer = await run_in_threadpool(_replayer, container)
        try:
            if since is None and until is None:
                return replayer.all_jsonl(from_position, type)
            # its first position found by a binary search over the log: on a thread
            return as_jsonl(await run_in_threadpool(replayer.all, from_position, since, until, type))
        except ValueError as e:
            raise ApiError("VALIDATION_FAILED", str(e)) from None

    return await _replay(request, subject, lines)


@router.get("/streams/{stream_id}/events", tags=["analysts"], responses={**NDJSON, **STAFF_STREAM_ERRORS})
async def replay_stream(stream_id: UUID, subject: Analyst, container: ContainerDep,
                        request: Request) -> StreamingResponse:
    """One stream's events in version order as envelope JSON lines (404: no such stream)."""
    def read() -> Iterator[bytes]:
        try:
            return as_jsonl(_replayer(container).existing_stream(stream_id))
        except LookupError as e:
            raise ApiError("NOT_FOUND", str(e.args[0])) from None

    return await _replay(request, subject, lambda: run_in_threadpool(read))


@router.get("/streams/{stream_id}/state", tags=["analysts"], response_model=Envelope[dict[str, Any]],
            responses=STAFF_ERRORS)
async def stream_state(stream_id: UUID, _: Analyst, container: ContainerDep,
                       version: Annotated[QueryInt | None, Query(ge=1)] = None,
                       as_of: Moment | None = None) -> JSONResponse:
    """An aggregate's state folded up to a version or a time (exactly one of them)."""
    if (version is None) == (as_of is None):
        raise ApiError("VALIDATION_FAILED", "give exactly one of version and as_of")
    _aware(as_of=as_of)

    def fold() -> dict[str, Any]:
        try:
            return _replayer(container).state(stream_id, version=version, as_of=as_of)
        except LookupError as e:  # no such stream, or not that far
            raise ApiError("NOT_FOUND", str(e.args[0])) from None

    return ok(await run_in_threadpool(fold))


LEDGER_PAGE = 1000  # entries a page of /audit/ledger holds unless asked for fewer or more
LEDGER_PAGE_MAX = 10_000


@router.get("/audit/ledger", tags=["auditors"], response_model=Envelope[dict[str, Any]], responses=STAFF_ERRORS)
async def audit_ledger(user_id: UUID, _: Auditor, container: ContainerDep,
                       from_time: Annotated[Moment | None, Query(alias="from")] = None,
                       to_time: Annotated[Moment | None, Query(alias="to")] = None,
                       limit: Annotated[QueryInt, Query(ge=1, le=LEDGER_PAGE_MAX)] = LEDGER_PAGE,
                       cursor: Annotated[str | None, Query(max_length=10, pattern=r"^[0-9]+$")] = None) -> JSONResponse:
    """A user's ledger with running balance, a page at a time (``limit`` entries; pass
    ``next_cursor`` back as ``cursor`` for the next page, null after the last)."""
    _aware(**{"from": from_time, "to": to_time})
    if from_time is not None and to_time is not None and to_time < from_time:
        # as `palette audit ledger` and /audit/report refuse theirs: no entries would pass for "none"
        raise ApiError("VALIDATION_FAILED", "the period's end (to) must be after its start (from)")
    after = int(cursor) if cursor is not None else 0

    def read() -> list[dict[str, Any]]:
        with container.read_pool.connection() as conn:
            try:
                return audit.known_ledger(conn, user_id, from_time, to_time, after_seq=after, limit=limit + 1)
            except LookupError as e:  # no such user (or not projected yet), as /audit/balance says
                raise ApiError("NOT_FOUND", str(e.args[0])) from None
    entries = await run_in_threadpool(read)
    more = len(entries) > limit
    entries = entries[:limit]
    return ok({"user_id": user_id, "entries": entries, "next_cursor": str(entries[-1]["seq"]) if more else None})


@router.get("/audit/balance", tags=["auditors"], response_model=Envelope[dict[str, Any]], responses=STAFF_ERRORS)
async def audit_balance(user_id: UUID, as_of: Moment, _: Auditor, container: ContainerDep) -> JSONResponse:
    """A user's balance as of a time, with the ledger positions it used."""
    _aware(as_of=as_of)
    def read() -> dict[str, Any]:
        with container.read_pool.connection() as conn:
            try:
                return audit.known_balance_as_of(conn, user_id, as_of)
            except LookupError as e:  # no such user (or not projected yet)
                raise ApiError("NOT_FOUND", str(e.args[0])) from None
    return ok(await run_in_threadpool(read))


@router.get("/audit/reconcile", tags=["auditors"], response_model=Envelope[dict[str, Any]], responses=SCAN_ERRORS)
async def audit_reconcile(_: Auditor, container: ContainerDep, request: Request) -> JSONResponse:
    """Does billing_events equal the fold of the event log? (differences listed)."""
    def run() -> audit.Reconciliation:
        with container.read_pool.connection() as conn:
            # a short wait for the projector: the request holds a pool connection meanwhile
            return audit.reconcile(conn, container.app.recorder, container.app.mapper.transcoder, wait_s=5.0)
    report = await _one_scan(request, run)
    return ok({"ok": report.ok, "position": report.position, "events": report.events,
               "ledger_rows": report.ledger_rows,
               "users": report.users, "differences": report.differences,
               "balance_mismatches": [dataclasses.asdict(m) for m in report.balance_mismatches]})


@router.get("/audit/verify", tags=["auditors"], response_model=Envelope[dict[str, Any]], responses=SCAN_ERRORS)
async def audit_verify(_: Auditor, container: ContainerDep, request: Request) -> JSONResponse:
    """Recompute the per-user hash chains of the ledger: the first breaks (by user id) and how
    many chains are broken in all (``broken``)."""
    def run() -> audit.Verification:
        with container.read_pool.connection() as conn:
            return audit.verify(conn)
    report = await _one_scan(request, run)
    return ok({"ok": report.ok, "checked": report.checked, "broken": report.broken,
               "breaks": [dataclasses.asdict(b) for b in report.breaks]})


@router.get("/audit/report", tags=["auditors"], response_model=Envelope[dict[str, Any]], responses=SCAN_ERRORS)
async def audit_report(_: Auditor, container: ContainerDep, request: Request,
                       from_time: Annotated[Moment, Query(alias="from")],
                       to_time: Annotated[Moment, Query(alias="to")],
                       at: Annotated[QueryInt | None, Query(ge=0, le=MAX_POSITION)] = None) -> JSONResponse:
    """A period's credits by plan at one log position: opening, granted, reserved, spent, refunded,
    closing and outstanding, with the identity opening + granted - spent = closing + reserved
    checked (``ok``). The period is [from, to); see ``projections.audit`` for the definitions."""
    _aware(**{"from": from_time, "to": to_time})

    def run() -> audit.PeriodReport:
        with container.read_pool.connection() as conn:
            try:
                # a short wait for the projector: the request holds a pool connection meanwhile
                return audit.period_report(conn, container.app.recorder, container.app.mapper.transcoder,
                                           from_time, to_time, at=at, wait_s=5.0)
            except ValueError as e:
                raise ApiError("VALIDATION_FAILED", str(e)) from None
    return ok((await _one_scan(request, run)).as_dict())
