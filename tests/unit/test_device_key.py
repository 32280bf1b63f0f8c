"""A device hash is a credential: only its keyed form (HMAC under a server secret) is stored,
old events that held it raw are upcast on every read, devices registered before keep their
user, and registration is limited per client address."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from uuid import UUID

import pytest

from adapters.api.rate_limit import RateLimited, TokenBuckets, client_address
from adapters.settings import (
    DEV_ADDRESS_IDEMPOTENCY_KEYS,
    DEV_ADDRESS_JOBS_PER_DAY,
    DEV_ADDRESS_RERUN_COPY_BYTES,
    DEV_REGISTER_RATE,
    SettingsError,
    load_settings,
)
from application.device_keys import HmacDeviceKeyer
from application.executors import DirectExecutor
from application.services import PaletteApplication, PaletteService
from domain.user import (
    DEVICE_KEY_SCHEME,
    REDACTED_DEVICE_KEY,
    User,
    legacy_user_id_for_device,
    user_id_for_device_key,
)
from projections.models.users import USERS
from projections.stored_events import from_notification
from tests.keys import process_keys
from tests.simulation import Ids, StepClock

AT = datetime(2026, 1, 1, tzinfo=UTC)
SECRET = "s" * 48
RAW = "legacy-device-0042"


def in_memory() -> PaletteApplication:
    return PaletteApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})


def service(app: PaletteApplication, secret: str = SECRET) -> PaletteService:
    return PaletteService(app, DirectExecutor(app), StepClock(), Ids(),
                          **process_keys(device_keys=HmacDeviceKeyer(secret)))


def store_v1_user(app: PaletteApplication, device_hash: str, at: datetime = AT) -> UUID:
    """Given a user registered by the code before device keys: v1 Registered with the raw hash,
    under the id derived from it, stored as that code's mapper stored it."""
    from eventsourcing.persistence import StoredEvent

    user_id = legacy_user_id_for_device(device_hash)
    encode = app.mapper.transcoder.encode
    app.recorder.insert_events([
        StoredEvent(user_id, 1, "domain.user:User.Registered", encode(
            {"timestamp": at, "originator_topic": "domain.user:User", "device_hash": device_hash, "plan": "free"})),
        StoredEvent(user_id, 2, "domain.user:User.CreditsGranted", encode(
            {"timestamp": at, "amount": 50, "reason": "signup"})),
    ])
    return user_id


def all_stored_bytes(app: PaletteApplication) -> bytes:
    return b"".join(n.state for n in app.recorder.select_notifications(start=1, limit=1000))


# -- the keyer ------------------------------------------------------------------------------
def test_a_device_key_is_an_hmac_under_the_secret_and_never_the_hash():
    keyer = HmacDeviceKeyer(SECRET)
    key = keyer.key(RAW)
    assert key == keyer.key(RAW) and key.startswith(DEVICE_KEY_SCHEME)
    assert len(key) == len(DEVICE_KEY_SCHEME) + 64 and RAW not in key
    assert HmacDeviceKeyer("t" * 48).key(RAW) != key  # without the secret, no one can derive it
    assert SECRET not in repr(keyer)


@pytest.mark.parametrize("secret", ["", "short", "x" * 15, b"x" * 15])
def test_a_missing_or_short_secret_is_refused_rather_than_keying_with_it(secret):
    with pytest.raises(ValueError):
        HmacDeviceKeyer(secret)


def test_a_secret_of_16_bytes_keys_as_rfc_4231_says_hmac_sha256_does():
    assert HmacDeviceKeyer("x" * 16).key(RAW).startswith(DEVICE_KEY_SCHEME)
    # RFC 4231, test case 1: the key is the secret, the data the device hash
    assert HmacDeviceKeyer(b"\x0b" * 20).key("Hi There") == (
        DEVICE_KEY_SCHEME + "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")


# -- v1 events are upcast on read --------------------------------------------------------------
def test_a_v1_registered_event_is_upcast_on_read_and_the_raw_hash_is_gone():
    app = in_memory()
    user_id = store_v1_user(app, RAW)

    [stored, _] = app.recorder.select_events(user_id)
    event = app.mapper.to_domain_event(stored)
    assert isinstance(event, User.Registered)
    assert event.device_key == REDACTED_DEVICE_KEY and not hasattr(event, "device_hash")

    user = app.repository.get(user_id)
    assert (user.plan, user.balance, user.version) == ("free", 50, 2)
    assert RAW not in json.dumps(vars(user), default=str)


def test_the_analysts_envelope_of_a_v1_event_is_upcast_too():
    app = in_memory()
    store_v1_user(app, RAW)
    registered = from_notification(app.recorder.select_notifications(start=1, limit=1)[0], app.mapper.transcoder)
    shown = registered  # every envelope is built at the event's current version
    assert RAW not in json.dumps(shown.data)
    assert shown.data == {"plan": "free", "device_key": REDACTED_DEVICE_KEY, "class_version": 2}


def test_the_users_read_model_copies_only_a_sealed_device_key():
    app = in_memory()
    store_v1_user(app, RAW)
    svc = service(app)
    new_id, _ = svc.register("new-device-0001").value
    rows: dict = {}
    for n in app.recorder.select_notifications(start=1, limit=100):
        env = from_notification(n, app.mapper.transcoder)
        if env.type == "Registered":
            USERS.apply(rows, env)
    assert rows[(legacy_user_id_for_device(RAW),)]["device_hash"] is None
    stored = rows[(new_id,)]["device_hash"]
    key = HmacDeviceKeyer(SECRET).key("new-device-0001")
    assert stored.startswith(f"sealed:v1:{new_id}:") and key not in stored
    assert svc.sealer.open("device_key", stored) == key  # the user's key opens it, and only that


# -- registration ------------------------------------------------------------------------------
def test_registering_twice_returns_the_same_user_and_stores_no_raw_hash():
    app = in_memory()
    svc = service(app)
    first, created = svc.register("device-abcdef").value
    again, created_again = svc.register("device-abcdef").value
    assert (first, created, created_again) == (again, True, False)
    assert first == user_id_for_device_key(HmacDeviceKeyer(SECRET).key("device-abcdef"))
    assert first != legacy_user_id_for_device("device-abcdef")
    assert b"device-abcdef" not in all_stored_bytes(app)


def test_a_device_key_presented_as_a_device_hash_is_another_device():
    app = in_memory()
    svc = service(app)
    user_id, _ = svc.register("device-abcdef").value
    key = HmacDeviceKeyer(SECRET).key("device-abcdef")
    other, created = svc.register(key).value  # what an analyst reads in the Registered event
    assert other != user_id and created is True


def test_a_device_registered_before_device_keys_keeps_its_user():
    app = in_memory()
    legacy_id = store_v1_user(app, RAW)
    user_id, created = service(app).register(RAW).value
    assert (user_id, created) == (legacy_id, False)
    assert service(app).get_user(user_id).credits == 50
    assert len(app.recorder.select_notifications(start=1, limit=100)) == 2  # nothing new recorded


def test_a_device_whose_legacy_user_was_erased_gets_a_user_without_sign_up_credits():
    """As for any erased user: erasing is no way to mint credits, old users included."""
    app = in_memory()
    legacy_id = store_v1_user(app, RAW)
    palette = service(app)
    assert palette.erase_user(legacy_id)
    user_id, created = palette.register(RAW).value
    assert created and user_id != legacy_id
    assert palette.get_user(user_id).credits == 0


def test_without_a_configured_keyer_a_service_still_keys_device_hashes():
    app = in_memory()
    svc = PaletteService(app, DirectExecutor(app), StepClock(), Ids(), **process_keys())
    user_id, _ = svc.register("device-abcdef").value
    assert svc.register("device-abcdef").value == (user_id, False)
    assert b"device-abcdef" not in all_stored_bytes(app)


# -- the client address and the limit -----------------------------------------------------------
def test_forwarded_for_is_ignored_unless_proxies_are_trusted():
    assert client_address("10.0.0.9", ["1.2.3.4"], 0) == "10.0.0.9"
    assert client_address("10.0.0.9", ["6.6.6.6, 1.2.3.4"], 1) == "1.2.3.4"  # the proxy's entry
    assert client_address("10.0.0.9", ["6.6.6.6, 1.2.3.4", "5.5.5.5"], 2) == "1.2.3.4"
    assert client_address("10.0.0.9", [], 1) == "10.0.0.9"  # no header: the peer (the proxy)


def test_an_ipv6_client_counts_by_its_64_prefix():
    a = client_address("2001:db8:1:2::1", [], 0)
    assert a == client_address("2001:db8:1:2:ffff::9", [], 0) == "2001:db8:1:2::/64"
    assert a != client_address("2001:db8:1:3::1", [], 0)
    assert client_address("::ffff:10.1.2.3", [], 0) == "10.1.2.3"


def test_registrations_from_one_address_past_the_burst_are_limited():
    clock = [0.0]
    limits = TokenBuckets(rate_per_s=0.2, burst=3, clock=lambda: clock[0])
    for _ in range(3):
        limits.take(client_address("198.51.100.7", [], 0))
    with pytest.raises(RateLimited) as e:
        limits.take(client_address("198.51.100.7", ["203.0.113.1"], 0))  # a forged header changes nothing
    assert e.value.retry_after_header == "5"
    limits.take(client_address("198.51.100.8", [], 0))
    clock[0] = 5.0
    limits.take(client_address("198.51.100.7", [], 0))


# -- settings ----------------------------------------------------------------------------------
def test_development_generates_the_device_key_secret_even_into_an_older_secrets_file(tmp_path):
    (tmp_path / "secrets.json").write_text(json.dumps({"jwt_secret": "j" * 40}))
    s = load_settings(env="development", data_dir=tmp_path)
    assert len(s.device_key_secret) >= 32 and s.jwt_secret == "j" * 40
    assert json.loads((tmp_path / "secrets.json").read_text())["device_key_secret"] == s.device_key_secret
    assert load_settings(env="development", data_dir=tmp_path).device_key_secret == s.device_key_secret
    assert (s.rate_register_per_s, s.rate_register_burst) == DEV_REGISTER_RATE
    assert s.rate_jobs_per_address_per_day == DEV_ADDRESS_JOBS_PER_DAY  # suites run every user from loopback
    assert s.idempotency_keys_per_address == DEV_ADDRESS_IDEMPOTENCY_KEYS
    assert s.rerun_copy_bytes_per_address_per_day == DEV_ADDRESS_RERUN_COPY_BYTES


def test_production_refuses_a_placeholder_device_key_secret_and_limits_registration(tmp_path):
    good = {"jwt_secret": "jwt-secret-0f-f0rty-bytes-0123456", "callback_secret": "callback-secret-0f-f0rty-bytes-01"}
    with pytest.raises(SettingsError, match="PALETTE_DEVICE_KEY_SECRET"):
        load_settings(env="production", data_dir=tmp_path, device_key_secret="changeme", **good)
    s = load_settings(env="production", data_dir=tmp_path, device_key_secret="device-key-secret-0f-f0rty-bytes", **good)
    assert s.rate_register_burst < 100 and s.rate_register_per_s < 1 and s.trusted_proxies == 0
    assert s.rate_jobs_per_address_per_day == 20_000 and s.idempotency_keys_per_address == 100_000
    assert s.rerun_copy_bytes_per_address_per_day == 160 * 2**30
