"""The README's settings are the code's: each PALETTE_* it names is a setting, each setting is named there,
and each default it gives (a number, in bytes or a span where it says so) is the setting's."""

from __future__ import annotations

import re
from pathlib import Path

from adapters.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_documented_and_every_documented_setting_exists() -> None:
    named = set(re.findall(r"PALETTE_[A-Z0-9_]*[A-Z0-9]", README.read_text()))
    settings = {f"PALETTE_{name.upper()}" for name in Settings.model_fields}
    assert sorted(named - settings) == [], "the README names settings the code does not read"
    assert sorted(settings - named) == [], "settings the README does not document"


UNITS = {"": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
         "s": 1, "min": 60, "h": 3600, "day": 86400, "days": 86400}
# `PALETTE_X` (600; ...), `PALETTE_X`, default 30, `PALETTE_X` (64 MiB, ...), `PALETTE_X` (3 days)
DEFAULT_GIVEN = re.compile(r"`PALETTE_([A-Z0-9_]+)`,? \(?(?:default )?([0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?)"
                           r"(?: (KiB|MiB|GiB|TiB|s|min|h|days?))?(?=[;,):\s])")


def _unit(name: str, written: str | None) -> int:
    """What the setting counts in, for a span written in days: a _DAYS setting counts days."""
    return UNITS["day"] if name.endswith("_DAYS") and written in ("day", "days") else 1


def test_every_default_the_readme_gives_is_the_codes() -> None:
    given = [(m[1].lower(), float(m[2].replace(",", "")) * UNITS[m[3] or ""] / _unit(m[1], m[3]), m[0])
             for m in DEFAULT_GIVEN.finditer(README.read_text())]
    assert len(given) > 30  # the pattern still finds the README's defaults
    wrong = [text for name, value, text in given if Settings.model_fields[name].default != value]
    assert wrong == [], "defaults the README gives that the code does not have"
