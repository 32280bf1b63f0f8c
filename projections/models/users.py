"""``users``: one row per user — plan and the credit buckets (credits spendable, reserved, spent,
granted; granted = credits + reserved + spent)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from domain.contracts.envelope import EventEnvelope
from domain.contracts.personal import ERASED, sealed_owner
from domain.user import DEVICE_KEY_SCHEME
from projections.models.base import Change, Column, Key, ReadModel, Row, current, own_stream

COLUMNS = (
    Column("id", "uuid"), Column("plan", "text"), Column("credits", "integer"), Column("reserved", "integer"),
    Column("spent", "integer"), Column("granted", "integer"), Column("device_hash", "text"),
    Column("created_at", "timestamptz"), Column("updated_at", "timestamptz"),
)


def _device_key(data: dict[str, Any]) -> str | None:
    """The stored device key: sealed (``sealed:v1:...``) or, from before sealing, keyed."""
    key = data.get("device_key")
    return key if isinstance(key, str) and (key.startswith(DEVICE_KEY_SCHEME) or sealed_owner(key)) else None


def evolve(rows: Mapping[Key, Row | None], env: EventEnvelope) -> Change:
    key = (env.stream_id,)
    d = env.data
    if env.type == "Registered":
        # The column keeps the D1 name but only ever holds the keyed hash (hmac-sha256:...):
        # a v1 event's raw ``device_hash`` is a credential and is never copied (NULL instead).
        return {key: {"id": env.stream_id, "plan": d["plan"], "credits": 0, "reserved": 0, "spent": 0,
                      "granted": 0, "device_hash": _device_key(d), "created_at": env.timestamp,
                      "updated_at": env.timestamp}}, []
    row = current(rows, key, env, "Registered")
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
    elif env.type == "Erased":
        row["device_hash"] = ERASED
    row["updated_at"] = env.timestamp
    return {key: row}, []


USERS = ReadModel("users", "User", COLUMNS, ("id",), own_stream("User"), evolve)
