"""The application's ObjectStore port on S3, and removing stored objects by prefix (a deleted or
expired job, an erased user): listed page by page and deleted a thousand keys per request, so a
prefix of any size costs bounded memory."""

from __future__ import annotations

import os.path
import time
from collections.abc import Iterable, Sequence
from typing import Any

import anyio.to_thread

from adapters.s3_listing import S3Listing

PAGE = 1000  # S3's most keys per DeleteObjects request
# The codes of a key S3 failed to delete, as a 5xx would say it (it did not manage, not: it refuses us).
FAILED_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown"})


class NotDeleted(OSError):
    """Objects a DeleteObjects answered with an error for; ``codes``: the codes S3 gave them."""

    def __init__(self, message: str, codes: frozenset[str]) -> None:
        super().__init__(message)
        self.codes = codes


class OutOfTime(Exception):
    """A deletion stopped at its deadline with ``deleted`` objects gone; running it again finishes it."""

    def __init__(self, deleted: int) -> None:
        super().__init__(f"{deleted} object(s) deleted before the deadline")
        self.deleted = deleted


def delete_keys(s3: Any, bucket: str, keys: list[str]) -> None:
    """Delete these objects, a thousand a request (one already gone is no error)."""
    for start in range(0, len(keys), PAGE):
        _delete_page(s3, bucket, [{"Key": k} for k in keys[start:start + PAGE]], "the objects asked")


def _delete_page(s3: Any, bucket: str, keys: list[dict[str, str]], where: str) -> None:
    answer = s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    failed = answer.get("Errors", [])
    if failed:
        raise NotDeleted(f"{len(failed)} object(s) under {where} not deleted: {failed[0].get('Code')}",
                         frozenset(str(e.get("Code")) for e in failed))


def delete_prefixes(s3: Any, bucket: str, prefixes: Iterable[str], deadline: float | None = None) -> int:
    """Delete every object under ``prefixes``; returns how many went. Deleting what is already
    gone is no error, so a deletion cut short is finished by running it again. Past ``deadline``
    (``time.monotonic``), OutOfTime before the next page: a page deletes about a thousand a second."""
    return delete_larger(s3, bucket, prefixes, -1, deadline)


def delete_larger(s3: Any, bucket: str, prefixes: Iterable[str], limit: int, deadline: float | None = None) -> int:
    """Delete the objects under ``prefixes`` larger than ``limit`` bytes (-1: all); returns how
    many went."""
    deleted, listed = 0, False
    for prefix in prefixes:
        token: str | None = None
        while True:
            if listed and deadline is not None and time.monotonic() >= deadline:
                raise OutOfTime(deleted)
            listed = True
            page = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=PAGE,
                                      **({"ContinuationToken": token} if token else {}))
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", []) if obj.get("Size", 0) > limit]
            if keys:
                _delete_page(s3, bucket, keys, prefix)
                deleted += len(keys)
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
    return deleted


class S3ObjectStore:
    """The application's ObjectStore port on S3: boto3 on a thread, or ``listing`` on an event
    loop (a LIST there costs a seventh of boto3's CPU, and no thread)."""

    def __init__(self, client: Any, bucket: str, listing: S3Listing | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.listing = listing

    def sizes(self, keys: Sequence[str]) -> dict[str, int]:
        """One LIST per common prefix instead of a HEAD per key (a 200-item job: 1 call, not 200)."""
        if not keys:
            return {}
        prefix = os.path.commonprefix(list(keys))  # noqa: RUF071 - key prefixes, not paths
        wanted, found = set(keys), {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            found.update({obj["Key"]: int(obj["Size"]) for obj in page.get("Contents", []) if obj["Key"] in wanted})
        return found

    async def sizes_async(self, keys: Sequence[str]) -> dict[str, int]:
        if self.listing is None:
            return await anyio.to_thread.run_sync(self.sizes, keys)
        return await self.listing.sizes_of(keys)

    def delete(self, keys: Sequence[str]) -> None:
        delete_keys(self.client, self.bucket, list(keys))
