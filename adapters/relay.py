"""The relay (transactional outbox): event store notification log -> Kafka ``palette.events``.

Publishes in notification order, keyed by stream id (one partition per stream keeps its order),
and records its position in PostgreSQL only after the broker acknowledged. At-least-once.

It wakes on commit: a statement trigger on the events table notifies ``palette_events``, and the
relay waits on that channel (polling only as a fallback, every half second).

The broker is not the source of truth, the event store is. The relay remembers the last offset
the broker acknowledged on each partition (in PostgreSQL, with its position). When a partition it
had acknowledged records on is empty (a broker that restarted empty), or an acknowledgement comes
back at or below one before it (a lost tail, seen on the next publish), the broker lost messages:
the relay records the loss (``palette_relay.broker_losses``, which the projector, the dispatcher
and the webhook consumer watch) and publishes again from the oldest event some read model still
needs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, Self

import psycopg
from kafka.errors import KafkaError
from psycopg import sql

from adapters.positions import RELAY_NAME, PgPositions, Positions, ensure_schema, lock_holder
from domain.contracts import trace as tracing
from domain.contracts.envelope import EventEnvelope, decode
from domain.contracts.topics import EVENTS as EVENTS_TOPIC
from projections.log import LogReader, StoredRow
from projections.stored_events import split_topic, stored_message

if TYPE_CHECKING:
    from adapters.rollover import LogRollover

log = logging.getLogger("palette.relay")
NOTIFY_CHANNEL = "palette_events"
# A job's milestones get an info line each once published (with the job's trace id), so that one
# trace id is found in every process's log for one job; other events, thousands a second, none.
LOGGED_EVENTS = (".JobQueued", ".JobFinished", ".JobCanceled")


def _log_published(row: StoredRow, trace: str) -> None:
    position, stream_id, _, topic, _ = row
    log.info("published %s of job %s (event %d)", split_topic(topic)[1], stream_id, position,
             extra={"job_id": stream_id, "trace_id": tracing.trace_id(trace) or None})


def install_wakeup(conn: psycopg.Connection[Any], schema: str, events_table: str) -> None:
    """The statement trigger that notifies the relay of every commit that wrote events."""
    ensure_schema(conn)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('palette-relay-trigger'))")
        conn.execute("CREATE OR REPLACE FUNCTION palette_relay.notify_events() RETURNS trigger LANGUAGE plpgsql "
                     f"AS $$ BEGIN PERFORM pg_notify('{NOTIFY_CHANNEL}', ''); RETURN NULL; END $$")
        conn.execute(sql.SQL(
            "CREATE OR REPLACE TRIGGER palette_notify_events AFTER INSERT ON {} "
            "FOR EACH STATEMENT EXECUTE FUNCTION palette_relay.notify_events()"
        ).format(sql.Identifier(schema, events_table)))


class Wakeup(Protocol):
    def wait(self, timeout_s: float) -> bool:
        """Block until new events may be there (True) or the timeout passed (False)."""


class PgWakeup:
    """LISTEN on the events channel, on a connection of its own."""

    def __init__(self, database_url: str) -> None:
        self.conn = psycopg.connect(database_url, autocommit=True)
        self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))

    def wait(self, timeout_s: float) -> bool:
        woke = False
        for _ in self.conn.notifies(timeout=timeout_s, stop_after=1):
            woke = True
        if woke:  # several commits may have notified: one read covers them all
            for _ in self.conn.notifies(timeout=0):
                pass
        return woke

    def close(self) -> None:
        self.conn.close()


class BrokerLog(Protocol):
    """What the relay asks the broker about its own topic."""

    def end_offsets(self) -> dict[int, int]:
        """The next offset of each partition (0: empty)."""


class LossWatch:
    """Sees that the broker lost acknowledged messages, and where to publish from again.

    ``acked`` holds, by partition, the highest offset the broker acknowledged (kept in PostgreSQL
    with the relay's position, so a relay restart still compares a fresh broker with the old one)."""

    def __init__(self, broker: BrokerLog, republish_from: Callable[[], int], state: RelayState, name: str,
                 probe_every_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.broker = broker
        self.republish_from = republish_from  # the oldest position a consumer still needs
        self.state = state
        self.name = name
        self.acked = state.acked_offsets(name)
        self.probe_every_s = probe_every_s
        self.clock = clock
        self._next_probe = 0.0
        self._suspected = False  # the previous probe saw an emptied partition
        self.losses = 0

    def resume(self) -> None:
        """The offsets as saved now: read again by a relay that takes over from another, which
        may have started the log afresh or recorded a loss (forgetting them) while it stood by."""
        self.acked = self.state.acked_offsets(self.name)

    def save(self, position: int) -> None:
        """The relay's position and the offsets acknowledged up to it."""
        self.state.save_acked(self.name, position, self.acked)

    def ends(self) -> dict[int, int]:
        """By partition, the offset after the last one the broker acknowledged."""
        return {p: offset + 1 for p, offset in self.acked.items()}

    def forget(self) -> None:
        """The log is about to start afresh (``LogRollover``): its offsets mean nothing after."""
        self.state.forget_acked(self.name)
        self.acked.clear()

    def on_acks(self, offsets: list[tuple[int, int]]) -> bool:
        """Take the (partition, offset) acknowledgements of one batch; True when one restarted."""
        lost = False
        for partition, offset in offsets:
            if offset <= self.acked.get(partition, -1):
                lost = True  # the log restarted below what it had acknowledged
            self.acked[partition] = offset if lost else max(offset, self.acked.get(partition, -1))
        return lost

    def probe(self, force: bool = False) -> bool:
        """Every ``probe_every_s``: whether a partition the broker acknowledged records on is now
        empty (or gone). A lost tail under load shows in the acknowledgements instead."""
        if not self.acked or (not force and self.clock() < self._next_probe):
            return False
        self._next_probe = self.clock() + self.probe_every_s
        try:
            ends = self.broker.end_offsets()
        except (KafkaError, OSError) as e:  # the broker is away: the next acknowledgement will tell
            log.warning("broker probe failed: %s", type(e).__name__)
            return False
        # Only an empty partition is evidence: Tansu answers the end of its last batch, not of its
        # last record, so a partition that holds anything may end "before" an acknowledged offset.
        # Two probes in a row must say so: a broker still starting may answer without the topic.
        empty = any(ends.get(p, 0) <= 0 for p in self.acked)
        suspected, self._suspected = self._suspected, empty
        return empty and (suspected or force)

    def recover(self) -> int:
        """Record the loss; the position to publish after (one before the oldest still needed)."""
        start = self.republish_from()
        with self.state.conn.transaction():  # all or nothing: a crash here is detected again
            self.state.record_loss(self.name, start)
            self.state.save(self.name, start - 1)
            self.state.forget_acked(self.name)
        self.acked.clear()
        self.losses += 1
        # Expected on every restart of a broker on memory storage (it comes back empty): nothing is
        # lost for good, the event store is the source of truth, so a warning, not an error.
        log.warning("the broker lost acknowledged messages (a broker on memory storage forgets its log when "
                    "it restarts): publishing again from position %d", start)
        return start - 1


class RelayState(PgPositions):
    """The relay's position, the offsets the broker acknowledged, the losses it saw, and the
    consumer groups seen reading the log it starts afresh (``LogRollover``).

    Its saves do not wait for their WAL flush (``synchronous_commit`` off on its connection): one
    runs after every acknowledged batch, and waiting for the disk there held the next batch back.
    A database crash may forget the last of them (up to three WAL writer delays, 600 ms by
    default): the relay then publishes those events again, which every consumer takes as
    duplicates, and what survives is consistent (PostgreSQL keeps the commits' order). A loss's
    record does wait for its flush (``record_loss``)."""

    @classmethod
    def connect(cls, database_url: str) -> Self:
        """Its session holds the lead (``lead``), which the server keeps until it sees the session
        end: for a relay the network cut off, with TCP's usual defaults, two hours or more without
        a relay. Keepalives on both ends and a bound on unacknowledged data end such a session
        within 30 s on each side (``positions.lock_holder``), so a standby takes over and the
        cut-off relay's next statement fails (it then restarts as a standby)."""
        conn = lock_holder(database_url)
        ensure_schema(conn)
        conn.execute("SET synchronous_commit = off")
        return cls(conn)  # no conninfo: never replaced, its session lock (``lead``) goes with it, and so must the relay

    def acked_offsets(self, name: str) -> dict[int, int]:
        rows = self.conn.execute("SELECT partition, acked FROM palette_relay.acked_offsets WHERE name = %s",
                                 [name]).fetchall()
        return {int(p): int(o) for p, o in rows}

    def save_acked(self, name: str, position: int, offsets: dict[int, int]) -> None:
        """Position and acknowledged offsets together: one statement (atomic, one round trip; it
        runs after every acknowledged batch)."""
        self.conn.execute(
            "WITH saved AS (INSERT INTO palette_relay.positions (name, position) VALUES (%(name)s, %(position)s) "
            "ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, updated_at = now()) "
            "INSERT INTO palette_relay.acked_offsets (name, partition, acked) "
            "SELECT %(name)s, p, o FROM unnest(%(partitions)s::int[], %(offsets)s::bigint[]) AS a(p, o) "
            "ON CONFLICT (name, partition) DO UPDATE SET acked = EXCLUDED.acked",
            {"name": name, "position": position, "partitions": list(offsets), "offsets": list(offsets.values())})

    def lead(self, name: str) -> bool:
        """Try to become the one relay publishing ``name``: a session lock on this connection,
        released when the connection ends, so a relay that dies or loses the database hands over
        (its next save fails and the process restarts, as a standby)."""
        row = self.conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [f"palette-relay:{name}"]).fetchone()
        return bool(row and row[0])

    def log_readers(self, topic: str) -> set[str]:
        """The consumer groups seen reading ``topic`` (``LogRollover``: each holds its fresh starts)."""
        rows = self.conn.execute("SELECT reader FROM palette_relay.log_readers WHERE topic = %s", [topic]).fetchall()
        return {str(reader) for (reader,) in rows}

    def add_log_readers(self, topic: str, groups: Iterable[str]) -> None:
        self.conn.execute("INSERT INTO palette_relay.log_readers (topic, reader) SELECT %s, unnest(%s::text[]) "
                          "ON CONFLICT DO NOTHING", [topic, sorted(groups)])

    def forget_acked(self, name: str) -> None:
        self.conn.execute("DELETE FROM palette_relay.acked_offsets WHERE name = %s", [name])

    def record_loss(self, name: str, republish_from: int) -> None:
        """In the caller's transaction, which then waits for its flush: consumers act on it at once."""
        self.conn.execute("SET LOCAL synchronous_commit = on")
        self.conn.execute("INSERT INTO palette_relay.broker_losses (name, republish_from) VALUES (%s, %s)",
                          [name, republish_from])


class Relay:
    def __init__(self, app: Any, producer: Any, positions: Positions, name: str = RELAY_NAME,
                 topic: str = EVENTS_TOPIC, batch_size: int = 2000,
                 on_acked: Callable[[list[EventEnvelope]], None] | None = None,
                 wakeup: Wakeup | None = None, loss: LossWatch | None = None,
                 lead: Callable[[str], bool] | None = None, rollover: LogRollover | None = None) -> None:
        self.app = app  # owns the recorder's connection pool
        self.recorder = app.recorder
        self.transcoder = app.mapper.transcoder
        self.pages: Callable[[int, int], list[StoredRow]] = LogReader(self.recorder, self.transcoder).rows
        self.producer = producer
        self.positions = positions
        self.name = name
        self.topic = topic
        self.batch_size = batch_size
        self.published = 0
        self.acked = 0
        self._in_flight: tuple[int, list[Any], list[StoredRow], list[tuple[bytes, str]]] | None = None
        self.on_acked = on_acked  # measurement hook (commit-to-ack latency in the benchmark)
        self.wakeup = wakeup
        self.loss = loss
        self._lost = False  # an acknowledgement came back below one before it
        self.lead = lead  # several relays of one name: the one that gets it publishes, the others wait
        self.rollover = rollover if loss is not None else None  # needs the acknowledged offsets
        # Seconds from the oldest event of each acknowledged batch being decided to its ack (metrics).
        self.observe_ack: Callable[[float], None] | None = None

    def position(self) -> int:
        return self.positions.get(self.name)

    def step(self, position: int) -> int:
        """Publish the next batch after ``position`` and return the position published up to.

        Pipelined: the batch in flight is acknowledged while the next one is read and encoded, and
        the next one is sent before the acknowledged one's position is saved; the saved position
        only ever covers acknowledged events (``acked``)."""
        rows = self.pages(position + 1, self.batch_size)
        if not rows:
            self.drain()
            return position
        transcoder = self.transcoder
        messages = [stored_message(*row, transcoder) for row in rows]
        acked = self._acknowledged()  # the previous batch (sent, or leaving now)
        if self._lost:
            return position  # publishing again from what a consumer still needs, not from here
        send, topic = self.producer.send, self.topic
        futures = [send(topic, key=row[1].encode(), value=value,
                        headers=[(tracing.HEADER, trace.encode())] if trace else None)
                   for row, (value, trace) in zip(rows, messages, strict=True)]
        self._in_flight = (rows[-1][0], futures, rows, messages)
        if acked is not None:
            self._record(*acked)
        return rows[-1][0]

    def drain(self) -> None:
        """Wait for the batch in flight to be acknowledged, then record its position."""
        acked = self._acknowledged()
        if acked is not None:
            self._record(*acked)

    def _acknowledged(self) -> tuple[int, list[StoredRow], list[tuple[bytes, str]]] | None:
        """The batch in flight, sent now and acknowledged (raises when the broker did not, and
        the position stays put); None when none was in flight or the broker lost messages."""
        if self._in_flight is None:
            return None
        last, futures, rows, messages = self._in_flight
        self.producer.flush()  # only this batch: the next one is sent after it
        metas = [f.get(timeout=30) for f in futures]
        self._in_flight = None
        if self.rollover is not None:
            self.rollover.count(m.partition for m in metas)
        if self.loss is not None and self.loss.on_acks([(m.partition, m.offset) for m in metas]):
            self._lost = True
            return None
        return last, rows, messages

    def _record(self, last: int, rows: list[StoredRow], messages: list[tuple[bytes, str]]) -> None:
        """An acknowledged batch: its log lines and hooks (as of its acknowledgement), then its
        position (with its offsets)."""
        for row, (_, trace) in zip(rows, messages, strict=True):  # a suffix test per event
            if row[3].endswith(LOGGED_EVENTS):
                _log_published(row, trace)
        if self.on_acked is not None:
            self.on_acked([decode(value) for value, _ in messages])
        if self.observe_ack is not None:  # one decode per batch: its oldest event, the longest wait
            oldest = decode(messages[0][0]).timestamp
            self.observe_ack((datetime.now(UTC) - oldest).total_seconds())
        if self.loss is not None:
            self.loss.save(last)
        else:
            self.positions.save(self.name, last)
        self.acked = last
        self.published += len(rows)

    def _recover_or_wait(self, stop: threading.Event, position: int) -> int:
        """``_recover``; a broker that does not answer yet is waited for (the loss is still known
        from the acknowledged offsets, in memory and in PostgreSQL, so it is tried again)."""
        try:
            return self._recover()
        except KafkaError as e:
            log.warning("recovery postponed: the broker did not answer (%s)", type(e).__name__)
            self._lost = True
            stop.wait(0.5)
            return position

    def _recover(self) -> int:
        """The broker lost messages: forget what is in flight, publish again from the oldest one
        a consumer still needs."""
        assert self.loss is not None
        if self._in_flight is not None:
            self.producer.flush()
            self._in_flight = None
        self._lost = False
        return self.loss.recover()

    def _start_log_afresh(self) -> None:
        """With nothing in flight (every batch sent is acknowledged and recorded): start the
        broker's log afresh if every consumer group has read it (``LogRollover``). Its acknowledged
        offsets are forgotten first: a crash in between leaves the relay nothing to compare the new
        log with, rather than a loss it would see."""
        assert self.rollover is not None and self.loss is not None
        try:
            if self._lost or not self.rollover.read_by_all(self.loss.ends()):
                return
            self.loss.forget()
            self.rollover.start_afresh()
        except (KafkaError, OSError) as e:  # the broker away: its topics are made again as it returns
            self.rollover.postpone(f"the broker did not answer ({type(e).__name__})")

    def _ensure_topic(self, stop: threading.Event) -> None:
        """The topic made if it is missing (see ``LogRollover.ensure_topic``); a broker that does
        not answer is asked again after a pause, and nothing is published meanwhile."""
        assert self.rollover is not None
        try:
            self.rollover.ensure_topic()
        except (KafkaError, OSError) as e:
            log.warning("the topic %s is not known to exist yet: the broker did not answer (%s)",
                        self.topic, type(e).__name__)
            stop.wait(0.5)

    def warm_up(self, stop: threading.Event) -> None:
        """The relay is ready once its position table answers."""
        self.position()

    def run(self, stop: threading.Event, idle_s: float = 0.005, max_idle_s: float = 0.02) -> None:
        if not self._leading(stop):
            return
        position = self.position()
        log.warning("relay starting after position %d", position)
        if self.loss is not None:
            self.loss.resume()  # as the relay that led before left them, if one did
            if self.loss.probe(force=True):
                position = self._recover_or_wait(stop, position)
        wait = idle_s
        while not stop.is_set():
            if self.rollover is not None and self.rollover.missing:
                self._ensure_topic(stop)
                continue
            try:
                new_position = self.step(position)
            except KafkaError as e:
                # The broker went away mid-batch (restarting): nothing past the saved position
                # counts as sent; publish again from there once it answers.
                log.warning("the broker did not acknowledge a batch (%s); publishing again", type(e).__name__)
                self._in_flight = None
                stop.wait(0.2)
                position = self.position()
                continue
            if self._lost:
                new_position = self._recover_or_wait(stop, position)
            elif new_position == position:
                if self.loss is not None and self.loss.probe():
                    new_position = self._recover_or_wait(stop, position)
                elif self.wakeup is not None:
                    # Woken by the commit's notification; the timeout is the fallback poll (and
                    # the pace of the broker probe).
                    self.wakeup.wait(0.5)
                else:
                    # Polling the log (an indexed, empty query); backing off a little when idle
                    # keeps the relay off the CPU without costing more than ~20 ms of latency.
                    time.sleep(wait)
                    wait = min(max_idle_s, wait * 1.5)
            else:
                wait = idle_s
            position = new_position
            if (self.rollover is not None and self.loss is not None and self._in_flight is None
                    and self.rollover.due(self.loss.ends())):
                self._start_log_afresh()
        self.drain()  # SIGTERM: what was sent is acknowledged and recorded before exiting

    def _leading(self, stop: threading.Event, every_s: float = 1.0) -> bool:
        """Wait until this relay is the one publishing its log (at once when it is alone)."""
        if self.lead is None:
            return True
        waited = False
        while not stop.is_set():
            if self.lead(self.name):
                if waited:
                    log.warning("this relay publishes %s now", self.name)
                return True
            if not waited:
                log.warning("another relay publishes %s: standing by", self.name)
                waited = True
            stop.wait(every_s)
        return False

    def close(self) -> None:
        self.producer.close()
        for part in (self.positions, self.wakeup, self.loss.broker if self.loss is not None else None,
                     self.rollover):
            close = getattr(part, "close", None)
            if close is not None:
                close()
        self.app.close()
