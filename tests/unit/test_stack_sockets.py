"""Where the embedded SeaweedFS puts its Unix sockets (infra.stack.local_socket), and which of
those it leaves the stack removes (infra.supervisor.remove_left_sockets)."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from infra.stack import SOCKET_PATH_MAX, local_socket, refuse_foreign_sockets
from infra.supervisor import ServiceSpec, StackError, Supervisor, remove_left_sockets


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


def left_socket(path: Path) -> Path:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))  # closed without removing the file, as a killed SeaweedFS leaves it
    return path


def test_a_grpc_socket_another_user_left_in_tmp_is_refused_in_one_line(tmp_path: Path) -> None:
    """SeaweedFS's gRPC sockets are at /tmp paths no flag moves. One another user's stack left there
    (sticky: only its owner, the directory's or root removes it) made SeaweedFS fail to listen and
    dial it instead: `palette up` waited 60 s, then quoted SeaweedFS's log ("s3 not ready after 60s")."""
    tmp_path.chmod(0o1777)  # as /tmp
    left = left_socket(tmp_path / "seaweedfs-master-grpc-18334.sock")
    someone_else = os.geteuid() + 1
    with pytest.raises(StackError) as refused:
        refuse_foreign_sockets((tmp_path / "missing.sock", left), uid=someone_else)
    message = str(refused.value)
    assert str(left) in message and f"uid {os.geteuid()}" in message and "PALETTE_S3_PORT" in message
    assert "\n" not in message
    refuse_foreign_sockets((left,), uid=os.geteuid())  # ours: removed before SeaweedFS starts
    refuse_foreign_sockets((left,), uid=0)  # root removes any
    tmp_path.chmod(0o777)  # not sticky: whoever may write the directory removes it
    refuse_foreign_sockets((left,), uid=someone_else)


def test_palette_up_refuses_a_foreign_grpc_socket_before_it_starts_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import infra.stack as stack

    tmp_path.chmod(0o1777)
    left = left_socket(tmp_path / "seaweedfs-admin-grpc-18339.sock")
    settings = types.SimpleNamespace(data_dir=tmp_path / "data", log_max_bytes=1 << 20, log_keep=1, s3_port=8333,
                                     pg_port=5433, kafka_port=9092)
    embedded = stack.EmbeddedStack(settings, topics=(), prepare=lambda: None, app_argv=[])
    monkeypatch.setattr(stack, "check_ports", lambda ports: None)
    monkeypatch.setattr(stack, "weed_grpc_sockets", lambda port: (left,))
    monkeypatch.setattr(stack.os, "geteuid", lambda: os.getuid() + 1)
    started: list[str] = []
    monkeypatch.setattr(embedded.supervisor, "start", lambda spec: started.append(spec.name))
    monkeypatch.setattr(embedded, "_check_s3_client", lambda: None)
    with pytest.raises(StackError, match="another user"):
        embedded.start_infra()
    assert started == []
