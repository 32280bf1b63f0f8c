"""Projections on the real stack: redelivery is harmless, crashes lose nothing, a poison event
holds back only its own stream, and a rebuild equals the live model."""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from adapters.bootstrap import event_store_env
from adapters.pg_streams import pg_stream_loader
from adapters.settings import Settings
from adapters.system import RandomIds, SystemClock
from application.executors import GroupCommitter
from application.services import PaletteApplication, PaletteService
from domain.contracts.envelope import EventEnvelope
from domain.errors import DomainError
from domain.job import Job
from projections import rebuild as rebuilding
from projections.log import LogReader, events_table
from projections.models import READ_MODELS
from projections.models.billing_events import LEDGER_COLUMNS
from projections.rebuild import fold_log, iter_envelopes, rebuild
from projections.schema import ensure_schema
from projections.store import (
    RebuildRunning,
    apply_batch,
    apply_isolating,
    dead_letters,
    resolve_dead_letter,
    unapplied,
)
from tests.chaos import read_model_problems
from tests.integration.test_dispatcher_hardening import running_job
from tests.keys import process_keys

from .test_stack import wait_until

EDITS = {"floor": {"action": "texture", "value": "wood"}}


@pytest.fixture(scope="module")
def service(settings: Settings) -> Iterator[PaletteService]:
    app = PaletteApplication(env=event_store_env(settings))
    committer = GroupCommitter(app, pg_stream_loader(app)).start()
    yield PaletteService(app, committer, SystemClock(), RandomIds(), **process_keys())
    committer.stop()
    app.close()


def workload(svc: PaletteService, users: int, rng: random.Random) -> None:
    """Users with jobs that finish, fail, get canceled or stay open; rules made and deleted."""
    for _ in range(users):
        user_id = svc.register(f"proj-{uuid.uuid4()}", plan="pro").value[0]
        rule_id = svc.create_rule(user_id, "r", "interior", EDITS).value
        for _ in range(rng.randint(1, 3)):
            items = rng.randint(1, 4)
            try:
                job_id = svc.create_job(user_id, "interior", items).value
            except DomainError:
                continue
            svc.confirm_upload(user_id, job_id)
            svc.execute_job(user_id, job_id, {}, None, rule_id)
            for idx in range(items):
                if rng.random() < 0.15:
                    svc.cancel_job(user_id, job_id)
                    break
                status = "done" if rng.random() < 0.8 else "failed"
                svc.record_item_result(job_id, idx, status, f"{job_id}:{idx}")
                if rng.random() < 0.2:  # a redelivered callback
                    svc.record_item_result(job_id, idx, status, f"{job_id}:{idx}")
        if rng.random() < 0.3:
            svc.delete_rule(user_id, rule_id)


def _norm(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return value


def table_contents(
    conn: psycopg.Connection[Any], name: str, columns: list[str] | tuple[str, ...]
) -> set[tuple[Any, ...]]:
    query = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in columns), sql.Identifier("palette_read", name))
    return {tuple(_norm(v) for v in row) for row in conn.execute(query).fetchall()}


def folded_contents(app: Any, name: str) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]:
    model = READ_MODELS[name]
    rows, appended, _, _, failed = fold_log(model, iter_envelopes(app.recorder, app.mapper.transcoder, 1, None))
    assert not failed
    names = model.column_names
    keyed = {tuple(_norm(r[c]) for c in names) for r in rows.values() if r is not None}
    ledger = {tuple(_norm(r[c]) for c in LEDGER_COLUMNS) for r in appended}
    return keyed, ledger


def drained(svc: PaletteService, conn: psycopg.Connection[Any]) -> bool:
    table = events_table(svc.app.recorder)
    return all(unapplied(conn, m, table)[0] == 0 for m in READ_MODELS.values())


def wait_drained(svc: PaletteService, settings: Settings) -> None:
    """Until every read model has folded ``svc``'s whole log (on a connection of its own)."""
    with psycopg.connect(settings.effective_database_url, autocommit=True) as probe:
        wait_until(lambda: drained(svc, probe), timeout_s=60, what="projections to drain")


def differences(table: set[tuple[Any, ...]], fold: set[tuple[Any, ...]], columns: list[str] | tuple[str, ...],
                key: tuple[str, ...]) -> list[str]:
    """The rows where ``table`` and ``fold`` differ, a line each, by key: what a failure names
    (a whole table's set difference is thousands of lines, its tail all a log keeps)."""
    at = [list(columns).index(k) for k in key]

    def by_key(rows: set[tuple[Any, ...]]) -> dict[tuple[Any, ...], tuple[Any, ...]]:
        return {tuple(r[i] for i in at): r for r in rows}

    left, right = by_key(table), by_key(fold)
    return [f"{k}: table {left.get(k)} / fold {right.get(k)}"
            for k in sorted(left.keys() ^ right.keys() | {k for k in left.keys() & right.keys() if left[k] != right[k]},
                            key=str)]


def assert_models_equal_fold(app: Any, conn: psycopg.Connection[Any]) -> None:
    """Every read-model table equals the fold of ``app``'s whole event log."""
    for name, model in READ_MODELS.items():
        keyed, ledger = folded_contents(app, name)
        apart = differences(table_contents(conn, model.keyed_table, model.column_names), keyed,
                            model.column_names, model.key)
        assert not apart, f"{name}: {len(apart)} rows apart from the log's fold\n" + "\n".join(apart[:20])
        if model.append_table:
            ledger_table = table_contents(conn, model.append_table, LEDGER_COLUMNS)
            apart = differences(ledger_table, ledger, LEDGER_COLUMNS, ("id",))
            assert not apart, f"{model.append_table}: {len(apart)} rows apart\n" + "\n".join(apart[:20])


def assert_models_agree_with_the_aggregates(app: Any, conn: psycopg.Connection[Any]) -> None:
    """An oracle that shares nothing with the projections' folds: every projected row against
    the aggregates the domain folds from the same log (``tests.chaos.read_model_problems``)."""
    log = list(iter_envelopes(app.recorder, app.mapper.transcoder, 1, None))
    assert read_model_problems(conn, log, app) == []


def test_crashes_and_broker_restart_lose_nothing_and_duplicate_nothing(apps, service, conn):
    rng = random.Random(7)
    stop = threading.Event()
    errors: list[BaseException] = []

    def load() -> None:
        try:
            while not stop.is_set():
                workload(service, 2, rng)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    chaos = random.Random(11)
    try:
        for kill in range(6):
            apps.kill(chaos.choice(["relay", "projector"]))
            if kill == 2:
                apps.kill("broker")
                apps.supervisor.restart("broker")
            deadline = time.monotonic() + chaos.uniform(0.3, 1.0)
            while time.monotonic() < deadline:
                apps.supervisor.check()
                time.sleep(0.05)
    finally:  # the load stops with the test, not with the session
        stop.set()
        loader.join(60)
    assert not loader.is_alive() and not errors, errors

    def settle() -> bool:
        apps.supervisor.check()
        return drained(service, conn)

    wait_until(settle, timeout_s=180, what="projections to drain after the crashes")
    assert_models_equal_fold(service.app, conn)
    assert_models_agree_with_the_aggregates(service.app, conn)


def test_every_event_delivered_twice_changes_no_read_model(apps, service, conn):
    workload(service, 3, random.Random(3))
    wait_until(lambda: drained(service, conn), timeout_s=60, what="projections to drain")
    before = {m.name: table_contents(conn, m.keyed_table, m.column_names) for m in READ_MODELS.values()}
    ledger_before = table_contents(conn, "billing_events", LEDGER_COLUMNS)
    envelopes = list(iter_envelopes(service.app.recorder, service.app.mapper.transcoder, 1, None))
    result = apply_batch(conn, envelopes + envelopes[-50:])
    assert result.applied == 0 and result.parked == 0
    after = {m.name: table_contents(conn, m.keyed_table, m.column_names) for m in READ_MODELS.values()}
    assert after == before
    assert table_contents(conn, "billing_events", LEDGER_COLUMNS) == ledger_before


def test_rebuild_survives_a_pause_between_the_log_pages_longer_than_the_stores_idle_timeout(
        apps, service, conn, settings, monkeypatch):
    """The fold copies out between the log's pages: a copy that takes longer than the event store's
    idle_in_transaction_session_timeout (eventsourcing's default: 5 s) must not kill the read of
    the log (a server-side cursor inside a transaction on the store's pooled connection did)."""
    workload(service, 2, random.Random(11))
    wait_until(lambda: drained(service, conn), timeout_s=60, what="projections to drain")
    model = READ_MODELS["jobs_log"]
    live = table_contents(conn, model.keyed_table, model.column_names)
    monkeypatch.setattr(rebuilding, "COPY_ROWS", 1)
    monkeypatch.setattr(rebuilding, "PAGE", 2)
    copy_rows, paused = rebuilding.copy_rows, []

    def slow_copy(*args: Any) -> None:
        if not paused:
            paused.append(True)
            time.sleep(6)
        copy_rows(*args)

    monkeypatch.setattr(rebuilding, "copy_rows", slow_copy)
    rebuild(settings.effective_database_url, service.app.recorder, service.app.mapper.transcoder, "jobs_log")
    assert paused
    assert not differences(table_contents(conn, model.keyed_table, model.column_names), live, model.column_names,
                           model.key)


@pytest.mark.parametrize("batch", [2, rebuilding.COPY_ROWS])
def test_rebuild_equals_the_live_model(apps, service, conn, settings, monkeypatch, batch):
    """Copied out every ``batch`` rows (2: many batches, a job's items and a user's ledger split
    across them), the rebuilt tables, ledger and trackings are the live ones."""
    monkeypatch.setattr(rebuilding, "COPY_ROWS", batch)
    workload(service, 3, random.Random(5))
    wait_until(lambda: drained(service, conn), timeout_s=60, what="projections to drain")
    for name, model in READ_MODELS.items():
        live = table_contents(conn, model.keyed_table, model.column_names)
        tracked = table_contents(conn, f"{name}_tracking", ("stream_id", "version"))
        report = rebuild(settings.effective_database_url, service.app.recorder, service.app.mapper.transcoder, name)
        assert report.events >= len(live)
        rebuilt = table_contents(conn, model.keyed_table, model.column_names)
        assert not differences(rebuilt, live, model.column_names, model.key), name
        # What it says it stored, counted once however the batches split the streams.
        assert report.rows == len(rebuilt), name
        if model.append:
            ledger = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier("palette_read", model.append.name))).fetchone()[0]
            assert (report.ledger_rows, ledger > 0) == (ledger, True), name
        assert table_contents(conn, f"{name}_tracking", ("stream_id", "version")) == tracked
    assert_models_equal_fold(service.app, conn)
    assert_models_agree_with_the_aggregates(service.app, conn)


def _env(stream: uuid.UUID, version: int, kind: str, data: dict[str, Any], position: int) -> EventEnvelope:
    return EventEnvelope(id=position, stream_id=stream, stream_type="Job", version=version, type=kind,
                         timestamp=datetime.now(UTC), data=data)


def _forget_job(conn, job: uuid.UUID) -> None:
    """Delete what the jobs models and the dead letters hold of ``job`` (a test's own stream)."""
    for tbl in ("jobs_log", "jobs_log_tracking", "job_items_log", "job_items_log_tracking"):
        column = "job_id" if tbl == "job_items_log" else ("stream_id" if tbl.endswith("tracking") else "id")
        conn.execute(sql.SQL("DELETE FROM {} WHERE {} = %s").format(
            sql.Identifier("palette_read", tbl), sql.Identifier(column)), [job])
    conn.execute("DELETE FROM palette_read.dead_letters WHERE stream_id = %s", [job])


@pytest.mark.parametrize(("model", "envelope", "said"), [
    ("a_model_dropped_since", b"{}", "no longer exists"),
    ("jobs_log", b'{"not": "an envelope"}', "is no envelope"),
])
def test_a_dead_letter_no_fold_can_take_is_refused_in_one_line_and_nothing_changes(apps, conn, model, envelope, said):
    """Letters written by hand (the projector parks only envelopes it decoded, of models it
    has): retry and skip refuse them with a LookupError the CLI says in one line."""
    stream = uuid.uuid4()
    (letter,) = conn.execute(
        "INSERT INTO palette_read.dead_letters (model, stream_id, version, position, envelope, error, status) "
        "VALUES (%s, %s, 1, 1, %s, 'by hand', 'parked') RETURNING id", [model, stream, envelope]).fetchone()
    try:
        for action in ("retry", "skip"):
            with pytest.raises(LookupError, match=said) as refused:
                resolve_dead_letter(conn, letter, action)
            assert not isinstance(refused.value, KeyError)  # a KeyError's text is its bare key
        assert [(d["status"]) for d in dead_letters(conn) if d["stream_id"] == stream] == ["parked"]
    finally:
        conn.execute("DELETE FROM palette_read.dead_letters WHERE stream_id = %s", [stream])


def test_a_poison_event_holds_back_only_its_own_stream(apps, conn):
    poisoned, healthy = uuid.uuid4(), uuid.uuid4()
    base = 10**12 + random.randrange(10**9)
    created = {"user_id": str(uuid.uuid4()), "preset": "interior", "item_count": 1}
    batch = [
        _env(poisoned, 1, "JobCreated", {"user_id": created["user_id"], "item_count": 1}, base),  # no preset
        _env(healthy, 1, "JobCreated", created, base + 1),
        _env(poisoned, 2, "UploadConfirmed", {}, base + 2),
        _env(healthy, 2, "UploadConfirmed", {}, base + 3),
    ]
    result = apply_batch(conn, batch)
    status = conn.execute("SELECT status FROM palette_read.jobs_log WHERE id = %s", [healthy]).fetchone()
    assert status == ("uploaded",)
    assert conn.execute("SELECT 1 FROM palette_read.jobs_log WHERE id = %s", [poisoned]).fetchone() is None
    letters = [d for d in dead_letters(conn) if d["stream_id"] == poisoned and d["model"] == "jobs_log"]
    assert [(d["version"], d["status"]) for d in letters] == [(1, "parked"), (2, "held")]
    assert "KeyError" in letters[0]["error"] and result.parked >= 2

    later = _env(poisoned, 3, "JobCanceled", {"reason": "x"}, base + 4)
    apply_batch(conn, [later])
    parked = [d for d in dead_letters(conn) if d["stream_id"] == poisoned and d["model"] == "jobs_log"]
    assert [d["version"] for d in parked] == [1, 2, 3]

    resolve_dead_letter(conn, letters[0]["id"], "skip")
    remaining = [(d["version"], d["status"]) for d in dead_letters(conn)
                 if d["stream_id"] == poisoned and d["model"] == "jobs_log"]
    # v2 has no row to update once v1 is skipped, so it is parked again and v3 waits behind it.
    assert remaining == [(2, "parked"), (3, "held")]

    # Leave the session's read models a fold of the real log again.
    for tbl in ("jobs_log", "jobs_log_tracking", "job_items_log", "job_items_log_tracking"):
        column = "job_id" if tbl == "job_items_log" else ("stream_id" if tbl.endswith("tracking") else "id")
        conn.execute(sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(
            sql.Identifier("palette_read", tbl), sql.Identifier(column)), [[poisoned, healthy]])
    conn.execute("DELETE FROM palette_read.dead_letters WHERE stream_id = ANY(%s)", [[poisoned, healthy]])


def test_a_dead_letter_resolved_while_the_projector_holds_a_later_event_behind_it_leaves_none_orphaned(
        conn, settings):
    """The projector reads a stream's dead letters, then (round trips later) writes the letter of a
    later event it holds behind them; a retry or skip committed in between deleted the stream's
    letters as of its own statement. The held letter then had no parked one before it: its stream
    was held for good (every later event held behind it, the sweep passing over it) and no
    command could release it (only a parked letter is resolved). The projector is paused between
    the two by an uncommitted letter of the same key, which its insert waits on (pg_stat_activity)."""
    job = uuid.uuid4()
    base = 10**12 + random.randrange(10**9)
    poison = _env(job, 1, "JobCreated", {"user_id": str(uuid.uuid4()), "item_count": 1}, base)  # no preset
    later = _env(job, 2, "UploadConfirmed", {}, base + 1)
    url = settings.effective_database_url
    errors: list[BaseException] = []

    def on_thread(target: Any, *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def waiting_on_a_lock(pid: int) -> bool:
        row = conn.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
        return row == (True,)

    ensure_schema(conn)  # as the projector makes it (this test needs no process of the stack)
    try:
        apply_batch(conn, [poison])
        head = next(d for d in dead_letters(conn) if d["stream_id"] == job and d["model"] == "jobs_log")
        with psycopg.connect(url, autocommit=True) as pauser, psycopg.connect(url, autocommit=True) as projector, \
                psycopg.connect(url, autocommit=True) as operator:
            with pauser.transaction(force_rollback=True):
                pauser.execute("INSERT INTO palette_read.dead_letters (model, stream_id, version, position, envelope, "
                               "error, status) VALUES ('jobs_log', %s, 2, %s, '', 'pause', 'held')", [job, base + 1])
                folding = on_thread(apply_batch, projector, [later])
                wait_until(lambda: waiting_on_a_lock(projector.info.backend_pid), timeout_s=30,
                           what="the projector to wait before writing its held letter")
                resolving = on_thread(resolve_dead_letter, operator, head["id"], "skip")
                wait_until(lambda: not resolving.is_alive() or waiting_on_a_lock(operator.info.backend_pid),
                           timeout_s=30, what="the skip to finish or wait for the projector")
            folding.join(timeout=30)
            resolving.join(timeout=30)
        assert not errors and not folding.is_alive() and not resolving.is_alive()
        letters = [(d["version"], d["status"]) for d in dead_letters(conn)
                   if d["stream_id"] == job and d["model"] == "jobs_log"]
        # v2 has no row to update once v1 is skipped: parked, where the operator sees it.
        assert letters == [(2, "parked")]
    finally:
        _forget_job(conn, job)


def test_an_event_postgres_cannot_store_is_parked_and_its_streams_later_events_held_behind_it(apps, conn):
    """A batch that fails to write is applied again event by event in log order: the event that
    cannot be stored is the one parked, its stream's later events wait behind it."""
    job = uuid.uuid4()
    base = 10**12 + random.randrange(10**9)
    created = {"user_id": str(uuid.uuid4()), "preset": "inte\x00rior", "item_count": 1}  # text with a NUL
    events = [_env(job, 1, "JobCreated", created, base), _env(job, 2, "UploadConfirmed", {}, base + 1),
              _env(job, 3, "JobCanceled", {"reason": "x"}, base + 2)]

    def fill(gaps: dict[uuid.UUID, tuple[int, int]]) -> list[EventEnvelope]:
        return [e for e in events if e.stream_id in gaps and gaps[e.stream_id][0] < e.version <= gaps[e.stream_id][1]]

    try:
        apply_isolating(conn, events, fill)
        letters = [(d["version"], d["status"]) for d in dead_letters(conn)
                   if d["stream_id"] == job and d["model"] == "jobs_log"]
        assert letters == [(1, "parked"), (2, "held"), (3, "held")]
    finally:
        _forget_job(conn, job)


def test_a_batch_of_older_positions_never_moves_the_models_positions_back(apps, conn):
    """Partitions deliver out of commit order: a batch whose events are all older than one
    already applied leaves every model's position where the newer one put it."""
    saved = dict(conn.execute("SELECT model, position FROM palette_read.positions").fetchall())
    top = max(saved.values(), default=0)
    newer, older = uuid.uuid4(), uuid.uuid4()

    def created(rule: uuid.UUID, position: int) -> EventEnvelope:
        return EventEnvelope(id=position, stream_id=rule, stream_type="Rule", version=1, type="RuleCreated",
                             timestamp=datetime.now(UTC), data={"user_id": str(uuid.uuid4()), "name": "r",
                                                                "preset_id": "interior", "concepts": {}, "protect": []})

    apply_batch(conn, [created(newer, top + 1000)])
    assert apply_batch(conn, [created(older, top + 10)]).applied == 1
    positions = dict(conn.execute("SELECT model, position FROM palette_read.positions").fetchall())
    assert all(positions[name] >= top + 1000 for name in READ_MODELS), positions
    for tbl, column in (("rules", "id"), ("rules_tracking", "stream_id")):
        conn.execute(sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(
            sql.Identifier("palette_read", tbl), sql.Identifier(column)), [[newer, older]])
    for model, position in saved.items():  # the session's positions as they were
        conn.execute("UPDATE palette_read.positions SET position = %s WHERE model = %s", [position, model])


def test_the_projector_built_for_a_process_can_sweep(apps, service, conn, settings):
    """Regression (found by the chaos run): the projector's event-store application was only
    referenced by a local, was garbage-collected, and closed the pool its sweep reads with."""
    import gc

    from adapters.bootstrap import build_projector

    service.register(f"sweep-{uuid.uuid4()}")
    wait_until(lambda: conn.execute("SELECT position FROM palette_relay.positions").fetchone(), timeout_s=30,
               what="the relay to publish")
    projector = build_projector(settings.model_copy(update={"projector_sweep_s": 0.01}))
    try:
        gc.collect()
        for _ in range(3):
            projector.sweep()
        assert projector.sweep_bound > 0  # it read the relay's position and walked the log
    finally:
        projector.close()


def test_the_dispatcher_sends_a_stalled_job_again(apps, service, conn, settings):
    """A job queued while no dispatcher ran (as if the broker lost its JobQueued) is found by the
    dispatcher's sweep once it is stale, and only its unfinished items go out again."""
    from adapters.bootstrap import build_dispatcher

    job_id = running_job(service, conn)
    dispatcher = build_dispatcher(settings.model_copy(update={"dispatch_stale_s": 0.001}))
    try:
        sent: list[dict[str, Any]] = []
        real = dispatcher._send
        dispatcher._send = lambda task: (sent.append(task), real(task))[1]
        dispatcher.sweep(limit=10_000)
        mine = sorted(t["idx"] for t in sent if t["job_id"] == str(job_id))
        assert mine == [0, 2]
    finally:
        dispatcher.close()


def _rule_event(app: PaletteApplication, rule: uuid.UUID, version: int, name: str | None,
                deleted: bool = False) -> None:
    """A rule's event straight into the log: created at version 1, renamed (or ``deleted``) after;
    without a name (``None``) a rename the ``rules`` fold cannot take (a KeyError)."""
    from eventsourcing.persistence import StoredEvent

    state: dict[str, Any] = {"timestamp": datetime.now(UTC)}
    if not deleted:
        state.update(concepts=EDITS, protect=[])
    if name is not None:
        state["name"] = name
    if version == 1:
        state.update(originator_topic="domain.rule:Rule", user_id=uuid.uuid4(), preset_id="interior")
    kind = "RuleCreated" if version == 1 else "RuleDeleted" if deleted else "RuleUpdated"
    if name is not None and not name.isascii():  # as its JSON escapes (a lone surrogate, which UTF-8 cannot hold)
        encoded = app.mapper.transcoder.encode({**state, "name": "<name>"}).replace(
            b'"<name>"', json.dumps(name).encode())
    else:
        encoded = app.mapper.transcoder.encode(state)
    app.recorder.insert_events([StoredEvent(rule, version, f"domain.rule:Rule.{kind}", encoded)])


def _rule_letters(conn: psycopg.Connection[Any], rule: uuid.UUID) -> list[tuple[int, str]]:
    return [(d["version"], d["status"]) for d in dead_letters(conn, ("parked", "held", "skipped"))
            if d["stream_id"] == rule and d["model"] == "rules"]


def _live_fold(conn: psycopg.Connection[Any], app: PaletteApplication) -> Any:
    """The whole log through the live apply path, as the projector's sweep folds what it finds."""
    envelopes = list(iter_envelopes(app.recorder, app.mapper.transcoder, 1, None))

    def fill(gaps: dict[uuid.UUID, tuple[int, int]]) -> list[EventEnvelope]:
        return [e for e in envelopes
                if e.stream_id in gaps and gaps[e.stream_id][0] < e.version <= gaps[e.stream_id][1]]

    assert envelopes
    return apply_isolating(conn, envelopes, fill)


RULE_COLUMNS = READ_MODELS["rules"].column_names


def test_a_rebuild_keeps_an_operators_skip(own_log):
    """``dlq skip`` of a parked event is the operator's decision: a rebuild passes over that event
    as the live model did (its stream's later events folded), parks nothing anew, and the live
    projector folding the log again after it finds nothing to fold or park. (Before, the rebuild
    stopped the stream at that event again: the row went back to what it was before it, and the
    live fold then held the later events behind a letter no longer parked, which no `dlq retry`
    or `skip` could release.) A skip is refused while a rebuild runs, which read the skips when
    it began."""
    url, app = own_log
    rule = uuid.uuid4()
    _rule_event(app, rule, 1, "first")
    _rule_event(app, rule, 2, None)  # the poison
    _rule_event(app, rule, 3, "later")
    with psycopg.connect(url, autocommit=True) as conn:
        _live_fold(conn, app)
        assert _rule_letters(conn, rule) == [(2, "parked"), (3, "held")]
        parked = next(d for d in dead_letters(conn) if d["stream_id"] == rule and d["status"] == "parked")
        with psycopg.connect(url, autocommit=True) as rebuilding_now:  # holds the lock as a rebuild does
            rebuilding_now.execute("SELECT pg_advisory_lock(%s)", [rebuilding.REBUILD_LOCK])
            with pytest.raises(RebuildRunning, match="a rebuild is running"):
                resolve_dead_letter(conn, parked["id"], "skip")
        assert _rule_letters(conn, rule) == [(2, "parked"), (3, "held")]  # the rebuild read no half skip
        assert resolve_dead_letter(conn, parked["id"], "skip").applied == 1
        live = table_contents(conn, "rules", RULE_COLUMNS)
        tracked = table_contents(conn, "rules_tracking", ("stream_id", "version"))
        assert conn.execute("SELECT name FROM palette_read.rules WHERE id = %s", [rule]).fetchone() == ("later",)

        rebuild(url, app.recorder, app.mapper.transcoder, "rules")
        assert table_contents(conn, "rules", RULE_COLUMNS) == live
        assert table_contents(conn, "rules_tracking", ("stream_id", "version")) == tracked
        assert _rule_letters(conn, rule) == [(2, "skipped")]

        again = _live_fold(conn, app)
        assert again.applied == 0 and again.parked == 0
        assert _rule_letters(conn, rule) == [(2, "skipped")]
        assert table_contents(conn, "rules", RULE_COLUMNS) == live



def test_a_rebuild_tracks_a_stream_past_an_operators_skip_of_its_last_event(own_log):
    """The skipped event is the stream's last: the rebuilt tracking stands past it, as the live
    model's does, so the live projector finds nothing of the stream to fold again."""
    url, app = own_log
    rule = uuid.uuid4()
    _rule_event(app, rule, 1, "first")
    _rule_event(app, rule, 2, None)  # the poison, and the stream's last event
    with psycopg.connect(url, autocommit=True) as conn:
        _live_fold(conn, app)
        [parked] = [d for d in dead_letters(conn) if d["stream_id"] == rule and d["status"] == "parked"]
        resolve_dead_letter(conn, parked["id"], "skip")
        live = table_contents(conn, "rules", RULE_COLUMNS)
        assert conn.execute("SELECT version FROM palette_read.rules_tracking WHERE stream_id = %s",
                            [rule]).fetchone() == (2,)

        rebuild(url, app.recorder, app.mapper.transcoder, "rules")
        assert conn.execute("SELECT version FROM palette_read.rules_tracking WHERE stream_id = %s",
                            [rule]).fetchone() == (2,)
        assert table_contents(conn, "rules", RULE_COLUMNS) == live
        again = _live_fold(conn, app)
        assert (again.applied, again.parked) == (0, 0)
        assert _rule_letters(conn, rule) == [(2, "skipped")]


@pytest.mark.parametrize("batch", [1, rebuilding.COPY_ROWS], ids=["a batch a row", "one batch"])
def test_a_rebuilds_report_counts_the_rows_it_stored_not_those_a_deleted_job_had(own_log, monkeypatch, batch):
    monkeypatch.setattr(rebuilding, "COPY_ROWS", batch)
    url, app = own_log
    at = datetime.now(UTC)
    kept, deleted = (Job.create(uuid.uuid4(), uuid.uuid4(), "interior", 3, at) for _ in range(2))
    deleted.cancel("user", at)
    deleted.delete(at)
    app.save(kept, deleted)
    with psycopg.connect(url, autocommit=True) as conn:
        for name in ("jobs_log", "job_items_log"):
            report = rebuild(url, app.recorder, app.mapper.transcoder, name)
            stored = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier("palette_read", name))).fetchone()[0]
            assert (report.rows, stored) == ({"jobs_log": 1, "job_items_log": 3}[name],) * 2, name


def test_a_rebuild_whose_copy_loses_the_database_ends_with_that_error_and_swaps_nothing(own_log, monkeypatch):
    """A transient error is the database's, not a batch PostgreSQL refused: the rebuild raises it
    (the operator runs it again) rather than rewrite its batch event by event, and the live tables
    stay as they were."""
    url, app = own_log
    rule = uuid.uuid4()
    _rule_event(app, rule, 1, "first")
    with psycopg.connect(url, autocommit=True) as conn:
        _live_fold(conn, app)
        live = _model_contents(conn, "rules")
        _rule_event(app, rule, 2, "second")

        def lost(*_: Any) -> None:
            raise ConnectionError("the database went away")

        monkeypatch.setattr(rebuilding, "copy_rows", lost)
        with pytest.raises(ConnectionError):
            rebuild(url, app.recorder, app.mapper.transcoder, "rules")
        assert _model_contents(conn, "rules") == live


def _user_event(app: PaletteApplication, user: uuid.UUID, version: int, amount: int | None = None) -> None:
    """A user's event straight into the log: registered at version 1, granted ``amount`` after."""
    from eventsourcing.persistence import StoredEvent

    state: dict[str, Any] = {"timestamp": datetime.now(UTC)}
    if version == 1:
        state.update(originator_topic="domain.user:User", class_version=2, plan="free", device_key="none")
    else:
        state.update(amount=amount, reason="test")
    kind = "Registered" if version == 1 else "CreditsGranted"
    app.recorder.insert_events([StoredEvent(user, version, f"domain.user:User.{kind}",
                                            app.mapper.transcoder.encode(state))])


def _model_contents(conn: psycopg.Connection[Any], name: str) -> list[set[tuple[Any, ...]]]:
    model = READ_MODELS[name]
    tables = [table_contents(conn, model.keyed_table, model.column_names),
              table_contents(conn, f"{name}_tracking", ("stream_id", "version"))]
    if model.append:
        tables.append(table_contents(conn, model.append.name, model.append.columns))
    return tables


@pytest.mark.parametrize("batch", [1, rebuilding.COPY_ROWS], ids=["a batch a row", "one batch"])
@pytest.mark.parametrize("poison", ["x\x00y", "x\ud800y", 2**31],
                         ids=["a NUL in text", "a lone surrogate", "an integer out of range"])
def test_a_rebuild_stops_a_stream_at_an_event_postgres_cannot_store_as_the_live_model_does(
        own_log, monkeypatch, poison, batch):
    """An event of the log whose fold succeeds but whose row PostgreSQL refuses (a NUL in a
    rule's name, a lone surrogate, a grant past an ``integer`` column) is parked by the live
    projector, its stream's rows as before it. A rebuild does the same: the COPY of the batch
    that holds it fails, so that batch is written again stream by stream and the failing stream
    event by event; the stream stops at that event, the other streams are rebuilt, and the
    rebuilt model equals the live one. (Before, the COPY's error ended the rebuild, so a model
    with such an event in its log could never be rebuilt.)"""
    monkeypatch.setattr(rebuilding, "COPY_ROWS", batch)
    url, app = own_log
    poisoned, healthy = uuid.uuid4(), uuid.uuid4()
    if isinstance(poison, str):
        models = ["rules"]
        for stream in (poisoned, healthy):
            _rule_event(app, stream, 1, "first")
        _rule_event(app, poisoned, 2, poison)
        _rule_event(app, poisoned, 3, None, deleted=True)  # held: the poison's name would stay
        _rule_event(app, healthy, 2, "later")
    else:
        models = ["users", "billing_events"]  # an integer keyed column; an appended (ledger) one
        for stream in (poisoned, healthy):
            _user_event(app, stream, 1)
            _user_event(app, stream, 2, 10)
        _user_event(app, poisoned, 3, poison)
        _user_event(app, poisoned, 4, 5)
        _user_event(app, healthy, 3, 7)
    with psycopg.connect(url, autocommit=True) as conn:
        _live_fold(conn, app)
        letters = sorted((d["model"], d["stream_id"], d["version"], d["status"]) for d in dead_letters(conn))
        assert {(m, s) for m, s, _, _ in letters} == {(m, poisoned) for m in models}
        at = 2 if models == ["rules"] else 3  # the poison's version
        assert all(version == at if status == "parked" else version > at for _, _, version, status in letters)
        for name in models:
            live = _model_contents(conn, name)
            report = rebuild(url, app.recorder, app.mapper.transcoder, name)
            assert report.failed_streams == 1
            assert _model_contents(conn, name) == live, name
        assert sorted((d["model"], d["stream_id"], d["version"], d["status"])
                      for d in dead_letters(conn)) == letters
        if models == ["rules"]:
            names = dict(conn.execute("SELECT id, name FROM palette_read.rules").fetchall())
            assert names == {poisoned: "first", healthy: "later"}
        else:
            credits = dict(conn.execute("SELECT id, credits FROM palette_read.users").fetchall())
            assert credits == {poisoned: 10, healthy: 17}


@pytest.mark.parametrize("batch", [2, 3])
def test_a_refused_batch_with_a_long_stream_in_it_is_rebuilt_stream_by_stream_as_the_live_model(
        own_log, monkeypatch, batch):
    """A refused batch may hold a long stream's later part (its ledger's first rows went out
    before), a stream not ended yet, one whose fold failed and healthy ones: each is written again
    from the log, none twice nor lost, the poisoned one stops at the poison, and the rebuilt model
    and the report's counts are the live model's. Streams in id order: ``healthy``, ``unfoldable``
    (a grant of no amount: ``users`` cannot fold it, the ledger cannot store it), ``poisoned``, ``later``."""
    monkeypatch.setattr(rebuilding, "COPY_ROWS", batch)
    url, app = own_log
    healthy, unfoldable, poisoned, later = (uuid.UUID(int=n) for n in range(1, 5))
    for stream, grants in ((healthy, [10, 10, 10, 10]), (unfoldable, [None]), (poisoned, [10, 10, 10, 2**31, 5]),
                           (later, [7] * 4)):
        _user_event(app, stream, 1)
        for version, amount in enumerate(grants, start=2):
            _user_event(app, stream, version, amount)
    with psycopg.connect(url, autocommit=True) as conn:
        _live_fold(conn, app)
        letters = sorted((d["model"], d["stream_id"], d["version"], d["status"]) for d in dead_letters(conn))
        assert [(m, s, v) for m, s, v, status in letters if status == "parked"] == [
            ("billing_events", unfoldable, 2), ("billing_events", poisoned, 5),
            ("users", unfoldable, 2), ("users", poisoned, 5)]
        for name in ("users", "billing_events"):
            live = _model_contents(conn, name)
            report = rebuild(url, app.recorder, app.mapper.transcoder, name)
            assert _model_contents(conn, name) == live, name
            assert (report.events, report.failed_streams, report.rows) == (18, 2, len(live[0])), name
            assert report.ledger_rows == (len(live[2]) if name == "billing_events" else 0)
        assert sorted((d["model"], d["stream_id"], d["version"], d["status"])
                      for d in dead_letters(conn)) == letters
        credits = dict(conn.execute("SELECT id, credits FROM palette_read.users").fetchall())
        assert credits == {healthy: 40, unfoldable: 0, poisoned: 30, later: 28}


@pytest.mark.parametrize("poison", [None, "x\x00y"], ids=["the fold fails", "postgres refuses the name"])
def test_a_bad_event_written_during_a_rebuild_is_parked_and_the_rebuild_completes(own_log, poison):
    """The rebuild folds what the log held when it began, then, under the model's lock, what came
    after: an event of that tail that cannot be folded is parked (its stream's later events held
    behind it) like any other, and the rebuild swaps its tables in. (Before, the tail was applied
    with parking off: that one event failed the whole rebuild.)"""
    url, app = own_log
    poisoned, healthy = uuid.uuid4(), uuid.uuid4()
    _rule_event(app, poisoned, 1, "first")

    class WrittenDuring:
        """The event store's recorder, on which the poison and a healthy stream's event are
        written right after the rebuild has read where the log ends."""

        def __getattr__(self, name: str) -> Any:
            return getattr(app.recorder, name)

        def max_notification_id(self) -> int:
            top = int(app.recorder.max_notification_id() or 0)
            _rule_event(app, poisoned, 2, poison)
            _rule_event(app, poisoned, 3, None, deleted=True)  # the poison's name would stay
            _rule_event(app, healthy, 1, "healthy")
            return top

    with psycopg.connect(url, autocommit=True) as conn:
        _live_fold(conn, app)
        report = rebuild(url, WrittenDuring(), app.mapper.transcoder, "rules")
        assert report.events == 4
        assert _rule_letters(conn, poisoned) == [(2, "parked"), (3, "held")]
        names = dict(conn.execute("SELECT id, name FROM palette_read.rules").fetchall())
        assert names == {poisoned: "first", healthy: "healthy"}
        assert table_contents(conn, "rules_tracking", ("stream_id", "version")) == {
            (str(poisoned), 1), (str(healthy), 1)}


def _failing_on_later(model: Any) -> Any:
    """``model`` with a fold bug: an event that names its rule "later" raises (fixed since)."""
    def evolve(rows: Any, env: EventEnvelope) -> Any:
        if env.data.get("name") == "later":
            raise RuntimeError("a fold bug, fixed since")
        return model.evolve(rows, env)

    return dataclasses.replace(model, evolve=evolve)


@pytest.mark.parametrize("action", ["skip", "retry"])
def test_a_resolved_dead_letter_parks_the_held_event_postgres_refuses_not_the_one_before_it(
        own_log, monkeypatch, action):
    """`dlq skip` and `dlq retry` fold the stream's held events again; when PostgreSQL refuses
    the rows of one of them (a rule renamed to a name with a NUL), the events before it are
    folded and that one is parked, as the live projector's isolation does. (Before, the held
    events went in as one batch and, when its write failed, the first of them was parked with
    the other's error: a healthy event blamed, the row left before it, and `dlq skip` of the
    blamed one then lost a good event.) For ``retry``, v2 was parked by a fold since fixed."""
    url, app = own_log
    rule = uuid.uuid4()
    _rule_event(app, rule, 1, "first")
    _rule_event(app, rule, 2, None if action == "skip" else "later")  # skip: a poison for good
    if action == "skip":
        _rule_event(app, rule, 3, "later")
    _rule_event(app, rule, 4 if action == "skip" else 3, "x\x00y")  # postgres refuses it
    last = 4 if action == "skip" else 3
    model = READ_MODELS["rules"]
    broken = _failing_on_later(model)

    with psycopg.connect(url, autocommit=True) as conn:
        if action == "retry":
            monkeypatch.setitem(READ_MODELS, "rules", broken)
        _live_fold(conn, app)
        monkeypatch.setitem(READ_MODELS, "rules", model)  # the code fixed
        held = [(v, "held") for v in range(3, last + 1)]
        assert _rule_letters(conn, rule) == [(2, "parked"), *held]
        parked = next(d for d in dead_letters(conn) if d["stream_id"] == rule and d["status"] == "parked")
        resolve_dead_letter(conn, parked["id"], action)
        letters = [d for d in dead_letters(conn, ("parked", "held")) if d["stream_id"] == rule]
        assert [(d["version"], d["status"]) for d in letters] == [(last, "parked")]
        assert "0x00" in letters[0]["error"] or "NUL" in letters[0]["error"]
        assert conn.execute("SELECT name FROM palette_read.rules WHERE id = %s", [rule]).fetchone() == ("later",)
        assert conn.execute("SELECT version FROM palette_read.rules_tracking WHERE stream_id = %s",
                            [rule]).fetchone() == (last - 1,)


@pytest.mark.parametrize("action", ["skip", "retry"])
def test_a_resolved_dead_letter_folds_the_event_the_broker_lost_behind_it_from_the_log(own_log, monkeypatch, action):
    """A stream held behind a parked event takes its later events as they come, holes and all (a
    held event is not folded, so no hole is filled then): the broker lost v3, v4 came and was
    held. `dlq retry` (of a fold since fixed) and `dlq skip` fold what is held again: they read
    the missing version from the log as the projector does, so v3 and v4 are folded in order.
    (Before, they folded no further than the hole and deleted v4's letter: v4 was neither folded
    nor held, the sweep had passed it, and the rule stayed undeleted in the read model.)"""
    url, app = own_log
    rule = uuid.uuid4()
    _rule_event(app, rule, 1, "first")
    _rule_event(app, rule, 2, None if action == "skip" else "later")
    _rule_event(app, rule, 3, "third")
    _rule_event(app, rule, 4, "third", deleted=True)
    model = READ_MODELS["rules"]
    broken = _failing_on_later(model)

    with psycopg.connect(url, autocommit=True) as conn:
        envelopes = [e for e in iter_envelopes(app.recorder, app.mapper.transcoder, 1, None) if e.stream_id == rule]
        reader = LogReader.of(app)
        if action == "retry":
            monkeypatch.setitem(READ_MODELS, "rules", broken)
        apply_isolating(conn, envelopes[:2], reader.stream_events, models=[READ_MODELS["rules"]])
        apply_isolating(conn, envelopes[3:], reader.stream_events, models=[READ_MODELS["rules"]])  # v3 lost
        monkeypatch.setitem(READ_MODELS, "rules", model)  # the code fixed
        assert _rule_letters(conn, rule) == [(2, "parked"), (4, "held")]
        parked = next(d for d in dead_letters(conn) if d["stream_id"] == rule and d["status"] == "parked")
        result = resolve_dead_letter(conn, parked["id"], action, reader.stream_events)
        assert result.applied == (2 if action == "skip" else 3)
        assert [d for d in dead_letters(conn) if d["stream_id"] == rule] == []
        assert conn.execute("SELECT name, deleted FROM palette_read.rules WHERE id = %s",
                            [rule]).fetchone() == ("third", True)
        assert conn.execute("SELECT version FROM palette_read.rules_tracking WHERE stream_id = %s",
                            [rule]).fetchone() == (4,)


def test_a_rebuild_that_folds_a_parked_event_its_streams_last_leaves_no_letter_holding_its_stream(
        own_log, monkeypatch):
    """The parked event is the stream's last (nothing held behind it): the rebuild folds it, its
    tracking stands at that very version, and the letter is resolved, so the stream's next
    event is folded, not held behind it."""
    url, app = own_log
    rule = uuid.uuid4()
    _rule_event(app, rule, 1, "first")
    _rule_event(app, rule, 2, "later")
    model = READ_MODELS["rules"]
    with psycopg.connect(url, autocommit=True) as conn:
        monkeypatch.setitem(READ_MODELS, "rules", _failing_on_later(model))
        apply_isolating(conn, list(iter_envelopes(app.recorder, app.mapper.transcoder, 1, None)),
                        models=[READ_MODELS["rules"]])
        monkeypatch.setitem(READ_MODELS, "rules", model)  # the code fixed
        assert _rule_letters(conn, rule) == [(2, "parked")]

        rebuild(url, app.recorder, app.mapper.transcoder, "rules")
        assert conn.execute("SELECT name FROM palette_read.rules WHERE id = %s", [rule]).fetchone() == ("later",)
        assert _rule_letters(conn, rule) == []
        _rule_event(app, rule, 3, "third")
        assert _live_fold(conn, app).applied == 1
        assert conn.execute("SELECT name FROM palette_read.rules WHERE id = %s", [rule]).fetchone() == ("third",)


@pytest.mark.parametrize("cause", ["a fold since fixed", "a row postgres refused, renamed since"])
def test_a_rebuild_that_folds_a_parked_event_leaves_no_letter_holding_its_stream(own_log, monkeypatch, cause):
    """The live model parked v2 (its fold failed, or PostgreSQL refused the row it made) and held
    v3 behind it; a rebuild folds the log afresh (the fold fixed; the refused name renamed by v3
    before any row is written) and folds both. The stream's letters then name events the rebuilt
    model has folded: the rebuild resolves them (as `dlq retry` would), so the stream's next
    event is folded, not held. (Before, they stayed: every later event of the stream was held
    behind a parked event already folded, until an operator retried it.)"""
    url, app = own_log
    rule = uuid.uuid4()
    _rule_event(app, rule, 1, "first")
    _rule_event(app, rule, 2, "later" if cause.startswith("a fold") else "x\x00y")
    _rule_event(app, rule, 3, "third")
    model = READ_MODELS["rules"]
    broken = _failing_on_later(model)

    with psycopg.connect(url, autocommit=True) as conn:
        envelopes = list(iter_envelopes(app.recorder, app.mapper.transcoder, 1, None))
        monkeypatch.setitem(READ_MODELS, "rules", broken)
        apply_isolating(conn, envelopes[:2], models=[READ_MODELS["rules"]])
        apply_isolating(conn, envelopes[2:], models=[READ_MODELS["rules"]])
        monkeypatch.setitem(READ_MODELS, "rules", model)  # the code fixed
        assert _rule_letters(conn, rule) == [(2, "parked"), (3, "held")]

        rebuild(url, app.recorder, app.mapper.transcoder, "rules")
        assert conn.execute("SELECT name FROM palette_read.rules WHERE id = %s", [rule]).fetchone() == ("third",)
        assert _rule_letters(conn, rule) == []
        _rule_event(app, rule, 4, "fourth")
        assert _live_fold(conn, app).applied == 1
        assert _rule_letters(conn, rule) == []
        assert conn.execute("SELECT name FROM palette_read.rules WHERE id = %s", [rule]).fetchone() == ("fourth",)
