"""Removing stored objects by prefix (a deleted or expired job, an erased user): listed page by
page and deleted a thousand keys per request, so a prefix of any size costs bounded memory."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PAGE = 1000  # S3's most keys per DeleteObjects request


def delete_keys(s3: Any, bucket: str, keys: list[str]) -> None:
    """Delete these objects, a thousand a request (one already gone is no error)."""
    for start in range(0, len(keys), PAGE):
        _delete_page(s3, bucket, [{"Key": k} for k in keys[start:start + PAGE]], "the objects asked")


def _delete_page(s3: Any, bucket: str, keys: list[dict[str, str]], where: str) -> None:
    answer = s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    failed = answer.get("Errors", [])
    if failed:
        raise OSError(f"{len(failed)} object(s) under {where} not deleted: {failed[0].get('Code')}")


def delete_prefixes(s3: Any, bucket: str, prefixes: Iterable[str]) -> int:
    """Delete every object under ``prefixes``; returns how many went. Deleting what is already
    gone is no error, so a deletion cut short is finished by running it again."""
    return delete_larger(s3, bucket, prefixes, -1)


def delete_larger(s3: Any, bucket: str, prefixes: Iterable[str], limit: int) -> int:
    """Delete the objects under ``prefixes`` larger than ``limit`` bytes (-1: all); returns how
    many went."""
    deleted = 0
    for prefix in prefixes:
        token: str | None = None
        while True:
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
