"""The keys a service built by a test seals under: kept in memory, dying with the process (the
service requires them, so that no entry point forgets the configured ones)."""

from __future__ import annotations

import secrets
from typing import TypedDict

from application.device_keys import DeviceKeyer, HmacDeviceKeyer
from application.personal import Keyring, MemoryKeyring


class ServiceKeys(TypedDict):
    device_keys: DeviceKeyer
    keyring: Keyring


def process_keys(*, device_keys: DeviceKeyer | None = None, keyring: Keyring | None = None) -> ServiceKeys:
    """PaletteService's keys for one test: a fresh device secret and an in-memory keyring unless given."""
    return {"device_keys": device_keys or HmacDeviceKeyer(secrets.token_bytes(32)),
            "keyring": keyring if keyring is not None else MemoryKeyring()}
