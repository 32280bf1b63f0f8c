"""The trace context that follows a command's effects across processes: a W3C ``traceparent``
(``00-<trace id>-<span id>-<flags>``), stored with the events a request caused (under
``TRACE_KEY`` in their state), carried by the relay in the envelope and a Kafka header, by the
dispatcher in each GPU task, and by the worker on its callback.

Anything else a client or a message holds is dropped, never an error: a trace is a diagnostic.
"""

from __future__ import annotations

import re

TRACE_KEY = "_trace"  # in a stored event's state; never part of the event's data downstream
HEADER = "traceparent"
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZEROS = "0" * 32


def valid(value: object) -> str:
    """``value`` when it is a well-formed version-00 traceparent with a non-zero trace id, else ""."""
    if not isinstance(value, str) or len(value) != 55:
        return ""
    match = _TRACEPARENT.fullmatch(value)
    if match is None or match.group(1) == _ZEROS or match.group(2) == "0" * 16:
        return ""
    return value


def trace_id(traceparent: str) -> str:
    """The 32-hex trace id of a valid traceparent ("" for anything else)."""
    return valid(traceparent)[3:35]
