"""Which PostgreSQL binaries the embedded stack runs (infra.stack.find_pg_bin): a data directory
made by one major version needs that version's server, which a newer one installed beside it
(Debian keeps both after an upgrade) refuses ("database files are incompatible with server")."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import infra.stack
from infra.stack import EmbeddedStack, find_pg_bin


@pytest.fixture
def two_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    lib = tmp_path / "lib"
    for version in ("15", "17"):
        for name in ("postgres", "initdb"):
            binary = lib / version / "bin" / name
            binary.parent.mkdir(parents=True, exist_ok=True)
            binary.write_text("#!/bin/sh\n")
            binary.chmod(0o755)
    monkeypatch.setattr(infra.stack, "PG_LIB", lib)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # none on PATH
    return lib


def test_a_fresh_cluster_gets_the_newest_version(two_versions: Path) -> None:
    assert find_pg_bin("initdb") == str(two_versions / "17" / "bin" / "initdb")


def postgres_of_cluster(tmp_path: Path, pg_version: bytes) -> str:
    """The server binary the stack starts for a cluster whose PG_VERSION holds ``pg_version``."""
    settings = SimpleNamespace(data_dir=tmp_path / "data", pg_port=5433, pg_fsync=False, log_max_bytes=2**20,
                               log_keep=1, api_workers=1)
    stack: Any = EmbeddedStack(settings, topics=(), prepare=lambda: None, app_argv=["false"])
    stack._run_as = None
    pgdir = tmp_path / "data" / "pg"
    pgdir.mkdir(parents=True)
    (pgdir / "PG_VERSION").write_bytes(pg_version)
    return str(stack._postgres_spec().argv[0])


def test_a_cluster_of_an_older_version_is_served_by_that_versions_postgres(two_versions: Path, tmp_path: Path) -> None:
    assert postgres_of_cluster(tmp_path, b"15\n") == str(two_versions / "15" / "bin" / "postgres")


@pytest.mark.parametrize("made_by", [b"\xff\xfe15\n", b"../lib/15\n"], ids=["not text", "a path"])
def test_a_pg_version_that_is_no_version_number_is_left_to_the_server(
        two_versions: Path, tmp_path: Path, made_by: bytes) -> None:
    """Bytes that are not text ended `palette up` on a UnicodeDecodeError traceback; a path was
    followed out of Debian's directory. Either gets the binary a fresh cluster would, whose
    server then says what is wrong with the cluster."""
    assert postgres_of_cluster(tmp_path, made_by) == str(two_versions / "17" / "bin" / "postgres")


def test_root_without_the_postgres_user_is_told_so_in_one_line(tmp_path: Path) -> None:
    """A container without Debian's postgresql package's user: the question whether that user
    may reach the data directory raised KeyError, and `palette up` ended in a traceback."""
    from infra.supervisor import StackError

    settings = SimpleNamespace(data_dir=tmp_path / "data", log_max_bytes=2**20, log_keep=1)
    stack: Any = EmbeddedStack(settings, topics=(), prepare=lambda: None, app_argv=["false"])
    stack._run_as = "palette-no-such-user"  # root's PostgreSQL user, missing
    with pytest.raises(StackError, match=r"^running as root needs the 'palette-no-such-user' system user"):
        stack._postgres_spec()
