"""What every read model is: a keyed table (its columns beside its fold), the keys an event
touches, and a pure ``evolve(rows, event) -> (changed rows, appended rows)``.

The same fold serves the live projector (rows loaded from PostgreSQL per batch), rebuilds (rows
kept in memory over the whole log) and the in-memory store of the simulations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from domain.contracts.envelope import EventEnvelope

Key = tuple[Any, ...]
Row = dict[str, Any]
Rows = dict[Key, Row | None]  # a None row is a delete
Change = tuple[Rows, list[Row]]  # the rows an event sets, and the rows it appends (a ledger)


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str


@dataclass(frozen=True)
class AppendTable:
    """An insert-only table beside the keyed one (the billing ledger)."""

    name: str
    columns: tuple[str, ...]
    ddl: str  # the column definitions and constraints
    indexes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReadModel:
    name: str
    stream_type: str  # the aggregate whose streams this model folds (and tracks)
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    keys_for: Callable[[EventEnvelope], list[Key]]
    evolve: Callable[[Mapping[Key, Row | None], EventEnvelope], Change]
    indexes: tuple[str, ...] = ()
    table: str = ""  # the keyed table; defaults to ``name``
    append: AppendTable | None = None

    @property
    def keyed_table(self) -> str:
        return self.table or self.name

    @property
    def append_table(self) -> str | None:
        return self.append.name if self.append else None

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def apply(self, rows: Rows, env: EventEnvelope) -> list[Row]:
        """Fold one event into ``rows`` (which ``evolve`` only reads): the rows it appends.
        A failing ``evolve`` leaves ``rows`` as they were."""
        changed, appended = self.evolve(rows, env)
        rows.update(changed)
        return appended


def current(rows: Mapping[Key, Row | None], key: Key, env: EventEnvelope, created_by: str) -> Row:
    """A copy of the row an event updates; an update before its creation event is a poison event."""
    row = rows.get(key)
    if row is None:
        raise ValueError(f"{env.stream_type.lower()} {env.stream_id} has no {created_by} event before {env.type}")
    return dict(row)


def own_stream(stream_type: str) -> Callable[[EventEnvelope], list[Key]]:
    """The keys of a model with one row per stream of ``stream_type``."""
    def keys_for(env: EventEnvelope) -> list[Key]:
        return [(env.stream_id,)] if env.stream_type == stream_type else []
    return keys_for
