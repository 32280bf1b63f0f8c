"""`palette up` says when a disk it writes to runs low (``EmbeddedStack.watch_disks``): nothing
warned before PostgreSQL PANICked on a full disk (its WAL alone takes 16 MB a segment), found by
the review that filled a live stack's disk. A line at most every LOW_DISK_EVERY_S while it stays
low, the disk looked at every DISK_CHECK_EVERY_S; PostgreSQL's directory elsewhere looked at too."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest

import infra.stack as stack_module
from adapters.bootstrap import embedded_stack
from adapters.settings import load_settings
from infra.stack import DISK_CHECK_EVERY_S, LOW_DISK_BYTES, LOW_DISK_EVERY_S, LOW_DISK_SHARE, EmbeddedStack

TOTAL = 100 * 2**30  # the fake disk's size


class Disk:
    """What os.statvfs answers of every path: a 100 GiB disk with ``free`` bytes free; the paths asked."""

    def __init__(self) -> None:
        self.free = TOTAL
        self.asked: list[str] = []

    def statvfs(self, path: Any) -> Any:
        self.asked.append(str(path))
        return os.statvfs_result((4096, 4096, TOTAL // 4096, self.free // 4096, self.free // 4096,
                                  0, 0, 0, 0, 255))


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    fake = Disk()
    monkeypatch.setattr(stack_module.os, "statvfs", fake.statvfs)
    return fake


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(stack_module.time, "monotonic", lambda: now[0])
    return now


def _stack(tmp_path: Path) -> EmbeddedStack[Any]:
    return embedded_stack(load_settings(data_dir=tmp_path), echo=io.StringIO())


def _said(stack: EmbeddedStack[Any]) -> list[str]:
    echo = stack.supervisor.echo
    assert isinstance(echo, io.StringIO)
    return echo.getvalue().splitlines()


def test_a_disk_with_room_is_not_mentioned(tmp_path: Path, disk: Disk, clock: list[float]) -> None:
    stack = _stack(tmp_path)
    disk.free = max(LOW_DISK_BYTES, int(LOW_DISK_SHARE * TOTAL)) + 2**20
    stack.watch_disks()
    assert disk.asked and _said(stack) == []


@pytest.mark.parametrize("free", [LOW_DISK_BYTES - 2**20, int(LOW_DISK_SHARE * TOTAL) - 2**20])
def test_a_disk_running_low_is_said_at_most_every_so_often(tmp_path: Path, disk: Disk, clock: list[float],
                                                           free: int) -> None:
    stack = _stack(tmp_path)
    disk.free = free
    stack.watch_disks()
    said = _said(stack)
    assert len(said) == 1 and str(tmp_path) in said[0] and f"{free // 2**20:,} MB free" in said[0]
    clock[0] += DISK_CHECK_EVERY_S
    stack.watch_disks()  # still low: not said again yet
    assert len(_said(stack)) == 1
    clock[0] += LOW_DISK_EVERY_S
    stack.watch_disks()
    assert len(_said(stack)) == 2


def test_the_disk_is_looked_at_every_so_often_not_on_every_turn(tmp_path: Path, disk: Disk,
                                                                 clock: list[float]) -> None:
    stack = _stack(tmp_path)
    stack.watch_disks()
    stack.watch_disks()
    looked = len(disk.asked)
    clock[0] += DISK_CHECK_EVERY_S
    stack.watch_disks()
    assert looked > 0 and len(disk.asked) == 2 * looked


def test_postgresqls_directory_elsewhere_is_looked_at_too(tmp_path: Path, disk: Disk, clock: list[float]) -> None:
    stack = _stack(tmp_path / "data")
    stack.pg_base = tmp_path / "elsewhere"  # as _pg_base sets it when root's postgres cannot reach the data
    disk.free = LOW_DISK_BYTES // 2
    stack.watch_disks()
    assert {str(tmp_path / "data"), str(tmp_path / "elsewhere")} <= set(disk.asked)
