"""Where the embedded SeaweedFS puts its Unix sockets (infra.stack.local_socket), and which of
those it leaves the stack removes (infra.supervisor.remove_left_sockets)."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from infra.stack import SOCKET_PATH_MAX, local_socket
from infra.supervisor import ServiceSpec, Supervisor, remove_left_sockets


def test_a_socket_goes_in_the_stacks_own_directory() -> None:
    directory = Path("/srv/palette/.palette/s3")
    assert local_socket(directory, "s3", 9000) == directory / "s3.sock"


def test_a_directory_too_deep_for_a_socket_gets_one_in_the_temporary_directory_named_by_user_and_port() -> None:
    deep = Path("/srv") / ("d" * SOCKET_PATH_MAX)
    path = local_socket(deep, "filer", 9003)
    assert path == Path(tempfile.gettempdir()) / f"palette-{os.getuid()}-seaweedfs-filer-9003.sock"
    assert len(str(path)) <= SOCKET_PATH_MAX < len(str(deep / "filer.sock"))


def test_a_directory_of_few_characters_but_too_many_bytes_gets_one_in_the_temporary_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit is the kernel's, in bytes: 40 CJK characters are 120 (SeaweedFS's bind failed)."""
    deep = Path("/srv") / ("数" * 40)
    assert len(str(deep / "filer.sock")) <= SOCKET_PATH_MAX
    assert len(os.fsencode(local_socket(deep, "filer", 9003))) <= SOCKET_PATH_MAX
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / ("t" * SOCKET_PATH_MAX)))  # TMPDIR too deep too
    assert local_socket(deep, "filer", 9003) == Path(f"/tmp/palette-{os.getuid()}-seaweedfs-filer-9003.sock")


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
    link = tmp_path / "link.sock"  # a link to a socket of ours: neither it nor what it names goes
    target = tmp_path / "target.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(target))
    link.symlink_to(target)
    remove_left_sockets((ours, directory, plain, theirs, link, tmp_path / "missing.sock"))
    assert not ours.exists()
    assert directory.is_dir() and plain.read_text() == "kept"
    assert theirs.exists() == (os.getuid() == 0)
    assert link.is_symlink() and target.is_socket()


def test_a_socket_a_server_listens_on_is_kept(tmp_path: Path) -> None:
    """Another stack's server that took the path after ours died is not ours to cut off."""
    path = tmp_path / "taken.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        remove_left_sockets((path,))
        assert path.is_socket()
    remove_left_sockets((path,))  # closed: nobody listens any more
    assert not path.exists()


def test_the_supervisor_removes_what_a_service_left_after_it_died(tmp_path: Path) -> None:
    """A service that died (not stopped by us) leaves its sockets too: they go when it is stopped."""
    left = tmp_path / "left.sock"
    ready = tmp_path / "ready"
    code = (f"import socket, pathlib\ns = socket.socket(socket.AF_UNIX)\ns.bind({str(left)!r})\ns.listen()\n"
            f"pathlib.Path({str(ready)!r}).write_text('')\ns.accept()\n")  # exits on a connection, the file left
    supervisor = Supervisor(tmp_path)
    supervisor.start(ServiceSpec("dies", [sys.executable, "-c", code], ready=ready.exists, leaves=(left,)))
    run = supervisor._running["dies"]
    assert run.proc is not None
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(left))
    run.proc.wait(30)
    assert left.is_socket()
    supervisor.stop_all()
    assert not left.exists()


def test_what_a_run_killed_with_its_supervisor_left_is_removed_before_the_next_starts(tmp_path: Path) -> None:
    """`kill -9` of `palette up` leaves its services' sockets (nobody ran their removal): the next
    start of the service removes them first, so they do not pile up in /tmp."""
    left = tmp_path / "left.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(left))  # closed without removing the file, as a killed service leaves it
    seen = tmp_path / "seen"
    code = (f"import os, pathlib, time\npathlib.Path({str(seen)!r}).write_text(str(os.path.exists({str(left)!r})))\n"
            "time.sleep(60)\n")
    supervisor = Supervisor(tmp_path)
    supervisor.start(ServiceSpec("svc", [sys.executable, "-c", code], ready=seen.exists, restart=False,
                                 leaves=(left,)))
    supervisor.stop_all()
    assert seen.read_text() == "False"  # gone before the service started


def start_up_failure(log_dir: Path, code: str) -> str:
    """The StackError message of a service running ``code`` that exits before it is ready."""
    supervisor = Supervisor(log_dir)
    try:
        supervisor.start(ServiceSpec("svc", [sys.executable, "-c", code], ready=lambda: False, restart=False))
    except Exception as e:  # noqa: BLE001 - the message is the subject
        return str(e)
    raise AssertionError("the start did not fail")


def test_a_start_up_failure_quotes_what_was_raised_not_the_frames(tmp_path: Path) -> None:
    code = "def deep():\n    raise TimeoutError('the broker did not answer ' + 'x' * 1000)\ndeep()\n"
    message = start_up_failure(tmp_path, code)
    assert message.startswith("svc exited during start-up: TimeoutError: the broker did not answer xxx")
    assert "File " not in message and "Traceback" not in message and "deep()" not in message
    assert len(message) < 400 and message.endswith("…")


def test_a_start_up_failure_quotes_a_json_records_exception_and_an_exception_groups_members(tmp_path: Path) -> None:
    """A `palette serve` process logs JSON records with the traceback in "exc"; an exception group
    indents every line of its traceback: the message keeps what was raised in both."""
    import json
    import traceback

    try:
        raise ExceptionGroup("unhandled errors in a TaskGroup", [ConnectionRefusedError(111, "the broker refused")])
    except ExceptionGroup as group:
        grouped = "".join(traceback.format_exception(group))
    try:
        raise RuntimeError("PALETTE_JWT_SECRET is the placeholder: set a real secret")
    except RuntimeError as error:
        record = json.dumps({"level": "error", "msg": "Exception in 'lifespan' protocol", "path": "x" * 400,
                             "exc": "".join(traceback.format_exception(error))})
    lifespan = "Exception in 'lifespan' protocol: RuntimeError: PALETTE_JWT_SECRET is the placeholder"
    for log, wanted in ((record, lifespan), (grouped, "ConnectionRefusedError: [Errno 111] the broker refused")):
        (tmp_path / "svc.log").write_text("starting\n" + log + "\n")
        message = start_up_failure(tmp_path, "import sys; sys.exit(3)")
        assert wanted in message and "File " not in message and "Traceback" not in message, message
