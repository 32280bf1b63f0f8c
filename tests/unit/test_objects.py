"""Deleting objects when S3 answers a deletion with per-key errors (a 200 that names the keys it
kept): the caller must learn of it, or a job's or an erased user's photos stay behind unseen."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.objects import delete_keys, delete_prefixes


class _RefusingS3:
    """An S3 client whose DeleteObjects keeps ``refused`` (AccessDenied), as a bucket policy or
    an object lock would; it lists what it holds, one page."""

    def __init__(self, keys: list[str], refused: set[str]) -> None:
        self.keys, self.refused = set(keys), refused

    def list_objects_v2(self, Bucket: str, Prefix: str, **_: Any) -> dict[str, Any]:
        return {"Contents": [{"Key": k, "Size": 1} for k in sorted(self.keys) if k.startswith(Prefix)],
                "IsTruncated": False}

    def delete_objects(self, Bucket: str, Delete: dict[str, Any]) -> dict[str, Any]:
        asked = [o["Key"] for o in Delete["Objects"]]
        self.keys -= set(asked) - self.refused
        return {"Errors": [{"Key": k, "Code": "AccessDenied"} for k in asked if k in self.refused]}


def test_a_key_s3_refuses_to_delete_under_a_prefix_is_an_error_not_a_silent_success():
    s3 = _RefusingS3(["inputs/u/j/0.jpg", "inputs/u/j/1.jpg"], refused={"inputs/u/j/1.jpg"})
    with pytest.raises(OSError, match="AccessDenied"):
        delete_prefixes(s3, "bucket", ["inputs/u/j/"])
    assert s3.keys == {"inputs/u/j/1.jpg"}


def test_a_named_key_s3_refuses_to_delete_is_an_error():
    s3 = _RefusingS3(["inputs/u/j/0.jpg"], refused={"inputs/u/j/0.jpg"})
    with pytest.raises(OSError, match="AccessDenied"):
        delete_keys(s3, "bucket", ["inputs/u/j/0.jpg"])
