"""The analysts' and auditors' commands against the session's stack: what cannot be answered is
said in one line with exit 2 (never a traceback, never a silent 0), an output path that cannot
be written is named with the OS's reason, and a reader that went away (`| head`) stops the
command quietly."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapters import checkpoints, cli
from adapters.cli.connect import event_store
from domain.text import one_line as escaped
from tests.unit.test_cli_outputs_and_pipes import into_closed_pipe


@pytest.fixture
def env(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    values = settings.as_env()
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    yield {"PATH": "/usr/bin:/bin", **values}


@pytest.fixture(scope="module")
def user(service: Any) -> uuid.UUID:
    """A user stream of two events (registered, sign-up credits)."""
    user_id: uuid.UUID = service.register(f"cli-{uuid.uuid4()}").value[0]
    return user_id


def one_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return captured.out


def head(settings: Any) -> int:
    app = event_store(settings)
    try:
        return int(app.recorder.max_notification_id() or 0)
    finally:
        app.close()


def test_replay_stream_of_an_unknown_stream_says_so(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    unknown = uuid.uuid4()
    assert cli.main(["replay", "stream", str(unknown)]) == 2
    assert one_line(capsys, f"palette replay stream: no stream {unknown}") == ""


def test_replay_stream_of_a_known_stream_prints_its_events(env: dict[str, str], user: uuid.UUID,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["replay", "stream", str(user)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and all(str(user) in line for line in lines)


def test_replay_all_as_jsonl_keeps_to_its_since_and_until(env: dict[str, str], user: uuid.UUID,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A window on the log is read event by event, not streamed as stored from --from to the head."""
    assert cli.main(["replay", "stream", str(user)]) == 0
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    since, until = datetime.fromisoformat(last["timestamp"]), datetime(2000, 1, 1, tzinfo=UTC)
    assert cli.main(["replay", "all", "--since", since.isoformat()]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert last["id"] in [e["id"] for e in events]
    assert all(datetime.fromisoformat(e["timestamp"]) >= since for e in events)
    assert cli.main(["replay", "all", "--until", until.isoformat()]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(datetime.fromisoformat(e["timestamp"]) <= until for e in events)


def test_replay_state_past_the_last_version_says_how_many_there_are(env: dict[str, str], user: uuid.UUID,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["replay", "state", str(user), "--version", "999"]) == 2
    assert one_line(capsys, f"stream {user} has only ", "version") == ""
    assert cli.main(["replay", "state", str(user), "--version", "0"]) == 2
    one_line(capsys, "--version must be 1 or more")
    assert cli.main(["replay", "state", str(user), "--version", "1"]) == 0
    assert '"version": 1' in capsys.readouterr().out


def test_replay_all_refuses_out_without_parquet(env: dict[str, str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    for fmt in ("jsonl", "csv"):
        assert cli.main(["replay", "all", "--format", fmt, "--out", str(tmp_path / "x")]) == 2
        assert one_line(capsys, "--out is for --format parquet") == ""
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", [["audit", "reconcile"],
                                     ["audit", "report", "--from", "2000-01-01", "--to", "2100-01-01"]])
def test_audit_at_a_position_the_log_does_not_have_is_refused(command: list[str], env: dict[str, str],
                                                              settings: Any, user: uuid.UUID,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    for past in (head(settings) + 1_000_000, head(settings) + 1):  # nothing here writes to the log meanwhile
        assert cli.main([*command, "--at", str(past)]) == 2
        assert one_line(capsys, f"palette {' '.join(command[:2])}: --at {past:,} is past the log's head") == ""
    assert cli.main([*command, "--at", "-1"]) == 2
    assert one_line(capsys, "--at must be a log position") == ""


@pytest.mark.parametrize("where", ["missing-dir", "a-directory", "the-signing-key", "a-nul-byte"])
def test_checkpoint_out_that_cannot_be_written_is_one_line(where: str, env: dict[str, str], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """An existing file is never overwritten, as keygen's is not: it may be a checkpoint kept, or
    the signing key itself (which a checkpoint written over it used to replace)."""
    key_file = tmp_path / "key.pem"
    checkpoints.keygen(key_file)
    key = key_file.read_bytes()
    monkeypatch.setenv("PALETTE_AUDIT_SIGNING_KEY_FILE", str(key_file))
    out = {"missing-dir": tmp_path / "none" / "x.json", "a-directory": tmp_path, "the-signing-key": key_file,
           "a-nul-byte": tmp_path / "x\x00.json"}[where]
    assert cli.main(["audit", "checkpoint", "--no-s3", "--out", str(out)]) == 2
    if where == "the-signing-key":
        one_line(capsys, f"palette audit checkpoint: {out} exists: a checkpoint file is never overwritten")
    else:
        one_line(capsys, f"palette audit checkpoint: cannot write {escaped(out)}: ", {  # the NUL as \x00
            "missing-dir": "No such file or directory", "a-directory": "Is a directory",
            "a-nul-byte": "embedded null byte"}[where])
    assert key_file.read_bytes() == key


@pytest.mark.parametrize("command", [["replay", "all", "--format", "parquet"], ["export", "users"]])
def test_a_dataset_out_under_a_file_is_one_line(command: list[str], env: dict[str, str], user: uuid.UUID,
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main([*command, "--out", str(blocker / "sub")]) == 2
    one_line(capsys, "cannot write", str(blocker), "Not a directory")


@pytest.mark.parametrize("command", [["replay", "all", "--format", "parquet"], ["export", "users"]])
def test_a_dataset_out_that_already_holds_one_is_one_line(command: list[str], env: dict[str, str], user: uuid.UUID,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    (out / "users").mkdir(parents=True)  # what `palette export users` wrote before
    (out / "type=UserRegistered").mkdir()  # and `palette replay all --format parquet`
    assert cli.main([*command, "--out", str(out)]) == 2  # its parts would mix with the new ones
    one_line(capsys, f"palette {' '.join(command[:2]) if command[0] == 'replay' else 'export'}: ", "already holds")


@pytest.mark.parametrize("command", [["audit", "export", "--format", "csv"],
                                     ["replay", "all", "--format", "jsonl"],
                                     ["replay", "all", "--format", "csv"],
                                     ["projections", "status"]])
def test_a_reader_gone_away_stops_the_command_quietly(command: list[str], env: dict[str, str],
                                                      user: uuid.UUID) -> None:
    result = into_closed_pipe(command, env)
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    assert "BrokenPipe" not in result.stderr
    assert result.returncode == cli.SIGPIPE_EXIT


def test_replay_stream_into_a_closed_pipe_stops_quietly(env: dict[str, str], user: uuid.UUID) -> None:
    result = into_closed_pipe(["replay", "stream", str(user)], env)
    assert result.stderr == "" and result.returncode == cli.SIGPIPE_EXIT


def test_the_one_line_is_what_a_shell_user_sees(env: dict[str, str]) -> None:
    """The same through the entry point, as a person runs it (stderr, exit status)."""
    unknown = uuid.uuid4()
    result = subprocess.run([sys.executable, "-m", "adapters.cli", "replay", "stream", str(unknown)],
                            capture_output=True, text=True, timeout=120, env=env, check=False,
                            cwd=Path(__file__).resolve().parents[2])
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"palette replay stream: no stream {unknown}\n")


def test_projections_rebuild_of_an_unknown_read_model_says_so(env: dict[str, str],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["projections", "rebuild", "no_such_model"]) == 2
    assert one_line(capsys, "palette projections rebuild: unknown read model 'no_such_model'") == ""


@pytest.mark.parametrize("verb", ["retry", "skip"])
def test_projections_dlq_of_a_letter_that_is_not_parked_says_so(verb: str, env: dict[str, str],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["projections", "dlq", verb, "2147483000"]) == 2
    assert one_line(capsys, "palette projections dlq: no parked event with id 2147483000") == ""


def test_projections_status_shows_the_head_and_every_read_model(env: dict[str, str], user: uuid.UUID,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from projections.models import READ_MODELS

    assert cli.main(["projections", "status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("event store head: ") and int(lines[0].rsplit(" ", 1)[1]) >= 2
    assert [line.split()[0] for line in lines[3:-1]] == list(READ_MODELS)
    assert lines[-1].startswith("dead letters (parked or held): ")


def test_audit_ledger_of_a_user_the_ledger_does_not_know_says_so(env: dict[str, str],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """As `audit balance` does: a mistyped id read as a user without a single entry (exit 0)."""
    nobody = uuid.uuid4()
    assert cli.main(["audit", "ledger", "--user", str(nobody)]) == 2
    assert one_line(capsys, f"palette audit ledger: no ledger entries for user {nobody} (no such user") == ""


def test_admin_erase_of_a_user_who_never_was_says_so(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    nobody = uuid.uuid4()
    assert cli.main(["admin", "erase", str(nobody)]) == 2
    assert one_line(capsys, f"palette admin erase: {nobody}: user not found") == ""


def test_a_readers_command_opens_the_store_with_a_role_that_may_only_read(settings: Any, user: uuid.UUID) -> None:
    """Analysts' and auditors' commands read: run with a role granted SELECT alone, opening the
    event store must make nothing (no table, no function)."""
    import psycopg

    role, password = f"reader_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    try:
        reader = settings.model_copy(update={"database_url": settings.effective_database_url.replace(
            f"palette:{settings.pg_password}@", f"{role}:{password}@")})
        assert f"//{role}:" in reader.database_url
        app = event_store(reader)
        try:
            assert app.recorder.max_notification_id() >= 2
        finally:
            app.close()
    finally:
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")



@pytest.mark.parametrize(("setting", "said", "hint"), [
    ("PALETTE_PG_PASSWORD", "password authentication failed", "is PALETTE_DATA_DIR the running stack's"),
    ("PALETTE_DATABASE_URL", 'database "no_such_database" does not exist', "PALETTE_DATABASE_URL right?"),
])
def test_a_database_that_refuses_the_command_is_named_with_its_reason_at_once(
        setting: str, said: str, hint: str, env: dict[str, str], settings: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The commands that open the event store said "couldn't get a connection after 10.00 sec;
    is the stack up?" after 10 s, whatever PostgreSQL had answered (its pool's refusal): a wrong
    password (another data directory's secrets) read as a stack that is down."""
    import time

    if setting == "PALETTE_PG_PASSWORD":
        monkeypatch.delenv("PALETTE_DATABASE_URL")
        monkeypatch.setenv("PALETTE_PG_PASSWORD", "not-the-stacks-password-0123456789")
    else:
        monkeypatch.setenv("PALETTE_DATABASE_URL",
                           settings.effective_database_url.rsplit("/", 1)[0] + "/no_such_database")
    started = time.monotonic()
    assert cli.main(["projections", "status"]) == 3
    assert time.monotonic() - started < 5
    assert one_line(capsys, "palette projections: cannot reach PostgreSQL (", said, hint) == ""


def test_a_read_only_database_is_said_in_one_line(env: dict[str, str], settings: Any,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`palette projections status` pointed at a read-only database (a standby, a role made
    read-only) was a traceback: ReadOnlySqlTransaction from its schema check."""
    url = settings.effective_database_url
    read_only = url + ("&" if "?" in url else "?") + "options=-c%20default_transaction_read_only%3Don"
    monkeypatch.setenv("PALETTE_DATABASE_URL", read_only)
    assert cli.main(["projections", "status"]) == 3
    assert one_line(capsys, "palette projections: PostgreSQL refused (cannot execute ",
                    "in a read-only transaction); is PALETTE_DATABASE_URL the primary's") == ""


@pytest.mark.parametrize(("args", "said"), [(["projections", "status"], "palette projections"),
                                           (["replay", "all"], "palette replay")], ids=["projections", "replay"])
def test_a_role_without_the_stacks_privileges_is_said_in_one_line(
        args: list[str], said: str, env: dict[str, str], settings: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """PostgreSQL's refusal of a privilege the role lacks (42501), which eventsourcing raises
    under its own error, is one line as a read-only database's is, not a traceback."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    url, role = settings.effective_database_url, f"palette_nobody_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'nobody-0123456789'")
    try:
        parts = urlsplit(url)
        monkeypatch.setenv("PALETTE_DATABASE_URL", urlunsplit(parts._replace(
            netloc=f"{role}:nobody-0123456789@{parts.hostname}:{parts.port}")))
        assert cli.main(args) == 3
        assert one_line(capsys, f"{said}: PostgreSQL refused (permission denied for ",
                        "is PALETTE_DATABASE_URL the primary's") == ""
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize("args", [["admin", "sweep"], ["admin", "erase", str(uuid.uuid4())]], ids=["sweep", "erase"])
def test_an_operators_command_a_database_refuses_names_its_reason_at_once(
        args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`palette admin` met PostgreSQL only through its pools: a wrong password (another data
    directory's secrets) was "couldn't get a connection after 10.00 sec; is the stack up?", 10 s on."""
    import time

    monkeypatch.delenv("PALETTE_DATABASE_URL")
    monkeypatch.setenv("PALETTE_PG_PASSWORD", "not-the-stacks-password-0123456789")
    started = time.monotonic()
    assert cli.main(args) == 3
    assert time.monotonic() - started < 5
    assert one_line(capsys, "palette admin: cannot reach PostgreSQL (", "password authentication failed",
                    "is PALETTE_DATA_DIR the running stack's") == ""


@pytest.mark.parametrize("given", [["--checkpoint", ""], ["--checkpoint", "latest", "--public-key", ""]],
                         ids=["checkpoint", "public-key"])
def test_an_empty_checkpoint_or_key_is_refused_not_passed_over(given: list[str], env: dict[str, str],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`verify --checkpoint "$CP"` with CP unset ran the plain verify and said OK (exit 0): the
    signed heads were never checked. An empty --public-key fell back to the configured key."""
    with pytest.raises(SystemExit) as refused:
        cli.main(["audit", "verify", *given])
    assert refused.value.code == 2
    assert one_line(capsys, f"palette audit verify: argument {given[-2]}: empty (an unset variable?)") == ""


def refused_argument(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> None:
    with pytest.raises(SystemExit) as refused:
        cli.main(argv)
    assert refused.value.code == 2
    assert one_line(capsys, *needles) == ""


@pytest.mark.parametrize("command", [["replay", "all", "--format", "parquet", "--out"], ["export", "users", "--out"],
                                     ["query", "SELECT 1", "--data"], ["audit", "keygen", "--out"],
                                     ["audit", "checkpoint", "--no-s3", "--out"], ["audit", "verify", "--checkpoint"]])
def test_a_path_that_is_empty_or_not_utf8_is_one_line(command: list[str], env: dict[str, str], user: uuid.UUID,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`--out "$DIR"` with DIR unset wrote the Parquet dataset into the working directory; a name
    whose bytes are not UTF-8 (a surrogate in argv) was a UnicodeEncodeError traceback, after
    `audit keygen` had written its key."""
    monkeypatch.chdir(tmp_path)
    refused_argument(capsys, [*command, ""], f"argument {command[-1]}: empty (an unset variable?)")
    odd = str(tmp_path / "caf\udce9")
    refused_argument(capsys, [*command, odd], f"argument {command[-1]}: not UTF-8 text")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("setting", "value"), [("DateStyle", "SQL, DMY"), ("IntervalStyle", "sql_standard")])
def test_a_database_whose_session_defaults_fail_every_read_of_a_time_is_refused_in_one_line(
        env: dict[str, str], fresh_db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        setting: str, value: str) -> None:
    """A PostgreSQL of an operator's own whose database defaults to DateStyle 'SQL, DMY' (a
    European DBA's choice): psycopg parses no time but ISO's, so every read of one failed (the
    API's a 500, the commands' a traceback). The event store refuses to open, naming the fix."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET {} = {}").format(
            sql.Identifier(conn.info.dbname), sql.SQL(setting), sql.Literal(value)))
    monkeypatch.setenv("PALETTE_DATABASE_URL", fresh_db)
    assert cli.main(["replay", "all"]) == 2
    assert one_line(capsys, f"{setting} for this role is '{value}'", f"SET {setting} = '") == ""
