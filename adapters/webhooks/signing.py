"""Standard Webhooks signatures: ``whsec_`` secrets, message ids and the three headers.

The signature is ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed with the
secret's base64-decoded bytes; several secrets (a rotation's old and new) sign one message with
space-separated signatures, any of which a receiver accepts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from uuid import UUID

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix of every secret, not a secret
SECRET_BYTES = 24


def new_secret() -> str:
    """A fresh signing secret, ``whsec_`` and the base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def message_id(stream_id: UUID, version: int) -> str:
    """The ``webhook-id`` of an event: its stream and version, the same on every attempt."""
    return f"msg_{stream_id.hex}_{version}"


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.digest(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(keys: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one attempt, signed with every secret in ``keys``."""
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(k, msg_id, timestamp, body) for k in keys),
    }
