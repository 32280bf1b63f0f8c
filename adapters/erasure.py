"""Erasing a user (``DELETE /me``, ``palette admin erase``), in an order that a crash at any step
leaves finishable: the tombstone (tokens refused, the device registers anew), the ``Erased``
event (unfinished jobs canceled and refunded, no command accepted after), the data key destroyed
(every sealed field unreadable), webhooks, kept idempotent answers and objects deleted, the
tombstone marked complete. Each step is idempotent; the sweeper finishes an erasure a crash cut
short once it is ``PALETTE_ERASURE_GRACE_S`` old (``adapters.retention``)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from eventsourcing.postgres import PostgresAggregateRecorder
from psycopg import sql

from adapters import keyring
from adapters.objects import OutOfTime, delete_prefixes
from application.executors import snapshot_recorder
from application.services import PaletteService
from domain.contracts.keys import user_prefixes
from domain.contracts.personal import ERASED, SEALED_PREFIX, sealed_owner
from domain.errors import InvalidState, NotFound
from domain.user import User
from projections.log import events_table

log = logging.getLogger("palette.erasure")
REGISTERED_TOPIC = "domain.user:User.Registered"
RULE_SLOT_TOPIC = "domain.user:User.RuleSlotTaken"
RULE_NAMED_TOPICS = ["domain.rule:Rule.RuleCreated", "domain.rule:Rule.RuleUpdated"]
REFRESH_S = 1.0  # how soon another API process refuses an erased user's tokens
LATE_S = 300.0  # each refresh reads again the tombstones this much older than the newest it has
PRUNE_EVERY_S = 60.0
KEEP_TRYING_S = 3 * REFRESH_S  # recording the erasure, while other processes may still start a job


@dataclass(frozen=True)
class Erasure:
    user_id: UUID
    recorded: bool  # this call recorded the Erased event (False: it already was)
    webhooks: int
    objects: int
    finished: bool = True  # False: out of time with objects left, which the sweeper deletes


def erase(service: PaletteService, pool: Any, s3: Any, bucket: str, user_id: UUID,
          must_exist: bool = True, tombstoned: Callable[[UUID], None] | None = None,
          deadline: float | None = None) -> Erasure:
    """Erase ``user_id`` (NotFound for no such user when ``must_exist``); ``tombstoned`` is called
    once the tombstone is stored (DELETE /me refuses the token from then on: an erasure that
    failed before it recorded nothing, and may be asked again). Past ``deadline``
    (``time.monotonic``) the objects left are the sweeper's: the tombstone stays unfinished."""
    if must_exist and not isinstance(service.executor.read(user_id), User):
        raise NotFound("user not found")
    with pool.connection() as conn:
        keyring.request_erasure(conn, user_id)
    if tombstoned is not None:
        tombstoned(user_id)
    recorded = record_erasure(service, user_id)
    service.sealer.forget(user_id)
    with pool.connection() as conn:
        redact_legacy_registration(conn, service.app, user_id)
        redact_legacy_rule_names(conn, service.app, user_id)
        webhooks = forget_user_data(conn, user_id)
    try:
        objects = delete_prefixes(s3, bucket, user_prefixes(user_id), deadline)
    except OutOfTime as e:  # a long-lived user's photos: hundreds of thousands, minutes to delete
        log.info("user %s erased but for objects (%d deleted so far): the sweeper deletes the rest", user_id,
                 e.deleted, extra={"user_id": str(user_id)})
        return Erasure(user_id, recorded, webhooks, e.deleted, finished=False)
    with pool.connection() as conn:
        keyring.complete_erasure(conn, user_id)
    log.info("user %s erased (%d webhook endpoints, %d objects)", user_id, webhooks, objects,
             extra={"user_id": str(user_id)})
    return Erasure(user_id, recorded, webhooks, objects)


def record_erasure(service: PaletteService, user_id: UUID, clock: Callable[[], float] = time.monotonic,
                   pause: Callable[[float], None] = time.sleep) -> bool:
    """Record the ``Erased`` event (True: this call did; False: it already was, or there is no
    user, a tombstone being finished). A job the user starts meanwhile through another API process
    makes a try fail (InvalidState); tried again for ``KEEP_TRYING_S``, past the ``REFRESH_S`` in
    which every process refuses the user's tokens, so a user starting jobs cannot outlast it."""
    until = clock() + KEEP_TRYING_S
    while True:
        try:
            return service.erase_user(user_id)
        except NotFound:
            return False
        except InvalidState:
            if clock() >= until:
                raise
            pause(0.05)


def redact_legacy_registration(conn: Any, app: Any, user_id: UUID) -> bool:
    """Drop the raw device hash from the user's v1 ``Registered`` event, if it has one (True).

    One of two places an event is rewritten: a user registered before device keys has the raw hash
    (a credential) in its stored v1 event, which no key ever sealed, so destroying a key cannot
    reach it. Every read already drops it (``User.Registered.upcast_v1_v2``); this drops it from
    the stored bytes too, leaving what every read saw. Nothing hashes stored states (the ledger's
    chain is over its own rows), so ``audit verify`` is unaffected."""
    mapper = app.mapper
    if getattr(mapper, "compressor", None) is not None or getattr(mapper, "cipher", None) is not None:
        log.warning("stored states are compressed or enciphered: the v1 registration of %s is left as it is", user_id)
        return False
    table = events_table(app.recorder)
    row = conn.execute(sql.SQL("SELECT state FROM {} WHERE originator_id = %s AND originator_version = 1 "
                               "AND topic = %s").format(table), [user_id, REGISTERED_TOPIC]).fetchone()
    if row is None:
        return False
    state = mapper.transcoder.decode(bytes(row[0]))
    if "device_hash" not in state:
        return False
    del state["device_hash"]
    conn.execute(sql.SQL("UPDATE {} SET state = %s WHERE originator_id = %s AND originator_version = 1 "
                         "AND topic = %s").format(table), [mapper.transcoder.encode(state), user_id, REGISTERED_TOPIC])
    return True


def redact_legacy_rule_names(conn: Any, app: Any, user_id: UUID) -> int:
    """Set to "erased" each rule name the user's rules hold in clear, in their stored events and in
    the ``rules`` read model; returns the events rewritten.

    Rules saved before sealing hold their names (personal) in clear, which destroying a key cannot
    reach. The user's ``RuleSlotTaken`` events name every rule it made, deleted ones too. Rewritten
    as the v1 registration is, and with it left as it is where stored states are not plain JSON;
    the snapshots of rules rewritten are deleted (each holds the name its rule had)."""
    mapper = app.mapper
    if getattr(mapper, "compressor", None) is not None or getattr(mapper, "cipher", None) is not None:
        return 0
    table = events_table(app.recorder)
    slots = conn.execute(sql.SQL("SELECT state FROM {} WHERE originator_id = %s AND topic = %s").format(table),
                         [user_id, RULE_SLOT_TOPIC]).fetchall()
    rule_ids = list({mapper.transcoder.decode(bytes(state))["rule_id"] for (state,) in slots})
    if not rule_ids:
        return 0
    rows = conn.execute(sql.SQL("SELECT originator_id, originator_version, state FROM {} "
                                "WHERE originator_id = ANY(%s) AND topic = ANY(%s)").format(table),
                        [rule_ids, RULE_NAMED_TOPICS]).fetchall()
    rewritten = 0
    for rule_id, version, stored in rows:
        state = mapper.transcoder.decode(bytes(stored))
        if sealed_owner(state.get("name")) is not None or state.get("name") == ERASED:
            continue
        state["name"] = ERASED
        conn.execute(sql.SQL("UPDATE {} SET state = %s WHERE originator_id = %s AND originator_version = %s")
                     .format(table), [mapper.transcoder.encode(state), rule_id, version])
        rewritten += 1
    if _exists(conn, "palette_read.rules"):
        conn.execute("UPDATE palette_read.rules SET name = %s WHERE id = ANY(%s) AND name <> %s "
                     "AND NOT starts_with(name, %s)", [ERASED, rule_ids, ERASED, SEALED_PREFIX])
    snapshots = snapshot_recorder(app)
    if rewritten and isinstance(snapshots, PostgresAggregateRecorder):  # a snapshot holds the name as it was
        conn.execute(sql.SQL("DELETE FROM {} WHERE originator_id = ANY(%s)").format(events_table(snapshots)),
                     [rule_ids])  # a load folds the rewritten events instead
    return rewritten


def forget_user_data(conn: Any, user_id: UUID) -> int:
    """Delete what the user left in PostgreSQL outside the event store: webhook endpoints (their
    deliveries and attempts cascade) and the answers kept for the user's Idempotency-Keys, which
    hold what the API answered — a rule's name in clear, upload links — and would be replayed to
    the user's token. Returns the number of endpoints deleted. The sweeper calls it again a while
    after the erasure, for what a request in flight during it wrote afterwards."""
    from adapters.webhooks.store import forget_user

    endpoints = forget_user(conn, user_id) if _exists(conn, "palette_webhooks.endpoints") else 0
    if _exists(conn, "palette_api.idempotency"):
        # the scope adapters.api.idempotency gives a client's keys
        conn.execute("DELETE FROM palette_api.idempotency WHERE scope = %s", [f"user:{user_id}"])
    return endpoints


def forget_job_deliveries(conn: Any, job_id: UUID) -> int:
    """Delete a deleted job's webhook deliveries (they hold its public view); the number deleted.
    The sweeper calls it again a while after the deletion, for what a request that died between
    recording it and forgetting them left."""
    from adapters.webhooks.store import forget_job

    return forget_job(conn, job_id) if _exists(conn, "palette_webhooks.deliveries") else 0


def _exists(conn: Any, table: str) -> bool:
    """Whether ``table`` is there: a database no API ever ran on has neither the webhooks' tables
    nor the kept answers'."""
    return bool(conn.execute("SELECT to_regclass(%s)", [table]).fetchone() != (None,))


class ErasedUsers:
    """The users erased within a token's lifetime, for refusing their tokens (and dropping their
    keys from this process's memory): this process's own erasures at once, other processes'
    within ``refresh_s``. A refresh reads only the tombstones requested since the newest it
    knows, less ``LATE_S`` (so one whose transaction committed late is not missed), not the whole
    window: one client erasing users at its registration limit makes the window hundreds of
    thousands of users. Older erasures are dropped: every token issued before them has expired."""

    def __init__(self, pool: Any, token_ttl_s: float, refresh_s: float = REFRESH_S,
                 clock: Callable[[], float] = time.monotonic,
                 on_erased: Callable[[UUID], None] | None = None) -> None:
        self.pool = pool
        # Called with each user a refresh reads (this process's sealer drops their key). A tombstone
        # is read again for LATE_S after the newest: a key read again between an erasure's tombstone
        # and its destroy (a moment later, in another process) is dropped again.
        self.on_erased = on_erased
        self.within_s = token_ttl_s + 60.0  # the issuer's leeway and clock skew, generously
        self.refresh_s = refresh_s
        self.clock = clock
        self._stored: dict[UUID, datetime] = {}  # when each was requested
        self._read_after: datetime | None = None
        self._next_prune = clock()
        self._local: dict[UUID, float] = {}  # this process's erasures, until a refresh shows them
        self._lock = threading.Lock()

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._stored or user_id in self._local

    def add(self, user_id: UUID) -> None:
        with self._lock:
            self._local[user_id] = self.clock()

    def refresh(self) -> None:
        """Read the tombstones requested since the last refresh (I/O: call on a thread)."""
        with self.pool.connection() as conn:
            found = keyring.erased_since(conn, self.within_s, self._read_after, LATE_S)
        stored = self._stored
        stored.update(found)  # one thread refreshes; readers only test membership
        if self.on_erased is not None:
            for user_id, _ in found:
                self.on_erased(user_id)
        if found:  # in UTC: in the session's time zone, taking LATE_S off is wall-clock arithmetic
            newest = max(at for _, at in found).astimezone(UTC)
            if self._read_after is None or newest - timedelta(seconds=LATE_S) > self._read_after:
                self._read_after = newest - timedelta(seconds=LATE_S)
        if self.clock() >= self._next_prune:  # the expired ones, now and then (a pass over them all)
            self._next_prune = self.clock() + PRUNE_EVERY_S
            expired = datetime.now(UTC) - timedelta(seconds=self.within_s)
            for user_id in [u for u, at in stored.items() if at < expired]:
                del stored[user_id]
        horizon = self.clock() - self.within_s
        with self._lock:
            self._local = {u: at for u, at in self._local.items() if at >= horizon and u not in stored}

    async def run(self) -> None:
        """Refresh every ``refresh_s`` until canceled; a failed refresh is retried next time."""
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                log.warning("could not read erasures; retrying", exc_info=True)
            await asyncio.sleep(self.refresh_s)
