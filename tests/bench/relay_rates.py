"""The relay's throughput over the backlog, and the bare producers' over the same envelopes, each
measured in a process of its own, set up as `palette serve relay` sets up its process: the
collector's server settings (``adapters.collector.serving_gc``) once it is built.

Measured inside the benchmark's process, whose heap holds the stack's clients and every earlier
stage's objects, the collector's default thresholds traversed that heap again and again: making
the envelopes of a 34k-event log took 15.5 µs an event there, 6.0 with the collector off and 6.9
with the server's settings. That was the benchmark's cost, which a served relay does not pay."""

from __future__ import annotations

import multiprocessing
import queue
import time
import uuid
from collections.abc import Callable
from typing import Any

from adapters.settings import Settings

RESULT_WAIT_S = 600  # a run's result, at most: a backlog of a few hundred thousand events


class FirstIdle:
    """The relay's wakeup while it measures: the relay waits for new events only once it has
    published and recorded all there were, so the first wait takes the time and stops it (no
    thread polls it)."""

    def __init__(self, stop: Any) -> None:
        self.stop = stop
        self.done_at: float | None = None

    def wait(self, timeout_s: float) -> bool:
        self.done_at = time.perf_counter()
        self.stop.set()
        return False


def relay_rate(settings: Settings, topic: str, out: Any) -> None:
    """(events, events/s) of the composition root's relay publishing the whole log to ``topic``
    under a fresh position, from its start to its last acknowledgement recorded: the events it
    published, not the head's position (a rolled-back insert leaves its position unused)."""
    import threading

    from adapters.collector import serving_gc
    from tests.bench.relay import named_relay

    relay = named_relay(settings, topic, f"bench-{uuid.uuid4().hex[:6]}")
    try:
        head = relay.recorder.max_notification_id() or 0
        stop = threading.Event()
        idle = FirstIdle(stop)
        if relay.wakeup is not None:
            relay.wakeup.close()
        relay.wakeup = idle
        serving_gc()
        t0 = time.perf_counter()
        relay.run(stop)
        if idle.done_at is None or relay.acked < head:
            raise RuntimeError(f"the relay stopped at {relay.acked} of {head} events")
        out.put((relay.published, relay.published / (idle.done_at - t0)))
    finally:
        relay.close()


def producer_rate(settings: Settings, topic: str, client: str, out: Any) -> None:
    """Events/s of a bare producer (``client``: "librdkafka", the relay's, or "kafka-python", the
    one it had before) sending the log's envelopes, made beforehand, to ``topic``, every
    acknowledgement awaited."""
    from adapters import kafka_io
    from adapters.bootstrap import open_event_store
    from adapters.collector import serving_gc
    from projections.log import LogReader, StoredRow
    from projections.stored_events import stored_message
    from tests.bench.relay import bare_producer_rate

    app = open_event_store(settings, pool_size=1)
    try:
        head = app.recorder.max_notification_id() or 0
        transcoder = app.mapper.transcoder
        rows: list[StoredRow] = LogReader(app.recorder, transcoder).rows(1, head)
        values = [(row[1].encode(), stored_message(*row, transcoder)[0]) for row in rows]
    finally:
        app.close()
    producer = kafka_io.LogProducer(settings) if client == "librdkafka" else kafka_io.producer(settings, linger_ms=5)
    serving_gc()
    out.put(bare_producer_rate(producer, topic, values))


def in_own_process(target: Callable[..., None], *args: Any) -> Any:
    """What ``target(*args, out)`` puts on ``out``, run in a fresh interpreter (spawned: the
    benchmark's process runs threads); its failure raises here."""
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    process = spawn.Process(target=target, args=(*args, out), daemon=True)
    process.start()
    try:
        return from_child(process, out, time.monotonic() + RESULT_WAIT_S, target.__name__)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()


def from_child(process: Any, out: Any, deadline: float, what: str) -> Any:
    """The next item the spawned ``process`` puts on ``out``; raises once it has ended without
    one, or at ``deadline`` (``time.monotonic``)."""
    while True:
        try:
            return out.get(timeout=1)
        except queue.Empty:
            if not process.is_alive():
                try:  # put just as it ended
                    return out.get(timeout=1)
                except queue.Empty:
                    raise RuntimeError(f"{what} exited ({process.exitcode})") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} stopped answering") from None
