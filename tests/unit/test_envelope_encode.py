"""The relay's and replay's envelope JSON (``stored_message``) is orjson's where orjson
read the stored state, and ``json``'s elsewhere: whatever the stored bytes, consumers read what
``json.dumps`` of the same envelope gave them (the oracle: ``json`` reading and writing, as the
code did before orjson)."""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.contracts.envelope import EnvelopeInvalid, EventEnvelope, decode, encode
from domain.contracts.trace import TRACE_KEY
from projections.stored_events import stored_message

TOPIC = "domain.job:Job.ItemCompleted"
STREAM = UUID("6f1c2b7e-1a2b-4c3d-8e9f-001122334455")
STAMP = '"timestamp":"2026-12-02T00:00:00+00:00"'


def plain(obj: dict[str, Any]) -> Any:
    """eventsourcing's typed values ({"_type_", "_data_"}) as plain JSON, written out here: the
    code's own hook on both sides could never disagree with itself."""
    if obj.get("_type_") is None or "_data_" not in obj:
        return obj
    return str(UUID(hex=obj["_data_"])) if obj["_type_"] == "uuid_hex" else obj["_data_"]


def before(raw: bytes) -> bytes:
    """The envelope as ``json`` alone made it."""
    state = json.loads(raw, object_hook=plain)
    moment = state.pop("timestamp")
    return json.dumps({"id": 7, "stream_id": str(STREAM), "stream_type": "Job", "version": 2,
                       "type": "ItemCompleted", "timestamp": moment, "data": state}, separators=(",", ":")).encode()


def read(raw: bytes) -> str:
    """What a consumer reads, made comparable (NaN is not equal to itself; its text is)."""
    return json.dumps(json.loads(raw), sort_keys=True)


def check(raw: bytes) -> None:
    message, _ = stored_message(7, str(STREAM), 2, TOPIC, raw, transcoder=None)
    assert read(message) == read(before(raw))


# The stored state's own keys, never an event's data: its moment, the request's trace (the
# envelope's "trace") and the stream's topic.
RESERVED = ("timestamp", TRACE_KEY, "originator_topic")
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(st.characters(codec=None), max_size=8)
           | st.uuids().map(lambda u: {"_type_": "uuid_hex", "_data_": u.hex}))  # as the transcoder stores one
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


@settings(max_examples=250, deadline=None)
@given(st.dictionaries(st.text(max_size=6).filter(lambda k: k not in RESERVED), values, max_size=6))
def test_consumers_read_what_json_would_have_written(state: dict[str, Any]) -> None:
    check(json.dumps({**state, "timestamp": "2026-12-02T00:00:00+00:00"}).encode())


def test_spellings_json_reads_as_infinities_or_big_numbers_keep_their_values() -> None:
    """Stored text need not be the transcoder's: an out-of-range exponent is an infinity to
    ``json`` (which orjson would write as null), an integer past 64 bits is exact."""
    for data in ('"x":1e999,"y":-1e400', '"n":NaN', '"n":18446744073709551616', '"s":"\\ud800"',
                 '"t":{"_type_":"uuid_hex","_data_":"6f1c2b7e1a2b4c3d8e9f001122334455"}', '"u":"caf\\u00e9"'):
        check(("{" + data + "," + STAMP + "}").encode())


def test_a_plain_state_takes_orjson() -> None:
    message, _ = stored_message(7, str(STREAM), 2, TOPIC, ("{" + '"u":"caf\\u00e9",' + STAMP + "}").encode(),
                                transcoder=None)
    assert '"u":"café"'.encode() in message  # orjson writes UTF-8; json would have escaped it


# -- what consumers accept ------------------------------------------------------------------------
GOOD = {"id": 7, "stream_id": "00000000-0000-0000-0000-000000000001", "stream_type": "Job", "version": 2,
        "type": "JobQueued", "timestamp": "2026-01-01T00:00:00+00:00", "data": {"protect": []}}


@given(st.integers(1, 2**62), st.uuids(), st.sampled_from(["User", "Job", "Rule"]), st.integers(1, 10**6),
       st.datetimes(timezones=st.just(UTC)), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
def test_an_envelope_reads_back_as_it_was_written(position, stream_id, stream_type, version, at, data) -> None:
    envelope = EventEnvelope(position, stream_id, stream_type, version, "Something", at, data)
    assert decode(encode(envelope)) == envelope


@pytest.mark.parametrize("change", [
    {"timestamp": "2026-01-01T00:00:00"},  # no offset: no consumer can order it against the others
    {"id": True}, {"id": 7.0}, {"id": "7"}, {"version": "2"}, {"version": True},  # bool is no int here
    {"stream_id": "not-a-uuid"}, {"stream_id": 1}, {"data": []}, {"type": None}, {"stream_type": 3},
    # past what the store keeps: no read model could track nor park it (its consumer would stop there)
    {"version": 2**31}, {"version": 0}, {"id": 2**63}, {"id": 0},
])
def test_a_field_of_the_wrong_kind_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(EnvelopeInvalid):
        decode(json.dumps({**GOOD, **change}).encode())


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b"null", json.dumps({**GOOD, "id": None}).encode(),
                                 json.dumps({k: v for k, v in GOOD.items() if k != "version"}).encode(),
                                 b"[" * 100_000])  # nested past the decoder: a poison message, not a crash
def test_what_is_not_an_envelope_is_refused(raw: bytes) -> None:
    with pytest.raises(EnvelopeInvalid):
        decode(raw)

