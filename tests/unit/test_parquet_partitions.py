"""The log dataset's partitions as written to disk, read back file by file with pyarrow: each
event lies once, under the UTC day of its timestamp."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from projections import parquet
from projections.parquet import TIMESTAMP, PartitionedWriter, event_schemas


def _created(stamps: dict[int, datetime]) -> pa.Table:
    """JobCreated rows at these positions and times (data fields null: only the envelope matters)."""
    schema = next(s.schema for s in event_schemas().values() if s.name == "JobCreated")
    n = len(stamps)
    columns: dict[str, Any] = {f.name: pa.nulls(n, f.type) for f in schema}
    columns |= {"position": pa.array(list(stamps), pa.int64()), "stream_id": pa.array([f"s{p}" for p in stamps]),
                "version": pa.array([1] * n, pa.int32()), "timestamp": pa.array(list(stamps.values()), TIMESTAMP)}
    return pa.table(columns, schema=schema)


def _days_on_disk(out: Path) -> dict[int, list[str]]:
    """Each position -> the day folders of every part holding it (read without hive partitioning)."""
    found: dict[int, list[str]] = {}
    for part in sorted(out.glob("type=JobCreated/day=*/*.parquet")):
        day = part.parent.name.removeprefix("day=")
        for position in pq.read_table(part).column("position").to_pylist():
            found.setdefault(position, []).append(day)
    return found


def test_an_event_lies_under_the_utc_day_of_its_timestamp_whatever_offset_it_was_stamped_with(tmp_path: Path) -> None:
    stamps = {1: datetime(2026, 3, 1, 23, 30, tzinfo=UTC),
              2: datetime(2026, 3, 2, 0, 30, tzinfo=timezone(timedelta(hours=1))),  # 23:30 UTC the day before
              3: datetime(2026, 3, 2, 0, 10, tzinfo=UTC),
              4: datetime(2026, 3, 1, 20, 0, tzinfo=timezone(timedelta(hours=-5))),  # 01:00 UTC the day after
              5: datetime(2026, 3, 2, 14, 59, tzinfo=UTC),
              6: datetime(2026, 3, 2, 15, 1, tzinfo=UTC)}
    writer = PartitionedWriter(tmp_path)
    writer.add("JobCreated", _created(stamps))
    writer.close()
    assert _days_on_disk(tmp_path) == {p: [t.astimezone(UTC).date().isoformat()] for p, t in stamps.items()}


def test_a_partition_whose_file_was_closed_gets_a_new_part_not_its_old_one_overwritten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More partitions than open files: the least recently written one is closed, and its next
    rows go to a part of their own."""
    monkeypatch.setattr(parquet, "MAX_OPEN", 1)
    monkeypatch.setattr(parquet, "GROUP_ROWS", 1)
    first, second = datetime(2026, 3, 1, 12, tzinfo=UTC), datetime(2026, 3, 2, 12, tzinfo=UTC)
    writer = PartitionedWriter(tmp_path)
    for position, at in ((1, first), (2, second), (3, first), (4, second)):
        writer.add("JobCreated", _created({position: at}))
    stats = writer.close()
    assert _days_on_disk(tmp_path) == {1: ["2026-03-01"], 2: ["2026-03-02"], 3: ["2026-03-01"], 4: ["2026-03-02"]}
    assert stats.files == len(list(tmp_path.rglob("*.parquet"))) == 4
