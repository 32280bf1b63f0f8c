"""A database that does not answer (restarted, failing over, a pool's wait run out, a statement
canceled), or a command that waited too long to be written (``executors.WrittenTooLate``): no bug
of ours, and a retry may succeed, so the answer is a 503 ``UNAVAILABLE`` with ``Retry-After``,
not a 500 ``INTERNAL``. A command's commit may or may not have landed, as with any answer lost: a
client retrying with its Idempotency-Key is safe."""

from __future__ import annotations

import logging
import time

import psycopg
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError
from eventsourcing.persistence import OperationalError as StoreOperationalError

from adapters.logs import driver_reason
from adapters.objects import FAILED_CODES, NotDeleted
from adapters.s3_listing import ListingFailed
from projections.store import is_transient

log = logging.getLogger("palette.api")

# The classes that may say so; ``database_away`` tells which of their instances do.
DATABASE_ERRORS = (psycopg.OperationalError, StoreOperationalError)
MESSAGE = "the database did not answer in time; try again"
# The classes an object store's failure comes as; ``store_away`` tells which of them say it did
# not answer (unreachable, timed out, a 5xx), not that it refused us (credentials, a bucket).
OBJECT_STORE_ERRORS = (ListingFailed, NotDeleted, BotoCoreError, ClientError)
STORE_MESSAGE = "the object store did not answer in time; try again"
HEADERS = {"Retry-After": "1"}
WARN_EVERY_S = 10.0


OUT_OF_SPACE = "the database cannot write now (its disk is full); try again later"


def _cause(e: BaseException) -> BaseException:
    return e.__cause__ if isinstance(e, StoreOperationalError) and isinstance(e.__cause__, psycopg.Error) else e


def disk_full(e: BaseException) -> BaseException | None:
    """PostgreSQL's ``could not extend file: No space left on device`` (SQLSTATE 53100) when it is
    ``e`` or what ``e`` was raised from (eventsourcing's wrapper, a save whose outcome is unknown)."""
    seen: set[int] = set()
    at: BaseException | None = e
    while at is not None and id(at) not in seen:
        seen.add(id(at))
        if getattr(at, "sqlstate", None) == "53100":
            return at
        at = at.__cause__ or at.__context__
    return None


def message(e: BaseException) -> str:
    """What a 503 says of ``e``: a full disk is said so (PostgreSQL answered at once; a retry in a
    second will not help), not as a database that did not answer in time."""
    return OUT_OF_SPACE if disk_full(e) is not None else MESSAGE


def database_away(e: BaseException) -> bool:
    """Whether ``e`` says the database did not answer, by the projector's test (its SQLSTATE):
    psycopg's OperationalError also covers program limits (54: an index row too large), routine
    and savepoint errors (2F, 38, 39, 3B), a bad password (28) and system errors (58), which a
    retry cannot mend. eventsourcing wraps psycopg's errors in its own: the cause is what tells."""
    cause = _cause(e)
    return isinstance(cause, DATABASE_ERRORS) and is_transient(cause)


def noted_away(e: BaseException, away: Away) -> bool:
    """``database_away(e)``, noted on ``away`` when so: what a stream whose 200 went out does with
    the error (no 503 can be given; it ends, and the outage is said as the others are)."""
    if not database_away(e):
        return False
    away.note(e)
    return True


def store_away(e: BaseException) -> bool:
    """Whether ``e`` says the object store did not answer: our LIST's own verdict, botocore's
    connection errors (refused, reset, timed out), or an answer of 5xx (for a DeleteObjects, each
    key's error as a 5xx would say it)."""
    if isinstance(e, ListingFailed):
        return e.retriable
    if isinstance(e, NotDeleted):
        return e.codes <= FAILED_CODES
    if isinstance(e, ClientError):
        return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) >= 500
    return isinstance(e, (ConnectionError, HTTPClientError))


class Away:
    """The requests answered 503 because ``what`` (the database, the object store) did not
    answer: said in the log at most every WARN_EVERY_S (an outage would otherwise write a
    traceback per request)."""

    def __init__(self, what: str = "the database", counted: str = "request(s) answered 503") -> None:
        self.what = what
        self.counted = counted  # what ``count`` counts, as the log says it
        self.count = 0
        self._warned = -WARN_EVERY_S

    def note(self, error: BaseException) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY_S:
            self._warned = now
            log.warning("%s did not answer (%s: %s); %d %s so far",
                        self.what, type(error).__name__, driver_reason(error), self.count, self.counted)
