"""Where the embedded SeaweedFS puts its Unix sockets (infra.stack.local_socket), and which of
those it leaves the stack removes (infra.supervisor.remove_left_sockets)."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from infra.stack import SOCKET_PATH_MAX, local_socket
from infra.supervisor import remove_left_sockets


def test_a_socket_goes_in_the_stacks_own_directory() -> None:
    directory = Path("/srv/palette/.palette/s3")
    assert local_socket(directory, "s3", 9000) == directory / "s3.sock"


def test_a_directory_too_deep_for_a_socket_gets_one_in_the_temporary_directory_named_by_user_and_port() -> None:
    deep = Path("/srv") / ("d" * SOCKET_PATH_MAX)
    path = local_socket(deep, "filer", 9003)
    assert path == Path(tempfile.gettempdir()) / f"palette-{os.getuid()}-seaweedfs-filer-9003.sock"
    assert len(str(path)) <= SOCKET_PATH_MAX < len(str(deep / "filer.sock"))


def test_only_a_socket_of_this_users_is_removed_as_left_behind(tmp_path: Path) -> None:
    ours, directory, plain = tmp_path / "ours.sock", tmp_path / "dir.sock", tmp_path / "file.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(ours))
    directory.mkdir()
    plain.write_text("kept")
    theirs = tmp_path / "theirs.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(theirs))
    if os.getuid() == 0:
        os.chown(theirs, 65534, 65534)  # another user's (nobody's)
    remove_left_sockets((ours, directory, plain, theirs, tmp_path / "missing.sock"))
    assert not ours.exists()
    assert directory.is_dir() and plain.read_text() == "kept"
    assert theirs.exists() == (os.getuid() == 0)
