"""The read models split for catch-ups side by side: every model in exactly one group, no stream
type in two groups (each process reads only its streams' events), never more groups than asked;
and how far behind the read side counts as (its least advanced model)."""

from __future__ import annotations

from typing import Any

import pytest

from projections.catchup import CatchUp, groups
from projections.models import READ_MODELS
from projections.store import BatchResult


@pytest.mark.parametrize("n", [1, 2, 3, 4, 10])
def test_every_model_is_in_one_group_and_no_stream_type_in_two(n: int) -> None:
    parts = groups(n)
    names = [name for part in parts for name in part]
    assert sorted(names) == sorted(READ_MODELS)
    owners: dict[str, int] = {}
    for i, part in enumerate(parts):
        for name in part:
            assert owners.setdefault(READ_MODELS[name].stream_type, i) == i
    stream_types = {m.stream_type for m in READ_MODELS.values()}
    assert len(parts) == min(n, len(stream_types))
    assert all(parts)



class Positions:
    """A connection answering the positions query with ``rows``."""

    def __init__(self, rows: dict[str, int]) -> None:
        self.rows = rows

    def execute(self, query: Any) -> Positions:
        return self

    def fetchall(self) -> list[tuple[str, int]]:
        return list(self.rows.items())


def test_the_read_side_is_as_far_behind_as_its_least_advanced_model() -> None:
    ahead = dict.fromkeys(READ_MODELS, 900)
    lagging = CatchUp(Positions({**ahead, "rules": 300}), log=None, threshold=1)  # type: ignore[arg-type]
    assert lagging.behind(1000) == 700
    missing = CatchUp(Positions({k: v for k, v in ahead.items() if k != "users"}), log=None, threshold=1)  # type: ignore[arg-type]
    assert missing.behind(1000) == 1000  # a model with no position has folded nothing


class GrowingLog:
    """A log whose head is each of ``heads`` in turn: it grows while a catch-up folds it."""

    def __init__(self, *heads: int) -> None:
        self.heads = list(heads)

    def head(self) -> int:
        return self.heads.pop(0)


class CountingCatchUp(CatchUp):
    """A catch-up that records each head it folds to, one event applied each time."""

    folded_to: list[int]

    def catch_up_to(self, head: int, total: BatchResult) -> bool:
        self.folded_to.append(head)
        total.applied += 1
        return True


def test_a_log_that_grew_by_the_threshold_during_a_catch_up_is_caught_up_again_and_then_left_to_the_broker() -> None:
    catchup = CountingCatchUp(Positions(dict.fromkeys(READ_MODELS, 0)), GrowingLog(1000, 1500, 1600),  # type: ignore[arg-type]
                              threshold=500)
    catchup.folded_to = []
    done = catchup.run()
    assert catchup.folded_to == [1000, 1500]  # the threshold more: again; then 100 more: the broker's
    assert done is not None and done[0] == 1500 and done[1].applied == 2
