"""The sweeper's loop tries a failed pass again later when the database or the object store fails,
the event store's layer included: the group committer's WrittenTooLate (an eventsourcing
OperationalError, no psycopg.Error) ended the process, which then said it could not reach
PostgreSQL; an S3 error in a late deletion ended it too."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from adapters.retention import Sweeper
from application.executors import WrittenTooLate


@pytest.mark.parametrize("error", [
    WrittenTooLate("waited 4.3 s to be written (at most 4 s); try again"),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),  # a late deletion meets S3 away
    ClientError({"Error": {"Code": "SlowDown", "Message": "reduce your request rate"}}, "DeleteObjects"),
])
def test_a_pass_that_fails_transiently_is_tried_again_not_the_end_of_the_sweeper(error: Exception) -> None:
    stop = threading.Event()
    passes: list[int] = []

    def step(**_kw: object) -> None:
        passes.append(1)
        if len(passes) == 2:
            stop.set()
        raise error

    fake = SimpleNamespace(settings=SimpleNamespace(erasure_grace_s=0.0, sweep_interval_s=0.0, erasure_sweep_s=0.01),
                           step=step, finish_erasures=lambda _grace: 0)
    Sweeper.run(fake, stop)  # type: ignore[arg-type]
    assert len(passes) == 2
