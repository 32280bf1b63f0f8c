"""The cross-user matrix, generated from the OpenAPI document: every endpoint that takes an id,
tried by another user, anonymously and with bad tokens -> 0 leaks, 0 state changes."""

from __future__ import annotations

import jwt

from .conftest import Client

BODIES = {
    ("post", "/jobs/{job_id}/execute"): {"concepts": {"wall": {"action": "tone", "value": "warm"}}},
    ("put", "/rules/{rule_id}"): {"name": "stolen", "concepts": {"lamp": {"action": "remove"}}},
    ("post", "/jobs/{job_id}/callback"): {"idx": 0, "status": "done", "idempotency_key": "x"},
}
CALLBACK = "/jobs/{job_id}/callback"  # callback auth, not a user's JWT: its own suite covers it


def snapshot(owner: Client, job_id: str) -> tuple[object, ...]:
    me = owner.data("GET", "/me")
    return (owner.data("GET", f"/jobs/{job_id}"), me, owner.data("GET", "/rules"))


def test_no_endpoint_leaks_or_changes_another_users_objects(client, other, http, settings):
    job_id = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
    rule_id = client.data("POST", "/rules", 201, json={
        "name": "mine", "preset_id": "interior", "concepts": {"wall": {"action": "remove"}}})["id"]
    before = snapshot(client, job_id)
    forged = jwt.encode({"sub": client.user_id, "exp": 4102444800, "iat": 0, "iss": "palette",
                         "aud": "palette-app"}, "not-the-server-secret-" * 3, algorithm="HS256")
    none_alg = jwt.encode({"sub": client.user_id}, None, algorithm="none")
    attackers = {
        "other user": (other.headers, 404),
        "anonymous": ({}, 401),
        "forged token": ({"Authorization": f"Bearer {forged}"}, 401),
        "alg none": ({"Authorization": f"Bearer {none_alg}"}, 401),
    }
    paths = http.get("/openapi.json").json()["paths"]
    tried = 0
    for path, methods in paths.items():
        if ("{job_id}" not in path and "{rule_id}" not in path) or path == CALLBACK:
            continue
        url = path.replace("{job_id}", job_id).replace("{rule_id}", rule_id)
        for method in methods:
            for who, (headers, expected) in attackers.items():
                r = http.request(method.upper(), url, headers=headers, json=BODIES.get((method, path)))
                tried += 1
                assert r.status_code == expected, (who, method, path, r.status_code, r.text)
                assert "mine" not in r.text and client.user_id not in r.text, (who, method, path)
    assert tried == 4 * 9  # GET/DELETE/execute/confirm/cancel/events/rerun of a job, PUT/DELETE of a rule
    assert snapshot(client, job_id) == before
    from tests import figures

    figures.add("cross-user requests tried (0 leaks)", tried)
