"""Refusals a command can meet; each carries a stable code the API maps to an HTTP status."""

from __future__ import annotations


class DomainError(Exception):
    """A command was refused by a business rule; nothing was recorded."""

    code = "DOMAIN_ERROR"

    def __init_subclass__(cls, code: str = "", **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.code = code or cls.code

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationFailed(DomainError, code="VALIDATION_FAILED"):
    """The command's input breaks a rule: an unknown preset, a colour that is not ``#rrggbb``,
    a concept both edited and protected, an item count outside 1 to 200."""


class NotFound(DomainError, code="NOT_FOUND"):
    """No such aggregate for this user: another user's object is not found either."""


class UserNotFound(NotFound):
    """The user a command acts for is not there: erased (no command is taken after it), or never
    registered. The API answers its own caller's as a token no longer valid."""

    def __init__(self, user_id: object) -> None:
        super().__init__("user not found")
        self.user_id = user_id


class InvalidState(DomainError, code="INVALID_STATE"):
    """The aggregate's state does not take the command (a job executed before its upload)."""


class InsufficientCredits(DomainError, code="INSUFFICIENT_CREDITS"):
    """Reserving a job's credits would take the balance below zero; credits are never
    negative, and a job reserves one credit per item when it is created, before any upload."""


class ConcurrencyLimit(DomainError, code="CONCURRENCY_LIMIT"):
    """The plan's number of active jobs is reached: one must finish or be canceled first."""


class RuleSlotsFull(DomainError, code="RULE_SLOTS_FULL"):
    """Every rule slot of the plan is taken; deleting a rule frees one."""


class PreconditionFailed(DomainError, code="PRECONDITION_FAILED"):
    """The client's precondition (an ``If-Match`` version) does not hold for the aggregate as the
    command loaded it: it changed since the client read it; nothing was recorded."""
