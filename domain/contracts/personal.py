"""Personal fields in events are sealed: stored as ``sealed:v1:<user id>:<base64url>``, AES-GCM
under a key of that user's own (crypto-shredding). Erasing a user destroys the key, and every
copy of the field — the event store's, Kafka's, a backup's — becomes unreadable at once, while
the events themselves (and the billing chain over them) stay as they were.

This module is only the format, so that a reader without keys (a projection, a replay, an
export) can tell a sealed value and whose key it needs; sealing is the application's
(``application.personal``)."""

from __future__ import annotations

from collections.abc import Container
from typing import Any
from uuid import UUID

SEALED_PREFIX = "sealed:v1:"
ERASED = "erased"  # what a sealed field reads as once its user's key is destroyed


def sealed_owner(value: object) -> UUID | None:
    """The user whose key opens ``value``, or None when it is not a sealed value."""
    if not isinstance(value, str) or not value.startswith(SEALED_PREFIX):
        return None
    owner, sep, _ = value[len(SEALED_PREFIX):].partition(":")
    if not sep:
        return None
    try:
        return UUID(owner)
    except ValueError:
        return None


def redact(data: Any, erased: Container[UUID]) -> Any:
    """``data`` with every sealed value of an erased user replaced by :data:`ERASED` (a copy
    where something changed; the same object otherwise)."""
    if isinstance(data, str):
        owner = sealed_owner(data)
        return ERASED if owner is not None and owner in erased else data
    if isinstance(data, dict):
        changed = {k: redact(v, erased) for k, v in data.items()}
        return changed if any(changed[k] is not data[k] for k in data) else data
    if isinstance(data, list):
        items = [redact(v, erased) for v in data]
        return items if any(a is not b for a, b in zip(items, data, strict=True)) else data
    return data
