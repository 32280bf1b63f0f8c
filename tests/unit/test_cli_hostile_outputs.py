"""The command line where its output or its surroundings fail: stdout on a full disk or closed,
an object store that does not answer, a SIGTERM in the middle of an export. Each is one line and
a non-zero exit, never a traceback, and leaves nothing half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from adapters import checkpoints, cli
from adapters.cli import analysts, auditors, operators

ROOT = Path(__file__).resolve().parents[2]


def _palette(shell_redirect: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`palette env` (no stack needed) with stdout redirected by the shell as given."""
    env = {"PATH": "/usr/bin:/bin", "PALETTE_DATA_DIR": str(tmp_path)}
    return subprocess.run(["/bin/sh", "-c", f'exec "$0" -m adapters.cli env {shell_redirect}', sys.executable],
                          stderr=subprocess.PIPE, text=True, timeout=120, env=env, cwd=ROOT, check=False)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_on_a_full_disk_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    result = _palette("> /dev/full", tmp_path)
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "palette env: cannot write the output: No space left on device"
    assert result.returncode == 2


def test_a_closed_stdout_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    result = _palette(">&-", tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert "stdout is closed" in result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2


def test_a_password_postgresql_refuses_points_at_the_data_directory_not_at_a_stack_down(
        monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """A command run outside the checkout that ran `make run` reads another data directory's
    secrets: the stack is up, and "is the stack up?" sent the reader the wrong way."""
    import psycopg

    def refused(_args: Any) -> int:
        raise psycopg.OperationalError('connection failed: FATAL:  password authentication failed for user "palette"')

    monkeypatch.setattr(operators, "_cmd_token", refused)
    assert cli.main(["token", "--role", "analyst"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "password authentication failed" in err
    assert "is PALETTE_DATA_DIR the running stack's (its secrets.json holds the password)" in err
    assert "is the stack up" not in err


def test_a_database_whose_disk_is_full_says_so_not_that_the_stack_is_down(
        monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """PostgreSQL refusing a write on a full disk answered: `palette serve projector` said
    "cannot reach PostgreSQL (HINT:  Check free disk space.); is the stack up" on each of its
    restarts while the data directory's disk was full (found filling it under a live stack)."""
    import psycopg

    def full(_args: Any) -> int:
        raise psycopg.errors.DiskFull('could not extend file "base/16384/16408": No space left on device\n'
                                      "HINT:  Check free disk space.")

    monkeypatch.setattr(operators, "_cmd_token", full)
    assert cli.main(["token", "--role", "analyst"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PostgreSQL cannot write: its disk is full" in err, err
    assert "is the stack up" not in err and "cannot reach" not in err


def test_an_object_store_that_does_not_answer_is_one_line_and_exit_3(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: Any) -> None:
    def unreachable(_args: Any) -> int:
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/palette-images")

    monkeypatch.setattr(operators, "_cmd_token", unreachable)
    assert cli.main(["token", "--role", "analyst"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the object store" in err and "PALETTE_S3_ENDPOINT" in err


def test_a_checkpoint_is_kept_in_its_directory_when_the_object_store_does_not_answer(tmp_path: Path) -> None:
    class DownS3:
        def put_object(self, **_: Any) -> None:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/palette-images")

    store = checkpoints.CheckpointStore(DownS3(), "palette-images", tmp_path)
    doc = {"payload": {"log_position": 7, "taken_at": "2026-12-05T09:00:00+00:00", "heads": []}}
    with pytest.raises(EndpointConnectionError):
        store.put(doc)
    assert [p.name for p in tmp_path.iterdir()] == [store.name(doc["payload"])]


def test_sigterm_during_an_export_removes_its_staging_folder_and_exits_143(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from adapters.cli import analysts
    from projections import parquet

    final = tmp_path / "dataset"
    seen: list[Path] = []

    def export(_args: Any) -> int:
        with parquet._staged(final) as staging:
            (staging / "part-00000.parquet").write_bytes(b"half")
            seen.append(staging)
            os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` or a service manager sends
            raise AssertionError("SIGTERM did not stop the export")
        return 0

    monkeypatch.setattr(analysts, "_cmd_export", export)
    def untouched(*_: Any) -> None:  # what the runner would do (die) if the command set no handler
        raise RuntimeError("SIGTERM met the handler the command found, not one of its own")

    before = signal.signal(signal.SIGTERM, untouched)
    try:
        code = cli.main(["export", "users", "--out", str(final)])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 128 + signal.SIGTERM
    assert seen and not seen[0].exists() and list(tmp_path.iterdir()) == []


def test_a_ledger_window_that_ends_before_it_starts_is_refused_not_answered_empty(capsys: Any) -> None:
    user = "05f17ccf-2dba-5ec1-9be4-5001154dec58"
    assert cli.main(["audit", "ledger", "--user", user, "--from", "2030-01-01", "--to", "2020-01-01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--to" in err and "--from" in err


@pytest.mark.parametrize("given", ["/nonexistent/trusted.pem", "trusted.pem", "/"])
def test_a_public_key_path_that_is_no_file_is_named_as_such(given: str) -> None:
    with pytest.raises(checkpoints.CheckpointError) as refused:
        checkpoints.public_key(given)
    assert ("no such file" if given != "/" else "is not a file") in str(refused.value)


def test_a_checkpoint_file_nested_too_deep_is_refused_in_one_line(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(checkpoints.CheckpointError, match="not a checkpoint"):
        checkpoints.read_file(deep)


def test_a_checkpoint_that_is_no_regular_file_is_refused_at_once() -> None:
    with pytest.raises(checkpoints.CheckpointError, match="not a regular file"):
        checkpoints.read_file(Path("/dev/zero"))  # read whole, it never ends


def test_a_checkpoint_that_is_a_fifo_with_no_writer_is_refused_not_waited_on(tmp_path: Path) -> None:
    import os
    import threading

    fifo = tmp_path / "checkpoint.json"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            checkpoints.read_file(fifo)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # unblock the open so the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_file blocked opening a FIFO with no writer")
    assert isinstance(outcome[0], checkpoints.CheckpointError) and "not a regular file" in str(outcome[0])


def test_a_checkpoint_file_over_the_bound_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoints, "MAX_FILE_BYTES", 64)
    big, small = tmp_path / "big.json", tmp_path / "small.json"
    big.write_text('{"a": "' + "x" * 64 + '"}')
    small.write_text('{"a": 1}')
    with pytest.raises(checkpoints.CheckpointError, match="over"):
        checkpoints.read_file(big)
    assert checkpoints.read_file(small) == {"a": 1}


def test_query_json_is_strict_json_even_for_nan_and_infinity() -> None:
    import json

    from adapters.query import Result, render

    text = render(Result(["a", "b", "l"], [(float("nan"), float("-inf"), [1.5, float("inf")])], False), "json")

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(text, parse_constant=refuse) == [{"a": None, "b": None, "l": [1.5, None]}]


def test_query_json_of_a_map_keyed_by_what_json_keys_cannot_be_is_text_not_a_traceback() -> None:
    """`histogram(day)` over a dataset is a MAP keyed by dates; DuckDB gives it as a dict with
    date keys (or UUIDs, decimals, intervals, an infinite double), which json.dumps refused with
    a TypeError or ValueError: a traceback for `palette query --format json`."""
    import json

    from adapters.query import render, run

    result = run("SELECT histogram(d) AS days, MAP {uuid '00000000-0000-0000-0000-000000000001': 1} AS ids, "
                 "MAP {1.5: 'x'} AS decimals, MAP {INTERVAL 1 DAY: 2} AS intervals, "
                 "MAP {'inf'::DOUBLE: 3, 2.5::DOUBLE: 4} AS doubles, MAP {7: 'n'} AS ints "
                 "FROM (SELECT DATE '2026-11-22' AS d UNION ALL SELECT DATE '2026-11-22')", None, None)
    assert json.loads(render(result, "json")) == [{
        "days": {"2026-11-22": 2}, "ids": {"00000000-0000-0000-0000-000000000001": 1},
        "decimals": {"1.5": "x"}, "intervals": {"1 day, 0:00:00": 2}, "doubles": {"inf": 3, "2.5": 4},
        "ints": {"7": "n"}}]


def test_query_json_keeps_every_column_of_a_join_whose_names_repeat() -> None:
    """`SELECT * FROM a JOIN b ...` names a column of each side alike (stream_id, position, ...):
    as JSON objects, the later one took the earlier one's key and its values were lost without a
    word. Each repeated name is told apart as DuckDB's CREATE TABLE AS does (``x``, ``x_1``, ``x_2``...)."""
    import json

    from adapters.query import render, run

    result = run("SELECT * FROM (SELECT 1 AS x, 2 AS y, 3 AS x_1) p JOIN (SELECT 1 AS x, 4 AS y) q ON p.x = q.x",
                 None, None)
    assert result.columns == ["x", "y", "x_1", "x", "y"]
    assert json.loads(render(result, "json")) == [{"x": 1, "y": 2, "x_1": 3, "x_2": 1, "y_1": 4}]
    assert render(result, "csv").splitlines()[0] == "x,y,x_1,x,y"  # CSV and the table keep them as they are


def test_query_csv_writes_each_double_whole_as_json_does() -> None:
    """CSV is the output another program reads: a double went through the table's display form
    (six significant digits), so an event's epoch seconds 1795000123.25 read 1.795e+09."""
    import csv
    import json

    from adapters.query import render, run

    result = run("SELECT 1795000123.25::DOUBLE AS t, 0.1::DOUBLE + 0.2::DOUBLE AS s", None, None)
    assert [float(v) for v in list(csv.reader(render(result, "csv").splitlines()))[1]] == [1795000123.25, 0.1 + 0.2]
    assert json.loads(render(result, "json")) == [{"t": 1795000123.25, "s": 0.1 + 0.2}]


def test_query_csv_and_table_write_lists_structs_and_maps_as_json() -> None:
    """A list, struct or MAP cell (`list(concept)`, a struct of counts) came out as Python's repr,
    ``['sky']``, ``{'a': 1}``, ``[datetime.date(2026, 1, 1)]``: no CSV reader can parse it back.
    Each is now its JSON, as ``--format json`` writes it, in CSV and in the table alike."""
    import csv
    import json

    from adapters.query import render, run

    result = run("SELECT ['sky', 'é'] AS l, {'a': 1, 'b': [0.1::DOUBLE, 'inf'::DOUBLE]} AS s, "
                 "MAP {'k': 2} AS m, [DATE '2026-01-01'] AS d", None, None)
    row = list(csv.reader(render(result, "csv").splitlines()))[1]
    assert [json.loads(v) for v in row] == [["sky", "é"], {"a": 1, "b": [0.1, None]}, {"k": 2}, ["2026-01-01"]]
    assert row[:2] == ['["sky","é"]', '{"a":1,"b":[0.1,null]}']
    assert render(result, "table").splitlines()[2].split() == [*row[:3], '["2026-01-01"]']


def test_query_writes_a_blob_as_psql_does_in_every_format() -> None:
    """A BLOB (bytea) cell came out as Python's repr, ``b'\\x00ab'``, in the table and CSV (and
    JSON): now ``\\x`` and its hex, as psql writes a bytea, in a list or a MAP too."""
    import csv
    import json

    from adapters.query import render, run

    result = run("SELECT '\\x00\\xFFab'::BLOB AS b, [''::BLOB, 'z'::BLOB] AS l, MAP {'\\x01'::BLOB: 'k'} AS m",
                 None, None)
    row = list(csv.reader(render(result, "csv").splitlines()))[1]
    assert row == ["\\x00ff6162", '["\\\\x","\\\\x7a"]', '{"\\\\x01":"k"}']
    assert render(result, "table").splitlines()[2].split() == row
    assert json.loads(render(result, "json")) == [{"b": "\\x00ff6162", "l": ["\\x", "\\x7a"], "m": {"\\x01": "k"}}]


def test_query_table_keeps_a_cell_with_a_line_break_on_its_row() -> None:
    """A value (a grant's reason, a rule's note) or a column name holding a line break, a tab or
    U+2028 broke `palette query`'s table across lines; its cells are escaped as the audit
    ledger's are. CSV, which quotes such a value, keeps it as it is."""
    import csv
    import io

    from adapters.query import render, run

    result = run("SELECT 'x' || chr(10) || 'y' || chr(9) || 'z' AS \"reason\nnote\", "
                 "'a' || chr(8232) || 'b' AS u, 7 AS n", None, None)
    table = render(result, "table").splitlines()
    assert len(table) == 4
    assert table[0].split() == ["reason\\nnote", "u", "n"]
    assert table[2].split() == ["x\\ny\\tz", "a\\u2028b", "7"]
    assert list(csv.reader(io.StringIO(render(result, "csv"), newline="")))[1] == ["x\ny\tz", "a\u2028b", "7"]


def test_parquet_writers_whose_close_fails_on_a_full_disk_are_all_closed_and_not_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `palette replay all --format parquet` met on a full disk: the first close failed, the
    other files stayed open, and each writer's __del__ failed again ("Exception ignored ...")."""
    import errno
    from datetime import UTC, datetime

    import pyarrow as pa

    from projections import parquet

    made: list[Any] = []

    class FullDiskWriter:
        def __init__(self, *_: Any, **__: Any) -> None:
            self.is_open = True
            made.append(self)

        def write_table(self, *_: Any, **__: Any) -> None:
            pass

        def close(self) -> None:
            if self.is_open:
                raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(parquet.pq, "ParquetWriter", FullDiskWriter)
    writer = parquet.PartitionedWriter(tmp_path)
    for name in ("JobCreated", "JobFinished"):
        writer.add(name, pa.table({"timestamp": pa.array([datetime(2026, 12, 5, tzinfo=UTC)], parquet.TIMESTAMP)}))
    with pytest.raises(OSError):
        writer.close()
    writer.abandon()
    assert len(made) == 2 and not any(w.is_open for w in made)  # none left for __del__ to close again


def test_a_signing_key_that_a_full_disk_cut_short_leaves_no_file(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty key file left behind would refuse every rerun ("exists: not overwritten")."""
    import errno

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "fsync", full)
    out = tmp_path / "signing.pem"
    with pytest.raises(checkpoints.CheckpointError, match="No space left on device"):
        checkpoints.keygen(out)
    assert not out.exists()


def test_a_whole_write_onto_a_fifo_writes_into_it_and_leaves_it_a_fifo(tmp_path: Path) -> None:
    """audit checkpoint --out /dev/stdout, /dev/null or a named pipe: renaming a '.partial' file over
    the target replaced the device or pipe with a regular file (/dev/null itself, when run as root)."""
    import os
    import stat
    import threading

    from adapters.whole_files import write_whole

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    write_whole(fifo, '{"payload":{}}')
    reader.join(5)
    assert got == ['{"payload":{}}'] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    regular = tmp_path / "out.json"
    regular.write_text("old")
    write_whole(regular, "new")
    assert regular.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "pipe"]


def _closed_store_settings(tmp_path: Path, checkpoint_dir: Path | None, endpoint: str = "") -> Any:
    from adapters.settings import Settings
    from tests.conftest import free_port

    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48,
                        data_dir=tmp_path, s3_endpoint=f"http://127.0.0.1:{free_port()}",  # nothing listens there
                        audit_checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else "")
    # An endpoint the settings refuse (no scheme) reaches the client only past their validation.
    return settings.model_copy(update={"s3_endpoint": endpoint}) if endpoint else settings


@pytest.mark.parametrize("endpoint", ["", "127.0.0.1:1"])  # a closed port; no URL botocore can use
def test_verify_latest_falls_back_to_the_newest_local_copy_when_the_object_store_does_not_answer(
        tmp_path: Path, capsys: Any, endpoint: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from adapters.cli.auditors import _latest_checkpoint

    key = Ed25519PrivateKey.generate()
    kept = checkpoints.CheckpointStore(None, "palette-images", tmp_path / "kept")
    for position in (12, 5):  # the newest by log position, whichever was written last
        kept.put(checkpoints.sign({"kind": checkpoints.KIND, "log_position": position,
                                   "taken_at": "2026-12-05T09:00:00+00:00", "heads": []}, key))
    latest = _latest_checkpoint(_closed_store_settings(tmp_path, tmp_path / "kept", endpoint))
    assert latest is not None
    where, doc, _ = latest
    assert checkpoints.verified_payload(doc, key.public_key())["log_position"] == 12
    assert where == str(tmp_path / "kept" / "00000000000000000012-20261205T090000000000Z.json")
    err = capsys.readouterr().err
    assert err == (f"palette audit verify: cannot reach the object store ({err.split('(', 1)[1].split(')')[0]}): "
                   f"verifying against the newest local copy, {where}\n")


@pytest.mark.parametrize("kept", ["unset", "missing", "empty", "fifo"])
def test_verify_latest_with_no_local_copy_to_fall_back_on_is_one_line(tmp_path: Path, capsys: Any, kept: str) -> None:
    """None (the command exits 3, as for any object store not reached), said in one line; a FIFO
    named like a checkpoint is refused as any checkpoint file that is not a regular one is."""
    from adapters.cli.auditors import _latest_checkpoint

    folder = None if kept == "unset" else tmp_path / "kept"
    if kept in ("empty", "fifo"):
        (tmp_path / "kept").mkdir()
    if kept == "fifo":
        os.mkfifo(tmp_path / "kept" / "00000000000000000012-20261205T090000000000Z.json")
        with pytest.raises(checkpoints.CheckpointError, match=r"^cannot reach the object store .*; its newest "
                                                              r"local copy: .* is not a regular file$"):
            _latest_checkpoint(_closed_store_settings(tmp_path, folder))
        return
    assert _latest_checkpoint(_closed_store_settings(tmp_path, folder)) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("palette audit verify: cannot reach the object store (")
    assert err.endswith("PALETTE_AUDIT_CHECKPOINT_DIR is not set to fall back on\n" if kept == "unset"
                        else f"{tmp_path / 'kept'} holds no checkpoint to fall back on\n")


def test_verify_prints_the_first_breaks_it_was_given_and_counts_the_rest(monkeypatch: Any, capsys: Any) -> None:
    """However many chains are broken, the output is the report's first breaks and one line for
    the rest (the report is bounded: ``audit.verify``'s ``limit``)."""
    import argparse

    from adapters.cli.auditors import _audit_verify
    from projections import audit

    first = [audit.ChainBreak("u1", 3, 7, "edited"), audit.ChainBreak("u2", 1, None, "missing")]
    monkeypatch.setattr(audit, "verify", lambda conn, progress: audit.Verification(1234, first, 1205))
    assert _audit_verify(argparse.Namespace(public_key=None, checkpoint=None), None, None) == 1
    assert capsys.readouterr().out == ("BROKEN user u1 at seq 3 (position 7): edited\n"
                                       "BROKEN user u2 at seq 1 (its end): missing\n"
                                       "... and 1,203 more broken chain(s)\n"
                                       "verified 1,234 ledger rows: 1,205 broken chain(s)\n")


def test_verify_against_a_checkpoint_prints_its_first_unmatched_heads_and_counts_the_rest(
        monkeypatch: Any, capsys: Any) -> None:
    """A checkpoint's heads that do not match are printed as the chains' breaks are: the first
    ``audit.FIRST_FINDINGS``, then one line for the rest (even with every chain whole)."""
    import argparse

    from adapters.cli import auditors
    from adapters.cli.auditors import _audit_verify
    from projections import audit

    heads = [audit.ChainBreak(f"u{i:03}", 1, i, "rewritten") for i in range(audit.FIRST_FINDINGS + 5)]
    monkeypatch.setattr(checkpoints, "trusted_key", lambda settings, key: None)
    monkeypatch.setattr(checkpoints, "read_file", lambda path: {})
    monkeypatch.setattr(checkpoints, "verified_payload", lambda doc, key: {"heads": heads, "log_position": 9})
    monkeypatch.setattr(audit, "verify_heads", lambda conn, payload_heads: list(payload_heads))
    monkeypatch.setattr(audit, "verify", lambda conn, progress: audit.Verification(40, [], 0))
    monkeypatch.setattr(auditors, "_earlier_checkpoint", lambda settings, store, payload, key: None)
    args = argparse.Namespace(public_key=None, checkpoint="cp.json")
    assert _audit_verify(args, None, None) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-2] == [f"BROKEN user u{i:03} at seq 1 (position {i}): rewritten"
                          for i in range(audit.FIRST_FINDINGS)]
    assert lines[-2:] == ["... and 5 more checkpointed head(s) not matched",
                          f"verified 40 ledger rows: {audit.FIRST_FINDINGS + 5} broken chain(s); 25 chain heads of "
                          f"the checkpoint at log position 9 (cp.json, signature valid): 25 do not match; "
                          "no checkpoint before it to compare with"]


def test_verify_against_the_checkpoint_before_says_a_position_gone_backwards_first_then_the_lost_heads(
        monkeypatch: Any, capsys: Any) -> None:
    """A checkpoint signed at an earlier log position than the one before it is a finding of its
    own, printed first; heads lost since are printed as the rest are: the first ones, then a count."""
    import argparse

    from adapters.cli import auditors
    from adapters.cli.auditors import _audit_verify
    from projections import audit

    gone = [audit.ChainBreak(f"u{i:03}", 4, None, "missing from this one") for i in range(audit.FIRST_FINDINGS + 2)]
    monkeypatch.setattr(checkpoints, "trusted_key", lambda settings, key: None)
    monkeypatch.setattr(checkpoints, "read_file", lambda path: {})
    monkeypatch.setattr(checkpoints, "verified_payload", lambda doc, key: {"heads": [], "log_position": 9})
    monkeypatch.setattr(audit, "verify_heads", lambda conn, payload_heads: [])
    monkeypatch.setattr(audit, "verify", lambda conn, progress: audit.Verification(40, [], 0))
    monkeypatch.setattr(audit, "heads_regressions", lambda earlier, later: gone)
    monkeypatch.setattr(auditors, "_earlier_checkpoint",
                        lambda settings, store, payload, key: ("cp-0.json", {"heads": [], "log_position": 20}))
    assert _audit_verify(argparse.Namespace(public_key=None, checkpoint="cp.json"), None, None) == 1
    lines = capsys.readouterr().out.splitlines()
    findings = len(gone) + 1
    assert lines == [
        "BROKEN checkpoint: its log position 9 is before 20, that of the checkpoint before it (cp-0.json)",
        *[f"BROKEN user u{i:03} at seq 4 (checkpoint before it, cp-0.json): missing from this one"
          for i in range(audit.FIRST_FINDINGS - 1)],
        f"... and {findings - audit.FIRST_FINDINGS} more head(s) lost or gone backwards since the checkpoint before it",
        f"verified 40 ledger rows: {findings} broken chain(s); 0 chain heads of the checkpoint at log position 9 "
        f"(cp.json, signature valid): all match; against the checkpoint before it (cp-0.json, log position 20): "
        f"{findings} lost or gone backwards"]


class _SweeperMeetingADownStore:
    """A sweeper whose pass meets an object store that does not answer where the sweeper takes it
    in its stride (the erasures it finishes: each logged and tried again later), as the real one
    does: the erasure it could not finish is logged with its traceback, and the pass goes on."""

    def step(self, on_pass: Any = None) -> Any:
        import logging

        from adapters.retention import SweepReport

        try:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/palette-images")
        except EndpointConnectionError:
            logging.getLogger("palette.sweeper").warning(
                "could not finish the erasure of %s; retrying in %.0f s", "00000000-0000-0000-0000-0000000000e1",
                30.0, exc_info=True)
        return SweepReport()

    def close(self) -> None:
        """Nothing held."""


def test_admin_sweep_that_could_not_do_part_of_its_pass_says_so_in_one_line_and_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """`palette admin sweep` printed the sweeper's traceback ("retrying in 30 s", which no one
    would: the command ends) and exited 0, "0 erasure(s) finished", to an operator running it to
    finish an erasure while the object store was away."""
    from adapters import bootstrap

    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(bootstrap, "build_sweeper", lambda _settings: _SweeperMeetingADownStore())
    monkeypatch.setattr(operators, "reach_database", lambda _settings: None)  # no PostgreSQL here
    assert cli.main(["admin", "sweep"]) == 3
    out, err = capsys.readouterr()
    assert out.startswith("swept: 0 job(s) expired")
    assert "Traceback" not in err and "retrying in" not in err and err.count("\n") == 1, err
    assert err.startswith("palette admin sweep: could not finish the erasure of 00000000-0000-0000-0000-0000000000e1")
    assert "cannot reach the object store" in err and "PALETTE_S3_ENDPOINT" in err


@pytest.mark.parametrize("start", [2**63, 10**30])
@pytest.mark.parametrize("fmt", [[], ["--format", "csv"], ["--format", "parquet", "--out", "analytics"]])
def test_a_replay_from_past_any_log_position_is_refused_before_it_starts(start: int, fmt: list[str],
                                                                         monkeypatch: Any, capsys: Any) -> None:
    """`replay all --from` is a log position, a bigint, as GET /streams' `from` is: past it,
    psycopg sent a numeric, no index served `notification_id >= $1`, and the replay (or the
    Parquet export) walked the whole log to find nothing. Refused before any settings are read."""
    def never() -> None:
        raise AssertionError("the replay went on to the database")

    monkeypatch.setattr("adapters.cli.analysts.running_settings", never)
    assert cli.main(["replay", "all", "--from", str(start), *fmt]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--from" in err and f"{2**63 - 1:,}" in err, err


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_query_output_in_a_locale_that_cannot_spell_it_is_utf8_not_a_traceback(fmt: str, tmp_path: Path) -> None:
    """A client's text (a concept name, an error) may hold any character; `palette query`
    printed it in the locale's encoding, and in a latin-1 or ASCII one an emoji was a
    UnicodeEncodeError traceback. It writes UTF-8, as `palette replay` writes its lines."""
    import json

    env = {"PATH": "/usr/bin:/bin", "PALETTE_DATA_DIR": str(tmp_path), "PYTHONIOENCODING": "latin-1"}
    result = subprocess.run([sys.executable, "-m", "adapters.cli", "query", "SELECT 'wall 😀 café' AS name",
                             "--no-db", "--format", fmt], capture_output=True, timeout=120, env=env, cwd=ROOT,
                            check=False)
    assert b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    assert result.returncode == 0, result.stdout
    out = result.stdout.decode()
    assert (json.loads(out)[0]["name"] if fmt == "json" else out.splitlines()[-2 if fmt == "table" else 1]
            ).strip() == "wall 😀 café", out


def test_query_csv_quotes_a_value_or_name_holding_a_carriage_return_alone() -> None:
    """A lone CR (a grant's reason may hold one) was written bare, the writer's line terminator
    being "\\n" alone, and a CSV reader ended the row there: the value and everything after it
    were lost or moved to rows of their own."""
    import csv
    import io

    from adapters.query import render, run

    result = run("SELECT 'a' || chr(13) || 'b' AS \"r\rn\", chr(13) || chr(13) AS rr, 7 AS n", None, None)
    rows = list(csv.reader(io.StringIO(render(result, "csv"), newline="")))
    assert rows == [["r\rn", "rr", "n"], ["a\rb", "'\r\r", "7"]]  # a CR first starts a formula: quoted


def test_query_csv_writes_text_beginning_as_a_formula_after_a_quote_and_numbers_as_they_are() -> None:
    """A text cell beginning with = + - @, a tab or a CR (a grant's reason) ran as a formula when the
    CSV was opened in a spreadsheet; it is written after a quote there, a negative number stays a
    number, and JSON and the table keep the text exactly."""
    import csv
    import io
    import json

    from adapters.query import render, run

    result = run("SELECT '=1+1' AS f, '@SUM(A1)' AS a, '-x' AS t, chr(9) || 'x' AS tab, 'a=b' AS s, "
                 "-5 AS n, -0.5::DOUBLE AS d, '=x' AS \"=name\"", None, None)
    rows = list(csv.reader(io.StringIO(render(result, "csv"), newline="")))
    assert rows == [["f", "a", "t", "tab", "s", "n", "d", "'=name"],
                    ["'=1+1", "'@SUM(A1)", "'-x", "'\tx", "a=b", "-5", "-0.5", "'=x"]]
    assert list(json.loads(render(result, "json"))[0].values()) == [
        "=1+1", "@SUM(A1)", "-x", "\tx", "a=b", -5, -0.5, "=x"]
    assert render(result, "table").splitlines()[2].split()[:2] == ["=1+1", "@SUM(A1)"]


def test_audit_report_csv_writes_a_plan_beginning_as_a_formula_after_a_quote_and_a_negative_figure_as_it_is() -> None:
    """A plan's name (from the log's events) heads a row of `audit report --format csv`; one
    beginning with = ran as a formula in a spreadsheet. A negative figure stays a number."""
    import csv
    import io
    from datetime import UTC, datetime

    from adapters.cli.auditors import _report_text
    from projections.audit import PeriodFigures, PeriodReport

    plan = PeriodFigures("=evil()", users=1, opening=5, refunded=5, closing=10, held_opening=5)
    report = PeriodReport(datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC), 9, 0,
                          PeriodFigures("total"), [plan])
    rows = list(csv.DictReader(io.StringIO(_report_text(report, "csv"), newline="")))
    assert [(r["plan"], r["reserved"]) for r in rows] == [("'=evil()", "-5"), ("total", "0")]


BROKEN = "a\nb\rc"  # a name a shell lets through ($'a\nb\rc'), which printed as is broke the line


def _missing(tmp_path: Path) -> Path:
    return tmp_path / BROKEN / "out.json"  # under a directory that does not exist


def _kept(tmp_path: Path) -> Path:
    kept = tmp_path / BROKEN
    kept.write_text("{}")
    return kept


# Each refusal that names a path, given one with line breaks: its exit code.
REFUSALS: dict[str, Callable[[Path], int | None]] = {
    "bench --json": lambda tmp: cli.main(["bench", "--json", str(_missing(tmp))]),
    "an OSError's file": lambda tmp: cli._said_why("query", FileNotFoundError(2, "No such file", str(_missing(tmp)))),
    "an export's file": lambda tmp: analysts._not_exported("palette export", _missing(tmp), PermissionError(13, "No")),
    "checkpoint --out unwritable": lambda tmp: auditors._audit_checkpoint(Namespace(out=_missing(tmp)), None, None),
    "checkpoint --out exists": lambda tmp: auditors._audit_checkpoint(Namespace(out=_kept(tmp)), None, None),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_a_refusal_naming_a_path_with_line_breaks_stays_one_line(refusal: str, tmp_path: Path, capsys: Any) -> None:
    assert REFUSALS[refusal](tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\r" not in err and "a\\nb\\rc" in err, err
