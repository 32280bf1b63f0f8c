"""``jobs_log``: one row per job — status, item counts, timestamps (the job list and GET /jobs)."""

from __future__ import annotations

from collections.abc import Mapping

from domain.contracts.envelope import EventEnvelope
from projections.models.base import Change, Column, Key, ReadModel, Row, current, own_stream

COLUMNS = (
    Column("id", "uuid"), Column("user_id", "uuid"), Column("status", "text"), Column("preset", "text"),
    Column("rule_id", "uuid"), Column("cost_estimate", "integer"), Column("total_items", "integer"),
    Column("done_items", "integer"), Column("failed_items", "integer"), Column("created_at", "timestamptz"),
    Column("finished_at", "timestamptz"), Column("updated_at", "timestamptz"), Column("version", "integer"),
)


def evolve(rows: Mapping[Key, Row | None], env: EventEnvelope) -> Change:
    key = (env.stream_id,)
    d = env.data
    if env.type == "JobCreated":
        return {key: {"id": env.stream_id, "user_id": d["user_id"], "status": "created",
                      "preset": d["preset"], "rule_id": None, "cost_estimate": d["item_count"],
                      "total_items": d["item_count"], "done_items": 0, "failed_items": 0,
                      "created_at": env.timestamp, "finished_at": None, "updated_at": env.timestamp,
                      "version": env.version}}, []
    if env.type == "JobDeleted":
        return {key: None}, []  # the row goes: the job is gone from every view
    row = current(rows, key, env, "JobCreated")
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
        row["finished_at"] = env.timestamp
    row["updated_at"] = env.timestamp
    row["version"] = env.version
    return {key: row}, []


JOBS_LOG = ReadModel("jobs_log", "Job", COLUMNS, ("id",), own_stream("Job"), evolve,
                     indexes=("user_id, created_at DESC, id", "finished_at, id"))
