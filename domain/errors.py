"""Refusals a command can meet; each carries a stable code the API maps to an HTTP status."""

from __future__ import annotations


class DomainError(Exception):
    """A command was refused by a business rule; nothing was recorded."""

    code = "DOMAIN_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationFailed(DomainError):
    code = "VALIDATION_FAILED"


class NotFound(DomainError):
    code = "NOT_FOUND"


class InvalidState(DomainError):
    code = "INVALID_STATE"


class InsufficientCredits(DomainError):
    code = "INSUFFICIENT_CREDITS"


class ConcurrencyLimit(DomainError):
    code = "CONCURRENCY_LIMIT"


class RuleSlotsFull(DomainError):
    code = "RULE_SLOTS_FULL"
