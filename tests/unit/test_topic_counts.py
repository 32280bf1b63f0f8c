"""Which existing topics ensure_topics names for another partition count (infra.kafka_admin.miscounted)."""

from __future__ import annotations

from typing import Any

from infra.kafka_admin import miscounted


def described(name: str, partitions: int, error_code: int = 0) -> dict[str, Any]:
    return {"name": name, "error_code": error_code, "partitions": [{"partition": p} for p in range(partitions)]}


def test_a_topic_with_another_count_is_named_with_its_count() -> None:
    answer = [described("palette.events", 4), described("palette.gpu-jobs", 3)]
    assert miscounted(answer, ["palette.events", "palette.gpu-jobs"], 3) == [("palette.events", 4)]


def test_a_topic_described_with_an_error_has_no_count_to_name() -> None:
    # Being deleted or made again (the relay's rollover): the answer lists no partitions.
    answer = [described("palette.events", 0, error_code=3), described("palette.gpu-jobs", 0)]
    assert miscounted(answer, ["palette.events", "palette.gpu-jobs"], 3) == []


def test_topics_not_asked_about_are_left_out() -> None:
    assert miscounted([described("other", 9)], ["palette.events"], 3) == []
