"""S3 ListObjectsV2 on the event loop: the keys under a prefix, asked over HTTP/1.1 with no thread
and no boto3.

boto3 spends ~3 ms of CPU on an empty LIST and ~35 ms on one of 200 keys (its request pipeline,
signer and parser), in a worker thread; here a page costs one SigV4 query signature (one SHA-256,
one HMAC), one request on a connection the running loop keeps alive and one ElementTree parse:
~0.35 and ~2.5 ms."""

from __future__ import annotations

import asyncio
import contextlib
import os.path
import random
import re
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import quote, unquote_plus, urlsplit

from adapters.per_loop import of_running_loop
from adapters.s3_signing import signature, signed_host, signing_scope
from adapters.settings import Settings

S3 = "{http://s3.amazonaws.com/doc/2006-03-01/}"  # the namespace of S3's answers, in Clark notation
HEAD_LIMIT = 64 * 1024  # the longest status line and headers read (the stream reader's limit)
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,12}")
RETRY_PAUSE_S = (0.05, 0.25)  # before the one retry of a LIST the store refused (5xx) or never answered


class ListingFailed(Exception):
    """A LIST did not succeed: S3 answered an error (``status``, its ``code``), broke HTTP, took
    too long or could not be reached. The message never holds the request (it is signed)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 retriable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retriable = retriable  # worth asking once more: a 5xx, a timeout, a network error


class _Stale(Exception):
    """A kept-alive connection the server had closed: the request may go once more, on a new one."""


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof() and self.reader.exception() is None

    def close(self) -> None:
        self.writer.close()


class _LoopState:
    """One event loop's kept-alive connections, and its requests in flight (at most ``slots``)."""

    def __init__(self, max_connections: int) -> None:
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(max_connections)


class S3Listing:
    """The keys of one bucket under a prefix, page by page (``max_keys`` a page). Requests are
    signed as boto3's ``generate_presigned_url("list_objects_v2")`` signs them (SigV4 query auth,
    path-style, host signed, unsigned payload; keys URL-encoded in the answer, as boto3 asks, so
    that any key survives XML). Each event loop keeps up to ``max_idle`` connections alive; one the
    server closed meanwhile is retried once on a new connection, and a LIST the store refused with
    a 5xx or never answered is asked once more. At most ``max_connections`` requests are in flight
    on a loop. A request (waiting for a connection, connect, send, answer) takes at most
    ``timeout_s``; an answer over ``max_answer_bytes`` is refused."""

    def __init__(
        self,
        endpoint: str,
        region: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        max_keys: int = 1000,
        timeout_s: float = 10.0,
        max_answer_bytes: int = 8 << 20,
        max_idle: int = 8,
        max_connections: int = 16,
        expires_s: int = 900,
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the S3 endpoint must be an http(s) URL with a host")
        if not 1 <= max_keys <= 1000:
            raise ValueError("max_keys must be within 1..1000 (S3 answers at most 1000 a page)")
        default_port = 443 if parts.scheme == "https" else 80
        host = signed_host(parts)
        self.bucket = bucket
        self.max_keys = max_keys
        self.timeout_s = timeout_s
        self.max_answer_bytes = max_answer_bytes
        self.max_idle = max_idle
        self.max_connections = max_connections
        self._hostname = parts.hostname
        self._port = parts.port or default_port
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._host = host
        self._path = quote(f"{parts.path.rstrip('/')}/{bucket}", safe="/~")
        self._region = region
        self._access_key = access_key
        self._secret_key = secret_key
        self._expires = str(expires_s)
        self._signing: tuple[str, str, str, bytes] = ("", "", "", b"")  # see _day
        self._by_loop: dict[asyncio.AbstractEventLoop, _LoopState] = {}

    @classmethod
    def from_settings(cls, settings: Settings, *, max_keys: int = 1000, timeout_s: float = 10.0) -> S3Listing:
        return cls(
            settings.effective_s3_endpoint,
            settings.s3_region,
            settings.s3_access_key,
            settings.s3_secret_key,
            settings.s3_bucket,
            max_keys=max_keys,
            timeout_s=timeout_s,
        )

    async def keys(self, prefix: str) -> set[str]:
        """Every key under ``prefix``, following the continuation tokens of truncated pages."""
        return set(await self.sizes(prefix))

    async def sizes(self, prefix: str) -> dict[str, int]:
        """The size in bytes of every key under ``prefix`` (``keys``, with the sizes)."""
        found: dict[str, int] = {}
        token: str | None = None
        while True:
            body = await self._get(self.target(prefix, token, datetime.now(UTC)))
            page, after = _page(body)
            found.update(page)
            if after is None:
                return found
            if after == token:  # as boto3's paginator: a store repeating itself would never end
                raise ListingFailed("S3 answered the same continuation token twice")
            token = after

    async def sizes_of(self, keys: Sequence[str]) -> dict[str, int]:
        """The size of each key of ``keys`` in the store (an absent one: not in the answer): one
        listing of their common prefix (a 200-item job: one request), not a HEAD per key."""
        if not keys:
            return {}
        present = await self.sizes(os.path.commonprefix(list(keys)))  # noqa: RUF071 - key prefixes, not paths
        return {k: present[k] for k in keys if k in present}

    async def close(self) -> None:
        """Close the running loop's idle connections (a later call opens new ones)."""
        here = self._by_loop.pop(asyncio.get_running_loop(), None)
        idle = here.idle if here is not None else []
        for conn in idle:
            conn.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):  # a TLS peer that never acknowledges the close
                for conn in idle:
                    await conn.writer.wait_closed()

    def target(self, prefix: str, continuation: str | None, now: datetime) -> str:
        """The signed request target (path and query) of the page of ``prefix`` after
        ``continuation`` (None: the first), at ``now``."""
        stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        scope, credential, key = self._day(stamp[:8])
        # SigV4's canonical query: URI-encoded names and values, sorted by name (byte order), as
        # written here; the same string is sent.
        token = "" if continuation is None else f"&continuation-token={quote(continuation, safe='-_.~')}"
        query = (
            f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={credential}&X-Amz-Date={stamp}"
            f"&X-Amz-Expires={self._expires}&X-Amz-SignedHeaders=host{token}"
            f"&encoding-type=url&list-type=2&max-keys={self.max_keys}&prefix={quote(prefix, safe='-_.~')}"
        )
        canonical = f"GET\n{self._path}\n{query}\nhost:{self._host}\n\nhost\nUNSIGNED-PAYLOAD"
        return f"{self._path}?{query}&X-Amz-Signature={signature(key, stamp, scope, canonical)}"

    def _day(self, day: str) -> tuple[str, str, bytes]:
        """The credential scope of the UTC date ``day``, its URI-encoded credential and its signing
        key: derived once a day."""
        cached = self._signing
        if cached[0] != day:
            cached = self._signing = (day, *signing_scope(self._access_key, self._secret_key, self._region, day))
        return cached[1], cached[2], cached[3]

    # -- HTTP/1.1 ------------------------------------------------------------------------------
    def _here(self) -> _LoopState:
        """The running loop's kept connections and request slots."""
        return of_running_loop(self._by_loop, lambda: _LoopState(self.max_connections))

    async def _get(self, target: str) -> bytes:
        """The body of a 200 answer to GET ``target``, asked once more (after a short pause) when
        the store answered 5xx or could not be reached, as boto3's standard retry mode does."""
        try:
            return await self._get_once(target)
        except ListingFailed as e:
            if not e.retriable:
                raise
        await asyncio.sleep(random.uniform(*RETRY_PAUSE_S))
        return await self._get_once(target)

    async def _get_once(self, target: str) -> bytes:
        request = f"GET {target} HTTP/1.1\r\nHost: {self._host}\r\nAccept-Encoding: identity\r\n\r\n".encode()
        try:
            async with asyncio.timeout(self.timeout_s), self._here().slots:
                status, body = await self._answer(request)
        except TimeoutError as e:
            raise ListingFailed(f"S3 LIST in bucket {self.bucket!r} took over {self.timeout_s} s",
                                retriable=True) from e
        except (OSError, EOFError, asyncio.LimitOverrunError) as e:
            raise ListingFailed(f"S3 LIST in bucket {self.bucket!r} failed ({type(e).__name__}: {e})",
                                retriable=isinstance(e, OSError)) from e
        if status != 200:
            code = _error_code(body)
            raise ListingFailed(
                f"S3 LIST in bucket {self.bucket!r} answered {status} {code or '(no code)'}", status, code,
                retriable=status >= 500,
            )
        return body

    async def _answer(self, request: bytes) -> tuple[int, bytes]:
        idle = self._here().idle
        while idle:
            conn = idle.pop()  # the most recent: the least likely to have been closed
            if not conn.usable():
                conn.close()
                continue
            try:
                return await self._exchange(conn, request, reused=True)
            except _Stale:
                # Closed by the server meanwhile: once more, on a new connection. The connections
                # kept idle longer went the same way (most likely), so they go too.
                for old in idle:
                    old.close()
                idle.clear()
                break
        reader, writer = await asyncio.open_connection(
            self._hostname,
            self._port,
            ssl=self._tls,
            server_hostname=self._hostname if self._tls else None,
            limit=HEAD_LIMIT,
        )
        return await self._exchange(_Connection(reader, writer), request, reused=False)

    async def _exchange(self, conn: _Connection, request: bytes, *, reused: bool) -> tuple[int, bytes]:
        try:
            try:
                conn.writer.write(request)
                await conn.writer.drain()
                head = await conn.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                if reused and not e.partial:
                    raise _Stale from e
                raise
            except (ConnectionResetError, BrokenPipeError) as e:
                # A reset as the request arrives is how a closed keep-alive connection shows too.
                if reused:
                    raise _Stale from e
                raise
            while head[9:10] == b"1":  # 1xx: informational, the answer follows
                head = await conn.reader.readuntil(b"\r\n\r\n")
            status, keep_alive, body = await self._rest(conn.reader, head)
            if status == 408 and reused:  # "Request Timeout": the server's word that it closed an idle one
                raise _Stale
        except BaseException:
            conn.close()
            raise
        idle = self._here().idle
        if keep_alive and len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.close()
        return status, body

    async def _rest(self, reader: asyncio.StreamReader, head: bytes) -> tuple[int, bool, bytes]:
        """The status, whether the connection may serve another request, and the body."""
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if version not in ("HTTP/1.1", "HTTP/1.0") or not code.isdigit():
            raise ListingFailed("S3 answered something other than HTTP/1.x")
        status = int(code)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, colon, value = line.partition(":")
                if not colon:
                    raise ListingFailed("S3 answered a malformed header line")
                headers[name.strip().lower()] = value.strip()
        connection = {t.strip() for t in headers.get("connection", "").lower().split(",")}
        keep_alive = version == "HTTP/1.1" and "close" not in connection
        if status in (204, 304):
            return status, keep_alive, b""
        if "transfer-encoding" in headers:
            if headers["transfer-encoding"].lower().rpartition(",")[2].strip() != "chunked":
                raise ListingFailed("S3 answered a transfer encoding other than chunked")
            return status, keep_alive, await self._chunked(reader)
        if "content-length" in headers:
            length = headers["content-length"]
            if not (length.isascii() and length.isdigit() and len(length) <= 12):
                raise ListingFailed("S3 answered a malformed Content-Length")
            self._check_size(int(length))
            return status, keep_alive, await reader.readexactly(int(length))
        return status, False, await self._until_eof(reader)  # delimited by the close

    async def _chunked(self, reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            size_field = line.partition(b";")[0].strip()
            if not CHUNK_SIZE.fullmatch(size_field):
                raise ListingFailed("S3 answered a malformed chunk size")
            chunk = int(size_field, 16)
            if chunk == 0:
                break
            size += chunk
            self._check_size(size)
            parts.append(await reader.readexactly(chunk))
            if await reader.readexactly(2) != b"\r\n":
                raise ListingFailed("S3 answered a chunk without its CRLF")
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":  # trailer fields, ignored
            size += len(line)
            self._check_size(size)
        return b"".join(parts)

    async def _until_eof(self, reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        size = 0
        while chunk := await reader.read(64 * 1024):
            size += len(chunk)
            self._check_size(size)
            parts.append(chunk)
        return b"".join(parts)

    def _check_size(self, size: int) -> None:
        if size > self.max_answer_bytes:
            raise ListingFailed(f"S3 answered over {self.max_answer_bytes} bytes to a LIST; refused")


def _page(body: bytes) -> tuple[list[tuple[str, int]], str | None]:
    """The keys of a ListBucketResult with their sizes, and its continuation token (None: the
    last page)."""
    try:
        # The answer comes from our own store and is capped in size; expat (>= 2.4) bounds entity
        # expansion and never fetches external entities.
        root = ET.fromstring(body)  # noqa: S314
    except ET.ParseError:
        raise ListingFailed("S3 answered a LIST with malformed XML") from None
    if root.tag != S3 + "ListBucketResult":
        raise ListingFailed("S3 answered a LIST with something other than a ListBucketResult")
    # Plain (Clark-notation) tags: ElementTree looks them up among the children in C, where a
    # path goes through ElementPath in Python.
    contents = root.findall(S3 + "Contents")
    keys = [c.findtext(S3 + "Key", "") for c in contents]
    if root.findtext(S3 + "EncodingType") == "url":
        keys = [unquote_plus(k) for k in keys]
    try:
        sizes = [int(c.findtext(S3 + "Size") or 0) for c in contents]
    except ValueError:
        raise ListingFailed("S3 answered a LIST with a size that is not a number") from None
    pairs = list(zip(keys, sizes, strict=True))
    if root.findtext(S3 + "IsTruncated") != "true":
        return pairs, None
    token = root.findtext(S3 + "NextContinuationToken")
    if not token:
        raise ListingFailed("S3 answered a truncated LIST without a continuation token")
    return pairs, token


def _error_code(body: bytes) -> str | None:
    """The ``Code`` of an S3 ``<Error>`` body (None: not one)."""
    try:
        root = ET.fromstring(body)  # noqa: S314 - see _page
    except ET.ParseError:
        return None
    return root.findtext("Code") or root.findtext(S3 + "Code")
