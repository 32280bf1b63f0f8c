"""Stored events as envelopes: eventsourcing's stored state (typed JSON, or the transcoder's
bytes) read as plain JSON, at its event class's current version (``upcast_state``). A stored
state that cannot be decoded becomes ``{"_unreadable": why}`` at the epoch, which every fold
refuses, so the projector parks it rather than the relay or a sweep stopping on it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import cache
from typing import Any
from uuid import UUID

import orjson

from domain.contracts import trace as tracing
from domain.contracts.envelope import EventEnvelope
from domain.contracts.streams import event_classes


def _plain(value: Any) -> Any:
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    return value


@cache  # a handful of topics, split once each
def split_topic(topic: str) -> tuple[str, str]:
    """``domain.job:Job.ItemCompleted`` -> (``Job``, ``ItemCompleted``)."""
    qualname = topic.rsplit(":", 1)[-1]
    stream_type, _, event_type = qualname.rpartition(".")
    return stream_type or qualname, event_type


def _plain_hook(obj: dict[str, Any]) -> Any:
    """eventsourcing's typed JSON values ({"_type_", "_data_"}) as plain JSON: UUIDs as dashed
    strings, datetimes as their ISO text. The same values ``_plain`` gives, without objects."""
    kind = obj.get("_type_")
    if kind is None or "_data_" not in obj:
        return obj
    data = obj["_data_"]
    if kind == "uuid_hex":
        return _uuid_text(data)
    return data


def _uuid_text(data: str) -> str:
    """A UUID's 32 hex digits in its dashed form."""
    return f"{data[:8]}-{data[8:12]}-{data[12:16]}-{data[16:20]}-{data[20:]}"


class _FloatSeen(Exception):
    """orjson read a float, which may have been an integer past 64 bits in the JSON."""


def _plain_tree(value: Any) -> Any:
    """``value`` (parsed by orjson) with ``_plain_hook`` applied to every object, innermost first,
    as ``json.loads(..., object_hook=_plain_hook)`` gives it; containers are changed in place.
    A typed value of two text fields (a UUID, a time: most of what an event holds) is made plain
    where it is met, without a call of its own: nothing inside it could change."""
    if type(value) is dict:
        for key, item in value.items():
            if type(item) is dict:
                kind, data = item.get("_type_"), item.get("_data_")
                if type(kind) is str and type(data) is str and len(item) == 2:
                    value[key] = _uuid_text(data) if kind == "uuid_hex" else data
                else:
                    value[key] = _plain_tree(item)
            elif type(item) is list:
                value[key] = _plain_tree(item)
            elif type(item) is float:
                raise _FloatSeen
        return _plain_hook(value)
    if type(value) is list:
        for i, item in enumerate(value):
            if type(item) is dict or type(item) is list:
                value[i] = _plain_tree(item)
            elif type(item) is float:
                raise _FloatSeen
    return value


def _plain_json(raw: bytes) -> tuple[Any, bool]:
    """Stored JSON as plain values, and whether orjson read them. orjson parses a catch-up's worth
    several times faster than ``json`` with a hook; what it refuses (NaN, lone surrogates) or may
    read otherwise (a float: orjson reads an integer past 64 bits as one) goes through ``json``,
    so every input reads as it always did. What orjson read holds no float, no integer past 64
    bits and no lone surrogate, so orjson also writes it as ``json`` would (``_message``)."""
    try:
        return _plain_tree(orjson.loads(raw)), True
    except (orjson.JSONDecodeError, _FloatSeen):
        return json.loads(raw, object_hook=_plain_hook), False


@cache
def versioned_events() -> dict[str, type[Any]]:
    """Stored topic -> event class, for the classes past their first version."""
    return {topic: cls for topic, _, cls in event_classes() if getattr(cls, "class_version", 1) > 1}


def upcast_state(topic: str, state: dict[str, Any]) -> dict[str, Any]:
    """A stored event's plain state at its class's current version, through the class's
    ``upcast_vN_vM`` methods, as the mapper upcasts what aggregates fold: every envelope leaves
    at the current version (a v1 ``User.Registered`` held the raw device hash, a credential)."""
    cls = versioned_events().get(topic)
    if cls is None:
        return state
    current: int = cls.class_version
    stored = int(state.pop("class_version", 1))
    for version in range(stored, current):
        getattr(cls, f"upcast_v{version}_v{version + 1}")(state)
    state["class_version"] = max(stored, current)  # as the mapper stores an event of this version
    return state


def _state(topic: str, raw: bytes, transcoder: Any) -> tuple[dict[str, Any], bool]:
    """The plain state, and whether orjson read it (``_plain_json``)."""
    if raw[:1] == b"{":  # plain JSON: the fast path (no compression, no cipher)
        plain, by_orjson = _plain_json(raw)
    else:
        plain, by_orjson = {k: _plain(v) for k, v in transcoder.decode(raw).items()}, False
    return upcast_state(topic, plain), by_orjson


UNREADABLE = "_unreadable"  # the data of an envelope whose stored state could not be decoded
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _readable_state(topic: str, raw: bytes, transcoder: Any) -> tuple[dict[str, Any], datetime, str, bool]:
    """The state, timestamp and trace of a stored event, and whether orjson read the state; a
    state that cannot be decoded (written past the application) becomes ``{UNREADABLE: why}`` at
    the epoch, which every fold refuses, so the projector parks it rather than the relay or the
    sweep stopping on it."""
    try:
        state, by_orjson = _state(topic, raw, transcoder)
        timestamp = state.pop("timestamp")
        moment = timestamp if isinstance(timestamp, datetime) else datetime.fromisoformat(timestamp)
        if moment.tzinfo is None:  # eventsourcing stamps every event with its offset; no envelope goes without
            raise ValueError("the timestamp carries no UTC offset")
        return state, moment, tracing.valid(state.pop(tracing.TRACE_KEY, "")), by_orjson
    except Exception as exc:  # noqa: BLE001 - any stored bytes at all
        why = f"{type(exc).__name__}: {exc}"[:500].encode("ascii", "backslashreplace").decode()
        return {UNREADABLE: why}, EPOCH, "", False


def from_notification(notification: Any, transcoder: Any) -> EventEnvelope:
    """Build the envelope of one stored notification."""
    return from_stored(notification.id, notification.originator_id, notification.originator_version,
                       notification.topic, notification.state, transcoder)


def from_stored(position: int, stream_id: UUID, version: int, topic: str, state: bytes,
                transcoder: Any) -> EventEnvelope:
    """Build the envelope of one stored event from its columns (a page read without a
    ``Notification`` per row)."""
    data, timestamp, trace, _ = _readable_state(topic, state, transcoder)
    stream_type, event_type = split_topic(topic)
    data.pop("originator_topic", None)
    return EventEnvelope(id=position, stream_id=stream_id, stream_type=stream_type, version=version,
                         type=event_type, timestamp=timestamp, data=data, trace=trace)


def stored_message(position: int, stream_id: str, version: int, topic: str, state: bytes,
                   transcoder: Any) -> tuple[bytes, str]:
    """The envelope's JSON and its trace from a stored event's columns, its stream id as text
    (the relay's and `palette replay all`'s path: a page read as plain rows, no ``Notification`` or
    ``UUID`` per event)."""
    data, moment, trace, by_orjson = _readable_state(topic, state, transcoder)
    stream_type, event_type = split_topic(topic)
    data.pop("originator_topic", None)
    envelope = {
        "id": position, "stream_id": stream_id, "stream_type": stream_type, "version": version,
        "type": event_type, "timestamp": moment.isoformat(), "data": data,
    }
    if trace:
        envelope["trace"] = trace
    return _message(envelope, by_orjson), trace


def _message(envelope: dict[str, Any], by_orjson: bool) -> bytes:
    """The envelope's JSON: orjson's (1 µs for a typical envelope, 19 with ``json``) where orjson
    read the state, so writes it as ``json`` would up to spacing and escapes; else ``json``'s
    (orjson writes NaN and infinities as null, and refuses big integers and lone surrogates)."""
    if by_orjson:
        try:
            return orjson.dumps(envelope)
        except orjson.JSONEncodeError:  # nested past orjson's 255 levels, which it reads up to 1,024
            pass
    return json.dumps(envelope, separators=(",", ":")).encode()
