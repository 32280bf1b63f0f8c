"""The Rule aggregate: a user's saved edit recipe.

Storage contract: event classes are stored as ``domain.rule:Rule.<Name>``; never rename them.
The aggregate's attributes are stored in its snapshots: a change to them takes
``Rule.class_version`` and its ``upcast_vN_vM`` (``tests/unit/test_snapshots.py`` pins them).
A rule's ``name`` is the client's text and so personal: the application stores it sealed.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.contracts.personal import sealed_owner
from domain.errors import NotFound, ValidationFailed
from domain.stream import Stream
from domain.text import shows

MAX_RULE_NAME = 80


class Rule(Stream):
    class RuleCreated(Aggregate.Created):
        user_id: UUID
        name: str
        preset_id: str
        concepts: dict[str, dict[str, str]]
        protect: list[str]

    class RuleUpdated(Aggregate.Event):
        name: str
        concepts: dict[str, dict[str, str]]
        protect: list[str]

        def apply(self, rule: Rule) -> None:
            rule.name = self.name
            rule.concepts = self.concepts
            rule.protect = self.protect

    class RuleDeleted(Aggregate.Event):
        def apply(self, rule: Rule) -> None:
            rule.deleted = True

    def __init__(
        self, user_id: UUID, name: str, preset_id: str, concepts: dict[str, dict[str, str]],
        protect: list[str],
    ) -> None:
        self.user_id = user_id
        self.name = name
        self.preset_id = preset_id
        self.concepts = concepts
        self.protect = protect
        self.deleted = False

    @classmethod
    def create(
        cls, rule_id: UUID, user_id: UUID, name: str, preset_id: str,
        concepts: dict[str, dict[str, str]], protect: list[str], at: datetime,
    ) -> Rule:
        """``concepts``/``protect`` must already be normalised against the preset."""
        _check_stored_name(name)
        return cls._create(
            cls.RuleCreated, id=rule_id, user_id=user_id, name=name, preset_id=preset_id,
            concepts=concepts, protect=protect, timestamp=at,
        )

    def update(
        self, name: str, concepts: dict[str, dict[str, str]], protect: list[str], at: datetime
    ) -> None:
        if self.deleted:
            raise NotFound("rule not found")
        _check_stored_name(name)
        if (name, concepts, protect) != (self.name, self.concepts, self.protect):
            self.trigger_event(
                self.RuleUpdated, name=name, concepts=concepts, protect=protect, timestamp=at
            )

    def delete(self, at: datetime) -> None:
        if not self.deleted:
            self.trigger_event(self.RuleDeleted, timestamp=at)


def check_name(name: str) -> None:
    """A name as the client gives it (1..MAX_RULE_NAME characters)."""
    if not name.strip() or len(name) > MAX_RULE_NAME:
        raise ValidationFailed(f"rule name must be 1..{MAX_RULE_NAME} characters")


def check_new_name(name: str) -> None:
    """A name a client gives a rule now: ``check_name``, and one that shows. Names stored before
    the second check (folded as they are, and kept by an edit) are not asked it."""
    check_name(name)
    if not shows(name):
        raise ValidationFailed("rule name must show at least one character (not only spaces, "
                               "invisible or combining ones)")


def _check_stored_name(name: str) -> None:
    """A sealed name was checked in clear before sealing (``check_name``); any other is checked here."""
    if sealed_owner(name) is None:
        check_name(name)
