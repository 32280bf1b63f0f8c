"""The sweeper's loop tries a failed pass again later when the database fails, the event store's
layer included: the group committer's WrittenTooLate (an eventsourcing OperationalError, no
psycopg.Error) ended the process, which then said it could not reach PostgreSQL."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from adapters.retention import Sweeper
from application.executors import WrittenTooLate


def test_a_pass_refused_by_the_group_committer_is_tried_again_not_the_end_of_the_sweeper() -> None:
    stop = threading.Event()
    passes: list[int] = []

    def step(**_kw: object) -> None:
        passes.append(1)
        if len(passes) == 2:
            stop.set()
        raise WrittenTooLate("waited 4.3 s to be written (at most 4 s); try again")

    fake = SimpleNamespace(settings=SimpleNamespace(erasure_grace_s=0.0, sweep_interval_s=0.0, erasure_sweep_s=0.01),
                           step=step, finish_erasures=lambda _grace: 0)
    Sweeper.run(fake, stop)  # type: ignore[arg-type]
    assert len(passes) == 2
