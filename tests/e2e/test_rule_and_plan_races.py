# ruff: noqa: F811 - ``url`` is test_money_races' fixture, taken as every test's and helper's argument
"""Races on the plan's limits and on rule writes, through one API process and through two on one
port: creations past the rule slots (one key among them) or the jobs at once, edits from one version, a deletion
racing edits, and a plan downgrade racing creations, many in flight at once, round after round.

The oracle does not ask the code how it decided: it counts what each HTTP answer said, folds the
User and Rule streams' events (read as ``palette replay stream`` reads them) against the plans'
limits as README states them, and holds both to ``GET /rules`` and ``GET /me``."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from adapters.bootstrap import Container, build, open_event_store
from adapters.settings import Settings
from application.services import PaletteApplication
from projections.replay import Replayer

from .conftest import Client
from .test_money_races import ROUNDS, code, no_5xx, request, url  # noqa: F401 - the fixture: one process, then two

JOBS_AT_ONCE = {"free": 1, "pro": 4}  # README: Plans
RULE_SLOTS = {"free": 2, "pro": 20}
EDITS = {"wall": {"action": "tone", "value": "warm"}}


@pytest.fixture(scope="module")
def store(settings: Settings) -> Iterator[PaletteApplication]:
    app = open_event_store(settings, pool_size=2, saves=False)
    try:
        yield app
    finally:
        app.close()


@pytest.fixture(scope="module")
def operator(settings: Settings) -> Iterator[Container]:
    """What `palette admin plan` runs: the service, in a process of its own (this one)."""
    container = build(settings, pool_size=2)
    try:
        yield container
    finally:
        container.close()


def at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Each call on a thread of its own (an HTTP call on a connection of its own), all released together."""
    gate = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        gate.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(run, c) for c in calls]]


def new_user(url: str) -> Client:
    with httpx.Client(base_url=url, timeout=60) as http:
        return Client(http)


def read(url: str, client: Client, path: str) -> Any:
    with httpx.Client(base_url=url, timeout=60, headers=client.headers) as http:
        r = http.get(path)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def create_rule(url: str, client: Client, name: str) -> Callable[[], httpx.Response]:
    return request(url, client, "POST", "/rules", json={"name": name, "preset_id": "interior", "concepts": EDITS})


def edit_rule(url: str, client: Client, rule_id: str, name: str, if_match: str | None = None
              ) -> Callable[[], httpx.Response]:
    return request(url, client, "PUT", f"/rules/{rule_id}", json={"name": name, "concepts": EDITS},
                   headers={"If-Match": if_match} if if_match else {})


def made(answers: list[httpx.Response]) -> set[str]:
    return {r.json()["data"]["id"] for r in answers if r.status_code == 201}


def folded_user(store: PaletteApplication, user_id: str) -> tuple[str, set[str], set[str]]:
    """The user's plan, live rules and unsettled jobs, folded from its stream here, each slot and
    reservation checked against the plan the user was on when it was taken."""
    plan, rules, jobs = "", set[str](), set[str]()
    for e in Replayer(store).stream(uuid.UUID(user_id)):
        if e.type in ("Registered", "PlanChanged"):
            plan = e.data["plan"]
        elif e.type == "RuleSlotTaken":
            assert len(rules) < RULE_SLOTS[plan], (e, plan, rules)
            rules.add(str(e.data["rule_id"]))
        elif e.type == "RuleSlotFreed":
            rules.remove(str(e.data["rule_id"]))
        elif e.type == "CreditsReserved":
            assert len(jobs) < JOBS_AT_ONCE[plan], (e, plan, jobs)
            jobs.add(str(e.data["job_id"]))
        elif e.type == "CreditsSettled":
            jobs.remove(str(e.data["job_id"]))
    return plan, rules, jobs


def rule_events(store: PaletteApplication, rule_id: str) -> list[str]:
    return [e.type for e in Replayer(store).stream(uuid.UUID(rule_id))]


def listed_rules(url: str, client: Client) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in read(url, client, "/rules")["items"]}


def check_rules(url: str, store: PaletteApplication, client: Client, live: set[str]) -> None:
    """The answers' live rules are the stream's slots, the list's rows and /me's count."""
    assert folded_user(store, client.user_id)[1] == live
    assert set(listed_rules(url, client)) == live
    assert read(url, client, "/me")["rule_slots"]["used"] == len(live)


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_creations_past_the_rule_slots_at_once_take_exactly_the_free_ones(
        url: str, store: PaletteApplication, round_: int) -> None:
    client = new_user(url)
    before = made([create_rule(url, client, "before")()]) if round_ % 2 else set()
    free = RULE_SLOTS["free"] - len(before)
    answers = at_once([create_rule(url, client, f"rule {n}") for n in range(8)])
    no_5xx(answers)
    assert Counter(code(r) for r in answers) == {"ok": free, "RULE_SLOTS_FULL": 8 - free}, [r.text for r in answers]
    assert {r.status_code for r in answers if code(r) == "RULE_SLOTS_FULL"} == {403}
    created = made(answers)
    for rule_id in created:
        assert rule_events(store, rule_id) == ["RuleCreated"]
    check_rules(url, store, client, before | created)


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_keyed_creations_at_once_beside_plain_ones_make_one_rule_for_the_key(
        url: str, store: PaletteApplication, round_: int) -> None:
    client = new_user(url)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"name": "keyed", "preset_id": "interior", "concepts": EDITS}
    answers = at_once([request(url, client, "POST", "/rules", json=body, headers=key) for _ in range(6)]
                      + [create_rule(url, client, f"plain {n}") for n in range(4)])
    no_5xx(answers)
    keyed, plain = answers[:6], answers[6:]
    assert {code(r) for r in keyed} <= {"ok", "CONFLICT", "RULE_SLOTS_FULL"}, [r.text for r in keyed]
    assert {code(r) for r in plain} <= {"ok", "RULE_SLOTS_FULL"}, [r.text for r in plain]
    assert len(made(keyed)) <= 1 and {code(r) for r in keyed} != {"CONFLICT"}  # the key's claimant answered
    created = made(answers)
    assert len(created) == RULE_SLOTS["free"], [r.text for r in answers]
    check_rules(url, store, client, created)


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_edits_from_one_version_at_once_apply_exactly_one(
        url: str, store: PaletteApplication, round_: int) -> None:
    client = new_user(url)
    rule_id = made([create_rule(url, client, "shared")()]).pop()
    version = 1 + round_ % 2
    if version == 2:
        assert edit_rule(url, client, rule_id, "edited once")().status_code == 200
    answers = at_once([edit_rule(url, client, rule_id, f"device {n}", f'"{version}"') for n in range(8)])
    no_5xx(answers)
    assert Counter(code(r) for r in answers) == {"ok": 1, "PRECONDITION_FAILED": 7}, [r.text for r in answers]
    (winner,) = [r for r in answers if r.status_code == 200]
    assert winner.headers["etag"] == f'"{version + 1}"'
    assert rule_events(store, rule_id) == ["RuleCreated"] + ["RuleUpdated"] * version
    row = listed_rules(url, client)[rule_id]
    assert (row["name"], row["version"]) == (winner.json()["data"]["name"], version + 1)


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_deletion_racing_edits_deletes_the_rule_and_frees_its_slot(
        url: str, store: PaletteApplication, round_: int) -> None:
    client = new_user(url)
    rule_id = made([create_rule(url, client, "doomed")()]).pop()
    answers = at_once([request(url, client, "DELETE", f"/rules/{rule_id}"),
                       *[edit_rule(url, client, rule_id, f"plain {n}") for n in range(3)],
                       *[edit_rule(url, client, rule_id, f"matched {n}", '"1"') for n in range(3)]])
    no_5xx(answers)
    deletion, plain, matched = answers[0], answers[1:4], answers[4:]
    assert deletion.status_code == 200, deletion.text
    assert {code(r) for r in plain} <= {"ok", "NOT_FOUND"}, [r.text for r in plain]
    assert {code(r) for r in matched} <= {"ok", "NOT_FOUND", "PRECONDITION_FAILED"}, [r.text for r in matched]
    edited = [r for r in answers[1:] if r.status_code == 200]
    assert len([r for r in matched if r.status_code == 200]) <= 1
    versions = sorted(int(r.headers["etag"].strip('"')) for r in edited)
    assert versions == list(range(2, 2 + len(edited)))  # each applied edit a version of its own
    assert rule_events(store, rule_id) == ["RuleCreated"] + ["RuleUpdated"] * len(edited) + ["RuleDeleted"]
    check_rules(url, store, client, set())
    for late in (request(url, client, "DELETE", f"/rules/{rule_id}"), edit_rule(url, client, rule_id, "late", "*")):
        assert late().status_code == 404
    again = at_once([create_rule(url, client, f"again {n}") for n in range(4)])
    assert Counter(code(r) for r in again) == {"ok": RULE_SLOTS["free"], "RULE_SLOTS_FULL": 2}
    check_rules(url, store, client, made(again))


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_plan_downgrade_racing_creations_takes_no_slot_past_the_new_plan(
        url: str, store: PaletteApplication, operator: Container, round_: int) -> None:
    client = new_user(url)
    user_id = uuid.UUID(client.user_id)
    assert operator.service.change_plan(user_id, "pro").recorded
    before = set().union(*(made([create_rule(url, client, f"kept {n}")()]) for n in range(1 + 2 * (round_ % 2))))
    answers = at_once([lambda: operator.service.change_plan(user_id, "free"),
                       *[create_rule(url, client, f"rule {n}") for n in range(6)]])
    assert answers[0].recorded
    creations = answers[1:]
    no_5xx(creations)
    assert {code(r) for r in creations} <= {"ok", "RULE_SLOTS_FULL"}, [r.text for r in creations]
    plan, live, _ = folded_user(store, client.user_id)  # each slot taken within the plan of its moment
    assert plan == "free" and live == before | made(creations)
    check_rules(url, store, client, live)
    # README: a downgrade takes nothing back, and refuses new rules until the user is under the limit.
    assert len(live) <= max(RULE_SLOTS["free"], len(before) + sum(1 for r in creations if r.status_code == 201))
    last = create_rule(url, client, "one more")()
    assert code(last) == ("ok" if len(live) < RULE_SLOTS["free"] else "RULE_SLOTS_FULL"), last.text


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_job_creations_past_the_plans_jobs_at_once_make_no_more_than_it_allows(
        url: str, store: PaletteApplication, operator: Container, round_: int) -> None:
    client = new_user(url)
    plan = ("free", "pro")[round_ % 2]
    if plan == "pro":
        operator.service.change_plan(uuid.UUID(client.user_id), "pro")
    answers = at_once([request(url, client, "POST", "/jobs", json={"preset": "interior", "item_count": 1})
                       for _ in range(8)])
    no_5xx(answers)
    limit = JOBS_AT_ONCE[plan]
    assert Counter(code(r) for r in answers) == {"ok": limit, "CONCURRENCY_LIMIT": 8 - limit}, [
        r.text for r in answers]
    jobs = {r.json()["data"]["job_id"] for r in answers if r.status_code == 201}
    assert folded_user(store, client.user_id)[2] == jobs
    me = read(url, client, "/me")
    assert (me["active_jobs"], me["reserved"]) == (limit, limit)
    assert {j["job_id"] for j in read(url, client, "/jobs")["items"]} == jobs
