"""The event envelope on Kafka: one codec shared by relay, projectors, dispatcher and tools.

``{id (notification id), stream_id, stream_type, version, type, timestamp, data}`` as JSON.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict


class EventEnvelope(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    stream_id: UUID
    stream_type: str
    version: int
    type: str
    timestamp: datetime
    data: dict[str, Any]


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
        return f"{data[:8]}-{data[8:12]}-{data[12:16]}-{data[16:20]}-{data[20:]}"
    return data


def _state(notification: Any, transcoder: Any) -> dict[str, Any]:
    if notification.state[:1] == b"{":  # plain JSON: the fast path (no compression, no cipher)
        plain: dict[str, Any] = json.loads(notification.state, object_hook=_plain_hook)
        return plain
    return {k: _plain(v) for k, v in transcoder.decode(notification.state).items()}


def from_notification(notification: Any, transcoder: Any) -> EventEnvelope:
    """Build the envelope of one stored notification."""
    state = _state(notification, transcoder)
    stream_type, event_type = split_topic(notification.topic)
    timestamp = datetime.fromisoformat(state.pop("timestamp"))
    state.pop("originator_topic", None)
    return EventEnvelope.model_construct(
        id=notification.id, stream_id=notification.originator_id, stream_type=stream_type,
        version=notification.originator_version, type=event_type, timestamp=timestamp, data=state,
    )


def encode_notification(notification: Any, transcoder: Any) -> bytes:
    """The envelope's JSON straight from a stored notification (the relay's and replay's path)."""
    state = _state(notification, transcoder)
    stream_type, event_type = split_topic(notification.topic)
    timestamp = state.pop("timestamp")
    state.pop("originator_topic", None)
    return json.dumps({
        "id": notification.id, "stream_id": str(notification.originator_id), "stream_type": stream_type,
        "version": notification.originator_version, "type": event_type, "timestamp": timestamp, "data": state,
    }, separators=(",", ":")).encode()


def encode(envelope: EventEnvelope) -> bytes:
    return json.dumps({
        "id": envelope.id, "stream_id": str(envelope.stream_id), "stream_type": envelope.stream_type,
        "version": envelope.version, "type": envelope.type,
        "timestamp": envelope.timestamp.isoformat(), "data": envelope.data,
    }, separators=(",", ":")).encode()


def decode(raw: bytes) -> EventEnvelope:
    return EventEnvelope.model_validate_json(raw)
