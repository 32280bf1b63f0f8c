"""The supervisor's restarts (infra.supervisor): a crashed service comes back after a delay that
doubles per crash up to 30 s and starts again from 0.5 s after a minute of healthy running; one
not marked restartable stays down; a start-up is retried START_ATTEMPTS times in all, after 0.5 s then 1 s, and waits
ready_timeout_s, no longer, asking again a probe that raises; a service that ignores SIGTERM is killed; services
stop in reverse order.

The supervisor's clock is a stand-in moved by hand (its sleeps move it too), so that no test waits
out a backoff; the services are real child processes."""

from __future__ import annotations

import io
import itertools
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import infra.supervisor as supervisor_module
from infra.supervisor import HEALTH_EVERY_S, HEALTH_FAILURES, START_ATTEMPTS, ServiceSpec, StackError, Supervisor
from tests.waiting import wait_until


class Clock:
    """What the supervisor reads of the ``time`` module: monotonic() and sleep(), which moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(supervisor_module, "time", fake)
    return fake


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    sup = Supervisor(tmp_path / "logs", echo=io.StringIO())
    try:
        yield sup
    finally:
        sup.stop_all()


def said(sup: Supervisor) -> list[str]:
    assert isinstance(sup.echo, io.StringIO)
    return sup.echo.getvalue().splitlines()


def crashing_after(go: Path) -> list[str]:
    """A service that waits (alive, so its start-up passes) until ``go`` exists, then exits 3: its
    first run crashes when the test says, every restart at once."""
    return ["/bin/sh", "-c", f"while [ ! -e {go} ]; do sleep 0.02; done; exit 3"]


def test_a_crashed_service_is_restarted_after_a_delay_that_doubles_to_30_s_and_starts_over_after_a_healthy_minute(
        clock: Clock, supervisor: Supervisor, tmp_path: Path) -> None:
    go = tmp_path / "go"
    supervisor.start(ServiceSpec("svc", crashing_after(go), ready=lambda: True, restart=True))
    go.touch()

    def crashes_and_comes_back_after(delay: float) -> None:
        clock.now += 1.0  # it ran a second, less than the healthy minute, before it crashed
        wait_until(lambda: supervisor.pid("svc") is None, 30, "the service to exit")
        assert supervisor.check() == []  # the crash is seen, the restart scheduled
        assert said(supervisor)[-1] == f"[palette] svc exited with 3; restarting in {delay:.1f}s"
        clock.now += delay - 0.05
        assert supervisor.check() == []  # not before its delay
        clock.now += 0.05
        assert supervisor.check() == ["svc"]

    for delay in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0):
        crashes_and_comes_back_after(delay)
    clock.now += 61  # the last restart ran a minute before crashing: the backoff starts over
    crashes_and_comes_back_after(0.5)
    crashes_and_comes_back_after(1.0)


def test_a_service_crashing_for_hours_is_still_restarted_every_30_s(
        clock: Clock, supervisor: Supervisor, tmp_path: Path) -> None:
    """Its delay was 0.5 s * 2**crashes, capped after: past 1,023 crashes in a row (8.5 hours at
    30 s) 2**crashes was too large for a float, and the OverflowError ended `palette up`."""
    go = tmp_path / "go"
    supervisor.start(ServiceSpec("svc", crashing_after(go), ready=lambda: True, restart=True))
    go.touch()
    supervisor._running["svc"].restarts = 1100  # crashes since its last healthy minute
    wait_until(lambda: supervisor.pid("svc") is None, 30, "the service to exit")
    assert supervisor.check() == []
    assert said(supervisor)[-1] == "[palette] svc exited with 3; restarting in 30.0s"
    clock.now += 30
    assert supervisor.check() == ["svc"]


def test_a_service_failing_its_health_check_four_times_in_a_row_is_restarted_and_a_pass_starts_the_count_over(
        clock: Clock, supervisor: Supervisor) -> None:
    """Alive but not doing its work (SeaweedFS refusing every write minutes after its disk had room
    again): only a restart ended it, and the supervisor, which watched for exits, never made one."""
    answers, asked = iter([False, False, True, False, False, False, False]), []

    def healthy() -> bool:
        asked.append(clock.now)
        if len(asked) == 5:
            raise OSError("the check itself failed")  # counts as a failure
        return next(answers)

    supervisor.start(ServiceSpec("s3", ["/bin/sh", "-c", "sleep 60"], ready=lambda: True, restart=True,
                                 healthy=healthy))
    first = supervisor.pid("s3")
    assert supervisor.check() == [] and asked == []  # the first check HEALTH_EVERY_S after its start
    for _ in range(6):
        clock.now += HEALTH_EVERY_S
        assert supervisor.check() == []
        assert supervisor.check() == []  # one check each HEALTH_EVERY_S, however often check() runs
    clock.now += HEALTH_EVERY_S
    assert supervisor.check() == ["s3"]  # failed, failed, passed, then four failures in a row
    assert len(asked) == 7 and supervisor.pid("s3") not in (None, first)
    assert said(supervisor)[-1] == f"[palette] s3 failed its health check {HEALTH_FAILURES} times in a row; restarting"


def test_a_health_restart_whose_start_fails_is_retried_with_backoff_not_raised_out_of_check(
        clock: Clock, supervisor: Supervisor) -> None:
    """`palette up` calls check() in its loop outside any handler but StackError's: a restart whose
    start raised (the program gone, no file descriptor left) ended it with a traceback, nothing
    stopped in order. The failure is said, and the start tried again as after a crash."""
    spec = ServiceSpec("s3", ["/bin/sh", "-c", "sleep 60"], ready=lambda: True, restart=True,
                       healthy=lambda: False)
    supervisor.start(spec)
    spec.argv = ["/nonexistent/weed"]
    for _ in range(HEALTH_FAILURES - 1):
        clock.now += HEALTH_EVERY_S
        assert supervisor.check() == []
    clock.now += HEALTH_EVERY_S
    assert supervisor.check() == []  # stopped; its start refused, and said so
    assert said(supervisor)[-1].startswith("[palette] s3 could not be started: FileNotFoundError")
    assert supervisor.pid("s3") is None
    spec.argv = ["/bin/sh", "-c", "sleep 60"]
    assert supervisor.check() == []  # scheduled as a crash is
    assert said(supervisor)[-1].endswith("restarting in 0.5s")
    clock.now += 0.5
    assert supervisor.check() == ["s3"]
    assert supervisor.pid("s3") is not None


def test_a_health_restart_gives_a_service_ignoring_sigterm_health_stop_s_not_the_full_stop_timeout(
        clock: Clock, supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """SeaweedFS wedged after a full disk ignored SIGTERM: the restart waited 20 s in check(), in
    `palette up`'s one loop, with no other crash restarted and Ctrl-C unanswered meanwhile."""
    from infra.supervisor import HEALTH_STOP_S

    trapped = tmp_path / "trapped"  # SIGTERM ignored from here on (one sent before ended the shell)
    wedging = f"trap '' TERM; : > '{trapped}'; while :; do sleep 0.05; done"
    supervisor.start(ServiceSpec("s3", ["/bin/sh", "-c", wedging], ready=lambda: True, restart=True,
                                 healthy=lambda: False))
    wait_until(trapped.exists, timeout_s=30, what="the service to ignore SIGTERM")
    run = supervisor._running["s3"]
    wedged, stop, waits = run.proc, run.stop, []

    def timed_stop(timeout_s: float = 20.0) -> None:
        waits.append(timeout_s)
        stop(timeout_s)

    monkeypatch.setattr(run, "stop", timed_stop)
    for _ in range(HEALTH_FAILURES - 1):
        clock.now += HEALTH_EVERY_S
        assert supervisor.check() == []
    clock.now += HEALTH_EVERY_S
    assert supervisor.check() == ["s3"]
    assert waits == [HEALTH_STOP_S] and HEALTH_STOP_S < 20.0
    assert wedged is not None and wedged.returncode == -9  # SIGKILLed once its SIGTERM was ignored
    monkeypatch.undo()


def test_a_service_not_restartable_is_not_health_checked(clock: Clock, supervisor: Supervisor) -> None:
    asked: list[float] = []
    supervisor.start(ServiceSpec("once", ["/bin/sh", "-c", "sleep 60"], ready=lambda: True,
                                 healthy=lambda: bool(asked.append(clock.now))))
    for _ in range(HEALTH_FAILURES + 1):
        clock.now += HEALTH_EVERY_S
        assert supervisor.check() == []
    assert asked == []


def test_a_service_not_marked_restartable_stays_down(clock: Clock, supervisor: Supervisor, tmp_path: Path) -> None:
    go = tmp_path / "go"
    supervisor.start(ServiceSpec("once", crashing_after(go), ready=lambda: True, restart=False))
    go.touch()
    wait_until(lambda: supervisor.pid("once") is None, 30, "the service to exit")
    for _ in range(3):
        assert supervisor.check() == []
        clock.now += 120
    assert supervisor.pid("once") is None


def test_a_service_that_keeps_crashing_while_starting_is_started_start_attempts_times_then_reported(
        clock: Clock, supervisor: Supervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    starts = tmp_path / "starts"
    starts.mkdir()
    started_at: list[float] = []
    runs: list[supervisor_module._Running] = []
    start = supervisor_module._Running.start

    def noted_start(run: supervisor_module._Running) -> None:
        started_at.append(clock.now)
        runs.append(run)
        start(run)

    def not_ready() -> bool:  # asked while the child lives: it waits for its exit, so that the
        assert runs[-1].proc is not None  # stand-in clock does not race past it
        runs[-1].proc.wait(30)
        return False

    monkeypatch.setattr(supervisor_module._Running, "start", noted_start)
    argv = ["/bin/sh", "-c", f"mktemp -p {starts} start.XXXXXX >/dev/null; echo cannot start; exit 3"]
    with pytest.raises(StackError, match="svc exited during start-up: cannot start"):
        supervisor.start(ServiceSpec("svc", argv, ready=not_ready, restart=True))
    assert len(list(starts.iterdir())) == START_ATTEMPTS == 3
    # Each start after a crash waits the delay a later crash would (0.5 s, then 1 s), no longer
    # than one of the start-up's 0.1 s polls past it; the crash is seen by a poll too.
    gaps = [b - a for a, b in itertools.pairwise(started_at)]
    assert len(gaps) == 2
    assert 0.5 <= gaps[0] <= 0.5 + 0.1 + 0.1 + 1e-9
    assert 1.0 <= gaps[1] <= 1.0 + 0.1 + 0.1 + 1e-9
    assert [line for line in said(supervisor) if "during start-up" in line] == [
        "[palette] svc exited during start-up; starting it again in 0.5s (2/3)",
        "[palette] svc exited during start-up; starting it again in 1.0s (3/3)",
    ]


def test_a_probe_that_passes_once_the_child_has_died_was_answered_by_another_not_by_it(
        clock: Clock, supervisor: Supervisor) -> None:
    """A process already on the service's port answers its probe: the child that exited is not ready."""
    def answered_after_its_exit() -> bool:
        run = supervisor._running["svc"]
        assert run.proc is not None
        run.proc.wait(30)
        return True

    with pytest.raises(StackError, match=r"^svc exited during start-up: "):
        supervisor.start(ServiceSpec("svc", ["/bin/sh", "-c", "exit 1"], ready=answered_after_its_exit))
    assert "svc" not in supervisor.startup_s


def test_a_program_that_is_missing_or_not_executable_is_refused_in_one_line_naming_it(
        supervisor: Supervisor, tmp_path: Path) -> None:
    missing, plain = tmp_path / "missing", tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    with pytest.raises(StackError, match=f"^svc: program not found: {re.escape(str(missing))}$"):
        supervisor.start(ServiceSpec("svc", [str(missing)], ready=lambda: True))
    with pytest.raises(StackError, match=f"^svc: cannot run {re.escape(str(plain))}: Permission denied$"):
        supervisor.start(ServiceSpec("svc", [str(plain)], ready=lambda: True))
    assert supervisor.names() == []


def test_a_program_the_system_cannot_execute_is_refused_in_one_line_naming_it(
        supervisor: Supervisor, tmp_path: Path) -> None:
    """An executable file in no format the kernel runs (no #! line): an OSError of no file the CLI
    names, which left `palette up` with a traceback."""
    garbled = tmp_path / "garbled"
    garbled.write_text("not a program\n")
    garbled.chmod(0o755)
    with pytest.raises(StackError, match=f"^svc: cannot run {re.escape(str(garbled))}: Exec format error$"):
        supervisor.start(ServiceSpec("svc", [str(garbled)], ready=lambda: True))
    assert supervisor.names() == []


def test_a_program_that_cannot_be_run_again_after_a_crash_while_starting_is_refused_in_one_line(
        clock: Clock, supervisor: Supervisor, tmp_path: Path) -> None:
    """Its first run crashed while starting and left its program unrunnable (a reinstall cut
    short): the restart's refusal is said as the first start's is, not raised as an OSError."""
    program = tmp_path / "program"
    program.write_text("#!/bin/sh\nprintf 'not a program\\n' > \"$0\"\nexit 3\n")
    program.chmod(0o755)

    def not_ready() -> bool:  # once its child has exited: the stand-in clock must not race past it
        run = supervisor._running["svc"]
        assert run.proc is not None
        run.proc.wait(30)
        return False

    with pytest.raises(StackError, match=f"^svc: cannot run {re.escape(str(program))}: Exec format error$"):
        supervisor.start(ServiceSpec("svc", [str(program)], ready=not_ready, restart=True))
    assert program.read_text() == "not a program\n"


def test_a_ready_file_left_by_a_run_that_crashed_while_starting_is_not_the_next_runs_readiness(
        clock: Clock, supervisor: Supervisor, tmp_path: Path) -> None:
    """A worker that made its ready file and crashed before the next poll (its first step failing)
    is started again: that file must not pass the new run, which has not warmed up, for ready."""
    ready_file, crashed = tmp_path / "svc.ready", tmp_path / "crashed"
    argv = ["/bin/sh", "-c", f"[ -e {crashed} ] && exec sleep 30; touch {crashed} {ready_file}; exit 3"]

    def ready() -> bool:
        run = supervisor._running["svc"]
        if run.restarts == 0:  # the first run: seen once it has made its file and exited
            assert run.proc is not None
            run.proc.wait(30)
        return ready_file.exists()

    with pytest.raises(StackError, match=r"^svc not ready after 5s"):
        supervisor.start(ServiceSpec("svc", argv, ready=ready, restart=True, ready_timeout_s=5,
                                     ready_file=ready_file))
    assert crashed.exists()


def test_a_start_up_waits_its_ready_timeout_and_no_longer(clock: Clock, supervisor: Supervisor) -> None:
    began = clock.now
    spec = ServiceSpec("slow", [sys.executable, "-c", "import time; time.sleep(60)"], ready=lambda: False,
                       ready_timeout_s=5)
    with pytest.raises(StackError, match="slow not ready after 5s"):
        supervisor.start(spec)
    assert 5 <= clock.now - began <= 5.5


def test_a_ready_probe_that_raises_is_not_ready_yet_and_is_asked_again(clock: Clock, supervisor: Supervisor) -> None:
    """The broker's probe sets up its topics once it answers: a failure there (a topic-creation
    race, a timeout) used to leave the start-up as a traceback, every service left unstopped."""
    answers = iter([ConnectionError("refused"), TimeoutError("CreateTopics timed out"), True])

    def probe() -> bool:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    supervisor.start(ServiceSpec("broker", [sys.executable, "-c", "import time; time.sleep(60)"], ready=probe))
    assert supervisor.pid("broker") is not None
    assert any(line.startswith("[palette] broker ready in") for line in said(supervisor))


def test_a_ready_probe_that_keeps_raising_is_reported_in_one_line_at_the_timeout(
        clock: Clock, supervisor: Supervisor) -> None:
    def probe() -> bool:
        raise TimeoutError("CreateTopics timed out\nsecond line")

    spec = ServiceSpec("broker", [sys.executable, "-c", "import time; time.sleep(60)"], ready=probe,
                       ready_timeout_s=5)
    with pytest.raises(StackError) as caught:
        supervisor.start(spec)
    assert str(caught.value) == "broker not ready after 5s: its last probe: TimeoutError: CreateTopics timed out"


def test_a_service_that_ignores_sigterm_is_killed_when_its_stop_times_out(supervisor: Supervisor,
                                                                          tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = (f"import pathlib, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"pathlib.Path({str(ready)!r}).touch()\ntime.sleep(60)\n")
    supervisor.start(ServiceSpec("stubborn", [sys.executable, "-c", code], ready=ready.exists))
    run = supervisor._running["stubborn"]
    assert run.proc is not None
    run.stop(timeout_s=0.5)
    assert run.proc.returncode == -9  # SIGKILL, after SIGTERM was ignored


def test_services_stop_in_the_reverse_order_of_their_start(supervisor: Supervisor, tmp_path: Path) -> None:
    for name in ("postgres", "broker", "api"):
        supervisor.start(ServiceSpec(name, [sys.executable, "-c", "import time; time.sleep(60)"], ready=lambda: True))
    supervisor.stop_all()
    stopping = [m.group(1) for line in said(supervisor) if (m := re.fullmatch(r"\[palette\] stopping (\w+)", line))]
    assert stopping == ["api", "broker", "postgres"]


def test_a_service_not_gone_even_killed_does_not_keep_the_others_running_at_stop_all(
        supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """One stuck in the kernel outlives SIGKILL's wait: its TimeoutExpired left stop_all, the
    services started before it were never stopped and `palette up` ended on a traceback."""
    import subprocess

    for name in ("postgres", "s3", "api"):
        supervisor.start(ServiceSpec(name, [sys.executable, "-c", "import time; time.sleep(60)"], ready=lambda: True))
    running = dict(supervisor._running)

    def stuck(timeout_s: float = 20.0) -> None:
        raise subprocess.TimeoutExpired("weed", 5)

    monkeypatch.setattr(running["s3"], "stop", stuck)
    supervisor.stop_all()
    assert "[palette] s3 did not exit when killed; stopping the others" in said(supervisor)
    assert not running["postgres"].alive() and not running["api"].alive()
    monkeypatch.undo()
    running["s3"].stop()


def test_a_health_restart_of_a_process_not_gone_even_killed_is_said_and_left_to_its_next_check(
        clock: Clock, supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """One stuck in the kernel (a disk that hangs) outlives SIGKILL's 5 s wait: the TimeoutExpired
    left check(), and `palette up` with it. It is not started beside itself (its ports are held)."""
    import subprocess

    supervisor.start(ServiceSpec("s3", ["/bin/sh", "-c", "sleep 60"], ready=lambda: True, restart=True,
                                 healthy=lambda: False))
    first = supervisor.pid("s3")

    def stuck(timeout_s: float = 20.0) -> None:
        raise subprocess.TimeoutExpired("weed", 5)

    monkeypatch.setattr(supervisor._running["s3"], "stop", stuck)
    for _ in range(HEALTH_FAILURES):
        clock.now += HEALTH_EVERY_S
        assert supervisor.check() == []
    assert said(supervisor)[-1] == "[palette] s3 did not exit when killed; not started again yet"
    assert supervisor.pid("s3") == first
    monkeypatch.undo()


def test_a_service_failing_its_checks_while_busy_is_given_time_and_one_idle_is_not(
        clock: Clock, supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that does not answer but works is busy, not wedged: SeaweedFS under 64 uploads of
    20 MB at once answered its probe in 2 to 9 s, and the supervisor restarted it, cutting off
    every upload (106 failed). A failed check counts only when the service's processes used under
    HEALTH_BUSY_SHARE of a core since the check before; one failing that long while busy (a loop
    spinning for good) is restarted all the same after HEALTH_BUSY_FAILURES."""
    from infra.supervisor import HEALTH_BUSY_FAILURES, HEALTH_BUSY_SHARE

    used = {"cpu": 0.0}
    monkeypatch.setattr(supervisor_module, "tree_cpu_seconds", lambda pid: used["cpu"])
    supervisor.start(ServiceSpec("s3", ["/bin/sh", "-c", "sleep 60"], ready=lambda: True, restart=True,
                                 healthy=lambda: False))
    first = supervisor.pid("s3")
    share = HEALTH_BUSY_SHARE * 1.01
    for _ in range(HEALTH_BUSY_FAILURES - 1):  # busy all along: each failure excused, to a limit
        clock.now += HEALTH_EVERY_S
        used["cpu"] += share * HEALTH_EVERY_S
        assert supervisor.check() == []
    clock.now += HEALTH_EVERY_S
    used["cpu"] += share * HEALTH_EVERY_S
    assert supervisor.check() == ["s3"]
    assert said(supervisor)[-1] == (f"[palette] s3 failed its health check {HEALTH_BUSY_FAILURES} times in a row, "
                                    "busy; restarting")
    second = supervisor.pid("s3")
    assert second not in (None, first)
    for _ in range(HEALTH_FAILURES - 1):  # idle: under the share, each failure counts
        clock.now += HEALTH_EVERY_S
        used["cpu"] += HEALTH_BUSY_SHARE * 0.99 * HEALTH_EVERY_S
        assert supervisor.check() == []
    clock.now += HEALTH_EVERY_S
    assert supervisor.check() == ["s3"]
    assert supervisor.pid("s3") not in (None, second)


def test_busy_checks_between_idle_ones_neither_count_nor_start_the_count_over(
        clock: Clock, supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.supervisor import HEALTH_BUSY_SHARE

    used = {"cpu": 0.0}
    monkeypatch.setattr(supervisor_module, "tree_cpu_seconds", lambda pid: used["cpu"])
    supervisor.start(ServiceSpec("s3", ["/bin/sh", "-c", "sleep 60"], ready=lambda: True, restart=True,
                                 healthy=lambda: False))
    for busy in [False, True, False, True, False]:
        clock.now += HEALTH_EVERY_S
        used["cpu"] += (2 * HEALTH_BUSY_SHARE if busy else 0) * HEALTH_EVERY_S
        assert supervisor.check() == []
    clock.now += HEALTH_EVERY_S  # the fourth idle failure of the streak
    assert supervisor.check() == ["s3"]


def test_the_cpu_of_a_service_is_its_processes_and_their_live_children() -> None:
    """Read from /proc: a shell whose child spins uses CPU; one whose child sleeps does not."""
    import os
    import signal
    import subprocess

    from infra.supervisor import tree_cpu_seconds

    spinning = subprocess.Popen(["/bin/sh", "-c", "sh -c 'while :; do :; done' & wait"], start_new_session=True)
    sleeping = subprocess.Popen(["/bin/sh", "-c", "sleep 60 & wait"], start_new_session=True)
    try:
        before = tree_cpu_seconds(spinning.pid), tree_cpu_seconds(sleeping.pid)
        wait_until(lambda: tree_cpu_seconds(spinning.pid) - before[0] >= 0.3, 30, "the child's CPU counted")
        assert tree_cpu_seconds(sleeping.pid) - before[1] < 0.1
    finally:
        for proc in (spinning, sleeping):
            os.killpg(proc.pid, signal.SIGKILL)  # the shell and its child
            proc.wait()
    assert tree_cpu_seconds(spinning.pid) == 0.0  # gone: nothing to read
