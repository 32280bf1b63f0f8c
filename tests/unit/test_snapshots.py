"""Snapshots of the streams that grow without end (users', rules'): the group committer takes one
each time a save reaches a multiple of the interval, and a load from the newest one is the stream
folded whole. The oracle folds every stored event from the first, without the snapshot store."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import Future
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.domain import Aggregate, Snapshot
from eventsourcing.persistence import StoredEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from application.executors import GroupCommitter, RecorderStreamLoader, snapshot_recorder
from application.services import PaletteApplication, PaletteService
from application.snapshots import SNAPSHOT_EVERY, SetAsList, StreamSnapshot
from application.unit_of_work import Committed
from domain.contracts.keys import input_key
from domain.errors import DomainError
from domain.job import Job
from domain.plans import DEFAULT_PLANS
from domain.rule import Rule
from domain.user import User
from tests.bench.cold_load import grant
from tests.keys import process_keys
from tests.simulation import Ids, StepClock, Uploads

EDITS = {"wall": {"action": "recolor", "value": "#aabbcc"}}


def _app() -> PaletteApplication:
    return PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})


def folded(app: PaletteApplication, stream_id: UUID, upto: int | None = None) -> Any:
    """The stream folded from its first stored event (up to version ``upto``)."""
    aggregate = None
    for stored in app.recorder.select_events(stream_id, lte=upto):
        aggregate = app.mapper.to_domain_event(stored).mutate(aggregate)
    return aggregate


def state(aggregate: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(aggregate).items() if k != "_pending_events"}


def cold_read(app: PaletteApplication, loader: Any, stream_id: UUID) -> Any:
    """The stream as a group committer that never saw it loads it (through ``loader``)."""
    cold = GroupCommitter(app, loader).start()
    try:
        return cold.read(stream_id)
    finally:
        cold.stop()


class CountingLoader(RecorderStreamLoader):
    """The generic loader, counting the events and snapshots it hands out."""

    def __init__(self, app: PaletteApplication) -> None:
        super().__init__(app.recorder, snapshot_recorder(app))
        self.events = self.snapshots_read = self.fallback_events = 0
        self._inside = False

    def since_snapshots(self, versions: Mapping[UUID, int]) -> tuple[list[StoredEvent], list[StoredEvent]]:
        self._inside = True
        try:
            snapshots, events = super().since_snapshots(versions)
        finally:
            self._inside = False
        self.snapshots_read += len(snapshots)
        self.events += len(events)
        return snapshots, events

    def newer_than(self, versions: Mapping[UUID, int]) -> list[StoredEvent]:
        events = super().newer_than(versions)
        if not self._inside:  # asked for on its own: the events behind an unreadable snapshot
            self.fallback_events += len(events)
        return events


def _running_job(svc: PaletteService, uploads: Uploads, user_id: UUID) -> UUID:
    """A one-item job executed: its credits reserved on the user."""
    job_id = svc.create_job(user_id, "interior", 1).value
    uploads.keys.add(input_key(user_id, job_id, 0))
    svc.confirm_upload(user_id, job_id)
    svc.execute_job(user_id, job_id, EDITS)
    return job_id


@given(every=st.integers(1, 6),
       ops=st.lists(st.tuples(st.sampled_from(["grant", "plan", "rule", "edit", "drop", "burst", "job", "cancel"]),
                              st.integers(0, 5)), min_size=1, max_size=30))
@settings(max_examples=60, deadline=None)
def test_a_stream_loaded_from_its_newest_snapshot_is_the_stream_folded_whole(every: int,
                                                                            ops: list[tuple[str, int]]) -> None:
    app = _app()
    committer = GroupCommitter(app, snapshot_every={User: every, Rule: every})
    uploads = Uploads()
    svc = PaletteService(app, committer, StepClock(), Ids(), store=uploads, **process_keys())
    users = [svc.register(f"device-{i}").value[0] for i in range(2)]
    rules: list[tuple[UUID, UUID]] = []
    created: list[UUID] = []
    running: list[tuple[UUID, UUID]] = []  # jobs holding their owner's credits
    for op, n in ops:
        user = users[n % 2]
        try:
            if op == "grant":
                svc.grant_credits(user, n + 1, "promo")
            elif op == "plan":
                svc.change_plan(user, ("free", "pro")[n % 2])
            elif op == "rule":
                rules.append((user, svc.create_rule(user, f"rule {n}", "interior", EDITS).value))
                created.append(rules[-1][1])
            elif op == "edit" and rules:
                owner, rule_id = rules[n % len(rules)]
                svc.update_rule(owner, rule_id, f"edit {n}", EDITS)
            elif op == "drop" and rules:
                owner, rule_id = rules.pop(n % len(rules))
                svc.delete_rule(owner, rule_id)
            elif op == "job":
                running.append((user, _running_job(svc, uploads, user)))
            elif op == "cancel" and running:
                svc.cancel_job(*running.pop(n % len(running)))  # settled: the reservation refunded
            elif op == "burst":  # queued together: saved in one batch, across several multiples
                futures: list[Future[Committed[Any]]] = [committer.submit(grant(user)) for _ in range(2 * n + 2)]
                for f in futures:
                    f.result()
        except DomainError:
            pass  # a full rule slot, a plan already held: nothing recorded
    committer.stop()
    assert app.snapshots is not None
    stored = 0
    for stream_id in users + created:
        whole = folded(app, stream_id)
        snaps = list(app.snapshots.get(stream_id))
        versions = [s.originator_version for s in snaps]
        assert versions == sorted(set(versions))
        for snap in snaps:  # each is the stream as it was at its version
            assert state(snap.mutate(None)) == state(folded(app, stream_id, upto=snap.originator_version))
        newest = versions[-1] if versions else 0
        # none missed: the newest was taken at or after the last multiple the stream reached
        assert newest >= whole.version // every * every
        loader = CountingLoader(app)
        assert state(cold_read(app, loader, stream_id)) == state(whole)
        # only what came after the snapshot, and its own event (which it is checked against)
        assert loader.events == whole.version - newest + (1 if snaps else 0)
        assert loader.snapshots_read == (1 if snaps else 0) and loader.fallback_events == 0  # read from it
        stored += len(snaps)
    assert committer.snapshots_taken == stored  # none failed


def test_a_snapshot_is_taken_only_when_a_save_reaches_a_multiple_and_jobs_get_none() -> None:
    app = _app()
    committer = GroupCommitter(app, snapshot_every={User: 4})
    svc = PaletteService(app, committer, StepClock(), Ids(), **process_keys())
    user_id, _ = svc.register("device").value  # Registered and its free credits: version 2
    assert app.snapshots is not None
    for expected in ([], [], [4], [4], [4], [4], [4, 8]):
        committer.read(user_id)  # queued behind the last save: its snapshot, taken after it answered, is in
        assert [s.originator_version for s in app.snapshots.get(user_id)] == expected, folded(app, user_id).version
        svc.grant_credits(user_id, 1, "promo")
    job_id = svc.create_job(user_id, "interior", 3).value
    assert list(app.snapshots.get(job_id)) == []
    assert committer.snapshots_taken == 2
    committer.stop()


def test_the_application_snapshots_users_and_rules_only_by_default() -> None:
    app = _app()
    committer = GroupCommitter(app)
    assert dict(committer.snapshot_every) == {User: SNAPSHOT_EVERY, Rule: SNAPSHOT_EVERY}
    assert Job not in committer.snapshot_every
    committer.stop()
    # The repository (the dispatcher's job loads, replays as of a version, the naive path) folds
    # the stored events: no snapshot query before each load.
    assert app.snapshots is not None and app.repository.snapshot_store is None


def _user_at_version_5_snapshotted_at_4() -> tuple[PaletteApplication, UUID, StoredEvent]:
    """A user registered (2 events) and granted credits 3 times, a snapshot every 2 events: the
    store, the user and the newest stored snapshot."""
    app = _app()
    committer = GroupCommitter(app, snapshot_every={User: 2})
    svc = PaletteService(app, committer, StepClock(), Ids(), **process_keys())
    user_id, _ = svc.register("device").value
    for _ in range(3):
        svc.grant_credits(user_id, 1, "promo")
    committer.stop()
    assert app.snapshots is not None
    (newest,) = app.snapshots.recorder.select_events(user_id, desc=True, limit=1)
    assert (folded(app, user_id).version, newest.originator_version) == (5, 4)
    return app, user_id, newest


def test_an_unreadable_snapshot_is_passed_over_and_the_stream_read_whole(caplog: pytest.LogCaptureFixture) -> None:
    app, user_id, newest = _user_at_version_5_snapshotted_at_4()
    assert app.snapshots is not None
    damaged = StoredEvent(newest.originator_id, newest.originator_version + 1, newest.topic, b"{not json")
    app.snapshots.recorder.insert_events([damaged])
    loader = CountingLoader(app)
    with caplog.at_level(logging.WARNING, logger="application.executors"):
        loaded = cold_read(app, loader, user_id)
    assert state(loaded) == state(folded(app, user_id))
    assert loader.snapshots_read == 1 and loader.events == 1  # nothing past the damaged one: its event
    assert loader.fallback_events == folded(app, user_id).version  # so the whole stream
    assert "cannot be read" in caplog.text


def test_a_cached_stream_another_process_took_past_a_snapshot_is_brought_up_to_date_from_it() -> None:
    app = _app()
    loader = CountingLoader(app)
    here = GroupCommitter(app, loader, snapshot_every={User: 4}).start()
    elsewhere = GroupCommitter(app, snapshot_every={User: 4})
    svc_elsewhere = PaletteService(app, elsewhere, StepClock(), Ids(), **process_keys())
    user_id, _ = svc_elsewhere.register("device").value
    assert here.read(user_id) is not None  # cached here at version 2
    loader.events = loader.snapshots_read = 0
    for _ in range(9):  # 11 now, its newest snapshot at 8
        svc_elsewhere.grant_credits(user_id, 1, "promo")
    elsewhere.stop()
    assert state(here.read(user_id)) == state(folded(app, user_id))
    here.stop()
    assert (loader.snapshots_read, loader.events) == (1, 4)  # the snapshot's own event and 3 past it


def _kinds(aggregate: Aggregate) -> dict[str, str]:
    return {name: type(value).__name__ for name, value in Snapshot.take(aggregate).state.items()}


def test_what_a_snapshot_holds_is_pinned_to_the_class_version() -> None:
    """A snapshot is the aggregate's attributes. Changing them (a name, or the kind of a value) is
    a change of the stored format: bump the class's ``class_version``, give it ``upcast_vN_vM``
    for older snapshots, then pin the new attributes here."""
    app = _app()
    svc = PaletteService(app, GroupCommitter(app), StepClock(), Ids(), **process_keys())
    user_id, _ = svc.register("device").value
    rule_id = svc.create_rule(user_id, "walls", "interior", EDITS).value
    user, rule = svc.executor.read(user_id), svc.executor.read(rule_id)
    assert isinstance(user, User) and isinstance(rule, Rule)
    assert getattr(User, "class_version", 1) == 2
    assert _kinds(user) == {"_created_on": "datetime", "_modified_on": "datetime", "plan": "str", "balance": "int",
                            "granted": "int", "spent": "int", "reservations": "dict", "rule_ids": "set",
                            "grant_ids": "set", "erased": "bool", "class_version": "int"}
    assert getattr(Rule, "class_version", 1) == 1
    assert _kinds(rule) == {"_created_on": "datetime", "_modified_on": "datetime", "user_id": "UUID", "name": "str",
                            "preset_id": "str", "concepts": "dict", "protect": "list", "deleted": "bool"}


def test_a_users_v1_snapshot_reads_back_with_no_grant_ids_and_a_grant_id_is_kept_from_then_on() -> None:
    """User v1's snapshots were taken before grants had ids: upcast, they hold none."""
    app = _app()
    svc = PaletteService(app, GroupCommitter(app), StepClock(), Ids(), **process_keys())
    user_id, _ = svc.register("device").value
    user = svc.executor.read(user_id)
    v1 = StreamSnapshot.take(user)
    del v1.state["grant_ids"]
    v1.state["class_version"] = 1
    restored = app.mapper.to_domain_event(app.mapper.to_stored_event(v1)).mutate(None)
    assert restored.grant_ids == set() and state(restored) == state(user)
    grant_id = uuid4()
    assert restored.grant(5, "goodwill", StepClock().now(), grant_id) is True
    assert restored.grant(5, "goodwill", StepClock().now(), grant_id) is False
    assert restored.grant_ids == {grant_id} and restored.balance == user.balance + 5


def test_a_users_reservations_keyed_by_job_go_through_the_store_as_they_were() -> None:
    """JSON's keys are strings only: a dictionary keyed by job ids goes as a list of pairs."""
    app = _app()
    uploads = Uploads()
    svc = PaletteService(app, GroupCommitter(app), StepClock(), Ids(), store=uploads, **process_keys())
    user_id, _ = svc.register("device").value
    svc.change_plan(user_id, "pro")
    jobs = [_running_job(svc, uploads, user_id) for _ in range(3)]
    user = svc.executor.read(user_id)
    assert isinstance(user, User) and set(user.reservations) == set(jobs)
    stored = app.mapper.to_stored_event(StreamSnapshot.take(user))
    restored = app.mapper.to_domain_event(stored).mutate(None)
    assert state(restored) == state(user)
    assert all(isinstance(k, UUID) for k in restored.reservations)


@given(st.sets(st.uuids(), max_size=20))
def test_a_set_goes_through_the_store_as_it_was(members: set[UUID]) -> None:
    transcoder = _app().mapper.transcoder
    assert transcoder.decode(transcoder.encode({"ids": members})) == {"ids": members}
    assert SetAsList().encode(members) == sorted(members, key=str)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.uuids(),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5) | st.uuids() | st.integers() | st.just("_pairs_"),
                                      inner, max_size=3),
                    max_leaves=12))
def test_any_attribute_of_plain_values_and_dictionaries_goes_through_a_snapshot_as_it_was(value: Any) -> None:
    """Dictionaries keyed by UUIDs or numbers at any depth, and one whose only key is the pair
    form's own marker, come back as they were."""
    app = _app()
    user = User.register("hmac-sha256:00", DEFAULT_PLANS["free"], StepClock().now())
    user.anything = value
    stored = app.mapper.to_stored_event(StreamSnapshot.take(user))
    assert app.mapper.to_domain_event(stored).mutate(None).anything == value


def test_a_snapshot_past_the_streams_last_event_is_passed_over() -> None:
    """A store restored behind its snapshots: the stream's events end before its newest snapshot."""
    app, user_id, newest = _user_at_version_5_snapshotted_at_4()
    assert app.snapshots is not None
    ahead = StoredEvent(newest.originator_id, 50, newest.topic, newest.state)  # no event 50
    app.snapshots.recorder.insert_events([ahead])
    loader = CountingLoader(app)
    assert state(cold_read(app, loader, user_id)) == state(folded(app, user_id))
    assert (loader.snapshots_read, loader.events) == (1, folded(app, user_id).version - newest.originator_version + 1)


def test_a_snapshot_from_a_later_class_version_is_passed_over_and_the_stream_read_whole(
        caplog: pytest.LogCaptureFixture) -> None:
    """Code rolled back after a release that gave User its next class_version (``balance``
    renamed, say) and took snapshots: this code has no downcast, so it cannot read them as its own."""
    app, user_id, _ = _user_at_version_5_snapshotted_at_4()
    assert app.snapshots is not None
    user = folded(app, user_id)
    later = StreamSnapshot.take(user)
    later.state["credits"] = later.state.pop("balance")
    later.state["class_version"] = User.class_version + 1
    stored = app.mapper.to_stored_event(later)
    assert stored.originator_version == 5  # the stream has its event: a load may start from it
    app.snapshots.recorder.insert_events([stored])
    loader = CountingLoader(app)
    with caplog.at_level(logging.WARNING, logger="application.executors"):
        loaded = cold_read(app, loader, user_id)
    assert state(loaded) == state(user)
    assert loader.fallback_events == user.version  # the whole stream
    assert f"class version {User.class_version + 1}" in caplog.text


def test_a_snapshot_of_a_history_a_restore_undid_is_passed_over_once_the_stream_regrows_to_its_version() -> None:
    """A store restored behind its snapshots: the stream, back at version 2, is written again up
    to the snapshot's version 4. The snapshot is of the history the restore undid (three grants of
    1, not two of 7): a load must not start from it."""
    lost_app, lost_user, lost_snapshot = _user_at_version_5_snapshotted_at_4()
    app, clock = _app(), StepClock()
    clock.t += timedelta(days=1)  # written again later than the history the restore undid
    committer = GroupCommitter(app, snapshot_every={})
    svc = PaletteService(app, committer, clock, Ids(), **process_keys())
    user_id, _ = svc.register("device").value
    assert app.snapshots is not None
    app.snapshots.recorder.insert_events([StoredEvent(user_id, 4, lost_snapshot.topic, lost_snapshot.state)])
    for _ in range(2):
        svc.grant_credits(user_id, 7, "promo")
    committer.stop()
    whole = folded(app, user_id)
    assert whole.version == 4 and whole.balance != folded(lost_app, lost_user).balance
    loader = CountingLoader(app)
    assert state(cold_read(app, loader, user_id)) == state(whole)
