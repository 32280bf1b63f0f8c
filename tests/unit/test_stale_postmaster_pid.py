"""A `postmaster.pid` left by a PostgreSQL that never stopped (power lost, the machine rebooted, the
whole stack SIGKILLed) names a pid that another process may hold by the next start: PostgreSQL then
refuses to start ("lock file postmaster.pid already exists") on every `palette up` until someone
deletes the file. `palette up` removes it when the process holding that pid is no postmaster of
this directory (a postmaster's working directory is its data directory), and keeps it otherwise."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infra.stack import remove_stale_pid_file


@contextmanager
def process_in(cwd: Path) -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "60"], cwd=cwd)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def pid_file(pgdir: Path, pid: int) -> Path:
    pgdir.mkdir(exist_ok=True)
    path = pgdir / "postmaster.pid"
    path.write_text(f"{pid}\n{pgdir}\n1733400000\n5433\n\n127.0.0.1\n  5433001         0\nready   \n")
    return path


def test_a_pid_file_naming_a_live_process_of_another_directory_is_removed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with process_in(elsewhere) as pid:
        path = pid_file(tmp_path / "pg", pid)
        assert remove_stale_pid_file(tmp_path / "pg") is True
    assert not path.exists()


def test_the_pid_file_of_a_postmaster_running_on_the_directory_is_kept(tmp_path: Path) -> None:
    pgdir = tmp_path / "pg"
    pgdir.mkdir()
    with process_in(pgdir) as pid:
        path = pid_file(pgdir, pid)
        assert remove_stale_pid_file(pgdir) is False
        assert path.exists()


def test_a_dead_pid_or_no_file_is_left_to_postgresql(tmp_path: Path) -> None:
    pgdir = tmp_path / "pg"
    assert remove_stale_pid_file(pgdir) is False  # no directory, no file
    with process_in(tmp_path) as pid:
        pass
    path = pid_file(pgdir, pid)  # gone: PostgreSQL itself takes the file for stale
    assert remove_stale_pid_file(pgdir) is False
    assert path.exists()
