"""The event streams: stream type -> aggregate class, and the stored topic of their events
(``domain.user:User.Registered``), which is the storage contract of each event class."""

from __future__ import annotations

from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic

from domain.job import Job
from domain.rule import Rule
from domain.user import User

STREAMS: dict[str, type[Aggregate]] = {"User": User, "Job": Job, "Rule": Rule}


def topic_prefix(stream_type: str) -> str:
    """The stored topics of a stream type's events start with this (``domain.user:User.``)."""
    cls = STREAMS[stream_type]
    return f"{cls.__module__}:{cls.__qualname__}."


def stream_topics(stream_type: str) -> tuple[str, ...]:
    """Every stored event topic of one aggregate type (each read model folds one type's streams)."""
    cls = STREAMS[stream_type]
    return tuple(get_topic(v) for v in vars(cls).values() if isinstance(v, type) and issubclass(v, Aggregate.Event))
