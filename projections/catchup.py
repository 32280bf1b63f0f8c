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

The read models split by the streams they fold (``groups``: no stream type in two groups), so
several processes can catch up side by side, each reading only its streams' events and writing
only its models (``beside``; ``fold_models`` is what each of the others runs). A catch-up is done
when every group has reached the head.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from projections.log import LogReader, events_table
from projections.models import READ_MODELS
from projections.models.base import ReadModel
from projections.schema import table
from projections.store import BatchResult, add_result, advance_positions, apply_isolating, oldest_needed

log = logging.getLogger("palette.projections")
PAGE = 20_000
FIRST_PAGE = 2500  # nothing folds before the first page is read: it is small, and each next one twice as large


def groups(n: int) -> list[tuple[str, ...]]:
    """The read models' names in at most ``n`` groups that share no stream type, the stream types
    dealt out by how many models fold each (most first, each to the group with fewest models): on
    this log the Job streams' models (most events) in one group, the User streams' in another."""
    by_type: dict[str, list[str]] = {}
    for model in READ_MODELS.values():
        by_type.setdefault(model.stream_type, []).append(model.name)
    bins: list[list[str]] = [[] for _ in range(max(1, min(n, len(by_type))))]
    for names in sorted(by_type.values(), key=len, reverse=True):
        min(bins, key=len).extend(names)
    return [tuple(b) for b in bins]


@dataclass
class CatchUp:
    """Folds the log from the store's side when the read models are ``threshold`` events or more
    behind its head (``threshold`` 0: never): the models named in ``models`` (all by default),
    while ``beside`` has the others folded elsewhere."""

    conn: psycopg.Connection[Any]
    log: LogReader
    threshold: int
    page: int = PAGE
    first_page: int = FIRST_PAGE
    after_page: Callable[[int], None] | None = None  # called with each committed page's last position
    models: Sequence[str] = ()
    # Starts folding the models not in ``models`` up to a head elsewhere (another process); the
    # call it returns waits for that and answers what it applied.
    beside: Callable[[int], Callable[[], BatchResult]] | None = None
    chosen: list[ReadModel] = field(init=False)

    def __post_init__(self) -> None:
        self.chosen = [READ_MODELS[name] for name in self.models] if self.models else list(READ_MODELS.values())

    def behind(self, head: int) -> int:
        """How far the least advanced model's position is behind ``head`` (a cheap estimate:
        the positions row of each model, not the tracking)."""
        rows = dict(self.conn.execute(sql.SQL("SELECT model, position FROM {}").format(table("positions"))).fetchall())
        return head - min(int(rows.get(name, 0)) for name in READ_MODELS)

    def start(self) -> int | None:
        """The position after which one of this catch-up's models still needs an event, None
        when none does."""
        events = events_table(self.log.recorder)
        needed = [p for p in (oldest_needed(self.conn, m, events) for m in self.chosen) if p is not None]
        return min(needed) - 1 if needed else None

    def run(self) -> tuple[int, BatchResult] | None:
        """When far behind: fold the log up to its head (again while the head moved on by the
        threshold or more meanwhile). Returns the position every model has folded up to and what
        was applied; None when not behind, or when no model needed anything."""
        if self.threshold <= 0:
            return None
        head = self.log.head()
        if self.behind(head) < self.threshold:
            return None
        total = BatchResult()
        while True:
            waiting = self.beside(head) if self.beside is not None else None
            try:
                needed = self.catch_up_to(head, total)
            finally:  # the other groups too, even when this one failed: no writer is left behind
                if waiting is not None:
                    add_result(total, waiting())
            if waiting is None and not needed and not total.applied and not total.parked:
                return None
            latest = self.log.head()
            if latest - head < self.threshold:  # the rest comes through the broker
                return head, total
            head = latest

    def catch_up_to(self, head: int, total: BatchResult) -> bool:
        """This catch-up's models folded from the oldest event one of them still needs up to
        ``head``; returns whether one needed any. Their positions reach ``head`` either way, or
        a group with nothing to fold would look behind and be caught up again and again."""
        position = self.start()
        if position is None or position >= head:
            advance_positions(self.conn, self.chosen, head)
            return False
        log.info("catching up from the event log: positions %d to %d (%s)", position + 1, head,
                 ", ".join(m.name for m in self.chosen))
        self.fold(position, head, total)
        return True

    def fold(self, after: int, upto: int, total: BatchResult) -> int:
        """The log's events in ``after < position <= upto`` (of this catch-up's models' streams),
        page by page; returns ``upto``. The next page is read and decoded (a thread) while this
        one is folded and written; pages grow from ``first_page`` to ``page``, as reading one
        takes about half as long as folding one."""
        size = min(self.first_page, self.page)
        streams = sorted({m.stream_type for m in self.chosen}) if self.models else []
        with ThreadPoolExecutor(1, thread_name_prefix="catchup-read") as reader:
            ahead = reader.submit(self.log.read, after, upto, size, streams)
            while envelopes := ahead.result():
                after = envelopes[-1].id
                if after < upto:
                    size = min(2 * size, self.page)
                    ahead = reader.submit(self.log.read, after, upto, size, streams)
                add_result(total, apply_isolating(self.conn, envelopes, self.log.stream_events, bulk=True,
                                                  models=self.chosen))
                if self.after_page is not None:
                    self.after_page(after)
                if after >= upto:
                    break
        # Read only these models' streams, the last page may end before ``upto``: their positions
        # say how far the log is folded for them all the same (GET /jobs reports the lag from them).
        advance_positions(self.conn, self.chosen, upto)
        return upto


def fold_models(conn: psycopg.Connection[Any], log_reader: LogReader, models: Sequence[str], head: int,
                after_page: Callable[[int], None] | None = None) -> BatchResult:
    """What a process beside the projector runs: ``models`` caught up to ``head``
    (``CatchUp.catch_up_to``), ``after_page`` called after each page."""
    total = BatchResult()
    CatchUp(conn, log_reader, threshold=1, models=models, after_page=after_page).catch_up_to(head, total)
    return total
