"""Checkpoints, signing keys and a command's --out file are written whole and durably: the file
synced before its rename, its directory after (a crash could otherwise leave the new name on no
data, or lose the rename), a directory that cannot be synced tolerated where the OS says so."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters import checkpoints
from adapters.whole_files import write_whole

Synced = list[tuple[str, object]]


def _recording(monkeypatch: pytest.MonkeyPatch, seen: Callable[[int, os.stat_result], object],
               refuse: Callable[[os.stat_result], int | None] = lambda _st: None) -> Synced:
    """os.fsync records what each call synced (a file's bytes or a directory's inode, with what
    ``seen`` reads then), and raises the errno ``refuse`` names for it."""
    synced: Synced = []
    real = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        synced.append((kind, seen(fd, st)))
        if (code := refuse(st)) is not None:
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def _content(fd: int) -> bytes:
    """What a file open for writing holds now (read through /proc: the fd itself is write-only)."""
    return Path(f"/proc/self/fd/{fd}").read_bytes()


def test_a_whole_write_syncs_the_file_before_the_rename_and_the_directory_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "checkpoint.json"
    out.write_text("old")

    def seen(fd: int, st: os.stat_result) -> object:
        what = st.st_ino if stat.S_ISDIR(st.st_mode) else _content(fd)
        return what, out.read_text()  # the target's content at that moment

    synced = _recording(monkeypatch, seen)
    write_whole(out, '{"payload":{}}')
    assert synced == [("file", (b'{"payload":{}}', "old")),  # whole, and before the rename
                      ("dir", (tmp_path.stat().st_ino, '{"payload":{}}'))]  # after it
    assert out.read_text() == '{"payload":{}}' and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json"]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EBADF])
def test_a_directory_the_filesystem_cannot_sync_does_not_fail_the_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    synced = _recording(monkeypatch, lambda _fd, st: stat.S_ISDIR(st.st_mode),
                        refuse=lambda st: code if stat.S_ISDIR(st.st_mode) else None)
    write_whole(tmp_path / "out.json", "whole")
    assert synced == [("file", False), ("dir", True)]
    assert (tmp_path / "out.json").read_text() == "whole"


def test_a_directory_sync_that_fails_with_an_io_error_fails_the_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO is not "this filesystem does not sync directories": the rename may be lost."""
    _recording(monkeypatch, lambda _fd, _st: None, refuse=lambda st: errno.EIO if stat.S_ISDIR(st.st_mode) else None)
    with pytest.raises(OSError, match="Input/output error"):
        write_whole(tmp_path / "out.json", "whole")


def test_a_file_that_cannot_be_synced_leaves_the_old_one_and_no_partial(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.json"
    out.write_text("old")
    _recording(monkeypatch, lambda _fd, _st: None, refuse=lambda _st: errno.ENOSPC)
    with pytest.raises(OSError, match="No space left on device"):
        write_whole(out, "new")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_checkpoint_kept_in_the_directory_is_synced_whole_and_its_rename_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PALETTE_AUDIT_CHECKPOINT_DIR's copies (the scheduled checkpointer's and the command's)."""
    folder = tmp_path / "checkpoints"
    doc = {"payload": {"log_position": 7, "taken_at": "2026-01-02T03:04:05+00:00", "heads": []}}
    synced = _recording(monkeypatch, lambda fd, st: st.st_ino if stat.S_ISDIR(st.st_mode) else _content(fd))
    where = checkpoints.CheckpointStore(None, "bucket", folder).put(doc)
    body = json.dumps(doc, separators=(",", ":")).encode()
    assert synced == [("file", body), ("dir", folder.stat().st_ino)]
    assert where == [str(folder / "00000000000000000007-20260102T030405000000Z.json")]
    assert Path(where[0]).read_bytes() == body and [p.name for p in folder.iterdir()] == [Path(where[0]).name]


def test_a_new_signing_key_is_synced_and_so_is_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = _recording(monkeypatch, lambda _fd, st: st.st_ino if stat.S_ISDIR(st.st_mode) else "key")
    checkpoints.keygen(tmp_path / "signing.pem")
    assert synced == [("file", "key"), ("dir", tmp_path.stat().st_ino)]


def test_a_new_signing_key_is_on_the_disk_when_it_is_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync of a file whose bytes are still in the process's buffer leaves the key to a power cut."""
    out = tmp_path / "signing.pem"
    synced = _recording(monkeypatch, lambda fd, st: None if stat.S_ISDIR(st.st_mode) else _content(fd))
    checkpoints.keygen(out)
    assert synced[0] == ("file", out.read_bytes()) and out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_a_signing_key_interrupted_while_written_leaves_no_file_that_refuses_the_rerun(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "signing.pem"

    def interrupted(_fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.keygen(out)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    checkpoints.keygen(out)
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_a_new_signing_keys_name_appears_only_on_the_whole_key_synced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Made under its name and then written, a key a crash or power cut cut short was an empty or
    cut file there, which holds no key and refuses every rerun ("exists")."""
    out = tmp_path / "signing.pem"
    synced = _recording(monkeypatch, lambda fd, st: ("dir", out.exists()) if stat.S_ISDIR(st.st_mode)
                        else (_content(fd), out.exists()))
    checkpoints.keygen(out)
    key = out.read_bytes()
    assert synced == [("file", (key, False)), ("dir", ("dir", True))]
    assert [p.name for p in tmp_path.iterdir()] == ["signing.pem"] and out.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP])
def test_a_signing_key_on_a_filesystem_without_hard_links_is_written_under_its_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def refused(*_args: object, **_kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", refused)
    out = tmp_path / "signing.pem"
    checkpoints.keygen(out)
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----") and out.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["signing.pem"]
    with pytest.raises(checkpoints.CheckpointError, match="exists: not overwritten"):
        checkpoints.keygen(out)


@pytest.mark.parametrize("there", ["file", "dangling link"])
def test_a_signing_key_is_never_written_over_what_is_there(tmp_path: Path, there: str) -> None:
    out = tmp_path / "signing.pem"
    if there == "file":
        out.write_text("someone's key")
    else:
        out.symlink_to(tmp_path / "elsewhere.pem")
    with pytest.raises(checkpoints.CheckpointError, match="exists: not overwritten"):
        checkpoints.keygen(out)
    assert [p.name for p in tmp_path.iterdir()] == ["signing.pem"]
    assert out.read_text() == "someone's key" if there == "file" else not out.exists()


@pytest.mark.parametrize("name", ["k" * 255, "é" * 127])
def test_a_signing_key_under_a_name_of_the_longest_a_folder_takes_is_written(tmp_path: Path, name: str) -> None:
    """The name the key is written beside first is longer than the key's: it must fit too."""
    out = tmp_path / name
    checkpoints.keygen(out)
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_development_secrets_are_synced_and_never_readable_by_others_even_while_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database's password and the device keys' secret: a file a crash cut would leave the
    stack unable to reach its own database. A partial left by a crash, readable by all, is not
    written through (it would keep its mode)."""
    from adapters.settings import load_settings

    (tmp_path / ".secrets.json.partial").write_text("left by a crash")
    (tmp_path / ".secrets.json.partial").chmod(0o644)
    synced = _recording(monkeypatch,
                        lambda _fd, st: st.st_ino if stat.S_ISDIR(st.st_mode) else stat.S_IMODE(st.st_mode))
    settings = load_settings(data_dir=tmp_path)
    assert synced == [("file", 0o600), ("dir", tmp_path.stat().st_ino)]
    assert json.loads((tmp_path / "secrets.json").read_text())["jwt_secret"] == settings.jwt_secret
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secrets.json"]
