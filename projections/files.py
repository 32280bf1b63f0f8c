"""What was written made durable where the filesystem allows it: the read side's exports, and
every file ``adapters.whole_files`` writes whole (this layer may not import that one)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

# What fsync answers where the filesystem or platform does not do it (some network and FUSE
# filesystems, Windows): the write or rename happened, there is nothing more to ask for.
UNSYNCABLE = {errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP}
# What opening it to sync it answers where it may be written but not read (a folder of mode -wx).
UNOPENABLE = {errno.EACCES, errno.EPERM}


def sync(path: Path) -> None:
    """A closed file's bytes, or a folder's entries (a file made or renamed in it), made durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno in UNOPENABLE:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in UNSYNCABLE:
            raise
    finally:
        os.close(fd)
