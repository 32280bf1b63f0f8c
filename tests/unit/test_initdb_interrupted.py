"""A first `palette up` stopped while initdb runs (Ctrl-C a second into `make run`: initdb is
killed by subprocess.run as the signal unwinds it) left a cluster with its PG_VERSION written and
no `postgres` database: every later `palette up` took it for made, and failed after 60 s ("database
"postgres" does not exist") until the data directory was deleted by hand. initdb now makes the
cluster beside its place and it is renamed there only once complete."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import infra.stack
from infra.stack import EmbeddedStack
from infra.supervisor import StackError

# initdb's first steps (PG_VERSION is written early), then killed as `palette up` is interrupted
KILLED = '#!/bin/sh\nwhile [ "$1" != "-D" ]; do shift; done\necho 15 > "$2/PG_VERSION"\nkill -9 $$\n'
COMPLETE = '#!/bin/sh\nwhile [ "$1" != "-D" ]; do shift; done\necho 15 > "$2/PG_VERSION"\nmkdir "$2/base"\n'


def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> Any:
    initdb = tmp_path / "initdb"
    initdb.write_text(script)
    initdb.chmod(0o755)
    monkeypatch.setattr(infra.stack, "find_pg_bin", lambda name: str(initdb))
    settings = SimpleNamespace(data_dir=tmp_path / "data", pg_password="pw", log_max_bytes=2**20, log_keep=1)
    s: Any = EmbeddedStack(settings, topics=(), prepare=lambda: None, app_argv=["false"])
    s._run_as = None  # the stand-in initdb runs as this user
    return s


def test_an_initdb_cut_short_leaves_no_cluster_that_the_next_start_takes_for_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pgdir, rundir = tmp_path / "data" / "pg", tmp_path / "data" / "pg-run"
    rundir.mkdir(parents=True)
    with pytest.raises(StackError, match="initdb failed"):
        stack(tmp_path, monkeypatch, KILLED)._initdb(pgdir, rundir)
    assert not (pgdir / "PG_VERSION").exists()  # so the next start runs initdb again

    stack(tmp_path, monkeypatch, COMPLETE)._initdb(pgdir, rundir)
    assert (pgdir / "PG_VERSION").exists() and (pgdir / "base").is_dir()
    assert sorted(p.name for p in pgdir.parent.iterdir()) == ["pg", "pg-run"]  # nothing half-made beside it


@pytest.mark.parametrize("left", ["a file", "a link to a directory", "a dangling link"])
def test_a_non_directory_in_the_initdb_place_is_removed_never_what_a_link_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, left: str) -> None:
    pgdir, rundir = tmp_path / "data" / "pg", tmp_path / "data" / "pg-run"
    rundir.mkdir(parents=True)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "file").write_text("someone's")
    partial = pgdir.with_name("pg.initdb")
    if left == "a file":
        partial.write_text("")
    else:
        partial.symlink_to(kept if left == "a link to a directory" else tmp_path / "nowhere")
    stack(tmp_path, monkeypatch, COMPLETE)._initdb(pgdir, rundir)
    assert (pgdir / "PG_VERSION").exists()
    assert (kept / "file").read_text() == "someone's"


def test_the_rename_to_its_place_is_made_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lost to a power cut, the complete cluster (with data by then) would be named pg.initdb and
    deleted by the next start as a cut-short initdb: the directory holding it is synced."""
    pgdir, rundir = tmp_path / "data" / "pg", tmp_path / "data" / "pg-run"
    rundir.mkdir(parents=True)
    synced: list[str] = []
    real_fsync = infra.stack.os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    s = stack(tmp_path, monkeypatch, COMPLETE)
    monkeypatch.setattr(infra.stack.os, "fsync", fsync)
    s._initdb(pgdir, rundir)
    assert str(pgdir.parent) in synced


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL's files go elsewhere only for root")
def test_the_note_of_a_cluster_kept_elsewhere_is_made_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start that finds no note beside a cluster kept under PG_HOME deletes that cluster (a data
    directory made afresh): a note lost to a power cut would take the database with it."""
    monkeypatch.setattr(infra.stack, "PG_HOME", tmp_path / "pg-home")
    s = stack(tmp_path, monkeypatch, COMPLETE)
    s._run_as = "postgres"
    s.data_dir.mkdir(mode=0o700)
    synced: list[str] = []
    real_fsync = infra.stack.os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(infra.stack.os, "fsync", fsync)
    base = s._pg_base()
    assert base.parent == tmp_path / "pg-home" and (s.data_dir / "pg-elsewhere").exists()
    assert {str(s.data_dir), str(s.data_dir.parent)} <= set(synced)



# What PostgreSQL 15's initdb writes to stderr when its disk fills (seen on a 20 MiB ext4 volume):
# the cause first, then its own clean-up, which was all `palette up` quoted.
DISK_FULL = ("#!/bin/sh\ncat >&2 <<'END'\n"
             '2026-12-07 14:57:54.825 UTC [26864] FATAL:  could not extend file "base/1/2691": '
             "No space left on device\n"
             "2026-12-07 14:57:54.825 UTC [26864] HINT:  Check free disk space.\n"
             "2026-12-07 14:57:54.825 UTC [26864] PANIC:  cannot abort transaction 1, it was already committed\n"
             "Aborted\nchild process exited with exit code 134\n"
             'initdb: removing contents of data directory "/d/pg.initdb"\nEND\nexit 1\n')
OWN_ERROR = ("#!/bin/sh\ncat >&2 <<'END'\n"
             'initdb: error: could not write file "/d/pg.initdb/postgresql.conf": No space left on device\n'
             'initdb: removing contents of data directory "/d/pg.initdb"\nEND\nexit 1\n')


@pytest.mark.parametrize(("script", "said"), [
    (DISK_FULL, 'initdb failed: could not extend file "base/1/2691": No space left on device (free space'),
    (OWN_ERROR, 'initdb failed: could not write file "/d/pg.initdb/postgresql.conf": No space left on device (free'),
    (KILLED, "initdb failed: no output"),
])
def test_a_failed_initdb_is_said_by_its_cause_not_its_clean_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, said: str) -> None:
    pgdir, rundir = tmp_path / "data" / "pg", tmp_path / "data" / "pg-run"
    rundir.mkdir(parents=True)
    with pytest.raises(StackError) as failed:
        stack(tmp_path, monkeypatch, script)._initdb(pgdir, rundir)
    assert str(failed.value).startswith(said)
    assert (str(pgdir.parent) in str(failed.value)) == ("No space" in said)  # where to free it
    assert "\n" not in str(failed.value)
