"""The relay's and replay's envelope JSON (``notification_message``) is orjson's where orjson
writes the same values, and ``json``'s elsewhere: whatever the stored state, consumers read what
``json.dumps`` of the same envelope gives them (the oracle: ``json`` itself)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.contracts.envelope import _message

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(st.characters(codec=None), max_size=8))
states = st.dictionaries(st.text(max_size=6), st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12), max_size=6)


def read(raw: bytes) -> str:
    """What a consumer reads, made comparable (NaN is not equal to itself; its text is)."""
    return json.dumps(json.loads(raw), sort_keys=True)


@settings(max_examples=250, deadline=None)
@given(states)
def test_consumers_read_what_json_would_have_written(state: dict[str, Any]) -> None:
    envelope = {"id": 1, "stream_id": "s", "type": "T", "data": state}
    stored = json.dumps(state).encode()  # the event store's plain JSON text of the state
    assert read(_message(envelope, stored)) == read(json.dumps(envelope, separators=(",", ":")).encode())


def test_a_state_the_transcoder_wrote_otherwise_goes_through_json() -> None:
    envelope = {"data": {"x": float("nan")}}
    assert _message(envelope, b"\x78\x9c compressed") == b'{"data":{"x":NaN}}'


def test_plain_states_take_orjson() -> None:
    envelope = {"data": {"name": "caf\u00e9"}}
    assert _message(envelope, b'{"name": "caf\\u00e9"}') == '{"data":{"name":"café"}}'.encode()
