"""The event envelope on Kafka: one codec shared by relay, projectors, dispatcher and tools.

``{id (notification id), stream_id, stream_type, version, type, timestamp, data}`` as JSON.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict

_BASE_FIELDS = {"originator_topic", "timestamp"}


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


def from_notification(notification: Any, transcoder: Any) -> EventEnvelope:
    """Build the envelope of one stored notification (no JSON round trip)."""
    state: dict[str, Any] = transcoder.decode(notification.state)
    stream_type, event_type = split_topic(notification.topic)
    timestamp = state.get("timestamp")
    data = {k: _plain(v) for k, v in state.items() if k not in _BASE_FIELDS}
    return EventEnvelope.model_construct(
        id=notification.id, stream_id=notification.originator_id, stream_type=stream_type,
        version=notification.originator_version, type=event_type, timestamp=timestamp, data=data,
    )


def encode(envelope: EventEnvelope) -> bytes:
    return json.dumps({
        "id": envelope.id, "stream_id": str(envelope.stream_id), "stream_type": envelope.stream_type,
        "version": envelope.version, "type": envelope.type,
        "timestamp": envelope.timestamp.isoformat(), "data": envelope.data,
    }, separators=(",", ":")).encode()


def decode(raw: bytes) -> EventEnvelope:
    return EventEnvelope.model_validate_json(raw)
