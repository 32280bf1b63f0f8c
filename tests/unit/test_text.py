"""What text Palette accepts (domain.text), against an oracle written from the rule's own words:
C0/C1 controls but tab and newlines, lone surrogates, and Unicode's 66 non-characters."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.text import csv_cell, escaped, iso_time, refused_character, storable_text, utf8_head

# The 66 non-characters, listed as Unicode lists them: U+FDD0..U+FDEF, and the last two code
# points of each of the 17 planes.
NON_CHARACTERS = frozenset(range(0xFDD0, 0xFDF0)) | frozenset(
    plane * 0x10000 + last for plane in range(17) for last in (0xFFFE, 0xFFFF)
)


def refused_by_the_rule(code: int) -> bool:
    control = code < 0x20 or 0x7F <= code <= 0x9F
    return ((control and chr(code) not in "\t\n\r") or 0xD800 <= code <= 0xDFFF
            or code in NON_CHARACTERS)


def test_the_oracle_lists_the_66_non_characters():
    assert len(NON_CHARACTERS) == 66


@pytest.mark.parametrize("code", sorted(NON_CHARACTERS | {0x00, 0x1F, 0x7F, 0x9F, 0xD800, 0xDFFF}))
def test_every_non_character_control_and_surrogate_is_refused_by_its_code(code):
    assert refused_character(f"ok{chr(code)}ok") == f"U+{code:04X}"


@pytest.mark.parametrize("text", ["\t", "\n", "\r", "a\tb\r\nc", "\ufdcf\ufdf0\ufffd\U0001fffd", "\u2028 \u00a0"])
def test_tab_newlines_and_the_neighbours_of_non_characters_are_accepted(text):
    assert refused_character(text) is None
    assert storable_text(text) == text
    assert escaped(text) == text


@given(st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=30))
def test_the_first_refused_character_is_the_one_the_rule_names(text):
    first = next((ch for ch in text if refused_by_the_rule(ord(ch))), None)
    assert refused_character(text) == (None if first is None else f"U+{ord(first):04X}")


@given(st.text(max_size=30))
def test_an_escaped_text_is_storable_and_keeps_what_was_allowed(text):
    out = escaped(text)
    assert refused_character(out) is None
    out.encode("utf-8")
    for ch in text:
        if not refused_by_the_rule(ord(ch)):
            assert ch in out


def test_a_refused_character_is_escaped_as_python_writes_it_without_quotes():
    assert escaped("a\x00b\ud800\U0010ffff") == "a\\x00b\\ud800\\U0010ffff"


def test_storable_text_names_the_refused_character():
    with pytest.raises(ValueError, match=r"U\+0000"):
        storable_text("a\x00")


@pytest.mark.parametrize("value", ["2026-01-01é00:00:00", "2026-01-01T00:00:00\x00", "2026-01-01\u200900:00"])
def test_a_time_with_a_character_outside_printable_ascii_is_refused_though_python_reads_it(value):
    with pytest.raises(ValueError):
        iso_time(value)


def test_a_time_in_printable_ascii_is_read():
    assert iso_time("2026-01-01T00:00:00+00:00").isoformat() == "2026-01-01T00:00:00+00:00"


@pytest.mark.parametrize("value", ["2026-01-01T00:00:00.1234567+00:00", "2026-01-01T00:00:00.123456789Z",
                                   "2026-01-01T00:00:00,0000001+00:00"])
def test_a_time_more_precise_than_a_microsecond_is_refused_not_cut(value):
    """Python cuts a fraction past six digits: an event stamped 00:00:00.123456 lies before
    `--since`/`from` 00:00:00.1234567 but was counted in (`>=` on the cut bound), and before
    `--to` (the report's exclusive end) but was left out. The log's times are microseconds."""
    with pytest.raises(ValueError, match="microsecond"):
        iso_time(value)


def test_a_fraction_s_zeros_past_the_microsecond_are_read():
    assert iso_time("2026-01-01T00:00:00.123456000+00:00") == iso_time("2026-01-01T00:00:00.123456+00:00")
    assert iso_time("2026-01-01T00:00:00,5+00:00").microsecond == 500_000


def test_the_api_refuses_a_time_finer_than_a_microsecond_saying_so_not_as_no_time():
    """`as_of=…12.1234567Z` is ISO 8601: the 422 said "not an ISO 8601 time (e.g. …)", which a
    client takes for a typo, where the reason is the log's microseconds."""
    from adapters.api.routes_analysts import _iso_time

    with pytest.raises(ValueError, match="microsecond"):
        _iso_time("2026-12-06T07:27:12.1234567Z")
    with pytest.raises(ValueError, match=r"not an ISO 8601 time \(e\.g\."):
        _iso_time("yesterday")


FORMULA_FIRST = "=+-@\t\r"  # what a spreadsheet starts a formula at (OWASP's list)


def _a_number(text: str) -> bool:
    """Text a spreadsheet can only read as a number: digits, a point, an exponent, signs, and float's word for it."""
    try:
        float(text)
    except ValueError:
        return False
    return set(text) <= set("0123456789.eE+-")


@given(st.text() | st.from_regex(r"\A[+-][0-9.eE+-]{1,8}\Z"))
def test_a_csv_cell_of_text_never_begins_a_formula_and_keeps_what_did_not(text):
    cell = csv_cell(text)
    assert not cell.startswith(tuple(FORMULA_FIRST)) or (cell == text and _a_number(text))
    assert cell in (text, "'" + text)
    assert cell == text or text.startswith(tuple(FORMULA_FIRST))


@given(st.sampled_from(FORMULA_FIRST), st.text())
def test_a_text_cell_beginning_a_formula_is_written_after_a_quote(first, rest):
    assert csv_cell(first + rest) == (first + rest if _a_number(first + rest) else "'" + first + rest)


def test_the_text_of_a_signed_number_stays_a_number_and_arithmetic_does_not():
    for number in ("-5", "+3", "-0.5", "-.5", "+1e3", "-2.5E-10", "-5."):
        assert csv_cell(number) == number
    for formula in ("-5+1", "+1-cmd|' /C calc'!A0", "-", "+", "-e5", "-1,5", "-5 ", "-0x1f", "-inf", "-nan", "-1_0"):
        assert csv_cell(formula) == "'" + formula


@given(st.integers() | st.floats(allow_nan=False) | st.booleans() | st.none())
def test_a_csv_cell_that_is_not_text_is_left_as_it_is_a_negative_number_included(value):
    assert csv_cell(value) is value


@given(st.text(), st.integers(min_value=0, max_value=64))
def test_a_utf8_head_is_the_longest_whole_character_prefix_that_fits(text: str, max_bytes: int) -> None:
    """Oracle: characters taken one by one (a lone surrogate as its ``\\uXXXX`` escape) while
    their UTF-8 still fits."""
    expected = b""
    for ch in text:
        piece = ascii(ch)[1:-1].encode() if 0xD800 <= ord(ch) <= 0xDFFF else ch.encode()
        if len(expected) + len(piece) > max_bytes:
            break
        expected += piece
    head = utf8_head(text, max_bytes)
    assert head == expected
    head.decode("utf-8")  # strict: no character cut in two


def test_a_utf8_head_cuts_before_a_character_that_does_not_fit_whole() -> None:
    assert utf8_head("ab\u00e9", 3) == b"ab" and utf8_head("ab\u00e9", 4) == "ab\u00e9".encode()
    assert utf8_head("x\udc80y", 10) == b"x\\udc80y"
