"""``job_items_log``: one row per item of a job — its status, keys and error."""

from __future__ import annotations

from collections.abc import Mapping
from uuid import UUID

from domain.contracts.envelope import EventEnvelope
from domain.contracts.keys import input_key
from projections.models.base import Change, Column, Key, ReadModel, Row

COLUMNS = (
    Column("job_id", "uuid"), Column("idx", "integer"), Column("status", "text"), Column("input_key", "text"),
    Column("output_key", "text"), Column("preview_key", "text"), Column("error", "text"),
    Column("updated_at", "timestamptz"),
)


def keys_for(env: EventEnvelope) -> list[Key]:
    if env.stream_type != "Job":
        return []
    if env.type in ("JobCreated", "JobDeleted"):
        return [(env.stream_id, i) for i in range(env.data["item_count"])]
    if env.type == "ItemCompleted":
        return [(env.stream_id, env.data["idx"])]
    return []


def evolve(rows: Mapping[Key, Row | None], env: EventEnvelope) -> Change:
    d = env.data
    if env.type == "JobCreated":
        user_id = UUID(str(d["user_id"]))
        return {(env.stream_id, i): {
            "job_id": env.stream_id, "idx": i, "status": "pending", "input_key": input_key(user_id, env.stream_id, i),
            "output_key": None, "preview_key": None, "error": None, "updated_at": env.timestamp,
        } for i in range(d["item_count"])}, []
    if env.type == "ItemCompleted":
        key = (env.stream_id, d["idx"])
        row = rows.get(key)
        if row is None:
            raise ValueError(f"job {env.stream_id} has no item {d['idx']}")
        return {key: {**row, "status": d["status"], "output_key": d["output_key"] or None,
                      "preview_key": d["preview_key"] or None, "error": d["error"] or None,
                      "updated_at": env.timestamp}}, []
    if env.type == "JobDeleted":
        return {(env.stream_id, i): None for i in range(d["item_count"])}, []
    return {}, []


JOB_ITEMS_LOG = ReadModel("job_items_log", "Job", COLUMNS, ("job_id", "idx"), keys_for, evolve)
