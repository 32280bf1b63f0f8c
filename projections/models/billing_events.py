"""``billing_events``: the append-only credit ledger, hash-chained per user; its keyed table is the
chain head (``billing_heads``).

Sign convention: ``amount`` is always positive; ``balance_delta`` is the signed effect on the
user's spendable balance: grant +amount, reserve -amount, spend 0 (reserved credits become
spent), refund +amount. Hence balance = sum(balance_delta) and granted = balance + reserved +
spent at every position.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC

from domain.contracts.envelope import EventEnvelope
from projections.models.base import AppendTable, Change, Column, Key, ReadModel, Row

LEDGER_COLUMNS = ("id", "user_id", "seq", "type", "amount", "balance_delta", "ref", "occurred_at",
                  "position", "prev_hash", "hash")
LEDGER = AppendTable(
    "billing_events", LEDGER_COLUMNS,
    "id text PRIMARY KEY, user_id uuid NOT NULL, seq integer NOT NULL, type text NOT NULL, "
    "amount integer NOT NULL, balance_delta integer NOT NULL, ref text NOT NULL, "
    "occurred_at timestamptz NOT NULL, position bigint NOT NULL, prev_hash text NOT NULL, "
    "hash text NOT NULL, UNIQUE (user_id, seq)",
    indexes=("position", "user_id, occurred_at"),
)
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


def entries(env: EventEnvelope) -> list[tuple[str, int, int, str]]:
    """The ledger entries of one User event: (type, amount, balance_delta, ref)."""
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


def keys_for(env: EventEnvelope) -> list[Key]:
    return [(env.stream_id,)] if env.stream_type == "User" and entries(env) else []


def evolve(heads: Mapping[Key, Row | None], env: EventEnvelope) -> Change:
    found = entries(env)
    if not found:
        return {}, []
    key = (env.stream_id,)
    head = heads.get(key) or {"user_id": env.stream_id, "seq": 0, "last_hash": GENESIS}
    seq, prev = head["seq"], head["last_hash"]
    out = []
    for n, (kind, amount, delta, ref) in enumerate(found):
        seq += 1
        row = {"id": f"{env.id}-{n}", "user_id": env.stream_id, "seq": seq, "type": kind,
               "amount": amount, "balance_delta": delta, "ref": ref, "occurred_at": env.timestamp,
               "position": env.id, "prev_hash": prev}
        row["hash"] = prev = ledger_hash(row["prev_hash"], row)
        out.append(row)
    return {key: {"user_id": env.stream_id, "seq": seq, "last_hash": prev}}, out


BILLING = ReadModel(
    "billing_events", "User",
    (Column("user_id", "uuid"), Column("seq", "integer"), Column("last_hash", "text")),
    ("user_id",), keys_for, evolve, table="billing_heads", append=LEDGER,
)
