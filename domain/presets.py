"""Presets (static data) and the validation of per-concept edits against them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from domain.contracts.edits import ACTIONS, HEX_COLOUR, TEXTURES, TONES
from domain.errors import ValidationFailed


@dataclass(frozen=True)
class Preset:
    id: str
    name: str
    concepts: tuple[str, ...]


PRESETS: Mapping[str, Preset] = {
    "interior": Preset(
        "interior",
        "Interior",
        ("wall", "floor", "ceiling", "sofa", "chair", "table", "bed", "cabinet", "curtain",
         "rug", "lamp", "plant"),
    ),
    "seller": Preset(
        "seller", "Seller", ("product", "background", "surface", "shadow", "prop", "label")
    ),
}



def get_preset(preset_id: str) -> Preset:
    try:
        return PRESETS[preset_id]
    except KeyError:
        raise ValidationFailed(f"unknown preset {preset_id!r}; choose one of {sorted(PRESETS)}") from None


def normalise_edits(
    preset_id: str, concepts: Mapping[str, Mapping[str, object]], protect: Sequence[str]
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Validated edits in canonical form: concept -> {action, value}; protect sorted and unique."""
    preset = get_preset(preset_id)
    if not concepts:
        raise ValidationFailed("at least one concept edit is required")
    edits: dict[str, dict[str, str]] = {}
    for concept in sorted(concepts):
        edit = concepts[concept]
        if concept not in preset.concepts:
            raise ValidationFailed(f"concept {concept!r} is not in preset {preset_id!r}")
        edits[concept] = _canonical_edit(concept, edit.get("action"), edit.get("value"))
    protected = sorted(set(protect))
    for concept in protected:
        if concept not in preset.concepts:
            raise ValidationFailed(f"protect: concept {concept!r} is not in preset {preset_id!r}")
        if concept in edits:
            raise ValidationFailed(f"concept {concept!r} cannot be both edited and protected")
    return edits, protected


def _canonical_edit(concept: str, action: object, value: object) -> dict[str, str]:
    """One concept's edit as stored: a known action with a value it takes (a colour in lower case,
    no value for a removal), so equal edits compare equal."""
    if action not in ACTIONS:
        raise ValidationFailed(f"{concept}: action must be one of {list(ACTIONS)}")
    value_s = "" if value is None else str(value)
    if action == "recolor" and HEX_COLOUR.fullmatch(value_s) is None:
        raise ValidationFailed(f"{concept}: recolor needs a value like #a1b2c3")
    if action == "tone" and value_s not in TONES:
        raise ValidationFailed(f"{concept}: tone must be one of {list(TONES)}")
    if action == "texture" and value_s not in TEXTURES:
        raise ValidationFailed(f"{concept}: texture must be one of {list(TEXTURES)}")
    if action == "recolor":
        value_s = value_s.lower()
    elif action == "remove":
        value_s = ""
    return {"action": str(action), "value": value_s}
