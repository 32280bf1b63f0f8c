"""All DDL of the read side, in one place: schema ``palette_read``, each model's keyed, tracking
and append tables (their definitions live beside each model's fold, in ``projections.models``),
the positions and dead letters, and the migrations of older schemas. Idempotent and safe under
concurrent starters."""

from __future__ import annotations

import zlib
from typing import Any

import psycopg
from psycopg import sql

from domain.contracts.personal import ERASED, SEALED_PREFIX
from domain.user import DEVICE_KEY_SCHEME
from projections.models import READ_MODELS
from projections.models.base import ReadModel

SCHEMA = "palette_read"


def ident(*parts: str) -> sql.Composable:
    return sql.Identifier(*parts)


def table(name: str) -> sql.Composable:
    return sql.Identifier(SCHEMA, name)


# Held by a rebuild for its whole run (exclusive, one rebuild at a time) and by a `dlq skip`
# (shared, ``projections.store.resolve_dead_letter``): a rebuild reads the skips once, so none
# may come while it runs.
REBUILD_LOCK = zlib.crc32(b"palette-read:rebuild")


def lock_id(model: ReadModel) -> int:
    """Advisory lock key shared by the live projector (shared) and a rebuild (exclusive)."""
    return zlib.crc32(f"palette-read:{model.name}".encode())


def new_streams_lock_id(model: ReadModel, suffix: str = "") -> int:
    """Advisory lock key a batch holds while a stream of it has no tracking row in ``suffix``'s
    tables yet (``projections.store.apply_batch``)."""
    return zlib.crc32(f"palette-read-new:{model.name}{suffix}".encode())


def tracking_table(model: ReadModel, suffix: str = "") -> str:
    return f"{model.name}_tracking{suffix}"


def create_model_tables(conn: psycopg.Connection[Any], model: ReadModel, suffix: str = "") -> None:
    """Create a model's keyed, tracking and append tables where missing, and the indexes it
    declares where a table lacks them (a table made by an older version gets those added since).
    Indexes are unnamed, so PostgreSQL picks unique names and rebuild swaps never collide."""
    cols = sql.SQL(", ").join(
        sql.SQL("{} {}").format(ident(c.name), sql.SQL(c.sql_type)) for c in model.columns
    )
    pk = sql.SQL(", ").join(ident(k) for k in model.key)
    keyed = model.keyed_table + suffix
    if not _exists(conn, keyed):
        conn.execute(sql.SQL("CREATE TABLE {} ({}, PRIMARY KEY ({}))").format(table(keyed), cols, pk))
    _ensure_indexes(conn, keyed, model.indexes)
    conn.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (stream_id uuid PRIMARY KEY, version integer NOT NULL)"
    ).format(table(tracking_table(model, suffix))))
    if model.append:
        append = model.append.name + suffix
        if not _exists(conn, append):
            conn.execute(sql.SQL("CREATE TABLE {} ({})").format(table(append), sql.SQL(model.append.ddl)))
        _ensure_indexes(conn, append, model.append.indexes)


def _ensure_indexes(conn: psycopg.Connection[Any], name: str, indexes: tuple[str, ...]) -> None:
    """Each of ``indexes`` (``"a, b DESC"``, or partial: ``"a, b WHERE NOT c"``) made on table
    ``name`` unless one on the same columns with the same predicate is there. Plain column names
    only, and a predicate written as PostgreSQL prints it back (``pg_get_expr``, less its outer
    parentheses): one it prints otherwise would be made again at every start. On a table that
    lacks it, the index is built in the start's schema transaction: writes to that table wait
    for the build, once."""
    for index in indexes:
        columns, _, where = index.partition(" WHERE ")
        names = [c.split()[0] for c in columns.split(",")]
        # PostgreSQL prints a predicate in parentheses, as it does any boolean expression.
        found = conn.execute(
            "SELECT 1 FROM pg_index i WHERE i.indrelid = to_regclass(%s) "
            "AND pg_get_expr(i.indpred, i.indrelid) IS NOT DISTINCT FROM %s "
            "AND ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, o) "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o) = %s::text[]",
            [f"{SCHEMA}.{name}", f"({where})" if where else None, names]).fetchone()
        if found is None:
            create = sql.SQL("CREATE INDEX ON {} ({})").format(table(name), sql.SQL(columns))
            conn.execute(sql.SQL("{} WHERE {}").format(create, sql.SQL(where)) if where else create)


def _exists(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s)", [f"{SCHEMA}.{name}"]).fetchone()
    return row is not None and row[0] is not None


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the read-model schema once (idempotent, safe under concurrent starters)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (zlib.crc32(b"palette-read-ddl"),))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident(SCHEMA)))
        for model in READ_MODELS.values():
            create_model_tables(conn, model)
        conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (model text PRIMARY KEY, position bigint NOT NULL, "
            "updated_at timestamptz NOT NULL DEFAULT now())").format(table("positions")))
        conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY, model text NOT NULL, "
            "stream_id uuid NOT NULL, version integer NOT NULL, position bigint NOT NULL, "
            "envelope bytea NOT NULL, error text NOT NULL, status text NOT NULL, "
            "parked_at timestamptz NOT NULL DEFAULT now(), UNIQUE (model, stream_id, version))"
        ).format(table("dead_letters")))
        # Dead letters hold the envelope's bytes: jsonb refuses some payloads (\u0000) and a
        # parking place must take anything. Older schemas stored jsonb.
        conn.execute(sql.SQL(
            "DO $$ BEGIN IF (SELECT data_type FROM information_schema.columns WHERE table_schema = {} "
            "AND table_name = 'dead_letters' AND column_name = 'envelope') = 'jsonb' THEN "
            "ALTER TABLE {} ALTER COLUMN envelope TYPE bytea USING convert_to(envelope::text, 'UTF8'); "
            "END IF; END $$").format(sql.Literal(SCHEMA), table("dead_letters")))
        drop_raw_device_hashes(conn)


# -- migrations ------------------------------------------------------------------------------
# users.device_hash held raw device hashes (credentials) before device keys: run after the
# tables exist, each time the schema is ensured; a no-op (one scan of ``users``) once the rows
# are clean. Rows from v1 events get NULL: the raw hash cannot be keyed here (the secret stays
# with the API), and no read needs it.
# The live table and the ones a rebuild leaves between its steps (projections.rebuild).
USERS_TABLES = ("users", "users__shadow", "users__old")


def drop_raw_device_hashes(conn: psycopg.Connection[Any], schema: str = SCHEMA) -> int:
    """Set to NULL every ``device_hash`` that is neither a device key, sealed or not, nor erased;
    returns the rows changed."""
    changed = 0
    for name in USERS_TABLES:
        found = conn.execute("SELECT to_regclass(%s)", [f"{schema}.{name}"]).fetchone()
        if found is None or found[0] is None:
            continue
        cur = conn.execute(sql.SQL(
            "UPDATE {} SET device_hash = NULL WHERE device_hash IS NOT NULL AND NOT starts_with(device_hash, %s) "
            "AND NOT starts_with(device_hash, %s) AND device_hash <> %s"
        ).format(sql.Identifier(schema, name)), [DEVICE_KEY_SCHEME, SEALED_PREFIX, ERASED])
        changed += max(cur.rowcount, 0)
    return changed
