"""The command line without a stack: a reader that went away stops it quietly; an output path it
cannot write is refused in one line before the work; the relay's restart of a memory broker's
log is a warning (what `palette up` shows on every clean restart)."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters import cli
from adapters.relay import LossWatch
from domain.text import one_line
from tests.unit.test_broker_loss import FakeBroker, FakeState

ROOT = Path(__file__).resolve().parents[2]


def into_closed_pipe(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``palette ARGS`` with stdout a pipe whose reader is gone before the first write (what
    `| head` leaves once it has read enough): every write fails with EPIPE, deterministically."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "adapters.cli", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, env=env, cwd=ROOT, check=False)
    finally:
        os.close(write_end)


def test_a_closed_stdout_stops_the_cli_quietly(tmp_path: Path) -> None:
    result = into_closed_pipe(["env"], {"PATH": "/usr/bin:/bin", "PALETTE_DATA_DIR": str(tmp_path)})
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    assert result.stderr == ""
    assert result.returncode == cli.SIGPIPE_EXIT == 141


@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize("where", ["missing-dir", "a-directory"])
def test_bench_refuses_an_output_it_cannot_write_before_running(option: str, where: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import tests.bench

    ran: list[Any] = []
    monkeypatch.setattr(tests.bench, "main", lambda *a: ran.append(a) or 0)
    monkeypatch.chdir(ROOT)
    path = tmp_path / "none" / "out.json" if where == "missing-dir" else tmp_path
    assert cli.main(["bench", option, str(path)]) == 2
    assert ran == []  # refused before minutes of measuring
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err
    assert ("No such file or directory" if where == "missing-dir" else "Is a directory") in err


@pytest.mark.parametrize("argv", [["--audit-events", "0"], ["--audit-events", "-5"],
                                  ["--quality", "--audit-events", "10"]])
def test_bench_refuses_an_audit_log_of_no_events_or_beside_the_quality_run(argv: list[str],
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """0 ran the whole benchmark instead, -5 started a stack to write none, and --quality took
    the place of --audit-events without a word."""
    import tests.bench

    ran: list[Any] = []
    monkeypatch.setattr(tests.bench, "main", lambda *a: ran.append(a) or 0)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", *argv])
    assert exit_.value.code == 2 and ran == []
    assert "--audit-events" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--quality", "--plot", "p.png"], ["--audit-events", "10", "--plot", "p.png"],
                                  ["--audit-events", "10", "--quick"]])
def test_bench_refuses_an_option_its_mode_would_ignore(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The chart was never drawn beside --quality or --audit-events, and --quick was ignored beside
    --audit-events, without a word."""
    import tests.bench

    ran: list[Any] = []
    monkeypatch.setattr(tests.bench, "main", lambda *a: ran.append(a) or 0)
    monkeypatch.chdir(ROOT)
    assert cli.main(["bench", *argv]) == 2 and ran == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("palette bench: --")


@pytest.mark.parametrize(("argv", "line"), [
    ([], "palette: the following arguments are required: command (see palette --help)"),
    (["token", "--role", "admin"], "palette token: argument --role: invalid choice: 'admin' (choose from 'analyst', "
                                   "'auditor') (see palette token --help)"),
    (["projections", "dlq", "retry", "x"], "palette projections dlq retry: argument id: invalid int value: 'x' "
                                           "(see palette projections dlq retry --help)"),
    (["env", "a", "b"], "palette: unrecognized arguments: b (see palette --help)"),
])
def test_arguments_argparse_refuses_are_one_line_without_the_usage(argv: list[str], line: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == line + "\n"


def test_keygen_into_a_missing_directory_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path))
    out = tmp_path / "none" / "key.pem"
    assert cli.main(["audit", "keygen", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "No such file or directory" in err


@pytest.mark.parametrize("name", ["key\n.pem", "key\r.pem", "key\u2028.pem"])
def test_keygen_refuses_a_name_no_setting_can_hold_and_writes_no_key(name: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A key written under a name with a line break could never be used: the setting that names
    it, PALETTE_AUDIT_SIGNING_KEY_FILE, is refused when it holds one."""
    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path))
    out = tmp_path / "keys" / name
    out.parent.mkdir()
    assert cli.main(["audit", "keygen", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert "holds a line break" in captured.err and "PALETTE_AUDIT_SIGNING_KEY_FILE" in captured.err
    assert list(out.parent.iterdir()) == []


def test_an_os_error_on_a_named_file_is_one_line_not_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The last resort for any path the CLI touches (here the ready file of `palette serve`)."""
    def touches(args: Any) -> int:
        Path(tmp_path / "none" / "ready").touch()
        return 0

    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path))
    args = cli.parser().parse_args(["env"])
    monkeypatch.setattr(cli, "parser", lambda: _Fixed(args, touches))
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "none" / "ready") in err and "No such file" in err


class _Fixed:
    def __init__(self, args: Any, func: Any) -> None:
        args.func = func
        self.args = args

    def parse_args(self, argv: Any) -> Any:
        return self.args


def test_a_memory_brokers_lost_log_is_a_warning_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """Every clean restart on memory storage (the default) comes back with an empty log: the
    relay publishes again from the event store; nothing is lost, so no ERROR line."""
    watch = LossWatch(FakeBroker({0: 0}), lambda: 41, FakeState({0: 5}), "relay")  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="palette.relay"):
        assert watch.recover() == 40
    records = [r for r in caplog.records if "lost acknowledged messages" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.WARNING]
    assert "publishing again from position 41" in records[0].getMessage()


def test_a_broken_pipe_that_is_not_stdout_is_not_taken_for_a_closed_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    def writes_to_a_gone_peer(args: Any) -> int:
        mine, theirs = socket.socketpair()
        theirs.close()
        with mine:
            mine.sendall(b"x" * 100_000)  # BrokenPipeError: the peer is gone
        return 0

    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path))
    args = cli.parser().parse_args(["env"])
    monkeypatch.setattr(cli, "parser", lambda: _Fixed(args, writes_to_a_gone_peer))
    with pytest.raises(BrokenPipeError):  # before: exit 141, nothing said
        cli.main([])


@pytest.mark.parametrize("error", ["KafkaTimeoutError", "KafkaConnectionError"])
def test_a_broker_that_does_not_answer_is_one_line_and_exit_3_not_a_traceback(
        error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`palette serve gpu` needs no database: an unreachable broker was the first thing it met
    (kafka-python's KafkaTimeoutError: Unable to bootstrap), and its traceback what it said."""
    import kafka.errors

    def meets_no_broker(args: Any) -> int:
        raise getattr(kafka.errors, error)("Unable to bootstrap from 127.0.0.1:9092")

    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path))
    args = cli.parser().parse_args(["serve", "gpu"])
    monkeypatch.setattr(cli, "parser", lambda: _Fixed(args, meets_no_broker))
    assert cli.main([]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("palette serve: cannot reach the broker (")
    assert "Unable to bootstrap from 127.0.0.1:9092" in err and "PALETTE_KAFKA_BOOTSTRAP right?" in err


def test_an_output_path_is_tried_for_writing_not_judged_by_its_permission_bits(tmp_path: Path) -> None:
    """As root every permission bit passes; /proc takes no new file whoever asks."""
    from adapters.cli.outputs import unwritable

    assert unwritable(Path("/proc/palette-out.json")) is not None
    assert unwritable(tmp_path) == os.strerror(errno.EISDIR)
    fresh = tmp_path / "out.json"
    assert unwritable(fresh) is None and not fresh.exists()  # tried, then removed
    kept = tmp_path / "kept.json"
    kept.write_text("before")
    assert unwritable(kept) is None and kept.read_text() == "before"
    link = tmp_path / "link.json"  # dangling: what a write would make is its target, tried and removed
    link.symlink_to(tmp_path / "target.json")
    assert unwritable(link) is None and link.is_symlink() and not (tmp_path / "target.json").exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert unwritable(fifo) is not None  # no reader: refused at once, not waited on


def test_a_database_error_line_never_shows_a_password() -> None:
    from adapters.logs import driver_reason as _reason

    for message in ('missing "=" after "postgresql://palette:s3cr3t@127.0.0.1:5433/db" in connection info string',
                    "invalid connection option host=x password=s3cr3t user=y",
                    "invalid connection option host=x password='s3cr3t and more' user=y",
                    'could not translate host name "s3cr3t@127.0.0.1" to address: Name or service not known'):
        assert "s3cr3t" not in _reason(Exception(message)) and "***" in _reason(Exception(message))
    denied = 'connection failed: FATAL:  password authentication failed for user "palette"'
    assert _reason(Exception(denied)) == denied  # the reason itself, whole
    # PostgreSQL's HINT follows its message: the message is the reason (a full disk's, found in
    # the disk-full review, was logged as "DiskFull: HINT:  Check free disk space.")
    full = 'could not extend file "base/16384/16389": No space left on device\nHINT:  Check free disk space.'
    assert _reason(Exception(full)) == 'could not extend file "base/16384/16389": No space left on device'


def test_a_command_run_where_no_stack_ran_says_its_secrets_are_new(tmp_path: Path) -> None:
    """Outside the checkout the data directory is a fresh ./.palette: the secrets made there are
    none a running stack knows, so a token minted with them would be refused without a word."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}

    def token() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "adapters.cli", "token", "--role", "analyst"], capture_output=True,
                              text=True, timeout=120, env=env, cwd=tmp_path, check=False)

    first, second = token(), token()
    assert first.returncode == second.returncode == 0 and first.stdout.count(".") == 2  # a JWT either way
    assert "made new ones, which no running stack uses" in first.stderr and str(tmp_path / ".palette") in first.stderr
    assert second.stderr == ""  # the same directory's secrets from then on


@pytest.mark.parametrize(("argv", "why"), [
    (["--from", "0"], "--from must be a notification id"),
    (["--since", "2030-01-01", "--until", "2020-01-01"], "the period's end (--until) must be after its start"),
])
def test_a_replay_window_that_holds_nothing_by_construction_is_refused(argv: list[str], why: str, capsys: Any) -> None:
    assert cli.main(["replay", "all", *argv]) == 2  # before any setting is read or store opened
    assert why in capsys.readouterr().err


def test_a_broken_development_secrets_file_is_one_line_not_a_traceback(tmp_path: Path, capsys: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "secrets.json").write_text('{"jwt_secret": "abc",')
    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path))
    assert cli.main(["env"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"palette env: {tmp_path / 'secrets.json'} is not valid JSON") and err.count("\n") == 1


def test_env_prints_a_setting_named_either_way_and_refuses_an_unknown_one(tmp_path: Path, capsys: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PALETTE_API_PORT", "8123")
    for name in ("api_port", "PALETTE_API_PORT"):
        assert cli.main(["env", name]) == 0
        assert capsys.readouterr().out == "8123\n"
    assert cli.main(["env", "no_such_setting"]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "palette env: unknown setting no_such_setting\n")
    assert cli.main(["env", ""]) == 2  # "$UNSET": no value, rather than every setting, secrets included
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "palette env: unknown setting (an empty name)\n")


# What argv can hold: no NUL, and no surrogate but the ones undecodable bytes become, which
# stderr writes escaped (capsys's cannot: it is strict UTF-8).
ARGV_CHARACTERS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(ARGV_CHARACTERS), extra=st.text(ARGV_CHARACTERS, min_size=1).filter(lambda t: t[0] != "-"))
def test_a_refusal_is_one_line_whatever_the_value_it_names_holds(key: str, extra: str, tmp_path: Path, capsys: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`palette env "$KEY"` with a line break in KEY (a value pasted with its newline) said
    "unknown setting" over two lines, as did argparse of an argument it did not expect."""
    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path))
    try:
        code = cli.main(["env", key])
    except SystemExit as refused:  # a key that reads as an option
        code = refused.code
    captured = capsys.readouterr()
    assert code == 0 or (code == 2 and captured.err.count("\n") == 1 and captured.err.endswith("\n")), captured.err
    with pytest.raises(SystemExit) as refused:
        cli.main(["env", "api_port", extra])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("(see palette --help)\n"), err


def test_serve_naive_for_a_process_other_than_the_api_is_refused(capsys: Any) -> None:
    assert cli.main(["serve", "relay", "--naive"]) == 2  # before any setting is read
    assert capsys.readouterr().err == "palette serve: --naive applies to the api only\n"


def test_a_served_process_says_it_is_ready_after_its_warm_up_not_before(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`palette up` waits on the ready file: it must appear once the worker has warmed up (a
    consumer holds its partitions), and before its loop runs."""
    import signal
    import threading

    import adapters.collector
    from adapters.cli.stack import _serve_loop

    monkeypatch.setattr(signal, "signal", lambda *_: None)  # this test process's handlers stay
    monkeypatch.setattr(adapters.collector, "serving_gc", lambda: None)
    ready = tmp_path / "worker.ready"
    seen: list[tuple[str, bool]] = []

    class Worker:
        def warm_up(self, stop: threading.Event) -> None:
            seen.append(("warm_up", ready.exists()))

        def run(self, stop: threading.Event) -> None:
            seen.append(("run", ready.exists()))

        def close(self) -> None:
            seen.append(("close", ready.exists()))

    _serve_loop(Worker(), str(ready))
    assert seen == [("warm_up", False), ("run", True), ("close", True)]


def test_a_staff_token_carries_the_role_and_lifetime_asked_for(tmp_path: Path, capsys: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import jwt

    from adapters.settings import load_settings

    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path))
    secret = load_settings().jwt_secret
    assert cli.main(["token", "--role", "auditor", "--ttl", "2h"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), secret, algorithms=["HS256"], audience="palette-app")
    assert claims["role"] == "auditor" and claims["exp"] - claims["iat"] == 2 * 3600


@pytest.mark.parametrize(("value", "seconds"),
                         [("60", 60), ("1m", 60), ("90m", 5400), ("2h", 7200), ("30d", 30 * 86400)])
def test_a_token_lifetime_reads_seconds_or_a_unit(value: str, seconds: int) -> None:
    from adapters.cli.arguments import ttl

    assert ttl(value) == seconds


@pytest.mark.parametrize("value", ["59", "59s", "0m", "31d", "720h1", "", "h", "-1h"])
def test_a_token_lifetime_under_a_minute_or_over_30_days_or_unreadable_is_refused(value: str) -> None:
    import argparse

    from adapters.cli.arguments import ttl

    with pytest.raises(argparse.ArgumentTypeError):
        ttl(value)


def test_a_row_limit_is_between_one_and_ten_million() -> None:
    import argparse

    from adapters.cli.arguments import row_limit

    assert (row_limit("1"), row_limit("10000000")) == (1, 10_000_000)
    for refused in ("0", "-1", "10000001", "ten"):
        with pytest.raises(argparse.ArgumentTypeError):
            row_limit(refused)


def test_a_time_without_a_zone_is_utc_and_one_with_a_zone_keeps_it() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    from adapters.cli.arguments import time_value

    assert time_value("2024-03-01T12:00") == datetime(2024, 3, 1, 12, tzinfo=UTC)
    assert time_value("2024-03-01T12:00+02:00") == datetime(2024, 3, 1, 12, tzinfo=timezone(timedelta(hours=2)))


def test_a_service_that_meets_an_unanswering_broker_keeps_where_in_its_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A KafkaTimeoutError hours into a service's run (an acknowledgement waited on) is not the
    start-up's unreachable stack: the one line alone lost where it was met."""
    import kafka.errors

    from adapters import logs

    def times_out_deep_inside(args: Any) -> int:
        raise kafka.errors.KafkaTimeoutError("Failed to update metadata after 60.0 secs.")

    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path))
    args = cli.parser().parse_args(["serve", "gpu"])
    monkeypatch.setattr(cli, "parser", lambda: _Fixed(args, times_out_deep_inside))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logs.configure("gpu")
    try:
        assert cli.main([]) == 3
    finally:
        root.handlers[:], root.level = handlers, level
    err = capsys.readouterr().err.splitlines()
    record = json.loads(err[0])
    assert record["msg"] == "stopped on KafkaTimeoutError" and "times_out_deep_inside" in record["exc"]
    assert err[1].startswith("palette serve: cannot reach the broker (") and len(err) == 2


@pytest.mark.parametrize(("name", "value"), [
    ("PALETTE_S3_BUCKET", "palette\nPALETTE_DATABASE_URL=postgresql://evil@elsewhere/x"),
    ("PALETTE_JWT_SECRET", "evil-0f-f0rty-e1ght-bytes-f0r-the-t0ken-key\rPALETTE_ENV=production"),
    ("PALETTE_CALLBACK_URL", "http://evil.example\u2028PALETTE_API_PORT=1"),  # a line break to str.splitlines
    ("PALETTE_DATA_DIR", "{tmp}/evil\n"),
    ("PALETTE_SSE_STREAMS", "4\n"),  # a number: read as 4 past its line break, so accepted, once
    ("PALETTE_SWEEP_INTERVAL_S", "30\r\n"),
])
@pytest.mark.parametrize("argv", [["env"], ["env", "PALETTE_S3_BUCKET"], ["env", "s3_bucket"]])
def test_a_setting_holding_a_line_break_is_refused_in_one_line_naming_it(
        tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch, name: str, value: str, argv: list[str]) -> None:
    """`palette env` prints KEY=value lines: a value with a line break would forge lines of its own
    (another setting, for whoever reads them). Refused as every invalid setting is, value unsaid."""
    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv(name, value.format(tmp=tmp_path))
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"palette env: invalid setting {name}: ")
    assert captured.err.count("\n") == 1 and "evil" not in captured.err
    assert list(tmp_path.iterdir()) == []  # refused before any data directory or secrets were made


def test_a_development_secret_holding_a_line_break_is_refused_naming_it_not_its_value(
        tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "secrets.json").write_text('{"jwt_secret": "evil\\nPALETTE_ENV=production"}')
    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path))
    assert cli.main(["env"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "evil" not in captured.err
    assert captured.err.startswith(f"palette env: {tmp_path / 'secrets.json'}: jwt_secret holds a line break")


def test_a_time_finer_than_a_microsecond_is_refused_saying_so_not_as_no_time() -> None:
    """`--as-of 2026-12-06T07:27:12.1234567Z` is ISO 8601: its refusal said "not an ISO-8601
    time", which a reader takes for a typo, where the reason is the log's microseconds."""
    import argparse

    from adapters.cli.arguments import time_value

    with pytest.raises(argparse.ArgumentTypeError, match="microsecond") as refused:
        time_value("2026-12-06T07:27:12.1234567Z")
    assert "2026-12-06T07:27:12.1234567Z" in str(refused.value)
    with pytest.raises(argparse.ArgumentTypeError, match="not an ISO-8601 time"):
        time_value("yesterday")


@given(st.text())
def test_a_cell_is_one_field_of_one_line_and_says_what_it_holds(value: str) -> None:
    # `palette projections dlq list` prints a dead letter's error (text a fold raised) in its last
    # field: a line break or a tab in it broke the one-line-per-letter format.
    shown = one_line(value)
    assert shown.splitlines() in ([shown], []) and "\t" not in shown
    if value.isprintable():  # nothing to escape
        assert shown == value
    assert len(shown) >= len(value)  # escaped, never dropped


@pytest.mark.parametrize(("model", "labels", "why"), [
    ("missing.pt", "", "segmenter model '{tmp}/missing.pt' is not a TorchScript file"),
    ("missing.pt", "labels.json", "segmenter labels '{tmp}/labels.json' are not readable JSON"),
], ids=["a model not there", "labels not JSON"])
def test_a_segmenter_setting_that_names_no_readable_file_is_one_line_not_a_traceback(
        tmp_path: Path, model: str, labels: str, why: str) -> None:
    """`palette serve gpu` read PALETTE_SEGMENTER_MODEL and _LABELS as it built the worker, and a
    file that was not there, or not one, ended it in a traceback."""
    (tmp_path / "labels.json").write_text("{")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PALETTE_DATA_DIR": str(tmp_path / "data"),
           "PALETTE_SEGMENTER_MODEL": str(tmp_path / model),
           "PALETTE_SEGMENTER_LABELS": str(tmp_path / labels) if labels else ""}
    served = subprocess.run([sys.executable, "-m", "adapters.cli", "serve", "gpu"], capture_output=True, text=True,
                            timeout=120, env=env, cwd=tmp_path, check=False)
    assert served.returncode == 2, served.stderr[-2000:]
    assert served.stderr.startswith(f"palette serve: PALETTE_SEGMENTER_MODEL/_LABELS: {why.format(tmp=tmp_path)}")
    assert served.stderr.count("\n") == 1  # one line, no traceback


def test_serve_gpu_on_cuda_where_torch_finds_none_is_refused_in_one_line(tmp_path: Path) -> None:
    """PALETTE_DEVICE=cuda where torch finds no CUDA device: the worker started, and every item
    failed on its first transfer ("Torch not compiled with CUDA enabled"), three times, every job
    failed and refunded while the worker looked healthy."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PALETTE_DATA_DIR": str(tmp_path / "data"),
           "PALETTE_DEVICE": "cuda", "PALETTE_KAFKA_BOOTSTRAP": "127.0.0.1:9"}  # no broker: refused before it
    served = subprocess.run([sys.executable, "-m", "adapters.cli", "serve", "gpu"], capture_output=True, text=True,
                            timeout=120, env=env, cwd=tmp_path, check=False)
    assert served.returncode == 2, served.stderr[-2000:]
    assert served.stderr == ("palette serve: PALETTE_DEVICE is cuda, but torch finds no CUDA device here; "
                             "set it to auto or cpu to edit on the CPU\n")
