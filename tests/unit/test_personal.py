"""Sealed personal fields: what a sealed value reveals, what it refuses, and what erasure leaves."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import threading
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from application.personal import KeyDestroyed, MemoryKeyring, Sealer
from domain.contracts.personal import ERASED, SEALED_PREFIX, redact, sealed_owner

ALICE, BOB = uuid.uuid4(), uuid.uuid4()


@given(st.text(max_size=200))
def test_a_sealed_value_opens_to_itself_and_shows_nothing_of_it(value):
    sealer = Sealer(MemoryKeyring())
    sealed = sealer.seal(ALICE, "rule.name", value)
    assert sealed.startswith(f"{SEALED_PREFIX}{ALICE}:") and sealed_owner(sealed) == ALICE
    assert sealer.open("rule.name", sealed) == value
    if len(value) >= 4:  # a leak shows under any key; random text holds a given 4 characters by chance
        # (about 1 in 64**4 a place: "AL88" was found in one), under two independent keys about never
        again = Sealer(MemoryKeyring()).seal(ALICE, "rule.name", value)
        assert value not in sealed.removeprefix(f"{SEALED_PREFIX}{ALICE}:") \
            or value not in again.removeprefix(f"{SEALED_PREFIX}{ALICE}:")


def test_sealing_is_deterministic_per_user_and_field_only():
    sealer = Sealer(MemoryKeyring())
    same = sealer.seal(ALICE, "rule.name", "Kitchen")
    assert sealer.seal(ALICE, "rule.name", "Kitchen") == same  # an unchanged name is an unchanged value
    assert sealer.seal(ALICE, "device_key", "Kitchen") != same
    assert sealer.seal(BOB, "rule.name", "Kitchen").split(":")[-1] != same.split(":")[-1]


@given(st.text(max_size=50), st.sampled_from(["rule.name", "device_key"]))
def test_a_sealed_value_is_the_documented_format_computed_by_hand(value, field):
    """sealed:v1:<user>:<base64url(nonce | AES-GCM)>, the nonce an HMAC (under a key derived from
    the data key, not the data key itself) of the user, field and value, the user and field the
    associated data: values already stored must seal alike after an upgrade."""
    keyring = MemoryKeyring()
    sealed = Sealer(keyring).seal(ALICE, field, value)
    key = keyring.key(ALICE)
    assert key is not None
    aad = f"{ALICE}:{field}".encode()
    nonce_key = hmac.new(key, b"palette synthetic nonce", hashlib.sha256).digest()
    nonce = hmac.new(nonce_key, aad + b"\0" + value.encode(), hashlib.sha256).digest()[:12]
    blob = nonce + AESGCM(key).encrypt(nonce, value.encode(), aad)
    assert sealed == f"sealed:v1:{ALICE}:" + base64.urlsafe_b64encode(blob).decode().rstrip("=")


def test_a_value_moved_to_another_field_or_user_or_altered_does_not_open():
    sealer = Sealer(MemoryKeyring())
    sealed = sealer.seal(ALICE, "rule.name", "Kitchen")
    with pytest.raises(ValueError, match="does not open"):
        sealer.open("device_key", sealed)  # the field is bound to the ciphertext
    sealer.seal(BOB, "rule.name", "x")  # Bob has a key too
    with pytest.raises(ValueError, match="does not open"):
        sealer.open("rule.name", sealed.replace(str(ALICE), str(BOB)))  # so is the user
    body = sealed.rsplit(":", 1)[1]
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[-1] ^= 1
    tampered = sealed.rsplit(":", 1)[0] + ":" + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    with pytest.raises(ValueError, match="does not open"):
        sealer.open("rule.name", tampered)
    with pytest.raises(ValueError, match="does not open"):
        sealer.open("rule.name", sealed[:len(f"{SEALED_PREFIX}{ALICE}:") + 2])  # cut short: no whole nonce


def test_after_erasure_the_value_reads_erased_and_nothing_can_be_sealed_for_the_user():
    keyring = MemoryKeyring()
    sealer = Sealer(keyring)
    sealed = sealer.seal(ALICE, "device_key", "hmac-sha256:abc")
    other = Sealer(keyring)  # another process, its cache warm
    assert other.open("device_key", sealed) == "hmac-sha256:abc"
    sealer.forget(ALICE)
    assert sealer.open("device_key", sealed) == ERASED
    with pytest.raises(KeyDestroyed):
        sealer.seal(ALICE, "device_key", "again")
    assert keyring.erased([ALICE, BOB]) == {ALICE}


@pytest.mark.parametrize("value", ["Plain old name", f"{SEALED_PREFIX}{ALICE}"])
def test_a_value_written_before_sealing_is_returned_as_it_is(value):
    """Sealed is the prefix, a user id and a colon: a name that only looks like one is plain."""
    assert sealed_owner(value) is None
    assert Sealer(MemoryKeyring()).open("rule.name", value) == value


def test_redact_replaces_only_erased_users_sealed_values_anywhere_in_the_data():
    sealer = Sealer(MemoryKeyring())
    a, b = sealer.seal(ALICE, "f", "a"), sealer.seal(BOB, "f", "b")
    data = {"x": a, "y": [b, {"z": a}], "n": 3, "s": "sealed:v1:not-a-uuid:zz"}
    shown = redact(data, {ALICE})
    assert shown == {"x": ERASED, "y": [b, {"z": ERASED}], "n": 3, "s": "sealed:v1:not-a-uuid:zz"}
    assert data["x"] == a  # a copy: the input is untouched
    untouched = {"y": [b]}
    assert redact(untouched, {ALICE}) is untouched


def _nonce(sealed: str) -> bytes:
    """The nonce a sealed value carries (its first 12 bytes: nonce | ciphertext)."""
    body = sealed.rsplit(":", 1)[1]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))[:12]


@given(st.text(max_size=50), st.lists(st.sampled_from(["rule.name", "device_key", "f", "g"]), min_size=2,
                                      max_size=2, unique=True))
def test_one_key_never_seals_two_fields_under_one_nonce(value, fields):
    """AES-GCM under one key and one nonce twice (the same text in two fields, so two associated
    data) gives away its authentication key: the synthetic nonce must depend on the field too."""
    sealer = Sealer(MemoryKeyring())
    first, second = (sealer.seal(ALICE, field, value) for field in fields)
    assert _nonce(first) != _nonce(second)


def test_the_key_cache_holds_at_most_its_bound_least_recently_used_dropped():
    sealer = Sealer(MemoryKeyring(), cached=2)
    carol = uuid.uuid4()
    sealer.seal(ALICE, "f", "a")
    sealer.seal(BOB, "f", "b")
    sealer.seal(ALICE, "f", "a again")  # Alice's key used last
    sealer.seal(carol, "f", "c")
    assert [sealer.has_key(u) for u in (ALICE, BOB, carol)] == [True, False, True]


class _PausingKeyring(MemoryKeyring):
    """Reads a key, then waits to hand it over (a PostgreSQL round trip), for a test to act in."""

    def __init__(self):
        super().__init__()
        self.read, self.go_on = threading.Event(), threading.Event()

    def key(self, user_id):
        key = super().key(user_id)
        self.read.set()
        assert self.go_on.wait(10)
        return key


@pytest.mark.parametrize("erased_by", ["this process", "another process"])
def test_a_key_read_while_its_user_is_erased_is_not_kept(erased_by):
    """A request reading Alice's rule has her key in hand when her erasure destroys it: it may
    answer with what it read, but the key stays out of the cache, so what follows sees her erased."""
    keyring = _PausingKeyring()
    sealed = Sealer(keyring).seal(ALICE, "rule.name", "Kitchen, 12 Rue des Lilas")  # sealed elsewhere
    here = Sealer(keyring)  # this process, her key not cached yet
    answers = []
    reader = threading.Thread(target=lambda: answers.append(here.open("rule.name", sealed)))
    reader.start()
    assert keyring.read.wait(10)  # the reader holds her key
    if erased_by == "this process":
        here.forget(ALICE)
    else:
        Sealer(keyring).forget(ALICE)
        here.evict(ALICE)  # as register does on meeting UserErased
    keyring.go_on.set()
    reader.join(10)
    assert answers == ["Kitchen, 12 Rue des Lilas"] and not here.has_key(ALICE)
    assert here.open("rule.name", sealed) == ERASED
    with pytest.raises(KeyDestroyed):
        here.seal(ALICE, "rule.name", "new")


class _DestroyingLate(MemoryKeyring):
    """Runs ``during`` in its destroy before the key is gone (a request's lookup at that moment)."""

    def __init__(self):
        super().__init__()
        self.during = lambda: None

    def destroy(self, user_id):
        self.during()
        super().destroy(user_id)


def test_a_key_read_between_an_erasures_first_drop_and_the_destroy_is_not_kept():
    keyring = _DestroyingLate()
    sealer = Sealer(keyring)
    keyring.during = lambda: sealer.prepare(ALICE)  # reads her live key, caches it, before the destroy
    sealer.forget(ALICE)
    assert not sealer.has_key(ALICE)
    with pytest.raises(KeyDestroyed):
        sealer.seal(ALICE, "rule.name", "x")


def test_a_key_made_on_the_event_loop_while_its_user_is_erased_is_not_kept():
    keyring = MemoryKeyring()
    sealer = Sealer(keyring)

    async def erased_meanwhile(user_id):
        key = keyring.key_for(user_id)
        await asyncio.sleep(0)  # the round trip is out: another task erases the user
        sealer.forget(user_id)
        return key

    keyring.key_for_async = erased_meanwhile
    asyncio.run(sealer.prepare_async(ALICE))
    assert not sealer.has_key(ALICE)


def test_another_users_erasure_during_a_lookup_leaves_the_lookup_cached():
    """Sealing for a user whose key was prepared needs no I/O (it runs on the event loop): an
    erasure of someone else meanwhile must not cost that."""
    keyring = _PausingKeyring()
    sealer = Sealer(keyring)
    keyring.go_on.set()
    sealer.prepare(BOB)  # cached before: her lookup below goes to the keyring's key()
    keyring.go_on.clear()
    sealed = Sealer(keyring).seal(ALICE, "rule.name", "Kitchen")
    reader = threading.Thread(target=sealer.open, args=("rule.name", sealed))
    reader.start()
    assert keyring.read.wait(10)
    sealer.forget(BOB)
    keyring.go_on.set()
    reader.join(10)
    assert sealer.has_key(ALICE) and not sealer.has_key(BOB)
