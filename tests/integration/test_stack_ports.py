"""A taken port is never a start: `palette up` checks every port it will bind (infrastructure, API,
metrics) before it starts anything, and a readiness probe only counts while our process lives."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from adapters.observability import OFFSETS
from infra.stack import check_ports
from infra.supervisor import ServiceSpec, StackError, Supervisor
from tests.conftest import _free_metrics_port, _free_port_block

ROOT = Path(__file__).resolve().parents[2]


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"success": true}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def foreign_server() -> Iterator[int]:
    """Another program's server on a loopback port, answering every GET (/health included) 200."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def palette_up(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`palette up ARGS`; one that does not end on its own (it took the port for its own) is a
    failure, stopped as Ctrl-C would."""
    proc = subprocess.Popen([sys.executable, "-m", "adapters.cli", "up", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin", **env}, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"palette up did not refuse the taken port; it printed: {out[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_check_ports_names_the_taken_port_and_its_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StackError, match=f"^port {port} is already in use \\(move it with PALETTE_API_PORT\\)$"):
            check_ports({"PALETTE_S3_PORT": ("127.0.0.1", 0), "PALETTE_API_PORT": ("127.0.0.1", port)})


def test_check_ports_refuses_one_port_for_two_settings() -> None:
    with pytest.raises(StackError, match="port 1234 is set twice: PALETTE_PG_PORT and PALETTE_API_PORT"):
        check_ports({"PALETTE_PG_PORT": ("127.0.0.1", 1234), "PALETTE_API_PORT": ("0.0.0.0", 1234)})  # noqa: S104


def test_check_ports_refuses_one_port_for_two_settings_that_spell_one_address_otherwise() -> None:
    with pytest.raises(StackError, match="port 1234 is set twice: PALETTE_API_PORT and PALETTE_METRICS_PORT"):
        check_ports({"PALETTE_API_PORT": ("localhost", 1234), "PALETTE_METRICS_PORT": ("127.0.0.1", 1234)})
    with pytest.raises(StackError, match="port 1234 is set twice"):
        check_ports({"PALETTE_API_PORT": ("127.0.0.1", 1234), "PALETTE_METRICS_PORT": ("127.000.000.001", 1234)})
    with socket.socket() as taken:  # two addresses of the loopback are two interfaces: no clash
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
    check_ports({"PALETTE_API_PORT": ("127.0.0.1", port), "PALETTE_METRICS_PORT": ("127.0.0.2", port)})


def test_a_probe_that_passes_after_the_child_died_is_not_its_readiness(tmp_path: Path) -> None:
    """The probe was answered by someone else: the service is reported as exited, not ready."""
    supervisor = Supervisor(tmp_path)

    def answered_by_another() -> bool:
        run = supervisor._running["svc"]
        assert run.proc is not None
        run.proc.wait(30)  # our child has exited by the time the probe passes
        return True

    spec = ServiceSpec("svc", [sys.executable, "-c", "print('address already in use'); raise SystemExit(3)"],
                       ready=answered_by_another, ready_timeout_s=30)
    try:
        with pytest.raises(StackError, match="svc exited during start-up"):
            supervisor.start(spec)
    finally:
        supervisor.stop_all()


def test_up_refuses_an_api_port_another_server_answers_on_before_starting_anything(foreign_server: int,
                                                                                   tmp_path: Path) -> None:
    ports = _free_port_block(random.Random(os.getpid() + 21))
    data_dir = tmp_path / "data"
    env = {"PALETTE_DATA_DIR": str(data_dir), "PALETTE_PG_PORT": str(ports["pg_port"]),
           "PALETTE_KAFKA_PORT": str(ports["kafka_port"]), "PALETTE_S3_PORT": str(ports["s3_port"]),
           "PALETTE_API_PORT": str(foreign_server), "PALETTE_METRICS_PORT": "0"}
    result = palette_up([], env)
    assert result.returncode != 0
    assert result.stderr == f"palette up: port {foreign_server} is already in use (move it with PALETTE_API_PORT)\n"
    assert "Traceback" not in result.stdout
    assert not (data_dir / "pg").exists()  # nothing was started


def test_up_external_refuses_an_api_port_another_server_answers_on(settings: Any, foreign_server: int) -> None:
    env = {**settings.as_env(), "PALETTE_API_PORT": str(foreign_server), "PALETTE_METRICS_PORT": "0"}
    result = palette_up(["--external", "--apps", "api"], env)
    assert result.returncode != 0
    assert result.stderr == f"palette up: port {foreign_server} is already in use (move it with PALETTE_API_PORT)\n"
    assert "ready" not in result.stdout


def test_up_refuses_a_taken_metrics_port(settings: Any) -> None:
    base = _free_metrics_port(random.Random(os.getpid() + 22))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + OFFSETS["relay"]))
        taken.listen()
        env = {**settings.as_env(), "PALETTE_METRICS_PORT": str(base)}
        result = palette_up(["--external", "--apps", "relay"], env)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"palette up: port {base + OFFSETS['relay']} is already in use "
                                    "(move it with PALETTE_METRICS_PORT")
    assert "relay" in result.stderr


def _env_for(tmp_path: Path, seed: int) -> dict[str, str]:
    ports = _free_port_block(random.Random(os.getpid() + seed))
    return {"PALETTE_DATA_DIR": str(tmp_path / "data"), "PALETTE_PG_PORT": str(ports["pg_port"]),
            "PALETTE_KAFKA_PORT": str(ports["kafka_port"]), "PALETTE_S3_PORT": str(ports["s3_port"]),
            "PALETTE_API_PORT": str(ports["api_port"]), "PALETTE_METRICS_PORT": "0"}


def test_a_second_up_on_one_data_directory_is_refused_naming_the_first(tmp_path: Path) -> None:
    from infra.stack import hold_data_dir

    env = _env_for(tmp_path, 23)
    held = hold_data_dir(tmp_path / "data")  # as the first `palette up` holds it
    try:
        result = palette_up([], env)
    finally:
        held.close()
    assert result.returncode == 1
    assert result.stderr == (f"palette up: another palette up (pid {os.getpid()}) runs on the data directory "
                             f"{tmp_path / 'data'}\n")
    assert not (tmp_path / "data" / "pg").exists()  # nothing was started


def test_a_data_directory_held_again_names_only_its_new_holder(tmp_path: Path) -> None:
    """The lock file is the pid a refused second `palette up` quotes: a later holder replaces the
    one that held it before, rather than add its pid below (a message of two pids, over two lines)."""
    from infra.stack import UP_LOCK, hold_data_dir

    (tmp_path / UP_LOCK).write_text("4194304\n")  # a holder long gone
    held = hold_data_dir(tmp_path)
    held.close()
    held = hold_data_dir(tmp_path)
    try:
        assert (tmp_path / UP_LOCK).read_text() == f"{os.getpid()}\n"
    finally:
        held.close()


def test_a_data_directory_that_takes_no_byte_more_is_named_when_it_is_held(tmp_path: Path) -> None:
    """A full disk: the lock file's pid could not be written, and `palette up` said "cannot write
    the output" (its terminal was fine). Here a file size limit of 0 refuses the write."""
    code = (f"import resource, sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom pathlib import Path\n"
            "from infra.stack import hold_data_dir\nfrom infra.supervisor import StackError\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            f"try:\n    hold_data_dir(Path({str(tmp_path)!r}))\nexcept StackError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout == f"data directory {tmp_path} is not writable: File too large\n", result.stderr


def test_a_ready_file_left_by_an_earlier_run_is_not_a_new_process_readiness(tmp_path: Path) -> None:
    """A process's ready file from before (a killed `palette up`, a crash) must not pass its
    readiness before the new process has warmed up."""
    from adapters.bootstrap import embedded_stack
    from adapters.settings import load_settings

    stack = embedded_stack(load_settings(data_dir=tmp_path))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "relay.ready").touch()
    spec = stack._app_spec("relay")
    assert not spec.ready()
    assert spec.argv[-2:] == ["--ready-file", str(tmp_path / "run" / "relay.ready")]
    assert spec.ready_file == tmp_path / "run" / "relay.ready"  # removed before each start (a restart's too)


@pytest.mark.parametrize(("status", "ready"), [(200, True), (204, False), (503, False)])
def test_the_apis_readiness_is_a_200_from_its_health_not_any_answer(tmp_path: Path, status: int,
                                                                     ready: bool) -> None:
    """/health answers 503 while a dependency is down: that API is not ready."""
    from adapters.bootstrap import embedded_stack
    from adapters.settings import load_settings

    class Health(_Healthy):
        def do_GET(self) -> None:
            self.send_response(status)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        stack = embedded_stack(load_settings(data_dir=tmp_path, api_port=server.server_address[1]))
        assert stack._api_ready() is ready
    finally:
        server.shutdown()
        server.server_close()


def test_starting_the_apis_on_a_taken_port_is_refused_before_the_database_is_prepared(tmp_path: Path) -> None:
    from adapters.settings import load_settings
    from infra.stack import EmbeddedStack

    prepared: list[int] = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = load_settings(data_dir=tmp_path, api_port=taken.getsockname()[1])
        stack = EmbeddedStack(settings, topics=(), prepare=lambda: prepared.append(1), app_argv=["false"])
        with pytest.raises(StackError, match=f"port {settings.api_port} is already in use"):
            stack.start_apps(("api",))
    assert prepared == [] and stack.supervisor.names() == []


@pytest.mark.parametrize(("run_as", "mode"), [(None, 0o700), ("postgres", 0o755)])
def test_a_data_dir_closed_to_others_is_opened_only_for_a_postgres_of_another_user(
        tmp_path: Path, run_as: str | None, mode: int) -> None:
    """Only root's PostgreSQL, run as the postgres user, must traverse the data directory. Every
    start made it 0755 whoever ran it, so a directory its owner had closed (chmod 700) was open
    again, and with it SeaweedFS's volumes (0644: every user's photos) and the logs."""
    from adapters.settings import load_settings
    from infra.stack import EmbeddedStack

    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    data_dir.chmod(0o700)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = load_settings(data_dir=data_dir, pg_port=taken.getsockname()[1])
        stack = EmbeddedStack(settings, topics=(), prepare=lambda: None, app_argv=["false"])
        stack._run_as = run_as
        with pytest.raises(StackError, match=f"port {settings.pg_port} is already in use"):
            stack.start_infra()
    assert data_dir.stat().st_mode & 0o777 == mode


def test_infrastructure_that_fails_to_start_stops_what_had_started(tmp_path: Path) -> None:
    """PostgreSQL up, SeaweedFS failing: `palette up` reports the failure with nothing left running
    (here stand-ins for both, on the stack's real ports check and supervisor)."""
    from adapters.bootstrap import embedded_stack
    from adapters.settings import load_settings

    ports = {k.removeprefix("PALETTE_").lower(): int(v) for k, v in _env_for(tmp_path, 25).items()
             if k.endswith("_PORT") and k != "PALETTE_METRICS_PORT"}
    stack = embedded_stack(load_settings(data_dir=tmp_path / "data", **ports))
    up = tmp_path / "pg-up"
    stand_in = f"import os, pathlib, time; pathlib.Path({str(up)!r}).write_text(str(os.getpid())); time.sleep(60)"
    stack._postgres_spec = lambda: ServiceSpec(  # type: ignore[method-assign]
        "postgres", [sys.executable, "-c", stand_in], ready=up.exists)
    stack._ensure_database = lambda: None  # type: ignore[method-assign]
    stack._weed_spec = lambda: ServiceSpec(  # type: ignore[method-assign]
        "s3", [sys.executable, "-c", "raise SystemExit('address already in use')"], ready=lambda: False)
    with pytest.raises(StackError, match="s3 exited during start-up: address already in use"):
        stack.start_infra()
    assert stack.supervisor.names() == []
    with pytest.raises(ProcessLookupError):  # the stand-in PostgreSQL was stopped
        os.kill(int(up.read_text()), 0)


def test_ctrl_c_while_starting_stops_what_started_at_once(tmp_path: Path) -> None:
    """A start-up waits up to a minute for each process: a Ctrl-C during it ends it there, rather
    than once every process is up (or, with a process that never gets ready, minutes later)."""
    errors = (tmp_path / "stderr").open("w+")  # a file, not a pipe no one reads while waiting below
    proc = subprocess.Popen([sys.executable, "-m", "adapters.cli", "up"], stdout=subprocess.PIPE,
                            stderr=errors, text=True, cwd=ROOT,
                            env={"PATH": "/usr/bin:/bin", **_env_for(tmp_path, 24)})
    assert proc.stdout is not None
    said = []
    try:
        # Until PostgreSQL is ready (SeaweedFS, the broker and the apps follow); palette up gives
        # up on a process that is not ready within its start-up timeout, ending this read.
        for line in proc.stdout:
            said.append(line)
            if line.startswith("[palette] postgres ready"):
                break
        pid = int(said[-1].rsplit("(pid ", 1)[1].rstrip(")\n"))
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        errors.seek(0)
        err = errors.read()
        errors.close()
    said.append(out)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "stopped while starting (SIGINT)" in out and " up in " not in "".join(said)
    with pytest.raises(ProcessLookupError):  # what had started was stopped
        os.kill(pid, 0)
