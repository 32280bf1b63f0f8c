"""Rule aggregate and edit validation against presets."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

import pytest

from domain.errors import NotFound, ValidationFailed
from domain.presets import PRESETS, normalise_edits
from domain.rule import Rule

AT = datetime(2026, 1, 1, tzinfo=UTC)


def test_presets_have_the_documented_concepts():
    assert len(PRESETS["interior"].concepts) == 12
    assert len(PRESETS["seller"].concepts) == 6


def test_edits_are_normalised():
    edits, protect = normalise_edits(
        "interior", {"wall": {"action": "recolor", "value": "#AABBCC"}, "lamp": {"action": "remove"}},
        ["sofa", "sofa"],
    )
    assert edits == {"lamp": {"action": "remove", "value": ""},
                     "wall": {"action": "recolor", "value": "#aabbcc"}}
    assert protect == ["sofa"]


@pytest.mark.parametrize(("concepts", "protect"), [
    ({"product": {"action": "remove"}}, []),  # concept of another preset
    ({"wall": {"action": "recolor", "value": "red"}}, []),
    ({"wall": {"action": "tone", "value": "sepia"}}, []),
    ({"wall": {"action": "texture", "value": "plaid"}}, []),
    ({"wall": {"action": "paint", "value": "#000000"}}, []),
    ({"wall": {"action": "remove"}}, ["wall"]),  # edited and protected
    ({"wall": {"action": "remove"}}, ["garage"]),
    ({}, []),
])
def test_invalid_edits_are_refused(concepts, protect):
    with pytest.raises(ValidationFailed):
        normalise_edits("interior", concepts, protect)


def test_rule_update_with_same_content_records_nothing_and_delete_is_once():
    edits = {"wall": {"action": "remove", "value": ""}}
    rule = Rule.create(uuid4(), uuid4(), "mine", "interior", edits, [], AT)
    rule.collect_events()
    rule.update("mine", edits, [], AT)
    assert rule.collect_events() == []
    rule.delete(AT)
    rule.delete(AT)
    assert [type(e).__name__ for e in rule.collect_events()] == ["RuleDeleted"]
    with pytest.raises(NotFound):
        rule.update("other", edits, [], AT)


def test_rule_name_is_bounded():
    with pytest.raises(ValidationFailed):
        Rule.create(uuid4(), uuid4(), " ", "interior", {}, [], AT)
