"""``LogReader.read`` on the in-memory recorder (the simulation's log) keeps the PostgreSQL
query's promise: commit order, after a position, at most a limit, only the streams asked for."""

from __future__ import annotations

import pytest

from application.executors import DirectExecutor
from application.services import PaletteApplication, PaletteService
from domain.contracts.streams import stream_topics
from domain.presets import PRESETS
from projections import rebuild as rebuilding
from projections.log import LogReader
from tests.keys import process_keys
from tests.simulation import Ids, StepClock


def _log_of_users(users: int) -> PaletteApplication:
    """An in-memory log of ``users`` users, each with a rule and a job: three stream types."""
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    svc = PaletteService(app, DirectExecutor(app), StepClock(), Ids(), **process_keys())
    preset = next(iter(PRESETS))
    for n in range(users):
        user_id, _ = svc.register(f"device-{n}").value
        svc.create_rule(user_id, "r", preset, {"wall": {"action": "recolor", "value": "#ffffff"}})
        svc.create_job(user_id, preset, 2)
    return app


def test_a_read_for_some_stream_types_is_the_whole_log_filtered() -> None:
    app = _log_of_users(6)
    reader = LogReader(app.recorder, app.mapper.transcoder)
    head = reader.head()
    whole = reader.read(0, head, 10**6)
    assert [e.id for e in whole] == sorted(e.id for e in whole) and {e.stream_type for e in whole} == {
        "User", "Job", "Rule"}
    for kinds in (["User"], ["Job", "Rule"], ["Rule"]):
        expected = [e.id for e in whole if e.stream_type in kinds]
        assert [e.id for e in reader.read(0, head, 10**6, kinds)] == expected
        assert [e.id for e in reader.read(expected[0], head, 3, kinds)] == expected[1:4]
        assert [e.id for e in reader.read(0, expected[2], 10**6, kinds)] == expected[:3]  # up to a position


@pytest.mark.parametrize("page", [1, 2, 3, 10**6])
def test_a_rebuilds_read_of_the_log_after_a_position_takes_every_event_however_it_is_paged(
        monkeypatch: pytest.MonkeyPatch, page: int) -> None:
    """The tail a rebuild folds under the model's lock (``iter_envelopes``), read a page at a time:
    no event at a page's edge is lost or read twice."""
    app = _log_of_users(3)
    monkeypatch.setattr(rebuilding, "PAGE", page)
    reader = LogReader(app.recorder, app.mapper.transcoder)
    head = reader.head()
    for start in (1, 2, head):
        assert [e.id for e in rebuilding.iter_envelopes(app.recorder, app.mapper.transcoder, start, None)] == list(
            range(start, head + 1))
    rules = [e.id for e in reader.read(0, head, 10**6, ["Rule"])]
    assert len(rules) == 3
    assert [e.id for e in rebuilding.iter_envelopes(app.recorder, app.mapper.transcoder, 1, None,
                                                    stream_topics("Rule"))] == rules
