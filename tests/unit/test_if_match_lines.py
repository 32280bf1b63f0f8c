"""If-Match given on several lines is one list (RFC 9110 5.3): every line's tags count, in any order."""

from __future__ import annotations

import pytest

from adapters.api.preconditions import expected_versions


@pytest.mark.parametrize("lines", [['"1"', '"7"'], ['"7"', '"1"'], ['"1", W/"2"', ' "7" ']])
def test_if_match_on_several_lines_accepts_the_versions_each_line_names(lines: list[str]) -> None:
    assert expected_versions(lines) == frozenset({1, 7})
