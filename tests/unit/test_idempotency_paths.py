"""An Idempotency-Key's request hash reads the path's ids as the routes do: every spelling of an
id a route's UUID parameter takes (pydantic is the oracle) is the same id, and a segment the
routes refuse stays as it is (so it cannot be taken for the request it resembles)."""

from __future__ import annotations

from uuid import UUID

from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from adapters.api.idempotency import canonical_path

ROUTE_ID = TypeAdapter(UUID)


@st.composite
def spellings(draw: st.DrawFn) -> str:
    """An id spelled as a client might: case, hyphens dropped or moved, braces, a urn prefix
    (any case), stray characters."""
    text = str(draw(st.uuids()))
    if draw(st.booleans()):
        text = text.upper()
    hyphens = draw(st.sampled_from(["keep", "drop", "drop one", "move"]))
    if hyphens == "drop":
        text = text.replace("-", "")
    elif hyphens == "drop one":
        text = text.replace("-", "", 1)
    elif hyphens == "move":
        bare = text.replace("-", "")
        at = draw(st.integers(1, len(bare) - 1))
        text = bare[:at] + "-" + bare[at:]
    text = draw(st.sampled_from(["", "urn:uuid:", "URN:UUID:", "uuid:", "{"])) + text
    if text.startswith("{") or draw(st.integers(0, 9)) == 0:
        text += draw(st.sampled_from(["}", "", "}}"]))
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["g", " ", "-", "%2d", ":"])) + text[at:]
    return text


@given(spellings())
def test_an_id_is_read_as_the_routes_read_it_and_anything_else_is_left_alone(segment: str) -> None:
    try:
        expected = str(ROUTE_ID.validate_python(segment))
    except ValidationError:
        expected = segment
    assert canonical_path(f"/jobs/{segment}/cancel") == f"/jobs/{expected}/cancel"


def test_segments_that_are_not_ids_and_the_path_shape_are_kept() -> None:
    assert canonical_path("/jobs") == "/jobs"
    assert canonical_path("/rules/") == "/rules/"
    assert canonical_path("//x//y") == "//x//y"
