"""The values of the command line's arguments, parsed with a one-line refusal (argparse's exit 2)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

from adapters.tokens import STAFF_TTL_MAX_S
from domain.text import TimeTooFine, iso_time, refused_character
from domain.user import MAX_GRANT, MAX_GRANT_REASON

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]  # what each command module adds to


def time_value(value: str) -> datetime:
    """An ISO-8601 time; naive times are UTC."""
    try:
        t = iso_time(value)
    except TimeTooFine as e:
        raise argparse.ArgumentTypeError(f"{e}: {value!r}") from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {value!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def uuid_value(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a stream/user id (UUID): {value!r}") from None


def given_text(value: str) -> str:
    """A value a check depends on, not empty: `--checkpoint "$CP"` with CP unset skipped the check."""
    if not value:
        raise argparse.ArgumentTypeError("empty (an unset variable?)")
    return value


def file_name(value: str) -> str:
    """A file or folder to read or write, not empty (`--out "$DIR"` with DIR unset wrote into the
    working directory) and UTF-8 text: argv's bytes that are not come as lone surrogates, which
    Arrow, DuckDB and the lines naming the file refuse (a traceback)."""
    given_text(value)
    try:
        value.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"not UTF-8 text: {value!r}") from None
    return value


def path_value(value: str) -> Path:
    return Path(file_name(value))


def row_limit(value: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of rows: {value!r}") from None
    if not 1 <= limit <= 10_000_000:
        raise argparse.ArgumentTypeError("--limit must be between 1 and 10,000,000")
    return limit


def event_count(value: str) -> int:
    """A number of events to write, 1 or more (0 or less would write none, or read as "not given")."""
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of events: {value!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {count}")
    return count


def ttl(value: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        seconds = int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a duration like 30m, 1h, 7d: {value!r}") from None
    if not 60 <= seconds <= STAFF_TTL_MAX_S:
        raise argparse.ArgumentTypeError(f"ttl must be between 1m and {STAFF_TTL_MAX_S // 86400}d")
    return seconds


def grant_credits(value: str) -> int:
    """A number of credits to grant: an integer from 1 to MAX_GRANT."""
    try:
        credits = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of credits: {value!r}") from None
    if not 1 <= credits <= MAX_GRANT:
        raise argparse.ArgumentTypeError(f"a grant is 1 to {MAX_GRANT:,} credits, not {credits}")
    return credits


def grant_reason(value: str) -> str:
    """A grant's reason as the domain keeps it: 1 to MAX_GRANT_REASON characters of storable text."""
    if not 0 < len(value) <= MAX_GRANT_REASON:
        raise argparse.ArgumentTypeError(f"a reason is 1 to {MAX_GRANT_REASON} characters, not {len(value)}")
    if (bad := refused_character(value)) is not None:
        raise argparse.ArgumentTypeError(f"the reason contains a character that is not allowed ({bad})")
    return value
