"""A `postmaster.pid` left by a PostgreSQL that never stopped (power lost, the machine rebooted, the
whole stack SIGKILLed) names a pid that another process may hold by the next start: PostgreSQL then
refuses to start ("lock file postmaster.pid already exists") on every `palette up` until someone
deletes the file. `palette up` removes it when the process holding that pid is no postmaster of
this directory (a postmaster's working directory is its data directory), and keeps it otherwise."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

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


BIND_MOUNTED = """
import subprocess, sys
from pathlib import Path
from infra.stack import remove_stale_pid_file
real, alias = Path(sys.argv[1]), Path(sys.argv[2])
subprocess.run(["mount", "--bind", str(real), str(alias)], check=True)
proc = subprocess.Popen(["sleep", "60"], cwd=alias / "pg")  # a postmaster started with -D alias/pg
try:
    (real / "pg" / "postmaster.pid").write_text(f"{proc.pid}\\n{alias / 'pg'}\\n")
    print(remove_stale_pid_file(real / "pg"), (real / "pg" / "postmaster.pid").exists())
finally:
    proc.kill()
"""


def test_the_pid_file_of_a_postmaster_running_on_the_directory_through_another_path_is_kept(
        tmp_path: Path) -> None:
    """The same directory reached through a bind mount: its postmaster's working directory reads
    as another path, yet it is this directory's (deleted, its file makes it shut down)."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no unprivileged mount namespace here (unshare -rm)")
    real, alias = tmp_path / "real", tmp_path / "alias"
    (real / "pg").mkdir(parents=True)
    alias.mkdir()
    out = subprocess.run([unshare, "-rm", "--propagation", "private", sys.executable, "-c", BIND_MOUNTED,
                          str(real), str(alias)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["False", "True"]  # not removed, still there


def test_a_pid_file_naming_no_possible_process_is_left_to_postgresql(tmp_path: Path) -> None:
    pgdir = tmp_path / "pg"
    for garbage in ("0", "-1", "99999999999999999999", "", "abc", "\xff\xfe"):
        path = pid_file(pgdir, 0)
        path.write_text(f"{garbage}\n{pgdir}\n")
        assert remove_stale_pid_file(pgdir) is False, garbage
        assert path.exists()


def test_an_empty_pid_file_a_start_cut_short_left_is_removed(tmp_path: Path) -> None:
    """PostgreSQL refuses to start on an empty postmaster.pid ("either another server is starting,
    or the lock file is the remnant of a previous server startup crash"); palette up holds the
    data directory, so no server of its own is starting."""
    pgdir = tmp_path / "pg"
    pgdir.mkdir()
    for empty in ("", "\n", "  \n"):
        (pgdir / "postmaster.pid").write_text(empty)
        assert remove_stale_pid_file(pgdir) is True and not (pgdir / "postmaster.pid").exists()
