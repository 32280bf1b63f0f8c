"""The pieces that keep `audit reconcile` in bounded memory, against plain oracles: the per-user
merge of the log's ledger rows with the projection's is their set difference, and a bounded list
of findings keeps exactly the first ``limit`` (in order) and counts the rest."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from projections.audit import DELTA, SEQ, Firsts, LedgerMerge
from projections.models.billing_events import LEDGER_COLUMNS

WHEN = datetime(2026, 1, 1, tzinfo=UTC)


def _row(seq: int, delta: int, variant: int) -> tuple[object, ...]:
    values: dict[str, object] = {"id": f"{seq}-0", "user_id": "u", "seq": seq, "type": "grant", "amount": abs(delta),
                                 "balance_delta": delta, "ref": f"r{variant}", "occurred_at": WHEN, "position": seq,
                                 "prev_hash": "p", "hash": "h"}
    return tuple(values[c] for c in LEDGER_COLUMNS)


# by seq: (in the log's fold, in the projection, the projection's copy differs, balance_delta)
SIDES = st.dictionaries(st.integers(1, 60), st.tuples(st.booleans(), st.booleans(), st.booleans(),
                                                      st.integers(-50, 50)), max_size=40)


@given(SIDES)
def test_the_merge_of_one_users_rows_is_their_set_difference(sides: dict[int, tuple[bool, bool, bool, int]]) -> None:
    expected = [_row(s, d, 0) for s, (log, _, _, d) in sorted(sides.items()) if log]
    actual = [_row(s, d, int(differs)) for s, (_, proj, differs, d) in sorted(sides.items()) if proj]
    assert [r[SEQ] for r in expected] == sorted(r[SEQ] for r in expected)
    missing: list[tuple[object, ...]] = []
    extra: list[tuple[object, ...]] = []
    merge = LedgerMerge(iter(actual), missing.append, extra.append)
    for row in expected:
        merge.expect(row)
    merge.finish()
    assert sorted(missing, key=str) == sorted(set(expected) - set(actual), key=str)
    assert sorted(extra, key=str) == sorted(set(actual) - set(expected), key=str)
    assert merge.rows == len(actual)
    assert merge.total == sum(int(r[DELTA]) for r in actual)  # type: ignore[call-overload]


@given(st.lists(st.integers(-1000, 1000)), st.integers(0, 12), st.booleans())
def test_firsts_keeps_the_first_limit_and_counts_the_rest(items: list[int], limit: int, ordered: bool) -> None:
    kept = Firsts(limit, key=(lambda x: x) if ordered else None)
    for item in items:
        kept.add(item)
    assert kept.first() == (sorted(items) if ordered else items)[:limit]
    assert kept.count == len(items)
    assert kept.more == len(items) - min(limit, len(items))
