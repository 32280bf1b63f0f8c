"""The webhook tables (schema ``palette_webhooks``) and every statement on them.

``endpoints`` (a user's URLs, their event types and signing secrets), ``deliveries`` (one per
endpoint and event: the signed body, its state and its next try; kept a week once finished, or
once its endpoint was disabled) and ``attempts`` (one row per POST, a delivery's latest
``SHOWN_ATTEMPTS`` kept). A delivery is due when it is pending, its time has come, its endpoint
is enabled and no earlier delivery of the same job to the same endpoint is pending (order per
job). Claiming one moves its time a lease ahead (``leased_until``), so a sender that dies
mid-POST leaves it due again after the lease, and a redelivery or an enable meanwhile leaves it
to the attempt in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from adapters.ddl import run_locked
from adapters.webhooks.targets import Outcome, normalised

DDL = (
    "CREATE SCHEMA IF NOT EXISTS palette_webhooks",
    "CREATE TABLE IF NOT EXISTS palette_webhooks.endpoints (id uuid PRIMARY KEY, user_id uuid NOT NULL, "
    "url text NOT NULL, events text[] NOT NULL, secret text NOT NULL, previous_secret text, "
    "previous_until timestamptz, enabled boolean NOT NULL DEFAULT true, disabled_at timestamptz, "
    "failures integer NOT NULL DEFAULT 0, failing_since timestamptz, "
    "created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE INDEX IF NOT EXISTS endpoints_user ON palette_webhooks.endpoints (user_id)",
    # What the hourly prune looks for among every user's endpoints: the few disabled ones, and
    # replaced secrets (partial indexes: an endpoint in neither state is in neither index).
    "CREATE INDEX IF NOT EXISTS endpoints_disabled ON palette_webhooks.endpoints (disabled_at) WHERE NOT enabled",
    "CREATE INDEX IF NOT EXISTS endpoints_replaced_secret ON palette_webhooks.endpoints (previous_until) "
    "WHERE previous_secret IS NOT NULL",
    # The Idempotency-Key of the latest rotation (a hash of it): its retry rotates no further
    # (looked for first: ALTER TABLE locks the table even when it changes nothing).
    "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = "
    "'palette_webhooks' AND table_name = 'endpoints' AND column_name = 'rotated_by') THEN "
    "ALTER TABLE palette_webhooks.endpoints ADD COLUMN rotated_by text; END IF; END $$",
    "CREATE TABLE IF NOT EXISTS palette_webhooks.deliveries (id uuid PRIMARY KEY, "
    "endpoint_id uuid NOT NULL REFERENCES palette_webhooks.endpoints ON DELETE CASCADE, "
    "message_id text NOT NULL, job_id uuid NOT NULL, version integer NOT NULL, event_type text NOT NULL, "
    "body bytea NOT NULL, status text NOT NULL DEFAULT 'pending', tries integer NOT NULL DEFAULT 0, "
    "attempts integer NOT NULL DEFAULT 0, next_attempt_at timestamptz, last_status_code integer, "
    "last_error text, created_at timestamptz NOT NULL DEFAULT now(), UNIQUE (endpoint_id, message_id))",
    "CREATE INDEX IF NOT EXISTS deliveries_due ON palette_webhooks.deliveries (next_attempt_at) "
    "WHERE status = 'pending'",
    "CREATE INDEX IF NOT EXISTS deliveries_job ON palette_webhooks.deliveries (endpoint_id, job_id, version) "
    "WHERE status = 'pending'",
    "CREATE INDEX IF NOT EXISTS deliveries_recent ON palette_webhooks.deliveries (endpoint_id, created_at)",
    # A deleted job's deliveries (forget_job): without it, each deletion read every user's deliveries.
    "CREATE INDEX IF NOT EXISTS deliveries_of_job ON palette_webhooks.deliveries (job_id)",
    "CREATE INDEX IF NOT EXISTS deliveries_done ON palette_webhooks.deliveries (created_at) "
    "WHERE status <> 'pending'",
    "CREATE TABLE IF NOT EXISTS palette_webhooks.attempts (delivery_id uuid NOT NULL "
    "REFERENCES palette_webhooks.deliveries ON DELETE CASCADE, n integer NOT NULL, at timestamptz NOT NULL "
    "DEFAULT now(), status_code integer, error text NOT NULL, response text NOT NULL, "
    "duration_ms integer NOT NULL, PRIMARY KEY (delivery_id, n))",
    "CREATE TABLE IF NOT EXISTS palette_webhooks.positions (name text PRIMARY KEY, position bigint NOT NULL, "
    "updated_at timestamptz NOT NULL DEFAULT now())",
    # Until when a failing endpoint gets no attempt (a column added after the first release; looked
    # for first: ALTER TABLE locks the table even when it changes nothing).
    "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = "
    "'palette_webhooks' AND table_name = 'endpoints' AND column_name = 'held_until') THEN "
    "ALTER TABLE palette_webhooks.endpoints ADD COLUMN held_until timestamptz; END IF; END $$",
    # Whether the endpoint ever answered an attempt with success (added after held_until: those
    # with a delivery that succeeded are taken for proven).
    "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = "
    "'palette_webhooks' AND table_name = 'endpoints' AND column_name = 'proven') THEN "
    "ALTER TABLE palette_webhooks.endpoints ADD COLUMN proven boolean NOT NULL DEFAULT false; "
    "UPDATE palette_webhooks.endpoints e SET proven = true WHERE EXISTS (SELECT 1 FROM "
    "palette_webhooks.deliveries d WHERE d.endpoint_id = e.id AND d.status = 'succeeded'); END IF; END $$",
    # When the endpoint was last enabled again (NULL: never disabled since made): it receives the
    # events from then on only, as it got none of those while it was disabled. A job folded again
    # (a restarted consumer, one gone from its cache) recorded those too, after the job's later
    # events had gone out (added after proven).
    "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = "
    "'palette_webhooks' AND table_name = 'endpoints' AND column_name = 'enabled_since') THEN "
    "ALTER TABLE palette_webhooks.endpoints ADD COLUMN enabled_since timestamptz; END IF; END $$",
    # The end of the delivery's latest claim: while its next try is that and still ahead, an
    # attempt of it is in flight, which a redelivery or an enable leaves the only one (added
    # after enabled_since).
    "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = "
    "'palette_webhooks' AND table_name = 'deliveries' AND column_name = 'leased_until') THEN "
    "ALTER TABLE palette_webhooks.deliveries ADD COLUMN leased_until timestamptz; END IF; END $$",
    # A release before 2026-12-06 left a disabled endpoint's pending deliveries due: they wait for
    # an enable, out of the claims' way, as ``finish`` leaves them now (those in flight keep their
    # claim). Few rows to look at: the disabled endpoints' pending deliveries, by index. No enable
    # interleaves: the CREATE INDEXes above hold the deliveries' SHARE lock to this transaction's end,
    # so an enable has updated them and committed before this reads its endpoint, or waits for it to end.
    "UPDATE palette_webhooks.deliveries d SET next_attempt_at = NULL FROM palette_webhooks.endpoints e "
    "WHERE NOT e.enabled AND d.endpoint_id = e.id AND d.status = 'pending' AND d.next_attempt_at IS NOT NULL "
    "AND NOT coalesce(d.next_attempt_at = d.leased_until AND d.leased_until > now(), false)",
)
# A delivery whose attempt is in flight (claimed, its lease not over, its outcome not recorded).
_IN_FLIGHT = sql.SQL("(d.status = 'pending' AND d.next_attempt_at = d.leased_until AND d.leased_until > now())")
# A held endpoint's due deliveries wait until its hold ends (``next_attempt_at`` = ``held_until``):
# the claim's index scan does not walk past them. Ending the hold early makes them due again.
_RELEASE = ("UPDATE palette_webhooks.deliveries d SET next_attempt_at = now() FROM palette_webhooks.endpoints e "
            "WHERE e.id = %s AND d.endpoint_id = e.id AND d.status = 'pending' AND d.next_attempt_at = e.held_until")
POSITIONS = ("palette_webhooks", "positions")
ROTATION_GRACE_S = 24 * 3600  # the secret a rotation replaced still signs this long
SHOWN_ATTEMPTS = 20  # attempts listed per delivery, the latest first, and all that are kept
# The answers' heads one page of the deliveries list carries at most (UTF-8 bytes, as stored): a
# page's deliveries times their attempts times 4 KiB was 16 MB (~50 MB of JSON) per request.
LISTED_ANSWER_BYTES = 512 * 1024
CLAIM_WINDOW = 1000  # the longest-due deliveries a claim looks at, of those it could take
CLAIM_SCAN = 10 * CLAIM_WINDOW  # the longest-due deliveries it reads to find them
_ENDPOINT = sql.SQL("id, url, events, enabled, disabled_at, created_at")


class EndpointsFull(Exception):
    """The user has as many endpoints as allowed."""


class KeyReused(Exception):
    """An Idempotency-Key's endpoint was made for another request."""


class ChangedSince(Exception):
    """An Idempotency-Key's endpoint has changed since it was made (its secret rotated): the
    retry cannot be answered as the creation left it, and shows no secret it did not make."""


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    run_locked(conn, "palette-webhooks-ddl", DDL)


# -- endpoints (the API) ------------------------------------------------------------------------
def create_endpoint(conn: psycopg.Connection[Any], user_id: UUID, url: str, events: Sequence[str],
                    secret: str, limit: int, endpoint_id: UUID | None = None) -> dict[str, Any]:
    """A new endpoint, its URL's host stored in ASCII (``targets.normalised``), with ``secret``
    under ``"secret"``; raises EndpointsFull when the user has ``limit`` already. With an
    ``endpoint_id`` (derived from an Idempotency-Key) that the user's endpoint of this URL and these
    events has already, that one is answered, with its secret: the retry of a creation whose answer
    a crash lost makes no second endpoint (KeyReused: one of another URL or events has it)."""
    url = normalised(url)
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('palette-webhooks:' || %s::text))", [user_id])
        if endpoint_id is not None:
            made = cur.execute(sql.SQL("SELECT {}, user_id, secret, previous_until FROM palette_webhooks.endpoints "
                                       "WHERE id = %s").format(_ENDPOINT), [endpoint_id]).fetchone()
            if made is not None:
                if made.pop("user_id") != user_id or made["url"] != url or list(made["events"]) != list(events):
                    raise KeyReused("Idempotency-Key reused with a different request")
                if made.pop("previous_until") is not None:  # rotated since: its secret is no longer the one made
                    raise ChangedSince("this key's endpoint has had its secret rotated since; see GET /webhooks")
                return made
        count = cur.execute("SELECT count(*) AS n FROM palette_webhooks.endpoints WHERE user_id = %s",
                            [user_id]).fetchone()
        if count is not None and count["n"] >= limit:
            raise EndpointsFull(f"at most {limit} webhook endpoints per user")
        row = cur.execute(sql.SQL("INSERT INTO palette_webhooks.endpoints (id, user_id, url, events, secret) "
                                  "VALUES (%s, %s, %s, %s, %s) RETURNING {}, secret").format(_ENDPOINT),
                          [endpoint_id or uuid4(), user_id, url, list(events), secret]).fetchone()
    assert row is not None
    return row


def any_endpoint(conn: psycopg.Connection[Any]) -> bool:
    """Whether any user has an endpoint (enabled or not)."""
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM palette_webhooks.endpoints)").fetchone()
    return bool(row and row[0])


def list_endpoints(conn: psycopg.Connection[Any], user_id: UUID) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql.SQL("SELECT {} FROM palette_webhooks.endpoints WHERE user_id = %s "
                                   "ORDER BY created_at, id").format(_ENDPOINT), [user_id]).fetchall()


def get_endpoint(conn: psycopg.Connection[Any], user_id: UUID, endpoint_id: UUID) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql.SQL("SELECT {} FROM palette_webhooks.endpoints WHERE id = %s AND user_id = %s")
                           .format(_ENDPOINT), [endpoint_id, user_id]).fetchone()


def delete_endpoint(conn: psycopg.Connection[Any], user_id: UUID, endpoint_id: UUID) -> bool:
    """Delete the endpoint with its deliveries and attempts."""
    cur = conn.execute("DELETE FROM palette_webhooks.endpoints WHERE id = %s AND user_id = %s",
                       [endpoint_id, user_id])
    return cur.rowcount == 1


def forget_job(conn: psycopg.Connection[Any], job_id: UUID) -> int:
    """A deleted job's deliveries (and their attempts): they hold its public view."""
    return conn.execute("DELETE FROM palette_webhooks.deliveries WHERE job_id = %s", [job_id]).rowcount


def forget_user(conn: psycopg.Connection[Any], user_id: UUID) -> int:
    """An erased user's endpoints, with their deliveries and attempts (ON DELETE CASCADE)."""
    return conn.execute("DELETE FROM palette_webhooks.endpoints WHERE user_id = %s", [user_id]).rowcount


def rotate_secret(conn: psycopg.Connection[Any], user_id: UUID, endpoint_id: UUID,
                  secret: str, rotated_by: str | None = None) -> dict[str, Any] | None:
    """A new secret (under ``"secret"``); the replaced one keeps signing (alongside) for
    ``ROTATION_GRACE_S``, then ``prune`` erases it. ``rotated_by`` names the request (its
    Idempotency-Key): while the latest rotation is the one it made, that secret is answered and
    nothing rotates, so a retry after a crash that lost the stored answer does not push the
    client's own secret out of its grace. In one transaction, the endpoint's row locked: a
    rotation meanwhile waits."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        current = cur.execute(sql.SQL("SELECT {}, secret, rotated_by FROM palette_webhooks.endpoints "
                                       "WHERE id = %s AND user_id = %s FOR UPDATE").format(_ENDPOINT),
                              [endpoint_id, user_id]).fetchone()
        if current is None:
            return None
        if rotated_by is not None and current.pop("rotated_by") == rotated_by:
            return current
        return cur.execute(sql.SQL(
            "UPDATE palette_webhooks.endpoints SET previous_secret = secret, secret = %s, rotated_by = %s, "
            "previous_until = now() + %s * interval '1 second' WHERE id = %s RETURNING {}, secret").format(_ENDPOINT),
            [secret, rotated_by, ROTATION_GRACE_S, endpoint_id]).fetchone()


def enable_endpoint(conn: psycopg.Connection[Any], user_id: UUID, endpoint_id: UUID,
                    keep_s: float) -> dict[str, Any] | None:
    """Enable a disabled endpoint again: its failure run forgotten, its pending deliveries due
    now (not those whose attempt is in flight: another sender would POST them at once too), or
    forgotten if it was disabled more than ``keep_s`` ago (as ``prune``'s hourly round would have),
    and the events from now on recorded for it (``enabled_since``: none from while it was disabled,
    however often the consumer folds their job again). An enabled one is left as it is (an enable
    is no way around a hold); None: no such endpoint. It first waits for the recordings under
    way (``record`` locks the endpoint FOR KEY SHARE, which an UPDATE of it does not wait for):
    one that read the endpoint disabled inserts its deliveries not due, and committed after this
    update they were not made due by it, nor ever after."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        locked = cur.execute("SELECT disabled_at < now() - %s * interval '1 second' AS forgotten "
                             "FROM palette_webhooks.endpoints WHERE id = %s AND user_id = %s FOR UPDATE",
                             [keep_s, endpoint_id, user_id]).fetchone()
        row = cur.execute(sql.SQL(
            "UPDATE palette_webhooks.endpoints SET enabled = true, disabled_at = NULL, failures = 0, "
            "enabled_since = now(), "
            "failing_since = NULL, held_until = NULL WHERE id = %s AND user_id = %s AND NOT enabled "
            "RETURNING {}").format(_ENDPOINT), [endpoint_id, user_id]).fetchone()
        if row is None:
            return get_endpoint(conn, user_id, endpoint_id)
        if locked is not None and locked["forgotten"]:
            cur.execute("DELETE FROM palette_webhooks.deliveries WHERE endpoint_id = %s AND status = 'pending'",
                        [endpoint_id])
        cur.execute(sql.SQL("UPDATE palette_webhooks.deliveries d SET next_attempt_at = now() "
                            "WHERE endpoint_id = %s AND status = 'pending' AND NOT coalesce({}, false)")
                    .format(_IN_FLIGHT), [endpoint_id])
    return row


_DELIVERY = sql.SQL("d.id, d.message_id, d.event_type, d.job_id, d.status, d.attempts AS attempt_count, "
                    "d.next_attempt_at, d.last_status_code, d.last_error, d.created_at")


def _with_attempts(cur: psycopg.Cursor[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ids = [r["id"] for r in rows]
    found: dict[UUID, list[dict[str, Any]]] = {i: [] for i in ids}
    for a in cur.execute(
            "SELECT a.delivery_id, a.n, a.at, a.status_code, a.error, a.response, a.duration_ms "
            "FROM unnest(%s::uuid[]) AS i(id) "
            "CROSS JOIN LATERAL (SELECT * FROM palette_webhooks.attempts WHERE delivery_id = i.id "
            "ORDER BY n DESC LIMIT %s) a", [ids, SHOWN_ATTEMPTS]).fetchall():
        found[a.pop("delivery_id")].append(a)
    return [{**r, "attempts": found[r["id"]]} for r in rows]


def list_deliveries(conn: psycopg.Connection[Any], user_id: UUID, endpoint_id: UUID,
                    limit: int) -> list[dict[str, Any]] | None:
    """The endpoint's latest deliveries (at most ``limit``) with their latest attempts, the page
    ending before the delivery whose attempts' answers would take it past ``LISTED_ANSWER_BYTES``
    (the newest is always listed); None: no such endpoint."""
    if get_endpoint(conn, user_id, endpoint_id) is None:
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(sql.SQL("SELECT {} FROM palette_webhooks.deliveries d WHERE d.endpoint_id = %s "
                                   "ORDER BY d.created_at DESC, d.version DESC LIMIT %s").format(_DELIVERY),
                           [endpoint_id, limit]).fetchall()
        sizes = {r["id"]: r["n"] for r in cur.execute(
            "SELECT i.id, (SELECT coalesce(sum(octet_length(a.response)), 0) FROM (SELECT response FROM "
            "palette_webhooks.attempts WHERE delivery_id = i.id ORDER BY n DESC LIMIT %s) a) AS n "
            "FROM unnest(%s::uuid[]) AS i(id)", [SHOWN_ATTEMPTS, [r["id"] for r in rows]]).fetchall()}
        page: list[dict[str, Any]] = []
        answers = 0
        for row in rows:
            answers += sizes.get(row["id"], 0)
            if page and answers > LISTED_ANSWER_BYTES:
                break
            page.append(row)
        return _with_attempts(cur, page)


def redeliver(conn: psycopg.Connection[Any], user_id: UUID, endpoint_id: UUID,
              delivery_id: UUID) -> dict[str, Any] | None:
    """The delivery pending again, due now, with a fresh retry schedule (same message id); the
    endpoint is tried now even if failures held it (its owner says it works again). One whose
    attempt is in flight keeps its claim (that attempt is the one asked for: made due now, another
    sender took it while the first still held it, and POSTed it twice at once)."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(sql.SQL(
            "UPDATE palette_webhooks.deliveries d SET status = 'pending', tries = 0, "
            "next_attempt_at = CASE WHEN {in_flight} THEN d.next_attempt_at WHEN e.enabled THEN now() END "
            "FROM palette_webhooks.endpoints e WHERE d.id = %s AND d.endpoint_id = %s AND e.id = d.endpoint_id "
            "AND e.user_id = %s RETURNING {fields}").format(in_flight=_IN_FLIGHT, fields=_DELIVERY),
            [delivery_id, endpoint_id, user_id]).fetchall()
        if rows:
            cur.execute(_RELEASE, [endpoint_id])
            cur.execute("UPDATE palette_webhooks.endpoints SET held_until = NULL WHERE id = %s", [endpoint_id])
        return _with_attempts(cur, rows)[0] if rows else None


# -- recording (the consumer) ---------------------------------------------------------------------
@dataclass(frozen=True)
class Subscriber:
    endpoint_id: UUID
    user_id: UUID
    events: tuple[str, ...]
    since: datetime  # the events from then on are its: made, or last enabled again


@dataclass(frozen=True)
class NewDelivery:
    endpoint_id: UUID
    message_id: str
    job_id: UUID
    version: int
    event_type: str
    body: bytes


def subscribers(conn: psycopg.Connection[Any], user_ids: Sequence[UUID]) -> list[Subscriber]:
    """The enabled endpoints of these users, each with the time it receives events from (made,
    or last enabled again)."""
    rows = conn.execute("SELECT id, user_id, events, coalesce(enabled_since, created_at) "
                        "FROM palette_webhooks.endpoints WHERE user_id = ANY(%s) AND enabled",
                        [list(user_ids)]).fetchall()
    return [Subscriber(r[0], r[1], tuple(r[2]), r[3]) for r in rows]


def recorded(conn: psycopg.Connection[Any], keys: Sequence[tuple[UUID, str]]) -> set[tuple[UUID, str]]:
    """Which (endpoint, message id) pairs already have a delivery."""
    if not keys:
        return set()
    endpoint_ids, message_ids = zip(*keys, strict=True)
    rows = conn.execute("SELECT d.endpoint_id, d.message_id FROM unnest(%s::uuid[], %s::text[]) AS k(e, m) "
                        "JOIN palette_webhooks.deliveries d ON d.endpoint_id = k.e AND d.message_id = k.m",
                        [list(endpoint_ids), list(message_ids)]).fetchall()
    return {(r[0], r[1]) for r in rows}


def record(conn: psycopg.Connection[Any], deliveries: Sequence[NewDelivery]) -> int:
    """Insert the deliveries in one transaction, due now (or when their endpoint's hold ends);
    those already there are left alone, and so are those of endpoints deleted since their
    subscribers were read (the endpoints still there are locked against deletion until the inserts
    commit: a delete then takes them with it; one disabled since gets its deliveries not due, as
    ``finish`` leaves a disabled endpoint's, until an enable). Returns how many were for endpoints
    still there."""
    if not deliveries:
        return 0
    with conn.transaction(), conn.cursor() as cur:
        live = {r[0]: (r[1], r[2]) for r in cur.execute(
            "SELECT id, enabled, held_until FROM palette_webhooks.endpoints WHERE id = ANY(%s) FOR KEY SHARE",
            [list({d.endpoint_id for d in deliveries})]).fetchall()}
        kept = [d for d in deliveries if d.endpoint_id in live]
        cur.executemany(
            "INSERT INTO palette_webhooks.deliveries (id, endpoint_id, message_id, job_id, version, event_type, "
            "body, next_attempt_at) VALUES (%s, %s, %s, %s, %s, %s, %s, "
            "CASE WHEN %s THEN greatest(now(), %s::timestamptz) END) "
            "ON CONFLICT (endpoint_id, message_id) DO NOTHING",
            [(uuid4(), d.endpoint_id, d.message_id, d.job_id, d.version, d.event_type, d.body, *live[d.endpoint_id])
             for d in kept])
    return len(kept)


# -- sending (the sender) -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Due:
    id: UUID
    message_id: str
    body: bytes
    tries: int
    url: str
    keys: tuple[str, ...]  # the secrets that sign it: the current one, and a rotated one in its grace
    lease: datetime | None = None  # when the claim ends: only this claim's attempt may record its outcome
    user_id: UUID | None = None  # the endpoint's owner (whose attempts in flight are counted)
    suspect: bool = False  # to an endpoint that never succeeded, or whose last attempt failed


def claim(conn: psycopg.Connection[Any], limit: int, lease_s: float, per_user: int | None = None,
          busy: Mapping[UUID, int] | None = None, suspects: int | None = None,
          suspects_busy: int = 0) -> list[Due]:
    """Up to ``limit`` due deliveries (oldest due first), leased for ``lease_s``; none to an
    endpoint that failures hold. With ``per_user``, at most that many of one user's deliveries
    are in flight, counting ``busy`` (the caller's attempts in flight, by user): one user's
    endpoints that hang cannot take every sender thread from everyone else's (and each user's
    first delivery comes before anyone's second). With ``suspects``, at most that many attempts
    are in flight to suspect endpoints (that never succeeded, or whose last attempt failed),
    counting ``suspects_busy``: the endpoints that answer keep the other threads, however many
    users' endpoints hang.

    It looks at the ``CLAIM_WINDOW`` deliveries due longest of those it could take: not those of
    a user at ``per_user``, nor a suspect's when the suspects' share is taken, nor a disabled or
    held endpoint's, nor one waiting on an earlier delivery of its job (order), so that a backlog
    it may not take does not hide one it may; and to find them it reads at most the
    ``CLAIM_SCAN`` due longest (a claim's cost does not grow with the backlog). It checks again
    on each row it locks that it is still due (another sender's claim may have leased it since
    this one's snapshot)."""
    busy = busy or {}
    full = [user for user, n in busy.items() if per_user is not None and n >= per_user]
    rows = conn.execute(
        "WITH candidates AS (SELECT s.id, s.endpoint_id, s.job_id, s.version, s.next_attempt_at, e.user_id, "
        "NOT e.proven OR e.failures > 0 AS suspect FROM (SELECT d.id, d.endpoint_id, d.job_id, d.version, "
        "d.next_attempt_at FROM palette_webhooks.deliveries d WHERE d.status = 'pending' "
        "AND d.next_attempt_at <= now() ORDER BY d.next_attempt_at LIMIT %(scan)s) s "
        "JOIN palette_webhooks.endpoints e ON e.id = s.endpoint_id "
        "WHERE e.enabled AND (e.held_until IS NULL OR e.held_until <= now()) AND e.user_id <> ALL(%(full)s::uuid[]) "
        "AND (%(suspects_open)s OR (e.proven AND e.failures = 0)) "
        "AND NOT EXISTS (SELECT 1 FROM palette_webhooks.deliveries p WHERE p.endpoint_id = s.endpoint_id "
        "AND p.job_id = s.job_id AND p.status = 'pending' AND p.version < s.version) "
        "ORDER BY s.next_attempt_at LIMIT %(window)s), "
        "ready AS (SELECT c.id, c.next_attempt_at, c.suspect, "
        "row_number() OVER (PARTITION BY c.user_id ORDER BY c.next_attempt_at) + coalesce(b.n, 0) AS place "
        "FROM candidates c "
        "LEFT JOIN unnest(%(users)s::uuid[], %(counts)s::int[]) AS b(user_id, n) ON b.user_id = c.user_id), "
        "allowed AS (SELECT r.*, CASE WHEN r.suspect THEN row_number() OVER (PARTITION BY r.suspect "
        "ORDER BY r.place, r.next_attempt_at) + %(suspects_busy)s END AS suspect_place FROM ready r "
        "WHERE %(per_user)s::int IS NULL OR r.place <= %(per_user)s), "
        "due AS (SELECT d.id FROM palette_webhooks.deliveries d JOIN allowed a ON a.id = d.id "
        "WHERE d.status = 'pending' AND d.next_attempt_at <= now() "
        "AND (%(suspects)s::int IS NULL OR a.suspect_place IS NULL OR a.suspect_place <= %(suspects)s) "
        "ORDER BY a.place, a.next_attempt_at LIMIT %(limit)s FOR UPDATE OF d SKIP LOCKED) "
        "UPDATE palette_webhooks.deliveries d SET next_attempt_at = now() + %(lease)s * interval '1 second', "
        "leased_until = now() + %(lease)s * interval '1 second' "
        "FROM due, palette_webhooks.endpoints e WHERE d.id = due.id AND e.id = d.endpoint_id "
        "RETURNING d.id, d.message_id, d.body, d.tries, e.url, e.secret, "
        "CASE WHEN e.previous_until > now() THEN e.previous_secret END, d.next_attempt_at, e.user_id, "
        "NOT e.proven OR e.failures > 0",
        {"users": list(busy), "counts": list(busy.values()), "per_user": per_user, "limit": limit,
         "lease": lease_s, "window": max(limit, CLAIM_WINDOW), "scan": max(limit, CLAIM_SCAN), "full": full,
         "suspects": suspects, "suspects_busy": suspects_busy,
         "suspects_open": suspects is None or suspects_busy < suspects}).fetchall()
    return [Due(r[0], r[1], bytes(r[2]), r[3], r[4], tuple(k for k in (r[5], r[6]) if k), r[7], r[8], r[9])
            for r in rows]


def finish(conn: psycopg.Connection[Any], delivery_id: UUID, outcome: Outcome, retry_in_s: float | None,
           disable_after: int, disable_after_s: float, lease: datetime | None = None,
           hold_s: Callable[[int], float] | None = None, tries: int | None = None) -> None:
    """Record an attempt. A failure schedules the next try (``retry_in_s``; None: the delivery
    has failed) and lengthens the endpoint's run of failures, which disables it once it is
    ``disable_after`` attempts long and has lasted ``disable_after_s``; with ``hold_s`` it also
    holds the endpoint for ``hold_s(failures in the run)`` seconds (a longer hold it has
    stands), in which none of its deliveries is tried (its attempts in flight finish; those due
    wait for the hold's end). A
    success ends the run and the hold, and proves the endpoint (``claim``'s suspects).
    With ``lease`` (the claim's end), an attempt whose claim was taken over since (it outlived its
    lease, or the delivery was redelivered) records nothing: a later attempt's outcome stands.
    With ``tries`` (the claim's), a failed attempt of a delivery redelivered while it was in
    flight (its tries reset below the claim's) leaves it pending and due now with a fresh
    schedule, as the redelivery said, whatever ``retry_in_s`` the claim's tries gave (a hold
    this failure starts still holds it). An outcome ``gone`` (the receiver answered 410) disables
    the endpoint at once, however short its run of failures."""
    status = "succeeded" if outcome.ok else ("pending" if retry_in_s is not None else "failed")
    redone = sql.SQL("(NOT %(ok)s AND tries < %(tries)s::int)")  # the row's tries, as before this update
    with conn.transaction():
        row = conn.execute(sql.SQL(
            "UPDATE palette_webhooks.deliveries SET attempts = attempts + 1, "
            "status = CASE WHEN {redone} THEN 'pending' ELSE %(status)s END, "
            "tries = CASE WHEN %(ok)s OR {redone} THEN 0 ELSE tries + 1 END, "
            "next_attempt_at = CASE WHEN {redone} THEN now() "
            "  WHEN %(status)s = 'pending' THEN now() + %(retry)s * interval '1 second' END, "
            "last_status_code = %(code)s, last_error = %(error)s WHERE id = %(id)s "
            "AND (%(lease)s::timestamptz IS NULL OR next_attempt_at = %(lease)s::timestamptz) "
            "RETURNING attempts, endpoint_id").format(redone=redone),
            {"status": status, "ok": outcome.ok, "retry": retry_in_s or 0.0, "code": outcome.status_code,
             "error": outcome.error or None, "id": delivery_id, "lease": lease, "tries": tries}).fetchone()
        if row is None:  # the endpoint was deleted meanwhile, or another claim holds the delivery now
            return
        conn.execute("INSERT INTO palette_webhooks.attempts (delivery_id, n, status_code, error, response, "
                     "duration_ms) VALUES (%s, %s, %s, %s, %s, %s)",
                     [delivery_id, row[0], outcome.status_code, outcome.error, outcome.body.replace("\x00", ""),
                      outcome.duration_ms])
        if row[0] > SHOWN_ATTEMPTS:
            # Only the attempts the list shows are kept: a delivery its owner keeps redelivering
            # stays pending, so it is never pruned, and would grow an attempt (up to 4 KiB of
            # answer) every redelivery for as long as the owner kept at it.
            conn.execute("DELETE FROM palette_webhooks.attempts WHERE delivery_id = %s AND n <= %s",
                         [delivery_id, row[0] - SHOWN_ATTEMPTS])
        if outcome.ok:
            conn.execute(_RELEASE, [row[1]])
            conn.execute("UPDATE palette_webhooks.endpoints SET failures = 0, failing_since = NULL, "
                         "held_until = NULL, proven = true WHERE id = %s "
                         "AND (failures > 0 OR held_until IS NOT NULL OR NOT proven)", [row[1]])
            return
        # Whether this failure disables the endpoint (the row's failures and failing_since, as before this update).
        disables = sql.SQL("(%(gone)s OR failures + 1 >= %(n)s "
                           "  AND now() - coalesce(failing_since, now()) >= %(s)s * interval '1 second')")
        failures = conn.execute(sql.SQL(
            "UPDATE palette_webhooks.endpoints SET failures = failures + 1, "
            "failing_since = coalesce(failing_since, now()), "
            "enabled = enabled AND NOT {disables}, "
            "disabled_at = CASE WHEN enabled AND {disables} THEN now() "
            "  ELSE disabled_at END WHERE id = %(id)s RETURNING failures, enabled").format(disables=disables),
            {"n": disable_after, "s": disable_after_s, "id": row[1], "gone": outcome.gone}).fetchone()
        if failures is not None and not failures[1]:
            # Disabled (now, or while this attempt was in flight): its pending deliveries wait for
            # an enable, not due (next_attempt_at NULL), out of the claims' way; left due, they
            # were due longest of all for the week they are kept and, more of them than a claim
            # reads (CLAIM_SCAN), hid every other endpoint's. Those in flight keep their claim.
            # It first waits for the recordings under way (``record`` locks the endpoint FOR KEY
            # SHARE, which the UPDATE above did not wait for): one that read the endpoint enabled
            # inserts its deliveries due, and committed after this update they stayed due.
            conn.execute("SELECT 1 FROM palette_webhooks.endpoints WHERE id = %s FOR UPDATE", [row[1]])
            conn.execute(sql.SQL("UPDATE palette_webhooks.deliveries d SET next_attempt_at = NULL "
                                 "WHERE endpoint_id = %s AND status = 'pending' AND NOT coalesce({}, false)")
                         .format(_IN_FLIGHT), [row[1]])
            return
        if hold_s is not None and failures is not None:
            # The hold, and every pending delivery due before its end waiting for it (not those
            # leased: their attempts are in flight), this one too, in one statement. Those waiting
            # on an earlier hold as well: a second attempt in flight that failed after the first
            # lengthened the hold, and the backlog the first had moved came due at the first
            # hold's end, still held, in the claims' way (more of it than a claim reads hid every
            # other endpoint's delivery due after it). Never shortened: a failure in flight whose
            # step is shorter (a 500 after a 429 that asked for 30 min) ended the asked-for wait,
            # and left the backlog moved to its end waiting there, past a success's release.
            conn.execute(sql.SQL(
                "WITH held AS (UPDATE palette_webhooks.endpoints "
                "SET held_until = greatest(held_until, now() + %s * interval '1 second') "
                "WHERE id = %s RETURNING id, held_until) UPDATE palette_webhooks.deliveries d "
                "SET next_attempt_at = held.held_until FROM held WHERE d.endpoint_id = held.id "
                "AND d.status = 'pending' AND (d.id = %s OR NOT coalesce({}, false)) "
                "AND d.next_attempt_at < held.held_until").format(_IN_FLIGHT),
                [hold_s(failures[0]), row[1], delivery_id])


def prune(conn: psycopg.Connection[Any], keep_s: float, limit: int) -> int:
    """Forget what is no longer needed, up to ``limit`` rows of each kind: finished deliveries
    (and their attempts) older than ``keep_s``; the pending deliveries of endpoints disabled more
    than ``keep_s`` ago (nothing new is recorded for a disabled endpoint, and an enable within
    ``keep_s`` sends what was pending, but an owner who never enables it again kept them, job
    views, for good); and the secrets rotations replaced whose grace has ended (they sign
    nothing more: a secret is not kept longer than it is used; ``previous_until`` stays, which
    tells a creation's retry that the endpoint rotated since). Returns the most rows one kind
    took: ``limit`` says more may be left.

    Each statement picks its rows in a subquery, read from the statement's snapshot; a row
    changed meanwhile (a redelivery, a rotation) is deleted or updated only if its latest version
    still qualifies, so each condition on the target row is repeated outside the subquery: a
    rotation committed while the UPDATE waited on its row holds a secret in its grace, and
    without the repeat the subquery's stale row erased it."""
    finished = conn.execute(
        "DELETE FROM palette_webhooks.deliveries WHERE id IN (SELECT id FROM palette_webhooks.deliveries "
        "WHERE status <> 'pending' AND created_at < now() - %s * interval '1 second' LIMIT %s) "
        "AND status <> 'pending'", [keep_s, limit]).rowcount
    abandoned = conn.execute(
        "DELETE FROM palette_webhooks.deliveries WHERE id IN (SELECT d.id FROM palette_webhooks.endpoints e "
        "JOIN palette_webhooks.deliveries d ON d.endpoint_id = e.id AND d.status = 'pending' WHERE NOT e.enabled "
        "AND e.disabled_at < now() - %s * interval '1 second' LIMIT %s) AND status = 'pending'",
        [keep_s, limit]).rowcount
    secrets = conn.execute(
        "UPDATE palette_webhooks.endpoints SET previous_secret = NULL WHERE id IN (SELECT id FROM "
        "palette_webhooks.endpoints WHERE previous_secret IS NOT NULL AND previous_until <= now() LIMIT %s) "
        "AND previous_secret IS NOT NULL AND previous_until <= now()", [limit]).rowcount
    return max(finished, abandoned, secrets)
