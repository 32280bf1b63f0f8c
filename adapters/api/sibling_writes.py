"""Read-your-writes across the API processes of one port (PALETTE_API_WORKERS > 1).

Each process remembers its callers' recent writes (``LastWrites``), so that ``GET /jobs`` and
``GET /rules`` list what the read model has not folded yet. A caller whose next request reaches
another process of the port would not be seen there; so each write a process remembers is also
sent, as one datagram, to every sibling's Unix socket in a directory the parent made for them
(``SIBLINGS_ENV``), before the write's answer goes out.

A datagram is in the receiving socket's queue when ``sendto`` returns, so when the caller's next
request is read, the hint is already there: a read drains the queue first (without blocking).
A thread drains it every ``DRAIN_EVERY_S`` too, so that a quiet process's queue does not fill;
both take one lock, so a hint the thread took is recorded before a read goes on. A queue holds
few datagrams (``net.unix.max_dgram_qlen``, 10 by default): a hint to a full one waits for room
up to ``SEND_WAIT_S`` (the kernel's send timeout); one that still finds none is not sent,
counted in ``dropped`` and logged, and that sibling is not waited for again until it takes a
hint (a stopped process stalls one write, not each).

A hint is only a hint: the write side is what a list reads for it (another user's stream is not
found there), so a forged or stale one costs a read, nothing more. A sibling that is gone leaves
its socket refusing: that file is removed by the next sender.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from pathlib import Path
from uuid import UUID

from adapters.api.consistency import LastWrites

log = logging.getLogger("palette.api")

SIBLINGS_ENV = "PALETTE_API_SIBLINGS_DIR"  # set by `palette serve api` for its worker processes
DIRECTORY_PREFIX = "palette-api-"  # then the parent's pid and "-": the sockets' directory in TMPDIR
MODELS = ("jobs_log", "rules")  # the models whose lists read a caller's writes back
HINT = struct.Struct(">16sB16sq")  # user id, model, stream id, version
SUFFIX = ".sock"
SEND_WAIT_S = 0.5  # how long a hint waits for room in a sibling's full queue
DRAIN_EVERY_S = 0.02  # a queue of 10 then takes 500 hints a second from each sibling without a wait
# A directory's mtime comes from the kernel's coarse clock (a tick of 1-4 ms before Linux 6.13's
# fine-grained timestamps): a socket made in the tick of a listing leaves it as that listing saw
# it. A listing begun this long after the mtime it saw is trusted while the mtime stays; one
# begun sooner is taken again at the next write.
LISTING_SETTLED_NS = 1_000_000_000


class SharedLastWrites(LastWrites):
    """``LastWrites`` whose records also reach the sibling processes' (see the module's docstring)."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        self.path = directory / f"{os.getpid()}{SUFFIX}"
        self.dropped = 0  # hints a sibling's full queue refused
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        seconds = int(SEND_WAIT_S)  # a blocking sendto to a full queue waits this long for room
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                struct.pack("ll", seconds, int((SEND_WAIT_S - seconds) * 1e6)))
        self._lagging: set[str] = set()  # siblings a hint found full for SEND_WAIT_S: not waited for
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a process of this pid before, killed
        try:
            self._socket.bind(str(self.path))
        except OSError:
            self._socket.close()
            raise
        # the directory's mtime (ns), when the listing began (ns), the sockets listed
        self._siblings_seen: tuple[int, int, list[str]] = (-1, -1, [])
        self._draining = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain_forever, name="sibling-writes", daemon=True)
        self._thread.start()

    def record(self, user_id: UUID, model: str, stream_id: UUID, version: int | None) -> None:
        super().record(user_id, model, stream_id, version)
        if version is None or model not in MODELS:
            return
        hint = HINT.pack(user_id.bytes, MODELS.index(model), stream_id.bytes, version)
        for sibling in self._siblings():
            try:
                self._socket.sendto(hint, socket.MSG_DONTWAIT if sibling in self._lagging else 0, sibling)
                self._lagging.discard(sibling)
            except ConnectionRefusedError:  # its process is gone
                self._lagging.discard(sibling)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sibling)
            except BlockingIOError:  # its queue stayed full (net.unix.max_dgram_qlen): its thread is behind
                self._lagging.add(sibling)
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning("%d write hint(s) not sent: a sibling API process's queue was full", self.dropped)
            except OSError as e:  # gone since listed, or anything else: a hint, not the write
                self._lagging.discard(sibling)
                log.debug("no write hint to %s (%s)", sibling, type(e).__name__)

    def recent(self, user_id: UUID, model: str) -> dict[UUID, int]:
        self.drain()
        return super().recent(user_id, model)

    def drain(self) -> None:
        """Record the hints queued now, without waiting for more. Under the lock the thread
        drains with: a hint is either still queued, or recorded once this returns."""
        with self._draining:
            while True:
                try:
                    data = self._socket.recv(HINT.size + 1, socket.MSG_DONTWAIT)
                except OSError:  # empty (BlockingIOError), or closed
                    return
                self._take(data)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with self._draining:
            self._socket.close()

    def _siblings(self) -> list[str]:
        """The siblings' sockets, listed again when the directory changed (its mtime), or while
        the listing held might have missed a change that left the mtime as it was (begun within
        ``LISTING_SETTLED_NS`` of it)."""
        try:
            changed = os.stat(self.directory).st_mtime_ns
            seen, listed_at, _ = self._siblings_seen
            if changed != seen or listed_at - changed < LISTING_SETTLED_NS:
                listed_at = time.time_ns()
                own = self.path.name
                self._siblings_seen = (changed, listed_at, [os.path.join(self.directory, n)
                                                            for n in os.listdir(self.directory)
                                                            if n.endswith(SUFFIX) and n != own])
        except OSError:
            return []
        return self._siblings_seen[2]

    def _take(self, data: bytes) -> None:
        if len(data) != HINT.size:
            return
        user, model, stream, version = HINT.unpack(data)
        if model < len(MODELS):  # a sibling's own record: not sent on again
            super().record(UUID(bytes=user), MODELS[model], UUID(bytes=stream), version)

    def _drain_forever(self) -> None:
        """Drain every ``DRAIN_EVERY_S``, not on each hint: a thread woken for each one took the
        interpreter from the event loop as often (the mixed sessions with two workers, alternated
        with the code before: 807-895 against 883-998 commands/s; drained so, 894-968 against
        840-960)."""
        while not self._stop.wait(DRAIN_EVERY_S):
            self.drain()


def siblings_directory() -> Path | None:
    """The directory of this worker's siblings, where ``palette serve api`` made one."""
    value = os.environ.get(SIBLINGS_ENV)
    return Path(value) if value else None


def make_siblings_directory(parent: Path | None = None) -> Path:
    """A fresh private directory (mkdtemp: 0700) for the workers' sockets, short enough for a
    socket's path, named after this process; first the ones a parent killed before it could
    remove them left (``stale_siblings_directories``) are removed."""
    parent = Path(tempfile.gettempdir()) if parent is None else parent
    for stale in stale_siblings_directories(parent):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{DIRECTORY_PREFIX}{os.getpid()}-", dir=parent))


def stale_siblings_directories(parent: Path) -> list[Path]:
    """This user's sockets directories in ``parent`` whose ``palette serve api`` is no longer
    running (SIGKILLed: its ``finally`` did not run). A directory whose pid is alive, maybe
    another process's now, is left for its own parent to remove."""
    stale = []
    for entry in parent.glob(f"{DIRECTORY_PREFIX}*-*"):
        pid = entry.name.removeprefix(DIRECTORY_PREFIX).partition("-")[0]
        try:
            info = entry.lstat()
        except OSError:
            continue
        if not (pid.isdecimal() and stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.append(entry)
        except (PermissionError, OverflowError):  # alive as another user; or no such pid at all
            continue
    return stale
