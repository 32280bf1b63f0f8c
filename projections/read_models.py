"""Read models as pure folds: given the rows an event touches, set their new absolute values.

The same fold serves the live projector (rows loaded from PostgreSQL per batch) and rebuilds
(rows kept in memory over the whole log), so a rebuild equals the live model by construction.

billing_events sign convention: ``amount`` is always positive; ``balance_delta`` is the signed
effect on the user's spendable balance: grant +amount, reserve -amount, spend 0 (reserved
credits become spent), refund +amount. Hence balance = sum(balance_delta) and
granted = balance + reserved + spent at every position.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from adapters.envelope import EventEnvelope
from domain.user import DEVICE_KEY_SCHEME

Key = tuple[Any, ...]
Row = dict[str, Any]
Rows = dict[Key, Row | None]


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str


@dataclass(frozen=True)
class ReadModel:
    """A keyed table folded from events; ``evolve`` returns insert-only rows (the ledger)."""

    name: str
    stream_type: str  # the aggregate whose streams this model folds (and tracks)
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    keys_for: Callable[[EventEnvelope], list[Key]]
    evolve: Callable[[Rows, EventEnvelope], list[Row]]
    indexes: tuple[str, ...] = ()
    table: str = ""  # the keyed table; defaults to ``name``
    append_table: str | None = None

    @property
    def keyed_table(self) -> str:
        return self.table or self.name

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


def _ts(env: EventEnvelope) -> datetime:
    return env.timestamp


def _current(rows: Rows, key: Key, env: EventEnvelope, created_by: str) -> Row:
    """A copy of the row an event updates; an update before its creation event is a poison event."""
    row = rows.get(key)
    if row is None:
        raise ValueError(f"{env.stream_type.lower()} {env.stream_id} has no {created_by} event before {env.type}")
    return dict(row)


# -- users -------------------------------------------------------------------------------
def _device_key(data: dict[str, Any]) -> str | None:
    key = data.get("device_key")
    return key if isinstance(key, str) and key.startswith(DEVICE_KEY_SCHEME) else None


def _users_keys(env: EventEnvelope) -> list[Key]:
    return [(env.stream_id,)] if env.stream_type == "User" else []


def _users_evolve(rows: Rows, env: EventEnvelope) -> list[Row]:
    key = (env.stream_id,)
    d = env.data
    if env.type == "Registered":
        # The column keeps the D1 name but only ever holds the keyed hash (hmac-sha256:...):
        # a v1 event's raw ``device_hash`` is a credential and is never copied (NULL instead).
        rows[key] = {"id": env.stream_id, "plan": d["plan"], "credits": 0, "reserved": 0, "spent": 0,
                     "granted": 0, "device_hash": _device_key(d), "created_at": _ts(env),
                     "updated_at": _ts(env)}
        return []
    row = _current(rows, key, env, "Registered")
    if env.type == "CreditsGranted":
        row["credits"] += d["amount"]
        row["granted"] += d["amount"]
    elif env.type == "CreditsReserved":
        row["credits"] -= d["amount"]
        row["reserved"] += d["amount"]
    elif env.type == "CreditsSettled":
        row["reserved"] -= d["spent"] + d["refunded"]
        row["spent"] += d["spent"]
        row["credits"] += d["refunded"]
    elif env.type == "PlanChanged":
        row["plan"] = d["plan"]
    row["updated_at"] = _ts(env)
    rows[key] = row
    return []


USERS = ReadModel(
    "users", "User",
    (Column("id", "uuid"), Column("plan", "text"), Column("credits", "integer"),
     Column("reserved", "integer"), Column("spent", "integer"), Column("granted", "integer"),
     Column("device_hash", "text"), Column("created_at", "timestamptz"),
     Column("updated_at", "timestamptz")),
    ("id",), _users_keys, _users_evolve,
)


# -- rules -------------------------------------------------------------------------------
def _rules_keys(env: EventEnvelope) -> list[Key]:
    return [(env.stream_id,)] if env.stream_type == "Rule" else []


def _rules_evolve(rows: Rows, env: EventEnvelope) -> list[Row]:
    key = (env.stream_id,)
    d = env.data
    if env.type == "RuleCreated":
        rows[key] = {"id": env.stream_id, "user_id": d["user_id"], "name": d["name"],
                     "preset_id": d["preset_id"], "concepts_json": json.dumps(d["concepts"], sort_keys=True),
                     "protect_json": json.dumps(d["protect"]), "deleted": False,
                     "created_at": _ts(env), "updated_at": _ts(env)}
        return []
    row = _current(rows, key, env, "RuleCreated")
    if env.type == "RuleUpdated":
        row.update(name=d["name"], concepts_json=json.dumps(d["concepts"], sort_keys=True),
                   protect_json=json.dumps(d["protect"]))
    elif env.type == "RuleDeleted":
        row["deleted"] = True
    row["updated_at"] = _ts(env)
    rows[key] = row
    return []


RULES = ReadModel(
    "rules", "Rule",
    (Column("id", "uuid"), Column("user_id", "uuid"), Column("name", "text"),
     Column("preset_id", "text"), Column("concepts_json", "text"), Column("protect_json", "text"),
     Column("deleted", "boolean"), Column("created_at", "timestamptz"),
     Column("updated_at", "timestamptz")),
    ("id",), _rules_keys, _rules_evolve, indexes=("user_id, created_at",),
)


# -- jobs_log ------------------------------------------------------------------------------
def _jobs_keys(env: EventEnvelope) -> list[Key]:
    return [(env.stream_id,)] if env.stream_type == "Job" else []


def _jobs_evolve(rows: Rows, env: EventEnvelope) -> list[Row]:
    key = (env.stream_id,)
    d = env.data
    if env.type == "JobCreated":
        rows[key] = {"id": env.stream_id, "user_id": d["user_id"], "status": "created",
                     "preset": d["preset"], "rule_id": None, "cost_estimate": d["item_count"],
                     "total_items": d["item_count"], "done_items": 0, "failed_items": 0,
                     "created_at": _ts(env), "finished_at": None, "updated_at": _ts(env),
                     "version": env.version}
        return []
    row = _current(rows, key, env, "JobCreated")
    if env.type == "UploadConfirmed":
        row["status"] = "uploaded"
    elif env.type == "JobQueued":
        row["status"] = "queued"
        row["rule_id"] = d.get("rule_id")
    elif env.type == "JobStarted":
        row["status"] = "running"
    elif env.type == "ItemCompleted":
        row["done_items" if d["status"] == "done" else "failed_items"] += 1
    elif env.type in ("JobFinished", "JobCanceled"):
        row["status"] = d["status"] if env.type == "JobFinished" else "canceled"
        row["finished_at"] = _ts(env)
    row["updated_at"] = _ts(env)
    row["version"] = env.version
    rows[key] = row
    return []


JOBS_LOG = ReadModel(
    "jobs_log", "Job",
    (Column("id", "uuid"), Column("user_id", "uuid"), Column("status", "text"),
     Column("preset", "text"), Column("rule_id", "uuid"), Column("cost_estimate", "integer"),
     Column("total_items", "integer"), Column("done_items", "integer"),
     Column("failed_items", "integer"), Column("created_at", "timestamptz"),
     Column("finished_at", "timestamptz"), Column("updated_at", "timestamptz"),
     Column("version", "integer")),
    ("id",), _jobs_keys, _jobs_evolve, indexes=("user_id, created_at DESC, id",),
)


# -- job_items_log -------------------------------------------------------------------------
def _items_keys(env: EventEnvelope) -> list[Key]:
    if env.stream_type != "Job":
        return []
    if env.type == "JobCreated":
        return [(env.stream_id, i) for i in range(env.data["item_count"])]
    if env.type == "ItemCompleted":
        return [(env.stream_id, env.data["idx"])]
    return []


def _items_evolve(rows: Rows, env: EventEnvelope) -> list[Row]:
    d = env.data
    if env.type == "JobCreated":
        for i in range(d["item_count"]):
            rows[(env.stream_id, i)] = {
                "job_id": env.stream_id, "idx": i, "status": "pending",
                "input_key": f"inputs/{d['user_id']}/{env.stream_id}/{i}.jpg",
                "output_key": None, "preview_key": None, "error": None, "updated_at": _ts(env)}
    elif env.type == "ItemCompleted":
        key = (env.stream_id, d["idx"])
        row = rows.get(key)
        if row is None:
            raise ValueError(f"job {env.stream_id} has no item {d['idx']}")
        rows[key] = {**row, "status": d["status"], "output_key": d["output_key"] or None,
                     "preview_key": d["preview_key"] or None, "error": d["error"] or None,
                     "updated_at": _ts(env)}
    return []


JOB_ITEMS_LOG = ReadModel(
    "job_items_log", "Job",
    (Column("job_id", "uuid"), Column("idx", "integer"), Column("status", "text"),
     Column("input_key", "text"), Column("output_key", "text"), Column("preview_key", "text"),
     Column("error", "text"), Column("updated_at", "timestamptz")),
    ("job_id", "idx"), _items_keys, _items_evolve,
)


# -- billing_events (append-only, hash-chained per user) -------------------------------------
LEDGER_COLUMNS = ("id", "user_id", "seq", "type", "amount", "balance_delta", "ref", "occurred_at",
                  "position", "prev_hash", "hash")
GENESIS = "0" * 64


def ledger_hash(prev_hash: str, row: Row) -> str:
    """sha256 over the previous hash and the row's business fields (tamper evidence)."""
    canonical = json.dumps(
        [prev_hash, str(row["user_id"]), row["seq"], row["type"], row["amount"],
         row["balance_delta"], row["ref"], row["occurred_at"].astimezone(UTC).isoformat(),
         row["position"]],
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _billing_entries(env: EventEnvelope) -> list[tuple[str, int, int, str]]:
    d = env.data
    if env.type == "CreditsGranted":
        return [("grant", d["amount"], d["amount"], d.get("reason", ""))]
    if env.type == "CreditsReserved":
        return [("reserve", d["amount"], -d["amount"], d["job_id"])]
    if env.type == "CreditsSettled":
        out = []
        if d["spent"]:
            out.append(("spend", d["spent"], 0, d["job_id"]))
        if d["refunded"]:
            out.append(("refund", d["refunded"], d["refunded"], d["job_id"]))
        return out
    return []


def _billing_keys(env: EventEnvelope) -> list[Key]:
    if env.stream_type == "User" and _billing_entries(env):
        return [(env.stream_id,)]
    return []


def _billing_evolve(heads: Rows, env: EventEnvelope) -> list[Row]:
    entries = _billing_entries(env)
    if not entries:
        return []
    key = (env.stream_id,)
    head = heads.get(key) or {"user_id": env.stream_id, "seq": 0, "last_hash": GENESIS}
    seq, prev = head["seq"], head["last_hash"]
    out = []
    for n, (kind, amount, delta, ref) in enumerate(entries):
        seq += 1
        row = {"id": f"{env.id}-{n}", "user_id": env.stream_id, "seq": seq, "type": kind,
               "amount": amount, "balance_delta": delta, "ref": ref, "occurred_at": _ts(env),
               "position": env.id, "prev_hash": prev}
        row["hash"] = prev = ledger_hash(row["prev_hash"], row)
        out.append(row)
    heads[key] = {"user_id": env.stream_id, "seq": seq, "last_hash": prev}
    return out


BILLING = ReadModel(
    "billing_events", "User",
    # The keyed table of this model is the per-user chain head; the ledger rows are appended.
    (Column("user_id", "uuid"), Column("seq", "integer"), Column("last_hash", "text")),
    ("user_id",), _billing_keys, _billing_evolve,
    table="billing_heads", append_table="billing_events",
)
LEDGER_DDL = (
    "id text PRIMARY KEY, user_id uuid NOT NULL, seq integer NOT NULL, type text NOT NULL, "
    "amount integer NOT NULL, balance_delta integer NOT NULL, ref text NOT NULL, "
    "occurred_at timestamptz NOT NULL, position bigint NOT NULL, prev_hash text NOT NULL, "
    "hash text NOT NULL, UNIQUE (user_id, seq)"
)
LEDGER_INDEXES = ("position", "user_id, occurred_at")

READ_MODELS: dict[str, ReadModel] = {m.name: m for m in (USERS, RULES, JOBS_LOG, JOB_ITEMS_LOG, BILLING)}
