"""The event log and the read models as Parquet, for analysts.

The log becomes one dataset partitioned by event type and day
(``type=<Event>/day=<YYYY-MM-DD>/part-<n>.parquet``): every event has ``position``,
``stream_id``, ``version`` and ``timestamp``, then its ``data`` flattened into typed columns whose
schema is derived from the event class (at its current version; a stored event of an older
version goes through the class's upcasters first, as every envelope does). UUIDs are dashed
text, ``dict`` fields JSON text, ``list`` fields lists.

Written streaming with bounded memory: a page of the log at a time is parsed (plain-JSON states
by Arrow's JSON reader; the rest, and events that need upcasting, through the envelope codec),
buffered per partition and flushed as row groups; at most ``MAX_OPEN`` files are open at once.

An export is written into a hidden staging folder (``.<name>.partial-<random>`` beside its place,
or ``.partial-<random>`` inside an existing --out) and moved into place once complete; one that
fails or is interrupted removes it. An export into a new --out appears whole in one rename; into
an existing one, its folders move in one rename each (moved back if that is cut short), so a
reader at that moment may see some of them. A staging folder a crash left behind is no dataset.
Each part is synced as it is closed and each folder before the rename that publishes it, the
folder it lands in after: a power cut after the rename leaves no empty or cut part under it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import types
import typing
from collections import OrderedDict
from collections.abc import Callable, Container, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq
from eventsourcing.persistence import Notification
from psycopg import sql
from psycopg.rows import tuple_row

from domain.contracts.personal import SEALED_PREFIX, redact
from domain.contracts.streams import TIME_SLACK_S, event_classes
from projections.files import sync
from projections.log import events_table
from projections.stored_events import UNREADABLE, from_notification

TIMESTAMP = pa.timestamp("us", tz="UTC")
ENVELOPE = pa.schema([("position", pa.int64()), ("stream_id", pa.string()), ("version", pa.int32()),
                      ("timestamp", TIMESTAMP)])
# What every event class carries that is no business data (the envelope has it already).
NOT_DATA = {"originator_id", "originator_version", "timestamp", "originator_id_type", "originator_topic"}
PAGE = 20_000  # events read per query
GROUP_ROWS = 128 * 1024  # rows per row group (a partition's buffer is flushed at this size)
BUFFERED_ROWS = 256 * 1024  # all partitions' buffers together; the largest is flushed beyond it
MAX_OPEN = 32  # open files; the least recently written is closed (a later batch opens a new part)
STAGING = ".partial-"  # in the name of an export still being written (or cut short by a crash)
# What Arrow (or the conversion before it) raises on a value a column cannot hold.
CELL_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError, OverflowError)


class ExportError(ValueError):
    """An export that cannot start (unknown type, output in the way); the message says why."""


def _arrow_type(hint: Any) -> pa.DataType:
    """The column type of a field annotation: dicts (and anything unforeseen) as JSON text."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _arrow_type(args[0]) if len(args) == 1 else pa.string()
    if origin in (list, tuple, set, frozenset):
        inner = typing.get_args(hint)
        return pa.list_(_arrow_type(inner[0]) if inner else pa.string())
    simple: dict[Any, pa.DataType] = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string(),
                                      UUID: pa.string(), datetime: TIMESTAMP, Decimal: pa.string()}
    return simple.get(hint, pa.string())


def _bare(hint: Any) -> Any:
    """``X | None`` -> ``X``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


@dataclass(frozen=True)
class EventSchema:
    """One event class's columns: its stored topic, type name (its partition), Arrow schema and
    current version. ``raw`` is what Arrow's JSON reader parses of a stored state (UUIDs and
    datetimes are ``{"_type_", "_data_"}`` objects there); ``texts`` are the fields kept as JSON
    text (dicts), filled by Python's JSON decoder."""

    topic: str
    name: str
    schema: pa.Schema
    class_version: int
    raw: pa.Schema
    uuids: tuple[str, ...]
    times: tuple[str, ...]
    texts: tuple[str, ...]


def _schema_of(topic: str, name: str, cls: type[Any]) -> EventSchema:
    fields, raw = list(ENVELOPE), [pa.field("timestamp", pa.struct([("_data_", pa.string())])),
                                  pa.field("class_version", pa.int64())]
    uuids: list[str] = []
    times: list[str] = []
    texts: list[str] = []
    for fname, hint in typing.get_type_hints(cls).items():
        if fname in NOT_DATA or typing.get_origin(hint) is typing.ClassVar:
            continue
        if fname in ENVELOPE.names:
            raise TypeError(f"{topic}: field {fname!r} collides with an envelope column")
        kind, bare = _arrow_type(hint), _bare(hint)
        fields.append(pa.field(fname, kind))
        if bare is UUID or bare is datetime:
            (uuids if bare is UUID else times).append(fname)
            raw.append(pa.field(fname, pa.struct([("_data_", pa.string())])))
        elif pa.types.is_string(kind) and bare is not str:
            texts.append(fname)
        else:
            raw.append(pa.field(fname, kind))
    return EventSchema(topic, name, pa.schema(fields), int(getattr(cls, "class_version", 1)), pa.schema(raw),
                       tuple(uuids), tuple(times), tuple(texts))


@cache
def event_schemas() -> dict[str, EventSchema]:
    """Stored topic -> its event class's columns, for every event class of every stream."""
    return {topic: _schema_of(topic, name, cls) for topic, name, cls in event_classes()}


def topics_for(types_: list[str] | None) -> list[str]:
    """The stored topics of these event type names (none: every topic); an unknown name is refused."""
    if not types_:
        return []
    schemas = event_schemas()
    known = {s.name for s in schemas.values()}
    unknown = [t for t in types_ if t not in known]
    if unknown:
        raise ExportError(f"unknown event type(s) {unknown}; known: {sorted(known)}")
    return [s.topic for s in schemas.values() if s.name in types_]


def _dashed(hex32: pa.Array) -> pa.Array:
    """32-hex-digit UUIDs as the dashed text everything else shows (vectorised)."""
    parts = [pc.utf8_slice_codeunits(hex32, a, b) for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))]
    return pc.binary_join_element_wise(*parts, "-")


# The envelope's fields, spliced by PostgreSQL into each plain-JSON state (no event field starts with "__").
SPLICED = [pa.field("__p", pa.int64()), pa.field("__s", pa.string()), pa.field("__v", pa.int32())]


def _parsed(spec: EventSchema, lines: bytes) -> tuple[pa.Table, list[int]]:
    """Plain-JSON states (one a line, the envelope's fields spliced in) parsed by Arrow's JSON
    reader, and apart the positions of those it cannot take (not in the table): stored at an
    older class version (the upcasters' turn), without a timestamp, or, when Arrow refuses the
    lines (a field of another type, a timestamp without its offset, a line that is not one
    object), all of them, for the envelope codec to read as every replay does (an undecodable
    one as ``_unreadable``)."""
    try:
        return _arrow_parsed(spec, lines)
    except CELL_ERRORS:
        return spec.schema.empty_table(), [int(line[len(b'{"__p":'):line.index(b",")]) for line in lines.split(b"\n")]


def _arrow_parsed(spec: EventSchema, lines: bytes) -> tuple[pa.Table, list[int]]:
    parsed = pj.read_json(pa.BufferReader(lines), read_options=pj.ReadOptions(block_size=max(1 << 20, len(lines) + 1)),
                          parse_options=pj.ParseOptions(explicit_schema=pa.schema([*SPLICED, *spec.raw]),
                                                        unexpected_field_behavior="ignore"))
    if parsed.num_rows != lines.count(b"\n") + 1:  # a state of two objects on its line reads as two rows
        raise ValueError("not one JSON object a line")
    columns: dict[str, Any] = {
        "position": parsed.column("__p"), "stream_id": parsed.column("__s"), "version": parsed.column("__v"),
        "timestamp": pc.struct_field(parsed.column("timestamp"), "_data_").cast(TIMESTAMP)}
    decoded = [json.loads(line) for line in lines.split(b"\n")] if spec.texts else []
    for f in spec.schema:
        if f.name in columns:
            continue
        if f.name in spec.texts:  # dicts stay JSON text: Arrow's reader would make a struct per key set
            columns[f.name] = pa.array([_cell(d.get(f.name), f.type) for d in decoded], f.type)
            continue
        col = parsed.column(f.name)
        if f.name in spec.uuids:
            col = _dashed(pc.struct_field(col, "_data_"))
        elif f.name in spec.times:
            col = pc.struct_field(col, "_data_").cast(TIMESTAMP)
        columns[f.name] = col
    table = pa.table(columns, schema=spec.schema)
    stale = pc.is_null(table.column("timestamp"))
    if spec.class_version > 1:
        stale = pc.or_(stale, pc.less(parsed.column("class_version").fill_null(1), spec.class_version))
    if pc.any(stale).as_py():
        return table.filter(pc.invert(stale)), table.filter(stale).column("position").to_pylist()
    return table, []


def _cell(value: Any, kind: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_timestamp(kind):
        return value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if pa.types.is_string(kind) and not isinstance(value, str):
        return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
    return value


def _decoded(spec: EventSchema, rows: list[tuple[int, str, int, bytes]], transcoder: Any,
             seen: DatasetStats | None = None) -> pa.Table:
    """Stored states through the envelope codec: any stored format, older versions upcast. Into
    ``seen``: the events unreadable (at the epoch, every field null) and the fields made null."""
    envs = [from_notification(Notification(originator_id=UUID(stream_id), originator_version=version,
                                           topic=spec.topic, state=state, id=position), transcoder)
            for position, stream_id, version, state in rows]
    columns: dict[str, list[Any]] = {"position": [e.id for e in envs], "stream_id": [str(e.stream_id) for e in envs],
                                     "version": [e.version for e in envs], "timestamp": [e.timestamp for e in envs]}
    arrays = {name: pa.array(values, spec.schema.field(name).type) for name, values in columns.items()}
    for f in spec.schema:
        if f.name not in arrays:
            values = [e.data.get(f.name) for e in envs]
            arrays[f.name] = _column(values, f.type)
            if seen is not None:
                seen.nulled += arrays[f.name].null_count - values.count(None)
    if seen is not None:
        seen.unreadable += sum(UNREADABLE in e.data for e in envs)
    return pa.table(arrays, schema=spec.schema)


def _column(values: list[Any], kind: pa.DataType) -> pa.Array:
    """Decoded values as a ``kind`` column; a value that cannot be one (a stored field of another
    type than its class says, which the replay shows as stored) is null there, not the export's end."""
    try:
        return pa.array([_cell(v, kind) for v in values], kind)
    except CELL_ERRORS:
        return pa.array([_fitting(v, kind) for v in values], kind)


def _fitting(value: Any, kind: pa.DataType) -> Any:
    try:
        cell = _cell(value, kind)
        pa.array([cell], kind)
    except CELL_ERRORS:
        return None
    return cell


class LogPages:
    """The log a page at a time, each page as one table per event type. PostgreSQL groups a
    page by topic and joins each topic's plain-JSON states into JSON lines with the envelope's
    fields spliced in, which Arrow's JSON reader parses; a state in any other form (compressed,
    say) or at an older class version goes through the envelope codec."""

    def __init__(self, conn: Any, table: sql.Composable, topics: list[str], transcoder: Any, start: int = 1) -> None:
        self.conn = conn
        self.start = start
        self.table = table
        self.topics = topics
        self.transcoder = transcoder
        self.seen = DatasetStats()  # what the dataset cannot show: unreadable events, fields made null
        # a JSON object with at least one member (``{"``) on one line: the envelope's fields go first
        plain = sql.SQL("(substring(state from 1 for 2) = '\\x7b22'::bytea AND position('\\x0a'::bytea in state) = 0)")
        self.query = sql.SQL(
            "WITH page AS (SELECT notification_id, originator_id, originator_version, topic, state FROM {} "
            "WHERE notification_id >= %s {} ORDER BY notification_id LIMIT %s) "
            "SELECT topic, {plain}, max(notification_id), "
            "CASE WHEN {plain} THEN string_agg(convert_to('{{\"__p\":' || notification_id || ',\"__s\":\"' || "
            "originator_id || '\",\"__v\":' || originator_version || ',', 'UTF8') || substring(state from 2), "
            "'\\x0a'::bytea ORDER BY notification_id) END, "
            "CASE WHEN NOT {plain} THEN array_agg(notification_id) END "
            "FROM page GROUP BY 1, 2").format(table, sql.SQL("AND topic = ANY(%s)") if topics else sql.SQL(""),
                                              plain=plain)

    def fetch(self, start: int, limit: int) -> list[tuple[Any, ...]]:
        """The page from ``start``, grouped by (topic, plain): JSON lines or the positions to decode."""
        params = [start, self.topics, limit] if self.topics else [start, limit]
        with self.conn.cursor(binary=True, row_factory=tuple_row) as cur:
            return list(cur.execute(self.query, params).fetchall())

    def tables(self, groups: list[tuple[Any, ...]]) -> list[tuple[str, pa.Table]]:
        """A fetched page as (type name, table) per event type, rows in position order."""
        schemas = event_schemas()
        tables: dict[str, list[pa.Table]] = {}
        for topic, _, _, lines, positions in groups:
            spec = schemas.get(topic)
            if spec is None:
                continue  # not an event of ours (an aggregate's bare Created, say)
            if lines is not None:
                table, positions = _parsed(spec, bytes(lines))
                tables.setdefault(topic, []).append(table)
            if positions:
                tables.setdefault(topic, []).append(_decoded(spec, self._rows(positions), self.transcoder, self.seen))
        return [(schemas[t].name, parts[0] if len(parts) == 1 else pa.concat_tables(parts).sort_by("position"))
                for t, parts in tables.items()]

    def __iter__(self) -> Iterator[list[tuple[str, pa.Table]]]:
        """Pages from ``start`` on; the next page is fetched (PostgreSQL working in its own process)
        while this one is parsed and written."""
        with ThreadPoolExecutor(1, thread_name_prefix="log-pages") as ahead:
            pending = ahead.submit(self.fetch, self.start, PAGE)
            while groups := pending.result():
                pending = ahead.submit(self.fetch, max(g[2] for g in groups) + 1, PAGE)
                yield self.tables(groups)

    def _rows(self, positions: list[int]) -> list[tuple[int, str, int, bytes]]:
        with self.conn.cursor(binary=True, row_factory=tuple_row) as cur:
            return [(r[0], r[1], r[2], bytes(r[3])) for r in cur.execute(sql.SQL(
                "SELECT notification_id, originator_id::text, originator_version, state FROM {} "
                "WHERE notification_id = ANY(%s) ORDER BY notification_id").format(self.table), [positions])]


@dataclass
class _Partition:
    writer: pq.ParquetWriter | None = None
    path: Path | None = None
    parts: int = 0
    buffered: list[pa.Table] = field(default_factory=list)
    rows: int = 0


@dataclass
class DatasetStats:
    events: int = 0
    files: int = 0
    bytes: int = 0
    partitions: set[tuple[str, str]] = field(default_factory=set)
    # read from the log, which the dataset cannot show: events whose stored state cannot be decoded
    # (at the epoch, every field null: outside any --since), and fields a column could not hold (null)
    unreadable: int = 0
    nulled: int = 0


class PartitionedWriter:
    """Tables into ``type=<name>/day=<date>/part-<n>.parquet`` with bounded buffers and open files."""

    def __init__(self, out: Path, compression: str = "zstd") -> None:
        self.out = out
        self.compression = compression
        self.partitions: dict[tuple[str, str], _Partition] = {}
        self.open: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.buffered = 0
        self.stats = DatasetStats()

    def add(self, name: str, table: pa.Table) -> None:
        days = pc.cast(table.column("timestamp"), pa.date32())
        unique = pc.unique(days).to_pylist()
        for day in unique:
            part = table if len(unique) == 1 else table.filter(pc.equal(days, pa.scalar(day, pa.date32())))
            key = (name, day.isoformat())
            p = self.partitions.setdefault(key, _Partition())
            p.buffered.append(part)
            p.rows += part.num_rows
            self.buffered += part.num_rows
            self.stats.events += part.num_rows
            if p.rows >= GROUP_ROWS:
                self._flush(key)
        while self.buffered > BUFFERED_ROWS:
            self._flush(max(self.partitions, key=lambda k: self.partitions[k].rows))

    def _flush(self, key: tuple[str, str]) -> None:
        p = self.partitions[key]
        if not p.rows:
            return
        if p.writer is None:
            while len(self.open) >= MAX_OPEN:
                self._close(next(iter(self.open)))
            folder = self.out / f"type={key[0]}" / f"day={key[1]}"
            folder.mkdir(parents=True, exist_ok=True)
            p.path = folder / f"part-{p.parts:05d}.parquet"
            p.writer = pq.ParquetWriter(p.path, p.buffered[0].schema, compression=self.compression)
            p.parts += 1
            self.stats.files += 1
            self.stats.partitions.add(key)
        self.open[key] = None
        self.open.move_to_end(key)
        p.writer.write_table(pa.concat_tables(p.buffered), row_group_size=GROUP_ROWS)
        self.buffered -= p.rows
        p.buffered, p.rows = [], 0

    def _close(self, key: tuple[str, str], durable: bool = True) -> None:
        p = self.partitions[key]
        writer, p.writer = p.writer, None
        self.open.pop(key, None)
        if writer is not None:
            try:
                writer.close()
            finally:  # a close that failed (a full disk) is not tried again by the writer's __del__
                writer.is_open = False
            if durable and p.path is not None:
                sync(p.path)

    def abandon(self) -> None:
        """Close the open files without flushing what is buffered: the export is being discarded."""
        for key in list(self.open):
            with contextlib.suppress(Exception):
                self._close(key, durable=False)

    def close(self) -> DatasetStats:
        for key in list(self.partitions):
            self._flush(key)
        for key in list(self.open):
            self._close(key)
        for name, day in self.stats.partitions:  # the parts' names, then the folders' (the staging folder: _staged)
            sync(self.out / f"type={name}" / f"day={day}")
        for name in {name for name, _ in self.stats.partitions}:
            sync(self.out / f"type={name}")
        self.stats.bytes = sum(f.stat().st_size for f in self.out.rglob("*.parquet"))
        return self.stats


def check_out_dir(out: Path, name: str) -> None:
    """Refuse to write into an existing dataset (its parts would mix with the new ones)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    taken = [p.name for p in out.glob(name)] if out.is_dir() else []
    if taken:
        raise ExportError(f"{out} already holds {taken[0]}: remove it or choose another --out")


def is_staging(path: Path) -> bool:
    """Whether ``path`` is an export's staging folder: unfinished, never data."""
    return path.name.startswith(".") and STAGING in path.name


@contextlib.contextmanager
def _staged(final: Path) -> Iterator[Path]:
    """A hidden folder to write an export into: put in ``final``'s place once the block completes,
    removed if it does not (an interrupt included). It lies beside a ``final`` that does not exist
    yet (one rename publishes it) and inside one that does, whose entries then move in: a folder
    there when the export starts is never replaced (it may be someone's working directory; one made
    empty while the export runs is, by the rename)."""
    token = uuid4().hex[:12]
    staging = final / f"{STAGING}{token}" if final.is_dir() else final.parent / f".{final.name}{STAGING}{token}"
    try:
        staging.mkdir(parents=True)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(final)) from None  # the path asked for, not ours
    try:
        yield staging
        sync(staging)
        _publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, final: Path) -> None:
    """``staging`` renamed to ``final`` (atomic), or, where ``final`` is a folder already, its
    entries moved into it one rename each, moved back if that is cut short, so that no part of the
    export is left there."""
    if staging.parent != final:
        try:
            staging.rename(final)
        except OSError as e:  # ``final`` made meanwhile, and not empty
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
                raise
        else:
            sync(final.parent)  # the rename itself
            return
    moved: list[str] = []
    try:
        for entry in sorted(staging.iterdir()):
            entry.rename(final / entry.name)
            moved.append(entry.name)
    except BaseException:
        for name in moved:
            (final / name).rename(staging / name)
        raise
    staging.rmdir()
    sync(final)


def export_log(recorder: Any, transcoder: Any, out: Path, start: int = 1, since: datetime | None = None,
               until: datetime | None = None, types_: list[str] | None = None,
               progress: Callable[[int], None] | None = None,
               erased: Container[UUID] = frozenset()) -> DatasetStats:
    """The log from position ``start`` (events of ``types_`` only, timestamps within
    [since, until]) as the partitioned dataset under ``out``; sealed fields of ``erased`` users
    read "erased". Staged, and moved into ``out`` once complete (``_staged``)."""
    topics = topics_for(types_)
    check_out_dir(out, "type=*")
    stop_after = until.timestamp() + TIME_SLACK_S if until else None
    table = events_table(recorder)
    with _staged(out) as staging:
        writer = PartitionedWriter(staging)
        try:
            with recorder.datastore.get_connection() as conn:
                pages = LogPages(conn, table, topics, transcoder, start)
                for tables in pages:
                    last = False
                    for name, t in tables:
                        if stop_after is not None and pc.max(t.column("timestamp")).value / 1e6 > stop_after:
                            last = True  # the log has moved past ``until`` (with slack): this is the last page
                        t = redacted(_between(t, since, until), erased)
                        if t.num_rows:
                            writer.add(name, t)
                    if progress:
                        progress(writer.stats.events)
                    if last:
                        break
            stats = writer.close()
            stats.unreadable, stats.nulled = pages.seen.unreadable, pages.seen.nulled
        except BaseException:  # a close that failed too (a full disk): the other files are closed here
            writer.abandon()
            raise
    return stats


def _between(table: pa.Table, since: datetime | None, until: datetime | None) -> pa.Table:
    ts = table.column("timestamp")
    mask = None
    if since is not None:
        mask = pc.greater_equal(ts, pa.scalar(since, TIMESTAMP))
    if until is not None:
        upper = pc.less_equal(ts, pa.scalar(until, TIMESTAMP))
        mask = upper if mask is None else pc.and_(mask, upper)
    return table if mask is None else table.filter(mask)


def redacted(table: pa.Table, erased: Container[UUID]) -> pa.Table:
    """``table`` with every sealed value of an erased user as "erased" (only the few columns
    that hold sealed values are touched)."""
    for i, f in enumerate(table.schema):
        if not pa.types.is_string(f.type):
            continue
        column = table.column(i)
        if not pc.any(pc.starts_with(column, SEALED_PREFIX)).as_py():
            continue
        values = [redact(v, erased) for v in column.to_pylist()]
        table = table.set_column(i, f, pa.array(values, f.type))
    return table


# -- read models ------------------------------------------------------------------------------
SQL_TYPES: dict[str, pa.DataType] = {"uuid": pa.string(), "text": pa.string(), "integer": pa.int32(),
                                     "bigint": pa.int64(), "smallint": pa.int16(), "boolean": pa.bool_(),
                                     "timestamp with time zone": TIMESTAMP, "double precision": pa.float64()}
READ_SCHEMA = "palette_read"


def table_schema(conn: Any, name: str) -> pa.Schema:
    """A read-model table's columns as Arrow types (UUIDs as dashed text, unknown types as text)."""
    found = conn.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
                         "AND table_name = %s ORDER BY ordinal_position", [READ_SCHEMA, name]).fetchall()
    if not found:
        raise ExportError(f"no read model table {READ_SCHEMA}.{name}")
    return pa.schema([(c, SQL_TYPES.get(t, pa.string())) for c, t in found])


def _cast_rows(rows: list[tuple[Any, ...]], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in schema]
    return pa.Table.from_arrays([pa.array([str(v) if isinstance(v, UUID) else v for v in col], f.type)
                                 for col, f in zip(columns, schema, strict=True)], schema=schema)


def read_table(conn: Any, name: str, batch: int = 50_000) -> Iterator[pa.Table]:
    """A read-model table in batches (a server-side cursor: memory holds one batch). The caller
    owns the transaction (read only, repeatable read for one snapshot)."""
    schema = table_schema(conn, name)
    with conn.cursor(name=f"export_{name}", row_factory=tuple_row) as cur:
        cur.itersize = batch
        cur.execute(sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(sql.Identifier(f.name) for f in schema), sql.Identifier(READ_SCHEMA, name)))
        while rows := cur.fetchmany(batch):
            yield _cast_rows(rows, schema)
    yield _cast_rows([], schema)  # an empty table still has its columns


def export_table(conn: Any, name: str, out: Path, erased: Container[UUID] = frozenset(),
                 progress: Callable[[int], None] | None = None) -> DatasetStats:
    """One read model as ``out/<name>/part-00000.parquet`` (one row group per batch); sealed
    fields of ``erased`` users read "erased". Staged beside, and renamed into place once complete.
    ``progress`` is told the rows written after each batch."""
    check_out_dir(out, name)
    out.mkdir(parents=True, exist_ok=True)
    stats = DatasetStats(files=1)
    with _staged(out / name) as folder:
        path = folder / "part-00000.parquet"
        writer: pq.ParquetWriter | None = None
        try:
            for batch in read_table(conn, name):
                t = redacted(batch, erased)
                writer = writer or pq.ParquetWriter(path, t.schema, compression="zstd")
                if t.num_rows or not stats.events:
                    writer.write_table(t)
                stats.events += t.num_rows
                if progress is not None and t.num_rows:
                    progress(stats.events)
        finally:
            if writer is not None:
                writer.close()
        sync(path)
        stats.bytes = path.stat().st_size
    return stats
