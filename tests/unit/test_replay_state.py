"""`Replayer.state` on the in-memory log: the versions a stream has are the stored events'
count, and a state folded for analysts shows an erased user's sealed fields as erased."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from uuid import UUID

import pytest

from application.executors import DirectExecutor
from application.services import PaletteApplication, PaletteService
from domain.contracts.personal import ERASED, SEALED_PREFIX
from projections.replay import Replayer
from tests.keys import process_keys
from tests.simulation import Ids

NAME = "my kitchen"


class _Clock:
    def now(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC)


def _log() -> tuple[PaletteApplication, UUID, UUID]:
    """An in-memory log holding one user and a rule of theirs (its name sealed with the user's key)."""
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    svc = PaletteService(app, DirectExecutor(app), _Clock(), Ids(), **process_keys())
    user_id = svc.register("device-1").value[0]
    rule_id = svc.create_rule(user_id, NAME, "interior", {"wall": {"action": "tone", "value": "warm"}}).value
    return app, user_id, rule_id


def test_a_state_asked_for_one_version_past_the_streams_last_is_refused_saying_how_many_it_has() -> None:
    app, user_id, _ = _log()
    stored = len(app.recorder.select_events(user_id))
    assert stored > 1
    replayer = Replayer(app)
    assert replayer.state(user_id, version=stored)["version"] == stored
    with pytest.raises(LookupError, match=f"has only {stored} version"):
        replayer.state(user_id, version=stored + 1)


def test_a_state_shows_an_erased_users_sealed_field_as_erased_and_anyone_elses_still_sealed() -> None:
    app, user_id, rule_id = _log()
    sealed = Replayer(app).state(rule_id)["state"]
    erased = Replayer(app, erased={user_id}).state(rule_id)["state"]
    assert sealed["name"].startswith(SEALED_PREFIX)
    assert erased["name"] == ERASED
    assert {k: v for k, v in erased.items() if k != "name"} == {k: v for k, v in sealed.items() if k != "name"}
    assert NAME not in json.dumps(sealed) + json.dumps(erased)


def test_replay_as_csv_is_one_header_and_one_row_per_event_holding_what_its_json_line_does() -> None:
    import csv
    import io

    from projections.replay import CSV_COLUMNS, as_csv, as_jsonl

    app, _, _ = _log()
    replayer = Replayer(app)
    lines = [json.loads(line) for line in as_jsonl(replayer.all())]
    header, *rows = list(csv.reader(io.StringIO("".join(as_csv(replayer.all())))))
    assert header == list(CSV_COLUMNS) and len(rows) == len(lines) > 1
    for row, line in zip(rows, lines, strict=True):
        cells = dict(zip(CSV_COLUMNS, row, strict=True))
        assert json.loads(cells.pop("data")) == line.pop("data")
        assert cells == {k: str(line[k]) for k in cells}  # the timestamp in the same ISO 8601 form
