"""What a snapshot of a stream holds, and how often one is taken.

A snapshot is eventsourcing's ``Snapshot`` (the aggregate's attributes, with its class's
``class_version``), in a form JSON can hold: a set's members go as a list (``SetAsList``) and a
dictionary keyed by anything but strings (a user's reservations, by job id) as a list of pairs,
since JSON's keys are strings only. Its stored topic is this module's ``StreamSnapshot``: moving
or renaming the class makes the snapshots already stored unreadable (each is then passed over and
its stream folded whole, until the next one is taken), and so does one taken at a later
``class_version`` than this code's (by a release since rolled back).
"""

from __future__ import annotations

from typing import Any

from eventsourcing.domain import Snapshot
from eventsourcing.persistence import Transcoding
from eventsourcing.utils import resolve_topic

# A stream that grows for as long as its owner uses it (a user's: two events a job; a rule's: one
# an edit) gets a snapshot every this many events, so that loading it (a restart, an eviction
# from the writer's cache) reads fewer than this many events past its snapshot, plus what one
# save adds, whatever its age. A job's stream is bounded by its items and gets none.
SNAPSHOT_EVERY = 100

PAIRS = "_pairs_"  # {PAIRS: [[key, value], ...]}: a dictionary whose keys are not all strings


class SetAsList(Transcoding):
    """A set (a user's rule ids): its members as a list, in a stable order."""

    type = set
    name = "set"

    def encode(self, obj: set[Any]) -> list[Any]:
        return sorted(obj, key=str)

    def decode(self, data: list[Any]) -> set[Any]:
        return set(data)


def _storable(value: Any) -> Any:
    """``value`` with every dictionary (at any depth) JSON cannot key as it is in pair form; one
    that could be taken for that form (its one key is ``PAIRS``) goes in it too."""
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and value.keys() != {PAIRS}:
            return {k: _storable(v) for k, v in value.items()}
        return {PAIRS: [[k, _storable(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return [_storable(v) for v in value]
    return value


def _restored(value: Any) -> Any:
    if isinstance(value, dict):
        if value.keys() == {PAIRS}:
            return {k: _restored(v) for k, v in value[PAIRS]}
        return {k: _restored(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restored(v) for v in value]
    return value


class StreamSnapshot(Snapshot):
    """A snapshot whose attributes JSON can hold (see the module's docstring). Keys must be
    strings or values the transcoder turns back into themselves (UUIDs, numbers): a tuple key,
    say, would come back a list."""

    @classmethod
    def take(cls, aggregate: Any) -> Any:
        snapshot = super().take(aggregate)
        for name, value in snapshot.state.items():
            snapshot.state[name] = _storable(value)
        return snapshot

    def mutate(self, _: None) -> Any:
        """The aggregate, at its class's version. One taken at a later version (by code since
        rolled back) is refused: this code cannot downcast it, and its attributes are not this
        class's (the stream's events are read instead)."""
        written, known = self.state.get("class_version", 1), getattr(resolve_topic(self.topic), "class_version", 1)
        if written > known:
            raise ValueError(f"taken at class version {written}, past this code's {known}")
        restored = {name: _restored(value) for name, value in self.state.items()}
        return Snapshot(originator_id=self.originator_id, originator_version=self.originator_version,
                        timestamp=self.timestamp, topic=self.topic, state=restored).mutate(None)
