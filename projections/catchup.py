"""Catch-up: a projector far behind the event log (back after downtime, or a fresh read side)
folds straight from the event store, as a rebuild reads it, instead of through the broker.

Pages in commit order (``FIRST_PAGE`` events, then twice as many each time up to ``PAGE``) go
through the live apply path (``apply_isolating``) with bulk writes (COPY, straight into the
tables for rows and streams the page found absent): one transaction per page holds the
rows, the ledger, the tracking versions and the positions, so a crash between pages loses
nothing and the page after the restart skips what was folded (the tracking versions, as for a
redelivery). The live path's
rules hold because it is the live path: per stream in version order, never past a missing
version (``fill`` reads it), a failing event parked and its stream held, a page that fails
applied again model by model and event by event.

It starts after the oldest event some model still needs (``oldest_needed``: exact, not the
positions) and ends at the log's head; the projector then resumes on the broker, where what it
delivers up to that head is already folded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from projections.log import LogReader
from projections.models import READ_MODELS
from projections.schema import table
from projections.store import BatchResult, add_result, apply_isolating, oldest_needed

log = logging.getLogger("palette.projections")
PAGE = 20_000
FIRST_PAGE = 2500  # nothing folds before the first page is read: it is small, and each next one twice as large


@dataclass
class CatchUp:
    """Folds the log from the store's side when the read models are ``threshold`` events or more
    behind its head (``threshold`` 0: never)."""

    conn: psycopg.Connection[Any]
    log: LogReader
    threshold: int
    page: int = PAGE
    first_page: int = FIRST_PAGE
    after_page: Callable[[int], None] | None = None  # called with each committed page's last position

    def behind(self, head: int) -> int:
        """How far the least advanced model's position is behind ``head`` (a cheap estimate:
        the positions row of each model, not the tracking)."""
        rows = dict(self.conn.execute(sql.SQL("SELECT model, position FROM {}").format(table("positions"))).fetchall())
        return head - min(int(rows.get(name, 0)) for name in READ_MODELS)

    def start(self) -> int | None:
        """The position after which some model still needs an event, None when none does."""
        events_table = self.log.recorder.events_table_name
        needed = [p for p in (oldest_needed(self.conn, m, events_table) for m in READ_MODELS.values())
                  if p is not None]
        return min(needed) - 1 if needed else None

    def run(self) -> tuple[int, BatchResult] | None:
        """When far behind: fold the log up to its head (again while the head moved on by the
        threshold or more meanwhile). Returns the position folded up to and what it applied;
        None when not behind."""
        if self.threshold <= 0:
            return None
        head = self.log.head()
        if self.behind(head) < self.threshold:
            return None
        position = self.start()
        if position is None:
            return None
        log.info("catching up from the event log: positions %d to %d", position + 1, head)
        total = BatchResult()
        while True:
            position = self.fold(position, head, total)
            latest = self.log.head()
            if latest - position < self.threshold:  # the rest comes through the broker
                return position, total
            head = latest

    def fold(self, after: int, upto: int, total: BatchResult) -> int:
        """The log's events in ``after < position <= upto``, page by page; returns ``upto``. The
        next page is read and decoded (a thread) while this one is folded and written; pages grow
        from ``first_page`` to ``page``, as reading one takes about half as long as folding one."""
        size = min(self.first_page, self.page)
        with ThreadPoolExecutor(1, thread_name_prefix="catchup-read") as reader:
            ahead = reader.submit(self.log.read, after, upto, size)
            while envelopes := ahead.result():
                after = envelopes[-1].id
                if after < upto:
                    size = min(2 * size, self.page)
                    ahead = reader.submit(self.log.read, after, upto, size)
                add_result(total, apply_isolating(self.conn, envelopes, self.log.stream_events, bulk=True))
                if self.after_page is not None:
                    self.after_page(after)
                if after >= upto:
                    break
        return upto
