"""`palette up` stopped by a signal while it starts (adapters/cli/stack.py): what it launched is
stopped, even a process launched as the signal came, and a start that was already failing says
why; a fault of ours while starting stops what started too, then raises. Each case runs
`_cmd_up` in a process of its own (it installs signal handlers), with a stand-in stack of
throwaway processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SETUP = """
import argparse, json, os, signal, subprocess, sys
sys.path.insert(0, {root!r})
os.environ["PALETTE_DATA_DIR"] = {data!r}
import adapters.bootstrap as bootstrap
import adapters.cli.stack as cli
import infra.supervisor as supervisor
from infra.supervisor import ServiceSpec, StackError, Supervisor
cli._check_ports = lambda *a, **k: None

class Stack:
    def __init__(self):
        self.supervisor = Supervisor(__import__("pathlib").Path({data!r}) / "logs")
    def start_apps(self, apps): pass
    def watch_disks(self): pass
    def stop(self): self.supervisor.stop_all()
"""


# What a case puts in place of the supervisor's Popen: each launch's pid kept, and with
# SIGNAL_AT_LAUNCH, a Ctrl-C right after the fork.
RECORD_LAUNCHES = """launched = {}
class Popen(subprocess.Popen):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        launched["pid"] = self.pid
        if SIGNAL_AT_LAUNCH:
            os.kill(os.getpid(), signal.SIGINT)
supervisor.subprocess.Popen = Popen
"""


def run_up(tmp_path: Path, body: str, apps: tuple[str, ...] = ("relay",)) -> dict[str, object]:
    code = SETUP.format(root=str(ROOT), data=str(tmp_path / "data")) + body + f"""
bootstrap.embedded_stack = lambda settings, echo=None: Stack()
rc = cli._cmd_up(argparse.Namespace(apps={list(apps)!r}, external=False))""" + """
pid = launched.get("pid")
# Asked before this process exits: its exit would end a child left running anyway (parent-death signal).
stat = f"/proc/{pid}/stat"
alive = pid is not None and os.path.exists(stat) and open(stat).read().rsplit(")", 1)[1].split()[0] != "Z"
print(json.dumps({"rc": rc, "launched_alive": alive}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "stdout": result.stdout, "stderr": result.stderr}


def test_a_process_launched_as_the_signal_came_is_stopped_too(tmp_path: Path) -> None:
    """The signal lands right after the fork, before the supervisor has recorded the process."""
    outcome = run_up(tmp_path, "SIGNAL_AT_LAUNCH = True\n" + RECORD_LAUNCHES + """
Stack.start_infra = lambda self: self.supervisor.start(ServiceSpec("svc", ["sleep", "300"], ready=lambda: False))
""")
    assert outcome["rc"] == 130 and "stopped while starting (SIGINT)" in str(outcome["stdout"])
    assert outcome["launched_alive"] is False


def test_a_signal_while_a_failed_start_stops_still_says_why_it_failed(tmp_path: Path) -> None:
    outcome = run_up(tmp_path, """
launched = {}
def start_infra(self):
    try:
        # Stopped, it presses Ctrl-C on palette up, then takes its time: the signal comes mid-stop.
        stopping = "trap 'kill -INT $PPID; sleep 1; exit 0' INT; sleep 100 & wait; wait"
        self.supervisor.start(ServiceSpec("slow", ["bash", "-c", stopping], ready=lambda: True,
                                          stop_signal=signal.SIGINT))
        raise StackError("cannot create the database palette: disk full")
    except BaseException:
        self.supervisor.stop_all()
        raise
Stack.start_infra = start_infra
""")
    assert outcome["rc"] == 1
    assert outcome["stderr"] == "palette up: cannot create the database palette: disk full\n"


@pytest.mark.parametrize(("interval", "apps"), [("0", ["relay"]), ("60", ["relay", "checkpointer"])])
def test_up_starts_the_checkpointer_only_when_checkpoints_are_scheduled(tmp_path: Path, interval: str,
                                                                        apps: list[str]) -> None:
    """Without PALETTE_AUDIT_CHECKPOINT_INTERVAL_S there may be no signing key either: a
    checkpointer started anyway would exit at once and fail the whole start-up."""
    outcome = run_up(tmp_path, f"""
launched = {{}}
os.environ["PALETTE_AUDIT_CHECKPOINT_INTERVAL_S"] = {interval!r}
Stack.start_infra = lambda self: None
def start_apps(self, apps):
    print(json.dumps({{"apps": list(apps)}}))
    raise StackError("enough")
Stack.start_apps = start_apps
""")
    assert outcome["rc"] == 1
    assert json.loads(str(outcome["stdout"]).splitlines()[0]) == {"apps": apps}


def test_up_without_the_api_does_not_say_the_api_is_on_its_port(tmp_path: Path) -> None:
    """`palette up --apps relay` started no API, and said "API on http://127.0.0.1:8000"."""
    outcome = run_up(tmp_path, """
launched = {}
Stack.start_infra = lambda self: None
Supervisor.check = lambda self: os.kill(os.getpid(), signal.SIGTERM)  # up, then told to stop
""")
    assert outcome["rc"] == 0
    said = [line for line in str(outcome["stdout"]).splitlines() if " up in " in line]
    assert len(said) == 1 and ": relay, no API (data and logs in " in said[0] and "API on" not in said[0]


def test_an_app_named_twice_is_started_once_and_stopped(tmp_path: Path) -> None:
    """`palette up --apps relay relay` started two relays under one name: the supervisor kept the
    second, and the first was never stopped (left to the parent-death signal)."""
    outcome = run_up(tmp_path, """
launched = {}
class Popen(subprocess.Popen):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        launched.setdefault("pid", self.pid)  # the first
        print(json.dumps({"launched": self.pid}), flush=True)
supervisor.subprocess.Popen = Popen
Stack.start_infra = lambda self: None
Stack.start_apps = lambda self, apps: self.supervisor.start_together(
    [ServiceSpec(a, ["sleep", "300"], ready=lambda: True) for a in apps])
Supervisor.check = lambda self: os.kill(os.getpid(), signal.SIGTERM)  # up, then told to stop
""", apps=("relay", "relay"))
    assert outcome["rc"] == 0 and outcome["launched_alive"] is False
    assert str(outcome["stdout"]).count('"launched"') == 1


def test_a_hangup_stops_the_stack_as_ctrl_c_does(tmp_path: Path) -> None:
    """The terminal of `make run` closed (an ssh session dropped): SIGHUP killed `palette up` on the
    spot, its processes left to the parent-death signal all at once, not stopped in reverse order,
    and what they leave behind (SeaweedFS's gRPC sockets in /tmp) left there."""
    outcome = run_up(tmp_path, """
launched = {}
Stack.start_infra = lambda self: None
Supervisor.check = lambda self: os.kill(os.getpid(), signal.SIGHUP)  # up, then its terminal gone
""")
    assert outcome["rc"] == 0
    assert str(outcome["stdout"]).splitlines()[-2] == "[palette] stopped"


def test_a_hangup_ignored_by_whoever_started_it_stays_ignored(tmp_path: Path) -> None:
    """`nohup make run &`: the stack is to outlive the terminal, as it did before SIGHUP stopped it."""
    outcome = run_up(tmp_path, """
launched = {}
signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup hands down
Stack.start_infra = lambda self: None
checks = []
def check(self):
    checks.append(1)
    if len(checks) == 1:
        os.kill(os.getpid(), signal.SIGHUP)
    else:
        print("still up", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
Supervisor.check = check
""")
    assert outcome["rc"] == 0 and "still up" in str(outcome["stdout"])


def test_a_fault_of_ours_while_starting_stops_what_started_before_its_traceback(tmp_path: Path) -> None:
    """Only a StackError used to stop the started services in order; any other exception left
    them to the parent-death signal, all at once."""
    outcome = run_up(tmp_path, "SIGNAL_AT_LAUNCH = False\n" + RECORD_LAUNCHES + """
Stack.start_infra = lambda self: self.supervisor.start(ServiceSpec("svc", ["sleep", "300"], ready=lambda: True))
def start_apps(self, apps):
    raise ValueError("a bug of ours")
Stack.start_apps = start_apps
up = cli._cmd_up
def guarded(args):
    try:
        return up(args)
    except ValueError as e:
        print(f"raised: {e}")
        return 99
cli._cmd_up = guarded
""")
    assert outcome["rc"] == 99 and "raised: a bug of ours" in str(outcome["stdout"])
    assert outcome["launched_alive"] is False
