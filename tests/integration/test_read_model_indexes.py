"""The read models' indexes: a list a client reads costs what it returns, however many rows the
client has made and deleted, and a model's table made by an older version gets the indexes added
since, once."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from projections.queries import list_rules
from projections.schema import ensure_schema


def _tuples_read(conn: psycopg.Connection[object], relname: str) -> int:
    row = conn.execute("SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables "
                       "WHERE schemaname = 'palette_read' AND relname = %s", [relname]).fetchone()
    assert row is not None
    return int(row[0])


def _insert_rules(conn: psycopg.Connection[object], user: uuid.UUID, count: int, deleted: bool) -> None:
    conn.execute("INSERT INTO palette_read.rules (id, user_id, name, preset_id, concepts_json, protect_json, "
                 "deleted, created_at, updated_at) SELECT gen_random_uuid(), %s, 'r' || n, 'modern', '{}', '[]', "
                 "%s, now() + n * interval '1 ms', now() FROM generate_series(1, %s) AS n", [user, deleted, count])


@pytest.fixture
def crowded(fresh_db: str) -> tuple[str, uuid.UUID]:
    """A read side holding, for one user, 2 live rules beside 5,000 deleted ones, and 3,000 of
    another user's, each with its tracking row (one per rule ever made, deleted or not)."""
    user = uuid.uuid4()
    with psycopg.connect(fresh_db, autocommit=True) as c:
        ensure_schema(c)
        _insert_rules(c, user, 5000, deleted=True)
        _insert_rules(c, user, 2, deleted=False)
        _insert_rules(c, uuid.uuid4(), 3000, deleted=False)
        c.execute("INSERT INTO palette_read.rules_tracking SELECT id, 1 FROM palette_read.rules")
        c.execute("ANALYZE palette_read.rules; ANALYZE palette_read.rules_tracking")
    return fresh_db, user


@pytest.mark.parametrize("table", ["rules", "rules_tracking"])
def test_listing_a_users_rules_reads_only_their_live_ones_however_many_they_deleted(crowded, table):
    # Rule writes have a daily budget, not a lifetime one: a client creating and deleting rules
    # within it leaves a flagged row each time, and GET /rules read every one of them; and the
    # tracking rows of them all swelled the planner's estimate, which then hashed the whole
    # tracking table for the listed rules' versions.
    url, user = crowded
    # A session of its own: a session's counts not yet reported (once a second) read as its transaction's.
    with psycopg.connect(url) as alone:
        listed = list_rules(alone, user)
        read = _tuples_read(alone, table)
    assert [(r["name"], r["version"]) for r in listed] == [("r1", 1), ("r2", 1)]
    assert read <= 2


def _indexes(conn: psycopg.Connection[object], relname: str) -> list[str]:
    return [r[0] for r in conn.execute("SELECT indexdef FROM pg_indexes WHERE schemaname = 'palette_read' "
                                       "AND tablename = %s ORDER BY indexname", [relname]).fetchall()]


def test_a_rules_table_made_before_its_index_gets_it_once(fresh_db):
    with psycopg.connect(fresh_db, autocommit=True) as c:
        c.execute("CREATE SCHEMA palette_read")
        c.execute("CREATE TABLE palette_read.rules (id uuid PRIMARY KEY, user_id uuid, name text, preset_id text, "
                  "concepts_json text, protect_json text, deleted boolean, created_at timestamptz, "
                  "updated_at timestamptz)")
        c.execute("CREATE INDEX ON palette_read.rules (user_id, created_at)")  # what older versions made
        ensure_schema(c)
        once = _indexes(c, "rules")
        ensure_schema(c)
        again = _indexes(c, "rules")
    [partial] = [d for d in once if "WHERE" in d]
    assert partial.endswith("(user_id, created_at) WHERE (NOT deleted)"), partial
    assert len(once) == 3 and again == once  # the key, the older index, the partial one: none made twice


def test_ensuring_the_schema_again_makes_no_index_twice_on_any_model(fresh_db):
    with psycopg.connect(fresh_db, autocommit=True) as c:
        ensure_schema(c)
        count = "SELECT count(*) FROM pg_indexes WHERE schemaname = 'palette_read'"
        before = c.execute(count).fetchone()
        ensure_schema(c)
        assert c.execute(count).fetchone() == before
