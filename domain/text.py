"""What text Palette accepts and stores: what PostgreSQL can store and a person can read."""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime

ALLOWED_CONTROLS = frozenset("\t\n\r")


def refused_character(value: str) -> str | None:
    """The first character of ``value`` the API refuses, as ``U+XXXX``, or None.

    Refused: NUL and the other C0/C1 controls (tab and newlines aside), lone surrogates (the
    UTF-8 encoder and PostgreSQL refuse them) and Unicode's non-characters (U+FDD0..U+FDEF and
    the last two code points of every plane)."""
    if value.isprintable():  # the fast path: no controls, no surrogates, no unassigned code points
        return None
    for ch in value:
        code = ord(ch)
        if ch in ALLOWED_CONTROLS:
            continue
        if (unicodedata.category(ch) in ("Cc", "Cs") or 0xFDD0 <= code <= 0xFDEF
                or code & 0xFFFE == 0xFFFE):
            return f"U+{code:04X}"
    return None


# What prints nothing: spaces and separators (Z*), format characters and controls (Cf, Cc:
# zero-width spaces, joiners, bidi controls, BOM), marks with no base (Mn, Me), the Hangul
# fillers, letters made to be blank, and the Braille pattern with no dot (U+2800), a symbol.
_BLANK_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cf", "Cc", "Mn", "Me"})
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def shows(value: str) -> bool:
    """Whether ``value`` holds a character that prints something."""
    return any(unicodedata.category(ch) not in _BLANK_CATEGORIES and ch not in _BLANK_LETTERS for ch in value)


def storable_text(value: str) -> str:
    """``value`` unchanged, or ValueError naming the first refused character."""
    bad = refused_character(value)
    if bad is not None:
        raise ValueError(f"contains a character that is not allowed ({bad})")
    return value


def escaped(text: str) -> str:
    """``text`` with every refused character written as its escape (``\\x00``, ``\\ud800``):
    messages that quote bad input can then be stored, logged and sent."""
    if refused_character(text) is None:
        return text
    return "".join(ch if refused_character(ch) is None else ascii(ch)[1:-1] for ch in text)


def utf8_head(text: str, max_bytes: int) -> bytes:
    """``text`` as UTF-8 of at most ``max_bytes``, cut between two characters (a byte cut can
    split one, which a strict reader then refuses), a lone surrogate as its escape (``\\udc80``:
    UTF-8 has none, and ``str.encode`` raises on one). Only its first ``max_bytes`` characters are
    encoded: each takes a byte at least, and a reason may be as long as what it quotes."""
    head = text[:max_bytes].encode("utf-8", "backslashreplace")[:max_bytes]
    return head.decode("utf-8", "ignore").encode()


class TimeTooFine(ValueError):
    """An ISO 8601 time finer than the log's microseconds: a time, refused for that alone (its
    refusal says so, rather than that it is no time)."""


def iso_time(value: str) -> datetime:
    """An ISO 8601 time, as ``datetime.fromisoformat`` reads it, from printable ASCII only (it
    read past a trailing NUL); ValueError otherwise. Naive times stay naive: each caller decides."""
    if not (value.isascii() and value.isprintable()):
        raise ValueError("not an ISO 8601 time: it holds a character no time holds")
    # fromisoformat cuts a fraction past six digits: a bound a little after an event would read
    # as at it (a `since` counting it in, an exclusive `to` leaving it out)
    fraction = re.search(r"[.,](\d{7,})", value)
    if fraction is not None and fraction.group(1)[6:].strip("0"):
        raise TimeTooFine("finer than a microsecond: the log's times go no finer")
    return datetime.fromisoformat(value)


# What a spreadsheet takes as the start of a formula (OWASP's list for CSV injection), and a
# signed number, which begins as one but can only be a number.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_SIGNED_NUMBER = re.compile(r"[+-](?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def csv_cell(value: object) -> object:
    """``value`` as a CSV cell that a spreadsheet shows rather than runs: text beginning as a
    formula does after a quote (``'=1+1``), as OWASP advises; anything else, a negative number
    or the text of one (``-5``, a JSON value's) included, as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _SIGNED_NUMBER.fullmatch(value):
        return "'" + value
    return value


# Control characters (a line break, a tab, whatever str.splitlines ends a line at) as escapes,
# so a value prints in its one cell.
_CONTROLS = ({c: f"\\x{c:02x}" for c in [*range(32), *range(127, 160)]} | {10: "\\n", 13: "\\r", 9: "\\t"}
             | {0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(value: object) -> str:
    """``value`` as one cell of a line (tab-separated fields, `palette query`'s table): its control
    characters escaped."""
    return str(value).translate(_CONTROLS)
