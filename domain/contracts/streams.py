"""The event streams: stream type -> aggregate class, and the stored topic of their events
(``domain.user:User.Registered``), which is the storage contract of each event class."""

from __future__ import annotations

from collections.abc import Iterator

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic

from domain.job import Job
from domain.rule import Rule
from domain.user import User

STREAMS: dict[str, type[Aggregate]] = {"User": User, "Job": Job, "Rule": Rule}

# An event is stamped when its command is decided, so the log's commit order may run behind its
# timestamps. The group committer refuses a command still unsaved COMMIT_LAG_MAX_S after it was
# queued (checked before it is decided and again before the save; its caller tries again, stamped
# anew). The save itself then takes at most ~52 s: eventsourcing tries an insert up to 10 times,
# each waiting at most 5 s for the events table's lock (POSTGRES_LOCK_TIMEOUT). Readers that find
# a time in the log by position (replay's windows, the Parquet export) look TIME_SLACK_S past it,
# which covers both. A database that stalls a save longer (its commit, new connections) is not.
COMMIT_LAG_MAX_S = 4.0
TIME_SLACK_S = 60.0


def topic_prefix(stream_type: str) -> str:
    """The stored topics of a stream type's events start with this (``domain.user:User.``)."""
    cls = STREAMS[stream_type]
    return f"{cls.__module__}:{cls.__qualname__}."


def event_classes(stream_type: str | None = None) -> Iterator[tuple[str, str, type[Aggregate.Event]]]:
    """(stored topic, name, class) of every event class of one stream type (None: of every one);
    not eventsourcing's ``Event`` and ``Created``, the bases it makes for each aggregate, which
    are never stored."""
    for kind, cls in STREAMS.items():
        if stream_type is not None and kind != stream_type:
            continue
        for name, attr in vars(cls).items():
            if isinstance(attr, type) and issubclass(attr, Aggregate.Event) and name not in ("Created", "Event"):
                yield get_topic(attr), name, attr


def stream_topics(stream_type: str) -> tuple[str, ...]:
    """Every stored event topic of one aggregate type (each read model folds one type's streams)."""
    return tuple(topic for topic, _, _ in event_classes(stream_type))
