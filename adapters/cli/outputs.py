"""Where a command's output goes: a file checked before the work, stderr's progress lines, and
stdout's reader going away (`| head`)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def unwritable(path: Path) -> str | None:
    """Why a file cannot be written at ``path``, as the OS says it (None: it can), found by
    opening it for writing (permission bits say nothing for root, a read-only mount or /proc);
    a file this made is removed again. Through a symbolic link, its target is what is tried. A
    FIFO without a reader is refused, not waited on. Checked before the work whose result goes
    there."""
    try:
        target = path.resolve()
    except (OSError, ValueError) as e:  # a loop of links; a NUL, which no path holds
        return getattr(e, "strerror", None) or str(e)
    if target.is_dir():
        return os.strerror(errno.EISDIR)
    existed = target.exists()
    try:  # nothing written, nothing cut
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK, 0o600)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    if not existed:
        target.unlink(missing_ok=True)
    return None


def progress_lines(what: str, every: int = 100_000) -> Callable[[int], None]:
    """A long command's progress: told how many ``what`` are done, it says so on stderr (with the
    rate) each time another ``every`` are."""
    t0 = time.monotonic()
    shown = 0

    def progress(n: int) -> None:
        nonlocal shown
        if n - shown >= every:
            shown = n
            print(f"  {n:,} {what} ({n / max(time.monotonic() - t0, 1e-9):,.0f}/s)", file=sys.stderr, flush=True)

    return progress


def with_progress(items: Iterator[Any], every: int = 100_000, what: str = "events") -> Iterator[Any]:
    """``items`` as they come, with progress_lines' lines about them and, past ``every``, the total."""
    t0 = time.monotonic()
    progress = progress_lines(what, every)
    n = 0
    for n, item in enumerate(items, 1):
        progress(n)
        yield item
    if n >= every:
        print(f"  done: {n:,} {what} in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)


SIGPIPE_EXIT = 128 + signal.SIGPIPE  # 141: what a shell shows for a tool stopped by a closed pipe


def stdout_closed() -> bool:
    """Whether stdout's reader went away (a pipe whose reading end is closed polls as an error)."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))


def stdout_gone() -> int:
    """stdout's reader went away (`| head`): stop quietly, as Unix tools do. What is still
    buffered goes to /dev/null (Python's recipe), so the interpreter's last flush cannot fail."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return SIGPIPE_EXIT

