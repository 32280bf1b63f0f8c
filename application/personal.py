"""Sealing personal fields under per-user keys (crypto-shredding).

Each user has a random 256-bit data key; a personal field is stored as
``sealed:v1:<user id>:<base64url(nonce | AES-GCM ciphertext)>`` (``domain.contracts.personal``),
the user id and the field's name bound as associated data, so a sealed value cannot be moved to
another user or field. Sealing is deterministic per user and field (equal values, equal text).
Erasing a user destroys the key: every copy of every sealed field becomes noise, with no event
rewritten.

Keys live behind the :class:`Keyring` port (PostgreSQL in production: ``adapters.keyring``,
wrapped under a key derived from a server secret; :class:`MemoryKeyring` for tests and tools).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from domain.contracts.personal import ERASED, SEALED_PREFIX, sealed_owner
from domain.errors import UserNotFound

KEY_BYTES = 32
NONCE_BYTES = 12
CACHED_KEYS = 10_000  # data keys kept in memory (~100 bytes each)


class Keyring(Protocol):
    """Where users' data keys live."""

    def key_for(self, user_id: UUID) -> bytes:
        """The user's key, made on first use; KeyDestroyed once the user is erased."""
        ...

    async def key_for_async(self, user_id: UUID) -> bytes:
        """key_for from an event loop."""
        ...

    def key(self, user_id: UUID) -> bytes | None:
        """The user's key, or None (never made, or destroyed)."""
        ...

    def destroy(self, user_id: UUID) -> None:
        """Forget the user's key for good and remember that the user is erased."""
        ...

    def erased(self, user_ids: Iterable[UUID]) -> set[UUID]:
        """Which of ``user_ids`` were erased."""
        ...


class KeyDestroyed(UserNotFound):
    """The user was erased: nothing can be sealed for them any more. A UserNotFound, as every
    command on an erased user meets: a request that passed its token check just before the
    erasure is answered as a token no longer valid, not 500."""

    def __init__(self, user_id: str) -> None:
        super().__init__(user_id)


class MemoryKeyring:
    """A keyring for one process's life (tests, tools that seal nothing lasting)."""

    def __init__(self) -> None:
        self._keys: dict[UUID, bytes] = {}
        self._erased: set[UUID] = set()
        self._lock = threading.Lock()

    def key_for(self, user_id: UUID) -> bytes:
        with self._lock:
            if user_id in self._erased:
                raise KeyDestroyed(str(user_id))
            return self._keys.setdefault(user_id, AESGCM.generate_key(bit_length=KEY_BYTES * 8))

    async def key_for_async(self, user_id: UUID) -> bytes:
        return self.key_for(user_id)

    def key(self, user_id: UUID) -> bytes | None:
        return self._keys.get(user_id)

    def destroy(self, user_id: UUID) -> None:
        with self._lock:
            self._keys.pop(user_id, None)
            self._erased.add(user_id)

    def erased(self, user_ids: Iterable[UUID]) -> set[UUID]:
        return self._erased.intersection(user_ids)


def _aad(user_id: UUID, field: str) -> bytes:
    return f"{user_id}:{field}".encode()


class Sealer:
    """Seals and opens personal fields with the keyring's keys (kept in a bounded cache: a
    key never changes, it only disappears, and :meth:`forget` drops it here too)."""

    def __init__(self, keyring: Keyring, cached: int = CACHED_KEYS) -> None:
        self.keyring = keyring
        self.cached = cached
        self._keys: OrderedDict[UUID, bytes] = OrderedDict()
        # Users with a keyring lookup in flight: [lookups, drops meanwhile]. A lookup whose user's
        # key was dropped (evict, forget) while it ran caches nothing: it may hold the destroyed key.
        self._lookups: dict[UUID, list[int]] = {}
        self._lock = threading.Lock()

    def _key(self, user_id: UUID, create: bool) -> bytes | None:
        with self._lock:
            key = self._keys.get(user_id)
            if key is not None:
                self._keys.move_to_end(user_id)
                return key
            drops = self._begin(user_id)
        try:
            key = self.keyring.key_for(user_id) if create else self.keyring.key(user_id)
        finally:
            self._end(user_id, drops, key)
        return key

    def _begin(self, user_id: UUID) -> int:
        """A lookup of the user's key starts (under the lock); the drops of it so far."""
        lookups = self._lookups.setdefault(user_id, [0, 0])
        lookups[0] += 1
        return lookups[1]

    def _end(self, user_id: UUID, drops: int, key: bytes | None) -> None:
        """A lookup ended with ``key``: cached unless the user's key was dropped meanwhile."""
        with self._lock:
            lookups = self._lookups[user_id]
            lookups[0] -= 1
            if lookups[0] == 0:
                del self._lookups[user_id]
            if key is None or lookups[1] != drops:
                return
            self._keys[user_id] = key
            while len(self._keys) > self.cached:
                self._keys.popitem(last=False)

    def has_key(self, user_id: UUID) -> bool:
        """Whether the user's key is in memory (sealing for them needs no I/O)."""
        return user_id in self._keys

    def prepare(self, user_id: UUID) -> None:
        """Load (or make) the user's key, so that sealing for them needs no I/O (KeyDestroyed)."""
        self._key(user_id, create=True)

    async def prepare_async(self, user_id: UUID) -> None:
        """prepare from an event loop."""
        if user_id in self._keys:
            return
        with self._lock:
            drops = self._begin(user_id)
        key = None
        try:
            key = await self.keyring.key_for_async(user_id)
        finally:
            self._end(user_id, drops, key)

    def seal(self, user_id: UUID, field: str, value: str) -> str:
        key = self._key(user_id, create=True)
        assert key is not None
        # A synthetic nonce (HMAC of what is sealed): the same value seals to the same text, so a
        # domain comparison of sealed values (an unchanged rule name) still means equality, and a
        # nonce repeats only with the very same plaintext, which AES-GCM tolerates.
        aad = _aad(user_id, field)
        nonce_key = hmac.digest(key, b"palette synthetic nonce", "sha256")  # not the cipher's key itself
        nonce = hmac.digest(nonce_key, aad + b"\0" + value.encode(), "sha256")[:NONCE_BYTES]
        blob = nonce + AESGCM(key).encrypt(nonce, value.encode(), aad)
        return f"{SEALED_PREFIX}{user_id}:{base64.urlsafe_b64encode(blob).decode().rstrip('=')}"

    def open(self, field: str, value: str) -> str:
        """The clear text of a sealed ``value`` (:data:`ERASED` once its key is gone); a value
        that is not sealed (written before sealing) is returned as it is."""
        owner = sealed_owner(value)
        if owner is None:
            return value
        key = self._key(owner, create=False)
        if key is None:
            return ERASED
        encoded = value[len(SEALED_PREFIX) + len(str(owner)) + 1:]
        try:
            blob = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(owner, field)).decode()
        except (InvalidTag, binascii.Error, ValueError):
            raise ValueError(f"a sealed {field} that does not open with its user's key") from None

    def evict(self, user_id: UUID) -> None:
        """Drop the user's key from this cache only (another process destroyed it); a lookup
        running meanwhile, which may have read it before, does not cache it again."""
        with self._lock:
            self._keys.pop(user_id, None)
            if user_id in self._lookups:
                self._lookups[user_id][1] += 1

    def forget(self, user_id: UUID) -> None:
        """Destroy the user's key (here and in the keyring). Dropped here again once destroyed:
        a lookup that read it before the destroy and cached it since is undone."""
        self.evict(user_id)
        self.keyring.destroy(user_id)
        self.evict(user_id)
