"""A model-based simulation of Palette: commands through the real service, the real relay and
projector code over an in-memory broker that loses and repeats messages, crashes injected at
named points, and a plain-Python reference model as the oracle.

The state machine runs on either event store: in memory (bulk, ``tests/unit``) or PostgreSQL
(a slice, ``tests/integration``); the subclasses only say how to build the parts.
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from eventsourcing.persistence import OperationalError
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from adapters.positions import RELAY_NAME
from adapters.projector import SWEEP, Projector
from adapters.relay import Relay
from application.services import PaletteService
from domain.contracts.envelope import EventEnvelope
from domain.contracts.keys import input_key
from domain.errors import DomainError
from domain.plans import DEFAULT_PLANS
from domain.presets import PRESETS
from projections.log import LogReader
from projections.models import READ_MODELS
from projections.rebuild import fold_log, iter_envelopes

EDITS = {"wall": {"action": "recolor", "value": "#336699"}}
# Rule bodies as a client writes them, three in four of them taken (a colour in capitals, a
# removal with a value among them); the rest a tone no preset takes, a concept of the other preset,
# a concept both edited and protected, or a blank or too long name.
RULE_NAMES = st.sampled_from(["kitchen", "Küche", "kitchen "])
RULE_EDITS = st.sampled_from([("recolor", "#A0b1C2"), ("recolor", "#336699"), ("tone", "warm"), ("texture", "wood"),
                              ("remove", "x")])
RULE_CONCEPTS = {"interior": ["wall", "floor", "sofa"], "seller": ["background", "product", "label"]}
HOSTILE_NAMES = st.sampled_from(["kitchen", " ", "x" * 81])
HOSTILE_EDITS = st.sampled_from([("tone", "sepia"), ("recolor", "#336699")])
HOSTILE_CONCEPTS = st.sampled_from(["wall", "background", "product"])
TOPIC = "palette.events"


class AnswerLost:
    """A recorder's ``insert_events``, wrapped: while ``armed``, the next save fails after storing
    (``stores``: a commit whose answer was lost) or before (a commit that never ran), with the
    database's error; or, ``retried``, it is stored and then sent again, as eventsourcing's retry of
    a lost answer is, and meets its own events (IntegrityError). ``remove`` puts the insert back."""

    def __init__(self, recorder: Any, *, stores: bool = True, retried: bool = False) -> None:
        self.recorder = recorder
        self.insert = recorder.insert_events
        self.stores = stores
        self.retried = retried
        self.armed = False
        recorder.insert_events = self

    def __call__(self, stored_events: Any, **kwargs: Any) -> Any:
        if not self.armed:
            return self.insert(stored_events, **kwargs)
        self.armed = False
        if self.stores or self.retried:
            self.insert(stored_events, **kwargs)
        if self.retried:
            return self.insert(stored_events, **kwargs)
        raise OperationalError("server closed the connection unexpectedly")

    def remove(self) -> None:
        self.recorder.insert_events = self.insert


class Crash(BaseException):
    """A process dies at this point (injected). BaseException: no handler in the code under test
    may swallow it, as none could swallow a SIGKILL."""


# -- the parts around the code under test ----------------------------------------------------
class StepClock:
    def __init__(self) -> None:
        self.t = datetime(2026, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        self.t += timedelta(milliseconds=1)
        return self.t


class Ids:
    def new_id(self) -> UUID:
        return uuid4()


class Uploads:
    """The object store port: which input objects exist."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def sizes(self, keys: Any) -> dict[str, int]:
        return {k: 1 for k in keys if k in self.keys}

    async def sizes_async(self, keys: Any) -> dict[str, int]:
        return self.sizes(keys)

    def delete(self, keys: Any) -> None:
        self.keys.difference_update(keys)


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes


class Broker:
    """A partitioned topic in memory with the faults a broker can show: an acknowledged message
    lost (``drop``) or written twice (``duplicate``, a producer retry after a lost ack)."""

    def __init__(self, partitions: int = 3) -> None:
        self.partitions = [list[bytes]() for _ in range(partitions)]
        self.committed: dict[str, list[int]] = {}
        self.drop = 0
        self.duplicate = 0
        self.dropped = 0
        self.duplicated = 0

    def append(self, key: bytes, value: bytes) -> None:
        if self.drop:
            self.drop -= 1
            self.dropped += 1
            return
        log = self.partitions[zlib.crc32(key) % len(self.partitions)]
        log.append(value)
        if self.duplicate:
            self.duplicate -= 1
            self.duplicated += 1
            log.append(value)


class Future:
    def get(self, timeout: float | None = None) -> None:
        return None


class Producer:
    """Buffers sends; ``flush`` delivers them. ``crash_at_send`` / ``crash_in_flush`` kill the
    relay before anything of the batch reached the broker, or after the first k messages did."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.pending: list[tuple[bytes, bytes]] = []
        self.crash_at_send = False
        self.crash_in_flush: int | None = None

    def send(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> Future:
        if self.crash_at_send:
            raise Crash("relay: after commit, before publish")
        self.pending.append((key, value))
        return Future()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for n, (key, value) in enumerate(pending):
            if self.crash_in_flush is not None and n == self.crash_in_flush:
                raise Crash("relay: mid-batch")
            self.broker.append(key, value)

    def close(self) -> None:
        self.pending = []


class Consumer:
    """One group member owning every partition; offsets are committed explicitly."""

    def __init__(self, broker: Broker, group: str, max_records: int) -> None:
        self.broker = broker
        self.group = group
        self.max_records = max_records
        committed = broker.committed.setdefault(group, [0] * len(broker.partitions))
        self.positions = list(committed)
        self.crash_at_commit = False

    def poll(self, timeout_ms: int = 0) -> dict[int, list[Record]]:
        out: dict[int, list[Record]] = {}
        budget = self.max_records
        for p, log in enumerate(self.broker.partitions):
            start = self.positions[p]
            taken = log[start:start + budget]
            if taken:
                out[p] = [Record(TOPIC, p, start + i, v) for i, v in enumerate(taken)]
                self.positions[p] += len(taken)
                budget -= len(taken)
        return out

    def commit(self) -> None:
        if self.crash_at_commit:
            raise Crash("projector: after the read-model commit, before the offset commit")
        self.broker.committed[self.group] = list(self.positions)

    def assignment(self) -> set[int]:
        return set(range(len(self.broker.partitions)))

    def close(self) -> None:
        pass


class MemoryPositions:
    def __init__(self) -> None:
        self.saved: dict[str, int] = {}
        self.crash_at_save = False

    def get(self, name: str) -> int:
        return self.saved.get(name, 0)

    def save(self, name: str, position: int) -> None:
        if self.crash_at_save:
            raise Crash("relay: after publish, before the position is saved")
        self.saved[name] = position


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# -- the oracle ------------------------------------------------------------------------------
@dataclass
class RefUser:
    plan: str
    balance: int = 0
    granted: int = 0
    spent: int = 0
    reservations: dict[UUID, int] = field(default_factory=dict)
    # the user's billing ledger in order: (type, amount, balance_delta, ref)
    ledger: list[tuple[str, int, int, str]] = field(default_factory=list)


@dataclass
class RefJob:
    owner: UUID
    items: int
    status: str = "created"
    results: dict[int, str] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=dict)
    settlements: int = 0


@dataclass
class RefRule:
    owner: UUID
    name: str
    preset: str
    concepts: dict[str, dict[str, str]]
    protect: list[str]
    changed: bool = False  # edited or deleted since its creation
    deleted: bool = False


class Reference:
    """What Palette must do, written the plain way: no events, no framework."""

    def __init__(self) -> None:
        self.users: dict[UUID, RefUser] = {}
        self.jobs: dict[UUID, RefJob] = {}
        self.rules: dict[UUID, RefRule] = {}

    def register(self, user_id: UUID, plan: str) -> None:
        if user_id not in self.users:
            self.users[user_id] = RefUser(plan)
            if DEFAULT_PLANS[plan].initial_credits > 0:
                self.grant(user_id, DEFAULT_PLANS[plan].initial_credits, "signup")

    def grant(self, user_id: UUID, amount: int, reason: str = "promo") -> None:
        u = self.users[user_id]
        u.balance += amount
        u.granted += amount
        u.ledger.append(("grant", amount, amount, reason))

    def change_plan(self, user_id: UUID, plan: str) -> None:
        self.users[user_id].plan = plan

    def create_job(self, user_id: UUID, items: int) -> str | None:
        u = self.users[user_id]
        if len(u.reservations) >= DEFAULT_PLANS[u.plan].max_concurrency:
            return "CONCURRENCY_LIMIT"
        if u.balance < items:
            return "INSUFFICIENT_CREDITS"
        return None

    def add_job(self, job_id: UUID, user_id: UUID, items: int) -> None:
        self.users[user_id].balance -= items
        self.users[user_id].reservations[job_id] = items
        self.users[user_id].ledger.append(("reserve", items, -items, str(job_id)))
        self.jobs[job_id] = RefJob(user_id, items)

    def confirm(self, job_id: UUID, uploaded: set[int]) -> str | None:
        j = self.jobs[job_id]
        if j.status == "created" and len(uploaded) < j.items:
            return "INPUTS_MISSING"
        if j.status in ("uploaded", "queued", "running", "done", "failed"):  # confirmed already
            return None
        if j.status != "created":
            return "INVALID_STATE"
        j.status = "uploaded"
        return None

    def execute(self, job_id: UUID) -> str | None:
        j = self.jobs[job_id]
        if j.status in ("queued", "running", "done", "failed"):  # queued with the same edits (EDITS)
            return None
        if j.status != "uploaded":
            return "INVALID_STATE"
        j.status = "queued"
        return None

    def result(self, job_id: UUID, idx: int, status: str, key: str) -> tuple[str, str] | str:
        """(outcome, item status) or an error code."""
        j = self.jobs[job_id]
        if key in j.keys:
            return "duplicate", j.results[j.keys[key]]
        if j.status == "canceled":
            return "ignored_canceled", "canceled"
        if idx in j.results:
            return "already_recorded", j.results[idx]
        if j.status not in ("queued", "running"):
            return "INVALID_STATE"
        j.status = "running"
        j.results[idx] = status
        j.keys[key] = idx
        if len(j.results) == j.items:
            j.status = "done" if "done" in j.results.values() else "failed"
            self._settle(job_id)
        return "recorded", status

    def cancel(self, job_id: UUID) -> str | None:
        j = self.jobs[job_id]
        if j.status == "canceled":
            return None
        if j.status in ("done", "failed"):
            return "INVALID_STATE"
        j.status = "canceled"
        self._settle(job_id)
        return None

    @staticmethod
    def rule_edits(preset: str, edits: dict[str, tuple[str, str]], protect: list[str],
                   name: str) -> tuple[dict[str, dict[str, str]], list[str]] | None:
        """The edits as stored, or None where they (or the name) are refused."""
        concepts = PRESETS[preset].concepts
        if not edits or not name.strip() or len(name) > 80:
            return None
        stored: dict[str, dict[str, str]] = {}
        for concept, (action, value) in edits.items():
            if concept not in concepts or value == "sepia":
                return None
            stored[concept] = {"action": action, "value": {"recolor": value.lower(), "remove": ""}.get(action, value)}
        if any(c not in concepts or c in edits for c in protect):
            return None
        return stored, sorted(set(protect))

    def live_rules(self, user_id: UUID) -> int:
        return sum(1 for r in self.rules.values() if r.owner == user_id and not r.deleted)

    def create_rule(self, user_id: UUID, rule_id: UUID | None, name: str, preset: str,
                    edits: dict[str, tuple[str, str]], protect: list[str]) -> str | UUID | None:
        """An error code; the id of the rule a retry hands back; None: a new rule."""
        stored = self.rule_edits(preset, edits, protect, name)
        if stored is None:
            return "VALIDATION_FAILED"
        if rule_id is not None:
            r = self.rules[rule_id]
            if r.owner != user_id:
                return "NOT_FOUND"
            if r.changed:
                return "INVALID_STATE"
            if (r.name, r.preset, r.concepts, r.protect) != (name, preset, *stored):
                return "VALIDATION_FAILED"
            return rule_id
        if self.live_rules(user_id) >= DEFAULT_PLANS[self.users[user_id].plan].max_rule_slots:
            return "RULE_SLOTS_FULL"
        return None

    def update_rule(self, user_id: UUID, rule_id: UUID, name: str, edits: dict[str, tuple[str, str]],
                    protect: list[str]) -> str | None:
        r = self.rules[rule_id]
        if r.owner != user_id or r.deleted:
            return "NOT_FOUND"
        stored = self.rule_edits(r.preset, edits, protect, name)
        if stored is None:
            return "VALIDATION_FAILED"
        if (name, *stored) != (r.name, r.concepts, r.protect):
            r.name, r.concepts, r.protect, r.changed = name, stored[0], stored[1], True
        return None

    def delete_rule(self, user_id: UUID, rule_id: UUID) -> str | None:
        r = self.rules[rule_id]
        if r.owner != user_id or r.deleted:
            return "NOT_FOUND"
        r.deleted = r.changed = True
        return None

    def _settle(self, job_id: UUID) -> None:
        j = self.jobs[job_id]
        u = self.users[j.owner]
        reserved = u.reservations.pop(job_id)
        spent = sum(1 for s in j.results.values() if s == "done")
        u.spent += spent
        u.balance += reserved - spent
        if spent:
            u.ledger.append(("spend", spent, 0, str(job_id)))
        if reserved - spent:
            u.ledger.append(("refund", reserved - spent, reserved - spent, str(job_id)))
        j.settlements += 1


# -- the machine -----------------------------------------------------------------------------
@dataclass
class Figures:
    """What the runs did, summed over examples (reported by the test session)."""

    sequences: int = 0
    steps: int = 0
    commands: int = 0
    crashes: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    duplicated: int = 0
    filled: int = 0
    swept: int = 0
    ended: Counter[str] = field(default_factory=Counter)  # jobs by the status they ended in


FIGURES: dict[str, Figures] = {}


class PaletteSimulation(RuleBasedStateMachine):
    """Subclasses provide ``make_service`` (and may override ``make_store``/``teardown``)."""

    figures_name = "memory"
    sweep_every_s = 30.0

    def __init__(self) -> None:
        super().__init__()
        self.uploads = Uploads()
        self.svc: PaletteService = self.make_service(self.uploads)
        self.ref = Reference()
        self.broker = Broker()
        self.positions = MemoryPositions()
        self.store = self.make_store()
        self.time = FakeTime()
        self.relay: Relay | None = None
        self.relay_position = 0
        self.projector: Projector | None = None
        self.filled = self.swept = 0
        self.devices = itertools.count()
        self.prefix = uuid4().hex[:8]
        self.user_ids: list[UUID] = []
        self.job_ids: list[UUID] = []
        self.rule_ids: list[UUID] = []
        self.uploaded: dict[UUID, set[int]] = {}
        self.terminal: dict[UUID, str] = {}
        self.figures = FIGURES.setdefault(self.figures_name, Figures())
        self.figures.sequences += 1
        self.figures.steps -= 1  # the first invariant check follows no step

    # the parts a subclass chooses
    def make_service(self, uploads: Uploads) -> PaletteService:
        raise NotImplementedError

    def make_store(self) -> Any:
        from projections.memory import MemoryReadStore

        return CrashableStore(MemoryReadStore())

    def read_models(self) -> dict[str, dict[Any, dict[str, Any]]]:
        """Every read-model table by name, rows by key (the ledger: by row id)."""
        return {name: self.store.inner.table(name) for name in TABLES}

    def tracking(self, model: str) -> dict[UUID, int]:
        return dict(self.store.inner.state[model].tracking)

    def parked(self) -> int:
        return sum(len(s.dead) for s in self.store.inner.state.values())

    # ---- commands ----
    def _call(self, fn: Any, *args: Any) -> Any:
        self.figures.commands += 1
        try:
            return fn(*args).value
        except DomainError as e:
            return e

    def _job(self, data: st.DataObject, moves_on: Callable[[UUID], bool]) -> UUID:
        """A job: three times in four one the step moves on (when there is one), else any (the
        refusals). Drawn from every job, the lifecycle's later steps were rarely reached."""
        fitting = [j for j in self.job_ids if moves_on(j)]
        pool = fitting if fitting and data.draw(st.integers(0, 3), label="moves on") else self.job_ids
        return data.draw(st.sampled_from(pool), label="job")

    @rule(plan=st.sampled_from(["free", "pro"]))
    def register(self, plan: str) -> None:
        device = f"{self.prefix}-{next(self.devices)}"
        got = self._call(self.svc.register, device, plan)
        user_id, created = got
        assert created
        self.ref.register(user_id, plan)
        self.user_ids.append(user_id)

    @precondition(lambda self: self.user_ids)
    @rule(data=st.data(), amount=st.integers(1, 20))
    def grant(self, data: st.DataObject, amount: int) -> None:
        user_id = data.draw(st.sampled_from(self.user_ids))
        self._call(self.svc.grant_credits, user_id, amount, "promo")
        self.ref.grant(user_id, amount)

    @precondition(lambda self: self.user_ids)
    @rule(data=st.data(), plan=st.sampled_from(["free", "pro"]))
    def change_plan(self, data: st.DataObject, plan: str) -> None:
        user_id = data.draw(st.sampled_from(self.user_ids))
        self._call(self.svc.change_plan, user_id, plan)
        self.ref.change_plan(user_id, plan)

    @precondition(lambda self: self.user_ids)
    @rule(data=st.data(), items=st.integers(1, 4))
    def create_job(self, data: st.DataObject, items: int) -> None:
        user_id = data.draw(st.sampled_from(self.user_ids))
        expected = self.ref.create_job(user_id, items)
        got = self._call(self.svc.create_job, user_id, "interior", items)
        if expected is not None:
            assert isinstance(got, DomainError) and got.code == expected, (got, expected)
            return
        assert isinstance(got, UUID), got
        self.ref.add_job(got, user_id, items)
        self.job_ids.append(got)
        self.uploaded[got] = set()

    @precondition(lambda self: self.job_ids)
    @rule(data=st.data(), every_item=st.booleans())
    def upload(self, data: st.DataObject, every_item: bool) -> None:
        """One photo of a job, or all of them."""
        job_id = self._job(data, lambda j: self.ref.jobs[j].status == "created")
        job = self.ref.jobs[job_id]
        self._upload(job_id, range(job.items) if every_item else [data.draw(st.sampled_from(range(job.items)))])

    def _upload(self, job_id: UUID, items: Iterable[int]) -> None:
        for idx in items:
            self.uploads.keys.add(input_key(self.ref.jobs[job_id].owner, job_id, idx))
            self.uploaded[job_id].add(idx)

    @precondition(lambda self: self.job_ids)
    @rule(data=st.data(), statuses=st.lists(st.sampled_from(["done", "done", "failed"]), min_size=1, max_size=5))
    def client_and_worker_move_a_job_on(self, data: st.DataObject, statuses: list[str]) -> None:
        """The next steps of a job's lifecycle (upload every photo, confirm, execute, an item's
        result; a step for each status drawn): with each step left to its own rule, among a dozen
        others, a job of a sequence rarely reached its results before a cancel or the sequence's end."""
        job_id = self._job(data, lambda j: self.ref.jobs[j].status not in ("done", "failed", "canceled"))
        job = self.ref.jobs[job_id]
        for status in statuses:
            if job.status == "created" and len(self.uploaded[job_id]) < job.items:
                self._upload(job_id, range(job.items))
            elif job.status == "created":
                self._confirm(job_id)
            elif job.status == "uploaded":
                self._execute(job_id)
            else:
                idx = min((i for i in range(job.items) if i not in job.results), default=0)
                self._result(job_id, idx, status, f"{job_id}:{idx}")

    @precondition(lambda self: self.job_ids)
    @rule(data=st.data())
    def confirm(self, data: st.DataObject) -> None:
        job_id = self._job(data, lambda j: self.ref.jobs[j].status == "created"
                          and len(self.uploaded[j]) == self.ref.jobs[j].items)
        self._confirm(job_id)

    def _confirm(self, job_id: UUID) -> None:
        expected = self.ref.confirm(job_id, self.uploaded[job_id])
        got = self._call(self.svc.confirm_upload, self.ref.jobs[job_id].owner, job_id)
        self._same(got, expected)

    @precondition(lambda self: self.job_ids)
    @rule(data=st.data())
    def execute(self, data: st.DataObject) -> None:
        job_id = self._job(data, lambda j: self.ref.jobs[j].status == "uploaded")
        self._execute(job_id)

    def _execute(self, job_id: UUID) -> None:
        expected = self.ref.execute(job_id)
        got = self._call(self.svc.execute_job, self.ref.jobs[job_id].owner, job_id, EDITS, [])
        self._same(got, expected)

    @precondition(lambda self: self.job_ids)
    @rule(data=st.data(), status=st.sampled_from(["done", "done", "failed"]), retry_key=st.booleans())
    def item_result(self, data: st.DataObject, status: str, retry_key: bool) -> None:
        """A GPU result: the usual key, or another key for an item (a second worker's result);
        drawn again later, the same call is a duplicate, a reordered or a late result."""
        job_id = self._job(data, lambda j: self.ref.jobs[j].status in ("queued", "running"))
        idx = data.draw(st.integers(0, self.ref.jobs[job_id].items - 1))
        self._result(job_id, idx, status, f"{job_id}:{idx}" + (":again" if retry_key else ""))

    def _result(self, job_id: UUID, idx: int, status: str, key: str) -> None:
        expected = self.ref.result(job_id, idx, status, key)
        got = self._call(self.svc.record_item_result, job_id, idx, status, key, "", "", "e")
        if isinstance(expected, str):
            assert isinstance(got, DomainError) and got.code == expected, (got, expected)
        else:
            assert not isinstance(got, DomainError), got
            assert (got.outcome.value, got.item_status) == expected, (got, expected)

    @precondition(lambda self: self.job_ids)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.job_ids))
        expected = self.ref.cancel(job_id)
        got = self._call(self.svc.cancel_job, self.ref.jobs[job_id].owner, job_id, "user")
        self._same(got, expected)

    @precondition(lambda self: self.user_ids)
    @rule(data=st.data(), preset=st.sampled_from(["interior", "seller"]), again=st.integers(0, 3))
    def create_rule(self, data: st.DataObject, preset: str, again: int) -> None:
        """A rule; now and then (``again``) under the id of one created before (by this user or
        another), as the retry of a creation under an Idempotency-Key whose answer is forgotten is."""
        user_id = data.draw(st.sampled_from(self.user_ids), label="user")
        rule_id = data.draw(st.sampled_from(self.rule_ids), label="rule") if not again and self.rule_ids else None
        if rule_id is not None and data.draw(st.booleans(), label="the same body"):
            r = self.ref.rules[rule_id]
            preset, name, protect = r.preset, r.name, list(r.protect)
            edits = {c: (e["action"], e["value"]) for c, e in r.concepts.items()}
        else:
            name, edits, protect = self._rule_body(data, preset)
        expected = self.ref.create_rule(user_id, rule_id, name, preset, edits, protect)
        body = {c: {"action": a, "value": v} for c, (a, v) in edits.items()}
        got = self._call(self.svc.create_rule, user_id, name, preset, body, protect, rule_id)
        if isinstance(expected, str):
            assert isinstance(got, DomainError) and got.code == expected, (got, expected)
        elif expected is not None:
            assert got == expected, (got, expected)
        else:
            assert isinstance(got, UUID), got
            stored = self.ref.rule_edits(preset, edits, protect, name)
            assert stored is not None
            self.ref.rules[got] = RefRule(user_id, name, preset, *stored)
            self.rule_ids.append(got)

    @staticmethod
    def _rule_body(data: st.DataObject, preset: str) -> tuple[str, dict[str, tuple[str, str]], list[str]]:
        if data.draw(st.integers(0, 3), label="taken"):
            edits = data.draw(st.dictionaries(st.sampled_from(RULE_CONCEPTS[preset]), RULE_EDITS, min_size=1,
                                              max_size=2), label="edits")
            rest = [c for c in RULE_CONCEPTS[preset] if c not in edits]
            return data.draw(RULE_NAMES, label="name"), edits, data.draw(st.lists(st.sampled_from(rest), max_size=2)
                                                                         if rest else st.just([]), label="protect")
        return (data.draw(HOSTILE_NAMES, label="name"),
                data.draw(st.dictionaries(HOSTILE_CONCEPTS, HOSTILE_EDITS, max_size=2), label="edits"),
                data.draw(st.lists(HOSTILE_CONCEPTS, max_size=1), label="protect"))

    def _rule_and_caller(self, data: st.DataObject) -> tuple[UUID, UUID]:
        """A rule, and its owner three times in four, else any user."""
        rule_id = data.draw(st.sampled_from(self.rule_ids), label="rule")
        owner = self.ref.rules[rule_id].owner
        if data.draw(st.integers(0, 3), label="owner"):
            return rule_id, owner
        return rule_id, data.draw(st.sampled_from(self.user_ids), label="caller")

    @precondition(lambda self: self.rule_ids)
    @rule(data=st.data())
    def update_rule(self, data: st.DataObject) -> None:
        rule_id, caller = self._rule_and_caller(data)
        name, edits, protect = self._rule_body(data, self.ref.rules[rule_id].preset)
        expected = self.ref.update_rule(caller, rule_id, name, edits, protect)
        body = {c: {"action": a, "value": v} for c, (a, v) in edits.items()}
        self._same(self._call(self.svc.update_rule, caller, rule_id, name, body, protect), expected)

    @precondition(lambda self: self.rule_ids)
    @rule(data=st.data())
    def delete_rule(self, data: st.DataObject) -> None:
        rule_id, caller = self._rule_and_caller(data)
        expected = self.ref.delete_rule(caller, rule_id)
        self._same(self._call(self.svc.delete_rule, caller, rule_id), expected)

    @precondition(lambda self: self.user_ids)
    @rule(data=st.data(), amount=st.integers(1, 20))
    def crash_before_commit(self, data: st.DataObject, amount: int) -> None:
        """The writer dies inside the save: the client sees a failure and nothing is stored."""
        user_id = data.draw(st.sampled_from(self.user_ids))
        head = self._head()
        recorder: Any = self.svc.app.recorder
        real = recorder.insert_events

        def dying(*args: Any, **kwargs: Any) -> Any:
            raise Crash("writer: before commit")

        recorder.insert_events = dying
        try:
            self.svc.grant_credits(user_id, amount, "promo")
            raise AssertionError("the save should have died")
        except Crash:
            self.figures.crashes["before commit"] += 1
        finally:
            recorder.insert_events = real
        assert self._head() == head

    @precondition(lambda self: self.user_ids)
    @rule(data=st.data(), amount=st.integers(1, 20), retried=st.booleans())
    def commit_answer_lost(self, data: st.DataObject, amount: int, retried: bool) -> None:
        """The save commits and the connection breaks before its answer: the client is answered
        as saved, and the grant is made once (the reference grants it once). ``retried``: as
        eventsourcing's retry of the insert does, it is sent again and meets its own events (an
        IntegrityError); else the database's error is what the save raises."""
        user_id = data.draw(st.sampled_from(self.user_ids))
        lost = AnswerLost(self.svc.app.recorder, retried=retried)
        lost.armed = True
        try:
            balance = self._call(self.svc.grant_credits, user_id, amount, "promo")
        finally:
            lost.remove()
        assert not lost.armed  # the save met the lost answer indeed
        self.ref.grant(user_id, amount)
        assert balance == self.ref.users[user_id].balance
        self.figures.crashes["answer lost after commit" + (", the retry a conflict" if retried else "")] += 1

    def _same(self, got: Any, expected: str | None) -> None:
        if expected is None:
            assert not isinstance(got, DomainError), got
        else:
            assert isinstance(got, DomainError) and got.code == expected, (got, expected)

    def _head(self) -> int:
        return int(self.svc.app.recorder.max_notification_id() or 0)

    # ---- the pipeline ----
    def _relay(self) -> Relay:
        if self.relay is None:
            self.relay = Relay(self.svc.app, Producer(self.broker), self.positions, batch_size=7)
            self.relay_position = self.positions.get(RELAY_NAME)
        return self.relay

    def _projector(self) -> Projector:
        if self.projector is None:
            app = self.svc.app
            self.projector = Projector(
                Consumer(self.broker, "palette-projections", max_records=9), self.store,
                LogReader(app.recorder, app.mapper.transcoder),
                published=lambda: self.positions.get(RELAY_NAME), sweep_every_s=self.sweep_every_s,
                clock=self.time)
        return self.projector

    @rule()
    def relay_step(self) -> None:
        self.relay_position = self._relay().step(self.relay_position)

    @rule(point=st.sampled_from(["after commit, before publish", "mid-batch (relay)",
                                 "after publish, before the position is saved"]))
    def relay_crash(self, point: str) -> None:
        relay = self._relay()
        producer: Any = relay.producer
        if point == "after commit, before publish":
            producer.crash_at_send = True
        elif point == "mid-batch (relay)":
            producer.crash_in_flush = 1
        else:
            self.positions.crash_at_save = True
        try:
            for _ in range(3):  # the crash point is reached within a few steps when there is work
                self.relay_position = relay.step(self.relay_position)
                relay.drain()
        except Crash:
            self.figures.crashes[point] += 1
        finally:
            self.positions.crash_at_save = False
            self.relay = None  # the process is gone; a new one starts from the saved position

    @rule()
    def projector_step(self) -> None:
        self._projector().step()

    @rule(point=st.sampled_from(["mid-batch (projector)", "after the read-model commit, before the offset commit"]))
    def projector_crash(self, point: str) -> None:
        projector = self._projector()
        if point == "mid-batch (projector)":
            self.store.crash_next = True
        else:
            projector.consumer.crash_at_commit = True
        try:
            projector.step()
        except Crash:
            self.figures.crashes[point] += 1
        finally:
            self.store.crash_next = False
            self._forget_projector()

    @rule()
    def sweep(self) -> None:
        self.time.t += self.sweep_every_s
        self._projector().step()

    @rule(n=st.integers(1, 3))
    def broker_loses_messages(self, n: int) -> None:
        self.broker.drop += n

    @rule(n=st.integers(1, 3))
    def broker_repeats_messages(self, n: int) -> None:
        self.broker.duplicate += n

    def drain(self) -> None:
        """Everything stored is published and folded: relay to the head, projector to the end of
        the broker, then sweeps until the sweep has covered what the relay published."""
        self.broker.drop = self.broker.duplicate = 0
        relay = self._relay()
        while True:
            position = relay.step(self.relay_position)
            relay.drain()
            if position == self.relay_position:
                break
            self.relay_position = position
        projector = self._projector()
        while projector.step():
            pass
        published = self.positions.get(RELAY_NAME)
        for _ in range(published + 2):
            if projector.sweep_bound >= published and self.store.position(SWEEP) >= published:
                break
            projector.sweep()
        assert self.store.position(SWEEP) >= published

    # ---- what must hold ----
    @invariant()
    def the_service_agrees_with_the_reference(self) -> None:
        self.figures.steps += 1  # invariants run after every step (and once at the start)
        for user_id, ref in self.ref.users.items():
            view = self.svc.get_user(user_id)
            assert (view.plan, view.credits, view.granted, view.spent, view.reserved, view.active_jobs) == (
                ref.plan, ref.balance, ref.granted, ref.spent, sum(ref.reservations.values()),
                len(ref.reservations)), (view, ref)
            assert view.credits >= 0
            assert view.granted == view.credits + view.reserved + view.spent
            assert view.rule_slots_used == self.ref.live_rules(user_id), (view, user_id)
        for rule_id, ref_rule in self.ref.rules.items():
            try:
                got = self.svc.get_rule(ref_rule.owner, rule_id)
            except DomainError as e:
                assert ref_rule.deleted and e.code == "NOT_FOUND", (e, ref_rule)
                continue
            assert not ref_rule.deleted
            assert (self.svc.rule_name(got.name), got.preset_id, got.concepts, got.protect) == (
                ref_rule.name, ref_rule.preset, ref_rule.concepts, ref_rule.protect), (got, ref_rule)
        for job_id, ref_job in self.ref.jobs.items():
            job: Any = self.svc.app.repository.get(job_id)
            assert job.status.value == ref_job.status
            assert {i: r.status for i, r in job.items.items()} == ref_job.results
            if job_id in self.terminal:
                assert ref_job.status == self.terminal[job_id]
            elif ref_job.status in ("done", "failed", "canceled"):
                self.terminal[job_id] = ref_job.status
                self.figures.ended[ref_job.status] += 1
            assert ref_job.settlements == (1 if ref_job.status in ("done", "failed", "canceled") else 0)

    @invariant()
    def each_job_is_settled_at_most_once_in_the_log(self) -> None:
        settled = Counter(e.data["job_id"] for e in self._log() if e.type == "CreditsSettled")
        assert all(n == 1 for n in settled.values()), settled

    @invariant()
    def read_models_agree_with_the_reference(self) -> None:
        """The projected rows against the plain-Python reference (the oracle: it never calls the
        projections' fold), then, per stream, each model against the fold of the versions it has
        tracked (which alone sees a model's in-between states, but shares the fold's mistakes)."""
        assert self.parked() == 0
        log = self._log()
        actual = self.read_models()
        seen = {name: self.tracking(name) for name in READ_MODELS}
        self._rows_match_the_reference(actual, seen, {e.stream_id: e.version for e in log})
        self._rows_are_a_fold_of_the_log(actual, seen, log)

    def _rows_match_the_reference(self, actual: dict[str, dict[Any, dict[str, Any]]],
                                  seen: dict[str, dict[UUID, int]], latest: dict[UUID, int]) -> None:
        """Each stream a model has folded up to its latest event shows what the reference says:
        users' plan and credits, the ledger entry by entry (so Σ balance_delta is the balance),
        jobs' status and counts, items' statuses, each user's active jobs, and rules (their name
        opened, edits as stored, deleted or not)."""
        ref = self.ref

        def current(name: str) -> set[str]:
            return {str(s) for s, v in seen[name].items() if v == latest.get(s)}

        users = {str(r["id"]): r for r in actual["users"].values()}
        jobs = {str(r["id"]): r for r in actual["jobs_log"].values()}
        items: dict[str, dict[int, str]] = {}
        for r in actual["job_items_log"].values():
            items.setdefault(str(r["job_id"]), {})[r["idx"]] = r["status"]
        ledgers: dict[str, list[tuple[int, str, int, int, str]]] = {}
        for r in actual["billing_events"].values():
            ledgers.setdefault(str(r["user_id"]), []).append(
                (r["seq"], r["type"], r["amount"], r["balance_delta"], str(r["ref"])))
        known_users, known_jobs = {str(u) for u in ref.users}, {str(j) for j in ref.jobs}
        assert set(users) <= known_users and set(ledgers) <= known_users, "a row for a user never registered"
        assert set(jobs) <= known_jobs and set(items) <= known_jobs, "a row for a job never created"
        fresh_users, fresh_ledgers = current("users"), current("billing_events")
        fresh_jobs, fresh_items = current("jobs_log"), current("job_items_log")
        for user_id, u in ref.users.items():
            uid = str(user_id)
            if uid in fresh_users:
                row = users.get(uid)
                assert row is not None, f"user {uid} folded but has no row"
                assert (row["plan"], row["credits"], row["reserved"], row["spent"], row["granted"]) == (
                    u.plan, u.balance, sum(u.reservations.values()), u.spent, u.granted), (uid, row, u)
            if uid in fresh_ledgers:
                ledger = sorted(ledgers.get(uid, []))
                assert [e[0] for e in ledger] == list(range(1, len(ledger) + 1)), (uid, ledger)
                assert [e[1:] for e in ledger] == u.ledger, (uid, ledger, u.ledger)
                assert sum(e[3] for e in ledger) == u.balance, (uid, ledger, u.balance)
        active: Counter[str] = Counter()
        for job_id, j in ref.jobs.items():
            jid = str(job_id)
            if jid in fresh_jobs:
                row = jobs.get(jid)
                assert row is not None, f"job {jid} folded but has no row"
                done = sum(1 for s in j.results.values() if s == "done")
                assert (str(row["user_id"]), row["status"], row["total_items"], row["cost_estimate"],
                        row["done_items"], row["failed_items"]) == (
                    str(j.owner), j.status, j.items, j.items, done, len(j.results) - done), (jid, row, j)
                active[str(j.owner)] += row["status"] not in ("done", "failed", "canceled")
            if jid in fresh_items:
                want = {i: j.results.get(i, "pending") for i in range(j.items)}
                assert items.get(jid) == want, (jid, items.get(jid), j)
        for user_id, u in ref.users.items():
            if all(str(job) in fresh_jobs for job, j in ref.jobs.items() if j.owner == user_id):
                assert active[str(user_id)] == len(u.reservations), (user_id, active[str(user_id)], u)
        rules = {str(r["id"]): r for r in actual["rules"].values()}
        assert set(rules) <= {str(r) for r in ref.rules}, "a row for a rule never created"
        fresh_rules = current("rules")
        for rule_id, r in ref.rules.items():
            if str(rule_id) in fresh_rules:
                row = rules.get(str(rule_id))
                assert row is not None, f"rule {rule_id} folded but has no row"
                assert (str(row["user_id"]), self.svc.rule_name(row["name"]), row["preset_id"],
                        json.loads(row["concepts_json"]), json.loads(row["protect_json"]), row["deleted"]) == (
                    str(r.owner), r.name, r.preset, r.concepts, r.protect, r.deleted), (rule_id, row, r)

    def _rows_are_a_fold_of_the_log(self, actual: dict[str, dict[Any, dict[str, Any]]],
                                    seen: dict[str, dict[UUID, int]], log: list[EventEnvelope]) -> None:
        for name, model in READ_MODELS.items():
            rows, appended, _, _, failed = fold_log(
                model, (e for e in log if e.version <= seen[name].get(e.stream_id, 0)))
            assert not failed
            assert _plain(actual[model.keyed_table]) == _plain({k: v for k, v in rows.items() if v is not None}), name
            if model.append_table:
                assert _plain(actual[model.append_table]) == _plain({r["id"]: r for r in appended})

    def _log(self) -> list[EventEnvelope]:
        app = self.svc.app
        return list(iter_envelopes(app.recorder, app.mapper.transcoder, 1, None))

    def teardown(self) -> None:
        self.drain()
        latest: dict[UUID, tuple[str, int]] = {e.stream_id: (e.stream_type, e.version) for e in self._log()}
        for name, model in READ_MODELS.items():
            want = {s: v for s, (kind, v) in latest.items() if kind == model.stream_type}
            assert self.tracking(name) == want, f"{name} has not folded every event"
        # every stream is folded to its end now: the reference check covers every user and job
        assert {s for s, (kind, _) in latest.items() if kind == "User"} == set(self.ref.users)
        assert {s for s, (kind, _) in latest.items() if kind == "Job"} == set(self.ref.jobs)
        assert {s for s, (kind, _) in latest.items() if kind == "Rule"} == set(self.ref.rules)
        self.read_models_agree_with_the_reference()
        self._forget_projector()
        self.figures.dropped += self.broker.dropped
        self.figures.duplicated += self.broker.duplicated
        self.figures.filled += self.filled
        self.figures.swept += self.swept

    def _forget_projector(self) -> None:
        if self.projector is not None:
            self.filled += self.projector.totals.filled
            self.swept += self.projector.swept
        self.projector = None


def _plain(value: Any) -> Any:
    """Values as PostgreSQL and the fold both can give them (a UUID or its text, any time zone)."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return value


TABLES = sorted({t for m in READ_MODELS.values() for t in (m.keyed_table, m.append_table) if t})


class CrashableStore:
    """A read store whose next batch can die before its commit (nothing of it is kept)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.crash_next = False

    def apply(self, envelopes: Any, fill: Any = None) -> Any:
        if self.crash_next:
            real = self.inner._commit

            def dying(staged: Any) -> None:
                raise Crash("projector: mid-batch")

            self.inner._commit = dying
            try:
                return self.inner.apply(envelopes, fill)
            finally:
                self.inner._commit = real
        return self.inner.apply(envelopes, fill)

    def position(self, name: str) -> int:
        return int(self.inner.position(name))

    def save_position(self, name: str, position: int) -> None:
        self.inner.save_position(name, position)
