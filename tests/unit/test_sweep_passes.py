"""One sweep's passes each run on their own: a pass that fails (a job whose objects S3 keeps
refusing to delete held the retention pass, and with it every pass after it, for as long as it
failed) is logged and the others still run; `palette admin sweep` says so in one line, no
traceback, and exits 1."""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import psycopg
import pytest
from botocore.exceptions import ClientError

from adapters import bootstrap, cli
from adapters.cli import operators
from adapters.retention import Sweeper
from application.unit_of_work import ConflictError
from domain.errors import DomainError
from domain.job import Job

NOW = datetime(2026, 12, 6, tzinfo=UTC)


def failing_sweeper(ran: list[str], retention_error: Exception) -> Sweeper:
    """A sweeper whose retention pass fails with ``retention_error`` (after deleting an object of a
    job) and whose snapshots pass meets PostgreSQL away; the others count what they did."""
    sweeper = Sweeper.__new__(Sweeper)  # no container: the passes below are the sweep's only work
    sweeper.settings = SimpleNamespace(retention_days=30, unpaid_retention_days=7)  # type: ignore[assignment]

    def retention(cutoff: datetime, report: object) -> None:
        ran.append("retention")
        report.objects_deleted += 1  # type: ignore[attr-defined]
        raise retention_error

    def counting(name: str, count: int):  # type: ignore[no-untyped-def]
        def run(*_args: object) -> int:
            ran.append(name)
            return count
        return run

    def snapshots() -> int:
        ran.append("snapshots")
        raise psycopg.OperationalError("connection refused")

    sweeper._retention = retention  # type: ignore[method-assign]
    sweeper._abandoned = counting("abandoned", 0)  # type: ignore[method-assign]
    sweeper._unpaid = counting("unpaid", 0)  # type: ignore[method-assign]
    sweeper.finish_erasures = counting("erasures", 2)  # type: ignore[method-assign]
    sweeper._late_uploads = counting("late uploads", 3)  # type: ignore[method-assign]
    sweeper._oversized_uploads = counting("oversized uploads", 4)  # type: ignore[method-assign]
    sweeper.superseded_snapshots = snapshots  # type: ignore[method-assign]
    return sweeper


REFUSED = ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}}, "DeleteObjects")


@pytest.mark.parametrize("error", [REFUSED, ConflictError("job stream kept conflicting")],
                         ids=["s3-refused", "conflict"])
def test_a_failing_pass_is_logged_and_every_other_pass_still_runs(caplog, error: Exception) -> None:
    """A job's stream that keeps conflicting past the retries (a command of its user each time)
    fails the pass too, for the next sweep: it used to end the sweeper process."""
    ran: list[str] = []
    with caplog.at_level(logging.WARNING, logger="palette.sweeper"):
        report = failing_sweeper(ran, error).step(now=NOW)
    assert ran == ["retention", "abandoned", "unpaid", "erasures", "late uploads", "oversized uploads", "snapshots"]
    assert [(r.getMessage().split(";")[0], type(r.exc_info[1]).__name__) for r in caplog.records] == [
        ("the retention pass failed", type(error).__name__), ("the snapshots pass failed", "OperationalError")]
    assert (report.erasures_finished, report.objects_deleted, report.snapshots_deleted) == (2, 1 + 3 + 4, 0)


def test_an_error_no_pass_expects_is_not_taken_for_a_store_away() -> None:
    """A bug is not logged and passed over as a failed pass: it stops the sweep, as before."""
    ran: list[str] = []
    with pytest.raises(ZeroDivisionError):
        failing_sweeper(ran, ZeroDivisionError()).step(now=NOW)
    assert ran == ["retention"]


def test_palette_admin_sweep_says_what_failed_in_one_line_and_exits_1(monkeypatch, capsys) -> None:
    sweeper = failing_sweeper([], REFUSED)
    sweeper.close = lambda: None  # type: ignore[method-assign]
    monkeypatch.setattr(operators, "running_settings",
                        lambda: SimpleNamespace(retention_days=30, unpaid_retention_days=7))
    monkeypatch.setattr(bootstrap, "build_sweeper", lambda _settings: sweeper)
    monkeypatch.setattr(operators, "reach_database", lambda _settings: None)  # no PostgreSQL here
    monkeypatch.setattr(sweeper, "step", lambda **kw: Sweeper.step(sweeper, now=NOW, **kw))
    assert cli.main(["admin", "sweep"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("swept: 0 job(s) expired") and "2 erasure(s) finished, 8 object(s) deleted" in out
    assert err.splitlines() == [
        "palette admin sweep: the retention pass failed (and 1 more thing(s)), the rest of the pass done: "
        "ClientError: An error occurred (AccessDenied) when calling the DeleteObjects operation: denied"]


def test_a_long_sweep_says_which_pass_it_is_in_and_a_short_one_nothing() -> None:
    """Over a large backlog a pass runs minutes (260 s silent on a 2M-event log): `palette admin
    sweep` says on stderr, every few seconds, which pass it is in."""
    lines: list[str] = []
    told = threading.Event()

    def say(line: str) -> None:
        lines.append(line)
        if "oversized uploads" in line:
            told.set()

    sweeper = failing_sweeper([], REFUSED)
    sweeper._oversized_uploads = lambda *_: 0 if told.wait(30) else -1  # type: ignore[method-assign]
    sweeper.step = lambda **kw: Sweeper.step(sweeper, now=NOW, **kw)  # type: ignore[method-assign]
    report = operators._sweep_saying_where(sweeper, every_s=0.01, say=say)
    assert told.is_set() and report.objects_deleted == 1 + 3
    assert all(line.startswith("  sweeping: the ") and line.endswith("s in") for line in lines)
    assert "  sweeping: the oversized uploads pass" in [line.split(",")[0] for line in lines]

    quiet: list[str] = []
    sweeper._oversized_uploads = lambda *_: 0  # type: ignore[method-assign]
    operators._sweep_saying_where(sweeper, every_s=60, say=quiet.append)
    assert quiet == []


def test_an_abandoned_job_whose_cancel_keeps_conflicting_stops_the_pass_before_it() -> None:
    """A conflict is no answer about the job (unlike "executed since", which passes over it): the
    abandoned pass stops there, its cursor not past the job, so the next sweep cancels it; it used
    to go on to the next job, leaving this one uncanceled for good."""
    jobs = [(uuid.uuid4(), uuid.uuid4()) for _ in range(3)]
    walked: list[uuid.UUID] = []

    def walk(_name: str, _page: object):  # type: ignore[no-untyped-def]
        for job_id, user_id in jobs:
            walked.append(job_id)
            yield job_id, user_id

    answers: dict[uuid.UUID, Exception] = {jobs[0][0]: DomainError("already executed"),
                                           jobs[1][0]: ConflictError("job stream kept conflicting")}

    def execute(command: uuid.UUID) -> object:
        raise answers[command]

    service = SimpleNamespace(
        executor=SimpleNamespace(read=lambda job_id: Job.create(job_id, uuid.uuid4(), "interior", 1, NOW),
                                 execute=execute),
        cancel_job_command=lambda _user_id, job_id, _reason, unless_started: job_id)
    sweeper = Sweeper.__new__(Sweeper)
    sweeper.container = SimpleNamespace(service=service)  # type: ignore[assignment]
    sweeper.settings = SimpleNamespace(retention_days=30)  # type: ignore[assignment]
    sweeper._walk = walk  # type: ignore[method-assign]
    with pytest.raises(ConflictError):
        sweeper._abandoned(NOW, SimpleNamespace())  # type: ignore[arg-type]
    assert walked == [jobs[0][0], jobs[1][0]]
