"""What the embedded stack reads of the settings: the composition root hands its settings in,
and infra knows no other code of ours (ARCHITECTURE §8, layering)."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Protocol

PG_ELSEWHERE = "pg-elsewhere"  # the data directory's note of where its PostgreSQL files are
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def unproxied_loopback(environ: MutableMapping[str, str]) -> None:
    """Add loopback to ``no_proxy`` (and ``NO_PROXY``) in ``environ``, which boto3, urllib and httpx
    read, keeping what was there: behind a proxy (``http_proxy`` set, as a corporate network has
    it to reach the package registries), every client of the embedded stack asked the proxy for
    127.0.0.1, and `palette up` never saw its S3 store ready."""
    entries = [e.strip() for e in (environ.get("no_proxy") or environ.get("NO_PROXY") or "").split(",") if e.strip()]
    value = ",".join([*entries, *(host for host in LOOPBACK_HOSTS if host not in entries)])
    environ["no_proxy"] = environ["NO_PROXY"] = value


class S3Settings(Protocol):
    @property
    def effective_s3_endpoint(self) -> str: ...
    @property
    def s3_access_key(self) -> str: ...
    @property
    def s3_secret_key(self) -> str: ...
    @property
    def s3_region(self) -> str: ...


class StackSettings(S3Settings, Protocol):
    @property
    def data_dir(self) -> Path: ...
    @property
    def pg_port(self) -> int: ...
    @property
    def pg_password(self) -> str: ...
    @property
    def pg_fsync(self) -> bool: ...
    @property
    def effective_database_url(self) -> str: ...
    @property
    def s3_port(self) -> int: ...
    @property
    def s3_bucket(self) -> str: ...
    @property
    def broker_bucket(self) -> str: ...
    @property
    def broker_storage(self) -> str: ...
    @property
    def kafka_port(self) -> int: ...
    @property
    def effective_kafka_bootstrap(self) -> str: ...
    @property
    def kafka_partitions(self) -> int: ...
    @property
    def api_host(self) -> str: ...
    @property
    def api_port(self) -> int: ...
    @property
    def api_workers(self) -> int: ...
    @property
    def log_max_bytes(self) -> int: ...
    @property
    def log_keep(self) -> int: ...

    def as_env(self) -> dict[str, str]: ...


def unusable_data_dir(data_dir: Path, e: OSError) -> str:
    """Why ``data_dir`` could not be made or written to (``e``), in one line: a file or another
    non-directory in its place (or in a parent's) is named as such, not as "not writable"."""
    taken = next((p for p in (data_dir, *data_dir.parents) if _not_a_directory(p)), None)
    if taken is not None:
        what = "the data directory" if taken == data_dir else f"its parent {taken}"
        return f"data directory {data_dir} cannot be made: {what} is a file, not a directory"
    return f"data directory {data_dir} is not writable: {e.strerror or e}"


def _not_a_directory(path: Path) -> bool:
    try:
        return path.exists() and not path.is_dir()
    except OSError:  # it cannot be looked at (a parent not searchable): not what this names
        return False
