"""Read-your-writes across the API processes of one port (adapters.api.sibling_writes), with
real Unix datagram sockets: a write one process remembers is in every sibling's list at once."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from adapters.api.sibling_writes import DIRECTORY_PREFIX, HINT, SharedLastWrites, make_siblings_directory


@pytest.fixture
def directory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="palette-sw-"))  # short: a socket's path is at most 107 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _process(directory: Path, pid: int, monkeypatch: pytest.MonkeyPatch) -> SharedLastWrites:
    monkeypatch.setattr("os.getpid", lambda: pid)
    return SharedLastWrites(directory)


def test_a_write_one_process_remembers_is_in_each_siblings_list_at_once(directory, monkeypatch) -> None:
    a, b, c = (_process(directory, pid, monkeypatch) for pid in (101, 102, 103))
    try:
        user, job, rule = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        a.record(user, "jobs_log", job, 3)
        b.record(user, "rules", rule, 1)
        # no wait: the datagram is in the sibling's queue once sendto returns, and a read drains it
        assert b.recent(user, "jobs_log") == c.recent(user, "jobs_log") == a.recent(user, "jobs_log") == {job: 3}
        assert a.recent(user, "rules") == c.recent(user, "rules") == {rule: 1}
        assert a.recent(uuid.uuid4(), "jobs_log") == {}  # another user's are not this user's
        a.record(user, "jobs_log", job, 2)  # an older version never lowers what is held
        assert b.recent(user, "jobs_log") == {job: 3}
    finally:
        for p in (a, b, c):
            p.close()


def test_a_hint_received_is_not_sent_on(directory, monkeypatch) -> None:
    spy = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # a sibling that only listens
    spy.bind(str(directory / "777.sock"))
    a, b = _process(directory, 201, monkeypatch), _process(directory, 202, monkeypatch)
    try:
        user, job = uuid.uuid4(), uuid.uuid4()
        a.record(user, "jobs_log", job, 1)
        assert b.recent(user, "jobs_log") == {job: 1}  # recorded by b (an echo would be sent by now)
        assert HINT.unpack(spy.recv(64, socket.MSG_DONTWAIT))[2] == job.bytes
        with pytest.raises(BlockingIOError):
            spy.recv(64, socket.MSG_DONTWAIT)
    finally:
        spy.close()
        a.close()
        b.close()


def test_every_write_is_read_back_by_a_sibling_at_once_whatever_its_thread_is_doing(directory, monkeypatch) -> None:
    """The sibling's thread may have taken the hint off the queue and not yet recorded it when
    the read comes: the read waits for it (one lock), it does not answer without it."""
    a, b = _process(directory, 251, monkeypatch), _process(directory, 252, monkeypatch)
    try:
        for _ in range(300):
            user, job = uuid.uuid4(), uuid.uuid4()
            a.record(user, "jobs_log", job, 1)
            assert b.recent(user, "jobs_log") == {job: 1}
    finally:
        a.close()
        b.close()


def test_nothing_is_sent_for_a_write_without_a_version_or_of_another_model(directory, monkeypatch) -> None:
    a, b = _process(directory, 301, monkeypatch), _process(directory, 302, monkeypatch)
    try:
        user = uuid.uuid4()
        a.record(user, "jobs_log", uuid.uuid4(), None)
        a.record(user, "users", uuid.uuid4(), 4)
        assert b.recent(user, "jobs_log") == b.recent(user, "users") == {}
        assert a.recent(user, "users") != {}  # still remembered where it was made
    finally:
        a.close()
        b.close()


def test_a_gone_siblings_socket_is_removed_and_the_others_still_hear(directory, monkeypatch) -> None:
    gone = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    gone.bind(str(directory / "999.sock"))
    gone.close()  # killed: its file is left, refusing
    a, b = _process(directory, 401, monkeypatch), _process(directory, 402, monkeypatch)
    try:
        user, job = uuid.uuid4(), uuid.uuid4()
        a.record(user, "jobs_log", job, 1)
        assert not (directory / "999.sock").exists()
        assert b.recent(user, "jobs_log") == {job: 1}
    finally:
        a.close()
        b.close()


def test_a_sibling_started_within_the_directorys_timestamp_tick_of_a_listing_is_heard(directory, monkeypatch) -> None:
    """A directory's mtime is the kernel's coarse clock (a tick of 1-4 ms before Linux 6.13): a
    sibling whose socket is made in the tick a process listed the directory leaves the mtime as
    that listing saw it (here, set back so). It was then never sent a hint, as long as nothing
    else changed there; a listing is now trusted only once taken well after the mtime it saw."""
    a = _process(directory, 261, monkeypatch)
    try:
        a.record(uuid.uuid4(), "jobs_log", uuid.uuid4(), 1)  # lists the directory: no sibling yet
        listed = os.stat(directory)
        b = _process(directory, 262, monkeypatch)  # made in the same tick
        os.utime(directory, ns=(listed.st_atime_ns, listed.st_mtime_ns))
        try:
            user, job = uuid.uuid4(), uuid.uuid4()
            a.record(user, "jobs_log", job, 4)
            assert b.recent(user, "jobs_log") == {job: 4}
        finally:
            b.close()
    finally:
        a.close()


def test_datagrams_that_are_not_hints_are_ignored(directory, monkeypatch) -> None:
    a = _process(directory, 501, monkeypatch)
    try:
        user, job = uuid.uuid4(), uuid.uuid4()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other:
            unknown_model = HINT.pack(user.bytes, 7, job.bytes, 1)
            too_long = HINT.pack(user.bytes, 0, job.bytes, 1) + b"!"
            for junk in (b"x", b"", unknown_model, too_long):
                other.sendto(junk, str(a.path))
            other.sendto(HINT.pack(user.bytes, 0, job.bytes, 5), str(a.path))
        assert a.recent(user, "jobs_log") == {job: 5}
    finally:
        a.close()


def test_close_removes_the_socket_and_ends_the_thread(directory, monkeypatch) -> None:
    a = _process(directory, 601, monkeypatch)
    assert a.path.exists() and a._thread.is_alive()
    a.close()
    a._thread.join(timeout=10)
    assert not a.path.exists() and not a._thread.is_alive()


def test_a_write_reaches_a_sibling_whose_thread_is_behind(directory, monkeypatch) -> None:
    """A sibling's queue holds few datagrams (net.unix.max_dgram_qlen, 10 by default): a burst
    of writes while its thread waits for the GIL must wait for room, not be dropped."""
    a, b = _process(directory, 701, monkeypatch), _process(directory, 702, monkeypatch)
    try:
        user, jobs = uuid.uuid4(), [uuid.uuid4() for _ in range(30)]  # within STREAMS_PER_USER
        b._draining.acquire()  # b's thread and reads stand still, as behind a busy event loop
        releaser = threading.Timer(0.05, b._draining.release)
        releaser.start()
        for job in jobs:
            a.record(user, "jobs_log", job, 1)
        releaser.join()
        assert a.dropped == 0
        assert b.recent(user, "jobs_log") == dict.fromkeys(jobs, 1)
    finally:
        a.close()
        b.close()


def test_a_sibling_that_stays_full_is_waited_for_once_until_it_takes_a_hint(directory, monkeypatch) -> None:
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # a stopped process: nothing drains it
    stuck.bind(str(directory / "888.sock"))
    a = _process(directory, 801, monkeypatch)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler, pytest.raises(BlockingIOError):
            while True:
                filler.sendto(b"x", socket.MSG_DONTWAIT, str(directory / "888.sock"))
        user = uuid.uuid4()
        a.record(user, "jobs_log", uuid.uuid4(), 1)  # waits SEND_WAIT_S, then gives up
        assert a.dropped == 1 and str(directory / "888.sock") in a._lagging
        sent_with: list[int] = []
        real = a._socket

        class Recording:  # the socket, its sends' flags noted
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def sendto(self, data: bytes, flags: int, address: str) -> int:
                sent_with.append(flags)
                return real.sendto(data, flags, address)

        a._socket = Recording()
        a.record(user, "jobs_log", uuid.uuid4(), 1)  # not waited for again: sent without blocking
        a._socket = real
        assert sent_with == [socket.MSG_DONTWAIT]
        assert a.dropped == 2
        stuck.recv(64)  # it takes one: room again
        a.record(user, "jobs_log", uuid.uuid4(), 1)
        assert a.dropped == 2 and not a._lagging
    finally:
        stuck.close()
        a.close()


def test_a_worker_whose_socket_cannot_be_made_keeps_its_own_writes(monkeypatch, caplog) -> None:
    """A socket's path is at most 107 bytes: under a long TMPDIR the worker still serves, its
    read-your-writes within itself (one warning), rather than failing to start."""
    from adapters.api import app
    from adapters.api.consistency import LastWrites
    from adapters.api.sibling_writes import SIBLINGS_ENV

    built = SimpleNamespace(last_writes=LastWrites())
    monkeypatch.setenv(SIBLINGS_ENV, "/tmp/" + "d" * 120)
    monkeypatch.setattr("adapters.bootstrap.build", lambda *args, **kwargs: built)
    monkeypatch.setattr(app, "create_asgi", lambda container, owns_container: container)
    monkeypatch.setattr("adapters.collector.serving_gc", lambda: None)
    monkeypatch.setattr(app, "bound_connections", lambda settings: None)  # process-wide limits
    monkeypatch.setattr("adapters.tracing.configure", lambda process, exporter: None)  # and tracer
    assert app.worker_asgi(naive=False) is built
    assert type(built.last_writes) is LastWrites
    assert "read-your-writes within this process only" in caplog.text


def test_a_new_parent_removes_the_socket_directories_of_killed_parents_and_only_those(directory) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now (reaped), as a SIGKILLed `palette serve api`'s is
    killed = directory / f"{DIRECTORY_PREFIX}{dead.pid}-abc"
    running = directory / f"{DIRECTORY_PREFIX}{os.getpid()}-def"  # a parent still serving
    unnamed = directory / f"{DIRECTORY_PREFIX}xyz"  # not one of ours by name
    elsewhere = directory / "elsewhere"
    for path in (killed, running, unnamed, elsewhere):
        path.mkdir()
        (path / "7.sock").write_bytes(b"")
    link = directory / f"{DIRECTORY_PREFIX}{dead.pid}-lnk"
    link.symlink_to(elsewhere)  # never followed, never removed
    made = make_siblings_directory(directory)
    try:
        assert not killed.exists()
        assert sorted(p.name for p in directory.iterdir()) == sorted(
            p.name for p in (running, unnamed, elsewhere, link, made))
        assert (elsewhere / "7.sock").exists() and made.name.startswith(f"{DIRECTORY_PREFIX}{os.getpid()}-")
        assert stat.S_IMODE(made.stat().st_mode) == 0o700
    finally:
        shutil.rmtree(made)
