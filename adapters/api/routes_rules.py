"""Rules: saved edit recipes, bounded by the plan's rule slots."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from adapters.api.deps import ContainerDep, CurrentUser, ServiceDep
from adapters.api.envelope import ok
from adapters.api.idempotency import id_for_key
from adapters.api.preconditions import etag, expected_versions
from adapters.api.rate_limit import request_address
from adapters.api.schemas import Envelope, RuleCreate, RuleList, RulePublic, RuleUpdate
from adapters.api.strict_json import StrictJSONRoute
from adapters.bootstrap import Container
from application.services import PaletteService
from application.unit_of_work import Committed
from domain.rule import Rule
from projections.queries import list_rules as list_rules_query
from projections.queries import wait_for_streams

router = APIRouter(tags=["rules"], route_class=StrictJSONRoute)
_E = Envelope[None]
COMMON: dict[int | str, dict[str, Any]] = {
    401: {"model": _E, "description": "AUTH_REQUIRED / AUTH_INVALID"},
          422: {"model": _E, "description": "VALIDATION_FAILED"}}
OWN: dict[int | str, dict[str, Any]] = {
    **COMMON, 404: {"model": _E, "description": "NOT_FOUND (also another user's rule)"}}
LIMITED: dict[int | str, dict[str, Any]] = {429: {"model": _E, "description": "RATE_LIMITED (with Retry-After)"}}
CONTENDED: dict[int | str, dict[str, Any]] = {409: {"model": _E, "description": "CONFLICT (contention: try again)"}}
PRECONDITION: dict[int | str, dict[str, Any]] = {
    412: {"model": _E, "description": "PRECONDITION_FAILED (If-Match names no version the rule is at: "
          "it changed since it was read; nothing changed)"}}
IfMatch = Annotated[str | None, Header(description='The rule\'s ETag as read ("3"; its version), or *: the write '
                                       "applies only while the rule is at that version, else 412 (a list: any "
                                       "of them; a weak tag never matches; not a list of entity tags: 422)")]


def _public(service: PaletteService, rule: Rule) -> RulePublic:
    return RulePublic(id=rule.id, name=service.rule_name(rule.name), preset_id=rule.preset_id,
                      concepts=rule.concepts, protect=rule.protect, version=rule.version)


def _answer(service: PaletteService, rule: Rule, status: int = 200) -> JSONResponse:
    """A single rule's answer: the rule, and its version as the ETag an If-Match names."""
    response = ok(_public(service, rule), status=status)
    response.headers["ETag"] = etag(rule.version)
    return response


def _if_match(request: Request, given: str | None) -> frozenset[int] | None:
    """The versions the request's If-Match accepts (all its lines; None: any)."""
    return expected_versions(request.headers.getlist("if-match")) if given is not None else None


def _address(request: Request, container: Container) -> str:
    """The client's address, which shares a day of rule writes with every user behind it."""
    return request_address(request, container.settings.trusted_proxies)


def _remember(c: Container, user_id: UUID, rule_id: UUID, committed: Committed[Any]) -> None:
    c.last_writes.record(user_id, "rules", rule_id, committed.versions.get(rule_id))


def _edits(body: RuleCreate | RuleUpdate) -> dict[str, dict[str, object]]:
    return {k: v.model_dump() for k, v in body.concepts.items()}


@router.post("/rules", response_model=Envelope[RulePublic], status_code=201,
             responses={**COMMON, **LIMITED, 403: {"model": _E, "description": "RULE_SLOTS_FULL"},
                        409: {"model": _E, "description": "INVALID_STATE (the rule this Idempotency-Key created "
                              "was changed or deleted since) / CONFLICT"}})
async def create_rule(body: RuleCreate, user_id: CurrentUser, service: ServiceDep, container: ContainerDep,
                      request: Request,
                      idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> JSONResponse:
    """Save a rule; takes one of the plan's rule slots (once per Idempotency-Key). Rule writes
    are limited per user and per client address as job creations are."""
    with request.app.state.rule_limits.spending(user_id, _address(request, container)) as spending:
        await service.keys_ready(user_id)  # the name is sealed under the caller's key
        committed = await service.run(service.create_rule_returning_command(
            user_id, body.name, body.preset_id, _edits(body), body.protect,
            id_for_key(user_id, "rule", idempotency_key)))
        spending.recorded = committed.recorded
    _remember(container, user_id, committed.value.id, committed)
    return _answer(service, committed.value, status=201)  # as this creation left it, whatever landed since


@router.get("/rules", response_model=Envelope[RuleList], responses=COMMON)
async def list_rules(user_id: CurrentUser, container: ContainerDep, service: ServiceDep) -> JSONResponse:
    """The caller's rules from the rules read model (waits up to 5 s for the caller's last write)."""

    def read() -> list[dict[str, object]]:
        with container.read_pool.connection() as conn:
            rows = list_rules_query(conn, user_id)
        return [{**r, "name": service.rule_name(str(r["name"]))} for r in rows]  # opened with the caller's key

    recent = container.last_writes.recent(user_id, "rules")
    if await wait_for_streams(container.read_pool, "rules", recent):
        container.last_writes.folded(user_id, "rules", recent)  # later reads see them folded too
    rows = await run_in_threadpool(read)
    return ok(RuleList(items=[RulePublic.model_validate(r) for r in rows]))


@router.put("/rules/{rule_id}", response_model=Envelope[RulePublic],
            responses={**OWN, **LIMITED, **CONTENDED, **PRECONDITION})
async def update_rule(rule_id: UUID, body: RuleUpdate, user_id: CurrentUser,
                      service: ServiceDep, container: ContainerDep, request: Request,
                      if_match: IfMatch = None) -> JSONResponse:
    """Change the rule (an event on its stream when anything changed); limited per user and address.
    With If-Match, only while the rule is at a version it names (checked in the command, against
    the rule it writes), else 412; a rule already as asked is answered as done (a retry whose
    answer was lost)."""
    versions = _if_match(request, if_match)
    with request.app.state.rule_limits.spending(user_id, _address(request, container)) as spending:
        await service.keys_ready(user_id)  # the name is sealed under the caller's key
        committed = await service.run(service.update_rule_command(user_id, rule_id, body.name, _edits(body),
                                                                  body.protect, versions))
        spending.recorded = committed.recorded
    _remember(container, user_id, rule_id, committed)
    return _answer(service, committed.value)  # as this write left it, whatever landed since


@router.delete("/rules/{rule_id}", response_model=Envelope[dict[str, bool]],
               responses={**OWN, **LIMITED, **CONTENDED, **PRECONDITION})
async def delete_rule(rule_id: UUID, user_id: CurrentUser, service: ServiceDep,
                      container: ContainerDep, request: Request, if_match: IfMatch = None) -> JSONResponse:
    """Delete the rule and free its slot; limited per user and address. With If-Match, only while
    the rule is at a version it names, else 412."""
    versions = _if_match(request, if_match)
    with request.app.state.rule_limits.spending(user_id, _address(request, container)) as spending:
        committed = await service.run(service.delete_rule_command(user_id, rule_id, versions))
        spending.recorded = committed.recorded
    _remember(container, user_id, rule_id, committed)
    return ok({"deleted": True})
