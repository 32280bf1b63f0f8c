"""The webhooks schema runs at every start of the webhooks process and of
``palette up``; ALTER TABLE takes ACCESS EXCLUSIVE on its table even when IF NOT EXISTS makes it
change nothing, so each column added after the first release is looked for first (DO block)."""

from adapters.webhooks.store import DDL


def test_no_start_locks_a_table_to_add_a_column_it_has() -> None:
    unguarded = [s for s in DDL if "ALTER TABLE" in s and not s.startswith("DO $$ BEGIN IF NOT EXISTS")]
    assert unguarded == []
