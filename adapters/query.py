"""`palette query`: SQL (DuckDB) over the analysts' Parquet files and, read-only, the PostgreSQL
read models.

Views: one per event type over ``DIR/type=<Event>/`` (what `palette replay all --format parquet
--out DIR` writes), ``events`` over all of them (columns united by name), and one per read model
exported under ``DIR/<model>/`` (`palette export`). A read model the SQL names that has no
export is loaded from PostgreSQL through psycopg in one read-only, repeatable-read transaction
(DuckDB's postgres extension would be downloaded at runtime; this path needs nothing).

Only one SELECT runs, in an in-memory database whose file access is then confined to DIR and
locked: no statement of it writes anywhere, and a refused or failing query is one line. The
SELECT runs on a worker thread while the main thread waits for it with a deadline: past its
timeout, or at Ctrl-C (which reaches the waiting main thread as KeyboardInterrupt, and so the
CLI's quiet exit 130), DuckDB's ``interrupt()`` stops it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import psycopg

from domain.text import csv_cell, one_line
from projections.parquet import ExportError, is_staging, read_table, redacted

READ_MODELS = ("users", "rules", "jobs_log", "job_items_log", "billing_events", "billing_heads")
DEFAULT_LIMIT = 1000
DEFAULT_TIMEOUT_S = 300.0
WAKE_S = 0.1  # the waiting main thread wakes this often, so a Ctrl-C sent to another thread still counts
# What DuckDB's Python binding raises (a RuntimeError) when it finds a SIGINT pending on the main
# thread: the KeyboardInterrupt itself is spent by then. (It misses some: hence the worker thread.)
DUCKDB_CTRL_C = "Query interrupted"


class QueryError(ValueError):
    """A query refused or failed; the message is one line."""


@dataclass(frozen=True)
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool  # more rows than the limit


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _views(con: duckdb.DuckDBPyConnection, data: Path) -> set[str]:
    """Views over the Parquet files under ``data``; the names made. Only ``type=<Event>/`` and
    ``<model>/`` folders count (an export's hidden staging folder never does); a folder DuckDB
    cannot read as Parquet (empty, or holding a file that is not Parquet) is refused in one line."""
    made: set[str] = set()

    def view(name: str, select: str) -> None:
        try:
            con.execute(f"CREATE VIEW {_ident(name)} AS {select}")
        except duckdb.Error as e:
            raise QueryError(f"--data {data}: view {name}: {_first_line(e)}") from None
        made.add(name)

    types_ = sorted(p.name.split("=", 1)[1] for p in data.glob("type=*") if p.is_dir())
    for name in types_:
        files = _quoted(data / f"type={name}" / "*" / "*.parquet")
        view(name, f"SELECT * FROM read_parquet({files}, hive_partitioning = true)")  # noqa: S608 - quoted
    if types_:
        files = _quoted(data / "type=*" / "*" / "*.parquet")
        view("events", f"SELECT * FROM read_parquet({files}, hive_partitioning = true, union_by_name = true)")  # noqa: S608
    for model in READ_MODELS:
        if (data / model).is_dir():
            view(model, f"SELECT * FROM read_parquet({_quoted(data / model / '*.parquet')})")  # noqa: S608
    return made


def _named(query: str, names: Sequence[str]) -> list[str]:
    """The read models a query mentions (a word match: loading one too many costs time, not truth)."""
    return [n for n in names if re.search(rf"\b{re.escape(n)}\b", query, re.IGNORECASE)]


def _load_read_models(con: duckdb.DuckDBPyConnection, database_url: str, names: list[str]) -> None:
    """Read models from PostgreSQL into DuckDB, all from one read-only snapshot (sealed fields
    of erased users read "erased")."""
    import pyarrow as pa

    from adapters.keyring import all_erased

    with psycopg.connect(database_url) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            erased = all_erased(conn)
            for name in names:
                try:
                    tables = list(read_table(conn, name))
                except ExportError as e:  # a database whose read models were never made
                    raise QueryError(f"{e} (has the stack's projector run on this database?)") from None
                con.register(name, redacted(pa.concat_tables(tables), erased))


def _one_select(con: duckdb.DuckDBPyConnection, query: str) -> None:
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as e:
        raise QueryError(_first_line(e)) from None
    if len(statements) != 1:
        raise QueryError(f"one statement at a time ({len(statements)} given)")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryError(f"read-only: only SELECT runs here, not {kind.name}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _select(con: duckdb.DuckDBPyConnection, query: str, limit: int,
            timeout: float) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The query's columns and first ``limit + 1`` rows. It runs on a worker thread: DuckDB's own
    check for Ctrl-C, on the main thread, misses some, while a main thread waiting in Python gets
    every one as KeyboardInterrupt; that, or the deadline passing, interrupts the query."""
    done: dict[str, Any] = {}
    # An Event, not Thread.join: a join that Ctrl-C interrupts marks the thread stopped while it
    # still runs (CPython gh-90882), and the connection would be closed under it.
    finished = threading.Event()

    def work() -> None:
        try:
            cur = con.execute(query)
            done["result"] = ([d[0] for d in cur.description or []], cur.fetchmany(limit + 1))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            done["error"] = e
        finally:
            finished.set()

    def stop() -> None:
        # Again at each wake: DuckDB drops an interrupt that comes before its query has started.
        while True:
            with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: already stopping
                con.interrupt()
                if finished.wait(WAKE_S):
                    return

    deadline = time.monotonic() + timeout if timeout else math.inf
    timed_out = False
    worker = threading.Thread(target=work, name="palette-query", daemon=True)
    try:
        worker.start()
        while not finished.wait(WAKE_S):
            if time.monotonic() >= deadline:
                timed_out = True
                stop()
    except KeyboardInterrupt:
        if worker.ident is not None:  # started: stopped before the connection is closed under it
            stop()
        raise
    return _answer(done, timed_out, timeout)


def _answer(done: dict[str, Any], timed_out: bool, timeout: float) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The worker's columns and rows; else why there are none: the timeout it was stopped at, DuckDB's
    error in one line, or whatever else it raised (a KeyboardInterrupt there), as raised."""
    if "result" in done:
        result: tuple[list[str], list[tuple[Any, ...]]] = done["result"]
        return result
    if timed_out:
        raise QueryError(f"the query ran past its timeout of {timeout:g} s (--timeout SECONDS; 0: none)")
    if isinstance(done["error"], duckdb.Error):
        raise QueryError(_first_line(done["error"]))
    raise done["error"]


def run(query: str, data: Path | None, database_url: str | None, limit: int = DEFAULT_LIMIT,
        timeout: float = DEFAULT_TIMEOUT_S) -> Result:
    """One SELECT over the views of ``data`` and the read models it names, at most ``limit`` rows,
    interrupted once it has run ``timeout`` seconds (0: never)."""
    if not query.isascii():
        try:  # argv's bytes that are no UTF-8 come as lone surrogates, which DuckDB's binding refuses
            query.encode()
        except UnicodeEncodeError as e:
            raise QueryError(f"the SQL is not UTF-8 text (at character {e.start + 1})") from None
    if not (math.isfinite(timeout) and timeout >= 0):
        raise QueryError(f"--timeout must be a number of seconds, 0 or more (0: none), not {timeout}")
    if data is not None and not data.is_dir():
        raise QueryError(f"--data {data}: {'not a directory' if data.exists() else 'no such directory'}")
    if data is not None and is_staging(data):
        raise QueryError(f"--data {data}: an export that never finished (interrupted or crashed); remove it")
    # DuckDB spills into ``.tmp`` in the working directory by default, and the lock-down below
    # allows its spill folder: a folder of this query's own instead, removed after it.
    with tempfile.TemporaryDirectory(prefix="palette-query-", ignore_cleanup_errors=True) as spill:
        con = duckdb.connect(":memory:")
        try:
            con.execute(f"SET temp_directory = {_quoted(Path(spill))}")
            _one_select(con, query)
            made = _views(con, data) if data is not None else set()
            missing = [m for m in _named(query, READ_MODELS) if m not in made]
            if missing and database_url:
                _load_read_models(con, database_url, missing)
            # From here on the query reads files under ``data`` only, and cannot lift that.
            con.execute(f"SET allowed_directories = [{_quoted(data) if data is not None else ''}]")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            columns, rows = _select(con, query, limit, timeout)
        except RuntimeError as e:
            if str(e) == DUCKDB_CTRL_C:  # a Ctrl-C while the views were made
                raise KeyboardInterrupt from None
            raise
        finally:
            con.close()
    return Result(columns, rows[:limit], len(rows) > limit)


def _text(value: Any, whole: bool = False) -> str:
    """A cell as text: a double to six significant digits in the table (to read), ``whole`` (CSV,
    for another program) as its shortest form that reads back as the same double. A list, struct
    or MAP is its JSON, as ``--format json`` writes it (not Python's repr, ``['sky']``, which a
    CSV reader cannot parse)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if whole else f"{value:.6g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_finite(value), default=str, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if isinstance(value, bytes):
        return _hex(value)
    return str(value)


def _hex(value: bytes) -> str:
    """A BLOB as psql writes a bytea (``\\x`` and its hex), not Python's ``b'...'``."""
    return "\\x" + value.hex()


def _finite(value: Any) -> Any:
    """``value`` with every float that is not finite (in lists and structs too) as None, each BLOB
    as its hex (``_hex``), and each key of a struct or MAP that JSON cannot take as one (a date, a
    UUID, a decimal, a BLOB, an interval, an infinite double: ``histogram`` keys a MAP by its
    values) as its text, as values are."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {_json_key(k): _finite(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return _hex(value)
    return value


def _json_key(key: Any) -> Any:
    if key is None or isinstance(key, (str, int)) or (isinstance(key, float) and math.isfinite(key)):
        return key
    return _hex(key) if isinstance(key, bytes) else str(key)


def _unique_names(columns: Sequence[str]) -> list[str]:
    """The columns as JSON object names: a name repeated (``SELECT *`` over a join names ``status``
    twice) gets ``_1``, ``_2``... as DuckDB's own result frames do, never a name already there."""
    taken = set(columns)
    out: list[str] = []
    for name in columns:
        unique, n = name, 0
        while unique in out or (n and unique in taken):
            n += 1
            unique = f"{name}_{n}"
        out.append(unique)
    return out


def _csv_line(values: Sequence[Any]) -> str:
    """One CSV row without its line end. Written with "\\r\\n" as the terminator, so the writer
    quotes a value holding either character (with "\\n" alone it left a lone CR bare, and a
    reader ended the row there); the rows are joined by "\\n"."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(values)
    return buf.getvalue()[:-2]


def render(result: Result, fmt: str) -> str:
    """The rows as an aligned table, CSV or a JSON array of objects (names made unique);
    QueryError when a value is nested too deep to write as JSON (a list cell is its JSON in
    every format; Python's recursion gives out some 500 levels down)."""
    try:
        return _render(result, fmt)
    except RecursionError:
        raise QueryError("a value is nested too deep to write (hundreds of levels); select a part of it") from None


def _render(result: Result, fmt: str) -> str:
    if fmt == "json":  # strict JSON: NaN and ±Infinity (0.0/0.0 in DuckDB) have no JSON form, so null
        names = _unique_names(result.columns)
        return json.dumps([dict(zip(names, map(_finite, r), strict=True)) for r in result.rows],
                          default=str, indent=1, allow_nan=False)
    if fmt == "csv":
        rows = [[csv_cell(c) for c in result.columns],
                *([csv_cell(v) if isinstance(v, str) else _text(v, whole=True) for v in r] for r in result.rows)]
        return "\n".join(map(_csv_line, rows))
    # control characters escaped (as the audit ledger's cells): a line break (a grant's reason,
    # a column named with one) broke its row across lines
    names = [one_line(c) for c in result.columns]
    cells = [[one_line(_text(v)) for v in r] for r in result.rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(names)]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in result.rows) for i in range(len(widths))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True))

    out = [line(names), line(["-" * w for w in widths]), *(line(r) for r in cells)]
    out.append(f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''})")
    return "\n".join(o.rstrip() for o in out)
