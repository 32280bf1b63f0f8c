"""Users' data keys as PostgreSQL holds them (adapters.keyring.PgKeyring): each wrapped under the
key derived from the device-key secret and bound to its user, and gone once the user is erased.
The wrapping is checked by hand (HKDF and AES-GCM from ``cryptography``), not by the keyring."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from psycopg_pool import ConnectionPool

from adapters import keyring as keyring_module
from adapters.keyring import PgKeyring
from adapters.settings import Settings
from application.personal import KeyDestroyed


@pytest.fixture
def pool(settings: Settings) -> Iterator[ConnectionPool[Any]]:
    with ConnectionPool(settings.effective_database_url, min_size=1, max_size=2,
                        kwargs={"autocommit": True}) as p:
        with p.connection() as conn:
            keyring_module.ensure_schema(conn)
        yield p


def _wrapped(pool: ConnectionPool[Any], user: uuid.UUID) -> bytes | None:
    with pool.connection() as conn:
        row = conn.execute("SELECT wrapped FROM palette_user_keys WHERE user_id = %s", [user]).fetchone()
    return None if row is None else bytes(row[0])


def test_a_stored_key_is_wrapped_under_the_secrets_derived_key_bound_to_its_user_with_a_nonce_of_its_own(
    settings: Settings, pool: ConnectionPool[Any],
) -> None:
    keyring = PgKeyring(pool, settings.device_key_secret)
    alice, bob = uuid.uuid4(), uuid.uuid4()
    keys = {u: keyring.key_for(u) for u in (alice, bob)}
    kek = AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                      info=b"palette keyring v1").derive(settings.device_key_secret.encode()))
    wrapped = {u: _wrapped(pool, u) for u in (alice, bob)}
    for user, row in wrapped.items():
        assert row is not None
        assert kek.decrypt(row[:12], row[12:], user.bytes) == keys[user]
    alices, bobs = wrapped[alice], wrapped[bob]
    assert alices is not None and bobs is not None
    assert alices[:12] != bobs[:12]  # one key-encryption key never wraps twice under one nonce
    with pytest.raises(InvalidTag):  # Alice's row moved to Bob's id opens nothing
        kek.decrypt(alices[:12], alices[12:], bob.bytes)


def test_an_erased_users_key_is_deleted_and_never_made_again(settings: Settings, pool: ConnectionPool[Any]) -> None:
    keyring = PgKeyring(pool, settings.device_key_secret)
    user = uuid.uuid4()
    keyring.key_for(user)
    keyring.destroy(user)
    assert _wrapped(pool, user) is None and keyring.key(user) is None
    with pytest.raises(KeyDestroyed):
        keyring.key_for(user)
    assert _wrapped(pool, user) is None
    assert keyring.erased([user, uuid.uuid4()]) == {user}


def test_an_erasure_completed_again_keeps_its_first_completion(settings: Settings, pool: ConnectionPool[Any]) -> None:
    """``completed_at`` is set once: the retention sweep walks erasures in its order."""
    user = uuid.uuid4()
    PgKeyring(pool, settings.device_key_secret).destroy(user)
    with pool.connection() as conn:
        keyring_module.complete_erasure(conn, user)
        first = conn.execute("SELECT completed_at FROM palette_erasures WHERE user_id = %s", [user]).fetchone()
        with conn.transaction():  # now() is the transaction's start: a later one stamps later
            keyring_module.complete_erasure(conn, user)
        again = conn.execute("SELECT completed_at FROM palette_erasures WHERE user_id = %s", [user]).fetchone()
    assert first is not None and first[0] is not None and again == first
