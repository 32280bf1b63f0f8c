"""Optimistic concurrency for rule clients, through the running API: each rule's answer carries
its version (``version``, and ``ETag: "<version>"`` on POST and PUT), and PUT and DELETE
/rules/{id} with ``If-Match`` apply only while the rule is at that version, else a 412
``PRECONDITION_FAILED`` that changes nothing. Before, of two devices editing one rule the last
silently won."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from adapters.settings import Settings

from .conftest import Client

EDITS = {"wall": {"action": "tone", "value": "warm"}}


def _rule(name: str) -> dict[str, Any]:
    return {"name": name, "preset_id": "interior", "concepts": EDITS}


def _edit(name: str, value: str = "warm") -> dict[str, Any]:
    return {"name": name, "concepts": {"wall": {"action": "tone", "value": value}}}


def _listed(client: Client, rule_id: str) -> dict[str, Any]:
    (row,) = [r for r in client.data("GET", "/rules")["items"] if r["id"] == rule_id]
    return dict(row)


def _refused(r: httpx.Response) -> None:
    assert r.status_code == 412 and r.json()["error"]["code"] == "PRECONDITION_FAILED", r.text
    assert r.json()["success"] is False


def test_a_rule_carries_its_version_and_a_stale_if_match_changes_nothing(client: Client) -> None:
    created = client.call("POST", "/rules", json=_rule("kitchen"))
    assert created.status_code == 201, created.text
    rule = created.json()["data"]
    assert rule["version"] == 1 and created.headers["etag"] == '"1"'  # before: no version, no ETag
    assert _listed(client, rule["id"])["version"] == 1  # the read model's too
    path = f"/rules/{rule['id']}"

    plain = client.call("PUT", path, json=_edit("no precondition"))  # as before: applies
    assert plain.status_code == 200 and plain.headers["etag"] == '"2"' and plain.json()["data"]["version"] == 2

    matched = client.call("PUT", path, json=_edit("matched"), headers={"If-Match": '"2"'})
    assert matched.status_code == 200 and matched.headers["etag"] == '"3"', matched.text

    stale = client.call("PUT", path, json=_edit("stale", "cool"), headers={"If-Match": '"2"'})
    _refused(stale)  # before: 200, and "matched" lost
    row = _listed(client, rule["id"])
    assert (row["name"], row["concepts"], row["version"]) == ("matched", EDITS, 3)

    listed = client.call("PUT", path, json=_edit("one of a list"), headers={"If-Match": 'W/"3", "1", "3"'})
    assert listed.status_code == 200 and listed.headers["etag"] == '"4"', listed.text
    anything = client.call("PUT", path, json=_edit("any version"), headers={"If-Match": "*"})
    assert anything.status_code == 200 and anything.headers["etag"] == '"5"', anything.text
    assert client.call("PUT", f"/rules/{uuid.uuid4()}", json=_edit("x"), headers={"If-Match": "*"}).status_code == 404

    # The contract lists the answer.
    paths = client.http.get("/openapi.json").json()["paths"]
    for method in ("put", "delete"):
        assert "412" in paths["/rules/{rule_id}"][method]["responses"], method


def _put_together(devices: dict[str, httpx.Client], rule_id: str, version: int,
                  round_: int) -> dict[str, httpx.Response]:
    """Each device's PUT with If-Match: version, sent at once (a barrier), each its own edit."""
    start = threading.Barrier(len(devices))
    values = dict(zip(devices, ("cool", "warm"), strict=True))

    def put(name: str) -> httpx.Response:
        start.wait()
        return devices[name].put(f"/rules/{rule_id}", json=_edit(f"{name} {round_}", values[name]),
                                 headers={"If-Match": f'"{version}"'})

    with ThreadPoolExecutor(len(devices)) as pool:
        return dict(zip(devices, pool.map(put, devices), strict=True))


def test_two_devices_editing_one_rule_from_one_version_one_wins_and_the_other_is_refused(http: httpx.Client) -> None:
    phone = Client(http)
    devices = {name: httpx.Client(base_url=str(http.base_url), headers=phone.headers, timeout=30)
               for name in ("phone", "laptop")}  # two connections, one user
    try:
        rule_id = phone.data("POST", "/rules", 201, json=_rule("shared"))["id"]
        for round_ in range(4):
            version = _listed(phone, rule_id)["version"]
            answers = _put_together(devices, rule_id, version, round_)
            statuses = sorted(a.status_code for a in answers.values())
            assert statuses == [200, 412], {k: a.text for k, a in answers.items()}  # before: [200, 200]
            (winner,) = [k for k, a in answers.items() if a.status_code == 200]
            (loser,) = [a for a in answers.values() if a.status_code == 412]
            _refused(loser)
            row = _listed(phone, rule_id)
            assert row["name"] == f"{winner} {round_}" and row["version"] == version + 1, row
            assert answers[winner].headers["etag"] == f'"{version + 1}"'
    finally:
        for device in devices.values():
            device.close()


def test_a_delete_with_a_stale_if_match_is_refused(client: Client) -> None:
    rule_id = client.data("POST", "/rules", 201, json=_rule("to delete"))["id"]
    client.data("PUT", f"/rules/{rule_id}", json=_edit("edited elsewhere"))  # version 2
    _refused(client.call("DELETE", f"/rules/{rule_id}", headers={"If-Match": '"1"'}))  # before: deleted
    assert _listed(client, rule_id)["name"] == "edited elsewhere"
    assert client.data("GET", "/me")["rule_slots"]["used"] == 1
    assert client.data("DELETE", f"/rules/{rule_id}", headers={"If-Match": '"2"'}) == {"deleted": True}
    assert client.call("DELETE", f"/rules/{rule_id}", headers={"If-Match": '"2"'}).status_code == 404
    assert client.data("GET", "/me")["rule_slots"]["used"] == 0


def test_an_edit_retried_after_its_answer_was_lost_is_answered_as_done(client: Client) -> None:
    """The retry's If-Match names the version the first try moved the rule from: the rule is
    already what it asks, so it is a 200 (RFC 9110 13.1.1), with the rule as it is; a retry that
    asks for something else is refused."""
    rule_id = client.data("POST", "/rules", 201, json=_rule("retried"))["id"]
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}", "If-Match": '"1"'}
    first = client.call("PUT", f"/rules/{rule_id}", json=_edit("renamed"), headers=key)
    again = client.call("PUT", f"/rules/{rule_id}", json=_edit("renamed"), headers=key)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.json()["data"] == first.json()["data"] and again.headers["etag"] == first.headers["etag"] == '"2"'
    _refused(client.call("PUT", f"/rules/{rule_id}", json=_edit("renamed", "cool"), headers=key))


def test_hostile_if_match_values_are_a_412_or_a_422_and_change_nothing(client: Client) -> None:
    rule_id = client.data("POST", "/rules", 201, json=_rule("hostile"))["id"]
    path = f"/rules/{rule_id}"
    no_match = [b'W/"1"', b'"01"', b'"0"', b'"-1"', b'"1.0"', b'""', b'"abc"', b'"' + b"9" * 5000 + b'"',
                b'"18446744073709551617"', b'"\xff"', b'"1,2"', b'W/"1", "2"']
    malformed = [b"1", b"*, \"1\"", b'"1', b'"1" "1"', b",", b"", b"W/1", b"**", b'"1";', b"1" * 5000]
    # A 412 is a rule write refused, and spends of the user's rule writes as other refusals do
    # (20 at once): DELETE meets a few of the values (a 422 comes before any spending).
    for value in no_match + malformed:
        for method in ("PUT", "DELETE") if value in malformed or value in no_match[:3] else ("PUT",):
            kw: dict[str, Any] = {"json": _edit("hijacked", "cool")} if method == "PUT" else {}
            r = client.call(method, path, headers={"If-Match": value}, **kw)
            want = (412, "PRECONDITION_FAILED") if value in no_match else (422, "VALIDATION_FAILED")
            assert (r.status_code, r.json()["error"]["code"]) == want, (method, value[:40], r.text)
    # Two lines are one list, whichever names the version.
    two = client.http.put(path, json=_edit("two lines"),
                          headers=[*client.headers.items(), ("If-Match", '"7"'), ("If-Match", '"1"')])
    assert two.status_code == 200 and two.headers["etag"] == '"2"', two.text
    row = _listed(client, rule_id)
    assert (row["name"], row["concepts"], row["version"]) == ("two lines", EDITS, 2)


def test_a_precondition_decided_on_a_stale_copy_is_decided_again_after_the_conflict(
        client: Client, settings: Settings) -> None:
    """Another process decides the write on the rule at the If-Match's version while the API
    writes a newer one: its save meets that event as a conflict, and the retry, on the rule loaded
    again, must refuse the write (not apply what was decided on the stale copy)."""
    from adapters.bootstrap import build
    from application.executors import GroupCommitter
    from application.unit_of_work import UnitOfWork
    from domain.errors import PreconditionFailed
    from domain.rule import Rule

    rule_id = client.data("POST", "/rules", 201, json=_rule("two processes"))["id"]
    other = build(settings, pool_size=2)
    try:
        user, rule = uuid.UUID(client.user_id), uuid.UUID(rule_id)
        other.service.sealer.prepare(user)
        decided = other.service.update_rule_command(user, rule, "the other process", _edit("x", "cool")["concepts"],
                                                    expected_versions=frozenset({1}))
        tries: list[int] = []

        def racing(uow: UnitOfWork) -> None:
            loaded = uow.get(Rule, rule)
            tries.append(loaded.version if loaded is not None else 0)
            if len(tries) == 1:  # the API writes version 2 while this decides on version 1
                client.data("PUT", f"/rules/{rule_id}", json=_edit("this process"))
            decided(uow)

        racing.aggregate_ids = decided.aggregate_ids  # type: ignore[attr-defined]
        racing.related_ids = decided.related_ids  # type: ignore[attr-defined]
        committer = other.service.executor
        assert isinstance(committer, GroupCommitter)
        with pytest.raises(PreconditionFailed):
            committer.execute(racing)
        assert tries == [1, 2]  # decided on version 1, saved into a conflict, decided again
    finally:
        other.close()
    row = _listed(client, rule_id)
    assert (row["name"], row["version"]) == ("this process", 2)
