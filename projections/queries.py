"""Queries over the read models (what GET /jobs and GET /rules serve)."""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime
from typing import Any
from uuid import UUID

import anyio
import anyio.to_thread
import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from projections.schema import table


class BadCursor(ValueError):
    """A pagination cursor that this API did not issue."""


def encode_cursor(created_at: datetime, job_id: UUID) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at.isoformat(), str(job_id)]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    """The position ``cursor`` stands for, if it is one ``encode_cursor`` writes: anything else
    (a time without its offset, which no row's time compares with, a UUID or time spelled
    another way) raises ``BadCursor``."""
    try:
        created, job = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        position = datetime.fromisoformat(created), UUID(job)
    except (ValueError, TypeError) as e:
        raise BadCursor("invalid cursor") from e
    if position[0].tzinfo is None or encode_cursor(*position) != cursor:
        raise BadCursor("invalid cursor")
    return position


POLL_FIRST_S = 0.005
POLL_MAX_S = 0.05


def streams_caught_up(conn: psycopg.Connection[Any], model: str, versions: dict[UUID, int]) -> bool:
    """Whether ``model`` has folded every given stream up to its version."""
    return not unfolded(conn, model, versions)


def unfolded(conn: psycopg.Connection[Any], model: str, versions: dict[UUID, int]) -> dict[UUID, int]:
    """The given streams ``model`` has not folded up to their versions yet."""
    if not versions:
        return {}
    query = sql.SQL("SELECT stream_id, version FROM {} WHERE stream_id = ANY(%s)").format(table(f"{model}_tracking"))
    seen = dict(conn.execute(query, [list(versions)]).fetchall())
    return {stream: version for stream, version in versions.items() if seen.get(stream, 0) < version}


def _check(pool: ConnectionPool[Any], model: str, versions: dict[UUID, int]) -> bool:
    with pool.connection() as conn:
        return streams_caught_up(conn, model, versions)


async def wait_for_streams(pool: ConnectionPool[Any], model: str, versions: dict[UUID, int],
                           timeout_s: float = 5.0) -> bool:
    """Wait briefly until ``model`` has folded every given stream up to its version
    (read-your-writes). Each check borrows a pool connection in a worker thread (anyio's, the
    API's thread limiter) and gives it back; between checks the wait holds neither a connection
    nor a thread, so slow readers cannot exhaust the pool."""
    if not versions:
        return True
    deadline = time.monotonic() + timeout_s
    delay = POLL_FIRST_S
    while True:
        if await anyio.to_thread.run_sync(_check, pool, model, versions):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await anyio.sleep(min(delay, left))
        delay = min(2 * delay, POLL_MAX_S)


def list_jobs(
    conn: psycopg.Connection[Any], user_id: UUID, limit: int, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first, keyset-paginated by (created_at, id)."""
    cols = ["id", "status", "preset", "rule_id", "total_items", "done_items", "failed_items",
            "created_at", "finished_at"]
    select = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
    params: list[Any] = [user_id]
    where = sql.SQL("user_id = %s")
    if cursor:
        created_at, job_id = decode_cursor(cursor)
        where = sql.SQL("user_id = %s AND (created_at, id) < (%s, %s)")
        params += [created_at, job_id]
    query = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY created_at DESC, id DESC LIMIT %s").format(
        select, table("jobs_log"), where)
    rows = [dict(zip(cols, r, strict=True)) for r in conn.execute(query, [*params, limit + 1]).fetchall()]
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"])
    return rows, next_cursor


def list_rules(conn: psycopg.Connection[Any], user_id: UUID) -> list[dict[str, Any]]:
    """The user's rules, each with the version of its stream the model has folded (the tracking
    row, written in the row's transaction): the rule's version as the row shows it, its ETag (0,
    which no rule has, for a row without one, never seen: listed all the same)."""
    cols = ["id", "name", "preset_id", "concepts_json", "protect_json"]
    # Looked up per row listed: a join is planned on the user's rows, deleted ones and all, and
    # for a user with many of them read the whole tracking table, one row per rule ever made.
    query = sql.SQL("SELECT {}, coalesce((SELECT t.version FROM {} t WHERE t.stream_id = r.id), 0) FROM {} r "
                    "WHERE r.user_id = %s AND NOT r.deleted ORDER BY r.created_at, r.id").format(
        sql.SQL(", ").join(sql.Identifier("r", c) for c in cols), table("rules_tracking"), table("rules"))
    out = []
    for r in conn.execute(query, [user_id]).fetchall():
        row = dict(zip([*cols, "version"], r, strict=True))
        out.append({"id": row["id"], "name": row["name"], "preset_id": row["preset_id"],
                    "concepts": json.loads(row["concepts_json"]), "protect": json.loads(row["protect_json"]),
                    "version": row["version"]})
    return out
