"""Where the embedded SeaweedFS puts its Unix sockets (infra.stack.local_socket)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from infra.stack import SOCKET_PATH_MAX, local_socket


def test_a_socket_goes_in_the_stacks_own_directory() -> None:
    directory = Path("/srv/palette/.palette/s3")
    assert local_socket(directory, "s3", 9000) == directory / "s3.sock"


def test_a_directory_too_deep_for_a_socket_gets_one_in_the_temporary_directory_named_by_user_and_port() -> None:
    deep = Path("/srv") / ("d" * SOCKET_PATH_MAX)
    path = local_socket(deep, "filer", 9003)
    assert path == Path(tempfile.gettempdir()) / f"palette-{os.getuid()}-seaweedfs-filer-9003.sock"
    assert len(str(path)) <= SOCKET_PATH_MAX < len(str(deep / "filer.sock"))
