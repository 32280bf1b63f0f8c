"""The read models split for catch-ups side by side: every model in exactly one group, no stream
type in two groups (each process reads only its streams' events), never more groups than asked."""

from __future__ import annotations

import pytest

from projections.catchup import groups
from projections.models import READ_MODELS


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

