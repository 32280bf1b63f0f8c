"""A rule write's answer is what that write did, even when another device's write to the rule lands
through another API process between its commit and its answer: the answer is built from the rule
as the command left it, not read again afterwards (a DELETE landing there made a saved edit, or a
saved creation, a 404, and another PUT made its answer the other's edit, with the other's ETag)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import anyio.to_thread
import httpx
import pytest

from adapters.api.app import create_app
from adapters.api.idempotency import id_for_key
from adapters.bootstrap import build
from adapters.settings import Settings
from tests.served import served_api

from .conftest import Client

EDITS = {"wall": {"action": "tone", "value": "warm"}}
THEIRS = {"name": "the other device's", "concepts": {"wall": {"action": "tone", "value": "cool"}}}


def answered_with_another_write_landing(settings: Settings, api_url: str, headers: dict[str, str],
                                        mine: Callable[[httpx.Client], httpx.Response],
                                        theirs: Callable[[httpx.Client], httpx.Response],
                                        rule_id: uuid.UUID) -> tuple[httpx.Response, httpx.Response, list[str]]:
    """``mine`` sent to an API served in this process, beside the stack's own, with ``theirs`` sent
    through the stack's API process (another group committer) right after ``mine``'s command has
    committed and before its answer is built: both answers, and the rule's events after."""
    container = build(settings, pool_size=2)
    service = container.service
    plain_run: Callable[..., Any] = service.run
    others: list[httpx.Response] = []

    def other_device() -> None:
        with httpx.Client(base_url=api_url, timeout=30, headers=headers) as own:
            others.append(theirs(own))

    async def run_then_the_other_write(command: Any) -> Any:
        committed = await plain_run(command)
        if not others:
            await anyio.to_thread.run_sync(other_device)
        return committed

    service.run = run_then_the_other_write  # type: ignore[method-assign]
    try:
        with served_api(create_app(container)) as port, httpx.Client(
                base_url=f"http://127.0.0.1:{port}", timeout=30, headers=headers) as own:
            answer = mine(own)
        logged = [type(e).__name__ for e in service.app.events.get(rule_id)]
    finally:
        container.close()
    (other,) = others
    return answer, other, logged


@pytest.mark.parametrize("other_write", ["DELETE", "PUT"])
def test_a_rule_edit_answers_what_it_did_when_another_write_lands_before_its_answer(
        http: httpx.Client, api_url: str, settings: Settings, other_write: str) -> None:
    client = Client(http)
    rule_id = client.data("POST", "/rules", 201, json={"name": "mine", "preset_id": "interior",
                                                       "concepts": EDITS})["id"]
    edit, other, logged = answered_with_another_write_landing(
        settings, api_url, client.headers,
        lambda own: own.put(f"/rules/{rule_id}", json={"name": "my edit", "concepts": EDITS},
                            headers={"If-Match": '"1"'}),
        lambda own: own.request(other_write, f"/rules/{rule_id}", json=THEIRS if other_write == "PUT" else None),
        uuid.UUID(rule_id))
    assert other.status_code == 200, other.text
    # Serially: the edit first (it committed first), then the other write.
    assert edit.status_code == 200, edit.text
    rule = edit.json()["data"]
    assert (rule["name"], rule["version"], edit.headers["etag"]) == ("my edit", 2, '"2"')
    later = "RuleDeleted" if other_write == "DELETE" else "RuleUpdated"
    assert logged == ["RuleCreated", "RuleUpdated", later]


def test_a_rule_creation_answers_what_it_made_when_another_device_deletes_it_before_its_answer(
        http: httpx.Client, api_url: str, settings: Settings) -> None:
    client = Client(http)
    rule_id = id_for_key(uuid.UUID(client.user_id), "rule", "create-once")  # what the other device deletes
    assert rule_id is not None
    made, other, logged = answered_with_another_write_landing(
        settings, api_url, client.headers,
        lambda own: own.post("/rules", json={"name": "mine", "preset_id": "interior", "concepts": EDITS},
                             headers={"Idempotency-Key": "create-once"}),
        lambda own: own.delete(f"/rules/{rule_id}"),
        rule_id)
    assert other.status_code == 200, other.text
    # Serially: the creation first (it committed first), then the deletion.
    assert made.status_code == 201, made.text
    rule = made.json()["data"]
    assert (rule["id"], rule["name"], rule["version"], made.headers["etag"]) == (str(rule_id), "mine", 1, '"1"')
    assert rule["concepts"] == EDITS
    assert logged == ["RuleCreated", "RuleDeleted"]
