"""``rules``: one row per saved rule (deleted rules stay, flagged; a user's live ones are read
through an index that holds only them, however many a client has made and deleted)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from domain.contracts.envelope import EventEnvelope
from projections.models.base import Change, Column, Key, ReadModel, Row, current, own_stream

COLUMNS = (
    Column("id", "uuid"), Column("user_id", "uuid"), Column("name", "text"), Column("preset_id", "text"),
    Column("concepts_json", "text"), Column("protect_json", "text"), Column("deleted", "boolean"),
    Column("created_at", "timestamptz"), Column("updated_at", "timestamptz"),
)


def evolve(rows: Mapping[Key, Row | None], env: EventEnvelope) -> Change:
    key = (env.stream_id,)
    d = env.data
    if env.type == "RuleCreated":
        return {key: {"id": env.stream_id, "user_id": d["user_id"], "name": d["name"],
                      "preset_id": d["preset_id"], "concepts_json": json.dumps(d["concepts"], sort_keys=True),
                      "protect_json": json.dumps(d["protect"]), "deleted": False,
                      "created_at": env.timestamp, "updated_at": env.timestamp}}, []
    row = current(rows, key, env, "RuleCreated")
    if env.type == "RuleUpdated":
        row.update(name=d["name"], concepts_json=json.dumps(d["concepts"], sort_keys=True),
                   protect_json=json.dumps(d["protect"]))
    elif env.type == "RuleDeleted":
        row["deleted"] = True
    row["updated_at"] = env.timestamp
    return {key: row}, []


RULES = ReadModel("rules", "Rule", COLUMNS, ("id",), own_stream("Rule"), evolve,
                  indexes=("user_id, created_at WHERE NOT deleted",))
