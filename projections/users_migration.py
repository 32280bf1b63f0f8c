"""Read-model migration: the users table held raw device hashes (credentials) before device keys.

Run after the read-model tables exist, each time the schema is ensured: it is idempotent, and a
no-op (one scan of ``users``) once the rows are clean. Rows from v1 events get NULL; the raw
hash cannot be keyed here (the secret stays with the API), and no read needs it.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from domain.user import DEVICE_KEY_SCHEME

# The live table and the ones a rebuild leaves between its steps (projections.rebuild).
USERS_TABLES = ("users", "users__shadow", "users__old")


def drop_raw_device_hashes(conn: psycopg.Connection[Any], schema: str = "palette_read") -> int:
    """Set to NULL every ``device_hash`` that is not a device key; returns the rows changed."""
    changed = 0
    for name in USERS_TABLES:
        found = conn.execute("SELECT to_regclass(%s)", [f"{schema}.{name}"]).fetchone()
        if found is None or found[0] is None:
            continue
        cur = conn.execute(sql.SQL(
            "UPDATE {} SET device_hash = NULL WHERE device_hash IS NOT NULL AND NOT starts_with(device_hash, %s)"
        ).format(sql.Identifier(schema, name)), [DEVICE_KEY_SCHEME])
        changed += max(cur.rowcount, 0)
    return changed
