"""Palette's use cases: each loads aggregates, decides, and saves every change in one transaction.

A use case that changes something is built as a command (``*_command``: the input checked, the
decision as a closure over the unit of work) that either entry runs: ``run`` from an event loop
(the API), which holds no thread while it waits, or the method of the same name from a thread (the
CLI, the tests), which does nothing but run it. Three use cases do more than run one command:
``register`` (an erased device's next user) and ``confirm_upload`` (the inputs' sizes looked up
first), with a method for each entry, and ``erase_user`` (the reservations read first), from a
thread."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, ClassVar, TypeVar
from uuid import UUID

import anyio.to_thread
from eventsourcing.application import Application, Repository
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import JSONTranscoder

from application.current_views import CurrentViews
from application.device_keys import DeviceKeyer
from application.personal import KeyDestroyed, Keyring, Sealer
from application.ports import Clock, IdGenerator, ObjectStore, StreamVersions
from application.snapshots import SNAPSHOT_EVERY, SetAsList, StreamSnapshot
from application.unit_of_work import Command, CommandExecutor, Committed, UnitOfWork, touches
from domain.contracts.keys import MAX_INPUT_BYTES, REISSUE_S, input_key
from domain.errors import InvalidState, NotFound, PreconditionFailed, UserNotFound, ValidationFailed
from domain.job import EXECUTED, MAX_ITEMS, Job, JobStatus, RecordedResult
from domain.plans import DEFAULT_PLANS, Plan
from domain.presets import get_preset, normalise_edits
from domain.rule import Rule
from domain.rule import check_new_name as check_rule_name
from domain.user import User, check_grant, legacy_user_id_for_device, user_id_for_device_key

MAX_DEVICE_HASH = 200
DEVICE_KEY_FIELD = "device_key"  # the names personal fields are sealed under (bound to the ciphertext)
RULE_NAME_FIELD = "rule.name"
T = TypeVar("T")


class PaletteApplication(Application[UUID]):
    """The event store: User, Job and Rule streams in one PostgreSQL events table, and snapshots
    of the streams that grow without end in a table of their own (``palette_snapshots``).

    A snapshot is the aggregate's attributes (``application.snapshots.StreamSnapshot``): a change
    to what an aggregate in ``snapshot_every`` holds comes with a new ``class_version`` and its
    ``upcast_vN_vM`` on the aggregate class, as an event's does. A snapshot is only ever a
    shortcut: one that cannot be read is passed over and the whole stream read instead. Only the
    group committer's loads start from one; the repository (the dispatcher's loads of jobs, which
    have none, a replay as of a version, the naive executor) folds the stored events."""

    # No eventsourcing aggregate cache: the process's one cache is the group committer's
    # (application.executors.WriterCache), which the service's reads go through too (executor.read).
    name = "palette"
    is_snapshotting_enabled = True
    snapshot_class = StreamSnapshot
    # Taken by the group committer after the save that reaches each multiple (not by
    # eventsourcing's ``snapshotting_intervals``, which reads the aggregate back from the store).
    snapshot_every: ClassVar[dict[type[Aggregate], int]] = {User: SNAPSHOT_EVERY, Rule: SNAPSHOT_EVERY}

    def construct_repository(self) -> Repository[UUID]:
        repository = super().construct_repository()
        repository.snapshot_store = None  # no snapshot query before each load of a job
        return repository

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(SetAsList())


class UserErased(InvalidState):
    """The device's current user (as this process knew it) was erased meanwhile."""

    def __init__(self, user_id: UUID) -> None:
        super().__init__("this device's user was erased a moment ago: register again")
        self.user_id = user_id


def item_list(items: Sequence[int]) -> str:
    """Item indexes as a message names them: the first 20."""
    return ", ".join(str(i) for i in items[:20]) + (" ..." if len(items) > 20 else "")


class InputsTooLarge(ValidationFailed):
    code = "INPUT_TOO_LARGE"

    def __init__(self, items: list[int]) -> None:
        super().__init__(f"{len(items)} input(s) over {MAX_INPUT_BYTES >> 20} MB, deleted: upload them again "
                         f"smaller (idx {item_list(items)})")
        self.too_large = items


class InputsMissing(ValidationFailed):
    code = "INPUTS_MISSING"

    def __init__(self, missing: list[int]) -> None:
        super().__init__(f"{len(missing)} input(s) not uploaded yet: idx {item_list(missing)}")
        self.missing = missing


@dataclass(frozen=True)
class UserView:
    user_id: UUID
    plan: str
    credits: int
    reserved: int
    spent: int
    granted: int
    active_jobs: int
    rule_slots_used: int
    rule_slots_max: int
    max_concurrency: int


@dataclass(frozen=True)
class RerunSource:
    """What a job made from a finished one takes from it: the item count, and the concepts (edited,
    then protected) whose masks its worker kept."""

    item_count: int
    concepts: tuple[str, ...]


def _under(key: str, prefix: str) -> bool:
    """Whether ``key`` names an object under ``prefix``: no empty, ``.`` or ``..`` segment after
    it (a URL made of ``outputs/<u>/<job>/../../inputs/...`` would reach another prefix), and no
    control character."""
    rest = key.removeprefix(prefix)
    return (rest != key and all(segment not in ("", ".", "..") for segment in rest.split("/"))
            and all(ch >= " " and ch != "\x7f" for ch in rest))


def _version_matches(rule: Rule, expected_versions: AbstractSet[int] | None) -> bool:
    """Whether ``rule`` is at a version an If-Match names (None: no If-Match, any version)."""
    return expected_versions is None or rule.version in expected_versions


def _stale(rule: Rule) -> PreconditionFailed:
    return PreconditionFailed(f"the rule is at version {rule.version}, not the If-Match's: read it again")


def _id_of(aggregate: Job | Rule) -> UUID:
    """A creation command's answer to most callers: the id of what it made."""
    return aggregate.id


class PaletteService:
    """Commands return :class:`Committed` (value + event-store position) for read-your-writes."""

    def __init__(
        self, app: Application[UUID], executor: CommandExecutor, clock: Clock, ids: IdGenerator, *,
        device_keys: DeviceKeyer, keyring: Keyring,
        store: ObjectStore | None = None, plans: Mapping[str, Plan] = DEFAULT_PLANS,
        versions: StreamVersions | None = None,
    ) -> None:
        self.app = app
        # Both keys are required: a default would seal under keys that die with the process.
        self.device_keys = device_keys
        # Personal fields are sealed under per-user keys (erasure destroys the key).
        self.sealer = Sealer(keyring)
        self.executor = executor
        self.clock = clock
        self.ids = ids
        self.store = store
        self.plans = plans
        # With the store's stream versions at hand, /me is answered on the event loop while the
        # user's stream has not changed (application.current_views).
        self.user_views = CurrentViews(versions, self._read_user_view) if versions is not None else None

    async def run(self, command: Command[T]) -> Committed[T]:
        """Run a command built by a ``*_command`` method from an event loop."""
        return await self.executor.execute_async(command)

    # -- users ---------------------------------------------------------------------------
    def register(self, device_hash: str, plan: str = "free") -> Committed[tuple[UUID, bool]]:
        """Register once per device; a repeat returns the same user (created=False). A device
        whose user was erased gets a new user (without sign-up credits: erasing is no way to
        mint them)."""
        try:
            return self.executor.execute(self.register_command(device_hash, plan, self.device_generation(device_hash)))
        except UserErased as e:  # by another process, while this one kept the user's key
            self.sealer.evict(e.user_id)
            return self.executor.execute(self.register_command(device_hash, plan, self.device_generation(device_hash)))

    async def register_async(self, device_hash: str, plan: str = "free") -> Committed[tuple[UUID, bool]]:
        """register from an event loop: the user's key is made (or loaded) on the loop, only for a
        device this process has not seen registered; an erased device's next generation is looked
        up on a thread."""
        self._check_device_hash(device_hash)
        first = user_id_for_device_key(self.device_keys.key(device_hash))
        for last in (False, True):
            generation = 0
            if not self.sealer.has_key(first):
                try:
                    await self.sealer.prepare_async(first)  # one round trip: the key, made if new
                except KeyDestroyed:  # erased: a later generation (rare, so on a thread)
                    generation = await anyio.to_thread.run_sync(self.device_generation, device_hash)
            try:
                return await self.run(self.register_command(device_hash, plan, generation))
            except UserErased as e:
                if last:
                    raise
                self.sealer.evict(e.user_id)  # erased by another process: look the generation up again
        raise AssertionError("unreachable")

    def device_generation(self, device_hash: str) -> int:
        """The generation of the device's current user (the first not erased), its key made ready
        for sealing."""
        self._check_device_hash(device_hash)
        device_key = self.device_keys.key(device_hash)
        first = user_id_for_device_key(device_key)
        if self.sealer.has_key(first):
            return 0  # a key in memory: the user is live (an erasure anywhere is caught by the command)
        try:
            self.sealer.prepare(first)  # one round trip: the key, made if new, refused if erased
            return 0
        except KeyDestroyed:
            pass
        # The erased generations are the first ones: a registration takes the first generation not
        # erased, and only that live user is ever erased. The first eight in one query (a device
        # erased a few times); past them the live one is found by doubling, then halving: walking
        # eight a query made each registration of a device erased N times cost N / 8 queries.
        ids = [user_id_for_device_key(device_key, g) for g in range(1, 9)]
        erased = self.sealer.keyring.erased(ids)
        live = next((g for g, uid in zip(range(1, 9), ids, strict=True) if uid not in erased), None)
        if live is None:
            def is_erased(generation: int) -> bool:
                uid = user_id_for_device_key(device_key, generation)
                return bool(self.sealer.keyring.erased([uid]))

            low, step = 8, 8  # low: a generation known erased
            while is_erased(low + step):
                low, step = low + step, step * 2
            live = low + step  # not erased: the first such lies in (low, live]
            while live - low > 1:
                middle = (low + live) // 2
                low, live = (middle, live) if is_erased(middle) else (low, middle)
        self.sealer.prepare(user_id_for_device_key(device_key, live))
        return live

    @staticmethod
    def _check_device_hash(device_hash: str) -> None:
        if not device_hash or len(device_hash) > MAX_DEVICE_HASH:
            raise ValidationFailed(f"device_hash must be 1..{MAX_DEVICE_HASH} characters")

    def register_command(self, device_hash: str, plan: str = "free", generation: int = 0) -> Command[tuple[UUID, bool]]:
        self._check_device_hash(device_hash)
        limits = self._plan(plan)
        if generation:
            limits = replace(limits, initial_credits=0)
        device_key = self.device_keys.key(device_hash)
        user_id = user_id_for_device_key(device_key, generation)
        # A device registered before device keys has its user under the unkeyed id: keep it.
        legacy_id = legacy_user_id_for_device(device_hash)
        at = self.clock.now()

        def seal(uid: UUID, value: str) -> str:
            return self.sealer.seal(uid, DEVICE_KEY_FIELD, value)

        @touches(user_id, legacy_id)
        def command(uow: UnitOfWork) -> tuple[UUID, bool]:
            new_limits = limits
            for existing in (user_id, legacy_id):
                user = uow.get(User, existing)
                if user is None:
                    continue
                if not user.erased:
                    return existing, False
                if existing == user_id:
                    raise UserErased(user_id)
                new_limits = replace(limits, initial_credits=0)  # the device's user was erased
            uow.add(User.register(device_key, new_limits, at, generation, seal))
            return user_id, True

        return command

    def grant_credits(self, user_id: UUID, amount: int, reason: str,
                      grant_id: UUID | None = None) -> Committed[int]:
        """The user's balance after the grant; a ``grant_id`` already recorded for this user
        records nothing (``recorded`` False), so that a retry grants once."""
        return self.executor.execute(self.grant_credits_command(user_id, amount, reason, grant_id))

    def grant_credits_command(self, user_id: UUID, amount: int, reason: str,
                              grant_id: UUID | None = None) -> Command[int]:
        check_grant(amount, reason)
        at = self.clock.now()

        @touches(user_id)
        def command(uow: UnitOfWork) -> int:
            user = self._user(uow, user_id)
            user.grant(amount, reason, at, grant_id)
            return user.balance

        return command

    def erase_user(self, user_id: UUID) -> bool:
        """Cancel the user's unfinished jobs (refunded) and record the erasure, atomically; True
        when this call recorded it. Destroying the key and deleting objects and webhooks is the
        caller's (``adapters.erasure``), which does it after (its tombstone before)."""
        for _ in range(3):
            user = self.executor.read(user_id)
            if not isinstance(user, User):
                raise NotFound("user not found")
            try:
                return self.executor.execute(self.erase_user_command(user_id, list(user.reservations))).value
            except InvalidState:
                continue  # a job started between the read and the command: read again
        raise InvalidState("the user keeps starting jobs: try again")

    def erase_user_command(self, user_id: UUID, job_ids: Sequence[UUID]) -> Command[bool]:
        at = self.clock.now()

        @touches(user_id, *job_ids)
        def command(uow: UnitOfWork) -> bool:
            user = uow.get(User, user_id)
            if user is None:
                raise NotFound("user not found")
            if not user.erased and set(user.reservations) - set(job_ids):
                # before anything is recorded, so erase_user reads the reservations again
                raise InvalidState("a job started since the reservations were read")
            for job_id in job_ids:
                job = uow.get(Job, job_id)
                if job is None or job.user_id != user_id:
                    continue
                if not job.status.terminal:
                    job.cancel("erasure", at)
                user.settle(job_id, job.done_items, at)
            return user.erase(at)  # InvalidState while a job not in job_ids holds credits

        return command

    def change_plan(self, user_id: UUID, plan: str) -> Committed[str]:
        return self.executor.execute(self.change_plan_command(user_id, plan))

    def change_plan_command(self, user_id: UUID, plan: str) -> Command[str]:
        limits = self._plan(plan)
        at = self.clock.now()

        @touches(user_id)
        def command(uow: UnitOfWork) -> str:
            user = self._user(uow, user_id)
            user.change_plan(limits, at)
            return user.plan

        return command

    def get_user(self, user_id: UUID) -> UserView:
        return self._user_view(self.executor.read(user_id))

    async def get_user_async(self, user_id: UUID) -> UserView:
        """get_user from an event loop: the view kept from the last read while the user's stream
        has no event since, else taken on the writer's own object (no copy)."""
        if self.user_views is not None:
            return await self.user_views.get(user_id)
        return await self.executor.read_async(user_id, self._user_view)

    async def _read_user_view(self, user_id: UUID) -> tuple[int, UserView]:
        return await self.executor.read_async(user_id, self._versioned_user_view)

    def _versioned_user_view(self, user: Any) -> tuple[int, UserView]:
        view = self._user_view(user)
        return user.version, view

    def _user_view(self, user: Any) -> UserView:
        if not isinstance(user, User) or user.erased:
            raise NotFound("user not found")
        limits = self._plan(user.plan)
        return UserView(
            user_id=user.id, plan=user.plan, credits=user.balance, reserved=user.reserved,
            spent=user.spent, granted=user.granted, active_jobs=user.active_jobs,
            rule_slots_used=len(user.rule_ids), rule_slots_max=limits.max_rule_slots,
            max_concurrency=limits.max_concurrency,
        )

    # -- jobs ----------------------------------------------------------------------------
    def create_job(self, user_id: UUID, preset: str, item_count: int, job_id: UUID | None = None) -> Committed[UUID]:
        """Reserve one credit per item and create the job, atomically. A caller-chosen ``job_id``
        (derived from an Idempotency-Key) makes a retry of a creation that did commit a no-op."""
        return self.executor.execute(self.create_job_command(user_id, preset, item_count, job_id))

    def create_job_command(self, user_id: UUID, preset: str, item_count: int,
                           job_id: UUID | None = None) -> Command[UUID]:
        get_preset(preset)
        if not isinstance(item_count, int) or not 1 <= item_count <= MAX_ITEMS:
            raise ValidationFailed(f"item_count must be between 1 and {MAX_ITEMS}")
        def create(uow: UnitOfWork, user: User, new_id: UUID, at: datetime) -> None:
            user.reserve(new_id, item_count, self._plan(user.plan), at)
            uow.add(Job.create(new_id, user_id, preset, item_count, at))

        def same(job: Job) -> bool:
            return job.preset == preset and job.item_count == item_count

        return self._create_owned_command(user_id, Job, job_id, create, same=same)

    async def rerun_source_async(self, user_id: UUID, source_id: UUID) -> RerunSource:
        """What a new job takes from the caller's finished job ``source_id`` (NotFound: none,
        another user's or deleted; InvalidState: not finished, or its objects expired)."""
        def view(job: Any) -> RerunSource:
            source = self._owned_job(user_id, job)
            self._check_rerunnable(source)
            return RerunSource(source.item_count, (*source.concepts, *source.protect))

        return await self.executor.read_async(source_id, view)

    def rerun_job_command(self, user_id: UUID, source_id: UUID, job_id: UUID | None = None) -> Command[UUID]:
        """A new job of the preset and size of the caller's finished job ``source_id``, its credits
        reserved as for any job. The caller (the API) then copies the source's inputs and the masks
        its worker used into it, so no photo is uploaded again."""
        def create(uow: UnitOfWork, user: User, new_id: UUID, at: datetime) -> None:
            source = self._own_job(uow, user_id, source_id)
            self._check_rerunnable(source)
            user.reserve(new_id, source.item_count, self._plan(user.plan), at)
            uow.add(Job.create(new_id, user_id, source.preset, source.item_count, at))

        return self._create_owned_command(user_id, Job, job_id, create, also=(source_id,))

    @staticmethod
    def _check_rerunnable(job: Job) -> None:
        if not job.status.terminal:
            raise InvalidState(f"cannot rerun a {job.status} job: wait for it to finish, or cancel it")
        if job.objects_deleted:
            raise InvalidState("cannot rerun this job: its photos were removed after the retention period")

    def confirm_upload(self, user_id: UUID, job_id: UUID) -> Committed[str]:
        """created -> uploaded, once every input object exists in the store. Returns the status."""
        if self.store is not None:
            status, item_count = self._upload_state(user_id, self.executor.read(job_id))
            if status == "created":
                keys = _input_keys(user_id, job_id, item_count)
                too_large = _too_large_inputs(keys, self.store.sizes(keys))
                if too_large:
                    self._refuse_too_large(keys, too_large)
        return self.executor.execute(self.confirm_upload_command(user_id, job_id))

    async def confirm_upload_async(self, user_id: UUID, job_id: UUID) -> Committed[str]:
        """confirm_upload from an event loop."""
        if self.store is not None:
            status, item_count = await self.executor.read_async(job_id, functools.partial(self._upload_state, user_id))
            if status == "created":
                keys = _input_keys(user_id, job_id, item_count)
                too_large = _too_large_inputs(keys, await self.store.sizes_async(keys))
                if too_large:
                    await anyio.to_thread.run_sync(self._refuse_too_large, keys, too_large)
        return await self.run(self.confirm_upload_command(user_id, job_id))

    @staticmethod
    def _owned_job(user_id: UUID, job: Any) -> Job:
        """``job`` when it is the caller's (NotFound: no job, another user's, or deleted)."""
        if not isinstance(job, Job) or job.user_id != user_id or job.deleted:
            raise NotFound("job not found")
        return job

    @classmethod
    def _upload_state(cls, user_id: UUID, job: Any) -> tuple[str, int]:
        """The caller's job's status and item count (NotFound as _owned_job)."""
        owned = cls._owned_job(user_id, job)
        return owned.status.value, owned.item_count

    def _refuse_too_large(self, keys: list[str], too_large: list[str]) -> None:
        """InputsTooLarge, the inputs over MAX_INPUT_BYTES deleted first (the same upload link
        takes a smaller photo while it lives)."""
        assert self.store is not None
        self.store.delete(too_large)
        gone = set(too_large)
        raise InputsTooLarge([i for i, k in enumerate(keys) if k in gone])

    def confirm_upload_command(self, user_id: UUID, job_id: UUID) -> Command[str]:
        at = self.clock.now()

        @touches(job_id)
        def command(uow: UnitOfWork) -> str:
            job = self._own_job(uow, user_id, job_id)
            job.confirm_upload(at)
            return job.status.value

        return command

    def execute_job(
        self, user_id: UUID, job_id: UUID, concepts: Mapping[str, Mapping[str, Any]] | None,
        protect: Sequence[str] | None = None, rule_id: UUID | None = None,
    ) -> Committed[str]:
        """uploaded -> queued with the edits; a rule supplies edits the request leaves out.
        Everything is read and checked inside the command (one batched load). Returns the status."""
        return self.executor.execute(self.execute_job_command(user_id, job_id, concepts, protect, rule_id))

    def execute_job_command(
        self, user_id: UUID, job_id: UUID, concepts: Mapping[str, Mapping[str, Any]] | None,
        protect: Sequence[str] | None = None, rule_id: UUID | None = None,
    ) -> Command[str]:
        at = self.clock.now()
        ids = (job_id,) if rule_id is None else (job_id, rule_id)

        @touches(*ids)
        def command(uow: UnitOfWork) -> str:
            job = self._own_job(uow, user_id, job_id)
            merged: dict[str, Mapping[str, Any]] = {}
            merged_protect = list(protect or [])
            if rule_id is not None and rule_id == job.rule_id and job.status in EXECUTED:
                # a retry (its answer lost) read against the rule as the job was queued with it,
                # whatever became of the rule since (edited or deleted on another device)
                merged.update(job.concepts)
                if protect is None:
                    merged_protect = list(job.protect)
            elif rule_id is not None:
                rule = self._own_rule(uow, user_id, rule_id)
                if rule.preset_id != job.preset:
                    raise ValidationFailed(f"rule is for preset {rule.preset_id!r}, job is {job.preset!r}")
                merged.update(rule.concepts)
                if protect is None:
                    merged_protect = list(rule.protect)
            merged.update(concepts or {})
            edits, protected = normalise_edits(job.preset, merged, merged_protect)
            job.execute(edits, protected, rule_id, at)
            return job.status.value

        return command

    def record_item_result(
        self, job_id: UUID, idx: int, status: str, idempotency_key: str, output_key: str = "",
        preview_key: str = "", error: str = "",
    ) -> Committed[RecordedResult]:
        """Record one GPU result; the last one finishes the job and settles credits atomically."""
        return self.executor.execute(self.record_item_result_command(
            job_id, idx, status, idempotency_key, output_key, preview_key, error))

    def record_item_result_command(
        self, job_id: UUID, idx: int, status: str, idempotency_key: str, output_key: str = "",
        preview_key: str = "", error: str = "",
    ) -> Command[RecordedResult]:
        at = self.clock.now()

        # the id is the worker's word: what it holds may be no job (a user, a rule), a 404 below
        @touches(job_id, related=lambda job: [job.user_id] if isinstance(job, Job) else [])
        def command(uow: UnitOfWork) -> RecordedResult:
            job = uow.get(Job, job_id)
            if job is None:
                raise NotFound("job not found")
            for key, kind in ((output_key, "outputs"), (preview_key, "previews")):
                if key and not _under(key, f"{kind}/{job.user_id}/{job_id}/"):
                    raise ValidationFailed(f"{kind} key must lie under {kind}/<user>/<job>/")
            result = job.record_result(idx, status, output_key, preview_key, error, idempotency_key, at)
            if result.finished is not None:
                self._user(uow, job.user_id).settle(job_id, job.done_items, at)
            return result

        return command

    def cancel_job(self, user_id: UUID, job_id: UUID, reason: str = "user") -> Committed[bool]:
        """Cancel and refund the items not done, atomically; canceling twice changes nothing.
        True when this call canceled the job."""
        return self.executor.execute(self.cancel_job_command(user_id, job_id, reason))

    def cancel_job_command(self, user_id: UUID, job_id: UUID, reason: str = "user",
                           unless_started: bool = False) -> Command[bool]:
        """Cancel the caller's job (refunding what it did not spend); ``unless_started``: only a job
        never executed (``Job.cancel_unstarted``, decided as the command runs)."""
        at = self.clock.now()

        @touches(job_id, user_id)
        def command(uow: UnitOfWork) -> bool:
            job = self._own_job(uow, user_id, job_id)
            canceled = job.cancel_unstarted(reason, at) if unless_started else job.cancel(reason, at)
            if canceled:
                self._user(uow, user_id).settle(job_id, job.done_items, at)
            return canceled

        return command

    async def deleted_async(self, user_id: UUID, job_id: UUID) -> bool:
        """Whether the caller's job is deleted already; NotFound (none, another user's) and
        InvalidState (not finished) as deleting it would raise."""
        def state(job: Any) -> bool:
            if not isinstance(job, Job) or job.user_id != user_id:
                raise NotFound("job not found")
            if not job.deleted and not job.status.terminal:
                raise InvalidState(f"cannot delete a {job.status} job (cancel it first)")
            return bool(job.deleted)

        return await self.executor.read_async(job_id, state)

    def delete_job_command(self, user_id: UUID, job_id: UUID) -> Command[bool]:
        """Delete the caller's terminal job (True: this call deleted it; False: it already was).
        Its objects are removed by the caller after (adapters.objects); those a failure there
        leaves, the sweeper's late pass removes (``adapters.retention``)."""
        at = self.clock.now()

        @touches(job_id, user_id)
        def command(uow: UnitOfWork) -> bool:
            job = uow.get(Job, job_id)
            if job is None or job.user_id != user_id:
                raise NotFound("job not found")
            self._user(uow, user_id)  # NotFound once erased: Erased takes no command after it
            return job.delete(at)

        return command

    def expire_job_command(self, job_id: UUID, retention_days: int) -> Command[bool]:
        """Record that a terminal job's objects were deleted after its retention period (the
        sweeper deletes them first); True when this call recorded it."""
        at = self.clock.now()

        @touches(job_id)
        def command(uow: UnitOfWork) -> bool:
            job = uow.get(Job, job_id)
            return job is not None and job.expire(retention_days, at)

        return command

    def get_job(self, user_id: UUID, job_id: UUID) -> Job:
        return self._owned_job(user_id, self.executor.read(job_id))

    async def get_job_async(self, user_id: UUID, job_id: UUID) -> Job:
        """get_job from an event loop (a private copy, taken only of the caller's own job)."""
        def own_copy(job: Any) -> Job:
            copied: Job = copy.deepcopy(self._owned_job(user_id, job))
            return copied

        return await self.executor.read_async(job_id, own_copy)

    # -- rules ---------------------------------------------------------------------------
    def create_rule(
        self, user_id: UUID, name: str, preset_id: str, concepts: Mapping[str, Mapping[str, Any]],
        protect: Sequence[str] = (), rule_id: UUID | None = None,
    ) -> Committed[UUID]:
        """Take a rule slot and create the rule, atomically (a chosen ``rule_id``: as for jobs)."""
        return self.executor.execute(self.create_rule_command(user_id, name, preset_id, concepts, protect, rule_id))

    def create_rule_command(
        self, user_id: UUID, name: str, preset_id: str, concepts: Mapping[str, Mapping[str, Any]],
        protect: Sequence[str] = (), rule_id: UUID | None = None,
    ) -> Command[UUID]:
        return self._create_rule_command(user_id, name, preset_id, concepts, protect, rule_id, _id_of)

    def create_rule_returning_command(
        self, user_id: UUID, name: str, preset_id: str, concepts: Mapping[str, Mapping[str, Any]],
        protect: Sequence[str] = (), rule_id: UUID | None = None,
    ) -> Command[Rule]:
        """create_rule_command returning a copy of the rule as the command left it (a keyed retry's:
        as ``_as_created`` accepted it, version 1 unchanged): read again afterwards, another
        device's write landing in between would be answered instead (a deletion's 404 for a saved
        creation)."""
        return self._create_rule_command(user_id, name, preset_id, concepts, protect, rule_id, copy.deepcopy)

    def _create_rule_command(
        self, user_id: UUID, name: str, preset_id: str, concepts: Mapping[str, Mapping[str, Any]],
        protect: Sequence[str], rule_id: UUID | None, answer: Callable[[Rule], T],
    ) -> Command[T]:
        edits, protected = normalise_edits(preset_id, concepts, protect)
        check_rule_name(name)
        sealed = self.sealer.seal(user_id, RULE_NAME_FIELD, name)

        def create(uow: UnitOfWork, user: User, new_id: UUID, at: datetime) -> None:
            rule = Rule.create(new_id, user_id, sealed, preset_id, edits, protected, at)
            user.take_rule_slot(new_id, self._plan(user.plan), at)
            uow.add(rule)

        def same(rule: Rule) -> bool:  # a rule changed since is refused by _as_created, whatever was asked
            return rule.version > 1 or (rule.preset_id, rule.concepts, rule.protect, self.rule_name(rule.name)) == (
                preset_id, edits, protected, name)

        return self._create_owned_answer_command(user_id, Rule, rule_id, create, answer, same=same)

    def update_rule(
        self, user_id: UUID, rule_id: UUID, name: str, concepts: Mapping[str, Mapping[str, Any]],
        protect: Sequence[str] = (), expected_versions: AbstractSet[int] | None = None,
    ) -> Committed[Rule]:
        return self.executor.execute(self.update_rule_command(user_id, rule_id, name, concepts, protect,
                                                              expected_versions))

    def update_rule_command(
        self, user_id: UUID, rule_id: UUID, name: str, concepts: Mapping[str, Mapping[str, Any]],
        protect: Sequence[str] = (), expected_versions: AbstractSet[int] | None = None,
    ) -> Command[Rule]:
        """``expected_versions`` (an If-Match; None: none) is checked against the rule as this
        command loads it, each time it is decided (a retry after a conflict loads it again): a
        rule at another version is PreconditionFailed, unless it already is what was asked (the
        retry of an edit whose answer was lost; RFC 9110 13.1.1 allows a 2xx for it). Returns a
        copy of the rule as this command left it: read again afterwards, another device's write
        landing in between would be answered instead (a deletion's 404 for a saved edit)."""
        sealed = self.sealer.seal(user_id, RULE_NAME_FIELD, name)
        at = self.clock.now()

        @touches(rule_id, user_id)
        def command(uow: UnitOfWork) -> Rule:
            self._user(uow, user_id)  # NotFound once erased, whatever this process still caches
            rule = self._own_rule(uow, user_id, rule_id)
            if name != self.rule_name(rule.name):  # a name kept is no rename, whenever it was stored
                check_rule_name(name)  # after the rule is found: another user's rule is a 404 whatever the input
            edits, protected = normalise_edits(rule.preset_id, concepts, protect)  # the rule's preset's concepts
            if not _version_matches(rule, expected_versions):
                if (rule.concepts, rule.protect, self.rule_name(rule.name)) == (edits, protected, name):
                    return copy.deepcopy(rule)  # already as asked: nothing to write
                raise _stale(rule)
            rule.update(sealed, edits, protected, at)
            return copy.deepcopy(rule)  # the writer's own object changes with the next batch

        return command

    def delete_rule(self, user_id: UUID, rule_id: UUID,
                    expected_versions: AbstractSet[int] | None = None) -> Committed[None]:
        """Delete the rule and free its slot, atomically."""
        return self.executor.execute(self.delete_rule_command(user_id, rule_id, expected_versions))

    def delete_rule_command(self, user_id: UUID, rule_id: UUID,
                            expected_versions: AbstractSet[int] | None = None) -> Command[None]:
        """``expected_versions`` as for ``update_rule_command`` (a rule deleted already is a 404)."""
        at = self.clock.now()

        @touches(rule_id, user_id)
        def command(uow: UnitOfWork) -> None:
            rule = self._own_rule(uow, user_id, rule_id)
            user = self._user(uow, user_id)  # UserNotFound once erased: before anything is recorded
            if not _version_matches(rule, expected_versions):
                raise _stale(rule)
            rule.delete(at)
            user.free_rule_slot(rule_id, at)

        return command

    def rule_name(self, name: str) -> str:
        """A rule's name as the client gave it (stored sealed; "erased" once its user is)."""
        return self.sealer.open(RULE_NAME_FIELD, name)

    async def keys_ready(self, user_id: UUID) -> None:
        """Make sealing for ``user_id`` need no I/O (call from an event loop before a command
        that seals)."""
        if not self.sealer.has_key(user_id):
            await anyio.to_thread.run_sync(self.sealer.prepare, user_id)

    def get_rule(self, user_id: UUID, rule_id: UUID) -> Rule:
        return self._owned_rule(user_id, self.executor.read(rule_id))

    # -- helpers -------------------------------------------------------------------------
    def _plan(self, name: str) -> Plan:
        try:
            return self.plans[name]
        except KeyError:
            raise ValidationFailed(f"unknown plan {name!r}; choose one of {sorted(self.plans)}") from None

    def _create_owned_command(self, user_id: UUID, cls: type[Any], chosen_id: UUID | None,
                              create: Callable[[UnitOfWork, User, UUID, datetime], None],
                              also: Sequence[UUID] = (),
                              same: Callable[[Any], bool] | None = None) -> Command[UUID]:
        """The command creating an aggregate the user owns, with what it takes from the User (and
        from the aggregates ``also`` names). A caller-chosen id makes the retry of a creation that
        did commit a no-op while what it made is as it left it (``_as_created``); one that asked for
        another creation (``same`` says it did not ask for what was created) is refused, as a key
        reused with another request is. Returns the aggregate's id."""
        return self._create_owned_answer_command(user_id, cls, chosen_id, create, _id_of, also, same)

    def _create_owned_answer_command(self, user_id: UUID, cls: type[Any], chosen_id: UUID | None,
                                     create: Callable[[UnitOfWork, User, UUID, datetime], None],
                                     answer: Callable[[Any], T], also: Sequence[UUID] = (),
                                     same: Callable[[Any], bool] | None = None) -> Command[T]:
        """_create_owned_command returning ``answer`` of the aggregate as the command left it."""
        new_id = chosen_id or self.ids.new_id()
        at = self.clock.now()

        @touches(user_id, *also, *((new_id,) if chosen_id is not None else ()))
        def command(uow: UnitOfWork) -> T:
            created = self._created_before(uow, cls, new_id, user_id) if chosen_id is not None else None
            if created is not None:
                if same is not None and not same(created):
                    raise ValidationFailed("Idempotency-Key reused with a different request")
                self._as_created(created, at)
                return answer(created)
            create(uow, self._user(uow, user_id), new_id, at)
            return answer(uow.get(cls, new_id))  # what create added

        return command

    @staticmethod
    def _created_before(uow: UnitOfWork, cls: type[Any], aggregate_id: UUID, user_id: UUID) -> Any:
        """What a creation under this id made before, if one did (for this user; another's is a
        404)."""
        existing = uow.get(cls, aggregate_id)
        if existing is not None and existing.user_id != user_id:
            raise NotFound(f"{cls.__name__.lower()} not found")
        return existing

    @staticmethod
    def _as_created(created: Job | Rule, at: datetime) -> None:
        """A creation retried after its key's answer was forgotten hands the aggregate back only
        while it is as the creation left it: not deleted, a rule not changed since, and a job still
        waiting for its photos and created at most REISSUE_S ago (the answer hands out upload links
        again, and every link of a job must have expired URL_TTL_S + REISSUE_S after its creation,
        when the sweeper deletes what they admitted beyond the largest photo). Else InvalidState: a
        new key creates another."""
        what = type(created).__name__.lower()
        if created.deleted:
            raise InvalidState(f"the {what} this Idempotency-Key created is deleted: use a new key to create another")
        if isinstance(created, Rule) and created.version > 1:
            raise InvalidState("the rule this Idempotency-Key created was changed since: "
                               "use a new key to create another")
        if isinstance(created, Job) and created.status != JobStatus.CREATED:
            raise InvalidState(f"the job this Idempotency-Key created is {created.status}: "
                               "use a new key to create another")
        if isinstance(created, Job) and at - created.created_on > timedelta(seconds=REISSUE_S):
            raise InvalidState(f"the job this Idempotency-Key created is over {REISSUE_S // 60} minutes old and its "
                               "upload links no longer work: cancel it, and use a new key to create another")

    @staticmethod
    def _user(uow: UnitOfWork, user_id: UUID) -> User:
        user = uow.get(User, user_id)
        if user is None or user.erased:
            raise UserNotFound(user_id)
        return user

    @classmethod
    def _own_job(cls, uow: UnitOfWork, user_id: UUID, job_id: UUID) -> Job:
        return cls._owned_job(user_id, uow.get(Job, job_id))

    @classmethod
    def _own_rule(cls, uow: UnitOfWork, user_id: UUID, rule_id: UUID) -> Rule:
        return cls._owned_rule(user_id, uow.get(Rule, rule_id))

    @staticmethod
    def _owned_rule(user_id: UUID, rule: Any) -> Rule:
        """``rule`` when it is the caller's (NotFound: no rule, another user's, or deleted)."""
        if not isinstance(rule, Rule) or rule.user_id != user_id or rule.deleted:
            raise NotFound("rule not found")
        return rule


def _input_keys(user_id: UUID, job_id: UUID, item_count: int) -> list[str]:
    return [input_key(user_id, job_id, i) for i in range(item_count)]


def _too_large_inputs(keys: list[str], sizes: Mapping[str, int]) -> list[str]:
    """The inputs over MAX_INPUT_BYTES, once every one of ``keys`` is in the store (``sizes``:
    those that are), else InputsMissing naming the items not uploaded."""
    missing = [i for i, k in enumerate(keys) if k not in sizes]
    if missing:
        raise InputsMissing(missing)
    return [k for k in keys if sizes[k] > MAX_INPUT_BYTES]
