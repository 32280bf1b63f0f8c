"""`palette query`: SQL (DuckDB) over the analysts' Parquet files and, read-only, the PostgreSQL
read models.

Views: one per event type over ``DIR/type=<Event>/`` (what `palette replay all --format parquet
--out DIR` writes), ``events`` over all of them (columns united by name), and one per read model
exported under ``DIR/<model>/`` (`palette export`). A read model the SQL names that has no
export is loaded from PostgreSQL through psycopg in one read-only, repeatable-read transaction
(DuckDB's postgres extension would be downloaded at runtime; this path needs nothing).

Only one SELECT runs, in an in-memory database whose file access is then confined to DIR and
locked: no statement of it writes anywhere, and a refused or failing query is one line.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import psycopg

from projections.parquet import read_table, redacted

READ_MODELS = ("users", "rules", "jobs_log", "job_items_log", "billing_events", "billing_heads")
DEFAULT_LIMIT = 1000


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
    """Views over the Parquet files under ``data``; the names made."""
    made: set[str] = set()
    types_ = sorted(p.name.split("=", 1)[1] for p in data.glob("type=*") if p.is_dir())
    for name in types_:
        files = _quoted(data / f"type={name}" / "*" / "*.parquet")
        con.execute(f"CREATE VIEW {_ident(name)} AS SELECT * FROM read_parquet({files}, "  # noqa: S608 - quoted
                    "hive_partitioning = true)")
        made.add(name)
    if types_:
        files = _quoted(data / "type=*" / "*" / "*.parquet")
        con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet({files}, hive_partitioning = true, "  # noqa: S608
                    "union_by_name = true)")
        made.add("events")
    for model in READ_MODELS:
        if (data / model).is_dir():
            files = _quoted(data / model / "*.parquet")
            con.execute(f"CREATE VIEW {model} AS SELECT * FROM read_parquet({files})")  # noqa: S608 - a fixed name
            made.add(model)
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
                con.register(name, redacted(pa.concat_tables(list(read_table(conn, name))), erased))


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


def run(query: str, data: Path | None, database_url: str | None, limit: int = DEFAULT_LIMIT) -> Result:
    """One SELECT over the views of ``data`` and the read models it names, at most ``limit`` rows."""
    if data is not None and not data.is_dir():
        raise QueryError(f"--data {data}: no such directory")
    con = duckdb.connect(":memory:")
    try:
        _one_select(con, query)
        made = _views(con, data) if data is not None else set()
        missing = [m for m in _named(query, READ_MODELS) if m not in made]
        if missing and database_url:
            _load_read_models(con, database_url, missing)
        # From here on the query reads files under ``data`` only, and cannot lift that.
        con.execute(f"SET allowed_directories = [{_quoted(data) if data is not None else ''}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        try:
            cur = con.execute(query)
            columns = [d[0] for d in cur.description or []]
            rows = cur.fetchmany(limit + 1)
        except duckdb.Error as e:
            raise QueryError(_first_line(e)) from None
    finally:
        con.close()
    return Result(columns, rows[:limit], len(rows) > limit)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render(result: Result, fmt: str) -> str:
    """The rows as an aligned table, CSV or a JSON array of objects."""
    if fmt == "json":
        return json.dumps([dict(zip(result.columns, r, strict=True)) for r in result.rows], default=str, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows([[_text(v) for v in r] for r in result.rows])
        return buf.getvalue().rstrip("\n")
    cells = [[_text(v) for v in r] for r in result.rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(result.columns)]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in result.rows) for i in range(len(widths))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True))

    out = [line(result.columns), line(["-" * w for w in widths]), *(line(r) for r in cells)]
    out.append(f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''})")
    return "\n".join(o.rstrip() for o in out)
