"""Read models in memory: the same plan and fold as PostgreSQL (``projections.batch``), and a
batch is all or nothing. For simulations and unit tests of the projection pipeline."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from domain.contracts.envelope import EventEnvelope
from projections import batch
from projections.models import READ_MODELS
from projections.models.base import ReadModel, Row, Rows
from projections.store import BatchResult, Fill


@dataclass
class ModelState:
    rows: Rows = field(default_factory=dict)
    ledger: list[Row] = field(default_factory=list)
    tracking: dict[UUID, int] = field(default_factory=dict)
    dead: dict[tuple[UUID, int], tuple[EventEnvelope, str, str]] = field(default_factory=dict)


class MemoryReadStore:
    def __init__(self, models: Iterable[ReadModel] | None = None) -> None:
        self.models = list(models or READ_MODELS.values())
        self.state = {m.name: ModelState() for m in self.models}
        self.positions: dict[str, int] = {}

    def apply(self, envelopes: Sequence[EventEnvelope], fill: Fill | None = None) -> BatchResult:
        result = BatchResult()
        if not envelopes:
            return result
        staged = copy.deepcopy(self.state)
        blocked = {m.name: {s for (s, _), (_, _, status) in staged[m.name].dead.items() if status in ("parked", "held")}
                   for m in self.models}
        plans = {m.name: batch.plan(m, envelopes, staged[m.name].tracking, blocked[m.name]) for m in self.models}
        gaps = batch.merge_gaps(plans.values())
        if gaps and fill is not None:
            found = fill(gaps)
            result.filled = len(found)
            plans = {m.name: batch.plan(m, [*envelopes, *found], staged[m.name].tracking, blocked[m.name])
                     for m in self.models}
        for m in self.models:
            p, st = plans[m.name], staged[m.name]
            result.skipped += p.skipped
            folded = batch.fold(m, st.rows, p.todo, p.held, blocked[m.name])
            st.rows = {k: v for k, v in st.rows.items() if v is not None}  # a None row is a delete
            st.ledger.extend(folded.appended)
            st.tracking.update(folded.advanced)
            for e, error, status in folded.parks:
                st.dead.setdefault((e.stream_id, e.version), (e, error, status))
            result.applied += folded.applied
            result.parked += len(folded.parks)
        self._commit(staged)
        return result

    def _commit(self, staged: dict[str, ModelState]) -> None:
        self.state = staged

    def position(self, name: str) -> int:
        return self.positions.get(name, 0)

    def save_position(self, name: str, position: int) -> None:
        self.positions[name] = position

    def table(self, name: str) -> dict[Any, Row]:
        """A table's rows by key, as PostgreSQL would hold them (the ledger: by row id)."""
        for m in self.models:
            if m.append_table == name:
                return {r["id"]: r for r in self.state[m.name].ledger}
            if m.keyed_table == name:
                return dict(self.state[m.name].rows)
        raise KeyError(name)
