"""A projector that comes back far behind the log catches up from the event store (large pages,
bulk writes), survives a crash between two pages with nothing lost and nothing counted twice,
and then goes on live with the broker; a poison event in a bulk page is parked and holds back
its own stream only, as on the live path."""

from __future__ import annotations

import logging
import random
import re
import socket
import subprocess
import sys
import threading
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from adapters.bootstrap import build_projector
from adapters.settings import Settings
from application.services import PaletteService
from domain.contracts.envelope import EventEnvelope, encode
from infra.supervisor import StackError
from projections.catchup import CatchUp
from projections.log import LogReader, events_table
from projections.models import READ_MODELS
from projections.models.billing_events import BILLING
from projections.rebuild import fold_log, iter_envelopes
from projections.store import BULK_ROWS, BatchResult, dead_letters, oldest_needed

from .test_projections import assert_models_equal_fold, drained, service, workload  # noqa: F401 - shared fixtures
from .test_stack import wait_until

THRESHOLD = 50  # events behind that make the projector catch up from the log
PAGE = 40  # small pages: the backlog takes several, and the crash falls between two


class Crash(RuntimeError):
    """Injected right after a page's transaction committed."""


def start_projector_again(apps: Any) -> None:
    """The stack's projector started again after a test stopped it. Known issue, not fixed: on a
    fast host, after the broker-killing tests, the embedded broker (Tansu 0.6) sometimes holds
    every join of palette-projections until it restarts (seen 2026-12-02 with this code and the
    code before: a new group joined in 5 s, this one not in 40; the clean-clone CI's projector
    was not ready for minutes). While it lasts, the read side moves only if the projector is
    tailing the event log after a loss, and a projector started then is never ready; a broker
    restarted in peace clears it, so that is done here, loudly, rather than failing every later
    test (README: "Not fixed")."""
    try:
        apps.start_app("projector")
    except StackError as e:
        if "not ready" not in str(e):
            raise
        warnings.warn(f"the embedded broker held the projector's group join; restarting it: {str(e)[:200]}",
                      stacklevel=2)
        apps.stop_app("projector")
        apps.supervisor.restart("broker")
        apps.start_app("projector")


@pytest.fixture
def stopped_projector(apps: Any) -> Iterator[Any]:
    """The stack's projector process stopped for the test (the test runs its own); started after."""
    apps.stop_app("projector")
    try:
        yield apps
    finally:
        start_projector_again(apps)


def projector_for(settings: Settings) -> Any:
    """A projector catching up in one process (the crash below falls between two of its pages)."""
    projector = build_projector(settings.model_copy(update={"projector_catchup_events": THRESHOLD,
                                                            "projector_catchup_processes": 1}))
    projector.catchup.page = PAGE
    return projector


def ledger_oracle(app: Any) -> tuple[int, int]:
    """Rows and total amount of the billing ledger folded from the whole log."""
    _, appended, _, _, _ = fold_log(BILLING, iter_envelopes(app.recorder, app.mapper.transcoder, 1, None))
    return len(appended), sum(r["amount"] for r in appended)


def ledger_in(db: psycopg.Connection[Any]) -> tuple[int, int, int]:
    """Rows, distinct (user, seq) pairs and total amount of the projected billing ledger."""
    row = db.execute("SELECT count(*), count(DISTINCT (user_id, seq)), coalesce(sum(amount), 0) "
                     "FROM palette_read.billing_events").fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def test_a_projector_far_behind_catches_up_from_the_log_through_a_crash_then_goes_live(
        stopped_projector: Any, service: PaletteService, conn: psycopg.Connection[Any],  # noqa: F811
        settings: Settings) -> None:
    wait_until(lambda: drained(service, conn), timeout_s=60, what="the read models to fold the log so far")
    # Tests that fold synthetic events far past the log leave positions there: back to the log.
    conn.execute("UPDATE palette_read.positions SET position = LEAST(position, %s)",
                 [int(service.app.recorder.max_notification_id() or 0)])
    workload(service, 8, random.Random(21))  # the backlog, written while no projector runs
    head = int(service.app.recorder.max_notification_id() or 0)

    # Both built before the first page: building one ensures the schema, and its migration of
    # raw device hashes (projections.schema.drop_raw_device_hashes) also clears sealed device
    # keys, which would set the users the first page folded apart from the fold of the log.
    first, second = projector_for(settings), projector_for(settings)
    pages: list[int] = []

    def crash_after_the_first_page(position: int) -> None:
        pages.append(position)
        raise Crash(position)

    first.catchup.after_page = crash_after_the_first_page
    try:
        with pytest.raises(Crash):
            first.catch_up()
    finally:
        first.close()
    assert len(pages) == 1 and pages[0] < head  # it crashed between two pages
    rows, distinct, _ = ledger_in(conn)
    assert rows == distinct  # nothing twice so far

    folded: list[int] = []
    second.catchup.after_page = folded.append
    try:
        assert second.catch_up() > 0
        assert second.caught_up_to >= head and len(folded) >= 2 and folded[0] > pages[0]
        assert second.totals.applied > 0
        assert drained(service, conn)  # the catch-up alone folded the whole backlog
        assert_models_equal_fold(service.app, conn)
        expected_rows, expected_amount = ledger_oracle(service.app)
        assert ledger_in(conn) == (expected_rows, expected_rows, expected_amount)

        # Live mode: the broker's copies of the backlog are dropped, what comes next is folded.
        workload(service, 1, random.Random(22))
        later = int(service.app.recorder.max_notification_id() or 0)
        assert later - head < THRESHOLD  # too little for another catch-up: the broker brings it

        def live() -> bool:
            second.step()
            return drained(service, conn)

        wait_until(live, timeout_s=120, what="the live projector to fold the new events")
        assert second.caught_up_to < later  # (dropping the broker's copies: tests/unit/test_projector_catchup.py)
        assert_models_equal_fold(service.app, conn)
        expected_rows, expected_amount = ledger_oracle(service.app)
        assert ledger_in(conn) == (expected_rows, expected_rows, expected_amount)
    finally:
        second.close()


def test_a_catch_up_folds_the_oldest_event_needed_even_when_it_ends_its_stream(
        stopped_projector: Any, service: PaletteService, conn: psycopg.Connection[Any],  # noqa: F811
        settings: Settings) -> None:
    """The catch-up starts right before the oldest event any of its models still needs (here a
    rule's, older than a user's): one that is the last of its stream has no later event whose
    hole would have it read from the log."""
    wait_until(lambda: drained(service, conn), timeout_s=60, what="the read models to fold the log so far")
    projector = projector_for(settings)
    edits = {"floor": {"action": "texture", "value": "wood"}}

    def catch_up() -> None:
        projector.catchup.catch_up_to(int(service.app.recorder.max_notification_id() or 0), BatchResult())

    try:
        user_id = service.register(f"catchup-{uuid.uuid4()}").value[0]
        rule_id = service.create_rule(user_id, "r", "interior", edits).value
        catch_up()
        assert drained(service, conn)
        service.update_rule(user_id, rule_id, "s", edits)  # the rule's last event, before another user's
        service.register(f"catchup-{uuid.uuid4()}")
        catch_up()
        assert drained(service, conn)
    finally:
        projector.close()


def test_a_catch_up_the_log_outgrew_by_less_than_the_threshold_answers_the_head_it_folded_to(
        stopped_projector: Any, service: PaletteService, conn: psycopg.Connection[Any],  # noqa: F811
        settings: Settings) -> None:
    """Events written during a catch-up, fewer than the threshold, come through the broker: the
    position it answers (the projector drops the broker's copies up to there) is the head it
    folded to, not the log's head after it, or those events would be dropped unfolded."""
    wait_until(lambda: drained(service, conn), timeout_s=60, what="the read models to fold the log so far")
    conn.execute("UPDATE palette_read.positions SET position = LEAST(position, %s)",
                 [int(service.app.recorder.max_notification_id() or 0)])
    workload(service, 8, random.Random(23))  # the backlog, written while no projector runs
    projector = projector_for(settings)
    meanwhile: list[int] = []

    def write_meanwhile(position: int) -> None:
        if not meanwhile:  # after the first page: a user registers
            service.register(f"meanwhile-{uuid.uuid4()}")
            meanwhile.append(int(service.app.recorder.max_notification_id() or 0))

    projector.catchup.after_page = write_meanwhile
    try:
        done = projector.catchup.run()
        assert done is not None and meanwhile
        position, result = done
        assert result.applied > 0 and position < meanwhile[0]
        assert not drained(service, conn)  # the new user waits for the broker
    finally:
        projector.close()


def test_an_event_parked_for_one_model_is_not_where_its_catch_up_starts_but_is_for_the_others(
        stopped_projector: Any, service: PaletteService, conn: psycopg.Connection[Any]) -> None:  # noqa: F811
    """A retry reads a parked event from the dead letters: the log is read from the oldest event
    a model needs and has not parked (a catch-up's start, a republish after a broker loss)."""
    wait_until(lambda: drained(service, conn), timeout_s=60, what="the read models to fold the log so far")
    user_id = service.register(f"parked-{uuid.uuid4()}").value[0]
    app, events = service.app, events_table(service.app.recorder)
    first = next(e for e in iter_envelopes(app.recorder, app.mapper.transcoder, 1, None) if e.stream_id == user_id)
    users, billing = READ_MODELS["users"], READ_MODELS["billing_events"]
    assert oldest_needed(conn, users, events) == oldest_needed(conn, billing, events) == first.id
    later = [e for e in iter_envelopes(app.recorder, app.mapper.transcoder, first.id + 1, None)
             if e.stream_id == user_id]
    assert later  # the sign-up credits
    conn.execute("INSERT INTO palette_read.dead_letters (model, stream_id, version, position, envelope, error, status) "
                 "VALUES ('users', %s, 1, %s, %s, 'test', 'parked')", [user_id, first.id, encode(first)])
    try:
        # The stream's next event was not delivered yet: it is needed, to be held behind the parked one
        # (started after it, a catch-up would skip the broker's copy of it, and nothing would hold it).
        assert oldest_needed(conn, users, events) == later[0].id
        assert oldest_needed(conn, billing, events) == first.id
        for e in later:
            conn.execute("INSERT INTO palette_read.dead_letters (model, stream_id, version, position, envelope, "
                         "error, status) VALUES ('users', %s, %s, %s, %s, 'test', 'held')",
                         [user_id, e.version, e.id, encode(e)])
        assert oldest_needed(conn, users, events) is None
    finally:
        conn.execute("DELETE FROM palette_read.dead_letters WHERE stream_id = %s", [user_id])


class PagedLog:
    """A log of synthetic events (positions far past the real log's), read as ``LogReader`` reads."""

    def __init__(self, envelopes: list[EventEnvelope]) -> None:
        self.envelopes = envelopes

    def read(self, after: int, upto: int, limit: int, stream_types: Any = ()) -> list[EventEnvelope]:
        return [e for e in self.envelopes if after < e.id <= upto][:limit]

    def stream_events(self, gaps: Any) -> list[EventEnvelope]:
        return []


def test_a_poison_event_in_a_bulk_page_is_parked_and_holds_back_only_its_stream(
        apps: Any, conn: psycopg.Connection[Any]) -> None:
    base = 10**12 + random.randrange(10**9)
    healthy = [uuid.uuid4() for _ in range(BULK_ROWS + 100)]
    poisoned = uuid.uuid4()
    user = str(uuid.uuid4())

    def created(stream: uuid.UUID, position: int, **data: Any) -> EventEnvelope:
        return EventEnvelope(id=position, stream_id=stream, stream_type="Job", version=1, type="JobCreated",
                             timestamp=datetime.now(UTC), data={"user_id": user, "item_count": 1, **data})

    events = [created(poisoned, base)]  # no preset: jobs_log cannot fold it
    events += [created(s, base + 1 + i, preset="interior") for i, s in enumerate(healthy)]
    events.append(EventEnvelope(id=base + len(events), stream_id=poisoned, stream_type="Job", version=2,
                                type="UploadConfirmed", timestamp=datetime.now(UTC), data={}))
    positions = dict(conn.execute("SELECT model, position FROM palette_read.positions").fetchall())
    streams = [poisoned, *healthy]
    try:
        total = BatchResult()
        catchup = CatchUp(conn, PagedLog(events), threshold=1, page=BULK_ROWS + 50)  # type: ignore[arg-type]
        assert catchup.fold(base - 1, events[-1].id, total) == events[-1].id
        folded = conn.execute("SELECT count(*) FROM palette_read.jobs_log WHERE id = ANY(%s) AND status = 'created'",
                              [healthy]).fetchone()
        assert folded == (len(healthy),)
        assert conn.execute("SELECT 1 FROM palette_read.jobs_log WHERE id = %s", [poisoned]).fetchone() is None
        items = conn.execute("SELECT count(*) FROM palette_read.job_items_log WHERE job_id = ANY(%s)",
                             [streams]).fetchone()
        assert items == (len(streams),)  # the other model folds the poisoned stream
        letters = [(d["version"], d["status"]) for d in dead_letters(conn)
                   if d["stream_id"] == poisoned and d["model"] == "jobs_log"]
        assert letters == [(1, "parked"), (2, "held")] and total.parked == 2
    finally:  # the session's read models a fold of the real log again
        for tbl, column in (("jobs_log", "id"), ("jobs_log_tracking", "stream_id"), ("job_items_log", "job_id"),
                            ("job_items_log_tracking", "stream_id"), ("dead_letters", "stream_id")):
            conn.execute(sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(
                sql.Identifier("palette_read", tbl), sql.Identifier(column)), [streams])
        for model, position in positions.items():
            conn.execute("UPDATE palette_read.positions SET position = %s WHERE model = %s", [position, model])


def backlog_while_stopped(svc: PaletteService, conn: psycopg.Connection[Any], seed: int) -> int:
    """The read models drained, then a backlog written while no projector runs; its head."""
    wait_until(lambda: drained(svc, conn), timeout_s=60, what="the read models to fold the log so far")
    conn.execute("UPDATE palette_read.positions SET position = LEAST(position, %s)",
                 [int(svc.app.recorder.max_notification_id() or 0)])
    workload(svc, 8, random.Random(seed))
    return int(svc.app.recorder.max_notification_id() or 0)


def two_group_projector(settings: Settings) -> Any:
    return build_projector(settings.model_copy(update={"projector_catchup_events": THRESHOLD,
                                                       "projector_catchup_processes": 2}))


def assert_read_side_is_the_fold(svc: PaletteService, conn: psycopg.Connection[Any]) -> None:
    assert drained(svc, conn)
    assert_models_equal_fold(svc.app, conn)
    expected_rows, expected_amount = ledger_oracle(svc.app)
    assert ledger_in(conn) == (expected_rows, expected_rows, expected_amount)


def folded_here_after(projector: Any, head: int, svc: PaletteService, conn: psycopg.Connection[Any],
                      caplog: pytest.LogCaptureFixture) -> str:
    """Catch up with ``projector`` (its process beside bound to fail), check the read side, and
    return the projector's warning that it folded the other group itself."""
    try:
        with caplog.at_level(logging.WARNING, logger="palette.projector"):
            assert projector.catch_up() > 0
        fallbacks = [r.getMessage() for r in caplog.records if "folding them here" in r.getMessage()]
        assert fallbacks and projector.caught_up_to >= head
        assert_read_side_is_the_fold(svc, conn)
        return fallbacks[0]
    finally:
        projector.close()


def test_a_catch_up_folds_one_group_of_models_here_and_the_other_in_a_process_beside(
        stopped_projector: Any, service: PaletteService, conn: psycopg.Connection[Any],  # noqa: F811
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    head = backlog_while_stopped(service, conn, 31)
    projector = two_group_projector(settings)
    try:
        here = {m.name for m in projector.catchup.chosen}
        beside = set(READ_MODELS) - here  # the other process's
        assert here and beside
        mine: list[int] = []
        projector.catchup.after_page = mine.append  # only this process's pages come here
        answers: list[BatchResult] = []
        started = projector.catchup.beside

        def recorded(upto: int) -> Any:
            wait = started(upto)
            return lambda: answers.append(wait()) or answers[-1]

        projector.catchup.beside = recorded
        with caplog.at_level(logging.WARNING, logger="palette.projector"):
            assert projector.catch_up() > 0
        assert not any("folding them here" in r.getMessage() for r in caplog.records)
        assert projector.caught_up_to >= head and mine
        assert len(answers) == 1 and set(answers[0].per_model) == beside and answers[0].applied > 0
        # Each group read only its streams' events, and every model's position reached the head
        # all the same (the lag GET /jobs reports comes from them).
        positions = dict(conn.execute("SELECT model, position FROM palette_read.positions").fetchall())
        assert all(positions[name] >= head for name in READ_MODELS), positions

        # Positions far behind with nothing left to fold (no group needs an event): one more
        # catch-up brings them to the head, and the next finds nothing to do.
        conn.execute("UPDATE palette_read.positions SET position = %s", [head - 10 * THRESHOLD])
        projector.catchup.run()
        positions = dict(conn.execute("SELECT model, position FROM palette_read.positions").fetchall())
        assert all(positions[name] >= head for name in READ_MODELS), positions
        assert projector.catchup.run() is None
        assert_read_side_is_the_fold(service, conn)
    finally:
        projector.close()


def test_a_group_whose_process_fails_is_folded_by_the_projector_itself(
        stopped_projector: Any, service: PaletteService, conn: psycopg.Connection[Any],  # noqa: F811
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    head = backlog_while_stopped(service, conn, 32)
    projector = two_group_projector(settings)
    with socket.socket() as s:  # the process beside gets a database nothing listens on
        s.bind(("127.0.0.1", 0))
        nowhere = s.getsockname()[1]
    projector.catchup.beside.settings_json = settings.model_copy(update={
        "database_url": f"postgresql://postgres@127.0.0.1:{nowhere}/palette?connect_timeout=2"}).model_dump_json()
    assert "OperationalError" in folded_here_after(projector, head, service, conn, caplog)


def test_a_process_that_makes_no_progress_is_stopped_and_its_group_is_folded_here(
        stopped_projector: Any, service: PaletteService, conn: psycopg.Connection[Any],  # noqa: F811
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    head = backlog_while_stopped(service, conn, 35)
    projector = two_group_projector(settings)
    projector.catchup.beside.stall_s = 1.0
    assert "jobs_log" not in {m.name for m in projector.catchup.chosen}  # the process beside folds it

    def stopped() -> bool:
        return any("sent nothing" in r.getMessage() for r in caplog.records)

    # The table the process beside writes is locked (a database that stopped answering it): its
    # first page waits, with nothing to time it out. The projector stops it and ends its database
    # session; then the lock goes, and the projector folds the group itself.
    with psycopg.connect(settings.effective_database_url) as locker:
        locker.execute("LOCK TABLE palette_read.jobs_log IN ACCESS EXCLUSIVE MODE")

        def release() -> None:
            try:
                wait_until(stopped, timeout_s=60, what="the projector to stop its stalled process")
            finally:
                locker.rollback()

        releaser = threading.Thread(target=release, daemon=True)
        releaser.start()
        warning = folded_here_after(projector, head, service, conn, caplog)
        releaser.join()
    assert "sent nothing for 1 s" in warning
    ended = re.search(r"its database session: (\d+) ended", warning)
    assert ended, warning  # it was waiting on the lock, not gone
    assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [int(ended[1])]).fetchone() == (0,)


def test_a_process_whose_projector_is_gone_stops_and_its_group_is_folded_here(
        stopped_projector: Any, service: PaletteService, conn: psycopg.Connection[Any],  # noqa: F811
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    head = backlog_while_stopped(service, conn, 33)
    projector = two_group_projector(settings)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    projector.catchup.beside.pid = gone.pid  # the process beside finds "its projector" dead after a page
    assert "ended with code 0" in folded_here_after(projector, head, service, conn, caplog)  # it sent nothing


def test_the_log_read_for_some_stream_types_is_the_whole_log_filtered(
        service: PaletteService, settings: Settings) -> None:  # noqa: F811
    workload(service, 2, random.Random(34))
    reader = LogReader(service.app.recorder, service.app.mapper.transcoder)
    head = reader.head()
    whole = reader.read(0, head, 10**7)
    assert {e.stream_type for e in whole} >= {"User", "Job", "Rule"}
    for kinds in (["User"], ["Job", "Rule"], ["Rule"]):
        expected = [e.id for e in whole if e.stream_type in kinds]
        assert [e.id for e in reader.read(0, head, 10**7, kinds)] == expected
        limited = reader.read(expected[0], head, 5, kinds)  # a page: after a position, at most a limit
        assert [e.id for e in limited] == expected[1:6]
