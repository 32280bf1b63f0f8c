"""Plans: what each plan grants at sign-up and how much it may run at once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """The limits of one plan; read when deciding, never stored in events."""

    name: str
    initial_credits: int
    max_concurrency: int
    max_rule_slots: int


DEFAULT_PLANS: Mapping[str, Plan] = {
    "free": Plan("free", initial_credits=50, max_concurrency=1, max_rule_slots=2),
    "pro": Plan("pro", initial_credits=1000, max_concurrency=4, max_rule_slots=20),
}
