"""`Replayer.all`'s time window on the in-memory log: the events stamped in the window, in commit
order, although commit order may run up to TIME_SLACK_S behind the stamps (they come from the
command, taken before its commit)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from application.executors import DirectExecutor
from application.services import PaletteApplication, PaletteService
from domain.contracts.streams import TIME_SLACK_S
from projections.replay import Replayer
from tests.keys import process_keys
from tests.simulation import Ids

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class _SetClock:
    def __init__(self) -> None:
        self.at = T0

    def now(self) -> datetime:
        return self.at


# each registration's stamp, in commit order, as milliseconds after T0: any stamp at most
# (just under) TIME_SLACK_S behind the latest one before it
late_ms = int(TIME_SLACK_S * 1000) - 1
stamps = st.lists(st.integers(-late_ms, 3_000), min_size=1, max_size=12).map(
    lambda steps: _stamped(steps))


def _stamped(steps: list[int]) -> list[int]:
    out: list[int] = []
    latest = 0
    for step in steps:
        at = max(0, latest + step)
        out.append(at)
        latest = max(latest, at)
    return out


@settings(max_examples=60, deadline=None)
@given(stamps, st.data())
def test_a_time_window_is_the_events_stamped_in_it_in_commit_order(at_ms: list[int], data: st.DataObject) -> None:
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    clock = _SetClock()
    svc = PaletteService(app, DirectExecutor(app), clock, Ids(), **process_keys())
    for n, ms in enumerate(at_ms):
        clock.at = T0 + timedelta(milliseconds=ms)
        svc.register(f"device-{n}")
    replayer = Replayer(app)
    log = list(replayer.all())
    assert {e.timestamp for e in log} == {T0 + timedelta(milliseconds=ms) for ms in at_ms}
    edges = sorted({e.timestamp for e in log})
    since = data.draw(st.sampled_from(edges), label="since")
    until = data.draw(st.sampled_from([t for t in edges if t >= since]), label="until")
    for window in ({"since": since}, {"until": until}, {"since": since, "until": until}):
        lo, hi = window.get("since", T0), window.get("until", datetime.max.replace(tzinfo=UTC))
        assert [e.id for e in replayer.all(**window)] == [e.id for e in log if lo <= e.timestamp <= hi], window


def test_a_window_after_a_long_unreadable_stretch_is_found_reading_that_stretch_once(monkeypatch) -> None:
    """The search for a --since window's first position reads the first readable event at or after
    each position it probes; it read on to the end of an unreadable stretch (a state written under a
    key since lost, say) at every probe: the stretch read some log2(log) times over, ten events a
    query. Each probe now reads no further than the part of the log the search has not settled."""
    import projections.replay as replay
    from domain.contracts.envelope import EventEnvelope
    from projections.stored_events import EPOCH, UNREADABLE

    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    clock = _SetClock()
    svc = PaletteService(app, DirectExecutor(app), clock, Ids(), **process_keys())
    for n in range(200):
        clock.at = T0 + timedelta(seconds=n)
        svc.register(f"device-{n}")
    head = app.recorder.max_notification_id()
    readable_from = head - 5  # all before it unreadable
    decoded = 0
    real = replay.from_notification

    def decode(notification, transcoder):  # type: ignore[no-untyped-def]
        nonlocal decoded
        decoded += 1
        env = real(notification, transcoder)
        if notification.id < readable_from:
            return EventEnvelope(id=env.id, stream_id=env.stream_id, stream_type=env.stream_type, version=env.version,
                                 type=env.type, timestamp=EPOCH, data={UNREADABLE: "lost key"})
        return env

    monkeypatch.setattr(replay, "from_notification", decode)
    replayer = Replayer(app)
    assert replayer.position_at(T0) == 1  # every readable stamp is after it: the whole log
    assert decoded <= 2 * head, (decoded, head)
    decoded = 0
    late = T0 + timedelta(seconds=199 + 10 * TIME_SLACK_S)
    assert replayer.position_at(late) == head + 1  # past every stamp
    assert decoded <= 2 * head, (decoded, head)
