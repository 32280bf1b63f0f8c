"""The event envelope on Kafka: one codec shared by relay, projectors, dispatcher and tools.

``{id (notification id), stream_id, stream_type, version, type, timestamp, data}`` as JSON,
plus ``trace`` (a W3C traceparent, ``domain.contracts.trace``) when the event was stored with one.
A stored event becomes an envelope in ``projections.stored_events``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from domain.contracts import trace as tracing

# The largest log position (an envelope's ``id``, the store's bigint notification_id). One past it
# reaches PostgreSQL as a numeric, which no index on notification_id serves: a replay from it read
# the whole log to find nothing, so the API and the CLI refuse it.
MAX_POSITION = 2**63 - 1
MAX_VERSION = 2**31 - 1  # the largest stream version (the store's integer originator_version)


class EnvelopeInvalid(ValueError):
    """Bytes that are not an envelope as the relay writes it."""


@dataclass(frozen=True, slots=True)
class EventEnvelope:
    id: int
    stream_id: UUID
    stream_type: str
    version: int
    type: str
    timestamp: datetime
    data: dict[str, Any]
    trace: str = ""  # the traceparent of the request that caused the event, if any


def encode(envelope: EventEnvelope) -> bytes:
    data = {
        "id": envelope.id, "stream_id": str(envelope.stream_id), "stream_type": envelope.stream_type,
        "version": envelope.version, "type": envelope.type,
        "timestamp": envelope.timestamp.isoformat(), "data": envelope.data,
    }
    if envelope.trace:
        data["trace"] = envelope.trace
    return json.dumps(data, separators=(",", ":")).encode()


def _field(data: dict[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if type(value) is not kind:  # bool is not an int here
        raise EnvelopeInvalid(f"{name} must be a {kind.__name__}")
    return value


def decode(raw: bytes) -> EventEnvelope:
    """An envelope from its JSON; anything else raises ``EnvelopeInvalid`` (a ``ValueError``)."""
    try:
        data = json.loads(raw)
    except (ValueError, TypeError, RecursionError) as e:  # RecursionError: nested past the decoder
        raise EnvelopeInvalid(f"not JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise EnvelopeInvalid("an envelope is a JSON object")
    try:
        stream_id = UUID(_field(data, "stream_id", str))
        timestamp = datetime.fromisoformat(_field(data, "timestamp", str))
    except ValueError as e:
        raise EnvelopeInvalid(str(e)) from None
    if timestamp.tzinfo is None:
        raise EnvelopeInvalid("timestamp must carry its offset")
    position, version = _field(data, "id", int), _field(data, "version", int)
    # As the event store keeps them (bigint, integer): past that no read model could track it, nor
    # park it, and one such message would stop its consumer at every restart.
    if not (0 < position <= MAX_POSITION and 0 < version <= MAX_VERSION):
        raise EnvelopeInvalid("id or version out of range")
    return EventEnvelope(id=position, stream_id=stream_id,
                         stream_type=_field(data, "stream_type", str), version=version,
                         type=_field(data, "type", str), timestamp=timestamp, data=_field(data, "data", dict),
                         trace=tracing.valid(data.get("trace")))
