"""A creation under a caller-chosen id (an Idempotency-Key's) retried once the key's answer is
forgotten: it hands back what it made only while that is as the creation left it, since the
answer hands out upload links. Real application code over an in-memory event store."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from uuid import UUID, uuid4

import pytest

from application.executors import DirectExecutor
from application.services import PaletteApplication, PaletteService
from domain.contracts.keys import LINKS_EXPIRED_S, REISSUE_S, URL_TTL_S
from domain.errors import InvalidState, NotFound
from tests.keys import process_keys
from tests.simulation import Ids, StepClock

EDITS = {"wall": {"action": "recolor", "value": "#3366aa"}}


def palette() -> tuple[PaletteService, UUID]:
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    service = PaletteService(app, DirectExecutor(app), StepClock(), Ids(), **process_keys())
    return service, service.register("retrying-device").value[0]


def test_a_retried_creation_of_a_job_waiting_for_its_photos_is_the_same_job_reserved_once():
    service, user_id = palette()
    job_id = uuid4()
    assert service.create_job(user_id, "interior", 3, job_id).value == job_id
    assert service.create_job(user_id, "interior", 3, job_id).value == job_id
    assert service.get_user(user_id).reserved == 3


@pytest.mark.parametrize("moved_on", [
    lambda s, u, j: s.cancel_job(u, j),
    lambda s, u, j: (s.cancel_job(u, j), s.executor.execute(s.delete_job_command(u, j))),
], ids=["canceled", "deleted"])
def test_a_retried_creation_of_a_job_that_moved_on_is_refused_and_changes_nothing(
        moved_on: Callable[[PaletteService, UUID, UUID], object]) -> None:
    service, user_id = palette()
    job_id = uuid4()
    service.create_job(user_id, "interior", 3, job_id)
    moved_on(service, user_id, job_id)
    before = service.app.recorder.max_notification_id()
    with pytest.raises(InvalidState, match="new key"):
        service.create_job(user_id, "interior", 3, job_id)
    assert service.app.recorder.max_notification_id() == before
    assert service.get_user(user_id).reserved == 0


def test_a_retried_creation_of_a_deleted_rule_is_refused_and_another_users_is_not_found():
    service, user_id = palette()
    rule_id = uuid4()
    service.create_rule(user_id, "Kitchen", "interior", EDITS, rule_id=rule_id)
    assert service.create_rule(user_id, "Kitchen", "interior", EDITS, rule_id=rule_id).value == rule_id
    service.delete_rule(user_id, rule_id)
    with pytest.raises(InvalidState, match="deleted"):
        service.create_rule(user_id, "Kitchen", "interior", EDITS, rule_id=rule_id)
    other = service.register("another-device").value[0]
    with pytest.raises(NotFound):
        service.create_rule(other, "Kitchen", "interior", EDITS, rule_id=rule_id)


@pytest.mark.parametrize("later_s", [REISSUE_S - 1, REISSUE_S + 1])
def test_a_retried_creation_hands_a_job_back_only_while_links_it_hands_out_expire_in_time(later_s: int) -> None:
    """The answer hands out upload links again, which a presigned PUT cannot bound in size: they
    must expire within LINKS_EXPIRED_S of the job's creation, when the sweeper looks at what they
    admitted. A retry later than REISSUE_S is refused and changes nothing."""
    service, user_id = palette()
    job_id = uuid4()
    service.create_job(user_id, "interior", 3, job_id)
    service.clock.t += timedelta(seconds=later_s)  # type: ignore[attr-defined]
    if later_s <= REISSUE_S:
        assert service.create_job(user_id, "interior", 3, job_id).value == job_id
        return
    before = service.app.recorder.max_notification_id()
    with pytest.raises(InvalidState, match="upload links no longer work"):
        service.create_job(user_id, "interior", 3, job_id)
    assert service.app.recorder.max_notification_id() == before
    assert service.get_user(user_id).reserved == 3  # the job still holds them: canceling it gives them back
    assert LINKS_EXPIRED_S == URL_TTL_S + REISSUE_S
