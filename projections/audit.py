"""Auditors' queries over ``billing_events``: ledgers, balances as of a time, exports, the
reconciliation against a fresh fold of the event log, and hash-chain verification."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from domain.contracts.streams import stream_topics, topic_prefix
from projections.models.base import Rows
from projections.models.billing_events import BILLING, GENESIS, LEDGER_COLUMNS, ledger_hash
from projections.models.users import USERS
from projections.rebuild import iter_envelopes

LEDGER = sql.Identifier("palette_read", "billing_events")
__all__ = ["LEDGER_COLUMNS", "BalanceMismatch", "ChainBreak", "Reconciliation", "balance_as_of", "export", "ledger",
           "reconcile", "verify"]


def _rows(conn: psycopg.Connection[Any], query: sql.Composed, params: list[Any]) -> list[dict[str, Any]]:
    return [dict(zip(LEDGER_COLUMNS, r, strict=True)) for r in conn.execute(query, params).fetchall()]


def _select() -> sql.Composed:
    return sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(sql.Identifier(c) for c in LEDGER_COLUMNS), LEDGER)


def ledger(conn: psycopg.Connection[Any], user_id: UUID, since: datetime | None = None,
           until: datetime | None = None) -> list[dict[str, Any]]:
    """The user's entries in order, each with the running balance (opening balance included)."""
    opening = 0
    if since is not None:
        row = conn.execute(sql.SQL("SELECT coalesce(sum(balance_delta), 0) FROM {} WHERE user_id = %s "
                                   "AND occurred_at < %s").format(LEDGER), [user_id, since]).fetchone()
        opening = int(row[0]) if row else 0
    where: sql.Composable = sql.SQL("user_id = %s")
    params: list[Any] = [user_id]
    if since is not None:
        where += sql.SQL(" AND occurred_at >= %s")
        params.append(since)
    if until is not None:
        where += sql.SQL(" AND occurred_at <= %s")
        params.append(until)
    rows = _rows(conn, _select() + sql.SQL(" WHERE ") + where + sql.SQL(" ORDER BY seq"), params)
    balance = opening
    for r in rows:
        balance += r["balance_delta"]
        r["balance"] = balance
    return rows


def balance_as_of(conn: psycopg.Connection[Any], user_id: UUID, as_of: datetime) -> dict[str, Any]:
    row = conn.execute(sql.SQL(
        "SELECT coalesce(sum(balance_delta), 0), "
        "coalesce(sum(amount) FILTER (WHERE type = 'grant'), 0), "
        "coalesce(sum(amount) FILTER (WHERE type = 'reserve'), 0), "
        "coalesce(sum(amount) FILTER (WHERE type = 'spend'), 0), "
        "coalesce(sum(amount) FILTER (WHERE type = 'refund'), 0), "
        "count(*), min(position), max(position) FROM {} WHERE user_id = %s AND occurred_at <= %s"
    ).format(LEDGER), [user_id, as_of]).fetchone()
    assert row is not None
    balance, granted, reserved_total, spent, refunded, entries, first, last = row
    return {"user_id": str(user_id), "as_of": as_of.isoformat(), "balance": int(balance),
            "granted": int(granted), "reserved": int(reserved_total - spent - refunded), "spent": int(spent),
            "entries": int(entries), "positions": {"first": first, "last": last}}


def export(conn: psycopg.Connection[Any], page: int = 10_000) -> Iterator[dict[str, Any]]:
    """Every ledger row in position order, read page by page (keyset on position, id)."""
    last_position, last_id = 0, ""
    while True:
        rows = _rows(conn, _select() + sql.SQL(" WHERE (position, id) > (%s, %s) ORDER BY position, id LIMIT %s"),
                     [last_position, last_id, page])
        if not rows:
            return
        yield from rows
        last_position, last_id = rows[-1]["position"], rows[-1]["id"]


@dataclass(frozen=True)
class BalanceMismatch:
    """A user whose projected balance is not the User aggregate's: ``table`` is ``billing_events``
    (``projected`` = Σ balance_delta of the user's ledger rows) or ``users`` (its credits column);
    ``aggregate`` is the balance the user's events give at ``version``, the version that table
    had folded in the snapshot."""

    user_id: str
    table: str
    projected: int
    aggregate: int
    version: int


@dataclass
class Reconciliation:
    events: int = 0
    ledger_rows: int = 0
    users: int = 0
    position: int = 0  # every event up to here must be folded
    differences: list[str] = field(default_factory=list)
    # users whose ledger sum or credits differ from the User aggregate's balance (at most ``limit``)
    balance_mismatches: list[BalanceMismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences and not self.balance_mismatches


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(str(row[c]) if isinstance(row[c], UUID) else row[c] for c in LEDGER_COLUMNS)


def _unfolded(conn: psycopg.Connection[Any], events_table: str, upto: int) -> int:
    """User events at or before position ``upto`` that users or billing_events has not folded,
    leaving out the streams a dead letter holds back (they will not move by waiting)."""
    behind = 0
    for model in (USERS, BILLING):
        row = conn.execute(sql.SQL(
            "SELECT count(*) FROM {} e LEFT JOIN {} t ON t.stream_id = e.originator_id "
            "WHERE e.topic LIKE %s AND e.notification_id <= %s AND e.originator_version > coalesce(t.version, 0) "
            "AND NOT EXISTS (SELECT 1 FROM palette_read.dead_letters d WHERE d.model = %s "
            "AND d.stream_id = e.originator_id AND d.status IN ('parked', 'held'))"
        ).format(sql.Identifier(events_table), sql.Identifier("palette_read", f"{model.name}_tracking")),
            [topic_prefix("User") + "%", upto, model.name]).fetchone()
        behind = max(behind, int(row[0]) if row else 0)
    return behind


def _held(conn: psycopg.Connection[Any]) -> set[UUID]:
    return {r[0] for r in conn.execute(
        "SELECT DISTINCT stream_id FROM palette_read.dead_letters WHERE model = ANY(%s) "
        "AND status IN ('parked', 'held')", [[USERS.name, BILLING.name]]).fetchall()}


def _balance_effect(env: Any) -> int:
    """What one event does to the User aggregate's balance (domain/user.py: a grant adds, a
    reservation takes, a settlement gives back what was not spent), written apart from the
    projections' folds so that a wrong fold cannot agree with itself."""
    if env.type == "CreditsGranted":
        return int(env.data["amount"])
    if env.type == "CreditsReserved":
        return -int(env.data["amount"])
    if env.type == "CreditsSettled":
        return int(env.data["refunded"])
    return 0


def _tracked(conn: psycopg.Connection[Any], model: Any) -> dict[UUID, int]:
    return {r[0]: r[1] for r in conn.execute(
        sql.SQL("SELECT stream_id, version FROM {}").format(sql.Identifier("palette_read", f"{model.name}_tracking")))}


def reconcile(conn: psycopg.Connection[Any], recorder: Any, transcoder: Any, limit: int = 20,
              progress: Callable[[int], None] | None = None, at: int | None = None,
              wait_s: float = 30.0) -> Reconciliation:
    """Prove billing_events (and users' credits) equal the fold of the event log, that they have
    folded every event up to position ``at`` (default: the log's head when this starts), and that
    every job's reservation is settled at most once. Apart from that fold (which a wrong fold
    would pass), each user's Σ balance_delta and credits are checked against the User aggregate's
    balance from its events (``balance_mismatches``).

    Safe on a live system: the projection is read in ONE snapshot (rows and per-stream tracking,
    which commit together), and each stream's events are folded exactly up to the version that
    snapshot has tracked, so what the projector folds meanwhile is neither missing nor extra.
    Events up to ``at`` not folded after ``wait_s`` (or held by a dead letter) are differences.
    One streaming pass over the User streams: memory holds rows, not the log."""
    report = Reconciliation()
    events_table = recorder.events_table_name
    upto = at if at is not None else (recorder.max_notification_id() or 0)
    report.position = upto
    deadline = time.monotonic() + wait_s
    pause = 0.05
    while _unfolded(conn, events_table, upto) and time.monotonic() < deadline:  # the projector is on its way
        time.sleep(pause)
        pause = min(1.0, pause * 2)
    with _snapshot(conn):
        held = _held(conn)
        tracked_users, tracked_billing = _tracked(conn, USERS), _tracked(conn, BILLING)
        actual_rows = {_key(r) for r in export(conn)}
        live = {str(r[0]): (r[1], r[2], r[3]) for r in conn.execute(
            "SELECT id, credits, reserved, spent FROM palette_read.users").fetchall()}
    stop = recorder.max_notification_id() or 0  # every event the snapshot tracked is at or before it
    users: Rows = {}
    expected: set[tuple[Any, ...]] = set()
    failed: set[UUID] = set()
    unfolded: Counter[UUID] = Counter()
    reserved: Counter[str] = Counter()
    settled: Counter[str] = Counter()
    heads: Rows = {}
    # the aggregate's balance at the version each table tracked: {user: [balance, version]}
    balances: dict[str, dict[str, list[int]]] = {"users": {}, "billing_events": {}}
    for env in iter_envelopes(recorder, transcoder, 1, stop, topics=stream_topics("User")):
        report.events += 1
        if progress and report.events % 100_000 == 0:
            progress(report.events)
        if env.type == "CreditsReserved":
            reserved[str(env.data["job_id"])] += 1
        elif env.type == "CreditsSettled":
            settled[str(env.data["job_id"])] += 1
        in_users = env.version <= tracked_users.get(env.stream_id, 0)
        in_billing = env.version <= tracked_billing.get(env.stream_id, 0)
        if env.id <= upto and not (in_users and in_billing):
            unfolded[env.stream_id] += 1
        if env.stream_id in failed:
            continue
        try:
            for table, folded in (("users", in_users), ("billing_events", in_billing)):
                if folded:
                    balance = balances[table].setdefault(str(env.stream_id), [0, 0])
                    balance[0] += _balance_effect(env)
                    balance[1] = env.version
            if in_users:
                USERS.apply(users, env)
            if in_billing:
                expected.update(_key(r) for r in BILLING.apply(heads, env))
        except Exception:  # noqa: BLE001 - reported below, as the live projector would park it
            failed.add(env.stream_id)
    if failed:
        report.differences.append(f"{len(failed)} user stream(s) cannot be folded")
    for stream_id, n in sorted(unfolded.items(), key=lambda kv: str(kv[0]))[:limit]:
        why = "held by a dead letter" if stream_id in held else f"not folded after {wait_s:.0f} s"
        report.differences.append(f"user {stream_id}: {n} event(s) at or before position {upto} {why}")
    if len(unfolded) > limit:
        report.differences.append(f"... and {len(unfolded) - limit} more user stream(s) not folded up to {upto}")
    report.ledger_rows = len(expected)
    for kind, keys in (("missing from the projection", expected - actual_rows),
                       ("in the projection but not in the log", actual_rows - expected)):
        for key in sorted(keys, key=lambda r: (r[8], r[0]))[:limit]:
            report.differences.append(f"{kind}: position {key[8]} {key[3]} {key[4]} user {key[1]} (id {key[0]})")
        if len(keys) > limit:
            report.differences.append(f"... and {len(keys) - limit} more {kind}")
    report.users = sum(1 for row in users.values() if row is not None)
    for (user_id,), row in users.items():
        if row is None:
            continue
        want = (row["credits"], row["reserved"], row["spent"])
        if live.get(str(user_id)) != want:
            report.differences.append(f"user {user_id}: projection has (credits, reserved, spent) "
                                      f"{live.get(str(user_id))}, the log folds to {want}")
    _compare_balances(report, balances, actual_rows, live, {str(s) for s in failed}, limit)
    for job_id, n in settled.items():
        if n > 1:
            report.differences.append(f"job {job_id} settled {n} times")
        if job_id not in reserved:
            report.differences.append(f"job {job_id} settled without a reservation")
    return report


def _compare_balances(report: Reconciliation, balances: dict[str, dict[str, list[int]]],
                      ledger_rows: set[tuple[Any, ...]], live: dict[str, tuple[int, int, int]],
                      failed: set[str], limit: int) -> None:
    """Σ balance_delta per user (billing_events) and users.credits against the User aggregate's
    balance at the version each had folded; a user with rows but no events has balance 0."""
    ledger_sums: Counter[str] = Counter()
    for row in ledger_rows:
        ledger_sums[str(row[1])] += row[5]
    projected = {"billing_events": dict(ledger_sums), "users": {u: v[0] for u, v in live.items()}}
    found: list[BalanceMismatch] = []
    for table in ("billing_events", "users"):
        folded = balances[table]
        for user_id in sorted(set(folded) | set(projected[table])):
            if user_id in failed:
                continue  # reported above: its stream cannot be folded
            aggregate, version = folded.get(user_id, [0, 0])
            have = projected[table].get(user_id, 0)
            if have != aggregate:
                found.append(BalanceMismatch(user_id, table, have, aggregate, version))
    report.balance_mismatches = found[:limit]
    for m in found[:limit]:
        what = "Σ balance_delta" if m.table == "billing_events" else "credits"
        report.differences.append(f"user {m.user_id}: {m.table} {what} is {m.projected}, the User aggregate's "
                                  f"balance at version {m.version} is {m.aggregate}")
    if len(found) > limit:
        report.differences.append(f"... and {len(found) - limit} more balance(s) not the User aggregate's")


@contextlib.contextmanager
def _snapshot(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """One consistent, read-only view of the read models for the statements inside (a caller's
    open transaction is used as it is)."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        yield
        return
    previous = conn.isolation_level
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            yield
    finally:
        conn.isolation_level = previous


@dataclass(frozen=True)
class ChainBreak:
    user_id: str
    seq: int
    position: int | None
    reason: str


def verify(conn: psycopg.Connection[Any]) -> tuple[int, list[ChainBreak]]:
    """Recompute every user's hash chain; the first break per user names where a row was
    edited, inserted or deleted. The chain heads (billing_heads) catch a deleted last row.

    Without a secret in the hash, someone who rewrites a whole chain consistently is caught by
    ``reconcile`` (the event log is the authority), not here."""
    heads = {str(r[0]): (r[1], r[2]) for r in conn.execute(
        "SELECT user_id, seq, last_hash FROM palette_read.billing_heads").fetchall()}
    breaks: list[ChainBreak] = []
    seen: set[str] = set()
    checked = 0
    state: dict[str, Any] = {"user": None}

    def close_chain() -> None:
        user = state["user"]
        if user is None or state["broken"]:
            return
        head = heads.get(user)
        if head is None or (head[0], head[1]) != (state["expected_seq"] - 1, state["prev"]):
            breaks.append(ChainBreak(user, state["expected_seq"], None,
                                     "the chain ends before its recorded head (the last row was deleted)"))

    with conn.transaction(), conn.cursor(name="verify_ledger") as cur:
        cur.itersize = 10_000
        cur.execute(_select() + sql.SQL(" ORDER BY user_id, seq"))
        for rec in cur:
            row = dict(zip(LEDGER_COLUMNS, rec, strict=True))
            user = str(row["user_id"])
            if user != state["user"]:
                close_chain()
                state.update(user=user, prev=GENESIS, expected_seq=1, broken=False)
                seen.add(user)
            checked += 1
            if state["broken"]:
                continue
            reason, at_seq = None, row["seq"]
            if row["seq"] != state["expected_seq"]:
                at_seq = state["expected_seq"]  # name the missing row, found just before this one
                reason = f"sequence jumps from {state['expected_seq'] - 1} to {row['seq']} (a row was deleted)"
            elif row["prev_hash"] != state["prev"]:
                reason = "prev_hash does not match the previous row (a row was inserted or replaced)"
            elif ledger_hash(row["prev_hash"], row) != row["hash"]:
                reason = "hash does not match the row's contents (the row was edited)"
            if reason:
                breaks.append(ChainBreak(user, at_seq, row["position"], reason))
                state["broken"] = True
            state["prev"], state["expected_seq"] = row["hash"], row["seq"] + 1
        close_chain()
    for user in sorted(set(heads) - seen):
        breaks.append(ChainBreak(user, 1, None, "every row of this chain is missing"))
    return checked, breaks
