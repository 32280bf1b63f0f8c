"""An Idempotency-Key's request hash reads the path's ids as the routes do: every spelling of an
id a route's UUID parameter takes (pydantic is the oracle) is the same id, and a segment the
routes refuse stays as it is (so it cannot be taken for the request it resembles). Which answers
are kept for a key: none that invites a retry or refused the request before it ran."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from adapters.api.idempotency import IdempotencyKeys, canonical_path, storable
from adapters.tokens import TokenIssuer

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


@pytest.mark.parametrize(("status", "kept"), [
    (200, True), (201, True), (204, True), (400, True), (403, True), (404, True), (499, True),
    (401, False), (409, False), (422, False), (429, False), (500, False), (502, False), (503, False),
])
def test_only_answers_that_neither_invite_a_retry_nor_refused_before_running_are_kept(status, kept):
    assert storable(status) is kept


class NoDatabase:
    """Connections a request that must neither claim nor read a key never asks for."""

    def connection(self) -> None:
        raise AssertionError("the key table was used")


def test_an_erased_users_token_neither_claims_nor_reads_a_key() -> None:
    """Its kept answers (a rule's name, upload links) are never replayed: the route answers 401."""
    issuer, erased, live = TokenIssuer("s" * 48, "palette", "palette-app", 3600), uuid4(), uuid4()
    reached: list[str] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        reached.append(scope["path"])

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    def request(user: UUID) -> None:
        token = issuer.issue(user, datetime.now(UTC)).encode()
        scope = {"type": "http", "method": "POST", "path": "/rules",
                 "headers": [(b"idempotency-key", b"k1"), (b"authorization", b"Bearer " + token)]}
        asyncio.run(IdempotencyKeys(app, NoDatabase(), issuer, fail=None,  # type: ignore[arg-type]
                                    erased={erased})(scope, receive, None))  # type: ignore[arg-type]

    request(erased)
    assert reached == ["/rules"]  # straight through to the route
    with pytest.raises(AssertionError, match="key table"):
        request(live)  # the same request from a live user claims its key


def test_a_client_gone_before_its_body_ended_neither_claims_a_key_nor_runs_the_route() -> None:
    """A prefix of the body that happens to be a whole request (here a whole JSON object, the rest
    of the body was to be its padding) is not run and kept as the key's answer."""
    issuer = TokenIssuer("s" * 48, "palette", "palette-app", 3600)
    reached: list[bytes] = []
    messages = iter([{"type": "http.request", "body": b'{"name": "a"}', "more_body": True},
                     {"type": "http.disconnect"}])

    async def app(scope: dict, receive: object, send: object) -> None:
        reached.append(b"ran")

    async def receive() -> dict:
        return next(messages)

    token = issuer.issue(uuid4(), datetime.now(UTC)).encode()
    scope = {"type": "http", "method": "POST", "path": "/rules",
             "headers": [(b"idempotency-key", b"k1"), (b"authorization", b"Bearer " + token)]}
    asyncio.run(IdempotencyKeys(app, NoDatabase(), issuer, fail=None)(  # type: ignore[arg-type]
        scope, receive, None))  # type: ignore[arg-type]
    assert reached == []


@pytest.mark.parametrize(("key", "claimed"), [
    (b"k" * 255, True), (b" ~", True),  # README: 1 to 255 printable ASCII characters
    (b"k" * 256, False), (b"", False), (b"a\x7fb", False), (b"a\x1fb", False), ("é".encode(), False),
])
def test_a_key_of_1_to_255_printable_ascii_characters_is_claimed_and_any_other_is_a_422(key, claimed):
    issuer = TokenIssuer("s" * 48, "palette", "palette-app", 3600)
    refusals: list[tuple[str, str]] = []

    def fail(code: str, message: str, **kwargs: object) -> object:
        refusals.append((code, message))

        async def answer(scope: dict, receive: object, send: object) -> None:
            pass

        return answer

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    token = issuer.issue(uuid4(), datetime.now(UTC)).encode()
    scope = {"type": "http", "method": "POST", "path": "/rules",
             "headers": [(b"idempotency-key", key), (b"authorization", b"Bearer " + token)]}
    keys = IdempotencyKeys(None, NoDatabase(), issuer, fail=fail)  # type: ignore[arg-type]
    if claimed:
        with pytest.raises(AssertionError, match="key table"):
            asyncio.run(keys(scope, receive, None))  # type: ignore[arg-type]
    else:
        asyncio.run(keys(scope, receive, None))  # type: ignore[arg-type]
    assert [code for code, _ in refusals] == ([] if claimed else ["VALIDATION_FAILED"])
