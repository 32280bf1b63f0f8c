"""Ports: what the application needs from the outside, as Protocols; adapters implement them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol
from uuid import UUID


class Clock(Protocol):
    def now(self) -> datetime:
        """An aware UTC datetime."""
        ...


class IdGenerator(Protocol):
    def new_id(self) -> UUID: ...


class ObjectStore(Protocol):
    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys among ``keys`` that do not exist in the store."""
        ...
