"""The import directions of ARCHITECTURE §8, read from the source (an AST walk, no imports run).

domain imports nothing of ours outside domain, and of the rest only the standard library and
eventsourcing (§1: no framework imports other than its aggregate base); projections and application import only domain;
the GPU worker imports only the contracts (and the text rule) of domain and its own modules;
infra imports only domain; adapters may import everything.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("domain", "application", "projections", "adapters", "gpu_consumer", "infra")
ALLOWED: dict[str, tuple[str, ...]] = {
    "domain": ("domain",),
    "application": ("domain", "application"),
    "projections": ("domain", "projections"),
    "gpu_consumer": ("domain.contracts", "domain.text", "gpu_consumer"),
    "infra": ("domain", "infra"),
    "adapters": PACKAGES,
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every module an ``import`` or ``from … import`` names (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def foreign_imports(package: str, allowed: tuple[str, ...]) -> list[str]:
    """Imports of ``package`` from outside our packages, the standard library and ``allowed``."""
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imports_of(path):
            top = module.split(".")[0]
            if top not in (*PACKAGES, *sys.stdlib_module_names, "__future__", *allowed):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


def violations(package: str) -> list[str]:
    allowed = ALLOWED[package]
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imports_of(path):
            ours = module.split(".")[0] in PACKAGES
            if ours and not any(module == a or module.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package", [p for p in PACKAGES if p != "adapters"])
def test_imports_point_inward(package: str) -> None:
    assert violations(package) == []


def test_the_domain_imports_no_framework_but_eventsourcing() -> None:
    assert foreign_imports("domain", ("eventsourcing",)) == []


def test_the_check_sees_a_framework_in_the_domain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle can disagree: a contract that imports a codec library is reported."""
    (tmp_path / "domain" / "contracts").mkdir(parents=True)
    (tmp_path / "domain" / "contracts" / "codec.py").write_text(
        "import json\nimport orjson\nfrom eventsourcing.domain import Aggregate\nfrom domain import job\n")
    monkeypatch.setattr(__name__ + ".ROOT", tmp_path)
    assert foreign_imports("domain", ("eventsourcing",)) == ["domain/contracts/codec.py:2 imports orjson"]


def test_the_check_sees_a_wrong_arrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle can disagree: a projection that imports an adapter is reported."""
    fake_root = tmp_path
    (fake_root / "projections").mkdir()
    (fake_root / "projections" / "bad.py").write_text("from adapters.kafka_io import producer\nimport domain.job\n")
    monkeypatch.setattr(__name__ + ".ROOT", fake_root)
    assert violations("projections") == ["projections/bad.py:1 imports adapters.kafka_io.producer"]
