"""Erasure under hostile timing, with the application's real code over an in-memory event store:
two services sharing one event store and one keyring stand for two API processes (each with its
own key cache), and an erasure is what ``adapters.erasure.erase`` does to the application
(``erase_user``, then the key destroyed)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from adapters.erasure import KEEP_TRYING_S, record_erasure
from application.executors import DirectExecutor
from application.personal import MemoryKeyring
from application.services import PaletteApplication, PaletteService
from domain.contracts.personal import ERASED
from domain.errors import DomainError, InvalidState, NotFound, UserNotFound
from domain.plans import DEFAULT_PLANS
from domain.rule import Rule
from domain.user import User, user_id_for_device_key
from projections.memory import MemoryReadStore
from projections.rebuild import iter_envelopes
from tests.keys import process_keys
from tests.simulation import Ids, StepClock

DEVICE = "device-under-attack"
EDITS = {"wall": {"action": "recolor", "value": "#3366aa"}}


def processes(n: int = 2) -> list[PaletteService]:
    """``n`` services over one event store and one keyring: n API processes, each with its cache."""
    app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    keyring, clock, ids = MemoryKeyring(), StepClock(), Ids()
    return [PaletteService(app, DirectExecutor(app), clock, ids, **process_keys(keyring=keyring)) for _ in range(n)]


def erase(service: PaletteService, user_id: object) -> None:
    assert service.erase_user(user_id)  # type: ignore[arg-type]
    service.sealer.forget(user_id)  # type: ignore[arg-type]


def a_rule(service: PaletteService, user_id: object) -> object:
    return service.create_rule(user_id, "Kitchen, 12 Rue des Lilas", "interior", EDITS).value  # type: ignore[arg-type]


def test_a_request_that_passed_auth_before_the_erasure_is_refused_as_a_domain_error_not_a_crash():
    """DELETE /me lands between a POST /rules' token check and its sealing: the key is gone. The
    API maps a DomainError to its status; anything else is a 500."""
    (service,) = processes(1)
    user_id, _ = service.register(DEVICE).value
    erase(service, user_id)
    with pytest.raises(DomainError):
        service.sealer.prepare(user_id)  # what POST /rules' keys_ready does first
    with pytest.raises(DomainError):
        service.create_rule(user_id, "Kitchen", "interior", EDITS)


def test_a_device_erased_by_another_process_registers_anew_here():
    here, there = processes()
    user_id, _ = here.register(DEVICE).value  # this process now holds the user's key in its cache
    erase(there, user_id)  # DELETE /me served by another API worker, or palette admin erase
    again, created = here.register(DEVICE).value
    assert created and again != user_id


def test_a_device_erased_by_another_process_registers_anew_here_from_an_event_loop_too():
    here, there = processes()
    user_id, _ = asyncio.run(here.register_async(DEVICE)).value  # the key now in this process's cache
    erase(there, user_id)
    again, created = asyncio.run(here.register_async(DEVICE)).value
    assert created and again != user_id
    assert here.get_user(again).granted == 0  # erasing is no way to mint sign-up credits


@pytest.mark.parametrize(("change", "refused"), [
    (lambda service, user_id, rule_id: service.update_rule(user_id, rule_id, "Renamed after erasure", EDITS),
     NotFound),
    # DELETE /rules/{id} in the second before this process refuses the token: the user not found
    # (the API's 401), never a 500 for a command that recorded the rule's deletion and then found
    # its user gone.
    (lambda service, user_id, rule_id: service.delete_rule(user_id, rule_id), UserNotFound),
], ids=["update", "delete"])
def test_no_rule_of_an_erased_user_changes_after_the_erasure_and_the_caller_is_refused_not_crashed(
        change, refused):
    here, there = processes()
    user_id, _ = here.register(DEVICE).value
    rule_id = a_rule(here, user_id)
    erase(there, user_id)
    version = here.app.repository.get(rule_id).version
    with pytest.raises(refused):
        change(here, user_id, rule_id)
    assert here.app.repository.get(rule_id).version == version


def test_no_job_of_an_erased_user_is_deleted_after_the_erasure():
    """DELETE /jobs/{id} with the erased user's token, served by another API worker within the
    second before it refuses the token (seen on a live stack with PALETTE_API_WORKERS=2: 6 of 15
    tries answered 200): the Erased event takes no command after it, so this one is refused too."""
    here, there = processes()
    user_id, _ = here.register(DEVICE).value
    job_id = here.create_job(user_id, "interior", 1).value  # type: ignore[arg-type]
    erase(there, user_id)  # cancels the job: terminal, so deletable but for the erasure
    version = here.app.repository.get(job_id).version
    with pytest.raises(NotFound):
        here.executor.execute(here.delete_job_command(user_id, job_id))  # type: ignore[arg-type]
    assert here.app.repository.get(job_id).version == version


def test_erasing_and_registering_again_does_not_mint_free_credits():
    (service,) = processes(1)
    user_id, _ = service.register(DEVICE).value
    first: User = service.app.repository.get(user_id)
    assert first.balance == DEFAULT_PLANS["free"].initial_credits > 0
    erase(service, user_id)
    again, created = service.register(DEVICE).value
    assert created
    assert service.app.repository.get(again).balance == 0


def test_the_rules_of_an_erased_user_read_erased_in_the_process_that_erased_it():
    """The control for the two above: the erasing process itself drops the key at once."""
    (service,) = processes(1)
    user_id, _ = service.register(DEVICE).value
    rule_id = a_rule(service, user_id)
    erase(service, user_id)
    rule: Rule = service.app.repository.get(rule_id)
    assert service.rule_name(rule.name) == "erased"



def test_a_job_started_after_the_erasure_read_the_reservations_leaves_everything_as_it_was():
    """DELETE /me reads the reservations, then another API process starts a job (a plan with more
    than one at a time): the command refuses before recording anything, so the erasure reads
    again (a refusal after events were recorded is a bug of ours, and a 500)."""
    here, there = processes()
    user_id, _ = here.register(DEVICE).value
    here.change_plan(user_id, "pro")
    first = here.create_job(user_id, "interior", 1).value
    command = here.erase_user_command(user_id, [first])
    second = there.create_job(user_id, "interior", 1).value
    with pytest.raises(InvalidState):
        here.executor.execute(command)
    user: User = here.app.repository.get(user_id)
    assert set(user.reservations) == {first, second} and not user.erased
    assert here.app.repository.get(first).status == "created"
    assert here.erase_user(user_id)  # read again: both canceled and refunded
    user = here.app.repository.get(user_id)
    assert user.erased and not user.reservations


def test_an_erasure_handed_another_users_job_leaves_that_job_and_its_credits_alone():
    """``erase_user_command`` takes the job ids it is given: one that is not the erased user's is
    skipped, never canceled (its owner's credits stay reserved for it)."""
    (service,) = processes(1)
    user_id, _ = service.register(DEVICE).value
    other_id, _ = service.register("another-device").value
    theirs = service.create_job(other_id, "interior", 3).value
    assert service.executor.execute(service.erase_user_command(user_id, [theirs])).value
    assert service.app.repository.get(theirs).status == "created"
    other: User = service.app.repository.get(other_id)
    assert (other.reservations, other.balance) == ({theirs: 3}, DEFAULT_PLANS["free"].initial_credits - 3)


def _starting_a_job_after_each_read(here: PaletteService, there: PaletteService, user_id: object,
                                    times: int) -> list[object]:
    """Another API process starts a job right after each of ``here``'s next ``times`` reads of the
    user (it has not refused the erased user's token yet), canceling the one before so that the
    plan's limit never stops it; the jobs started."""
    read, started = here.executor.read, []

    def read_then_start(stream_id: object) -> object:
        got = read(stream_id)  # type: ignore[arg-type]
        if stream_id == user_id and len(started) < times:
            if started:
                there.cancel_job(user_id, started[-1])  # type: ignore[arg-type]
            started.append(there.create_job(user_id, "interior", 1).value)  # type: ignore[arg-type]
        return got

    here.executor.read = read_then_start  # type: ignore[method-assign]
    return started


def test_an_erasure_outlasts_a_user_starting_jobs_through_another_process_until_every_process_refuses_it():
    """erase_user reads the reservations three times and gives up when a job started after each
    read: DELETE /me answered 409 after its tombstone had killed the token, and the erasure waited
    for the sweeper. It is tried again past the refresh in which every process refuses the user."""
    here, there = processes()
    user_id, _ = here.register(DEVICE).value
    here.change_plan(user_id, "pro")  # four jobs at a time
    started = _starting_a_job_after_each_read(here, there, user_id, times=3)
    with pytest.raises(InvalidState):
        here.erase_user(user_id)  # its three reads, each followed by a job started
    started = _starting_a_job_after_each_read(here, there, user_id, times=3)
    now, pauses = [0.0], []

    def pause(s: float) -> None:
        pauses.append(s)
        now[0] += s

    assert record_erasure(here, user_id, clock=lambda: now[0], pause=pause)  # type: ignore[arg-type]
    assert len(started) == 3 and len(pauses) == 1
    user: User = here.app.repository.get(user_id)
    assert user.erased and not user.reservations
    assert {here.app.repository.get(j).status for j in started} == {"canceled"}


def test_an_erasure_that_cannot_be_recorded_in_its_time_says_so():
    here, there = processes()
    user_id, _ = here.register(DEVICE).value
    _starting_a_job_after_each_read(here, there, user_id, times=1_000)
    now = [0.0]

    def pause(s: float) -> None:
        now[0] += KEEP_TRYING_S  # every try outlasted

    with pytest.raises(InvalidState):
        record_erasure(here, user_id, clock=lambda: now[0], pause=pause)  # type: ignore[arg-type]
    assert not here.app.repository.get(user_id).erased


def test_the_users_read_model_shows_an_erased_users_device_key_as_erased_and_keeps_the_credits():
    service = processes(1)[0]
    user_id = service.register(DEVICE).value[0]
    credits = service.get_user(user_id).credits
    erase(service, user_id)
    store, app = MemoryReadStore(), service.app
    store.apply(list(iter_envelopes(app.recorder, app.mapper.transcoder, 1, None)))
    row = store.table("users")[(user_id,)]
    assert (row["device_hash"], row["credits"]) == (ERASED, credits)


class _Untouchable:
    """A connection the code must not use."""

    def execute(self, *_: object, **__: object) -> None:
        raise AssertionError("read or rewrote the event store")


def test_an_erasure_leaves_a_legacy_registration_as_it_is_when_stored_states_are_enciphered_or_compressed():
    """The rewrite of a v1 ``Registered`` reads the stored bytes as plain JSON: over enciphered or
    compressed states it would write garbage, so it touches nothing."""
    import uuid

    from eventsourcing.cryptography import AESCipher

    from adapters.erasure import redact_legacy_registration

    for extra in ({"CIPHER_TOPIC": "eventsourcing.cryptography:AESCipher", "CIPHER_KEY": AESCipher.create_key(16)},
                  {"COMPRESSOR_TOPIC": "eventsourcing.compressor:ZlibCompressor"}):
        app = PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo", **extra})
        assert redact_legacy_registration(_Untouchable(), app, uuid.uuid4()) is False


def _api_of(service: PaletteService) -> Any:
    """The HTTP API over ``service`` (an API process whose erased-token list has not been
    refreshed yet), and a client token of a new user."""
    from fastapi.testclient import TestClient

    from adapters.api.app import create_app
    from adapters.settings import Settings

    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48)
    app = create_app(SimpleNamespace(settings=settings, read_pool=None, service=service))  # type: ignore[arg-type]
    return TestClient(app, raise_server_exceptions=False), app.state.tokens


def test_a_command_of_a_user_erased_through_another_process_is_a_401_to_its_caller_not_a_404():
    """In the second before this process refuses the erased user's tokens, POST /jobs and POST
    /rules answered 404 "user not found": the caller's own account gone is a token no longer
    valid, as GET /me already said."""
    from datetime import UTC, datetime

    here, there = processes()
    user_id, _ = here.register(DEVICE).value
    api, tokens = _api_of(here)
    auth = {"Authorization": f"Bearer {tokens.issue(user_id, datetime.now(UTC))}"}
    erase(there, user_id)  # DELETE /me served by another API worker
    for path, body in (("/jobs", {"preset": "interior", "item_count": 1}),
                       ("/rules", {"name": "Kitchen", "preset_id": "interior", "concepts": EDITS})):
        answer = api.post(path, json=body, headers=auth)
        assert answer.status_code == 401, (path, answer.text)
        assert answer.json()["error"]["code"] == "AUTH_INVALID" and answer.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("erased", [1, 8, 9, 16, 17, 2000])
def test_registering_a_device_erased_many_times_looks_up_a_few_generations_not_all_of_them(erased: int):
    """Each erasure of a device's user moves the device to its next generation, and a
    registration walked every generation erased before, eight a query: one client erasing and
    registering one device again at its registration limit (17,280 times a day) made each of its
    registrations cost thousands of queries after a day, growing without end. The erased
    generations are the first ones (only the live user, the first not erased, is ever erased), so
    the live one is found by doubling and halving: a few dozen queries for a million erasures."""
    (service,) = processes(1)
    keyring = service.sealer.keyring
    device_key = service.device_keys.key(DEVICE)
    for generation in range(erased):  # what as many DELETE /me and registrations leave
        keyring.destroy(user_id_for_device_key(device_key, generation))
    asked: list[int] = []
    lookup = keyring.erased
    keyring.erased = lambda ids: asked.append(1) or lookup(ids)  # type: ignore[method-assign]
    user_id, created = service.register(DEVICE).value
    assert created and user_id == user_id_for_device_key(device_key, erased)
    assert len(asked) <= 25, len(asked)  # before: 250 for 2,000
    again, created = service.register(DEVICE).value
    assert again == user_id and not created


def test_a_refresh_reads_again_from_before_its_newest_tombstone_whatever_the_databases_time_zone():
    """PostgreSQL hands ``requested_at`` back in the session's time zone, and taking LATE_S from
    it there is wall-clock arithmetic: the night Paris's clocks go forward, five minutes before
    03:02 is 02:57, an hour that does not exist there, read as 01:57 UTC, 55 minutes after the
    tombstone (01:02 UTC). The next refresh then asked only for erasures after that, and every
    other API process missed those committed meanwhile."""
    from contextlib import contextmanager
    from datetime import UTC, datetime, timedelta
    from uuid import uuid4
    from zoneinfo import ZoneInfo

    from adapters.erasure import LATE_S, ErasedUsers

    newest = datetime(2027, 3, 28, 3, 2, tzinfo=ZoneInfo("Europe/Paris"))  # clocks just gone forward
    asked: list[Any] = []

    class Conn:
        def execute(self, _sql: str, params: list[Any]) -> Any:
            asked.append(params[1])
            return SimpleNamespace(fetchall=lambda: [(uuid4(), newest)])

    @contextmanager
    def connection() -> Any:
        yield Conn()

    users = ErasedUsers(SimpleNamespace(connection=connection), token_ttl_s=3600)
    users.refresh()
    users.refresh()
    assert asked[0] is None
    assert asked[1] == newest.astimezone(UTC) - timedelta(seconds=LATE_S), asked[1].astimezone(UTC)


class _Tombstones:
    """A pool whose connection answers ``erased_since``'s query with ``answers``, one a refresh,
    keeping the ``after`` each asked with."""

    def __init__(self, *answers: list[Any]) -> None:
        self.answers = list(answers)
        self.asked: list[Any] = []

    def connection(self) -> Any:
        from contextlib import nullcontext

        def execute(_sql: str, params: list[Any]) -> Any:
            self.asked.append(params[1])
            found = self.answers.pop(0) if self.answers else []
            return SimpleNamespace(fetchall=lambda: found)

        return nullcontext(SimpleNamespace(execute=execute))


def test_a_refresh_never_reads_from_further_back_than_the_one_before():
    """A tombstone stamped before the newest known (a clock stepped back, a late commit) is read,
    but the next refresh still reads from the newest known, less LATE_S, not from it."""
    from datetime import UTC, datetime, timedelta
    from uuid import uuid4

    from adapters.erasure import LATE_S, ErasedUsers

    newest = datetime(2027, 1, 1, 12, 0, tzinfo=UTC)
    stepped_back = uuid4()
    pool = _Tombstones([(uuid4(), newest)], [(stepped_back, newest - timedelta(hours=1))])
    users = ErasedUsers(pool, token_ttl_s=7200)
    for _ in range(3):
        users.refresh()
    assert stepped_back in users
    assert pool.asked == [None, newest - timedelta(seconds=LATE_S), newest - timedelta(seconds=LATE_S)]


def test_an_erasure_made_here_is_forgotten_once_every_token_it_refused_has_expired():
    """Added at once (DELETE /me) and kept until a refresh reads its tombstone, or a token's
    lifetime (and a minute's leeway) has passed, whichever comes first: not for ever."""
    from uuid import uuid4

    from adapters.erasure import ErasedUsers

    now = [1000.0]
    user_id = uuid4()
    users = ErasedUsers(_Tombstones(), token_ttl_s=3600, clock=lambda: now[0])  # no tombstone is ever read
    users.add(user_id)
    now[0] += 3600 + 60  # the token's lifetime and the leeway: still refused
    users.refresh()
    assert user_id in users
    now[0] += 1
    users.refresh()
    assert user_id not in users
