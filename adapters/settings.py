"""Settings from the environment (prefix ``PALETTE_``), with defaults that serve the embedded stack."""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, quote, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters.webhooks.retries import DEFAULT_SCHEDULE as DEFAULT_RETRY_SCHEDULE
from adapters.webhooks.retries import parse_schedule
from adapters.whole_files import write_whole
from infra.config import PG_ELSEWHERE, unusable_data_dir
from infra.supervisor import LOG_KEEP, LOG_MAX_BYTES, LOG_MAX_BYTES_MAX

# The embedded SeaweedFS binds ports up to the S3 port + 6 and each + 10000 (infra.stack.embedded_ports).
S3_PORT_MAX = 65535 - 10006
# S3's bucket names (what SeaweedFS checks too): 3 to 63 characters, lowercase, no IPv4 address.
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
IPV4_LIKE = re.compile(r"\d+\.\d+\.\d+\.\d+")
# What botocore takes for a region (botocore.utils.validate_region_name): a host label, or empty.
REGION_NAME = re.compile(r"(?![0-9]+$)(?!-)[a-zA-Z0-9-]{,63}(?<!-)")
# Where a database URL connects: the parts the event store reads (adapters.bootstrap.event_store_env).
CONNECTION_TARGET = frozenset({"host", "hostaddr", "port", "dbname", "user", "password"})
MAX_WHOLE_SETTING = 2**63 - 1  # PostgreSQL's bigint, and far inside a float's range
# Secrets shorter than this are refused outside development (HS256 wants >= 256 bits).
MIN_SECRET_BYTES = 32
MIN_SECRET_CHARACTERS = 8  # different ones: what a generated secret of 32 bytes has, whatever its alphabet
PLACEHOLDER_SECRETS = {"changeme", "change-me", "secret", "placeholder", "dev", "development"}
# Registrations per second and burst per client address in development (see rate_register_per_s).
DEV_REGISTER_RATE = (1000.0, 100_000)
# Job creations (and as many rule writes) per client address and day in development.
DEV_ADDRESS_JOBS_PER_DAY = 1_000_000_000
# Idempotency-Keys per client address and key lifetime in development.
DEV_ADDRESS_IDEMPOTENCY_KEYS = 1_000_000_000
# Bytes the reruns of one client address's users may copy a day in development.
DEV_ADDRESS_RERUN_COPY_BYTES = 2**60
# Whose traceparent is continued in development unless set (see trace_trusted_peers).
DEV_TRACE_TRUSTED_PEERS = "127.0.0.0/8,::1/128"
# Secret names, printed by `palette env` but never logged (nor in the settings' repr: each is
# declared with repr=False, as are PALETTE_DATABASE_URL, which may hold a password, and the
# audit signing key).
SECRET_FIELDS = ("jwt_secret", "callback_secret", "s3_secret_key", "pg_password", "device_key_secret")
# The ones this process signs or keys with: refused outside development when short or a placeholder.
SIGNING_SECRETS = ("jwt_secret", "callback_secret", "device_key_secret")


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it."""


LINE_BREAK = "holds a line break (a setting is one line: `palette env` prints KEY=value lines)"


def breaks_lines(value: str) -> bool:
    """Whether ``value`` holds a line break: \\n, \\r, or any other str.splitlines ends a line at."""
    return "".join(value.splitlines()) != value


# The longest span a setting that PostgreSQL takes as an interval may give (PALETTE_JWT_TTL_S,
# _DISPATCH_STALE_S, _IDEMPOTENCY_TTL_S, _WEBHOOK_DISABLE_AFTER_S, _ERASURE_GRACE_S): now() less
# a few thousand years is out of a timestamp's range, and the query using it failed every time.
TEN_YEARS_S = 10 * 365 * 86400


class Settings(BaseSettings):
    """Effective configuration. Empty connection settings mean "the embedded stack's"."""

    # No float setting is infinite (or NaN): each is a rate, a period or a span that threading's
    # waits and PostgreSQL's intervals take, and both refuse an infinite one where it is used (an
    # infinite PALETTE_AUDIT_CHECKPOINT_INTERVAL_S ended the checkpointer after its first checkpoint).
    model_config = SettingsConfigDict(env_prefix="PALETTE_", extra="ignore", allow_inf_nan=False)

    env: Literal["development", "production"] = "development"
    data_dir: Path = Path(".palette")
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    # API processes on the one port, each with its own group committer and cache (commands on the
    # same stream from two of them conflict, and the loser reloads and decides again). One is
    # best on two cores: a second process's gain is eaten by the cross-process conflicts and
    # lost batching (see the bench).
    api_workers: int = Field(1, ge=1, le=64)
    pg_port: int = Field(5433, ge=1, le=65535)
    pg_password: str = Field("", repr=False)
    database_url: str = Field("", repr=False)
    kafka_port: int = Field(9092, ge=1, le=65535)
    kafka_bootstrap: str = ""
    kafka_partitions: int = Field(4, ge=1, le=256)
    s3_port: int = Field(8333, ge=1, le=S3_PORT_MAX)
    s3_endpoint: str = ""
    s3_bucket: str = "palette-images"
    s3_access_key: str = ""
    s3_secret_key: str = Field("", repr=False)
    s3_region: str = "us-east-1"
    broker_bucket: str = "palette-broker"
    # The embedded broker's log: "memory" (fast; a restart forgets it, and the relay re-publishes
    # from the event store) or "s3" (the log in SeaweedFS: slower, and still not the source of truth).
    broker_storage: Literal["memory", "s3"] = "memory"
    # The relay starts the broker's log of palette.events afresh once a partition has taken this
    # many produce batches and every consumer group has read it (adapters.rollover: the broker's
    # fetches cost more with every batch a partition holds); 0: never.
    broker_log_batches: int = Field(1000, ge=0)
    # Each worker process serves /metrics, /livez and /readyz on this port + its offset (relay +1,
    # projector +2, dispatcher +3, gpu +4, webhooks +5, checkpointer +6); 0 turns them off.
    metrics_port: int = Field(9400, ge=0, le=65000)
    metrics_host: str = "127.0.0.1"
    # `palette up` rotates each process's log under the data directory's logs/ once it passes
    # this many bytes, keeping this many rotated files (x.log.1 the newest; 0: none) beside it.
    log_max_bytes: int = Field(LOG_MAX_BYTES, ge=4096, le=LOG_MAX_BYTES_MAX)
    log_keep: int = Field(LOG_KEEP, ge=0, le=100)
    # Where each process's spans go: off (ids still made, for the logs), console, or otlp
    # (OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT).
    trace_exporter: Literal["off", "console", "otlp"] = "off"
    # Peers (CIDRs, comma-separated) whose ``traceparent`` header the API continues: the GPU
    # workers (their callbacks carry the job's trace) and a gateway that sets the header itself.
    # Anyone else's request starts a new trace. Empty in production unless set; in development,
    # unless set, loopback (DEV_TRACE_TRUSTED_PEERS).
    trace_trusted_peers: str = ""
    # The GPU worker's segmenter: a local TorchScript model file the operator provides (none: the
    # built-in region segmenter) and a JSON label map {concept: [class indices]} (none: ADE20K's).
    segmenter_model: str = ""
    segmenter_labels: str = ""
    jwt_secret: str = Field("", repr=False)
    jwt_issuer: str = "palette"
    jwt_audience: str = "palette-app"
    jwt_ttl_s: int = Field(7 * 24 * 3600, ge=60, le=TEN_YEARS_S)
    callback_secret: str = Field("", repr=False)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    callback_url: str = ""
    callback_require_signature: bool = False  # refuse the shared X-Callback-Secret (replayable) header
    rate_jobs_per_s: float = Field(5.0, gt=0)  # job creations per user; rule writes as many again
    rate_jobs_burst: int = Field(20, ge=1)
    rate_jobs_per_day: int = Field(1000, ge=1)  # job creations per user and day; rule writes as many again
    # ... and per client address and day, whatever its users (a user costs a registration, and
    # users never expire: without it, one client added a day's worth per user it had made). In
    # development, unless set, DEV_ADDRESS_JOBS_PER_DAY: test suites run every user from loopback.
    rate_jobs_per_address_per_day: int = Field(20_000, ge=1)
    # Bytes a user's reruns may have S3 copy per day (their photos and masks, server-side): a
    # rerun that is canceled, or fails, spends nothing, and its copy is kept a day
    # (unpaid_retention_days), so without it rerun-and-cancel of one 1 GB upload stored 1,000 GB a
    # day (the job budget's 1,000 creations) at no cost. At least one largest rerun (200 photos of
    # 20 MB, their masks) a day.
    rerun_copy_bytes_per_day: int = Field(16 * 2**30, ge=5 * 2**30)
    # ... and per client address and day, whatever its users (a user costs a registration: 25 of
    # them rerunning and canceling one 20 MB upload apiece stored 400 GB a day). In development,
    # unless set, DEV_ADDRESS_RERUN_COPY_BYTES: test suites run every user from loopback.
    rerun_copy_bytes_per_address_per_day: int = Field(160 * 2**30, ge=5 * 2**30)
    rate_callbacks_per_s: float = Field(200.0, gt=0)  # results per job
    rate_callbacks_burst: int = Field(400, ge=1)
    projector_sweep_s: float = Field(30.0, gt=0)  # how often the projector trues up against the log
    # A projector this many events behind the log folds straight from it (catch-up); 0: Kafka only.
    projector_catchup_events: int = Field(5000, ge=0)
    # Processes a catch-up folds in, side by side, each a group of read models (adapters.catchup_processes).
    projector_catchup_processes: int = Field(2, ge=1, le=3)
    dispatch_stale_s: float = Field(600.0, gt=0, le=TEN_YEARS_S)  # a job without progress this long is dispatched again
    pg_fsync: bool = True
    # An Idempotency-Key is forgotten this long after its claim.
    idempotency_ttl_s: float = Field(24 * 3600.0, gt=0, le=TEN_YEARS_S)
    # Keyed requests per client address and key lifetime, whatever their users (each user holds
    # at most 10,000 keys, and users cost a registration). In development, unless set,
    # DEV_ADDRESS_IDEMPOTENCY_KEYS: test suites run every user from loopback.
    idempotency_keys_per_address: int = Field(100_000, ge=1)
    sse_streams_per_user: int = Field(4, ge=1)  # concurrent GET /jobs/{id}/events per user (per API process)
    sse_streams: int = Field(256, ge=1)  # concurrent GET /jobs/{id}/events in all (per API process)
    sse_streams_per_address: int = Field(16, ge=1)  # ... per client address (per API process)
    # HMAC key of stored device hashes (a device hash is a credential). Changing it gives every
    # device a new user on its next registration.
    device_key_secret: str = Field("", repr=False)
    # Registrations (POST /auth/anon, new or repeated: each issues a token) per client address.
    # These defaults are production's; in development, unless set, DEV_REGISTER_RATE applies, as
    # local tools and test suites register many users from one loopback address.
    rate_register_per_s: float = Field(0.2, gt=0)
    rate_register_burst: int = Field(20, ge=1)
    # Reverse proxies in front of the API that append to X-Forwarded-For (that many entries from
    # the right are trusted); 0: the header is ignored and the TCP peer is the client.
    trusted_proxies: int = Field(0, ge=0, le=16)
    # Open client connections per API process (0: what its descriptors allow, less 1,024 kept for
    # its own use), and per client address (ignored behind trusted proxies, whose address every
    # client has). At the limit the connection idle longest is closed for a new one; with none
    # idle the new one gets a 503 (adapters.api.http_limits).
    api_max_connections: int = Field(0, ge=0)
    api_max_connections_per_peer: int = Field(256, ge=1)
    # Webhooks: the delays between tries of a failed delivery (written as ``5s,5m,2h,1d``; jittered +-20 %),
    # and an endpoint disabled once its failures in a row number PALETTE_WEBHOOK_DISABLE_AFTER and
    # have lasted PALETTE_WEBHOOK_DISABLE_AFTER_S (its owner enables it again).
    webhook_retry_schedule: str = DEFAULT_RETRY_SCHEDULE
    webhook_disable_after: int = Field(20, ge=1)
    webhook_disable_after_s: float = Field(3 * 24 * 3600.0, ge=0, le=TEN_YEARS_S)
    webhook_endpoints_per_user: int = Field(10, ge=1, le=100)
    webhook_senders: int = Field(8, ge=1, le=64)  # POSTs in flight at once
    # Finished deliveries are listed this long, and a disabled endpoint's pending ones kept this long.
    # At most ten years, as PALETTE_RETENTION_DAYS: the prune subtracts it from now() in
    # PostgreSQL, whose intervals and timestamps hold no more than a few thousand years.
    webhook_keep_days: float = Field(7.0, gt=0, le=3650)
    rate_redeliver_per_s: float = Field(0.5, gt=0)  # POST .../redeliver per user (a token every 2 s)
    rate_redeliver_burst: int = Field(20, ge=1)
    # Signed ledger checkpoints (adapters/checkpoints.py): the Ed25519 signing key, never stored in
    # the database (raw 32 bytes as hex or base64, or a PEM file); the public key auditors trust;
    # how often `palette serve checkpointer` signs one (0: never); a directory to keep them in as
    # well as the object store (bucket s3_bucket, prefix audit/checkpoints/).
    audit_signing_key: str = Field("", repr=False)
    audit_signing_key_file: str = ""
    audit_public_key: str = ""
    # At most ten years, as the sweeper's waits: the checkpointer waits it out between checkpoints,
    # and past threading's TIMEOUT_MAX (9.2e9 s) that wait is an OverflowError after the first one.
    audit_checkpoint_interval_s: float = Field(0.0, ge=0, le=TEN_YEARS_S)
    audit_checkpoint_dir: str = ""
    # Data lifecycle (adapters/retention.py, `palette serve sweeper`): the objects of jobs finished
    # more than PALETTE_RETENTION_DAYS ago are deleted (the job stays listed, its links stop
    # working); a pass every PALETTE_SWEEP_INTERVAL_S. Between passes, every PALETTE_ERASURE_SWEEP_S,
    # it finishes the erasures a crash cut short once PALETTE_ERASURE_GRACE_S old: longer than an
    # erasure takes, so it leaves alone one an API request is still performing.
    retention_days: int = Field(30, ge=1, le=3650)
    # A job that finished having spent nothing (canceled or failed, no item done) keeps its
    # objects this long instead: a rerun of it works meanwhile.
    unpaid_retention_days: int = Field(1, ge=1, le=3650)
    # The served sweeper waits the lesser of the two at a time: past threading's TIMEOUT_MAX (9.2e9 s)
    # that wait is an OverflowError, which ended the process at its start.
    sweep_interval_s: float = Field(3600.0, gt=0, le=TEN_YEARS_S)
    erasure_sweep_s: float = Field(30.0, gt=0, le=TEN_YEARS_S)
    erasure_grace_s: float = Field(120.0, ge=0, le=TEN_YEARS_S)

    @field_validator("*", mode="before")
    @classmethod
    def _no_line_break(cls, v: object) -> object:
        """A setting is one line: `palette env` prints them as KEY=value lines, where a value's line
        break would forge lines of its own (another setting, for whoever reads them). Checked on
        the text as given, before it is read: a number's (PALETTE_SSE_STREAMS="4\\n") was read
        past its line break and accepted."""
        if isinstance(v, str | Path) and breaks_lines(str(v)):
            raise ValueError(LINE_BREAK)
        return v

    @field_validator("*")
    @classmethod
    def _within_64_bits(cls, v: object) -> object:
        """No whole number past a 64-bit integer: the rate limits take their bursts and days as
        floats, and a burst of 400 digits made every job creation a 500 (OverflowError)."""
        if isinstance(v, int) and not isinstance(v, bool) and v > MAX_WHOLE_SETTING:
            raise ValueError(f"must be at most {MAX_WHOLE_SETTING}")
        return v

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir(cls, v: object) -> object:
        """An empty PALETTE_DATA_DIR ("$UNSET") would be the working directory: the development
        secrets written where a `git add .` takes them, and `palette up`'s database beside them."""
        if isinstance(v, str) and not v.strip():
            raise ValueError("is empty: unset it for .palette, or name a directory")
        return v

    @field_validator("api_host", "metrics_host")
    @classmethod
    def _host(cls, v: str) -> str:
        """An empty host ("$UNSET") is every interface to the servers that bind it (asyncio's,
        http.server's), and no host to `palette up`'s readiness probe of the API: the API, and
        the metrics ports, were served to the whole network instead of loopback, and `palette up`
        waited a minute for an API that answered and blamed it ("api not ready after 60s")."""
        if not v.strip():
            raise ValueError("is empty: unset it for 127.0.0.1, or name an address (0.0.0.0 for every interface)")
        return v

    @field_validator("jwt_audience")
    @classmethod
    def _jwt_audience(cls, v: str) -> str:
        """PyJWT takes an empty ``aud`` claim for a missing one: the API issued tokens and refused
        each of them (401 on every authenticated request)."""
        if not v:
            raise ValueError("is empty: unset it for palette-app, or name the tokens' audience")
        return v

    @field_validator("s3_bucket", "broker_bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        """S3's rules for a bucket's name, refused here: SeaweedFS and S3 refuse to create one
        that breaks them, which `palette up` found only once PostgreSQL was up (a traceback)."""
        if len(v) < 3:
            raise ValueError("bucket names need at least 3 characters")
        if not BUCKET_NAME.fullmatch(v) or ".." in v or IPV4_LIKE.fullmatch(v):
            raise ValueError("is no S3 bucket name (3 to 63 lowercase letters, digits, '.' and '-', "
                             "starting and ending with a letter or digit, no '..', not an IP address)")
        return v

    @field_validator("s3_region")
    @classmethod
    def _s3_region(cls, v: str) -> str:
        """What botocore takes for a region (a host label), refused here: every S3 client refused
        one that is not (`palette up` waited out SeaweedFS's start and blamed it)."""
        if not REGION_NAME.fullmatch(v):
            raise ValueError("is no region name (at most 63 letters, digits and '-', not all digits, "
                             "not starting or ending with '-')")
        return v

    @field_validator("callback_url")
    @classmethod
    def _callback_url(cls, v: str) -> str:
        """A URL the GPU worker's HTTP client takes, refused here: one it does not (an IPv6 host
        out of brackets) ended the worker at every start, and one without http(s) or a host
        failed every callback, the GPU queue's tasks taken again for ever."""
        if not v:
            return v
        import httpx

        try:
            url = httpx.URL(v)
        except httpx.InvalidURL:
            raise ValueError("is no URL (an IPv6 host goes in brackets: http://[::1]:8000)") from None
        if url.scheme not in ("http", "https") or not url.host or (url.port is not None and not 0 < url.port <= 65535):
            raise ValueError("must be an http:// or https:// URL with a host (and a port of 1 to 65535)")
        return v

    @field_validator("kafka_bootstrap")
    @classmethod
    def _kafka_bootstrap(cls, v: str) -> str:
        """Brokers as the Kafka clients read them (``host:port``, comma-separated, a host alone
        on 9092), refused here: a port that is no number (``kafka:abc``) ended every process that
        made a client with kafka-python's traceback, and `palette up` waited a minute on the
        broker, blaming it ("broker not ready after 60s")."""
        if not v:
            return v
        from kafka.cluster import collect_hosts

        try:
            brokers = collect_hosts(v, randomize=False)
        except ValueError:
            brokers = []
        if not brokers or any(not host.strip() or not 0 < port <= 65535 for host, port, _ in brokers):
            raise ValueError("must be host:port, comma-separated (an IPv6 host in brackets), "
                             "each with a host and a port of 1 to 65535")
        return v

    @field_validator("s3_endpoint")
    @classmethod
    def _s3_endpoint(cls, v: str) -> str:
        """A URL every S3 client here takes and can reach, refused here: one without a scheme
        (``localhost:8333``) was botocore's "Invalid endpoint" in every process, which the command
        line called "cannot reach the object store ... is the stack up", `palette up` included; one
        of another scheme or a port out of range made a client that failed each request, and
        `palette up` waited a minute on SeaweedFS for it."""
        if not v:
            return v
        from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

        try:
            parts = urlsplit(v)
            port = parts.port
        except ValueError:  # an IPv6 host out of brackets, a port out of range or not a number
            parts, port = None, None
        if (parts is None or parts.scheme not in ("http", "https") or port == 0
                or not (is_valid_endpoint_url(v) or is_valid_ipv6_endpoint_url(v))):
            raise ValueError("must be an http:// or https:// URL with a host (and a port of 1 to 65535), "
                             "e.g. http://127.0.0.1:8333")
        return v

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str) -> str:
        """A URL libpq can read, refused here rather than by each process that connects, and
        refused without its text (it holds the password)."""
        if not v:
            return v
        unreadable = ("cannot read this URL (percent-encode spaces, '/', '?', '#', '@' and other special "
                      "characters in the user name and password)")
        try:
            url = urlsplit(v)  # its ValueError may quote the netloc (NFKC), password included
        except ValueError:
            raise ValueError(unreadable) from None
        if url.scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        try:
            conninfo_to_dict(v)
            url.port  # noqa: B018 - the event store reads it (a password's "/" cuts the netloc short)
        except (psycopg.ProgrammingError, ValueError):
            raise ValueError(unreadable) from None
        if "@" in url.netloc.rpartition("@")[0]:
            # libpq ends the user name and password at the first "@", urlsplit (the event store)
            # at the last: each connected somewhere else, and libpq's host held the password's end
            raise ValueError(unreadable)
        if "," in url.netloc.rpartition("@")[2]:  # the hosts, not a password's ","
            raise ValueError("names several hosts: the event store connects to one")
        if not url.hostname:  # libpq took its Unix socket, the event store 127.0.0.1
            raise ValueError("names no host (postgresql://user:password@host:port/database)")
        # libpq takes these query parameters over the URL's parts, which the event store reads
        overridden = sorted(CONNECTION_TARGET.intersection(parse_qs(url.query, keep_blank_values=True)))
        if overridden:
            raise ValueError(f"sets {', '.join(overridden)} as a query parameter: write it in the URL itself")
        return v

    @field_validator("trace_trusted_peers")
    @classmethod
    def _trace_trusted_peers(cls, v: str) -> str:
        trusted_networks(v)
        return v

    @model_validator(mode="after")
    def _development_trace_peers(self) -> Settings:
        if self.env == "development" and "trace_trusted_peers" not in self.model_fields_set:
            self.trace_trusted_peers = DEV_TRACE_TRUSTED_PEERS
        return self

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _retry_schedule(cls, v: str) -> str:
        parse_schedule(v)
        return v

    @model_validator(mode="after")
    def _development_address_limits(self) -> Settings:
        """In development, each limit per client address not set is the DEV_ one: local tools and
        test suites run every user from loopback."""
        if self.env == "development":
            rate, burst = DEV_REGISTER_RATE
            if "rate_register_per_s" not in self.model_fields_set:
                self.rate_register_per_s = rate
            if "rate_register_burst" not in self.model_fields_set:
                self.rate_register_burst = burst
            if "rate_jobs_per_address_per_day" not in self.model_fields_set:
                self.rate_jobs_per_address_per_day = DEV_ADDRESS_JOBS_PER_DAY
            if "idempotency_keys_per_address" not in self.model_fields_set:
                self.idempotency_keys_per_address = DEV_ADDRESS_IDEMPOTENCY_KEYS
            if "rerun_copy_bytes_per_address_per_day" not in self.model_fields_set:
                self.rerun_copy_bytes_per_address_per_day = DEV_ADDRESS_RERUN_COPY_BYTES
        return self

    # -- derived values -------------------------------------------------------------
    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        pw = quote(self.pg_password, safe="")
        return f"postgresql://palette:{pw}@127.0.0.1:{self.pg_port}/palette"

    @property
    def effective_kafka_bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def api_url(self) -> str:
        """Where the GPU worker sends its callbacks."""
        host = f"[{self.api_host}]" if ":" in self.api_host else self.api_host  # an IPv6 address
        return self.callback_url or f"http://{host}:{self.api_port}"

    @property
    def effective_s3_endpoint(self) -> str:
        return self.s3_endpoint or f"http://127.0.0.1:{self.s3_port}"

    def as_env(self) -> dict[str, str]:
        """Every setting as ``PALETTE_*`` variables with the derived values filled in."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            out[f"PALETTE_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        out["PALETTE_DATABASE_URL"] = self.effective_database_url
        out["PALETTE_KAFKA_BOOTSTRAP"] = self.effective_kafka_bootstrap
        out["PALETTE_S3_ENDPOINT"] = self.effective_s3_endpoint
        return out

    def check_secrets(self) -> None:
        """Refuse, outside development, a signing secret that is a placeholder, short, or made of
        a few characters repeated ("k" * 32 is 32 bytes and next to no secret), and one secret
        given for two purposes: a token's key would then also sign GPU callbacks or device keys.
        The messages name the settings, never a value. In development too, the device keys'
        secret is refused under the length HmacDeviceKeyer takes (it would fail each process's
        start with a traceback)."""
        from application.device_keys import MIN_SECRET_BYTES as MIN_DEVICE_KEY_BYTES

        if len(self.device_key_secret.encode()) < MIN_DEVICE_KEY_BYTES:
            raise SettingsError(f"PALETTE_DEVICE_KEY_SECRET must be at least {MIN_DEVICE_KEY_BYTES} bytes "
                                "(it keys the device hashes)")
        if self.env == "development":
            return
        named: dict[str, str] = {}
        for name in SIGNING_SECRETS:
            value = getattr(self, name)
            if (value.lower() in PLACEHOLDER_SECRETS or len(value.encode()) < MIN_SECRET_BYTES
                    or len(set(value)) < MIN_SECRET_CHARACTERS):
                raise SettingsError(
                    f"PALETTE_{name.upper()} must be a real secret of at least {MIN_SECRET_BYTES} bytes "
                    f"and {MIN_SECRET_CHARACTERS} different characters when PALETTE_ENV=production"
                )
            if value in named:
                raise SettingsError(f"PALETTE_{name.upper()} must differ from PALETTE_{named[value].upper()}: "
                                    "each signs something else")
            named[value] = name

    # -- the GPU worker's memory, bounded by bytes ---------------------------------------------
    texture_cache_bytes: int = Field(256 * 1024 * 1024, ge=0)  # procedural textures, by region size
    # Idempotency keys of acknowledged results (duplicate tasks are dropped across polls), and
    # canceled job ids: each set within this budget, least recently seen out first.
    worker_remember_bytes: int = Field(8 * 1024 * 1024, ge=0)
    # A step of the GPU worker begins no item once it has run this long (the rest wait for the
    # next step, where users served least recently go first): one user's heavy job holds
    # another's items for about this and one item.
    gpu_step_s: float = Field(2.0, gt=0, le=600)


def trusted_networks(spec: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """``"10.0.0.0/8, ::1"`` as networks (an address alone is its own network); ValueError naming a bad one."""
    found = []
    for part in (p.strip() for p in spec.split(",")):
        if part:
            try:
                found.append(ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"{part!r} is not an IP network (e.g. 10.0.0.0/8)") from None
    return tuple(found)


def _dev_secrets(data_dir: Path) -> dict[str, str]:
    """Development secrets, generated once into the data directory (mode 0600). Made under a lock
    on the directory: processes started together on a fresh one (two `palette up`, `palette up`
    and `palette env`) each wrote their own, and one went on with secrets (the database's
    password its initdb set) that the file no longer held, or took the other's half-made file."""
    if (data_dir / "secrets.json").exists():  # the common case: nothing to make, no lock
        stored = _stored_secrets(data_dir / "secrets.json", set(SECRET_MAKERS))
        if set(stored) == set(SECRET_MAKERS):
            return stored
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        held = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:  # a directory that may be written, not read (mode -wx): made unlocked
        return _made_secrets(data_dir)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # released when closed
        return _made_secrets(data_dir)
    finally:
        os.close(held)


SECRET_MAKERS: dict[str, Callable[[], str]] = {
    "jwt_secret": lambda: secrets.token_urlsafe(48),
    "callback_secret": lambda: secrets.token_urlsafe(48),
    "s3_access_key": lambda: "palette" + secrets.token_hex(6),
    "s3_secret_key": lambda: secrets.token_urlsafe(32),
    "pg_password": lambda: secrets.token_urlsafe(24),
    "device_key_secret": lambda: secrets.token_urlsafe(48),
}


def _made_secrets(data_dir: Path) -> dict[str, str]:
    path = data_dir / "secrets.json"
    makers = SECRET_MAKERS
    stored = _stored_secrets(path, set(makers)) if path.exists() else {}
    missing = {name: make() for name, make in makers.items() if name not in stored}
    if not missing:
        return stored
    # A new data directory, or one from before a secret was added: the others are kept.
    generated = {**stored, **missing}
    # Durably: the database's password and the device keys' secret are in it, and a file a crash
    # cut would leave the stack unable to reach its own database, each device a new user.
    write_whole(path, json.dumps(generated), mode=0o600)
    return generated


def _stored_secrets(path: Path, names: set[str]) -> dict[str, str]:
    """The secrets file's values; SettingsError naming it when it is not a JSON object of
    ``names`` to non-empty strings (a hand edit: the file is written whole or not at all). Only
    secrets: any other setting would be taken from it unvalidated."""
    try:
        stored = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: the position, never the text
        raise SettingsError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(stored, dict) or not all(isinstance(v, str) and v for v in stored.values()):
        raise SettingsError(f"{path} must be a JSON object of secret names to non-empty strings")
    if unknown := set(stored) - names:  # counted, not named: a value pasted for a name is a secret
        raise SettingsError(f"{path} holds {len(unknown)} name(s) that are no secrets it keeps "
                            f"(it keeps {', '.join(sorted(names))})")
    if broken := sorted(name for name, value in stored.items() if breaks_lines(value)):
        raise SettingsError(f"{path}: {', '.join(broken)} {LINE_BREAK}")
    return stored


def load_settings(on_new_secrets: Callable[[Path], None] | None = None, /, **overrides: object) -> Settings:
    """Read the environment, fill development secrets from the data directory, validate
    (``on_new_secrets``: told when the data directory had none, and they were made)."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise SettingsError(_one_line(e)) from None
    try:
        settings.data_dir = settings.data_dir.expanduser().resolve()
    except (RuntimeError, OSError) as e:  # ~user of no such user, a symlink loop
        raise SettingsError(f"invalid setting PALETTE_DATA_DIR: cannot be resolved ({e})") from None
    if settings.env == "development":
        try:
            had = (settings.data_dir / "secrets.json").exists()
            if not had and _made_stack(settings.data_dir) and any(not getattr(settings, n) for n in SECRET_MAKERS):
                raise SettingsError(
                    f"{settings.data_dir / 'secrets.json'} is missing, but its stack was made with it (PostgreSQL's "
                    "password, the users' device keys): put it back, or start afresh in an empty PALETTE_DATA_DIR")
            dev = _dev_secrets(settings.data_dir)
        except OSError as e:
            raise SettingsError(unusable_data_dir(settings.data_dir, e)) from None
        taken = [name for name in dev if not getattr(settings, name)]
        for name in taken:
            setattr(settings, name, dev[name])
        if taken and not had and on_new_secrets is not None:
            on_new_secrets(settings.data_dir / "secrets.json")
    settings.check_secrets()
    return settings


def _made_stack(data_dir: Path) -> bool:
    """Whether `palette up` made its PostgreSQL for ``data_dir`` (in it, or noted elsewhere)."""
    return (data_dir / "pg" / "PG_VERSION").exists() or (data_dir / PG_ELSEWHERE).exists()


def _one_line(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return f"invalid setting PALETTE_{loc.upper()}: {first.get('msg')}"
    return str(e).splitlines()[0]
