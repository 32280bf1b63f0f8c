"""The README's API is the code's: each route's path is named there, and each error code with the
status the API answers it with."""

from __future__ import annotations

import re
from pathlib import Path

from adapters.api import routes_analysts, routes_jobs, routes_rules, routes_users, routes_webhooks
from adapters.api.envelope import STATUS_BY_CODE

README = Path(__file__).resolve().parents[2] / "README.md"
ROUTERS = (routes_analysts, routes_jobs, routes_rules, routes_users, routes_webhooks)


def _paths(text: str) -> set[str]:
    """The paths ``text`` names, each parameter as {} (``/jobs/{id}``, curl's ``$API/jobs/$JOB_ID``)."""
    text = re.sub(r"\$[A-Z_]+", "{}", text.replace("$API", ""))
    return {re.sub(r"\{[^}]*\}", "{}", p) for p in re.findall(r"/[a-z][a-z0-9_/{}.-]*", text)}


def test_every_route_is_named_in_the_readme() -> None:
    written = _paths(README.read_text())
    routes = {route.path for module in ROUTERS for route in module.router.routes}
    assert len(routes) > 30
    assert sorted(r for r in routes if re.sub(r"\{[^}]*\}", "{}", r) not in written) == []


def test_every_error_code_is_in_the_readme_with_its_status() -> None:
    readme = README.read_text()
    assert sorted(code for code in STATUS_BY_CODE if f"`{code}`" not in readme) == []
    given = [(m[2] or m[3], int(m[1] or m[4]))
             for m in re.finditer(r"(\d{3}) `([A-Z_]+)`|`([A-Z_]+)` \((\d{3})", readme)]
    assert len(given) > 20
    assert [(code, status) for code, status in given if STATUS_BY_CODE.get(code, status) != status] == []
