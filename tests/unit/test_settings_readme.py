"""The README's settings are the code's: each PALETTE_* it names is a setting, and each setting is named there."""

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
