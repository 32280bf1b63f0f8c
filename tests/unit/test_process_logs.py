"""The processes' logs under the data directory's logs/ (infra.supervisor): rotated past their cap,
keeping PALETTE_LOG_KEEP files, each line whole and none lost but what falls off the oldest; a
start-up failure quotes the log's end, read without reading the file; httpx's line per request is
not logged (adapters.logs)."""

from __future__ import annotations

import builtins
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.supervisor import TAIL_BYTES, ProcessLog, ServiceSpec, StackError, Supervisor, _last_bytes
from tests.waiting import wait_until

LINE = re.compile(rb"line (\d{5}) x{36}\n")  # 48 bytes: a cap of 1000 holds 20, leaving 40 over


def _line(number: int) -> bytes:
    """The numbered line LINE reads (what ``_printing``'s service writes)."""
    return b"line %05d " % number + b"x" * 36 + b"\n"


def _printing(count: int) -> list[str]:
    """A service that writes ``count`` numbered lines, then waits to be stopped."""
    code = ("import sys, time\n"
            f"for i in range({count}):\n"
            "    sys.stdout.write(f'line {i:05d} ' + 'x' * 36 + '\\n')\n"
            "sys.stdout.flush()\n"
            "time.sleep(60)\n")
    return [sys.executable, "-c", code]


def _written(path: Path) -> bytes:
    """What the log holds so far (the pump opens it in a thread of its own: maybe not yet)."""
    return path.read_bytes() if path.exists() else b""


class Disk:
    """The files ``open`` makes from now on, on a disk that refuses every write while ``full``
    (taking the first half of each one first when ``takes_half``: a disk that fills mid-line)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, takes_half: bool = False) -> None:
        self.full = False
        self.takes_half = takes_half
        real_open = builtins.open
        monkeypatch.setattr(builtins, "open", lambda *a, **k: _OnDisk(self, real_open(*a, **k)))


class _OnDisk:
    def __init__(self, disk: Disk, f: Any) -> None:
        self.disk = disk
        self.f = f

    def write(self, data: bytes) -> int:
        if self.disk.full:
            if self.disk.takes_half:
                self.f.write(data[: len(data) // 2])
                self.f.flush()
            raise OSError(28, "No space left on device")
        written: int = self.f.write(data)
        return written

    def __getattr__(self, name: str) -> object:
        return getattr(self.f, name)


def _numbers(path: Path) -> list[int]:
    """The numbers of a log's lines, each checked whole."""
    numbers = []
    for line in path.read_bytes().splitlines(keepends=True):
        whole = LINE.fullmatch(line)
        assert whole, f"a line cut or mangled in {path.name}: {line!r}"
        numbers.append(int(whole.group(1)))
    return numbers


def test_a_process_log_past_its_cap_is_rotated_keeping_the_newest_lines_whole_and_dropping_the_oldest(
        tmp_path: Path) -> None:
    cap, keep, count = 1000, 2, 84  # four caps' worth of lines through the pump, room for three
    logs = tmp_path / "logs"
    supervisor = Supervisor(logs, log_max_bytes=cap, log_keep=keep)
    try:
        supervisor.start(ServiceSpec("svc", _printing(count), ready=lambda: True))
        last = f"line {count - 1:05d}".encode()
        wait_until(lambda: last in _written(logs / "svc.log"), 30, "the last line in svc.log")
    finally:
        supervisor.stop_all()

    assert sorted(p.name for p in logs.iterdir()) == ["svc.log", "svc.log.1", "svc.log.2"]
    files = [logs / "svc.log.2", logs / "svc.log.1", logs / "svc.log"]  # oldest first
    assert all(0 < f.stat().st_size <= cap for f in files)
    assert sum(f.stat().st_size for f in files) <= cap * (keep + 1)
    kept = [n for f in files for n in _numbers(f)]
    # The newest lines, in order and none missing; the oldest fell off svc.log.2.
    assert kept == list(range(count - len(kept), count))
    assert kept[0] > 0 and _numbers(logs / "svc.log")[-1] == count - 1


def test_a_log_left_past_the_cap_by_an_earlier_run_is_kept_whole_as_the_newest_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "api.log"
    earlier = b"".join(_line(i) for i in range(100))  # 4,800 bytes
    path.write_bytes(earlier)
    (tmp_path / "api.log.1").write_bytes(b"older\n")
    log = ProcessLog(path, max_bytes=1000, keep=1)
    with log.writing():
        log.write(_line(100))
    assert (tmp_path / "api.log.1").read_bytes() == earlier  # the run before's, whole; "older" dropped
    assert _numbers(path) == [100]
    assert not (tmp_path / "api.log.2").exists()


def test_a_line_longer_than_the_cap_is_written_in_pieces_of_the_cap_no_file_past_it(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    supervisor = Supervisor(logs, log_max_bytes=4096, log_keep=3)
    code = "import sys, time; sys.stdout.write('y' * 10000 + '\\nend\\n'); sys.stdout.flush(); time.sleep(60)"
    try:
        supervisor.start(ServiceSpec("svc", [sys.executable, "-c", code], ready=lambda: True))
        wait_until(lambda: _written(logs / "svc.log").endswith(b"end\n"), 30, "the last line in svc.log")
    finally:
        supervisor.stop_all()
    assert sorted(p.name for p in logs.iterdir()) == ["svc.log", "svc.log.1", "svc.log.2"]
    assert [(logs / name).read_bytes() for name in ("svc.log.2", "svc.log.1", "svc.log")] == [
        b"y" * 4096, b"y" * 4096, b"y" * (10000 - 8192) + b"\nend\n"]


def _bytes_read() -> int:
    """What this process has read through read(2) and the like so far (Linux's rchar)."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")).split()[1])


def test_a_start_up_failure_quotes_the_end_of_a_large_log_reading_only_that_end(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    big = 50 * 2**20
    with open(logs / "svc.log", "wb") as f:
        f.write(b"an early line that is no part of the report\n")
        f.truncate(big)  # sparse: 50 MB that cost no disk
        f.seek(big)
        f.write(b"\nstarting\nRuntimeError: the disk is on fire\n")
    supervisor = Supervisor(logs)
    before = _bytes_read()
    try:
        with pytest.raises(StackError) as raised:
            supervisor.start(ServiceSpec("svc", ["/bin/sh", "-c", "exit 3"], ready=lambda: False))
    finally:
        supervisor.stop_all()
    read = _bytes_read() - before
    assert read < 4 * TAIL_BYTES, f"read {read} bytes of a {big}-byte log for its last lines"
    assert str(raised.value) == "svc exited during start-up: starting | RuntimeError: the disk is on fire"


def test_a_log_just_rotated_is_quoted_with_the_end_of_the_file_before_it(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "svc.log.1").write_bytes(b"x" * (3 * TAIL_BYTES) + b"\nreading the settings\n")
    (logs / "svc.log").write_bytes(b"ValueError: bad setting\n")
    supervisor = Supervisor(logs)
    try:
        with pytest.raises(StackError, match=r"start-up: reading the settings \| ValueError: bad setting$"):
            supervisor.start(ServiceSpec("svc", ["/bin/sh", "-c", "exit 3"], ready=lambda: False))
    finally:
        supervisor.stop_all()


def test_a_log_missing_since_its_rotation_is_quoted_from_the_file_it_was_rotated_to(tmp_path: Path) -> None:
    """x.log renamed x.log.1 and not made again (its reopening refused): the quote read x.log,
    found nothing and stopped, though x.log.1 held the process's last lines."""
    (tmp_path / "svc.log.1").write_bytes(b"reading the settings\nValueError: bad setting\n")
    assert _last_bytes(tmp_path / "svc.log", TAIL_BYTES) == b"reading the settings\nValueError: bad setting\n"
    assert _last_bytes(tmp_path / "gone.log", TAIL_BYTES) == b""
    (tmp_path / "odd.log").mkdir()  # there, but no file to read: its older lines are not its end
    (tmp_path / "odd.log.1").write_bytes(b"an older run\n")
    assert _last_bytes(tmp_path / "odd.log", TAIL_BYTES) == b""


def test_httpx_and_httpcore_log_no_line_per_request() -> None:
    """A process configured as `palette serve` configures it (the GPU worker posts a callback per
    item with httpx, and logs each itself): httpx's INFO line for each request is dropped."""
    code = ("import logging, httpx\n"
            "from adapters.logs import configure\n"
            "configure('gpu')\n"
            "client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200)))\n"
            "client.post('http://127.0.0.1:8000/internal/callbacks', json={})\n"
            "logging.getLogger('palette.gpu').info('item done')\n"
            "print(logging.getLogger('httpx').getEffectiveLevel(), "
            "logging.getLogger('httpcore.connection').getEffectiveLevel())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2], check=True)
    assert [json.loads(line)["msg"] for line in done.stderr.splitlines()] == ["item done"]
    assert done.stdout.split() == ["30", "30"]  # WARNING


def test_the_log_settings_reach_the_stacks_supervisor_and_a_cap_below_4_kib_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapters.bootstrap import embedded_stack
    from adapters.settings import SettingsError, load_settings

    monkeypatch.setenv("PALETTE_LOG_MAX_BYTES", "1048576")
    monkeypatch.setenv("PALETTE_LOG_KEEP", "0")
    supervisor = embedded_stack(load_settings(data_dir=tmp_path)).supervisor
    assert (supervisor.log_max_bytes, supervisor.log_keep) == (2**20, 0)
    monkeypatch.setenv("PALETTE_LOG_MAX_BYTES", "100")
    with pytest.raises(SettingsError, match=r"^invalid setting PALETTE_LOG_MAX_BYTES: "):
        load_settings(data_dir=tmp_path)


def test_with_no_file_kept_a_log_past_its_cap_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "gpu.log"
    log = ProcessLog(path, max_bytes=100, keep=0)
    with log.writing():
        for i in range(5):
            log.write(_line(i))
    assert _numbers(path) == [4] and [p.name for p in tmp_path.iterdir()] == ["gpu.log"]


def test_a_rotation_deletes_the_files_a_larger_keep_left_and_nothing_else_by_that_name(tmp_path: Path) -> None:
    """PALETTE_LOG_KEEP lowered from 5 to 2: the shift moves .1 to .2 and drops what was .2,
    but .3 to .5 were past its reach and stayed on disk for good."""
    path = tmp_path / "relay.log"
    for n in range(1, 6):
        path.with_name(f"relay.log.{n}").write_bytes(b"old %d\n" % n)
    others = ["relay.log.bak", "relay.log.1x", "relay.log.\u0663", "relay.logs.9", "api.log.9", "relay.log.007",
              "relay.log.-3", "relay.log.+4"]
    for name in others:
        (tmp_path / name).write_bytes(b"not ours\n")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"  # a link past keep: the link goes, never its target
    outside.write_bytes(b"not in logs/\n")
    path.with_name("relay.log.9").symlink_to(outside)
    log = ProcessLog(path, max_bytes=100, keep=2)
    with log.writing():
        for i in range(3):
            log.write(_line(i))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["relay.log", "relay.log.1", "relay.log.2", *others])
    assert outside.read_bytes() == b"not in logs/\n"
    assert path.with_name("relay.log.2").read_bytes() == b"old 1\n" and _numbers(path) == [2]


def test_a_log_that_cannot_be_rotated_starts_over_in_place_saying_why_never_past_its_cap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename refused (a read-only directory, a name taken by a directory): the lines went on
    into the file there was, past the cap for good, and every line tried the rotation again."""
    path = tmp_path / "api.log"
    tried: list[Path] = []

    def refused(self: Path, target: Path) -> Path:
        tried.append(self)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "replace", refused)
    log = ProcessLog(path, max_bytes=1000, keep=2)
    with log.writing():
        for i in range(84):  # four caps' worth
            log.write(_line(i))
    held = path.read_bytes().splitlines(keepends=True)
    assert path.stat().st_size <= 1000 and len(tried) == 4  # a rotation a cap, not a line
    assert held[0] == b"api.log was not rotated (PermissionError: Permission denied): started over\n"
    newest = range(84 - (len(held) - 1), 84)  # after the note, the newest lines, whole and in order
    assert b"".join(held[1:]) == b"".join(_line(i) for i in newest)
    assert [p.name for p in tmp_path.iterdir()] == ["api.log"]


def test_a_line_that_cannot_be_written_is_dropped_and_counted_and_the_log_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk: the pump must go on reading the process's output (a pump that raised left the
    process blocked on a full pipe); the lines the disk refused are counted, the next are written,
    after a line saying how many were lost."""
    path = tmp_path / "relay.log"
    log = ProcessLog(path, max_bytes=1000, keep=1)
    disk = Disk(monkeypatch)
    disk.full = True
    with log.writing():
        for i in range(3):
            log.write(_line(i))
        disk.full = False
        log.write(_line(3))
        log.write(_line(4))
    assert log.dropped == 3  # and the log says so where they were lost, once
    said = b"3 lines of output could not be written here (OSError: No space left on device)\n"
    assert path.read_bytes() == said + _line(3) + _line(4)


def test_a_process_that_has_said_nothing_yet_has_its_log_file(tmp_path: Path) -> None:
    """Where the README sends a newcomer (logs/<process>.log): there from the start."""
    path = tmp_path / "api.log"
    log = ProcessLog(path)
    with log.writing():
        assert path.exists() and path.read_bytes() == b""


def test_a_line_the_full_disk_took_only_part_of_leaves_no_piece_of_it_in_the_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fills mid-line takes the line's first bytes and refuses the rest: the log must
    hold whole lines only, not that piece run together with the next one (seen filling a live
    stack's disk: '..."msg": "the database did not answer (OperationalError: PL/pgSQL function
    palette2 lines of output were lost here', a JSON line no reader can parse)."""
    path = tmp_path / "api.log"
    log = ProcessLog(path, max_bytes=10_000, keep=1)
    disk = Disk(monkeypatch, takes_half=True)
    with log.writing():
        log.write(_line(0))
        disk.full = True
        log.write(_line(1))
        disk.full = False
        log.write(_line(2))
    assert log.dropped == 1
    said = b"1 line of output could not be written here (OSError: No space left on device)\n"
    assert path.read_bytes() == _line(0) + said + _line(2)


def test_the_largest_log_cap_the_settings_take_has_the_output_read_and_one_past_it_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cap past what a read of the pipe takes (10**20 bytes) ended the pump on an OverflowError:
    nothing reached the log, and the process blocked on its full pipe for good."""
    from adapters.bootstrap import embedded_stack
    from adapters.settings import SettingsError, load_settings
    from infra.supervisor import LOG_MAX_BYTES_MAX

    monkeypatch.setenv("PALETTE_LOG_MAX_BYTES", str(LOG_MAX_BYTES_MAX))
    supervisor = embedded_stack(load_settings(data_dir=tmp_path)).supervisor
    try:
        supervisor.start(ServiceSpec("svc", _printing(2000), ready=lambda: True))  # past a pipe's 64 KiB
        wait_until(lambda: b"line 01999" in _written(tmp_path / "logs" / "svc.log"), 30, "the last line in svc.log")
    finally:
        supervisor.stop_all()
    monkeypatch.setenv("PALETTE_LOG_MAX_BYTES", str(10**20))
    with pytest.raises(SettingsError, match=r"^invalid setting PALETTE_LOG_MAX_BYTES: "):
        load_settings(data_dir=tmp_path)
