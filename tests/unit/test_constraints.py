"""constraints.txt, the versions `make install` takes, against what pyproject.toml accepts and what
this environment runs: a pin outside pyproject's range would make the install fail, a dependency
without a pin would come as whatever is newest, and a suite run on other versions than the pins
would vouch for a set no fresh machine gets."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def pins(text: str) -> dict[str, Version]:
    """Each pinned name (canonical) and its version, from constraints text."""
    pinned: dict[str, Version] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and not version.startswith("="), f"not an exact pin: {line!r}"
        assert canonicalize_name(name) not in pinned, f"pinned twice: {name}"
        pinned[canonicalize_name(name)] = Version(version)
    return pinned


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def pinned() -> dict[str, Version]:
    return pins((ROOT / "constraints.txt").read_text())


def test_every_declared_dependency_is_pinned_within_what_pyproject_accepts() -> None:
    versions = pinned()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in versions, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(versions[name], prereleases=True), (
            f"constraints.txt pins {requirement.name} {versions[name]}, outside pyproject's {requirement.specifier}")


def test_this_environment_runs_the_pinned_versions() -> None:
    """A local label (torch's +cpu) is the same release: pip takes 2.13.0+cpu for ==2.13.0."""
    for name, version in pinned().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # a dependency of another platform's wheels
        assert installed.public == str(version), (
            f"{name} {installed} is installed where constraints.txt pins {version}: make install")


def test_a_range_or_a_repeated_name_is_no_pin() -> None:
    for text in ("fastapi>=0.115", "fastapi===0.1", "x==1\nX==2"):
        try:
            pins(text)
        except AssertionError:
            continue
        raise AssertionError(f"taken as pins: {text!r}")
    assert pins("# note\nFast_API==0.1.0  # why\n") == {"fast-api": Version("0.1.0")}
