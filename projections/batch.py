"""The store-independent half of applying a batch of delivered events to one read model.

A broker delivers at least once and, if it ever loses a message, with holes: an event may come
twice, come after its stream's later events were applied, or not come at all. ``plan`` decides
what of a batch is new for a model, per stream and in version order, and names the versions
missing between what the model has folded and what arrived (``gaps``: the caller reads those
from the event log, so a later event is never folded over a lost one). ``fold`` then runs the
pure fold, parking the first event that fails and holding its stream's later events behind it.
PostgreSQL (``projections.store``) and memory (``projections.memory``) share both halves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from uuid import UUID

from domain.contracts.envelope import EventEnvelope
from projections.models.base import ReadModel, Row, Rows

HELD = "held behind an earlier parked event of this stream"


def relevant(model: ReadModel, env: EventEnvelope) -> bool:
    """Every event of a stream type the model folds advances its tracking, even ones it
    ignores, so "seen" is exact per stream version."""
    return model.stream_type == env.stream_type or bool(model.keys_for(env))


def relevant_events(model: ReadModel, envelopes: Iterable[EventEnvelope]) -> list[EventEnvelope]:
    """The ``relevant`` events of ``envelopes`` (its test inline: a catch-up page asks it of every
    event for every model)."""
    own, keys_for = model.stream_type, model.keys_for
    return [e for e in envelopes if e.stream_type == own or keys_for(e)]


@dataclass
class Plan:
    todo: list[EventEnvelope] = field(default_factory=list)  # per stream, contiguous versions
    skipped: int = 0  # seen before (tracking) or twice in this batch
    held: list[EventEnvelope] = field(default_factory=list)  # their stream has a parked event
    gaps: dict[UUID, tuple[int, int]] = field(default_factory=dict)  # stream -> (after, upto) missing


def plan(model: ReadModel, envelopes: Iterable[EventEnvelope], tracked: dict[UUID, int],
         blocked: set[UUID]) -> Plan:
    result = Plan()
    streams: dict[UUID, dict[int, EventEnvelope]] = {}
    skipped = 0
    for e in relevant_events(model, envelopes):
        versions = streams.get(e.stream_id)
        if versions is None:
            if e.version <= tracked.get(e.stream_id, 0):
                skipped += 1
                continue
            streams[e.stream_id] = versions = {}
        elif e.version in versions or e.version <= tracked.get(e.stream_id, 0):
            skipped += 1
            continue
        versions[e.version] = e
    result.skipped = skipped
    for stream_id, versions in streams.items():
        ordered = [versions[v] for v in sorted(versions)]
        if stream_id in blocked:
            result.held.extend(ordered)
            continue
        expected = tracked.get(stream_id, 0) + 1
        if ordered[-1].version - expected + 1 != len(ordered):  # a hole before or between them
            result.gaps[stream_id] = (expected - 1, ordered[-1].version)
            ordered = ordered[:_prefix(ordered, expected)]
        result.todo.extend(ordered)
    return result


def merge_gaps(plans: Iterable[Plan]) -> dict[UUID, tuple[int, int]]:
    """One range per stream covering what any model misses of it."""
    gaps: dict[UUID, tuple[int, int]] = {}
    for p in plans:
        for stream_id, (after, upto) in p.gaps.items():
            seen = gaps.get(stream_id)
            gaps[stream_id] = (after, upto) if seen is None else (min(seen[0], after), max(seen[1], upto))
    return gaps


def _prefix(ordered: Sequence[EventEnvelope], expected: int) -> int:
    """How many of ``ordered`` continue the stream without a hole."""
    n = 0
    for e in ordered:
        if e.version != expected + n:
            break
        n += 1
    return n


@dataclass
class Folded:
    appended: list[Row] = field(default_factory=list)
    advanced: dict[UUID, int] = field(default_factory=dict)  # stream -> version folded up to
    parks: list[tuple[EventEnvelope, str, str]] = field(default_factory=list)  # (event, error, status)
    applied: int = 0


def fold(model: ReadModel, rows: Rows, todo: Sequence[EventEnvelope], held: Sequence[EventEnvelope],
         blocked: set[UUID]) -> Folded:
    """Fold ``todo`` into ``rows`` (in place). The first event of a stream that fails is parked
    and the rest of that stream is held, so a stream never skips an event."""
    out = Folded(parks=[(e, HELD, "held") for e in held])
    stopped = set(blocked)
    appended, advanced, apply = out.appended, out.advanced, model.apply  # a page's worth of events
    for e in todo:
        if e.stream_id in stopped:
            out.parks.append((e, HELD, "held"))
            continue
        try:
            # evolve raises before it changes ``rows`` (each fold builds the new row, then assigns)
            appended.extend(apply(rows, e))
        except Exception as exc:  # noqa: BLE001 - a poison event is parked, not fatal
            out.parks.append((e, f"{type(exc).__name__}: {exc}", "parked"))
            stopped.add(e.stream_id)
            continue
        advanced[e.stream_id] = e.version
        out.applied += 1
    return out
