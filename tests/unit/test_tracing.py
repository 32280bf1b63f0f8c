"""Trace context: the traceparent contract, spans that continue it, and the envelope carrying it."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime

from hypothesis import example, given
from hypothesis import strategies as st

from adapters import tracing
from adapters.logs import CONTEXT
from domain.contracts import trace as contract
from domain.contracts.envelope import EventEnvelope, decode, encode
from domain.contracts.gpu_task import Task

GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_span_continues_the_parent_trace_and_its_logs_carry_the_id():
    tracing.configure("test", "off")
    with tracing.span("outer") as outer:
        assert contract.valid(outer) and CONTEXT["trace_id"].get() == contract.trace_id(outer)
    assert CONTEXT["trace_id"].get() is None
    with tracing.span("callback", parent=GOOD) as child:
        assert contract.trace_id(child) == GOOD[3:35] and child != GOOD  # same trace, a new span
    with tracing.span("fresh", parent="00-junk") as fresh:
        assert contract.valid(fresh) and contract.trace_id(fresh) != GOOD[3:35]


def _is_traceparent(value: str) -> bool:
    """W3C's version-00 traceparent read field by field (no regular expression): lowercase hex
    of 32, 16 and 2 digits after "00", neither id all zeros."""
    parts = value.split("-")
    return ([len(p) for p in parts] == [2, 32, 16, 2] and parts[0] == "00"
            and all(c in "0123456789abcdef" for c in "".join(parts))
            and int(parts[1], 16) != 0 and int(parts[2], 16) != 0)


def _hex(n: int) -> st.SearchStrategy[str]:
    """``n`` hex digits, mostly right: the zero id, a wrong length, an uppercase digit or a dash."""
    return (st.text("0123456789abcdef", min_size=n, max_size=n) | st.just("0" * n)
            | st.text("0123456789abcdefA-", min_size=n - 1, max_size=n + 1))


SHAPED = st.tuples(st.sampled_from(["00", "01", "0", "0A"]), _hex(32), _hex(16), _hex(2)).map("-".join)


@given(SHAPED | st.text(max_size=80))
@example(GOOD).via("a traceparent")
@example(f"{GOOD[:36]}{'0' * 16}{GOOD[52:]}").via("the zero span id")
@example(f"00-{'0' * 32}{GOOD[35:]}").via("the zero trace id")
def test_anything_but_a_traceparent_is_dropped(value):
    assert contract.valid(value) == (value if _is_traceparent(value) else "")
    assert contract.trace_id(value) == (value[3:35] if _is_traceparent(value) else "")


def test_malformed_traceparents_are_dropped():
    for bad in ("01-" + GOOD[3:], GOOD.upper(), "00-" + "0" * 32 + GOOD[35:], GOOD[:-1], GOOD + " ", None, 7):
        assert contract.valid(bad) == ""


def test_the_envelope_and_the_task_carry_the_trace_and_drop_a_bad_one():
    env = EventEnvelope(id=3, stream_id=uuid.uuid4(), stream_type="Job", version=2, type="JobQueued",
                        timestamp=datetime.now(UTC), data={"concepts": {}}, trace=GOOD)
    assert decode(encode(env)) == env
    raw = encode(env).replace(GOOD.encode(), b"00-nope")
    assert decode(raw).trace == "" and decode(raw).data == env.data
    assert b"trace" not in encode(dataclasses.replace(env, trace=""))  # no trace: the envelope as before
    task = b'{"job_id": "%s", "user_id": "u", "idx": 0, "concepts": {}, "protect": [], "input_key": "i",' \
           b' "output_key": "o", "preview_key": "p", "mask_keys": {}, "idempotency_key": "k", "traceparent": "%s"}'
    job = str(uuid.uuid4()).encode()
    assert Task.parse(task % (job, GOOD.encode())).traceparent == GOOD
    assert Task.parse(task % (job, b"<script>")).traceparent == ""


@given(st.from_regex(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", fullmatch=True) | st.text(max_size=60))
def test_a_span_that_goes_nowhere_still_continues_a_valid_parent(parent):
    """The ids made when no exporter records spans: a valid traceparent always; the parent's
    trace and flags when the parent is valid, a new sampled trace otherwise; a new span id."""
    made = tracing.ids_only(parent)
    assert contract.valid(made) == made
    if contract.valid(parent):
        assert made[:36] == parent[:36] and made[53:] == parent[53:] and made != parent
    else:
        assert made.endswith("-01")


def test_spans_that_go_nowhere_are_unique_and_unsampled_parents_stay_unsampled():
    made = {tracing.ids_only() for _ in range(1000)}
    assert len({m[3:35] for m in made}) == 1000 and len({m[36:52] for m in made}) == 1000
    unsampled = GOOD[:-2] + "00"
    assert tracing.ids_only(unsampled).endswith("-00")
