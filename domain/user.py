"""The User aggregate: plan, credits, reservations per job and rule slots.

Storage contract: the event classes below are the stored format (topic ``domain.user:User.<Name>``).
Never rename or move them; evolve with ``class_version`` and ``upcast_vN_vM``. The aggregate's own
attributes are stored too, in its snapshots (``application.services.PaletteApplication``): a
change to them takes ``User.class_version`` and its ``upcast_vN_vM`` (``tests/unit/test_snapshots.py``
pins them).

Invariant: ``granted == balance + reserved + spent`` after every event; ``balance >= 0``.

A device hash is a credential (whoever presents it gets the device's token), so it never enters
the domain: the application keys it with a server secret, and the domain sees only that key —
and stores it sealed under the user's own key (``domain.contracts.personal``), so that erasing
the user (``Erased``) leaves nothing in the log that points back to the device.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.errors import ConcurrencyLimit, InsufficientCredits, InvalidState, RuleSlotsFull, ValidationFailed
from domain.plans import Plan
from domain.stream import Stream
from domain.text import refused_character

USER_NAMESPACE = uuid5(NAMESPACE_URL, "https://palette.invalid/users")
# Keyed ids live apart from legacy ones: a device key presented as a device hash must not
# derive, through the legacy lookup, the id of the user it belongs to.
DEVICE_KEY_NAMESPACE = uuid5(NAMESPACE_URL, "https://palette.invalid/users/device-key")
# A device key is ``hmac-sha256:<hex>`` of the device hash under the server's secret.
DEVICE_KEY_SCHEME = "hmac-sha256:"
# What a v1 Registered event (which stored the raw hash) holds once upcast: no key can equal it.
REDACTED_DEVICE_KEY = "redacted:v1"
# One grant's bounds: an operator's typo (a few zeros too many) is refused, not credited.
MAX_GRANT = 1_000_000
MAX_GRANT_REASON = 200
# What a user may be granted in all, sign-up included: the read models keep the credit buckets as
# 32-bit integers, and a fold past one would stop that user's row.
MAX_GRANTED = 2**31 - 1


def check_grant(amount: int, reason: str) -> None:
    """An operator's grant: 1..MAX_GRANT credits for a reason of 1..MAX_GRANT_REASON characters of
    storable text. A plan's sign-up credits are not one (a plan may start with more)."""
    if not 0 < amount <= MAX_GRANT:
        raise ValidationFailed(f"a grant must be 1 to {MAX_GRANT:,} credits, not {amount}")
    if not 0 < len(reason) <= MAX_GRANT_REASON:
        raise ValidationFailed(f"a grant's reason must be 1 to {MAX_GRANT_REASON} characters, not {len(reason)}")
    if (bad := refused_character(reason)) is not None:
        raise ValidationFailed(f"a grant's reason contains a character that is not allowed ({bad})")


def user_id_for_device_key(device_key: str, generation: int = 0) -> UUID:
    """One user per device: the stream id is derived from the keyed hash, so registration is
    idempotent and the id reveals nothing that could be brute-forced without the secret. Each
    erasure of the device's user moves the device on to the next ``generation``: a new user."""
    return uuid5(DEVICE_KEY_NAMESPACE, device_key if generation == 0 else f"{device_key}#{generation}")


def legacy_user_id_for_device(device_hash: str) -> UUID:
    """The id users registered before device keys got (from the raw hash); looked up so that
    such a device keeps its user."""
    return uuid5(USER_NAMESPACE, device_hash)


class User(Stream):
    # v2: ``grant_ids`` (the ids of the grants recorded with one); a v1 snapshot was taken before
    # any grant had an id.
    class_version = 2

    @staticmethod
    def upcast_v1_v2(state: dict[str, Any]) -> None:
        state["grant_ids"] = set()

    class Registered(Aggregate.Created):
        """v2: the keyed device hash, sealed (``sealed:v1:...``) since users could be erased;
        earlier v2 events hold it in clear. v1 stored the raw ``device_hash``; it is dropped on read."""

        class_version = 2
        device_key: str
        plan: str

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            # The secret is not at hand here, and the raw hash must not survive a read.
            state.pop("device_hash", None)
            state["device_key"] = REDACTED_DEVICE_KEY

    class CreditsGranted(Aggregate.Event):
        """v2: ``grant_id``, which makes an operator's grant idempotent (None: the sign-up grant,
        and every grant recorded before v2)."""

        class_version = 2
        amount: int
        reason: str
        grant_id: UUID | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["grant_id"] = None

        def apply(self, user: User) -> None:
            user.balance += self.amount
            user.granted += self.amount
            if self.grant_id is not None:
                user.grant_ids.add(self.grant_id)

    class CreditsReserved(Aggregate.Event):
        job_id: UUID
        amount: int

        def apply(self, user: User) -> None:
            user.balance -= self.amount
            user.reservations[self.job_id] = self.amount

    class CreditsSettled(Aggregate.Event):
        job_id: UUID
        spent: int
        refunded: int

        def apply(self, user: User) -> None:
            del user.reservations[self.job_id]
            user.spent += self.spent
            user.balance += self.refunded

    class RuleSlotTaken(Aggregate.Event):
        rule_id: UUID

        def apply(self, user: User) -> None:
            user.rule_ids.add(self.rule_id)

    class RuleSlotFreed(Aggregate.Event):
        rule_id: UUID

        def apply(self, user: User) -> None:
            user.rule_ids.discard(self.rule_id)

    class PlanChanged(Aggregate.Event):
        plan: str

        def apply(self, user: User) -> None:
            user.plan = self.plan

    class Erased(Aggregate.Event):
        """The user's personal data is gone (key destroyed, objects and webhooks deleted); the
        credit history stays for the ledger. No command is accepted after it."""

        def apply(self, user: User) -> None:
            user.erased = True

    def __init__(self, plan: str) -> None:
        # The device key stays in the Registered event: no rule needs it.
        self.plan = plan
        self.balance = 0
        self.granted = 0
        self.spent = 0
        self.reservations: dict[UUID, int] = {}
        self.rule_ids: set[UUID] = set()
        self.grant_ids: set[UUID] = set()  # an operator's grants, each recorded once
        self.erased = False

    # -- queries ----------------------------------------------------------------------
    @property
    def reserved(self) -> int:
        return sum(self.reservations.values())

    @property
    def active_jobs(self) -> int:
        return len(self.reservations)

    # -- commands (validate first, then record; a satisfied command records nothing) --
    @classmethod
    def register(cls, device_key: str, plan: Plan, at: datetime, generation: int = 0,
                 seal: Callable[[UUID, str], str] | None = None) -> User:
        """A new user for a device, by its key (never the raw device hash), stored as
        ``seal(user id, key)`` returns it (sealed under the user's key)."""
        if not device_key.startswith(DEVICE_KEY_SCHEME) or len(device_key) == len(DEVICE_KEY_SCHEME):
            raise ValidationFailed(f"a device key ({DEVICE_KEY_SCHEME}...) is required, not a device hash")
        user_id = user_id_for_device_key(device_key, generation)
        user = cls._create(
            cls.Registered, id=user_id, device_key=seal(user_id, device_key) if seal else device_key,
            plan=plan.name, timestamp=at,
        )
        if plan.initial_credits > 0:
            user.grant(plan.initial_credits, "signup", at)
        return user

    def grant(self, amount: int, reason: str, at: datetime, grant_id: UUID | None = None) -> bool:
        """Credit ``amount`` for ``reason`` (a plan's sign-up credits, or an operator's grant,
        bounded by ``check_grant`` first); a grant whose ``grant_id`` this user has recorded
        records nothing (a retry). True when this call recorded it."""
        if amount <= 0:
            raise ValidationFailed("a grant must be a positive number of credits")
        if grant_id is not None and grant_id in self.grant_ids:
            return False
        if self.granted + amount > MAX_GRANTED:
            raise ValidationFailed(f"a user is granted at most {MAX_GRANTED:,} credits in all; "
                                   f"{self.granted:,} were granted already")
        self.trigger_event(self.CreditsGranted, amount=amount, reason=reason, grant_id=grant_id, timestamp=at)
        return True

    def reserve(self, job_id: UUID, amount: int, plan: Plan, at: datetime) -> None:
        if job_id in self.reservations:
            return
        if amount <= 0:
            raise ValidationFailed("a reservation must be a positive number of credits")
        if self.active_jobs >= plan.max_concurrency:
            raise ConcurrencyLimit(
                f"plan {plan.name!r} runs at most {plan.max_concurrency} job(s) at once"
            )
        if self.balance < amount:
            raise InsufficientCredits(f"{amount} credits needed, {self.balance} available")
        self.trigger_event(self.CreditsReserved, job_id=job_id, amount=amount, timestamp=at)

    def settle(self, job_id: UUID, spent: int, at: datetime) -> None:
        """Close a job's reservation exactly once: keep ``spent``, refund the rest."""
        reserved = self.reservations.get(job_id)
        if reserved is None:
            return
        if not 0 <= spent <= reserved:
            raise ValidationFailed(f"cannot spend {spent} of a {reserved}-credit reservation")
        self.trigger_event(
            self.CreditsSettled, job_id=job_id, spent=spent, refunded=reserved - spent, timestamp=at
        )

    def take_rule_slot(self, rule_id: UUID, plan: Plan, at: datetime) -> None:
        if rule_id in self.rule_ids:
            return
        if len(self.rule_ids) >= plan.max_rule_slots:
            raise RuleSlotsFull(f"plan {plan.name!r} keeps at most {plan.max_rule_slots} rules")
        self.trigger_event(self.RuleSlotTaken, rule_id=rule_id, timestamp=at)

    def free_rule_slot(self, rule_id: UUID, at: datetime) -> None:
        if rule_id in self.rule_ids:
            self.trigger_event(self.RuleSlotFreed, rule_id=rule_id, timestamp=at)

    def erase(self, at: datetime) -> bool:
        """Record the erasure once no job holds credits (cancel them first); True when this call
        recorded it."""
        if self.erased:
            return False
        if self.reservations:
            raise InvalidState(f"{len(self.reservations)} job(s) still hold credits: cancel them first")
        self.trigger_event(self.Erased, timestamp=at)
        return True

    def change_plan(self, plan: Plan, at: datetime) -> None:
        if plan.name != self.plan:
            self.trigger_event(self.PlanChanged, plan=plan.name, timestamp=at)
