"""schemathesis over /openapi.json with a valid client token: no 5xx, no response off the schema.

Operations are driven through their hypothesis strategies directly (the pytest plugin of
schemathesis does not load under pytest 9)."""

from __future__ import annotations

import uuid

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CASES_PER_OPERATION = 150
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
STREAMS = {"/jobs/{job_id}/events"}  # covered by the SSE end-to-end test


def test_api_conforms_to_its_schema_and_never_fails_with_5xx(api_url):
    token = httpx.post(f"{api_url}/auth/anon", json={"device_hash": f"fuzz-{uuid.uuid4().hex}"}).json()
    headers = {"Authorization": f"Bearer {token['data']['token']}"}
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    executed: dict[str, int] = {}
    def run(operation):  # type: ignore[no-untyped-def]
        label = f"{operation.method.upper()} {operation.path}"

        @given(case=operation.as_strategy())
        @settings(max_examples=CASES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def exercise(case):  # type: ignore[no-untyped-def]
            executed[label] = executed.get(label, 0) + 1
            case.call_and_validate(base_url=api_url, headers=headers, timeout=30, checks=CHECKS)

        exercise()

    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path not in STREAMS:
            run(operation)
    assert len(executed) >= 14, executed
    assert sum(executed.values()) >= 2000, executed
    from tests import figures

    figures.add("schemathesis cases (0 5xx)", sum(executed.values()))


def test_linked_sequences_never_fail_with_5xx(api_url):
    """Stateful: schemathesis follows the OpenAPI links (create a job, then confirm, execute,
    read or cancel that very job; create a rule, then update or delete it)."""
    from tests import figures

    token = httpx.post(f"{api_url}/auth/anon", json={"device_hash": f"fuzz-{uuid.uuid4().hex}"}).json()
    headers = {"Authorization": f"Bearer {token['data']['token']}"}
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    calls: dict[str, int] = {}
    linked: list[int] = []

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case):  # type: ignore[no-untyped-def]
            return {"base_url": api_url, "headers": headers, "timeout": 30}

        def validate_response(self, response, case, additional_checks=None, **kwargs):  # type: ignore[no-untyped-def]
            label = f"{case.method.upper()} {case.path}"
            calls[label] = calls.get(label, 0) + 1
            if "{" in case.path and response.status_code < 400:
                linked.append(1)  # an operation on an object an earlier step created
            case.validate_response(response, checks=CHECKS)

    Workflow.run(settings=settings(max_examples=150, stateful_step_count=6, deadline=None, database=None,
                                   suppress_health_check=list(HealthCheck)))
    figures.add("schemathesis stateful calls (0 5xx)", sum(calls.values()))
    assert sum(calls.values()) >= 300, calls
    assert len(linked) >= 20, calls  # the links were followed to live objects, not random ids
