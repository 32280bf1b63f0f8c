"""Users' data keys in PostgreSQL (the write side's database), and the erasure tombstones.

A data key is stored wrapped (AES-GCM) under a key-encryption key derived (HKDF-SHA256) from the
server's device-key secret, so a copy of the database alone opens nothing. Destroying a key
deletes its row; ``vacuum`` then removes the dead row from the table's pages (until the next
vacuum, the wrapped key survives on disk — and in backups of that age, which is why backups
must age out too).

``palette_erasures`` lists erased users (ids only, no personal data): registration skips them,
tokens of those erased within a token's lifetime are refused, and an erasure cut short (its
``completed_at`` still empty) is finished by the sweeper."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from uuid import UUID

import anyio
import psycopg
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from adapters.ddl import run_locked
from adapters.loop_pg import LoopConnections, Together
from application.personal import KEY_BYTES, NONCE_BYTES, KeyDestroyed

DDL = (
    "CREATE TABLE IF NOT EXISTS palette_user_keys (user_id uuid PRIMARY KEY, wrapped bytea NOT NULL, "
    "created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS palette_erasures (user_id uuid PRIMARY KEY, "
    "requested_at timestamptz NOT NULL DEFAULT now(), completed_at timestamptz)",
    "CREATE INDEX IF NOT EXISTS palette_erasures_recent ON palette_erasures (requested_at)",
    "CREATE INDEX IF NOT EXISTS palette_erasures_pending ON palette_erasures (requested_at) "
    "WHERE completed_at IS NULL",
)


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """``DDL``, once: every API process runs it as it starts (``adapters.ddl``)."""
    run_locked(conn, "palette-keyring-ddl", DDL)


def key_encryption_key(secret: str) -> bytes:
    """The key that wraps data keys, derived from the server's device-key secret."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=b"palette keyring v1").derive(secret.encode())


# One round trip (two when another process makes the key at the same moment): the stored key, or
# a new one stored, never for an erased user.
KEY_FOR = ("WITH made AS (INSERT INTO palette_user_keys (user_id, wrapped) SELECT %(u)s, %(w)s "
           "WHERE NOT EXISTS (SELECT 1 FROM palette_erasures WHERE user_id = %(u)s) "
           "ON CONFLICT (user_id) DO NOTHING RETURNING wrapped) "
           "SELECT wrapped FROM made UNION ALL SELECT wrapped FROM palette_user_keys WHERE user_id = %(u)s")
KEY = "SELECT wrapped FROM palette_user_keys WHERE user_id = %s"
# A key made while an erasure deleted the stored one, undone. The statement waited for the
# erasure's transaction (it holds the row), then, the row gone, inserted anew: its snapshot saw
# neither the tombstone nor the delete. It answers that user twice (the new key, and the deleted
# one its snapshot still sees); the next statement sees the tombstone.
UNMAKE = ("DELETE FROM palette_user_keys k USING palette_erasures e "
          "WHERE e.user_id = k.user_id AND k.user_id = ANY(%s)")
# KEY_FOR for many users in one round trip (``PgKeyring.key_for_async``): each user's stored key or
# a new one stored, in user id order, so that two processes making overlapping keys at once take
# their rows' locks in one order (none waits for the other in a cycle).
KEYS_FOR = ("WITH asked (u, w) AS (SELECT * FROM unnest(%(u)s::uuid[], %(w)s::bytea[])), "
            "made AS (INSERT INTO palette_user_keys (user_id, wrapped) SELECT u, w FROM asked "
            "WHERE NOT EXISTS (SELECT 1 FROM palette_erasures e WHERE e.user_id = asked.u) ORDER BY u "
            "ON CONFLICT (user_id) DO NOTHING RETURNING user_id, wrapped) "
            "SELECT user_id, wrapped FROM made UNION ALL "
            "SELECT user_id, wrapped FROM palette_user_keys WHERE user_id = ANY(%(u)s)")
KEYS = "SELECT user_id, wrapped FROM palette_user_keys WHERE user_id = ANY(%s)"
KEYS_AT_ONCE = 500  # the most users one statement makes keys for


class PgKeyring:
    """The :class:`application.personal.Keyring` port on PostgreSQL (``pool``: autocommit; an
    event loop's keys are made on ``connections``, else in a worker thread)."""

    def __init__(self, pool: Any, secret: str, connections: LoopConnections | None = None) -> None:
        self.pool = pool
        self.connections = connections
        self._kek = AESGCM(key_encryption_key(secret))
        self._made_together = Together(self._keys_for, most=KEYS_AT_ONCE)

    def _wrap(self, user_id: UUID, key: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._kek.encrypt(nonce, key, user_id.bytes)

    def _unwrap(self, user_id: UUID, wrapped: bytes) -> bytes:
        return self._kek.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], user_id.bytes)

    def key_for(self, user_id: UUID) -> bytes:
        candidate = self._candidate(user_id)
        with self.pool.connection() as conn:
            rows = conn.execute(KEY_FOR, {"u": user_id, "w": candidate}).fetchall()
            if len(rows) > 1:  # made anew while an erasure deleted it
                conn.execute(UNMAKE, [[user_id]])
            # None: made by another process after this statement's snapshot: the next one sees it
            row = rows[0] if len(rows) == 1 else conn.execute(KEY, [user_id]).fetchone()
        return self._opened(user_id, row)

    async def key_for_async(self, user_id: UUID) -> bytes:
        """key_for on the loop: the keys asked for while a statement runs are made together by the
        next one (``Together``; the oldest asks first)."""
        if self.connections is None:
            return await anyio.to_thread.run_sync(self.key_for, user_id)
        return await self._made_together(user_id)

    async def _keys_for(self, asked: list[UUID]) -> list[bytes | Exception]:
        """The keys of ``asked``, made where missing, in one statement (users in id order, KEYS_FOR);
        KeyDestroyed for an erased user, and a key that does not open (InvalidTag: wrapped under
        another secret, a damaged row) fails its own user only."""
        assert self.connections is not None
        user_ids = sorted(set(asked))
        made = {"u": user_ids, "w": [self._candidate(u) for u in user_ids]}
        for attempt in (1, 2):
            held = None
            try:
                async with self.connections.connection() as conn:
                    held = conn
                    rows = await (await conn.execute(KEYS_FOR, made)).fetchall()
                    twice = [u for u, n in Counter(u for u, _ in rows).items() if n > 1]
                    if twice:  # made anew while an erasure deleted them
                        await conn.execute(UNMAKE, [twice])
                    if twice or len(rows) < len(user_ids):  # made by another process after the snapshot, or erased
                        rows = await (await conn.execute(KEYS, [user_ids])).fetchall()
                break
            except psycopg.OperationalError:
                # A connection that died with a database restart (the loop's idle ones go with it:
                # adapters.loop_pg); the statements are idempotent, so once more on a fresh one.
                # None got (every one busy: PoolTimeout; or the connect failed: the database is
                # down), or one that is not broken (a statement's own error): a second try would
                # only wait as long again.
                if attempt == 2 or held is None or not held.broken:
                    raise
        keys: dict[UUID, bytes | Exception] = {u: KeyDestroyed(str(u)) for u in user_ids}
        for user_id, wrapped in rows:
            try:
                keys[user_id] = self._unwrap(user_id, bytes(wrapped))
            except Exception as e:  # noqa: BLE001 - this user's callers get it
                keys[user_id] = e
        return [keys[u] for u in asked]

    def _candidate(self, user_id: UUID) -> bytes:
        return self._wrap(user_id, AESGCM.generate_key(bit_length=KEY_BYTES * 8))

    def _opened(self, user_id: UUID, row: Any) -> bytes:
        if row is None:
            raise KeyDestroyed(str(user_id))
        return self._unwrap(user_id, bytes(row[0]))

    def key(self, user_id: UUID) -> bytes | None:
        with self.pool.connection() as conn:
            row = conn.execute(KEY, [user_id]).fetchone()
        return None if row is None else self._unwrap(user_id, bytes(row[0]))

    def destroy(self, user_id: UUID) -> None:
        with self.pool.connection() as conn, conn.transaction():
            request_erasure(conn, user_id)
            conn.execute("DELETE FROM palette_user_keys WHERE user_id = %s", [user_id])

    def erased(self, user_ids: Iterable[UUID]) -> set[UUID]:
        ids = list(user_ids)
        with self.pool.connection() as conn:
            rows = conn.execute("SELECT user_id FROM palette_erasures WHERE user_id = ANY(%s)", [ids]).fetchall()
        return {r[0] for r in rows}


def request_erasure(conn: psycopg.Connection[Any], user_id: UUID) -> None:
    """The tombstone, first thing: from here on the user's tokens fail and the device registers anew."""
    conn.execute("INSERT INTO palette_erasures (user_id) VALUES (%s) ON CONFLICT (user_id) DO NOTHING", [user_id])


def complete_erasure(conn: psycopg.Connection[Any], user_id: UUID) -> None:
    conn.execute("UPDATE palette_erasures SET completed_at = now() WHERE user_id = %s AND completed_at IS NULL",
                 [user_id])


def erased_since(conn: psycopg.Connection[Any], within_s: float, after: datetime | None = None,
                 late_s: float = 0.0) -> list[tuple[UUID, datetime]]:
    """Users erased no longer ago than ``within_s`` (a token's lifetime: an older erasure's
    tokens have all expired), and after ``after`` if given, with when; and those of the last
    ``late_s`` whatever ``after`` says: a clock stepped back stamps new tombstones before it."""
    rows = conn.execute("SELECT user_id, requested_at FROM palette_erasures "
                        "WHERE requested_at > now() - %s * interval '1 second' "
                        "AND (%s::timestamptz IS NULL OR requested_at > least(%s, now() - %s * interval '1 second'))",
                        [within_s, after, after, late_s]).fetchall()
    return [(r[0], r[1]) for r in rows]


def vacuum_keys(conn: psycopg.Connection[Any]) -> None:
    """Remove destroyed keys' dead rows from the table's pages (``conn`` in autocommit)."""
    conn.execute("VACUUM palette_user_keys")


def all_erased(conn: psycopg.Connection[Any]) -> frozenset[UUID]:
    """Every erased user (for replays and exports, which show their sealed fields as erased)."""
    if conn.execute("SELECT to_regclass('palette_erasures')").fetchone() == (None,):
        return frozenset()
    return frozenset(r[0] for r in conn.execute("SELECT user_id FROM palette_erasures").fetchall())
