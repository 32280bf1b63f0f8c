"""S3Listing's HTTP/1.1 against loopback servers scripted in the test (no S3): the framings, the
kept-alive connections and their failures, the limits, S3 errors and pages; and its SigV4
signature against botocore's."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from unittest import mock
from urllib.parse import parse_qs, quote_plus, urlsplit

import botocore.auth
import pytest
import uvloop

from adapters.s3_listing import ListingFailed, S3Listing
from adapters.settings import Settings
from infra.s3 import s3_client

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, Any]], Any]
SECRET = "secret/+=never-shown"
HANG = b"hang"  # an answer: read the request, never answer


@dataclass(frozen=True)
class Last:
    """An answer after which the server closes the connection."""

    data: bytes


@dataclass(frozen=True)
class Request:
    conn: int  # which connection, in the order they were accepted
    target: str
    headers: dict[str, str]

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.target).query, keep_blank_values=True).items()}


class Loopback:
    """An HTTP server on 127.0.0.1, on a loop of its own thread (the client's loops come and go):
    each request it reads gets ``answer(request)``: raw bytes to send, Last(raw bytes) to send
    before closing, None to close the connection without answering, or HANG."""

    def __init__(self, answer: Callable[[Request], bytes | Last | None]) -> None:
        self.answer = answer
        self.requests: list[Request] = []
        self.connections = 0
        self.hung_up = threading.Event()  # a client closed a connection the server hung on
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server = self._call(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port: int = self.server.sockets[0].getsockname()[1]

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        conn, self.connections = self.connections, self.connections + 1
        try:
            while True:
                try:
                    head = (await reader.readuntil(b"\r\n\r\n")).decode()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client closed it
                line, *fields = head.split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields if f)}
                request = Request(conn, line.split(" ")[1], headers)
                self.requests.append(request)
                answer = self.answer(request)
                if answer is None:
                    return
                if answer is HANG:
                    await reader.read()
                    self.hung_up.set()
                    return
                writer.write(answer.data if isinstance(answer, Last) else answer)
                await writer.drain()
                if isinstance(answer, Last):
                    return
        except ConnectionError:
            pass  # the client refused the answer and went
        finally:
            writer.close()
            self.tasks.discard(task)

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

        self._call(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


Answer = Callable[[Request], bytes | Last | None]
Serve = Callable[[Answer], Loopback]


@pytest.fixture
def serve() -> Iterator[Serve]:
    servers: list[Loopback] = []

    def start(answer: Answer) -> Loopback:
        servers.append(Loopback(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a coroutine on a new event loop of either kind (production runs uvloop)."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


def listing_of(server: Loopback, **options: Any) -> S3Listing:
    return S3Listing(f"http://127.0.0.1:{server.port}", "us-east-1", "AKID", SECRET, "bucket", **options)


def page(keys: list[str], token: str | None = None) -> bytes:
    """A ListBucketResult body with URL-encoded keys, as S3 writes it for encoding-type=url."""
    contents = "".join(f"<Contents><Key>{quote_plus(k)}</Key><Size>1</Size></Contents>" for k in keys)
    more = (
        f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}</NextContinuationToken>"
        if token
        else ("<IsTruncated>false</IsTruncated>")
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"<Name>bucket</Name>{more}{contents}<EncodingType>url</EncodingType></ListBucketResult>"
    ).encode()


def answer(body: bytes, status: str = "200 OK", *extra: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in extra)
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


def chunked(body: bytes, size: int = 7, trailer: bytes = b"X-Trailer: yes\r\n") -> bytes:
    chunks = b"".join(
        b"%x;ext=1\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)
    )
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n" + trailer + b"\r\n"


KEYS = ["in/u/j/0.jpg", "in/u/j/a b+c=d ü.jpg"]


async def twice(listing: S3Listing, prefix: str = "in/") -> list[set[str]]:
    try:
        return [await listing.keys(prefix), await listing.keys(prefix)]
    finally:
        await listing.close()


# -- framings and kept-alive connections --------------------------------------------------------
def test_a_chunked_answer_is_read_whole_and_its_connection_serves_the_next(serve: Serve, run: Run) -> None:
    server = serve(lambda r: chunked(page(KEYS)))
    assert run(twice(listing_of(server))) == [set(KEYS), set(KEYS)]
    assert server.connections == 1 and len(server.requests) == 2


def test_a_content_length_answer_is_read_whole_and_its_connection_serves_the_next(serve: Serve, run: Run) -> None:
    server = serve(lambda r: answer(page(KEYS)))
    assert run(twice(listing_of(server))) == [set(KEYS), set(KEYS)]
    assert server.connections == 1 and len(server.requests) == 2
    request = server.requests[0]
    assert request.headers["host"] == f"127.0.0.1:{server.port}" and urlsplit(request.target).path == "/bucket"
    assert request.query["prefix"] == "in/" and request.query["list-type"] == "2"
    assert request.query["X-Amz-SignedHeaders"] == "host" and len(request.query["X-Amz-Signature"]) == 64


def test_an_informational_answer_before_the_answer_is_passed_over(serve: Serve, run: Run) -> None:
    server = serve(lambda r: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n" + answer(page(KEYS)))
    assert run(twice(listing_of(server))) == [set(KEYS), set(KEYS)]
    assert server.connections == 1


def test_connection_close_is_honoured(serve: Serve, run: Run) -> None:
    server = serve(lambda r: answer(page(KEYS), "200 OK", "Connection: close"))  # and keeps it open
    assert run(twice(listing_of(server))) == [set(KEYS), set(KEYS)]
    assert server.connections == 2 and [r.conn for r in server.requests] == [0, 1]


def test_an_answer_delimited_by_the_close_is_read_to_the_end(serve: Serve, run: Run) -> None:
    body = page(KEYS)
    server = serve(lambda r: Last(b"HTTP/1.1 200 OK\r\n\r\n" + body))
    assert run(twice(listing_of(server))) == [set(KEYS), set(KEYS)]
    assert server.connections == 2


def test_a_kept_connection_the_server_closed_is_retried_once_on_a_new_one(serve: Serve, run: Run) -> None:
    # The first connection answers once, then closes as the second request arrives (an idle
    # timeout racing the request); the new connection answers.
    server = serve(lambda r: None if (r.conn, len(server.requests)) == (0, 2) else answer(page(KEYS)))
    assert run(twice(listing_of(server))) == [set(KEYS), set(KEYS)]
    assert server.connections == 2 and [r.conn for r in server.requests] == [0, 0, 1]


def test_a_request_timeout_on_a_kept_connection_is_retried_on_a_new_one(serve: Serve, run: Run) -> None:
    timed_out = Last(answer(b"", "408 Request Timeout", "Connection: close"))
    server = serve(lambda r: timed_out if (r.conn, len(server.requests)) == (0, 2) else answer(page(KEYS)))
    assert run(twice(listing_of(server))) == [set(KEYS), set(KEYS)]
    assert server.connections == 2 and [r.conn for r in server.requests] == [0, 0, 1]


def test_a_stale_connection_is_retried_once_only(serve: Serve, run: Run) -> None:
    server = serve(lambda r: answer(page(KEYS)) if len(server.requests) == 1 else None)
    with pytest.raises(ListingFailed):
        run(twice(listing_of(server)))
    assert server.connections == 2 and [r.conn for r in server.requests] == [0, 0, 1]


def test_a_kept_connection_cut_in_the_middle_of_its_answer_fails_and_is_not_taken_for_stale(
        serve: Serve, run: Run) -> None:
    """A stale connection answers nothing; one that began an answer did read the request."""
    server = serve(lambda r: Last(b"HTTP/1.1 200 OK\r\nContent-Le") if (r.conn, len(server.requests)) == (0, 2)
                   else answer(page(KEYS)))
    with pytest.raises(ListingFailed, match="IncompleteReadError"):
        run(twice(listing_of(server)))
    assert server.connections == 1 and [r.conn for r in server.requests] == [0, 0]


def test_an_answer_without_a_body_is_not_waited_on_past_its_head(serve: Serve, run: Run) -> None:
    server = serve(lambda r: b"HTTP/1.1 204 No Content\r\n\r\n")  # and the connection stays open
    with pytest.raises(ListingFailed, match="answered 204"):
        run(listing_of(server, timeout_s=5).keys("in/"))


def test_a_new_connection_closed_unanswered_fails(serve: Serve, run: Run) -> None:
    server = serve(lambda r: None)
    with pytest.raises(ListingFailed, match="IncompleteReadError"):
        run(listing_of(server).keys("in/"))
    assert server.connections == 1


def test_each_event_loop_has_connections_of_its_own(serve: Serve, run: Run) -> None:
    server = serve(lambda r: answer(page(KEYS)))
    listing = listing_of(server)
    assert run(listing.keys("in/")) == set(KEYS)  # its loop ends with the connection kept
    assert run(twice(listing)) == [set(KEYS), set(KEYS)]
    assert server.connections == 2 and [r.conn for r in server.requests] == [0, 1, 1]


def test_at_most_max_idle_connections_are_kept(serve: Serve, run: Run) -> None:
    server = serve(lambda r: answer(page(KEYS)))
    listing = listing_of(server, max_idle=2)

    async def scenario() -> None:
        await asyncio.gather(*(listing.keys("in/") for _ in range(4)))  # four at once: four connections
        await asyncio.gather(*(listing.keys("in/") for _ in range(4)))  # two kept, two new
        await listing.close()

    run(scenario())
    assert server.connections == 6 and len(server.requests) == 8


# -- limits and failures ------------------------------------------------------------------------
def test_a_server_that_never_answers_times_out_and_the_connection_goes(serve: Serve, run: Run) -> None:
    server = serve(lambda r: HANG)
    started = time.monotonic()
    with pytest.raises(ListingFailed, match=r"took over 0\.2 s") as failed:
        run(listing_of(server, timeout_s=0.2).keys("in/"))
    assert 0.2 <= time.monotonic() - started < 5 and isinstance(failed.value.__cause__, TimeoutError)
    assert server.hung_up.wait(5)


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close"])
def test_an_oversized_answer_is_refused(serve: Serve, run: Run, framing: str) -> None:
    big = page([f"in/{i:06}" for i in range(2000)])
    assert len(big) > 64 * 1024
    framed: bytes | Last = {
        "content-length": answer(big),
        "chunked": chunked(big, 4096, trailer=b""),
        "close": Last(b"HTTP/1.1 200 OK\r\n\r\n" + big),
    }[framing]
    server = serve(lambda r: framed)
    listing = listing_of(server, max_answer_bytes=64 * 1024)
    with pytest.raises(ListingFailed, match="over 65536 bytes"):
        run(listing.keys("in/"))
    assert run(listing_of(server, max_answer_bytes=2 * len(big)).keys("in/")) == {f"in/{i:06}" for i in range(2000)}


def test_trailer_fields_without_end_are_refused_as_an_oversized_answer(serve: Serve, run: Run) -> None:
    endless = b"".join(b"X-Trailer-%d: %s\r\n" % (i, b"t" * 40) for i in range(2000))  # ~110 KB, each line short
    server = serve(lambda r: chunked(page(KEYS), trailer=endless))
    with pytest.raises(ListingFailed, match="over 65536 bytes"):
        run(listing_of(server, max_answer_bytes=64 * 1024).keys("in/"))


def test_an_s3_error_names_its_status_and_code_and_never_the_credentials(serve: Serve, run: Run) -> None:
    body = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Access Denied.</Message></Error>"
    server = serve(lambda r: answer(body, "403 Forbidden"))
    with pytest.raises(ListingFailed) as failed:
        run(listing_of(server).keys("in/"))
    assert (failed.value.status, failed.value.code) == (403, "AccessDenied")
    assert len(server.requests) == 1  # refused: not asked again
    assert "403 AccessDenied" in str(failed.value)
    assert not any(s in str(failed.value) for s in (SECRET, "AKID", "Signature", "X-Amz"))


def test_an_error_without_an_s3_body_names_its_status(serve: Serve, run: Run) -> None:
    server = serve(lambda r: answer(b"<html>bad gateway</html>", "502 Bad Gateway"))
    with pytest.raises(ListingFailed, match="502") as failed:
        run(listing_of(server).keys("in/"))
    assert (failed.value.status, failed.value.code) == (502, None)


@pytest.mark.parametrize(("status", "code"), [("503 Slow Down", "SlowDown"), ("500 Internal Error", "InternalError")])
def test_a_store_refusing_once_with_a_5xx_is_asked_again_and_twice_fails(
        serve: Serve, run: Run, status: str, code: str) -> None:
    refusal = f"<Error><Code>{code}</Code></Error>".encode()
    once = serve(lambda r: answer(refusal, status) if len(once.requests) == 1 else answer(page(KEYS)))
    assert run(listing_of(once).keys("in/")) == set(KEYS)
    assert len(once.requests) == 2
    always = serve(lambda r: answer(refusal, status))
    with pytest.raises(ListingFailed, match=f"{status[:3]} {code}"):
        run(listing_of(always).keys("in/"))
    assert len(always.requests) == 2


@pytest.mark.parametrize("framing", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nabc\r\n0\r\n\r\n",
    "HTTP/1.1 200 OK\r\nContent-Length: \u00b2\r\n\r\nab".encode(),
    b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
], ids=["negative-chunk", "superscript-length", "5000-digit-length"])
def test_a_malformed_framing_fails_as_a_listing_failure(serve: Serve, run: Run, framing: bytes) -> None:
    server = serve(lambda r: Last(framing))
    with pytest.raises(ListingFailed, match="malformed"):
        run(listing_of(server).keys("in/"))


def test_at_most_max_connections_requests_are_in_flight_on_a_loop(serve: Serve, run: Run) -> None:
    server = serve(lambda r: answer(page(KEYS)))
    listing = listing_of(server, max_connections=2)

    async def scenario() -> list[set[str]]:
        try:
            return list(await asyncio.gather(*(listing.keys("in/") for _ in range(6))))
        finally:
            await listing.close()

    assert run(scenario()) == [set(KEYS)] * 6
    assert server.connections == 2 and len(server.requests) == 6


@pytest.mark.parametrize("status_line", [b"SSH-2.0-OpenSSH", b"ICY 200 OK", b"HTTP/2.0 200 OK"])
def test_an_answer_that_is_not_http_fails(serve: Serve, run: Run, status_line: bytes) -> None:
    body = page(KEYS)
    server = serve(lambda r: status_line + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    with pytest.raises(ListingFailed, match="HTTP"):
        run(listing_of(server).keys("in/"))


def test_a_200_that_is_not_a_listing_fails_instead_of_reading_as_no_keys(serve: Serve, run: Run) -> None:
    server = serve(lambda r: answer(b"<?xml version='1.0'?><Error><Code>InternalError</Code></Error>"))
    with pytest.raises(ListingFailed, match="other than a ListBucketResult"):
        run(listing_of(server).keys("in/"))


def test_a_chunk_not_followed_by_its_crlf_fails(serve: Serve, run: Run) -> None:
    server = serve(lambda r: Last(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n<a>XY0\r\n\r\n"))
    with pytest.raises(ListingFailed, match="without its CRLF"):
        run(listing_of(server).keys("in/"))


# -- pages --------------------------------------------------------------------------------------
def test_a_truncated_listing_goes_on_with_its_continuation_token(serve: Serve, run: Run) -> None:
    pages = {
        None: page(KEYS, token="tok/1=="),
        "tok/1==": page(["in/v/w/z.jpg"], token="tok+2"),
        "tok+2": page(["in/v/w/zz.jpg"]),
    }
    server = serve(lambda r: answer(pages[r.query.get("continuation-token")]))
    assert run(listing_of(server, max_keys=2).keys("in/")) == {*KEYS, "in/v/w/z.jpg", "in/v/w/zz.jpg"}
    assert [r.query.get("continuation-token") for r in server.requests] == [None, "tok/1==", "tok+2"]
    assert {(r.query["prefix"], r.query["max-keys"]) for r in server.requests} == {("in/", "2")}
    assert server.connections == 1


def test_a_truncated_page_without_its_continuation_token_fails_instead_of_passing_for_the_last(
        serve: Serve, run: Run) -> None:
    """Read as the last page, it would leave out every key after it: an upload that is there
    would be missing."""
    tokenless = page(KEYS, token="t").replace(b"<NextContinuationToken>t</NextContinuationToken>", b"")
    server = serve(lambda r: answer(tokenless))
    with pytest.raises(ListingFailed, match="without a continuation token"):
        run(listing_of(server).keys("in/"))


def test_a_store_that_repeats_its_continuation_token_fails_instead_of_looping(serve: Serve, run: Run) -> None:
    # past the second page, a 500: without the check the listing fails otherwise, rather than hang
    server = serve(lambda r: answer(page(KEYS, token="again")) if len(server.requests) <= 2
                   else answer(b"", "500 Internal Server Error"))
    with pytest.raises(ListingFailed, match="same continuation token"):
        run(listing_of(server).keys("in/"))
    assert [r.query.get("continuation-token") for r in server.requests] == [None, "again"]


@pytest.mark.parametrize("max_keys", [0, -1, 1001, 10**6])
def test_a_page_size_s3_does_not_serve_is_refused_when_the_listing_is_made(max_keys: int) -> None:
    with pytest.raises(ValueError, match="max_keys"):
        S3Listing("http://127.0.0.1:8333", "us-east-1", "AKID", SECRET, "b", max_keys=max_keys)
    for bound in (1, 1000):
        assert S3Listing("http://127.0.0.1:8333", "us-east-1", "AKID", SECRET, "b", max_keys=bound).max_keys == bound


def test_sizes_of_lists_the_common_prefix_once_and_leaves_the_absent_keys_out(serve: Serve, run: Run) -> None:
    server = serve(lambda r: answer(page(["in/u/j/1.jpg", "in/u/j/3.jpg", "in/u/j/30.jpg"])))
    wanted = [f"in/u/j/{i}.jpg" for i in range(5)]
    assert set(run(listing_of(server).sizes_of(wanted))) == {"in/u/j/1.jpg", "in/u/j/3.jpg"}
    assert [r.query["prefix"] for r in server.requests] == ["in/u/j/"]
    assert run(listing_of(server).sizes_of([])) == {} and len(server.requests) == 1


# -- the signature ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:8333",
        "https://s3.example.com",
        "https://s3.example.com:443",
        "http://store:80/base",
        "http://[::1]:9000",
    ],
)
@pytest.mark.parametrize(
    ("prefix", "token"),
    [("in/u/j/", None), ("", None), ("in/ü a+b/c=d~e%f", None), ("in/u j/", "1/ab+c/d=="), ("x", "tok en ü~")],
)
def test_a_list_request_is_signed_as_botocore_signs_it(endpoint: str, prefix: str, token: str | None) -> None:
    settings = Settings(
        s3_endpoint=endpoint,
        s3_access_key="AKID/x+y",
        s3_secret_key="secret/+=",
        s3_region="eu-west-1",
        s3_bucket="palette-images",
    )
    now = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    params: dict[str, Any] = {"Bucket": "palette-images", "Prefix": prefix, "MaxKeys": 1000}
    if token is not None:
        params["ContinuationToken"] = token
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=now.replace(tzinfo=None)):
        expected = urlsplit(s3_client(settings).generate_presigned_url("list_objects_v2", Params=params, ExpiresIn=900))
    mine = urlsplit(S3Listing.from_settings(settings).target(prefix, token, now))
    assert mine.path == expected.path
    assert sorted(mine.query.split("&")) == sorted(expected.query.split("&"))  # the signature among them


def test_the_signing_key_follows_the_utc_date() -> None:
    listing = S3Listing("http://127.0.0.1:8333", "us-east-1", "AKID", SECRET, "b")
    one, two = datetime(2026, 1, 1, 23, 59, 59, tzinfo=UTC), datetime(2026, 1, 2, 0, 0, 1, tzinfo=UTC)
    signed = [listing.target("p", None, t) for t in (one, two, one)]
    assert signed[0] == signed[2] != signed[1]
    assert signed[1] == S3Listing("http://127.0.0.1:8333", "us-east-1", "AKID", SECRET, "b").target("p", None, two)
