"""Starts processes in order, waits on real readiness checks, restarts crashed ones, stops in reverse."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import json
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1  # prctl(2)

START_ATTEMPTS = 3  # starts of a restartable service before `palette up` gives up on it
TAIL_LINE_CHARS = 300  # of a process's log line quoted in a StackError
TAIL_BYTES = 64 * 1024  # of a process's log read for that quote: its end, never the whole file
HEALTH_EVERY_S = 15.0  # between two health checks of one service (the first this long after its start)
HEALTH_FAILURES = 4  # checks failed in a row that restart a service: a minute of not doing its work
# A check failed while the service's processes used this share of a core since the failed check
# before it is not counted: it works, busy, not wedged (a store flooded with uploads, an API with more
# requests than it answers), and a restart would cut off all it is doing. Failing
# HEALTH_BUSY_FAILURES in a row, busy or not (a loop spinning for good), restarts it all the same.
HEALTH_BUSY_SHARE = 0.1
HEALTH_BUSY_FAILURES = 20  # five minutes
# SIGTERM to SIGKILL for a service restarted for its health: it is wedged (SeaweedFS ignored SIGTERM
# then), and the wait holds up `palette up`'s one loop (other restarts, Ctrl-C).
HEALTH_STOP_S = 5.0
LOG_MAX_BYTES = 64 * 2**20  # a process's log is rotated past this (PALETTE_LOG_MAX_BYTES) ...
LOG_KEEP = 3  # ... keeping this many rotated files, x.log.1 the newest (PALETTE_LOG_KEEP)
# The largest cap: past 2**63 the pump's read of a process's output (readline) failed, so nothing
# reached the log and the process blocked on its full pipe.
LOG_MAX_BYTES_MAX = 2**40
_DECORATION = re.compile(r"[\s|+^~-]*(\d+\s*-+[\s|+-]*)?")  # a traceback's rules and marks ("+---- 1 ----")


class StackError(RuntimeError):
    """A service could not be started; the message is one line for the operator."""


@dataclass
class ServiceSpec:
    """How to run one service and how to know it is ready."""

    name: str
    argv: list[str]
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    cwd: Path | None = None
    stop_signal: int = signal.SIGTERM
    ready_timeout_s: float = 60.0
    restart: bool = False  # application processes are restarted with backoff
    leaves: tuple[Path, ...] = ()  # Unix sockets it leaves behind: removed once it has stopped
    # The file its process makes once ready, when ``ready`` asks for one: removed before each start,
    # so that one a run made before it crashed while starting never passes for the next run's.
    ready_file: Path | None = None
    # Whether a running service still does its work (beyond its process being alive): failing
    # HEALTH_FAILURES checks in a row, HEALTH_EVERY_S apart, it is stopped and started again.
    healthy: Callable[[], bool] | None = None


def remove_left_sockets(paths: tuple[Path, ...]) -> None:
    """Remove what a stopped service left: only a socket this user owns that nobody listens on (a
    path another user's process left, a server that took the path since, anything else, is kept)."""
    for path in paths:
        with contextlib.suppress(OSError):
            st = path.lstat()
            if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid() and not _listened_on(path):
                path.unlink()


def _listened_on(path: Path) -> bool:
    """Whether a process accepts connections on the socket at ``path`` (another stack's server
    that took the path after ours died): only a refused connection means nobody does."""
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as e:
            return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    return True


IDS = ("request_id", "job_id", "user_id", "trace_id")


def _record(line: str) -> dict[str, object] | None:
    """A JSON log record (what `palette serve` writes: adapters.logs), or None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("msg"), str) else None


def readable(line: bytes) -> str:
    """A process's log line for the terminal: a JSON record (what `palette serve` writes) as
    ``LEVEL logger: msg ids``, its traceback indented below; any other line as it came."""
    text = line.decode(errors="replace")
    entry = _record(text)
    if entry is None:
        return text
    ids = " ".join(f"{k}={entry[k]}" for k in IDS if entry.get(k))
    level = str(entry.get("level", "")).upper()
    out = f"{level:<7} {entry.get('logger', '')}: {entry['msg']}{' ' + ids if ids else ''}\n"
    if entry.get("exc"):
        out += "".join(f"    {row}\n" for row in str(entry["exc"]).splitlines())
    return out


class ProcessLog:
    """One process's log file, rotated by size: a line that would take ``x.log`` past
    ``max_bytes`` goes to a new one, the old renamed ``x.log.1`` (``x.log.1`` to ``x.log.2``, ...,
    the one past ``keep`` dropped). Lines are written whole; every run of the process (a restart,
    a pump still draining the run before) writes through the one object, under its lock."""

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES, keep: int = LOG_KEEP) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._size = 0
        self._writers = 0
        self.dropped = 0  # lines that could not be written
        self._unsaid = 0  # of them, those the log does not say yet were lost (said before the next line)
        self._why = ""
        self._whole: int | None = None  # the length of whole lines before the write under way

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the file open while one pump writes (closed once the last of them is done)."""
        with self._lock:
            self._writers += 1
            if self._file is None:  # made now: a process that has said nothing yet has its log too
                with contextlib.suppress(OSError):  # else the first line meets it (and is dropped)
                    self._open()
        try:
            yield
        finally:
            with self._lock:
                self._writers -= 1
                if self._writers == 0 and self._file is not None:
                    with contextlib.suppress(OSError):  # a flush that fails: the disk is full
                        self._file.close()
                    self._file = None

    def write(self, line: bytes) -> None:
        """Append one line (at most ``max_bytes``: the pump reads no more at once), rotating first
        when it would not fit. Never raises: a line that cannot be written (a full disk, a log
        that cannot be opened) is counted in ``dropped`` and lost, as the pump must go on reading
        the process's output (a pump that stopped left the process blocked on a full pipe); the
        file is opened again for the next line, and a line before it says how many were lost."""
        with self._lock:
            self._whole = None
            try:
                if self._file is None:
                    self._open()
                if self._unsaid:
                    lines = "1 line" if self._unsaid == 1 else f"{self._unsaid} lines"
                    self._put(f"{lines} of output could not be written here ({self._why})\n".encode())
                    self._unsaid = 0
                self._put(line)
            except OSError as e:
                self.dropped += 1
                self._unsaid += 1
                self._why = f"{type(e).__name__}: {e.strerror or e}"  # the last refusal's
                if self._file is not None:
                    with contextlib.suppress(OSError):
                        self._file.close()
                    self._file = None
                if (whole := self._whole) is not None:  # a disk that filled mid-line took a piece
                    with contextlib.suppress(OSError):  # of it: cut off (shortening needs no space)
                        if self.path.stat().st_size > whole:
                            os.truncate(self.path, whole)

    def _put(self, data: bytes) -> None:
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        assert self._file is not None
        self._whole = self._size  # the file's length of whole lines, kept where a write fails
        self._file.write(data)
        self._file.flush()
        self._size += len(data)

    def _open(self) -> None:
        self._file = open(self.path, "ab")  # noqa: SIM115 - held across writes, closed by writing()
        self._size = self._file.tell()

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        try:
            for n in range(self.keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
            if self.keep:
                self.path.replace(self.path.with_name(f"{self.path.name}.1"))
            else:
                self.path.unlink()
        except OSError as e:
            # A rename refused (the directory made read-only, say): the file starts over in place,
            # its first line saying why. Going on into it held the disk the cap is for, and tried
            # the rotation again at every line; the process's output is never held up either way.
            self._file = open(self.path, "wb")  # noqa: SIM115 - held across writes, closed by writing()
            note = f"{self.path.name} was not rotated ({type(e).__name__}: {e.strerror or e}): started over\n"
            self._file.write(note.encode())
            self._size = len(note.encode())
            return
        self._drop_past_keep()
        self._open()

    def _drop_past_keep(self) -> None:
        """Delete ``x.log.N`` for every N past ``keep``: files a larger ``keep`` left (a lowered
        ``PALETTE_LOG_KEEP``), which the shift never reaches. One it cannot delete stays until
        the next rotation tries again."""
        prefix = f"{self.path.name}."
        with contextlib.suppress(OSError):
            for older in self.path.parent.glob(f"{glob.escape(prefix)}*"):
                n = older.name.removeprefix(prefix)
                # the names the shift makes only: "x.log.007" or "x.log.03" is someone else's
                if n.isascii() and n.isdigit() and n == str(int(n)) and int(n) > self.keep:
                    with contextlib.suppress(OSError):
                        older.unlink()


def tree_cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) process ``pid`` and its live descendants have used, from
    /proc; 0.0 for a process gone."""
    clock_ticks = os.sysconf("SC_CLK_TCK")
    used: dict[int, float] = {}
    children: dict[int, list[int]] = {}
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(path, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after the command's name, which may hold anything
        except (OSError, IndexError):  # gone meanwhile
            continue
        proc = int(path.split("/")[2])
        used[proc] = (int(fields[11]) + int(fields[12])) / clock_ticks  # utime, stime
        children.setdefault(int(fields[1]), []).append(proc)
    total, todo = 0.0, [pid] if pid in used else []
    while todo:
        proc = todo.pop()
        total += used.get(proc, 0.0)
        todo.extend(children.get(proc, ()))
    return total


def stop_with_parent(stop_signal: int, parent: int) -> None:
    """The kernel sends this process ``stop_signal`` when the process ``parent`` that started it
    dies, so nothing is orphaned; sent now if that parent is gone already (it died before the
    kernel was asked)."""
    with contextlib.suppress(OSError, AttributeError):  # prctl(2) is Linux's
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, stop_signal)
    if os.getppid() != parent:
        signal.raise_signal(stop_signal)


def _die_with_parent(stop_signal: int, parent: int) -> None:
    # Each its own stop signal: PostgreSQL's SIGTERM (a smart shutdown) waited on every client
    # session, and one left open (an operator's psql) kept it holding its port from the next `palette up`.
    stop_with_parent(stop_signal, parent)
    os.setpgrp()


class _Running:
    def __init__(self, spec: ServiceSpec, log: ProcessLog, echo: IO[str] | None) -> None:
        self.spec = spec
        self.log = log
        self.echo = echo
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.next_restart_at = 0.0
        self.started_at = 0.0
        self.next_health_at = 0.0
        self.failed_health = 0  # health checks failed in a row, busy or not
        self.failed_idle = 0  # of those, the ones failed while it was not busy
        self.failed_at: tuple[float, float] | None = None  # its last failed check's time and its processes' CPU
        self.probe_error = ""  # the last failure of its ready probe while starting, said at the timeout

    def start(self) -> None:
        remove_left_sockets(self.spec.leaves)  # what a run that died with its supervisor left
        if self.spec.ready_file is not None:
            self.spec.ready_file.unlink(missing_ok=True)
        env = {**os.environ, **self.spec.env}
        self.proc = subprocess.Popen(  # noqa: S603 - argv built from our own specs
            self.spec.argv,
            env=env,
            cwd=self.spec.cwd,
            user=self.spec.user,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=functools.partial(_die_with_parent, self.spec.stop_signal, os.getpid()),
        )
        self.started_at = time.monotonic()
        self.next_health_at, self.failed_health, self.failed_idle = self.started_at + HEALTH_EVERY_S, 0, 0
        self.failed_at = None
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        out = proc.stdout
        assert out is not None
        prefix = f"[{self.spec.name}] "
        # A line longer than the log's cap comes in pieces of the cap: no file could hold it whole.
        with self.log.writing():
            for line in iter(lambda: out.readline(self.log.max_bytes), b""):
                self.log.write(line)
                if self.echo is not None:
                    with contextlib.suppress(ValueError, OSError):
                        self.echo.write(prefix + readable(line))
                        self.echo.flush()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(self.spec.stop_signal)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        remove_left_sockets(self.spec.leaves)

    def tail(self, lines: int = 3) -> str:
        """The log's last lines for a one-line report, each cut to ``TAIL_LINE_CHARS``: a
        traceback's frames left out (what was raised stays), a JSON record as its message and the
        last line of its exception. Only the last ``TAIL_BYTES`` are read, from ``x.log.1`` too
        when ``x.log`` was just started."""
        text = _last_bytes(self.log.path, TAIL_BYTES).decode(errors="replace").strip().splitlines()
        said = [line for line in _without_frames(text) if line]
        return " | ".join(_cut(_readable_record(line)) for line in said[-lines:])


def _last_bytes(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes from the end of ``path`` and, if it holds fewer, of the file it was
    rotated from (``path.1``), starting at a line's start; b"" where there is neither."""
    got = b""
    for source in (path, path.with_name(f"{path.name}.1")):
        try:
            with open(source, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = max(0, size - (limit - len(got)))
                f.seek(start)
                part = f.read(limit - len(got))
        except FileNotFoundError:  # none now (its reopening after a rotation failed): the one before it
            continue
        except OSError:  # there but unreadable: what the file before it holds is older still
            break
        if start:
            part = part.partition(b"\n")[2]  # the first line, cut, is left out
        got = part + got
        if start or len(got) >= limit:
            break
    return got


def _without_frames(lines: list[str]) -> list[str]:
    """``lines`` less the frames of a Python traceback (an exception group's too: its lines come
    after "| "), each frame's source line and caret marks included; the rest stripped."""
    kept, in_frame = [], False
    for line in lines:
        bare = line.strip()
        if bare.startswith(("|", "+")):  # inside an exception group
            bare = bare.lstrip("|+- ")
        if bare.startswith('File "'):
            in_frame = True
            continue
        if in_frame and line.startswith("    ") and not line.lstrip().startswith("|"):
            continue  # the frame's source line, or its ^^^ marks
        in_frame = False
        if bare.endswith("Traceback (most recent call last):") or _DECORATION.fullmatch(bare):
            continue
        kept.append(bare)
    return kept


def _cut(line: str) -> str:
    return line if len(line) <= TAIL_LINE_CHARS else line[:TAIL_LINE_CHARS] + "…"


def _readable_record(line: str) -> str:
    """A JSON log record (adapters.logs) as its message, then its exception's last line."""
    record = _record(line)
    if record is None:
        return line
    exc = record.get("exc")
    last = next((x.strip() for x in reversed(exc.splitlines()) if x.strip()), "") if isinstance(exc, str) else ""
    return f"{record['msg']}: {last}" if last else str(record["msg"])


def _start_during_start_up(run: _Running) -> None:
    """Start ``run``; a start the system refuses (its program missing, not executable, no process
    left to fork) is a StackError naming the program, in one line."""
    spec = run.spec
    try:
        run.start()
    except FileNotFoundError:
        raise StackError(f"{spec.name}: program not found: {spec.argv[0]}") from None
    except (OSError, subprocess.SubprocessError) as e:
        raise StackError(f"{spec.name}: cannot run {spec.argv[0]}: {getattr(e, 'strerror', None) or e}") from None


class Supervisor:
    """Owns the processes of one stack. Not thread-safe: one owner drives it."""

    def __init__(self, log_dir: Path, echo: IO[str] | None = None, *,
                 log_max_bytes: int = LOG_MAX_BYTES, log_keep: int = LOG_KEEP) -> None:
        self.log_dir = log_dir
        self.echo = echo
        self.log_max_bytes = log_max_bytes
        self.log_keep = log_keep
        self._logs: dict[str, ProcessLog] = {}
        self._running: dict[str, _Running] = {}
        self._order: list[str] = []
        self.startup_s: dict[str, float] = {}

    def start(self, spec: ServiceSpec) -> None:
        """Start one service and block until its readiness check passes."""
        self.start_together([spec])

    def start_together(self, specs: list[ServiceSpec]) -> None:
        """Launch services that do not depend on each other at once, then wait for all of them."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        waiting = [self._launch(spec) for spec in specs]
        while waiting:
            for run in list(waiting):
                if self._ready(run, t0):
                    waiting.remove(run)
            if waiting:
                time.sleep(0.1)

    def _launch(self, spec: ServiceSpec) -> _Running:
        """Start ``spec``'s process, logging to its file (kept across restarts), and own it."""
        log = self._logs.get(spec.name)
        if log is None:
            log = self._logs[spec.name] = ProcessLog(self.log_dir / f"{spec.name}.log",
                                                      self.log_max_bytes, self.log_keep)
        run = _Running(spec, log, self.echo)
        _start_during_start_up(run)
        self._running[spec.name] = run
        self._order.append(spec.name)
        return run

    def _ready(self, run: _Running, t0: float) -> bool:
        """Whether ``run``'s own process answers its probe; raises StackError once it cannot be."""
        spec = run.spec
        if not run.alive():
            self._restart_during_start_up(run)
            return False
        # Ready means this child answers: a probe that passes while the child has died
        # was answered by someone else (a process already on its port), not by ours.
        if self._probe(run) and run.alive():
            self.startup_s[spec.name] = time.monotonic() - t0
            pid = run.proc.pid if run.proc else "?"
            self.say(f"{spec.name} ready in {self.startup_s[spec.name]:.1f}s (pid {pid})")
            return True
        if time.monotonic() > t0 + spec.ready_timeout_s:
            why = f"its last probe: {run.probe_error}" if run.probe_error else run.tail() or "no output"
            raise StackError(f"{spec.name} not ready after {spec.ready_timeout_s:.0f}s: {why}")
        return False

    def _restart_during_start_up(self, run: _Running) -> None:
        """An application process that crashes while starting (a dependency not yet answering, a
        fault it recovers from) gets the restarts it would get later, after the delay a crash later
        would wait (0.5 s, then 1 s); one that keeps crashing is reported with its last lines."""
        spec = run.spec
        if not (spec.restart and run.restarts < START_ATTEMPTS - 1):
            raise StackError(f"{spec.name} exited during start-up: {run.tail() or 'no output'}")
        now = time.monotonic()
        if run.next_restart_at == 0.0:
            delay = 0.5 * 2**run.restarts
            run.next_restart_at = now + delay
            self.say(f"{spec.name} exited during start-up; starting it again in {delay:.1f}s "
                     f"({run.restarts + 2}/{START_ATTEMPTS})")
        elif now >= run.next_restart_at:
            run.restarts += 1
            run.next_restart_at = 0.0
            _start_during_start_up(run)

    def pid(self, name: str) -> int | None:
        run = self._running.get(name)
        return run.proc.pid if run and run.proc and run.alive() else None

    def names(self) -> list[str]:
        return list(self._order)

    def stop(self, name: str) -> None:
        """Stop one service for good (no restart) until it is started again."""
        run = self._running.pop(name)
        self._order.remove(name)
        run.stop()

    def restart(self, name: str) -> None:
        """Stop and start one service again (used for the broker and by tests)."""
        run = self._running[name]
        run.stop()
        self._running.pop(name)
        self._order.remove(name)
        self.start(run.spec)

    def check(self) -> list[str]:
        """Restart crashed restartable services with exponential backoff, and those that failed
        their health check HEALTH_FAILURES times in a row; return the names restarted."""
        restarted = []
        now = time.monotonic()
        for name in self._order:
            run = self._running[name]
            if run.alive() and self._unhealthy(run, now):
                busy = ", busy" if run.failed_idle < HEALTH_FAILURES else ""
                self.say(f"{name} failed its health check {run.failed_health} times in a row{busy}; restarting")
                try:
                    run.stop(HEALTH_STOP_S)
                except subprocess.TimeoutExpired:  # not gone even killed: its next check tries again
                    self.say(f"{name} did not exit when killed; not started again yet")
                    continue
                if self._start_again(run):
                    restarted.append(name)
                continue
            if run.alive() or not run.spec.restart:
                continue
            if run.next_restart_at == 0.0:
                # Backoff doubles per crash, reset after a minute of healthy running.
                healthy_for = now - run.started_at
                if healthy_for > 60:
                    run.restarts = 0
                # 2**restarts capped: past 1,023 crashes (8.5 hours of them) it is too large for a float
                delay = min(30.0, 0.5 * 2 ** min(run.restarts, 6))
                run.next_restart_at = now + delay
                code = run.proc.returncode if run.proc else None
                self.say(f"{name} exited with {code}; restarting in {delay:.1f}s")
            elif now >= run.next_restart_at:
                run.restarts += 1
                run.next_restart_at = 0.0
                if self._start_again(run):
                    restarted.append(name)
        return restarted

    def _start_again(self, run: _Running) -> bool:
        """Start ``run`` again; False, said, where it cannot be (its program gone, no descriptor
        left): it is then down as after a crash, and tried again after the backoff, instead of the
        error leaving check() and ending `palette up` with every service unstopped."""
        try:
            run.start()
        except (OSError, subprocess.SubprocessError) as e:
            run.started_at = time.monotonic()  # not a healthy minute: the backoff grows
            self.say(f"{run.spec.name} could not be started: {type(e).__name__}: {getattr(e, 'strerror', None) or e}")
            return False
        return True

    @staticmethod
    def _probe(run: _Running) -> bool:
        """Whether ``run``'s service is ready. A probe that raises (the broker answering, then
        failing the topic set-up it is asked for) is not ready yet: it is asked again until the
        ready timeout, whose one-line StackError names its last error, instead of the error
        leaving the start-up with a traceback and every started service unstopped."""
        try:
            ready = run.spec.ready()
        except Exception as e:  # noqa: BLE001 - any failure of a probe is "not ready", said at the timeout
            run.probe_error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            return False
        run.probe_error = ""
        return ready

    @staticmethod
    def _unhealthy(run: _Running, now: float) -> bool:
        """Check ``run``'s health when due; whether it has now failed HEALTH_FAILURES in a row while
        not busy, or HEALTH_BUSY_FAILURES in all. Busy is measured from a failure to the next: the
        first of a run of failures counts (/proc is read only then, ~26 µs a process of the machine)."""
        if run.spec.healthy is None or not run.spec.restart or now < run.next_health_at:
            return False
        run.next_health_at = now + HEALTH_EVERY_S
        try:
            ok = run.spec.healthy()
        except Exception:  # noqa: BLE001 - a check that cannot be made is a failed one
            ok = False
        if ok:
            run.failed_health = run.failed_idle = 0
            run.failed_at = None
            return False
        cpu = tree_cpu_seconds(run.proc.pid) if run.proc is not None else 0.0
        busy = run.failed_at is not None and cpu - run.failed_at[1] >= HEALTH_BUSY_SHARE * (now - run.failed_at[0])
        run.failed_at = (now, cpu)
        run.failed_health += 1
        run.failed_idle += 0 if busy else 1
        return run.failed_idle >= HEALTH_FAILURES or run.failed_health >= HEALTH_BUSY_FAILURES

    def stop_all(self) -> None:
        for name in reversed(self._order):
            self.say(f"stopping {name}")
            try:
                self._running[name].stop()
            except subprocess.TimeoutExpired:  # in a wait no signal ends (a disk that hangs)
                self.say(f"{name} did not exit when killed; stopping the others")
        self._running.clear()
        self._order.clear()

    def say(self, msg: str) -> None:
        if self.echo is not None:
            with contextlib.suppress(ValueError, OSError):
                self.echo.write(f"[palette] {msg}\n")
                self.echo.flush()


def stop_strays(timeout_s: float = 10.0) -> list[int]:
    """Stop every child process of this one still running (SIGTERM, then SIGKILL after
    ``timeout_s``) and return their pids: one launched just as a signal unwound a start-up, before
    its supervisor had recorded it."""
    me = str(os.getpid())
    strays = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == me and fields[0] != "Z":  # state, then the parent's pid
            strays.append(int(entry.name))
    for pid in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for pid in strays:
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.05)
        if _running(pid):
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return strays


def _running(pid: int) -> bool:
    """Whether the child ``pid`` has not ended (reaping it if it has)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == 0


def bind_error(port: int, host: str = "127.0.0.1") -> OSError | None:
    """Why ``host:port`` cannot be bound now (None: it can), as the OS says it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e
    return None


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    return bind_error(port, host) is None
