"""The projector process: consumer group ``palette-projections`` folds ``palette.events`` into the
read models; database commit first (rows + tracking, one transaction), Kafka offset second.

Two guards against a broker that loses a message (an acknowledged write lost in a crash):
a batch that skips a stream's version reads the missing ones from the event log first (never a
later event over a lost one), and a sweep walks the log behind the relay every ``sweep_every_s``
to fold what never arrived at all (a stream's last event). Both are idle when nothing is lost.

A projector far behind the log (back after downtime) catches up from the event store first
(``projections.catchup``: large pages, bulk writes) and then goes on with the broker, its partitions
moved past the offsets the broker acknowledged to the relay up to there, dropping whatever else it
delivers up to the position the catch-up reached before the database sees it.

A broker that restarted empty has forgotten the consumer group too: joining it again takes the
embedded broker half a session timeout, during which nothing is delivered. So after a loss the
projector tails the event log itself, up to what the relay has published, until its consumer has
partitions again and delivers past it; the broker's copies of what the tail folded are dropped
likewise.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import psycopg
from psycopg import sql

from adapters.positions import LossSignal, PgPositions
from domain.contracts import topics
from domain.contracts.envelope import EventEnvelope, decode
from domain.contracts.loop import ConsumerLoop
from domain.contracts.streams import topic_prefix
from projections.catchup import CatchUp
from projections.log import LogReader
from projections.models import READ_MODELS
from projections.schema import ensure_schema, table, tracking_table
from projections.store import BatchResult, Fill, apply_isolating

log = logging.getLogger("palette.projector")
GROUP = topics.PROJECTOR_GROUP
SWEEP = "sweep"  # the read store's position row for the sweep
SWEEP_PAGE = 2000
SWEEP_SCAN = 10_000  # positions one step of the sweep asks the database about (~0.2 s on the bench machine)
CATCHUP_CHECK_S = 10.0  # how often a running projector asks whether it fell far behind the log
TAIL_POLL_MS = 10  # the poll's wait while tailing the log: the tail's pace


class ReadStore(Protocol):
    def apply(self, envelopes: Sequence[EventEnvelope], fill: Fill | None = None) -> BatchResult: ...
    def position(self, name: str) -> int: ...
    def save_position(self, name: str, position: int) -> None: ...


@runtime_checkable
class FoldedIndex(Protocol):
    """A read store that can tell, without the events, where the sweep has work."""

    def first_unfolded(self, events: sql.Composable, after: int, upto: int) -> int | None: ...


def _unfolded_sql(events: sql.Composable) -> tuple[sql.Composed, dict[str, Any]]:
    """Per read model: the oldest of its events in a range (``after``, ``upto``) that its tracking
    has not reached and that is not waiting as a dead letter (what a sweep would fold, hold or park)."""
    models = list(READ_MODELS.values())
    query = sql.SQL(" UNION ALL ").join(sql.SQL(
        "(SELECT min(e.notification_id) AS p FROM {e} e LEFT JOIN {t} t ON t.stream_id = e.originator_id "
        "WHERE e.notification_id > %(after)s AND e.notification_id <= %(upto)s AND e.topic LIKE {prefix} "
        "AND e.originator_version > coalesce(t.version, 0) AND NOT EXISTS (SELECT 1 FROM {d} d "
        "WHERE d.model = {model} AND d.stream_id = e.originator_id AND d.version = e.originator_version "
        "AND d.status IN ('parked', 'held')))"
    ).format(e=events, t=table(tracking_table(m)), d=table("dead_letters"),
             prefix=sql.Placeholder(f"prefix{i}"), model=sql.Placeholder(f"model{i}"))
        for i, m in enumerate(models))
    params: dict[str, Any] = {}
    for i, m in enumerate(models):
        params[f"prefix{i}"], params[f"model{i}"] = topic_prefix(m.stream_type) + "%", m.name
    return query, params


class PgReadStore:
    """The read models in PostgreSQL (schema ``palette_read``)."""

    def __init__(self, database_url: str) -> None:
        self.conn = psycopg.connect(database_url, autocommit=True)
        ensure_schema(self.conn)
        self.positions = PgPositions(self.conn, ("palette_read", "positions"), key="model")

    def apply(self, envelopes: Sequence[EventEnvelope], fill: Fill | None = None) -> BatchResult:
        return apply_isolating(self.conn, envelopes, fill=fill)

    def position(self, name: str) -> int:
        return self.positions.get(name)

    def save_position(self, name: str, position: int) -> None:
        self.positions.save(name, position)

    def first_unfolded(self, events: sql.Composable, after: int, upto: int) -> int | None:
        """The position of the oldest event with ``after < position <= upto`` that some read
        model has not folded (nor holds as a dead letter); None when there is none. One indexed
        query instead of reading, decoding and folding again what the broker delivered."""
        query, params = _unfolded_sql(events)
        row = self.conn.execute(sql.SQL("SELECT min(p) FROM ({}) AS unfolded").format(query),
                                {**params, "after": after, "upto": upto}).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def close(self) -> None:
        self.conn.close()


class Projector(ConsumerLoop):
    def __init__(self, consumer: Any, store: ReadStore, log_reader: LogReader | None = None,
                 published: Callable[[], int] | None = None, sweep_every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, losses: LossSignal | None = None,
                 catchup: CatchUp | None = None) -> None:
        self.consumer = consumer
        self.store = store
        self.log = log_reader
        self.published = published  # how far the relay has published (the sweep stays behind it)
        self.sweep_every_s = sweep_every_s
        self.clock = clock
        self.totals = BatchResult()
        self.swept = 0  # events only the sweep folded: the broker never delivered them
        self.sweep_bound = 0
        self._next_sweep = clock() + sweep_every_s
        self.losses = losses  # says when the relay saw the broker lose messages
        self.catchup = catchup
        self.caught_up_to = 0  # the catch-up folded every event up to here: the broker's copies are dropped
        self._next_catchup = clock()  # the first step after joining the group looks
        self.tailing = False  # after a loss, until the broker delivers past it: folding from the log

    @property
    def fill(self) -> Fill | None:
        return self.log.stream_events if self.log is not None else None

    def step(self, timeout_ms: int = 100) -> int:
        if self.catchup is not None and self.clock() >= self._next_catchup and self.consumer.assignment():
            self.catch_up()
        polled = self.consumer.poll(timeout_ms=TAIL_POLL_MS if self.tailing else timeout_ms)
        envelopes: list[EventEnvelope] = []
        for records in polled.values():
            for record in records:
                try:
                    envelopes.append(decode(record.value))
                except ValueError:
                    # Only the relay writes this topic; an undecodable message is a bug, not data.
                    log.error("undecodable message at %s:%s offset %s skipped",
                              record.topic, record.partition, record.offset)
        fresh = [e for e in envelopes if e.id > self.caught_up_to]
        if polled:
            self.totals.skipped += len(envelopes) - len(fresh)
            self._count(self.store.apply(fresh, self.fill))
            self.consumer.commit()
        if self.losses is not None and self.losses.new_loss():
            self.after_loss(self.losses.republish_from)
            self.losses.handled()
        elif self.tailing and fresh and self.consumer.assignment():
            self._end_tail()  # in the group again and ahead of the tail: the broker carries on from here
        if self.tailing:
            self.tail()
        elif self.log is not None and self.clock() >= self._next_sweep:
            self.sweep()
        return len(envelopes)

    def catch_up(self) -> int:
        """Far behind the log: fold it from the event store up to its head; the sweep need not
        walk that part again. Returns the events applied (0 when not behind)."""
        assert self.catchup is not None
        done = self.catchup.run()
        self._next_catchup = self.clock() + CATCHUP_CHECK_S
        if done is None:
            return 0
        position, result = done
        self._count(result)
        self.caught_up_to = max(self.caught_up_to, position)
        if self.log is not None:
            self.store.save_position(SWEEP, max(self.store.position(SWEEP), position))
        log.info("caught up from the event log to position %d: %d event(s) applied, %d parked",
                 position, result.applied, result.parked)
        self._skip_folded(position)
        return result.applied

    def _skip_folded(self, folded: int) -> None:
        """Every event up to ``folded`` is folded: move this consumer's partitions past the
        messages the broker acknowledged to the relay when its position was at or before it (all
        of them such events), instead of reading and dropping them; the offsets are committed.
        A relay further on, or without offsets (a loss forgot them), leaves the partitions as
        they are. A broker that lost its log meanwhile is no risk: the loss makes the consumer
        read the new log from its start again (``after_loss``)."""
        if self.losses is None:
            return
        relay_at, acked = self.losses.published_offsets()
        if relay_at > folded or not acked:
            return
        moved = 0
        for tp in self.consumer.assignment():
            offset = acked.get(tp.partition)
            if tp.topic == topics.EVENTS and offset is not None and self.consumer.position(tp) <= offset:
                self.consumer.seek(tp, offset + 1)
                moved += 1
        if moved:
            self.consumer.commit()
            log.info("skipped the broker's copies of what the catch-up folded on %d partition(s)", moved)

    def after_loss(self, republish_from: int = 0) -> None:
        """The broker lost messages and the relay publishes them again from ``republish_from``
        (everything before it is folded): read the (new) log from its start, whatever offset this
        consumer held in the old one, and meanwhile tail the event log from there (``tail``), or
        without a known start sweep it to the relay now rather than at the next interval.
        Duplicates change nothing."""
        with contextlib.suppress(Exception):  # no partitions assigned yet: the group starts at the start
            self.consumer.seek_to_beginning()
        if self.log is not None:
            if republish_from > 0:
                self.store.save_position(SWEEP, max(self.store.position(SWEEP), republish_from - 1))
                self.caught_up_to = max(self.caught_up_to, republish_from - 1)
                self.tailing = True
            self.sweep_bound = self.published() if self.published is not None else self.log.head()
            self._next_sweep = self.clock()
        log.warning("the broker lost messages: reading its log again from the start%s",
                    f", tailing the event log from position {self.caught_up_to} meanwhile" if self.tailing else "")

    def tail(self, limit: int = SWEEP_PAGE) -> int:
        """One page of the event log after ``caught_up_to`` up to what the relay has published,
        folded: every event up to ``caught_up_to`` is folded before and after (pages in commit
        order), so the broker's copies of them are dropped. Returns the events applied."""
        assert self.log is not None
        upto = self.published() if self.published is not None else self.log.head()
        page = self.log.read(self.caught_up_to, upto, limit)
        if not page:
            return 0
        result = self.store.apply(page, self.fill)
        self._count(result)
        self.caught_up_to = page[-1].id
        return result.applied

    def _end_tail(self) -> None:
        """The broker delivers past the tail again: the sweep need not walk what the tail folded."""
        assert self.log is not None
        self.tailing = False
        self.store.save_position(SWEEP, max(self.store.position(SWEEP), self.caught_up_to))
        self._sweep_done()
        log.warning("the broker delivers again: tailed the event log up to position %d", self.caught_up_to)

    def sweep(self, limit: int = SWEEP_PAGE) -> int:
        """Fold one page of the log behind the relay: what the broker never delivered.

        The bound is the relay's position as of the previous sweep, so what the broker is still
        delivering is left to it. Returns the events this page applied (0 when nothing was lost)."""
        assert self.log is not None
        start = self.store.position(SWEEP)
        index = self.store if isinstance(self.store, FoldedIndex) else None
        events = self.log.events_table if index is not None else None
        if index is not None and events is not None and self.sweep_bound > start:
            upto = min(self.sweep_bound, start + SWEEP_SCAN)
            first = index.first_unfolded(events, start, upto)
            if first is None:  # everything up to there is folded: nothing to read
                self.store.save_position(SWEEP, upto)
                if upto == self.sweep_bound:
                    self._sweep_done()
                return 0
            start = first - 1
        page = self.log.read(start, self.sweep_bound, limit)
        applied = 0
        if page:
            result = self.store.apply(page, self.fill)
            self._count(result)
            applied = result.applied
            self.swept += applied
            self.store.save_position(SWEEP, page[-1].id)
            if applied:
                log.warning("sweep folded %d event(s) the broker had not delivered within %.0f s "
                            "(positions %d..%d)", applied, self.sweep_every_s, page[0].id, page[-1].id)
        if len(page) < limit:  # caught up with the bound: the next sweep after the interval
            self._sweep_done()
        return applied

    def _sweep_done(self) -> None:
        """Caught up with the bound: the next sweep after the interval, up to where the relay is now."""
        assert self.log is not None
        self.sweep_bound = self.published() if self.published is not None else self.log.head()
        self._next_sweep = self.clock() + self.sweep_every_s

    def _count(self, result: BatchResult) -> None:
        self.totals.applied += result.applied
        self.totals.skipped += result.skipped
        self.totals.parked += result.parked
        self.totals.filled += result.filled
        if result.filled:
            log.warning("filled %d event(s) missing from the broker's delivery from the event log", result.filled)

    def close(self) -> None:
        self.consumer.close()
        if self.losses is not None:
            self.losses.close()
        close = getattr(self.store, "close", None)
        if close is not None:
            close()
        if self.log is not None:
            self.log.close()
