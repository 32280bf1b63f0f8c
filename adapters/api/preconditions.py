"""``If-Match`` and ``ETag`` on the rule writes (RFC 9110 8.8.3, 13.1.1): a rule's entity tag is
its stream version in quotes, ``"3"``; a write with ``If-Match`` applies only while the rule is at
one of the versions it names (``*``: any version of a rule there), checked inside the command
against the rule it loads (``application.services``), else 412 ``PRECONDITION_FAILED``.

Comparison is strong, as ``If-Match`` asks: a weak tag (``W/"3"``) never matches, nor does a tag
that is no version this API hands out (``"03"``, ``"abc"``, digits past any version): those
leave the request nothing it can match, a 412 for a rule that exists. A value that is not
``*`` or a list of entity tags at all (``3`` unquoted, ``*`` in a list, no tag) is a 422
``VALIDATION_FAILED``. The header given on several lines is one list, as HTTP says."""

from __future__ import annotations

import re
from collections.abc import Sequence

from adapters.api.envelope import ApiError

# An entity tag's opaque part: etagc (any visible byte but DQUOTE, and obs-text).
_TAG = re.compile('(W/)?"([\\x21\\x23-\\x7e\\x80-\\xff]*)"')
_SPACE = " \t"
# The versions a tag can name: a stream version's decimal digits, no leading zero, below 10**18.
_VERSION = re.compile("[1-9][0-9]{0,17}")


def etag(version: int) -> str:
    return f'"{version}"'


def expected_versions(values: Sequence[str]) -> frozenset[int] | None:
    """The versions ``If-Match`` (each line of it) accepts; None: any (``*``, or no header)."""
    if not values:
        return None
    joined = ",".join(values)
    if joined.strip(_SPACE) == "*":
        return None
    versions: set[int] = set()
    tags = 0
    pos, end = 0, len(joined)
    while pos < end:
        while pos < end and joined[pos] in _SPACE:
            pos += 1
        if pos < end and joined[pos] != ",":
            m = _TAG.match(joined, pos)
            if m is None:
                raise ApiError("VALIDATION_FAILED", 'If-Match must be * or a list of entity tags such as "3" '
                               "(a rule's version, in quotes)")
            tags += 1
            if m.group(1) is None and _VERSION.fullmatch(m.group(2)):
                versions.add(int(m.group(2)))
            pos = m.end()
            while pos < end and joined[pos] in _SPACE:
                pos += 1
        if pos < end:
            if joined[pos] != ",":
                raise ApiError("VALIDATION_FAILED", "If-Match must be * or a list of entity tags, "
                               "separated by commas")
            pos += 1
    if not tags:
        raise ApiError("VALIDATION_FAILED", 'If-Match must be * or a list of entity tags such as "3"')
    return frozenset(versions)
