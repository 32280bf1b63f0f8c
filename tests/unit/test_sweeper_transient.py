"""The sweeper's loop tries a failed pass again later when the database or the object store fails,
the event store's layer included: the group committer's WrittenTooLate (an eventsourcing
OperationalError, no psycopg.Error) ended the process, which then said it could not reach
PostgreSQL; an S3 error in a late deletion ended it too."""

from __future__ import annotations

import threading
import time
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


def test_the_sweepers_waits_are_at_most_ten_years_and_the_longest_is_waited_out(tmp_path, monkeypatch) -> None:
    """PALETTE_SWEEP_INTERVAL_S and PALETTE_ERASURE_SWEEP_S both past threading's TIMEOUT_MAX (9.2e9 s)
    were accepted, and the served sweeper's first wait raised OverflowError, ending the process."""
    from adapters.settings import TEN_YEARS_S, SettingsError, load_settings

    for name in ("PALETTE_SWEEP_INTERVAL_S", "PALETTE_ERASURE_SWEEP_S"):
        with monkeypatch.context() as env:
            env.setenv(name, "1e10")
            with pytest.raises(SettingsError, match=name) as e:
                load_settings(data_dir=tmp_path)
        assert "\n" not in str(e.value)
    for name in ("PALETTE_SWEEP_INTERVAL_S", "PALETTE_ERASURE_SWEEP_S"):
        monkeypatch.setenv(name, str(TEN_YEARS_S))
    settings = load_settings(data_dir=tmp_path)
    stop, passed, failed = threading.Event(), threading.Event(), []
    fake = SimpleNamespace(settings=settings, step=lambda **_kw: passed.set(), finish_erasures=lambda _grace: 0)

    def run() -> None:
        try:
            Sweeper.run(fake, stop)  # type: ignore[arg-type]
        except Exception as error:  # noqa: BLE001 - what the test reports
            failed.append(error)

    waiting = threading.Thread(target=run)
    waiting.start()
    assert passed.wait(5)
    time.sleep(0.1)  # into its wait, ten years long
    assert waiting.is_alive() and not failed
    stop.set()  # which ends at once
    waiting.join(5)
    assert not waiting.is_alive() and not failed
