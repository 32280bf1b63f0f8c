"""A catch-up decodes stored events with orjson; every stored state must read exactly as the
standard library's ``json`` with eventsourcing's typed values made plain reads it (the oracle
below), integers past 64 bits, floats, typed values at any depth and odd strings included."""

from __future__ import annotations

import json
import math
from typing import Any
from uuid import UUID, uuid4

from hypothesis import given
from hypothesis import strategies as st

from projections.stored_events import UNREADABLE, from_notification
from tests.unit.test_read_side_faults import Stored

TOPIC = "tests.catchup:Thing.Happened"  # no event class: nothing to upcast
STAMP = "2026-12-01T10:00:00.000001+00:00"


class NoTranscoder:
    def decode(self, data: bytes) -> dict[str, Any]:
        raise AssertionError("plain JSON never reaches the transcoder")


def oracle_hook(obj: dict[str, Any]) -> Any:
    """eventsourcing's ``{"_type_", "_data_"}`` values as plain JSON, written out independently."""
    if "_type_" not in obj or "_data_" not in obj:
        return obj
    if obj["_type_"] == "uuid_hex":
        return str(UUID(hex=obj["_data_"]))
    return obj["_data_"]


scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=20),
    st.integers(), st.integers(min_value=2**63 - 5, max_value=2**80), st.integers(max_value=-(2**63) + 5),
    st.floats(allow_nan=False, allow_infinity=False),
)
typed = st.one_of(
    st.builds(lambda: {"_type_": "uuid_hex", "_data_": uuid4().hex}),
    st.builds(lambda s: {"_type_": "datetime_iso", "_data_": s}, st.text(max_size=10)),
    st.builds(lambda s: {"_type_": "decimal_str", "_data_": s}, st.text(max_size=10)),
)
values = st.recursive(scalars | typed, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4),
    # Typed values holding more than one text, or beside other fields: made plain inside out.
    st.builds(lambda kind, data: {"_type_": kind, "_data_": data}, st.sampled_from(["set", 7]), inner),
    st.builds(lambda kind, data, extra: {"_type_": kind, "_data_": data, "also": extra},
              st.sampled_from(["datetime_iso", 7]), st.text(max_size=4), inner),
    st.builds(lambda data: {"_data_": data}, inner)), max_leaves=20)
payloads = st.dictionaries(st.text(alphabet="abcdefghij", min_size=1, max_size=6).map(lambda k: "k" + k), values,
                           max_size=6)


def stored(state: dict[str, Any]) -> Stored:
    return Stored(42, uuid4(), 3, TOPIC, json.dumps(state).encode())


@given(payloads)
def test_a_stored_state_reads_as_the_standard_json_reads_it(payload: dict[str, Any]) -> None:
    raw = json.dumps({"timestamp": {"_type_": "datetime_iso", "_data_": STAMP}, **payload}).encode()
    expected = json.loads(raw, object_hook=oracle_hook)
    del expected["timestamp"]
    env = from_notification(Stored(42, uuid4(), 3, TOPIC, raw), NoTranscoder())
    assert repr(env.data) == repr(expected)  # repr: 1 and 1.0, or -0.0 and 0.0, differ
    assert env.timestamp.isoformat() == STAMP


def test_an_integer_past_64_bits_stays_an_exact_integer() -> None:
    big = 2**64 + 1  # a float could not hold it
    env = from_notification(stored({"timestamp": STAMP, "amount": big, "deep": [{"n": -big}]}), NoTranscoder())
    assert env.data == {"amount": big, "deep": [{"n": -big}]}
    assert type(env.data["amount"]) is int


def test_nan_and_lone_surrogates_read_as_json_reads_them() -> None:
    raw = b'{"timestamp": "' + STAMP.encode() + b'", "x": NaN, "s": "\\ud800"}'
    env = from_notification(Stored(7, uuid4(), 1, TOPIC, raw), NoTranscoder())
    assert math.isnan(env.data["x"]) and env.data["s"] == "\ud800"


def test_a_state_that_is_not_json_is_unreadable_not_a_crash() -> None:
    env = from_notification(Stored(7, uuid4(), 1, TOPIC, b'{"timestamp": '), NoTranscoder())
    assert UNREADABLE in env.data and env.data[UNREADABLE].startswith("JSONDecodeError")
