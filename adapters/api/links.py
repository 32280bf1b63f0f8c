"""OpenAPI links: how a created object's id feeds the operations on it (clients and stateful
fuzzers follow them: create a job, then confirm, execute, read and cancel that job)."""

from __future__ import annotations

from typing import Any

# (path, method, status) of the creating operation -> (parameter, where the id is, targets)
LINKS: dict[tuple[str, str, str], tuple[str, str, list[tuple[str, str]]]] = {
    ("/jobs", "post", "201"): ("job_id", "$response.body#/data/job_id", [
        ("/jobs/{job_id}", "get"), ("/jobs/{job_id}/confirm-upload", "post"),
        ("/jobs/{job_id}/execute", "post"), ("/jobs/{job_id}/cancel", "post"),
        ("/jobs/{job_id}/rerun", "post"),
    ]),
    ("/rules", "post", "201"): ("rule_id", "$response.body#/data/id", [
        ("/rules/{rule_id}", "put"), ("/rules/{rule_id}", "delete"),
    ]),
}


def add_links(schema: dict[str, Any]) -> dict[str, Any]:
    paths = schema.get("paths", {})
    for (path, method, status), (param, source, targets) in LINKS.items():
        response = paths[path][method]["responses"][status]
        links = response.setdefault("links", {})
        for target, target_method in targets:
            operation_id = paths[target][target_method]["operationId"]
            links[f"{target_method}{target}".replace("/", "_").replace("{", "").replace("}", "")] = {
                "operationId": operation_id, "parameters": {param: source},
            }
    return schema
