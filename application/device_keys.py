"""Device keys: the only form of a device hash that leaves the registration command.

A device hash works like a password (presenting it yields the device's token), so what is stored
and derived from it is ``HMAC-SHA256(server secret, device hash)``: without the secret, a stored
key can neither be replayed to ``/auth/anon`` nor brute-forced back to a low-entropy hash.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Protocol

from domain.user import DEVICE_KEY_SCHEME

MIN_SECRET_BYTES = 16


class DeviceKeyer(Protocol):
    def key(self, device_hash: str) -> str:
        """The stored form of ``device_hash`` (``hmac-sha256:<hex>``)."""
        ...


class HmacDeviceKeyer:
    """Keys device hashes with a server secret; the secret never leaves this object."""

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode() if isinstance(secret, str) else secret
        if len(raw) < MIN_SECRET_BYTES:
            # An empty or short secret would make the key an unkeyed (brute-forceable) hash.
            raise ValueError(f"the device key secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = raw

    def key(self, device_hash: str) -> str:
        digest = hmac.new(self._secret, device_hash.encode(), hashlib.sha256).hexdigest()
        return DEVICE_KEY_SCHEME + digest

    def __repr__(self) -> str:
        return "HmacDeviceKeyer(secret=***)"
