"""The OpenAPI links a client (or schemathesis's stateful run) follows from a created object to
the operations on it: each names an operation that is there, a path parameter it has, and a field
the creating answer has."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from adapters.api.app import create_app
from adapters.settings import Settings


def _schema() -> dict[str, Any]:
    settings = Settings(jwt_secret="s" * 48, callback_secret="c" * 48, device_key_secret="d" * 48)
    container = SimpleNamespace(settings=settings, read_pool=None,
                                service=SimpleNamespace(sealer=SimpleNamespace(evict=lambda _u: None),
                                                        user_views=None))
    return create_app(container).openapi()  # type: ignore[arg-type]


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node or "anyOf" in node:  # an Optional field: the alternative that is not null
        node = (schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]] if "$ref" in node
                else next(n for n in node["anyOf"] if n.get("type") != "null"))
    return node


def _has_field(schema: dict[str, Any], body: dict[str, Any], pointer: str) -> bool:
    node = _resolve(schema, body)
    for part in pointer.strip("/").split("/"):
        node = _resolve(schema, node)
        if part not in node.get("properties", {}):
            return False
        node = node["properties"][part]
    return True


def test_each_link_leads_from_a_field_of_the_created_object_to_an_operation_on_it() -> None:
    schema = _schema()
    operations = {op["operationId"]: (path, op) for path, item in schema["paths"].items()
                  for op in item.values() if isinstance(op, dict) and "operationId" in op}
    followed: dict[str, set[tuple[str, str]]] = {}
    for creating in ("/jobs", "/rules"):
        answer = schema["paths"][creating]["post"]["responses"]["201"]
        body = answer["content"]["application/json"]["schema"]
        for link in answer["links"].values():
            path, op = operations[link["operationId"]]
            ((param, source),) = link["parameters"].items()
            assert path.startswith(f"{creating}/{{{param}}}")
            assert param in {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert source.startswith("$response.body#") and _has_field(schema, body, source.split("#", 1)[1])
            method = next(m for m, o in schema["paths"][path].items() if o is op)
            followed.setdefault(creating, set()).add((method, path))
    assert followed["/rules"] == {("put", "/rules/{rule_id}"), ("delete", "/rules/{rule_id}")}
    assert {("get", "/jobs/{job_id}"), ("post", "/jobs/{job_id}/execute"),
            ("post", "/jobs/{job_id}/cancel")} <= followed["/jobs"]
