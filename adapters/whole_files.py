"""Files written whole or not at all, and durably: a crash or power cut after the write leaves
the new file or the old one (or none), never a cut or empty one (checkpoints, keys, a command's
--out)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from uuid import uuid4

from projections.files import sync

# What link(2) answers on a filesystem without hard links (FAT, some FUSE and network ones).
NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}
# What write_new keeps of a name (in bytes) in its partial's, which adds 22 and must fit where the
# name itself just does (255 bytes).
PARTIAL_NAME_BYTES = 200


def write_whole(path: Path, data: str | bytes, mode: int = 0o666) -> None:
    """``data`` into ``path`` whole or not at all: a regular file (or none yet), through a symbolic
    link its target, is written beside, synced, renamed into place, and its directory synced; it
    is made with ``mode`` (less the umask: 0o600 for a secret, never readable by others, even
    while it is written). Anything else (/dev/stdout on a terminal, /dev/null, a FIFO) is written
    in place: a rename would replace the device or pipe with a regular file (/dev/null itself, for
    root), or fail where no file can be made beside it."""
    body = data.encode() if isinstance(data, str) else data
    target = path.resolve()
    if target.exists() and not target.is_file():
        with target.open("wb") as f:
            f.write(body)
        return
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)  # a crash's: made anew, so it takes ``mode``
    _write_synced(partial, body, mode)  # before the rename: else a crash can leave the new name on no data
    try:
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    sync(target.parent)  # the rename itself


def write_new(path: Path, data: bytes, mode: int = 0o666) -> None:
    """``data`` into a new file ``path`` whole or not at all, never over anything there
    (FileExistsError): written beside with ``mode`` (less the umask), synced, then linked to its
    name, which fails where a name is, and its directory synced; so the name appears only on the
    whole of it. Where the filesystem has no hard links, made under its name (exclusively) and
    removed if the write does not complete: only a crash during it can leave it cut there."""
    kept = os.fsdecode(os.fsencode(path.name)[:PARTIAL_NAME_BYTES])
    partial = path.with_name(f".{kept}.{uuid4().hex[:12]}.partial")
    try:
        _write_synced(partial, data, mode)  # before the link: else a crash can leave the name on no data
        try:
            os.link(partial, path, follow_symlinks=False)
        except OSError as e:
            if e.errno not in NO_LINKS:
                raise
            _write_synced(path, data, mode)
    finally:
        partial.unlink(missing_ok=True)
    sync(path.resolve().parent)  # the name itself


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    """``data`` into a new file ``path`` (made exclusively, with ``mode``), synced; the file
    removed if that does not complete."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
