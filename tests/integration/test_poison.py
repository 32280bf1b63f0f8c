"""A poison event in the log (one the read models cannot fold or PostgreSQL cannot store) is
parked with its error, holds back only its own stream, and never stops the read side: not the
running projector, not a restarted one, not a whole stack started again on that data.

Runs on a stack of its own: the poison stays in this log for good, and the session's shared
stack must remain a clean fold of its log for the other suites."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from adapters.bootstrap import embedded_stack, event_store_env
from adapters.pg_streams import pg_stream_loader
from adapters.settings import load_settings
from adapters.system import RandomIds, SystemClock
from application.executors import GroupCommitter
from application.services import PaletteApplication, PaletteService
from infra.stack import EmbeddedStack
from projections.store import dead_letters, resolve_dead_letter
from tests.conftest import _free_port_block
from tests.keys import process_keys

from .test_stack import wait_until

EDITS = {"wall": {"action": "recolor", "value": "#5b7f95"}}
APPS = ("api", "relay", "projector")


@pytest.fixture(scope="module")
def own_stack() -> Iterator[EmbeddedStack]:
    data_dir = Path(tempfile.mkdtemp(prefix="palette-poison-"))
    data_dir.chmod(0o755)
    ports = _free_port_block(random.Random(os.getpid() + 1))
    settings = load_settings(env="development", data_dir=data_dir, pg_fsync=False, projector_sweep_s=1.0, **ports)
    stack = embedded_stack(settings)
    stack.start_infra()
    try:
        stack.start_apps(APPS)
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def service(own_stack: EmbeddedStack) -> Iterator[PaletteService]:
    app = PaletteApplication(env=event_store_env(own_stack.settings))
    committer = GroupCommitter(app, pg_stream_loader(app)).start()
    yield PaletteService(app, committer, SystemClock(), RandomIds(), **process_keys())
    committer.stop()
    app.close()


@pytest.fixture
def conn(own_stack: EmbeddedStack) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(own_stack.settings.effective_database_url, autocommit=True) as c:
        yield c


def _in_jobs_log(conn: psycopg.Connection[Any], job_id: uuid.UUID) -> bool:
    return conn.execute("SELECT 1 FROM palette_read.jobs_log WHERE id = %s", [job_id]).fetchone() is not None


def _letters(conn: psycopg.Connection[Any], stream_id: uuid.UUID) -> list[tuple[str, int, str]]:
    return [(d["model"], d["version"], d["status"]) for d in dead_letters(conn) if d["stream_id"] == stream_id]


def _legacy_rule(service: PaletteService, owner: uuid.UUID, name: str) -> uuid.UUID:
    """A rule as the code before sealing stored it (its name in clear), straight into the log:
    the service seals names now, and a sealed name holds no NUL."""
    from datetime import UTC, datetime

    from eventsourcing.persistence import StoredEvent

    rule_id = uuid.uuid4()
    state = service.app.mapper.transcoder.encode({
        "timestamp": datetime.now(UTC), "originator_topic": "domain.rule:Rule", "user_id": owner, "name": name,
        "preset_id": "interior", "concepts": EDITS, "protect": []})
    service.app.recorder.insert_events([StoredEvent(rule_id, 1, "domain.rule:Rule.RuleCreated", state)])
    return rule_id


def _new_job(service: PaletteService) -> uuid.UUID:
    user_id = service.register(f"bystander-{uuid.uuid4()}").value[0]
    return service.create_job(user_id, "interior", 1).value


def test_an_event_postgres_cannot_store_is_parked_and_the_read_side_moves_on(own_stack, service, conn):
    # Straight into the log, past the API's boundary: a rule named with a NUL character.
    owner = service.register(f"poisoner-{uuid.uuid4()}", plan="pro").value[0]
    rule_id = _legacy_rule(service, owner, "x\x00y")
    job_id = _new_job(service)

    wait_until(lambda: _in_jobs_log(conn, job_id), timeout_s=30, what="another user's job in jobs_log")
    wait_until(lambda: _letters(conn, rule_id) == [("rules", 1, "parked")], timeout_s=30,
               what="the poison event parked")
    parked = next(d for d in dead_letters(conn) if d["stream_id"] == rule_id)
    # Refused by the server (arrays go in binary) or, in text, by psycopg: either names the NUL.
    assert "0x00" in parked["error"] or "NUL" in parked["error"]
    # The owner's own stream (User) is not held: its slot was taken and is visible.
    assert conn.execute("SELECT 1 FROM palette_read.users WHERE id = %s", [owner]).fetchone() is not None
    # retry fails again (the text still cannot be stored): parked anew, nothing applied.
    again = resolve_dead_letter(conn, parked["id"], "retry")
    assert again.applied == 0 and _letters(conn, rule_id) == [("rules", 1, "parked")]

    # A projector restarted on that data does not crash on the same event again.
    before = own_stack.supervisor.pid("projector")
    own_stack.kill("projector")

    def restarted() -> bool:
        own_stack.supervisor.check()
        return own_stack.supervisor.pid("projector") not in (None, before)

    wait_until(restarted, timeout_s=30, what="the projector to restart")
    second = _new_job(service)
    wait_until(lambda: _in_jobs_log(conn, second), timeout_s=60, what="a job after the projector's restart")
    assert own_stack.supervisor.check() == []  # it did not crash again

    # The stream's next event waits behind the parked one; once the rule is renamed, a retry
    # folds both (the row written holds the new name) and the stream moves again.
    service.update_rule(owner, rule_id, "later", EDITS)
    wait_until(lambda: _letters(conn, rule_id) == [("rules", 1, "parked"), ("rules", 2, "held")],
               timeout_s=30, what="its stream's next event held behind it")
    letter = next(d for d in dead_letters(conn) if d["stream_id"] == rule_id and d["status"] == "parked")
    assert resolve_dead_letter(conn, letter["id"], "retry").applied == 2
    assert _letters(conn, rule_id) == []
    (name,) = conn.execute("SELECT name FROM palette_read.rules WHERE id = %s", [rule_id]).fetchone() or (None,)
    assert service.rule_name(name) == "later"  # sealed now, as every name the service records


def test_a_stack_starts_again_on_data_holding_a_poison_event(own_stack, service, conn):
    owner = service.register(f"poisoner-{uuid.uuid4()}", plan="pro").value[0]
    rule_id = _legacy_rule(service, owner, "bad\x00name")
    wait_until(lambda: ("rules", 1, "parked") in _letters(conn, rule_id), timeout_s=30, what="the event parked")

    own_stack.stop()  # the whole stack, as Ctrl-C of `palette up` does, then `palette up` again
    own_stack.start_infra()
    own_stack.start_apps(APPS)

    app = PaletteApplication(env=event_store_env(own_stack.settings))  # the old pool's server is gone
    committer = GroupCommitter(app, pg_stream_loader(app)).start()
    try:
        again = PaletteService(app, committer, SystemClock(), RandomIds(), **process_keys())
        with psycopg.connect(own_stack.settings.effective_database_url, autocommit=True) as fresh:
            job_id = _new_job(again)
            wait_until(lambda: _in_jobs_log(fresh, job_id), timeout_s=60, what="a job after the stack's restart")
            assert ("rules", 1, "parked") in _letters(fresh, rule_id)
    finally:
        committer.stop()
        app.close()
