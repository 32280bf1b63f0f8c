"""Analysts and auditors: replay folds to the live aggregate, as-of matches the events before
that time, any edited/deleted/inserted ledger row breaks verify at that row, and reconcile
catches a projection changed behind its back.

The expected states are folded here the plain way (``_expected``): not by the domain's ``apply``
(which replay uses) nor by the projections' folds, so a wrong fold cannot agree with itself."""

from __future__ import annotations

import contextlib
import json
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.rows import dict_row

from adapters.bootstrap import event_store_env
from adapters.pg_streams import pg_stream_loader
from adapters.system import RandomIds, SystemClock
from application.executors import DirectExecutor, GroupCommitter
from application.services import PaletteApplication, PaletteService
from domain.contracts.envelope import encode
from projections import audit
from projections.log import events_table
from projections.models.billing_events import ledger_hash
from projections.replay import Replayer
from tests.keys import process_keys

from .test_projections import drained, service, wait_drained, workload  # noqa: F401 - shared module fixture
from .test_stack import wait_until


@pytest.fixture(scope="module")
def history(apps, service) -> Replayer:  # noqa: F811
    workload(service, 6, random.Random(21))
    return Replayer(service.app)


@pytest.fixture
def tx(settings) -> Iterator[psycopg.Connection[Any]]:
    """A connection whose changes are rolled back: tampering never outlives the test."""
    with psycopg.connect(settings.effective_database_url) as conn:
        yield conn
        conn.rollback()


def _streams(replayer: Replayer) -> list[Any]:
    return sorted({e.stream_id for e in replayer.all()})


def _expected(events: list[Any]) -> dict[str, Any]:
    """A stream's state from its events' data, by plain arithmetic (what domain/*.py mean)."""
    kind = events[0].stream_type
    s: dict[str, Any]
    if kind == "User":
        s = {"plan": None, "balance": 0, "granted": 0, "spent": 0, "reservations": {}, "rule_ids": set()}
        for e in events:
            d = e.data
            if e.type in ("Registered", "PlanChanged"):
                s["plan"] = d["plan"]
            elif e.type == "CreditsGranted":
                s["balance"] += d["amount"]
                s["granted"] += d["amount"]
            elif e.type == "CreditsReserved":
                s["balance"] -= d["amount"]
                s["reservations"][str(d["job_id"])] = d["amount"]
            elif e.type == "CreditsSettled":
                assert s["reservations"].pop(str(d["job_id"])) == d["spent"] + d["refunded"]
                s["spent"] += d["spent"]
                s["balance"] += d["refunded"]
            elif e.type == "RuleSlotTaken":
                s["rule_ids"].add(str(d["rule_id"]))
            elif e.type == "RuleSlotFreed":
                s["rule_ids"].discard(str(d["rule_id"]))
        s["rule_ids"] = sorted(s["rule_ids"])
        return s
    if kind == "Job":
        s = {"status": "created", "items": {}, "done_items": 0, "failed_items": 0}
        statuses = {"UploadConfirmed": "uploaded", "JobQueued": "queued", "JobStarted": "running",
                    "JobCanceled": "canceled"}
        for e in events:
            d = e.data
            if e.type == "JobCreated":
                s.update(user_id=str(d["user_id"]), item_count=d["item_count"])
            elif e.type in statuses:
                s["status"] = statuses[e.type]
            elif e.type == "JobFinished":
                s["status"] = d["status"]
            elif e.type == "ItemCompleted":
                s["items"][d["idx"]] = d["status"]
                s["done_items" if d["status"] == "done" else "failed_items"] += 1
        return s
    s = {"deleted": False}
    for e in events:
        if e.type in ("RuleCreated", "RuleUpdated"):
            s["name"] = e.data["name"]
        elif e.type == "RuleDeleted":
            s["deleted"] = True
    return s


def _observed(replayed: dict[str, Any]) -> dict[str, Any]:
    """The same fields out of a replayed (or live) state, in the same plain shapes."""
    state = replayed["state"]
    if replayed["stream_type"] == "User":
        return {"plan": state["plan"], "balance": state["balance"], "granted": state["granted"],
                "spent": state["spent"],
                "reservations": {str(k): v for k, v in state["reservations"].items()},
                "rule_ids": sorted(str(r) for r in state["rule_ids"])}
    if replayed["stream_type"] == "Job":
        return {"status": state["status"], "items": {int(k): v["status"] for k, v in state["items"].items()},
                "done_items": state["done_items"], "failed_items": state["failed_items"],
                "user_id": str(state["user_id"]), "item_count": state["item_count"]}
    return {"deleted": state["deleted"], "name": state["name"]}


def test_replaying_a_stream_folds_to_the_live_aggregate(history, service):  # noqa: F811
    kinds = set()
    for stream_id in _streams(history):
        live = service.app.repository.get(stream_id)
        replayed = history.state(stream_id, version=live.version)
        events = list(history.stream(stream_id))
        assert [e.version for e in events] == list(range(1, live.version + 1))
        assert replayed["state"]["version"] == live.version
        assert replayed == history.state(stream_id, as_of=events[-1].timestamp)
        # the state, not only the version: balances, reservations, statuses, items
        assert _observed(replayed) == _expected(events), stream_id
        kinds.add(replayed["stream_type"])
        if replayed["stream_type"] == "User":
            assert (live.balance, live.granted, live.spent) == tuple(
                _expected(events)[k] for k in ("balance", "granted", "spent"))
        elif replayed["stream_type"] == "Job":
            assert live.status.value == _expected(events)["status"]
    assert kinds == {"User", "Job", "Rule"}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_as_of_equals_the_fold_of_the_events_before_that_time(history, service, data):  # noqa: F811
    stream_id = data.draw(st.sampled_from(_streams(history)))
    events = list(service.app.events.get(stream_id))
    cut = data.draw(st.integers(0, len(events) - 1))
    as_of = events[cut].timestamp
    aggregate = None
    for event in events:
        if event.timestamp <= as_of:
            aggregate = event.mutate(aggregate)
    assert aggregate is not None
    replayed = history.state(stream_id, as_of=as_of)
    assert replayed["version"] == aggregate.version
    before = [e for e in history.stream(stream_id) if e.timestamp <= as_of]
    assert _observed(replayed) == _expected(before)  # the state then, not only its version


def test_replay_all_filters_by_type_and_time(history):
    everything = list(history.all())
    grants = list(history.all(types=["CreditsGranted"]))
    assert grants and all(e.type == "CreditsGranted" for e in grants)
    assert [e.id for e in everything] == sorted(e.id for e in everything)
    middle = everything[len(everything) // 2].timestamp
    later = list(history.all(since=middle))
    assert later and all(e.timestamp >= middle for e in later)
    assert {e.id for e in later} == {e.id for e in everything if e.timestamp >= middle}
    earlier = list(history.all(until=middle))  # the bound is inclusive: the event at ``middle`` is in
    assert {e.id for e in earlier} == {e.id for e in everything if e.timestamp <= middle}
    start = everything[len(everything) // 2].id  # a start position and a time together: both hold
    both = list(history.all(start=start, since=everything[0].timestamp))
    assert [e.id for e in both] == [e.id for e in everything if e.id >= start]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), mode=st.sampled_from(["edit", "rehash", "delete", "insert"]))
def test_tampering_with_any_ledger_row_breaks_verify_at_that_row(history, service, settings, data, mode):  # noqa: F811
    """``rehash``: the row edited and its own hash made anew (the hash function is no secret), so
    only the next row's ``prev_hash``, or for the chain's last row its recorded head, can tell."""
    with psycopg.connect(settings.effective_database_url, autocommit=True) as probe:
        wait_until(lambda: drained(service, probe), timeout_s=60, what="projections to drain")
    with psycopg.connect(settings.effective_database_url) as conn:
        rows = conn.execute("SELECT id, user_id, seq FROM palette_read.billing_events ORDER BY position, id").fetchall()
        target_id, user_id, seq = data.draw(st.sampled_from(rows))
        at_seq = seq
        if mode == "edit":
            conn.execute("UPDATE palette_read.billing_events SET amount = amount + 1 WHERE id = %s", [target_id])
        elif mode == "rehash":
            with conn.cursor(row_factory=dict_row) as cur:
                row = cur.execute("SELECT * FROM palette_read.billing_events WHERE id = %s", [target_id]).fetchone()
            assert row is not None
            row["amount"] += 1
            conn.execute("UPDATE palette_read.billing_events SET amount = %s, hash = %s WHERE id = %s",
                         [row["amount"], ledger_hash(row["prev_hash"], row), target_id])
            after = conn.execute("SELECT count(*) FROM palette_read.billing_events WHERE user_id = %s AND seq > %s",
                                 [user_id, seq]).fetchone()
            at_seq = seq + 1 if after and after[0] else seq  # the next row, or the head, disagrees
        elif mode == "delete":
            conn.execute("DELETE FROM palette_read.billing_events WHERE id = %s", [target_id])
        else:  # a forged row slipped in at this seq, the rest shifted up
            conn.execute("UPDATE palette_read.billing_events SET seq = seq + 1000 WHERE user_id = %s AND seq >= %s",
                         [user_id, seq])
            conn.execute("UPDATE palette_read.billing_events SET seq = seq - 999 WHERE user_id = %s AND seq >= %s",
                         [user_id, seq + 1000])
            conn.execute("INSERT INTO palette_read.billing_events SELECT 'forged', user_id, %s, 'grant', 100, 100, "
                         "'x', occurred_at, position, prev_hash, hash FROM palette_read.billing_events WHERE id = %s",
                         [seq, target_id])
        breaks = audit.verify(conn).breaks
        conn.rollback()
    assert [b.user_id for b in breaks] == [str(user_id)]
    assert breaks[0].seq == at_seq


def test_reconcile_is_clean_then_catches_a_row_changed_behind_its_back(history, service, settings, tx):  # noqa: F811
    with psycopg.connect(settings.effective_database_url, autocommit=True) as probe:
        wait_until(lambda: drained(service, probe), timeout_s=60, what="projections to drain")
    clean = audit.reconcile(tx, service.app.recorder, service.app.mapper.transcoder)
    assert clean.ok, clean.differences
    tx.execute("UPDATE palette_read.users SET credits = credits + 7 WHERE id = "
               "(SELECT id FROM palette_read.users ORDER BY id LIMIT 1)")
    tx.execute("UPDATE palette_read.billing_events SET amount = 1 WHERE id = "
               "(SELECT id FROM palette_read.billing_events WHERE type = 'grant' ORDER BY position LIMIT 1)")
    # another user's held and spent credits moved, its spendable credits left alone: only the
    # users row against the log's fold can see it (no balance differs)
    (moved,) = tx.execute("SELECT id FROM palette_read.users ORDER BY id OFFSET 1 LIMIT 1").fetchone() or (None,)
    tx.execute("UPDATE palette_read.users SET reserved = reserved + 2, spent = spent + 5 WHERE id = %s", [moved])
    dirty = audit.reconcile(tx, service.app.recorder, service.app.mapper.transcoder)
    assert not dirty.ok
    assert any("projection has (credits" in d for d in dirty.differences)
    assert any(d.startswith(f"user {moved}: projection has (credits, reserved, spent)") for d in dirty.differences), \
        dirty.differences
    assert any(d.startswith("in the projection but not in the log") for d in dirty.differences)
    # the users' credits against the User aggregate; the grant's amount changed, not its balance_delta
    (changed,) = tx.execute("SELECT id FROM palette_read.users ORDER BY id LIMIT 1").fetchone() or (None,)
    assert [(m.table, m.user_id, m.projected - m.aggregate) for m in dirty.balance_mismatches] == [
        ("users", str(changed), 7)]
    assert dirty.balance_mismatches[0].aggregate == service.app.repository.get(changed).balance


def test_reconcile_catches_a_ledger_sum_that_is_not_the_user_aggregate_balance(history, service, settings,  # noqa: F811
                                                                                tx):
    """Σ balance_delta per user is checked against the User aggregate's balance (folded from the
    stored events apart from the ledger's fold): an altered and a deleted ledger row each show."""
    with psycopg.connect(settings.effective_database_url, autocommit=True) as probe:
        wait_until(lambda: drained(service, probe), timeout_s=60, what="projections to drain")
    clean = audit.reconcile(tx, service.app.recorder, service.app.mapper.transcoder)
    assert clean.ok and clean.balance_mismatches == [], clean.differences
    (altered, altered_user, _), (deleted, deleted_user, deleted_delta) = tx.execute(
        "SELECT DISTINCT ON (user_id) id, user_id, balance_delta FROM palette_read.billing_events "
        "WHERE balance_delta <> 0 ORDER BY user_id, seq LIMIT 2").fetchall()
    tx.execute("UPDATE palette_read.billing_events SET balance_delta = balance_delta + 3 WHERE id = %s", [altered])
    tx.execute("DELETE FROM palette_read.billing_events WHERE id = %s", [deleted])
    dirty = audit.reconcile(tx, service.app.recorder, service.app.mapper.transcoder)
    assert not dirty.ok
    found = {m.user_id: m for m in dirty.balance_mismatches}
    assert set(found) == {str(altered_user), str(deleted_user)}
    for user_id, shift in ((altered_user, 3), (deleted_user, -deleted_delta)):
        user = service.app.repository.get(user_id)  # the domain's own fold of the same events
        m = found[str(user_id)]
        assert (m.table, m.aggregate, m.projected, m.version) == (
            "billing_events", user.balance, user.balance + shift, user.version)
        assert any(d.startswith(f"user {user_id}: billing_events") for d in dirty.differences)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_the_ledger_balance_as_of_a_time_is_the_users_events_until_then(history, service, settings, data):  # noqa: F811
    """audit.balance_as_of (Σ over billing_events) against the user's events up to that time."""
    user_id = data.draw(st.sampled_from(sorted({e.stream_id for e in history.all(types=["Registered"])})))
    events = list(history.stream(user_id))
    as_of = events[data.draw(st.integers(0, len(events) - 1))].timestamp
    before = [e for e in events if e.timestamp <= as_of]
    want = _expected(before)
    entries = sum(1 for e in before if e.type in ("CreditsGranted", "CreditsReserved")) + sum(
        bool(e.data["spent"]) + bool(e.data["refunded"]) for e in before if e.type == "CreditsSettled")
    positions = [e.id for e in before if e.type in ("CreditsGranted", "CreditsReserved") or (
        e.type == "CreditsSettled" and (e.data["spent"] or e.data["refunded"]))]
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        wait_until(lambda: drained(service, conn), timeout_s=60, what="projections to drain")
        got = audit.balance_as_of(conn, user_id, as_of)
    assert (got["balance"], got["granted"], got["reserved"], got["spent"], got["entries"]) == (
        want["balance"], want["granted"], sum(want["reservations"].values()), want["spent"], entries)
    assert got["positions"] == {"first": min(positions, default=None), "last": max(positions, default=None)}


def test_a_balance_is_refused_only_where_the_ledger_cannot_answer_for_the_user(history, tx):  # its read model made
    """known_balance_as_of against the users model and the ledger as they stand: a user neither
    holds, or one whose credits the users model has seen while the ledger holds no entry of it (the
    ledger behind), is a LookupError; a user that never had credits (an erased device's next
    user) is zeros."""
    at = datetime.now(UTC)
    nobody, fresh, behind = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for user_id, granted in ((fresh, 0), (behind, 50)):
        tx.execute("INSERT INTO palette_read.users (id, plan, credits, reserved, spent, granted, device_hash, "
                   "created_at, updated_at) VALUES (%s, 'free', %s, 0, 0, %s, NULL, %s, %s)",
                   [user_id, granted, granted, at, at])
    for user_id in (nobody, behind):
        with pytest.raises(LookupError, match=str(user_id)):
            audit.known_balance_as_of(tx, user_id, at)
    got = audit.known_balance_as_of(tx, fresh, at)
    assert (got["balance"], got["granted"], got["entries"]) == (0, 0, 0)
    # The user every balance asked for is: credits seen by the users model, and a ledger entry of
    # them (a check that looked at the users model alone refused it; found by mutation testing).
    # So is a user the ledger holds whom the users model has not projected yet.
    granted, unprojected = uuid.uuid4(), uuid.uuid4()
    tx.execute("INSERT INTO palette_read.users (id, plan, credits, reserved, spent, granted, device_hash, "
               "created_at, updated_at) VALUES (%s, 'free', 50, 0, 0, 50, NULL, %s, %s)", [granted, at, at])
    for user_id in (granted, unprojected):
        tx.execute("INSERT INTO palette_read.billing_events (id, user_id, seq, type, amount, balance_delta, ref, "
                   "occurred_at, position, prev_hash, hash) VALUES (%s, %s, 1, 'grant', 50, 50, 'signup', %s, "
                   "%s, '', '')", [f"test-{user_id}", user_id, at, 2**62])
        got = audit.known_balance_as_of(tx, user_id, at)
        assert (got["balance"], got["granted"], got["entries"]) == (50, 50, 1), user_id


def test_reconcile_on_a_live_system_reports_no_false_differences(apps, history, service, settings):  # noqa: F811
    """Commands keep landing (and the projector keeps folding) while reconcile reads: one snapshot
    of the projection, the log folded to the versions it tracked, so nothing differs."""
    import threading

    done = threading.Event()
    errors: list[BaseException] = []

    def load() -> None:  # a bounded workload, as long as the reconciliations last
        rng = random.Random(99)
        try:
            for _ in range(200):
                if done.is_set():
                    return
                workload(service, 1, rng)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            reports = []
            for _ in range(3):
                apps.supervisor.check()  # as `palette up` does: a crashed process comes back
                reports.append(audit.reconcile(conn, service.app.recorder, service.app.mapper.transcoder,
                                               wait_s=90))
    finally:
        done.set()
        loader.join()
    assert not errors, errors
    for report in reports:
        if not report.ok:  # what the projector said, to tell a slow projector from a wrong fold
            print("projector log:", (settings.data_dir / "logs" / "projector.log").read_text()[-3000:])
        assert report.ok, report.differences
    assert reports[-1].position > reports[0].position  # the log did move underneath


def _longest_chain(tx: psycopg.Connection[Any]) -> tuple[Any, int]:
    row = tx.execute("SELECT user_id, max(seq) FROM palette_read.billing_events GROUP BY user_id "
                     "ORDER BY max(seq) DESC, user_id LIMIT 1").fetchone()
    assert row is not None
    return row[0], row[1]


@pytest.mark.parametrize("mode", ["append", "rewrite"])
def test_a_chain_end_that_is_not_its_recorded_head_breaks_verify_however_well_it_hashes(
        history, service, settings, tx, mode):  # noqa: F811
    """A row appended after the head, or the last row rewritten (its hash recomputed), each
    hashing perfectly onto the chain before it: only the recorded head can tell."""
    wait_drained(service, settings)
    user_id, last = _longest_chain(tx)
    seq = last + 1 if mode == "append" else last
    prev, at, position = tx.execute("SELECT hash, occurred_at, position FROM palette_read.billing_events "
                                    "WHERE user_id = %s AND seq = %s", [user_id, seq - 1]).fetchone() or (None,) * 3
    row = {"user_id": user_id, "seq": seq, "type": "grant", "amount": 500, "balance_delta": 500, "ref": "forged",
           "occurred_at": at, "position": position}
    tx.execute("DELETE FROM palette_read.billing_events WHERE user_id = %s AND seq = %s", [user_id, seq])
    tx.execute("INSERT INTO palette_read.billing_events (id, user_id, seq, type, amount, balance_delta, ref, "
               "occurred_at, position, prev_hash, hash) VALUES ('forged', %s, %s, 'grant', 500, 500, 'forged', "
               "%s, %s, %s, %s)", [user_id, seq, at, position, prev, ledger_hash(prev, row)])
    breaks = audit.verify(tx).breaks
    assert [(b.user_id, b.seq) for b in breaks] == [(str(user_id), seq)]
    assert "does not hash to its recorded head" in breaks[0].reason


def test_a_chains_last_row_deleted_breaks_verify_at_that_seq_as_a_deletion(history, service, settings,  # noqa: F811
                                                                           tx):
    wait_drained(service, settings)
    user_id, last = _longest_chain(tx)
    tx.execute("DELETE FROM palette_read.billing_events WHERE user_id = %s AND seq = %s", [user_id, last])
    breaks = audit.verify(tx).breaks
    assert [(b.user_id, b.seq, b.position) for b in breaks] == [(str(user_id), last, None)]
    assert breaks[0].reason == (f"the chain ends at seq {last - 1}, before its recorded head (seq {last}): "
                                "its last rows were deleted")


def test_a_chain_whose_recorded_head_was_deleted_breaks_verify_at_its_end(history, service, settings,  # noqa: F811
                                                                          tx):
    """Its heads row deleted, a chain's last rows could go unseen: the end is named."""
    wait_drained(service, settings)
    user_id, last = _longest_chain(tx)
    tx.execute("DELETE FROM palette_read.billing_heads WHERE user_id = %s", [user_id])
    breaks = audit.verify(tx).breaks
    assert [(b.user_id, b.seq, b.position, b.reason) for b in breaks] == [
        (str(user_id), last + 1, None, "the chain has no recorded head")]


class _AppendsAfterTheHeads:
    """A connection that, once the chain heads are read on it, lets the projector's next append
    land (on another connection, committed) before anything else is read."""

    def __init__(self, conn: psycopg.Connection[Any], append: Any) -> None:
        object.__setattr__(self, "_conn", conn)
        object.__setattr__(self, "_append", append)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._conn, name, value)

    def execute(self, query: Any, *args: Any, **kw: Any) -> Any:
        cur = self._conn.execute(query, *args, **kw)
        self.read(query)
        return cur

    def cursor(self, *args: Any, **kw: Any) -> Any:
        return _Reading(self._conn.cursor(*args, **kw), self)

    def read(self, query: Any) -> None:
        if "billing_heads" in str(query) and self._append is not None:
            append, self.__dict__["_append"] = self._append, None
            append()


class _Reading:
    """A cursor of ``_AppendsAfterTheHeads``: its statements are watched as the connection's."""

    def __init__(self, cur: Any, conn: _AppendsAfterTheHeads) -> None:
        object.__setattr__(self, "_cur", cur)
        object.__setattr__(self, "_conn", conn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cur, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._cur, name, value)

    def __enter__(self) -> _Reading:
        self._cur.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cur.__exit__(*exc)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cur)

    def execute(self, query: Any, *args: Any, **kw: Any) -> Any:
        self._cur.execute(query, *args, **kw)
        self._conn.read(query)
        return self


def test_verify_on_a_live_system_reports_no_break_when_a_row_is_appended_while_it_reads(
        history, service, settings):  # noqa: F811
    """The projector appends a ledger row and moves its chain's head while verify reads (between
    the heads and the rows): read in one snapshot, the chain is whole, not "rewritten, or rows
    added" (an auditor's false alarm, exit 1, seen on a live stack)."""
    wait_drained(service, settings)
    url = settings.effective_database_url
    with psycopg.connect(url, autocommit=True) as other:
        user_id, last = _longest_chain(other)
        prev, at, position = other.execute("SELECT hash, occurred_at, position FROM palette_read.billing_events "
                                           "WHERE user_id = %s AND seq = %s", [user_id, last]).fetchone() or (None,) * 3
        head = other.execute("SELECT seq, last_hash FROM palette_read.billing_heads WHERE user_id = %s",
                             [user_id]).fetchone()
        row = {"user_id": user_id, "seq": last + 1, "type": "grant", "amount": 1, "balance_delta": 1,
               "ref": "live", "occurred_at": at, "position": position}
        digest = ledger_hash(prev, row)

        def append() -> None:  # as the projector does: the row and its head in one transaction
            with other.transaction():
                other.execute("INSERT INTO palette_read.billing_events (id, user_id, seq, type, amount, "
                              "balance_delta, ref, occurred_at, position, prev_hash, hash) VALUES ('live-append', "
                              "%s, %s, 'grant', 1, 1, 'live', %s, %s, %s, %s)",
                              [user_id, last + 1, at, position, prev, digest])
                other.execute("UPDATE palette_read.billing_heads SET seq = %s, last_hash = %s WHERE user_id = %s",
                              [last + 1, digest, user_id])

        try:
            with psycopg.connect(url, autocommit=True) as conn:
                breaks = audit.verify(_AppendsAfterTheHeads(conn, append)).breaks  # type: ignore[arg-type]
            assert breaks == []
            with psycopg.connect(url, autocommit=True) as conn:  # and afterwards, with the row
                assert audit.verify(conn).breaks == []
        finally:
            with other.transaction():
                other.execute("DELETE FROM palette_read.billing_events WHERE id = 'live-append'")
                other.execute("UPDATE palette_read.billing_heads SET seq = %s, last_hash = %s WHERE user_id = %s",
                              [head[0], head[1], user_id])


def test_a_chain_deleted_whole_breaks_verify_at_its_first_row(history, service, settings, tx):  # noqa: F811
    wait_drained(service, settings)
    user_id, _ = _longest_chain(tx)
    tx.execute("DELETE FROM palette_read.billing_events WHERE user_id = %s", [user_id])
    breaks = audit.verify(tx).breaks
    assert [(b.user_id, b.seq, b.reason) for b in breaks] == [(str(user_id), 1, "every row of this chain is missing")]


def test_reconcile_names_a_stream_the_ledger_has_not_folded_though_users_has(history, service, settings,  # noqa: F811
                                                                            tx):
    """The users model folded the stream's last event and billing_events did not: that is an
    unfolded stream (each model is checked, not either one)."""
    wait_drained(service, settings)
    user_id, _ = _longest_chain(tx)
    tx.execute("UPDATE palette_read.billing_events_tracking SET version = version - 1 WHERE stream_id = %s",
               [user_id])
    report = audit.reconcile(tx, service.app.recorder, service.app.mapper.transcoder, wait_s=0)
    assert any(d.startswith(f"user {user_id}: 1 event(s) at or before position") for d in report.differences), \
        report.differences


def test_reconcile_at_a_position_names_the_event_at_that_very_position_unfolded(history, service, settings,  # noqa: F811
                                                                              tx):
    """Reconcile ``at`` the position of a stream's last event, which billing_events has not folded:
    "at or before" includes that event."""
    wait_drained(service, settings)
    user_id, _ = _longest_chain(tx)
    last = list(history.stream(user_id))[-1]
    tx.execute("UPDATE palette_read.billing_events_tracking SET version = %s WHERE stream_id = %s",
               [last.version - 1, user_id])
    report = audit.reconcile(tx, service.app.recorder, service.app.mapper.transcoder, at=last.id, wait_s=0)
    assert report.position == last.id
    assert f"user {user_id}: 1 event(s) at or before position {last.id} not folded after 0 s" in report.differences, \
        report.differences


def test_reconcile_reports_the_first_findings_of_each_kind_and_counts_the_rest(history, service, settings,  # noqa: F811
                                                                               tx):
    """Every ledger row edited: each kind of finding is reported as its first ``limit`` (by
    position, then id) and a count of the rest, so the auditor's answer stays bounded."""
    wait_drained(service, settings)
    ids = [r[0] for r in tx.execute("UPDATE palette_read.billing_events SET ref = ref || '!' RETURNING id")]
    first = [r[0] for r in tx.execute("SELECT id FROM palette_read.billing_events ORDER BY position, id LIMIT 3")]
    report = audit.reconcile(tx, service.app.recorder, service.app.mapper.transcoder, limit=3, wait_s=0)
    assert len(ids) > 3
    for kind in ("missing from the projection", "in the projection but not in the log"):
        lines = [d for d in report.differences if d.startswith(kind + ":")]
        assert [line.rsplit("(id ", 1)[1].rstrip(")") for line in lines] == first
        assert f"... and {len(ids) - 3} more {kind}" in report.differences, report.differences
    assert report.balance_mismatches == []  # a reference changed, not an amount


@pytest.mark.parametrize("stranger", ["00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
                                      "between"])
def test_reconcile_finds_rows_of_a_user_the_log_does_not_know(history, service, settings, tx,  # noqa: F811
                                                             stranger):
    """A ledger row and a users row of a user without a single event, its id before every other
    user's, after them or among them: the merge by user id reaches it wherever it sorts."""
    wait_drained(service, settings)
    if stranger == "between":  # right after the first user: before every other (a random id may sort last)
        ids = [r[0] for r in tx.execute("SELECT id FROM palette_read.users ORDER BY id LIMIT 2")]
        stranger = str(uuid.UUID(int=ids[0].int + 1))
        assert ids[0] < uuid.UUID(stranger) < ids[1]
    user = stranger
    assert audit.reconcile(tx, service.app.recorder, service.app.mapper.transcoder, wait_s=0).ok
    tx.execute("INSERT INTO palette_read.billing_events (id, user_id, seq, type, amount, balance_delta, ref, "
               "occurred_at, position, prev_hash, hash) VALUES ('forged-1', %s, 1, 'grant', 9, 9, '', now(), 1, "
               "%s, 'x')", [user, "0" * 64])
    tx.execute("INSERT INTO palette_read.users (id, plan, credits, reserved, spent, granted) "
               "VALUES (%s, 'free', 5, 0, 0, 5)", [user])
    report = audit.reconcile(tx, service.app.recorder, service.app.mapper.transcoder, wait_s=0)
    assert [(m.user_id, m.table, m.projected, m.aggregate, m.version) for m in report.balance_mismatches] == [
        (user, "billing_events", 9, 0, 0), (user, "users", 5, 0, 0)]
    assert report.differences[0] == (f"in the projection but not in the log: position 1 grant 9 user {user} "
                                     "(id forged-1)")
    assert len(report.differences) == 3, report.differences  # and the two balances


class _SetClock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at


def test_replay_until_reads_past_an_event_stamped_after_one_committed_later(apps, settings):
    """Timestamps come from the command, so the log's commit order may run up to TIME_SLACK_S
    behind them: an event stamped past ``until`` does not end the replay while one committed after
    it, stamped before ``until``, may follow."""
    clock = _SetClock(datetime.now(UTC) + timedelta(seconds=3))
    app = PaletteApplication(env=event_store_env(settings))
    committer = GroupCommitter(app, pg_stream_loader(app)).start()
    try:
        svc = PaletteService(app, committer, clock, RandomIds(), **process_keys())
        later = svc.register(f"stamped-later-{uuid.uuid4()}").value[0]  # committed first
        clock.at -= timedelta(seconds=3)
        earlier = svc.register(f"stamped-earlier-{uuid.uuid4()}").value[0]  # committed after it
        replayer = Replayer(app)
        start = min(e.id for e in replayer.stream(later))
        streams = {e.stream_id for e in replayer.all(start=start, until=clock.at + timedelta(seconds=1))}
    finally:
        committer.stop()
        app.close()
    assert earlier in streams and later not in streams


def test_reconcile_reports_a_job_settled_twice_or_without_a_reservation(apps, settings, schema, tx):
    """The domain cannot settle a job twice, nor one it has not reserved, so the log is forged, in
    a schema of its own (out of reach of the session's relay and of every other test)."""
    app = PaletteApplication(env=event_store_env(settings, pool_size=1, schema=schema))
    try:
        svc = PaletteService(app, DirectExecutor(app), SystemClock(), RandomIds(), **process_keys())
        user_id = svc.register(f"settled-twice-{uuid.uuid4()}").value[0]
        job_id = svc.create_job(user_id, "interior", 1).value
        svc.confirm_upload(user_id, job_id)
        svc.execute_job(user_id, job_id, {"wall": {"action": "tone", "value": "warm"}}, [])
        assert svc.cancel_job(user_id, job_id).value

        def settled() -> list[str]:
            report = audit.reconcile(tx, app.recorder, app.mapper.transcoder, wait_s=0)
            return [d for d in report.differences if d.startswith(f"job {job_id} ")]

        assert settled() == []  # reserved once, settled once
        tx.execute(sql.SQL("INSERT INTO {} (originator_id, originator_version, topic, state) "
                           "SELECT originator_id, (SELECT max(originator_version) + 1 FROM {} "
                           "WHERE originator_id = %s), topic, state FROM {} "
                           "WHERE originator_id = %s AND topic LIKE %s").format(
            *[sql.Identifier(schema, "palette_events")] * 3), [user_id, user_id, "%.CreditsSettled"])
        tx.commit()
        assert settled() == [f"job {job_id} settled 2 times"]
        tx.execute(sql.SQL("DELETE FROM {} WHERE originator_id = %s AND topic LIKE %s").format(
            sql.Identifier(schema, "palette_events")), [user_id, "%.CreditsReserved"])
        tx.commit()
        assert settled() == [f"job {job_id} settled 2 times", f"job {job_id} settled without a reservation"]
    finally:
        app.close()


@pytest.mark.parametrize("kind", ["CreditsReserved", "CreditsSettled"])
def test_reconcile_reports_an_unreadable_settlement_as_a_stream_it_cannot_fold(history, service, settings, tx,  # noqa: F811
                                                                              kind):
    """An event whose stored state cannot be decoded (its data ``{"_unreadable": why}``) is a
    stream no fold can take: reconcile reports it as one it cannot fold, and does not stop on the
    job id such an event no longer has (a KeyError ended the whole audit)."""
    wait_drained(service, settings)
    events = sql.Identifier(service.app.recorder.datastore.schema, service.app.recorder.events_table_name)
    stranger = uuid.uuid4()
    tx.execute(sql.SQL("INSERT INTO {} (originator_id, originator_version, topic, state) SELECT %s, 1, topic, %s "
                       "FROM {} WHERE topic LIKE %s LIMIT 1").format(events, events),
               [stranger, b"\x00not json", f"%.{kind}"])
    for model in ("users", "billing_events"):  # tracked as folded: the fold is the auditor's to redo
        tx.execute(sql.SQL("INSERT INTO {} VALUES (%s, 1)").format(sql.Identifier("palette_read", f"{model}_tracking")),
                   [stranger])
    report = audit.reconcile(tx, service.app.recorder, service.app.mapper.transcoder, wait_s=0)
    assert "1 user stream(s) cannot be folded" in report.differences, report.differences


def test_verify_names_every_chain_deleted_whole_first_between_and_last_in_id_order_and_a_broken_one(
        history, service, settings, tx):  # noqa: F811
    """The heads are merged with the chains by user id: a head without rows before the first chain,
    between two and after the last is each named once, and a broken chain's head is consumed with
    it (not taken for a headless one)."""
    wait_drained(service, settings)
    users = [r[0] for r in tx.execute(
        "SELECT DISTINCT user_id FROM palette_read.billing_events ORDER BY user_id").fetchall()]
    assert len(users) >= 5
    gone = [users[0], users[len(users) // 2], users[-1]]
    broken = users[1]
    tx.execute("DELETE FROM palette_read.billing_events WHERE user_id = ANY(%s)", [gone])
    tx.execute("UPDATE palette_read.billing_events SET amount = amount + 1 WHERE user_id = %s AND seq = 1",
               [broken])
    report = audit.verify(tx)
    expected = sorted([(str(u), 1, "every row of this chain is missing") for u in gone]
                      + [(str(broken), 1, "hash does not match the row's contents (the row was edited)")])
    assert sorted((b.user_id, b.seq, b.reason) for b in report.breaks) == expected
    assert (report.broken, report.ok) == (4, False)
    # bounded: the first two chains by user id (PostgreSQL's uuid order, as the SELECT above), all four counted
    first = audit.verify(tx, limit=2)
    order = {str(u): i for i, u in enumerate(users)}
    assert [(b.user_id, b.seq, b.reason) for b in first.breaks] == sorted(expected, key=lambda b: order[b[0]])[:2]
    assert (first.broken, first.ok, first.checked) == (4, False, report.checked)


def test_a_stream_replay_reads_its_stream_a_page_at_a_time(history, service, settings, monkeypatch):  # noqa: F811
    """A stream's replay (`palette replay stream`, `/streams/{id}/events`, and `state --as-of`,
    which reads it) held all of the stream's rows at once, however long the stream: a User stream
    grows with every job its user runs. It reads a page of versions per query; the events are
    the stream's, in version order, as the table holds them (the oracle: one plain SELECT)."""
    import projections.replay

    monkeypatch.setattr(projections.replay, "PAGE", 2)
    fetched: list[int] = []
    datastore = history.recorder.datastore
    plain = type(datastore).get_connection

    class Counted:
        def __init__(self, cur: Any) -> None:
            self.cur = cur

        def __enter__(self) -> Counted:
            self.cur.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.cur.__exit__(*exc)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.cur, name)

        def fetchall(self) -> list[Any]:
            rows = self.cur.fetchall()
            fetched.append(len(rows))
            return list(rows)

    class Conn:
        def __init__(self, conn: Any) -> None:
            self.conn = conn

        def __getattr__(self, name: str) -> Any:
            return getattr(self.conn, name)

        def cursor(self, *args: Any, **kwargs: Any) -> Counted:
            return Counted(self.conn.cursor(*args, **kwargs))

    @contextlib.contextmanager
    def counted(self: Any) -> Iterator[Any]:
        with plain(self) as conn:
            yield Conn(conn)

    monkeypatch.setattr(type(datastore), "get_connection", counted)
    with psycopg.connect(settings.effective_database_url) as conn:
        longest, versions = conn.execute(sql.SQL(
            "SELECT originator_id, count(*) FROM {} GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1").format(
            events_table(history.recorder))).fetchone() or (None, 0)
    assert versions >= 5
    replayed = list(history.existing_stream(longest))
    assert [e.version for e in replayed] == list(range(1, versions + 1))
    assert [e.stream_id for e in replayed] == [longest] * versions
    assert fetched and max(fetched) <= 2, fetched


@pytest.mark.parametrize("point", [{"version": 3}, {"version": 4}, {"as_of": datetime(2100, 1, 1, tzinfo=UTC)}])
def test_a_state_folded_through_an_unreadable_event_is_refused_naming_it(settings, schema, point):
    """An event whose stored state cannot be decoded (replays show it as ``_unreadable``) is one no
    fold takes: the state through it is refused as one that cannot be had (the CLI's one line, the
    route's 404), where the fold's AttributeError was a traceback and a 500; the state before it
    still folds."""
    app = PaletteApplication(env=event_store_env(settings, schema=schema))
    try:
        user_id = PaletteService(app, DirectExecutor(app), SystemClock(), RandomIds(),
                                 **process_keys()).register(f"dev-{uuid.uuid4()}").value[0]
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            for version, state in ((3, b'{"plan": "pro"}'), (4, b'{"timestamp": "2026-01-01T00:00:00+00:00"}')):
                conn.execute(sql.SQL("INSERT INTO {} (originator_id, originator_version, topic, state) "
                                     "VALUES (%s, %s, 'domain.user:User.PlanChanged', %s)").format(
                    events_table(app.recorder)), [user_id, version, state])
        replayer = Replayer(app)
        assert replayer.state(user_id, version=2)["version"] == 2
        with pytest.raises(LookupError, match=r"cannot be folded: its event at version 3 \(PlanChanged\) is "
                                              r"unreadable \(KeyError: 'timestamp'\)"):
            replayer.state(user_id, **point)
    finally:
        app.close()


@pytest.mark.parametrize("unreadable_at", [2, 3, 5, 8])
def test_a_time_window_holds_its_events_whatever_unreadable_event_lies_among_them(settings, schema, unreadable_at):
    """The search for a window's first position steps over an event whose stored state cannot be
    decoded (the epoch stands in for its stamp): read as the log's time there, it sent the search
    past the window's first events, which the replay then left out."""
    app = PaletteApplication(env=event_store_env(settings, schema=schema))
    try:
        day = datetime(2026, 1, 1, tzinfo=UTC)
        stamps = {n: day + timedelta(days=n) for n in range(1, 11) if n != unreadable_at}
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            for n in range(1, 11):
                state = (b'{"timestamp": "not a time"}' if n not in stamps else json.dumps(
                    {"timestamp": {"_type_": "datetime_iso", "_data_": stamps[n].isoformat()},
                     "user_id": {"_type_": "uuid_hex", "_data_": uuid.uuid4().hex},
                     "preset": "interior", "item_count": 1}).encode())
                conn.execute(sql.SQL("INSERT INTO {} (originator_id, originator_version, topic, state) "
                                     "VALUES (%s, 1, 'domain.job:Job.JobCreated', %s)").format(
                    events_table(app.recorder)), [uuid.uuid4(), state])
        replayer = Replayer(app)
        for since in stamps.values():
            want = sorted(n for n, at in stamps.items() if at >= since)
            assert [e.id for e in replayer.all(since=since)] == want, since
    finally:
        app.close()


def test_replay_alls_lines_are_the_envelopes_replay_reads_with_types_and_erased_users(service):  # noqa: F811
    """`palette replay all`'s fast path (plain rows, the stored bytes written straight out) against
    the envelopes the time-ranged path builds one by one: the same events in the same order, a
    type filter keeping the same ones, and an erased user's sealed fields shown as erased."""
    user_id = service.register(f"replayed-{uuid.uuid4()}").value[0]
    rule_id = service.create_rule(user_id, "my kitchen", "interior",
                                  {"wall": {"action": "tone", "value": "warm"}}).value
    head = service.app.recorder.max_notification_id()
    start = min(e.id for e in Replayer(service.app).stream(user_id))
    for replayer in (Replayer(service.app), Replayer(service.app, erased={user_id})):
        for types in (None, ["RuleCreated"], ["Registered", "RuleCreated"]):
            fast = [json.loads(line) for line in replayer.all_jsonl(start, types)]
            built = [json.loads(encode(e)) for e in replayer.all(start=start, types=types)]
            fast, built = [e for e in fast if e["id"] <= head], [e for e in built if e["id"] <= head]
            assert fast == built and fast, (types, len(fast), len(built))
    [created] = [e for e in map(json.loads, Replayer(service.app, erased={user_id}).all_jsonl(start, ["RuleCreated"]))
                 if e["stream_id"] == str(rule_id)]
    assert "my kitchen" not in json.dumps(created) and "erased" in json.dumps(created["data"])


def test_replay_all_survives_a_pooled_connection_the_server_ended(settings, schema):
    """`palette replay all` and GET /streams read the log a page per connection checkout: a pooled
    connection the server ended (a restart, an idle timeout) is retried, as eventsourcing's own
    reads (the time-ranged path's) are, rather than breaking off the replay at its first page."""
    app = PaletteApplication(env=event_store_env(settings, pool_size=1, schema=schema))
    try:
        PaletteService(app, DirectExecutor(app), SystemClock(), RandomIds(),
                       **process_keys()).register(f"dropped-{uuid.uuid4()}")
        replayer = Replayer(app)
        expected = list(replayer.all_jsonl())
        with app.recorder.datastore.get_connection() as pooled:
            backend = pooled.info.backend_pid
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            assert conn.execute("SELECT pg_terminate_backend(%s)", [backend]).fetchone() == (True,)
        assert list(replayer.all_jsonl()) == expected and len(expected) >= 2
    finally:
        app.close()
