"""The GPU task on ``palette.gpu-jobs``: one per item of a queued job, everything the worker needs
(no lookups). The dispatcher writes it with :func:`tasks_for`; the worker reads it with
:meth:`Task.parse`, which refuses any other shape (``MalformedTask``).

``mask_keys`` are where a client's masks may be (read); ``used_mask_keys`` and ``instances_key``
are where the worker writes the masks it used and their instances (never read back). A task
written before those two existed parses with them empty: its item gets no used masks."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from domain.contracts import trace
from domain.contracts.keys import (
    callback_key,
    input_key,
    instances_key,
    mask_key,
    output_key,
    preview_key,
    used_mask_key,
)


class MalformedTask(ValueError):
    """A task without the shape the dispatcher writes: parked, never retried."""


def tasks_for(user_id: uuid.UUID, job_id: uuid.UUID, item_count: int, concepts: Mapping[str, Mapping[str, str]],
              protect: Sequence[str], mask_concepts: Sequence[str]) -> list[dict[str, Any]]:
    """The tasks of a queued job, as JSON-ready objects (one per item, ``attempt`` 0)."""
    return [{
        "job_id": str(job_id), "user_id": str(user_id), "idx": idx,
        "concepts": {c: dict(e) for c, e in concepts.items()}, "protect": list(protect),
        "input_key": input_key(user_id, job_id, idx), "output_key": output_key(user_id, job_id, idx),
        "preview_key": preview_key(user_id, job_id, idx),
        "mask_keys": {c: mask_key(user_id, job_id, idx, c) for c in mask_concepts},
        "used_mask_keys": {c: used_mask_key(user_id, job_id, idx, c) for c in [*concepts, *protect]},
        "instances_key": instances_key(user_id, job_id, idx),
        "idempotency_key": callback_key(job_id, idx), "attempt": 0,
    } for idx in range(item_count)]


def _json(value: bytes) -> Any:
    """``json.loads``, whose RecursionError (arrays or objects nested past the interpreter's
    recursion limit: 100 KB of "[") is no ValueError, is a MalformedTask too."""
    try:
        return json.loads(value)
    except RecursionError:
        raise MalformedTask("JSON nested too deep") from None


def _string(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise MalformedTask(f"{name} must be a string")
    return value


def _strings(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MalformedTask(f"{name} must be a list of strings")
    return value


def _string_map(value: Any, name: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise MalformedTask(f"{name} must map strings to strings")
    return value


def _index(value: Any, name: str) -> int:
    if type(value) is not int or value < 0:  # bool is an int subclass: refused too
        raise MalformedTask(f"{name} must be a non-negative integer")
    return value


def _job_id(value: Any) -> str:
    """The job id as the dispatcher writes it: a canonical UUID (it goes into the callback's path)."""
    if not isinstance(value, str):
        raise MalformedTask("job_id must be a string")
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        raise MalformedTask("job_id must be a UUID") from None
    if canonical != value:
        raise MalformedTask("job_id must be a UUID in canonical form")
    return value


@dataclass
class Task:
    job_id: str
    user_id: str
    idx: int
    concepts: dict[str, dict[str, str]]
    protect: list[str]
    input_key: str
    output_key: str
    preview_key: str
    mask_keys: dict[str, str]
    idempotency_key: str
    attempt: int = 0
    traceparent: str = ""  # the trace of the request that queued the job (dropped when malformed)
    used_mask_keys: dict[str, str] = field(default_factory=dict)  # where the masks used go, by concept
    instances_key: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def parse(cls, value: bytes) -> Task:
        """A task as the dispatcher writes it; anything else raises ``MalformedTask`` (or the
        ``ValueError`` of undecodable JSON)."""
        data = _json(value)
        if not isinstance(data, dict):
            raise MalformedTask("a task is a JSON object")
        concepts = data.get("concepts")
        if not isinstance(concepts, dict) or not all(
                isinstance(c, str) and isinstance(e, dict) for c, e in concepts.items()):
            raise MalformedTask("concepts must map concept names to edits")
        for concept, edit in concepts.items():
            _string_map(edit, f"the edit of {concept!r}")
        return cls(
            job_id=_job_id(data.get("job_id")), user_id=_string(data, "user_id"), idx=_index(data.get("idx"), "idx"),
            concepts=concepts, protect=_strings(data.get("protect"), "protect"),
            input_key=_string(data, "input_key"), output_key=_string(data, "output_key"),
            preview_key=_string(data, "preview_key"), mask_keys=_string_map(data.get("mask_keys"), "mask_keys"),
            idempotency_key=_string(data, "idempotency_key"),
            attempt=_index(data.get("attempt", 0), "attempt"), traceparent=trace.valid(data.get(trace.HEADER)),
            used_mask_keys=_string_map(data.get("used_mask_keys", {}), "used_mask_keys"),
            instances_key=_string(data, "instances_key") if "instances_key" in data else "",
            raw=data)

    @classmethod
    def identify(cls, value: bytes | None) -> tuple[Task | None, dict[str, Any] | None]:
        """What a malformed task still says: its JSON object, and a task to report its item
        ``failed`` by when it names a job and an index (reported under the canonical key)."""
        try:
            data = _json(value) if value is not None else None
        except (ValueError, TypeError):  # MalformedTask is a ValueError
            return None, None
        if not isinstance(data, dict):
            return None, None
        try:
            job_id, idx = _job_id(data.get("job_id")), _index(data.get("idx"), "idx")
        except MalformedTask:
            return None, data
        return cls(job_id=job_id, user_id="", idx=idx, concepts={}, protect=[], input_key="", output_key="",
                   preview_key="", mask_keys={}, idempotency_key=callback_key(uuid.UUID(job_id), idx),
                   raw=data), data
