"""Jobs: create with presigned uploads, confirm, execute, status, GPU callback, cancel, and a new
job made from a finished one (its photos and masks copied in S3, nothing uploaded again)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID

from botocore.exceptions import ClientError
from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from adapters.api import unavailable
from adapters.api.deps import ContainerDep, CurrentUser, ServiceDep, made_once
from adapters.api.envelope import ApiError, ok
from adapters.api.held_responses import SlotStream, StreamSlots
from adapters.api.idempotency import id_for_key
from adapters.api.rate_limit import DAY_S, TokenBuckets, forwarded, request_address
from adapters.api.schemas import (
    CallbackCreate,
    CallbackPublic,
    Envelope,
    ItemPublic,
    JobCreate,
    JobCreatedPublic,
    JobExecute,
    JobList,
    JobPublic,
    JobRerunPublic,
    JobStatePublic,
    JobSummary,
    MaskSlot,
    Progress,
    QueryInt,
    UploadSlot,
)
from adapters.api.strict_json import StrictJSONRoute, loads
from adapters.bootstrap import Container
from adapters.s3_signing import GetUrls, PutUrls
from application.services import PaletteService, RerunSource, item_list
from application.unit_of_work import Committed
from domain.contracts.callback import verify_callback
from domain.contracts.keys import (
    LINKS_EXPIRED_S,
    MAX_INPUT_BYTES,
    URL_TTL_S,
    input_key,
    inputs_prefix,
    instances_key,
    job_prefixes,
    mask_key,
    used_mask_key,
    used_masks_prefix,
)
from domain.errors import InvalidState, NotFound, ValidationFailed
from domain.job import Job, JobStatus
from projections.queries import BadCursor, decode_cursor, encode_cursor, unfolded
from projections.queries import list_jobs as list_jobs_query

log = logging.getLogger("palette.api")
router = APIRouter(tags=["jobs"], route_class=StrictJSONRoute)
CURSOR = r"^[A-Za-z0-9_=-]+$"  # what encode_cursor issues (URL-safe base64)
INLINE_ITEMS, INLINE_URLS = 16, 32  # a job answer of at most this many items and URLs is built on the event loop
COPY_THREADS = 8  # object copies in flight for one new job made from a finished one
INPUT_CONTENT_TYPE = "image/jpeg"
_E = Envelope[None]
COMMON: dict[int | str, dict[str, Any]] = {401: {"model": _E, "description": "AUTH_REQUIRED / AUTH_INVALID"},
          422: {"model": _E, "description": "VALIDATION_FAILED"}}
SEEN: dict[int | str, dict[str, Any]] = {**COMMON,
                                         404: {"model": _E, "description": "NOT_FOUND (also another user's job)"}}
OWN: dict[int | str, dict[str, Any]] = {**SEEN,
                                        409: {"model": _E, "description": "INVALID_STATE / INPUTS_MISSING / CONFLICT"}}


def _remember(c: Container, user_id: UUID, job_id: UUID, committed: Committed[Any]) -> None:
    c.last_writes.record(user_id, "jobs_log", job_id, committed.versions.get(job_id))


def _mask_concepts(job: Job) -> list[str]:
    """The concepts a done item has a used mask of: edited, then protected."""
    return [*job.concepts, *job.protect]


def _job_public(c: Container, job: Job) -> JobPublic:
    urls = GetUrls(c.settings, datetime.now(UTC))
    concepts = _mask_concepts(job)
    items = []
    for idx in range(job.item_count):
        result = job.items.get(idx)
        if result is None:
            items.append(ItemPublic(idx=idx, status="pending"))
        elif result.status == "done" and job.objects_deleted:  # past retention: links would point at nothing
            items.append(ItemPublic(idx=idx, status="done"))
        elif result.status == "done":
            items.append(ItemPublic(
                idx=idx, status="done",
                output_url=urls.url(result.output_key) if result.output_key else None,
                preview_url=urls.url(result.preview_key) if result.preview_key else None,
                mask_urls={k: urls.url(used_mask_key(job.user_id, job.id, idx, k)) for k in concepts},
                instances_url=urls.url(instances_key(job.user_id, job.id, idx)),
            ))
        else:
            items.append(ItemPublic(idx=idx, status="failed", error=result.error or None))
    return JobPublic(
        job_id=job.id, status=job.status.value, preset=job.preset,
        progress=Progress(done=job.done_items, failed=job.failed_items, total=job.item_count),
        concepts=job.concepts, protect=job.protect, rule_id=job.rule_id, items=items,
        objects_expired=job.objects_deleted,
    )


@router.get("/jobs", response_model=Envelope[JobList], responses=COMMON)
async def list_jobs(user_id: CurrentUser, container: ContainerDep, service: ServiceDep,
                    limit: Annotated[QueryInt, Query(ge=1, le=100)] = 20,
                    cursor: Annotated[str | None, Query(max_length=200, pattern=CURSOR)] = None) -> JSONResponse:
    """The caller's jobs, newest first, from the jobs_log read model (keyset-paginated). It never
    waits for the projector: the caller's own recent writes the model has not folded yet are read
    from the write side instead, and ``meta.projection_behind`` says how many there were."""
    recent = container.last_writes.recent(user_id, "jobs_log")

    def read() -> tuple[list[dict[str, Any]], str | None, dict[UUID, int]]:
        with container.read_pool.connection() as conn:
            # First what is not folded, then the page: a job folded in between is in the page.
            behind = unfolded(conn, "jobs_log", recent)
            try:
                rows, next_cursor = list_jobs_query(conn, user_id, limit, cursor)
            except BadCursor:
                raise ValidationFailed("cursor: not a cursor this API issued") from None
            return rows, next_cursor, behind

    rows, next_cursor, behind = await run_in_threadpool(read)
    container.last_writes.folded(user_id, "jobs_log", {s: v for s, v in recent.items() if s not in behind})
    if behind:
        fresh, gone = await run_in_threadpool(_fresh_rows, service, user_id, list(behind))
        rows, next_cursor = _merged([r for r in rows if r["id"] not in gone], fresh, limit, next_cursor,
                                    after=decode_cursor(cursor) if cursor is not None else None)
    items = [JobSummary(job_id=r["id"], **{k: v for k, v in r.items() if k != "id"}) for r in rows]
    return ok(JobList(items=items, next_cursor=next_cursor), extra_meta={"projection_behind": len(behind)})


def _fresh_rows(service: PaletteService, user_id: UUID,
                job_ids: list[UUID]) -> tuple[list[dict[str, Any]], set[UUID]]:
    """The write side's rows of jobs the model has not folded yet, and the ids of those that are
    gone (deleted, or never there): a folded row of a job deleted since is not listed."""
    rows, gone = [], set()
    for job_id in job_ids:
        try:
            rows.append(_summary_row(service.get_job(user_id, job_id)))
        except NotFound:
            gone.add(job_id)
    return rows, gone


def _summary_row(job: Job) -> dict[str, Any]:
    """A job as the jobs_log row the projector will write for it."""
    return {"id": job.id, "status": job.status.value, "preset": job.preset, "rule_id": job.rule_id,
            "total_items": job.item_count, "done_items": job.done_items, "failed_items": job.failed_items,
            "created_at": job.created_on, "finished_at": job.modified_on if job.status.terminal else None}


def _merged(rows: list[dict[str, Any]], fresh: list[dict[str, Any]], limit: int, next_cursor: str | None,
            after: tuple[datetime, UUID] | None) -> tuple[list[dict[str, Any]], str | None]:
    """The page with the write side's rows in place of the folded ones; the other write-side rows
    (jobs the model has not seen at all, or holds on another page) join the page they sort into:
    after its cursor (a page before cut them off) and, while the model has more, not past the
    model's last row of the page (``next_cursor``), which a later page starts after: one there
    would be listed twice once a deleted job left room on this page."""
    by_id = {r["id"]: r for r in fresh}
    out = [by_id.pop(r["id"], r) for r in rows]
    end = decode_cursor(next_cursor) if next_cursor is not None else None
    out.extend(r for r in by_id.values() if (after is None or (r["created_at"], r["id"]) < after)
               and (end is None or (r["created_at"], r["id"]) > end))
    out.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
    if len(out) > limit:
        out = out[:limit]
        next_cursor = encode_cursor(out[-1]["created_at"], out[-1]["id"])
    return out, next_cursor


@router.post("/jobs", response_model=Envelope[JobCreatedPublic], status_code=201,
             responses={**COMMON, 402: {"model": _E, "description": "INSUFFICIENT_CREDITS"},
                        409: {"model": _E, "description": "CONCURRENCY_LIMIT"},
                        429: {"model": _E, "description": "RATE_LIMITED (with Retry-After)"}})
async def create_job(body: JobCreate, user_id: CurrentUser, service: ServiceDep,
                     container: ContainerDep, request: Request,
                     idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> JSONResponse:
    """Reserve one credit per item, create the job, and hand out presigned PUT URLs. With an
    Idempotency-Key the job is created once, however often the request is retried."""
    address = request_address(request, container.settings.trusted_proxies)
    with request.app.state.job_limits.spending(user_id, address) as spending:
        committed = await service.run(service.create_job_command(user_id, body.preset, body.item_count,
                                                                 id_for_key(user_id, "job", idempotency_key)))
        spending.recorded = committed.recorded
    job_id = committed.value
    _remember(container, user_id, job_id, committed)

    urls = PutUrls(container.settings, datetime.now(UTC), content_type=INPUT_CONTENT_TYPE)
    upload = [UploadSlot(idx=i, key=(k := input_key(user_id, job_id, i)), content_type=INPUT_CONTENT_TYPE,
                         url=urls.url(k)) for i in range(body.item_count)]
    return ok(JobCreatedPublic(
        job_id=job_id, upload=upload, expires_in=URL_TTL_S,
        confirm_url=_confirm_url(request, container, job_id),
    ), status=201)


def _confirm_url(request: Request, container: Container, job_id: UUID) -> str:
    """The job's confirm-upload URL as the client reached this API: behind
    PALETTE_TRUSTED_PROXIES proxies, in the scheme X-Forwarded-Proto gives that many places from
    the right (a TLS proxy's https), as X-Forwarded-For is read; else as this server was reached."""
    url = request.url_for("confirm_upload", job_id=str(job_id))
    scheme = (forwarded(request.headers.getlist("x-forwarded-proto"), container.settings.trusted_proxies) or "").lower()
    return str(url.replace(scheme=scheme) if scheme in ("http", "https") else url)


@router.post("/jobs/{job_id}/confirm-upload", response_model=Envelope[JobStatePublic], responses={
    **OWN, 422: {"model": _E, "description": "VALIDATION_FAILED / INPUT_TOO_LARGE"}})
async def confirm_upload(job_id: UUID, user_id: CurrentUser, service: ServiceDep,
                         container: ContainerDep) -> JSONResponse:
    """created -> uploaded once every input exists in S3 (else 409 INPUTS_MISSING naming them),
    none over 20 MB (else 422 INPUT_TOO_LARGE naming them; they are deleted, and the same upload
    links take smaller ones while they live). Again, once confirmed (and since executed), the
    job's status, nothing checked or recorded; a canceled job's is 409 INVALID_STATE."""
    committed = await service.confirm_upload_async(user_id, job_id)
    _remember(container, user_id, job_id, committed)
    return ok(JobStatePublic(job_id=job_id, status=committed.value))


@router.post("/jobs/{job_id}/execute", response_model=Envelope[JobStatePublic], responses=OWN)
async def execute_job(job_id: UUID, body: JobExecute, user_id: CurrentUser,
                      service: ServiceDep, container: ContainerDep) -> JSONResponse:
    """uploaded -> queued with per-concept edits (a rule fills in what the body leaves out)."""
    concepts = {k: v.model_dump() for k, v in body.concepts.items()}
    committed = await service.run(service.execute_job_command(user_id, job_id, concepts, body.protect,
                                                              body.rule_id))
    _remember(container, user_id, job_id, committed)
    if committed.recorded:  # not a repeat, which changes nothing: a line per request otherwise
        log.info("job %s queued", job_id, extra={"job_id": str(job_id), "user_id": str(user_id)})
    return ok(JobStatePublic(job_id=job_id, status=committed.value))


@router.post("/jobs/{job_id}/rerun", response_model=Envelope[JobRerunPublic], status_code=201,
             responses={**OWN, 402: {"model": _E, "description": "INSUFFICIENT_CREDITS"},
                        409: {"model": _E, "description": "INVALID_STATE (the job is not finished, or its "
                              "photos are gone) / CONCURRENCY_LIMIT"},
                        429: {"model": _E, "description": "RATE_LIMITED (with Retry-After)"}})
async def rerun_job(job_id: UUID, user_id: CurrentUser, service: ServiceDep, container: ContainerDep,
                    request: Request,
                    idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> JSONResponse:
    """A new job over the photos of this finished (done, failed or canceled) job, without uploading
    them again. It reserves one credit per item as POST /jobs does; the inputs and the masks the
    worker used are copied in S3, and those masks are the new job's client masks. ``masks`` holds a
    presigned PUT per item and concept of the source: overwrite the ones to correct (a PNG, white =
    the concept, black = not), then confirm-upload and execute as usual. Another user's job, or a
    deleted one, is 404; a job not finished, or whose photos are gone, 409 INVALID_STATE."""
    source = await service.rerun_source_async(user_id, job_id)
    address = request_address(request, container.settings.trusted_proxies)
    with request.app.state.job_limits.spending(user_id, address) as spending:
        present = await run_in_threadpool(_source_objects, container, user_id, job_id)
        absent = [i for i in range(source.item_count) if input_key(user_id, job_id, i) not in present]
        if absent:  # canceled before its upload: nothing to run again
            raise InvalidState(f"cannot rerun this job: {len(absent)} of its photos are not there "
                               f"(idx {item_list(absent)})")
        # An upload link lives on after confirm-upload: a photo may have been replaced by a larger one.
        too_large = [i for i in range(source.item_count)
                     if present[input_key(user_id, job_id, i)] > MAX_INPUT_BYTES]
        if too_large:
            raise InvalidState(f"cannot rerun this job: {len(too_large)} of its photos are over "
                               f"{MAX_INPUT_BYTES >> 20} MB (idx {item_list(too_large)})")
        # What it copies counts against the user's day and its address's (a canceled copy is kept
        # a day for free, and a user costs a registration), from both or neither.
        copied = float(sum(present.values()))
        per_day = container.settings.rerun_copy_bytes_per_day
        per_address = container.settings.rerun_copy_bytes_per_address_per_day
        if copied > min(per_day, per_address):  # a 429 would name a wait that never comes
            bound, whose = min((per_day, "a user's reruns"), (per_address, "the reruns from one address"))
            raise InvalidState(f"cannot rerun this job: its photos and masks are {copied / 2**30:.1f} GiB, more than "
                               f"the {bound / 2**30:.1f} GiB {whose} may copy in a day")
        copy_bytes = made_once(request, "rerun_copy_bytes", lambda: TokenBuckets(per_day / DAY_S, per_day))
        address_bytes = made_once(request, "rerun_copy_bytes_per_address",
                                  lambda: TokenBuckets(per_address / DAY_S, per_address))
        chosen_id = id_for_key(user_id, f"rerun:{job_id}", idempotency_key)
        with copy_bytes.spending(user_id, copied) as copying, address_bytes.spending(address, copied) as shared:
            committed = await service.run(service.rerun_job_command(user_id, job_id, chosen_id))
            # A retry handed back the job made before: copied again, not anew (its bytes come back).
            spending.recorded = copying.recorded = shared.recorded = committed.recorded
    new_id = committed.value
    _remember(container, user_id, new_id, committed)

    async def cancel_new(reason: str) -> None:  # refunded, and the caller's next reads see it canceled
        _remember(container, user_id, new_id, await service.run(service.cancel_job_command(user_id, new_id, reason)))

    new_job = await service.get_job_async(user_id, new_id)
    # The command handed back only a job waiting for its photos; one confirmed since is not copied over.
    if new_job.status == JobStatus.CREATED:
        try:
            await run_in_threadpool(_copy_objects, container, _rerun_copies(user_id, job_id, new_id, source, present))
        except SourceGone:  # the source deleted meanwhile (DELETE /jobs, or its retention): the new job cannot run
            await cancel_new("its source job's photos are gone")
            raise InvalidState("cannot rerun this job: its photos were deleted meanwhile") from None
        except Exception:
            # Without an Idempotency-Key no retry finds this job to finish its copy (a retry makes
            # another, and it has no upload links): it would hold its credits and job slot until
            # the retention sweep.
            if chosen_id is None:
                await cancel_new("its photos could not be copied")
            raise

    # Signed after the copy, which takes its time (and a retry may come REISSUE_S after the
    # creation): a link lives URL_TTL_S at most, and never past LINKS_EXPIRED_S after the job's
    # creation, when the sweeper deletes what the links admitted beyond the largest photo.
    signed_at = datetime.now(UTC)
    left = (new_job.created_on + timedelta(seconds=LINKS_EXPIRED_S) - signed_at) // timedelta(seconds=1)
    expires_in = max(1, min(URL_TTL_S, left))

    def slots() -> list[MaskSlot]:
        urls = PutUrls(container.settings, signed_at, expires_s=expires_in)
        return [MaskSlot(idx=i, concept=c, key=(k := mask_key(user_id, new_id, i, c)), url=urls.url(k),
                         copied=used_mask_key(user_id, job_id, i, c) in present)
                for i in range(source.item_count) for c in source.concepts]

    masks = slots() if source.item_count * len(source.concepts) <= INLINE_URLS else await run_in_threadpool(slots)
    return ok(JobRerunPublic(
        job_id=new_id, source_job_id=job_id, inputs_copied=source.item_count, masks=masks, expires_in=expires_in,
        confirm_url=_confirm_url(request, container, new_id),
    ), status=201)


def _source_objects(c: Container, user_id: UUID, job_id: UUID) -> dict[str, int]:
    """The keys of a job's inputs and used masks, with their sizes (one LIST per prefix, paged)."""
    pages = c.s3.get_paginator("list_objects_v2")
    return {obj["Key"]: int(obj["Size"])
            for prefix in (inputs_prefix(user_id, job_id), used_masks_prefix(user_id, job_id))
            for page in pages.paginate(Bucket=c.settings.s3_bucket, Prefix=prefix)
            for obj in page.get("Contents", [])}


def _rerun_copies(user_id: UUID, source_id: UUID, job_id: UUID, source: RerunSource,
                  present: Mapping[str, int]) -> list[tuple[str, str]]:
    """(from, to) for the inputs, and for each used mask there is, to the new job's client masks."""
    copies = [(input_key(user_id, source_id, i), input_key(user_id, job_id, i)) for i in range(source.item_count)]
    for i in range(source.item_count):
        for concept in source.concepts:
            if (used := used_mask_key(user_id, source_id, i, concept)) in present:
                copies.append((used, mask_key(user_id, job_id, i, concept)))
    return copies


class SourceGone(Exception):
    """An object a rerun copies is not there any more."""


def _copy_objects(c: Container, copies: list[tuple[str, str]]) -> None:
    """Server-side copies, ``COPY_THREADS`` at a time. A copy again overwrites with the same bytes,
    so a rerun retried with its Idempotency-Key finishes what a failed one began (a failure of
    the store's); SourceGone when a source object is missing."""
    bucket = c.settings.s3_bucket

    def copy(pair: tuple[str, str]) -> None:
        try:
            c.s3.copy_object(Bucket=bucket, Key=pair[1], CopySource={"Bucket": bucket, "Key": pair[0]})
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise SourceGone(pair[0]) from e
            raise

    with ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="s3-copy") as pool:
        list(pool.map(copy, copies))


@router.get("/jobs/{job_id}", response_model=Envelope[JobPublic], responses=SEEN)
async def get_job(job_id: UUID, user_id: CurrentUser, service: ServiceDep,
                  container: ContainerDep) -> JSONResponse:
    """Status, progress and items, with presigned download URLs for finished outputs, the masks
    the worker used for each (``mask_urls`` by concept) and their instances (``instances_url``).
    Once the retention sweep has deleted the job's objects, ``objects_expired`` is true and no
    item has a link (each would point at nothing)."""
    job = await service.get_job_async(user_id, job_id)
    if job.item_count <= INLINE_ITEMS and job.done_items * (3 + len(_mask_concepts(job))) <= INLINE_URLS:
        return ok(_job_public(container, job))
    # A big job's URLs (~8 us each) and items are built in a worker thread, off the event loop.
    return ok(await run_in_threadpool(_job_public, container, job))


@router.delete("/jobs/{job_id}", response_model=Envelope[dict[str, bool]], responses=OWN)
async def delete_job(job_id: UUID, user_id: CurrentUser, service: ServiceDep,
                     container: ContainerDep) -> JSONResponse:
    """Delete a finished (done, failed or canceled) job: the job first, which is 404 from then on
    and leaves GET /jobs, then its inputs, outputs, masks and previews. Deleting it again answers
    the same; a job still in progress is 409 INVALID_STATE (cancel it first)."""
    already = await service.deleted_async(user_id, job_id)  # NotFound, InvalidState: nothing is touched
    # Recorded before its objects go: a crash between the two leaves a deleted job (404 at once)
    # whose objects the sweeper's late pass deletes (adapters.retention.Sweeper._late_deletions), not a job
    # listed as done whose links point at nothing, which no one would finish deleting.
    committed = await service.run(service.delete_job_command(user_id, job_id))
    _remember(container, user_id, job_id, committed)
    if not already:
        await run_in_threadpool(_forget_job_data, container, user_id, job_id)
    if committed.recorded:  # not a repeat, which changes nothing: a line per request otherwise
        log.info("job %s deleted", job_id, extra={"job_id": str(job_id), "user_id": str(user_id)})
    return ok({"deleted": True})


def _forget_job_data(c: Container, user_id: UUID, job_id: UUID) -> None:
    """The job's objects and its webhook deliveries (they hold its public view)."""
    from adapters.objects import delete_prefixes
    from adapters.webhooks.store import forget_job

    delete_prefixes(c.s3, c.settings.s3_bucket, job_prefixes(user_id, job_id))
    with c.read_pool.connection() as conn:
        forget_job(conn, job_id)


@router.post("/jobs/{job_id}/cancel", response_model=Envelope[JobStatePublic], responses=OWN)
async def cancel_job(job_id: UUID, user_id: CurrentUser, service: ServiceDep,
                     container: ContainerDep) -> JSONResponse:
    """Cancel and refund the items not done; canceling twice is harmless."""
    committed = await service.run(service.cancel_job_command(user_id, job_id, "user"))
    _remember(container, user_id, job_id, committed)
    return ok(JobStatePublic(job_id=job_id, status="canceled"))


@router.post("/jobs/{job_id}/callback", response_model=Envelope[CallbackPublic],
             responses={**OWN, 401: {"model": _E, "description": "AUTH_INVALID (callback auth)"},
                        429: {"model": _E, "description": "RATE_LIMITED (with Retry-After)"}},
             # The body is read after authentication (a forger learns nothing from a 422).
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": CallbackCreate.model_json_schema()}}}})
async def callback(
    job_id: UUID, request: Request, service: ServiceDep, container: ContainerDep,
    x_callback_secret: Annotated[str | None, Header()] = None,
    x_palette_timestamp: Annotated[str | None, Header()] = None,
    x_palette_signature: Annotated[str | None, Header()] = None,
    x_palette_nonce: Annotated[str | None, Header(max_length=64)] = None,
) -> JSONResponse:
    """A GPU worker's item result. Auth: HMAC over ``timestamp.nonce.job_id.body`` (300 s window,
    each signature accepted once) or, unless PALETTE_CALLBACK_REQUIRE_SIGNATURE, the shared secret
    alone. A repeated idempotency key returns the original outcome."""
    raw = await request.body()
    if not verify_callback(container.settings.callback_secret, int(time.time()), str(job_id), raw,
                           shared_secret=x_callback_secret, timestamp=x_palette_timestamp,
                           signature=x_palette_signature, nonce=x_palette_nonce,
                           allow_shared_secret=not container.settings.callback_require_signature):
        raise ApiError("AUTH_INVALID", "callback authentication failed")
    if x_palette_signature is not None and not await request.app.state.callback_signatures.first_use(
            x_palette_signature):
        raise ApiError("AUTH_INVALID", "callback replayed")
    request.app.state.callback_limits.take(job_id)  # after auth: strangers cannot spend a job's budget
    try:  # strict JSON, as every other body (pydantic's own reader takes the last of a repeated name)
        body = CallbackCreate.model_validate(loads(raw))
    except json.JSONDecodeError as e:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": e.msg}}]) from None
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    committed = await service.run(service.record_item_result_command(
        job_id, body.idx, body.status, body.idempotency_key,
        body.output_key or "", body.preview_key or "", body.error or "",
    ))
    r = committed.value
    if r.finished is not None:
        log.info("job %s finished: %s", job_id, r.finished.value, extra={"job_id": str(job_id)})
    return ok(CallbackPublic(outcome=r.outcome.value, idx=r.idx, item_status=r.item_status,
                             job_status=r.finished.value if r.finished else None))


SSE_POLL_S = 0.2
SSE_MAX_S = 600.0  # a client reconnects with Last-Event-ID after this
# After this long with nothing sent, a stream sends a comment line (which EventSource ignores), so a
# proxy's read timeout does not cut a quiet job's stream and its client sees the connection alive.
HEARTBEAT_S = 15.0
HEARTBEAT = b": keep-alive\n\n"
# A stored event as a client sees it: its declared fields (not the trace stamped into its state),
# less the stream's bookkeeping (the SSE id is the version) and the GPU worker's result key.
NOT_SHOWN = frozenset(("originator_id", "originator_version", "originator_topic", "idempotency_key"))


def events_after_id(last_event_id: str | None, version: int) -> int:
    """The stream version a resumed stream starts after: the Last-Event-ID it sent (at most 20
    ASCII decimal digits, else ValidationFailed), not past the job's last event (``version``): a
    stream told to wait for version 10**20 would never see its job finish, and would hold its slot
    until SSE_MAX_S. None or empty: from the start."""
    if not last_event_id:
        return 0
    if not (last_event_id.isascii() and last_event_id.isdigit() and len(last_event_id) <= 20):
        raise ValidationFailed("Last-Event-ID must be a stream version (decimal digits)")
    return min(int(last_event_id), version)


@router.get("/jobs/{job_id}/events", tags=["jobs"], responses={
    200: {"content": {"text/event-stream": {}}, "description": "the job's events as server-sent "
          "events (`id` = stream version, `event` = type, `data` = JSON); ends when the job is terminal"},
    204: {"description": "the job is finished and has no event after Last-Event-ID (an EventSource stops)"},
    **SEEN, 429: {"model": _E, "description": "RATE_LIMITED: the user's streams are all open (with Retry-After)"}})
async def job_events(job_id: UUID, user_id: CurrentUser, service: ServiceDep, container: ContainerDep,
                     request: Request, last_event_id: Annotated[str | None, Header()] = None) -> Response:
    """Live progress, resumable with Last-Event-ID (the last stream version seen; one past the
    job's events counts as its last). A user holds at most PALETTE_SSE_STREAMS_PER_USER streams at
    once, a client address PALETTE_SSE_STREAMS_PER_ADDRESS, and the process PALETTE_SSE_STREAMS in
    all (per API process); one more is a 429. Between polls a stream holds no database connection
    and no thread. A finished job's stream ends after the events past Last-Event-ID; with none,
    the answer is a 204, which tells a browser's EventSource not to reconnect."""
    job = await service.get_job_async(user_id, job_id)  # 404 for another user's job
    finished = job.status.terminal
    after = events_after_id(last_event_id, job.version)
    app = service.app
    # A finished job's events are read once, here: all it will ever have. Its stream ends after
    # them: when Last-Event-ID is past its JobFinished/JobCanceled, none is coming to end it.
    last: list[Any] | None = await run_in_threadpool(_events_after, app, job_id, after) if finished else None
    if last == []:
        return Response(status_code=204)
    address = request_address(request, container.settings.trusted_proxies)
    s = container.settings
    slots = made_once(request, "stream_slots",
                      lambda: StreamSlots(s.sse_streams_per_user, s.sse_streams, s.sse_streams_per_address))
    give_back = slots.take(user_id, address)

    async def stream() -> AsyncIterator[bytes]:
        version = after
        sent = time.monotonic()  # the last time anything went out (the 200's headers, at first)
        deadline = sent + SSE_MAX_S
        while time.monotonic() < deadline and not await request.is_disconnected():
            try:
                events: list[Any] = last if last is not None else await run_in_threadpool(
                    _events_after, app, job_id, version)
            except unavailable.DATABASE_ERRORS as e:
                if not unavailable.noted_away(e, request.app.state.database_away):
                    raise
                # Its 200 sent, no 503 can be: the stream ends as at SSE_MAX_S, and its client
                # resumes with Last-Event-ID (an error escaping here was a traceback per stream).
                return
            for event in events:
                version = event.originator_version
                data = {f.name: _jsonable(getattr(event, f.name)) for f in dataclasses.fields(event)
                        if f.name not in NOT_SHOWN}
                name = type(event).__name__
                yield f"id: {version}\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode()
                if name in ("JobFinished", "JobCanceled"):
                    return
            if finished:
                return
            if events:  # once a poll, not once an event
                sent = time.monotonic()
            elif time.monotonic() - sent >= HEARTBEAT_S:
                sent = time.monotonic()
                yield HEARTBEAT  # not an event: no id, so Last-Event-ID is untouched
            await asyncio.sleep(SSE_POLL_S)

    return SlotStream(stream(), give_back, media_type="text/event-stream",
                       headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _events_after(app: Any, job_id: UUID, version: int) -> list[Any]:
    return list(app.events.get(job_id, gt=version))


def _jsonable(value: Any) -> Any:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(value)
