"""The test session's removal of the PostgreSQL files its tests left under PG_HOME
(tests.conftest.no_database_left_behind)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from infra.stack import PG_OWNER
from tests.conftest import left_behind


def test_a_session_removes_only_the_postgresql_files_of_its_own_data_directories(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Sessions run side by side on one machine (a CI run beside a developer's), each making
    PostgreSQL files under PG_HOME for data directories in the same temporary directory. One
    ending removed every new one of a data directory there whose PostgreSQL did not run, so
    another session's cluster between its initdb and its start, or stopped to be started again,
    went from under its test."""
    ours, theirs, unknown = tmp_path / "ours", tmp_path / "theirs", tmp_path / "unknown"
    for base in (ours, theirs, unknown):
        (base / "pg").mkdir(parents=True)
    (ours / PG_OWNER).write_text(f"{tmp_path_factory.getbasetemp() / 'test_x0' / '.palette'}\n")
    other_session = Path(tempfile.gettempdir()).resolve() / "pytest-of-someone" / "pytest-7" / "test_y0"
    (theirs / PG_OWNER).write_text(f"{other_session / '.palette'}\n")
    assert left_behind([ours, theirs, unknown], tmp_path_factory.getbasetemp()) == [ours]
