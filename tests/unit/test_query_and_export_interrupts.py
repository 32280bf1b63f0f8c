"""`palette query` and the Parquet exports when cut short: Ctrl-C stops a query quietly (exit 130),
a query past its --timeout is interrupted in one line, a --data folder DuckDB cannot read is one
line, and an export interrupted halfway leaves nothing a query would read (nor anything that
refuses the next export)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adapters import cli
from adapters.query import QueryError, run
from projections import parquet
from projections.parquet import event_schemas, export_log, export_table

ENDLESS = "SELECT count(*) FROM range(100000000000000)"  # hours of work: only an interrupt ends it
DAY = datetime(2026, 3, 1, 12, tzinfo=UTC)


@pytest.fixture
def palette_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from a throwaway data directory (the commands here never reach a stack)."""
    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path / "palette-data"))


def _one_line(capsys: pytest.CaptureFixture[str], *parts: str) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("palette query: "), captured.err
    assert all(p in captured.err for p in parts), captured.err
    return captured.err


# -- Ctrl-C and --timeout --------------------------------------------------------------------

@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[duckdb.DuckDBPyConnection]:
    """Every DuckDB connection `palette query` makes, its progress measured (not printed) so that a
    test can see the SELECT itself running."""
    made: list[duckdb.DuckDBPyConnection] = []
    connect = duckdb.connect

    def observed(database: str) -> duckdb.DuckDBPyConnection:
        con = connect(database)
        con.execute("SET enable_progress_bar = true; SET enable_progress_bar_print = false")
        made.append(con)
        return con

    monkeypatch.setattr(duckdb, "connect", observed)  # the module adapters.query calls
    return made


@contextlib.contextmanager
def _rescued(made: list[duckdb.DuckDBPyConnection], after_s: float = 20) -> Iterator[None]:
    """The block, its query interrupted if it still runs after ``after_s``: code that ignores Ctrl-C
    or its timeout fails the test (the result differs) instead of hanging it for hours."""
    left = threading.Event()

    def rescue() -> None:
        if not left.wait(after_s):
            for con in made:
                con.interrupt()

    rescuer = threading.Thread(target=rescue)
    rescuer.start()
    try:
        yield
    finally:
        left.set()
        rescuer.join()


def test_ctrl_c_during_a_query_exits_130_without_a_word(palette_env: None, connections: list[duckdb.DuckDBPyConnection],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    pressed: list[float] = []

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if connections and connections[0].query_progress() > 0:  # the SELECT is running
                pressed.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends the foreground process
                return
            time.sleep(0.01)

    # Python's own handler, as in a terminal (a job started in the background may inherit SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    try:
        with _rescued(connections, after_s=30):
            code = cli.main(["query", ENDLESS, "--no-db"])
        stopped = time.monotonic()
    finally:
        presser.join()
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    assert pressed and stopped - pressed[0] < 10  # at once, not when something else ended the query
    assert capsys.readouterr() == ("", "")


def test_a_query_past_its_timeout_is_interrupted_in_one_line(palette_env: None,
                                                              connections: list[duckdb.DuckDBPyConnection],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    with _rescued(connections):
        assert cli.main(["query", ENDLESS, "--no-db", "--timeout", "0.5"]) == 2
    assert time.monotonic() - t0 < 10
    _one_line(capsys, "ran past its timeout of 0.5 s")
    with _rescued(connections), pytest.raises(QueryError, match=r"timeout of 0\.2 s"):
        run(ENDLESS, None, None, timeout=0.2)
    assert run("SELECT 42", None, None, timeout=0).rows == [(42,)]  # 0: no limit
    # the deadline does not open the sandbox
    with pytest.raises(QueryError, match="Permission"):
        run("SELECT * FROM read_csv('/etc/passwd')", None, None, timeout=5)
    with pytest.raises(QueryError, match="0 or more"):
        run("SELECT 1", None, None, timeout=-1)


def test_an_interrupt_duckdb_drops_is_sent_again_until_the_query_stops() -> None:
    """DuckDB drops an interrupt that comes before its query has started: sent once, the timeout
    (or a Ctrl-C) in that window left the query running, and nothing asked again."""
    from adapters.query import _select

    class DropsTheFirst:
        def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
            self.con, self.interrupts = con, 0

        def execute(self, query: str) -> Any:
            return self.con.execute(query)

        def interrupt(self) -> None:
            self.interrupts += 1
            if self.interrupts > 1:
                self.con.interrupt()

    con = duckdb.connect(":memory:")
    try:
        dropping = DropsTheFirst(con)
        with _rescued([con], after_s=20), pytest.raises(QueryError, match="timeout"):
            _select(dropping, ENDLESS, 10, timeout=0.2)  # type: ignore[arg-type]
        assert dropping.interrupts >= 2
    finally:
        con.close()


def test_a_query_that_answers_as_its_timeout_interrupts_it_gives_its_rows() -> None:
    """Rows that came in as the timeout stopped the query are its answer, not a timeout error."""
    from adapters.query import _select

    class AnswersOnceInterrupted:
        def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
            self.con, self.interrupted = con, threading.Event()

        def execute(self, query: str) -> Any:
            assert self.interrupted.wait(20)
            return self.con.execute(query)

        def interrupt(self) -> None:
            self.interrupted.set()

    con = duckdb.connect(":memory:")
    try:
        late = AnswersOnceInterrupted(con)
        assert _select(late, "SELECT 42 AS answer", 10, timeout=0.2) == (["answer"], [(42,)])  # type: ignore[arg-type]
        assert late.interrupted.is_set()
    finally:
        con.close()


# -- --data folders DuckDB cannot read ---------------------------------------------------------

def _write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


@pytest.mark.parametrize(("where", "content"), [
    ("type=JobQueued", None),  # an empty event-type folder
    ("type=JobQueued/day=2026-03-01/part-00000.parquet", b"not parquet " * 1000),
    ("users/part-00000.parquet", b"PAR1 garbage"),
])
def test_a_data_folder_duckdb_cannot_read_is_refused_in_one_line(where: str, content: bytes | None, tmp_path: Path,
                                                                  palette_env: None,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    if content is None:
        (data / where).mkdir(parents=True)
    else:
        _write(data / where, content)
    assert cli.main(["query", "SELECT 1", "--data", str(data), "--no-db"]) == 2
    _one_line(capsys, str(data), where.split("/")[0].removeprefix("type="))


# -- exports cut short -------------------------------------------------------------------------

def _events(name: str, positions: list[int]) -> pa.Table:
    """Rows of event type ``name`` (data fields null: only the envelope matters here)."""
    schema = next(s.schema for s in event_schemas().values() if s.name == name)
    n = len(positions)
    columns: dict[str, Any] = {f.name: pa.nulls(n, f.type) for f in schema}
    columns |= {"position": pa.array(positions, pa.int64()), "stream_id": pa.array([f"s{p}" for p in positions]),
                "version": pa.array([1] * n, pa.int32()), "timestamp": pa.array([DAY] * n, parquet.TIMESTAMP)}
    return pa.table(columns, schema=schema)


class _Datastore:
    schema = ""

    @contextlib.contextmanager
    def get_connection(self) -> Iterator[None]:
        yield None


class _Recorder:
    datastore = _Datastore()
    events_table_name = "stored_events"


def _log(monkeypatch: pytest.MonkeyPatch, pages: list[list[tuple[str, pa.Table]]],
         then: BaseException | None = None, meanwhile: Any = None) -> None:
    """The log export reads ``pages`` (then raises ``then``; ``meanwhile`` runs after the last page)."""
    class Read:
        seen = parquet.DatasetStats()  # nothing unreadable among these pages

        def __init__(self, *_: Any) -> None:
            pass

        def __iter__(self) -> Iterator[list[tuple[str, pa.Table]]]:
            yield from pages
            if meanwhile is not None:
                meanwhile()
            if then is not None:
                raise then

    read = Read

    monkeypatch.setattr(parquet, "LogPages", read)
    monkeypatch.setattr(parquet, "GROUP_ROWS", 1)  # every page reaches the disk at once, as a big log's do


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_an_interrupted_log_export_leaves_nothing_and_the_next_one_completes(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "analytics"
    shown: list[int] = []
    _log(monkeypatch, [[("JobCreated", _events("JobCreated", [1, 2]))]], then=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        export_log(_Recorder(), None, out, progress=shown.append)
    assert shown == [2]  # progress as the pages went by
    assert not out.exists() or _entries(out) == set()  # no type=JobCreated without its JobQueued
    assert _entries(tmp_path) <= {"analytics"}  # the staging folder went too

    _log(monkeypatch, [[("JobCreated", _events("JobCreated", [1, 2]))], [("JobQueued", _events("JobQueued", [3]))]])
    stats = export_log(_Recorder(), None, out)  # not refused: nothing of the first one is there
    assert stats.events == 3 and _entries(out) == {"type=JobCreated", "type=JobQueued"}
    assert _entries(tmp_path) == {"analytics"}
    assert run("SELECT count(*) FROM events", out, None).rows == [(3,)]
    with pytest.raises(parquet.ExportError, match="already holds"):
        export_log(_Recorder(), None, out)  # a complete dataset is still never written over


def test_a_log_export_beside_read_models_moves_in_whole_or_not_at_all(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "analytics"
    (out / "users").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["u1"]}), out / "users" / "part-00000.parquet")
    page = [("JobCreated", _events("JobCreated", [1])), ("JobQueued", _events("JobQueued", [2]))]

    # another writer takes type=JobQueued while this export runs: its moving in fails halfway
    # (type=JobCreated moved first), and what it had moved goes back out
    def intrude() -> None:
        _write(out / "type=JobQueued" / "theirs", b"x")

    _log(monkeypatch, [page], meanwhile=intrude)
    with pytest.raises(OSError):
        export_log(_Recorder(), None, out)
    assert _entries(out) == {"users", "type=JobQueued"} and _entries(out / "type=JobQueued") == {"theirs"}
    assert _entries(tmp_path) == {"analytics"}

    (out / "type=JobQueued" / "theirs").unlink()
    (out / "type=JobQueued").rmdir()
    _log(monkeypatch, [page])
    export_log(_Recorder(), None, out)
    assert _entries(out) == {"users", "type=JobCreated", "type=JobQueued"}
    assert run("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM users)", out, None).rows == [(2, 1)]


def test_an_interrupted_read_model_export_leaves_nothing_and_the_next_one_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "analytics"
    batch = pa.table({"id": ["u1", "u2"], "plan": ["free", "pro"]})

    def cut_short(conn: Any, name: str) -> Iterator[pa.Table]:
        yield batch
        raise KeyboardInterrupt

    monkeypatch.setattr(parquet, "read_table", cut_short)
    with pytest.raises(KeyboardInterrupt):
        export_table(None, "users", out)
    assert not out.exists() or _entries(out) == set()

    monkeypatch.setattr(parquet, "read_table", lambda conn, name: iter([batch]))
    assert export_table(None, "users", out).events == 2
    assert _entries(out) == {"users"}
    assert run("SELECT plan FROM users ORDER BY id", out, None).rows == [("free",), ("pro",)]


def test_a_staging_folder_a_crash_left_behind_is_never_read_as_data(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "analytics"
    _log(monkeypatch, [[("JobCreated", _events("JobCreated", [1]))]])
    export_log(_Recorder(), None, data)
    # what a killed export leaves: its staging folder, beside the dataset or inside it (a log
    # export into an existing folder), and inside it for a read model
    left = [tmp_path / f".other{parquet.STAGING}0123abcd", data / f".users{parquet.STAGING}0123abcd",
            data / f"{parquet.STAGING}0123abcd"]
    for log in (left[0], left[2]):
        (log / "type=JobCreated" / "day=2026-03-01").mkdir(parents=True)
        pq.write_table(_events("JobCreated", [7, 8]), log / "type=JobCreated" / "day=2026-03-01" / "part-00000.parquet")
    left[1].mkdir()
    pq.write_table(pa.table({"id": ["u1"]}), left[1] / "part-00000.parquet")
    assert run("SELECT count(*) FROM events", data, None).rows == [(1,)]
    with pytest.raises(QueryError, match="Catalog Error"):
        run("SELECT count(*) FROM users", data, None)  # no view made of the unfinished users export
    for staging in (left[0], left[2]):
        with pytest.raises(QueryError, match="never finished"):
            run("SELECT 1", staging, None)


@pytest.mark.parametrize("spelled", ["relative", "absolute"])
def test_an_export_into_the_working_directory_lands_in_it_not_in_a_replacement(
        spelled: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    _log(monkeypatch, [[("JobCreated", _events("JobCreated", [1]))]])
    export_log(_Recorder(), None, Path(".") if spelled == "relative" else here)  # --out . / --out "$PWD"
    assert os.listdir(".") == ["type=JobCreated"]  # "." is still the folder this process works in
    assert _entries(tmp_path) == {"here"}


def _syncs(monkeypatch: pytest.MonkeyPatch, published: Path) -> list[tuple[str, bool]]:
    """os.fsync records the path each call synced and whether ``published`` existed then."""
    synced: list[tuple[str, bool]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), published.exists()))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def _as_published(synced: list[tuple[str, bool]], staging: str, final: Path) -> tuple[set[Path], set[Path]]:
    """The paths synced before the export was published and after, staging folders named as published."""
    def named(p: str) -> Path:
        return Path(re.sub(staging, str(final), p))
    return {named(p) for p, after in synced if not after}, {named(p) for p, after in synced if after}


def _everything(folder: Path) -> set[Path]:
    return {folder, *folder.rglob("*")}


@pytest.mark.parametrize("existing", [False, True])
def test_a_log_export_is_synced_whole_before_it_is_published_and_its_publishing_after(
        existing: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A power cut after the rename must not leave the published dataset with empty or cut parts,
    nor lose the rename: every part and folder is synced before it, the folder it lands in after."""
    out = tmp_path / "analytics"
    if existing:
        out.mkdir()
    _log(monkeypatch, [[("JobCreated", _events("JobCreated", [1, 2])), ("JobQueued", _events("JobQueued", [3]))],
                       [("JobCreated", _events("JobCreated", [4]))]])
    synced = _syncs(monkeypatch, out / "type=JobCreated")
    export_log(_Recorder(), None, out)
    staging = re.escape(str(out)) + r"/\.partial-" if existing else re.escape(str(tmp_path)) + r"/\.analytics\.partial-"
    before, after = _as_published(synced, staging + "[0-9a-f]+", out)
    assert len(list(out.rglob("*.parquet"))) == 2
    assert before == _everything(out)
    assert after == {out if existing else tmp_path}


def test_a_read_model_export_is_synced_whole_before_it_is_published_and_its_publishing_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "analytics"
    monkeypatch.setattr(parquet, "read_table", lambda conn, name: iter([pa.table({"id": ["u1"]})]))
    synced = _syncs(monkeypatch, out / "users")
    export_table(None, "users", out)
    before, after = _as_published(synced, re.escape(str(out)) + r"/\.users\.partial-[0-9a-f]+", out / "users")
    assert before == _everything(out / "users") and after == {out}


class _ReadOnlySnapshot:
    """What `palette export` asks of its connection: a read-only transaction, then closed."""

    isolation_level: Any = None
    read_only = False

    def __enter__(self) -> _ReadOnlySnapshot:
        return self

    def __exit__(self, *_exc: object) -> None:
        """Nothing to close."""

    def transaction(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


def test_a_long_read_model_export_shows_its_progress_on_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: Any) -> None:
    """`palette export job_items_log` of millions of rows ran for minutes without a word, where
    `palette replay all --format parquet` says how far it is every 100,000 events."""
    import psycopg

    from adapters import keyring

    batches = [pa.table({"id": [f"u{i}-{n}" for n in range(50_000)], "plan": ["free"] * 50_000}) for i in range(5)]
    monkeypatch.setattr(parquet, "read_table", lambda conn, name: iter(batches))
    monkeypatch.setattr(psycopg, "connect", lambda *_a, **_k: _ReadOnlySnapshot())
    monkeypatch.setattr(keyring, "all_erased", lambda _conn: frozenset())
    monkeypatch.setenv("PALETTE_DATA_DIR", str(tmp_path / "data"))
    assert cli.main(["export", "users", "--out", str(tmp_path / "analytics")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" rows")[0].strip() for line in err if " rows (" in line] == ["100,000", "200,000"], err
    assert err[-1].startswith("exported users: 250,000 rows")


def test_a_value_nested_too_deep_to_write_is_refused_in_one_line(palette_env: None,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A list nested 600 deep (DuckDB takes nearly a thousand) went through json.dumps in every
    format since a list cell is its JSON in CSV and the table too: Python's RecursionError, a
    traceback. It is refused in one line; one nested 100 deep is written."""
    from adapters.query import Result, render

    deep: list[Any] = [1]
    for _ in range(600):
        deep = [deep]
    for fmt in ("table", "csv", "json"):
        with pytest.raises(QueryError, match="nested too deep"):
            render(Result(["x"], [(deep,)], False), fmt)
        assert cli.main(["query", "SELECT " + "[" * 100 + "1" + "]" * 100 + " AS x", "--no-db", "--format", fmt]) == 0
        assert "[" * 100 + "1" + "]" * 100 in "".join(capsys.readouterr().out.split())  # json's is indented
    assert cli.main(["query", "SELECT " + "[" * 600 + "1" + "]" * 600 + " AS x", "--no-db"]) == 2  # DuckDB's 4 s
    _one_line(capsys, "nested")
