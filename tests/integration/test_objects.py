"""Removing a job's or a user's objects from the real S3 store, and the sizes confirm-upload reads."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from adapters.objects import PAGE, S3ObjectStore, delete_keys, delete_larger, delete_prefixes
from domain.contracts.keys import (
    input_key,
    inputs_prefix,
    job_prefixes,
    mask_key,
    output_key,
    preview_key,
    user_prefixes,
)
from infra.s3 import s3_client


def _keys(s3, bucket, prefix):  # type: ignore[no-untyped-def]
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_a_jobs_objects_go_page_by_page_and_nothing_else_does(settings):
    s3, bucket = s3_client(settings, max_pool=16), settings.s3_bucket
    user, job, other_job = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    mine = [input_key(user, job, i) for i in range(1205)]  # more than one page of 1,000
    mine += [output_key(user, job, 0), preview_key(user, job, 0), mask_key(user, job, 0, "wall")]
    others = [input_key(user, other_job, 0), output_key(user, other_job, 0)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=b"x"), [*mine, *others]))
    empty = mask_key(user, job, 1, "floor")  # an object of no bytes (an upload link takes one) goes too
    s3.put_object(Bucket=bucket, Key=empty, Body=b"")
    mine.append(empty)
    assert delete_prefixes(s3, bucket, job_prefixes(user, job)) == len(mine)
    assert all(_keys(s3, bucket, p) == set() for p in job_prefixes(user, job))
    assert set().union(*(_keys(s3, bucket, p) for p in user_prefixes(user))) == set(others)
    assert delete_prefixes(s3, bucket, job_prefixes(user, job)) == 0  # again: nothing left, no error
    assert delete_prefixes(s3, bucket, user_prefixes(user)) == len(others)


class _CountedLists:
    """The real S3 client, its LIST requests counted (to bound them: a walk that loses its place
    in a listing would list the same page for ever)."""

    def __init__(self, s3: Any, most: int) -> None:
        self.s3, self.most, self.lists = s3, most, 0

    def list_objects_v2(self, **kw: Any) -> Any:
        self.lists += 1
        assert self.lists <= self.most, "listed the same objects again and again"
        return self.s3.list_objects_v2(**kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.s3, name)


def test_objects_over_a_size_go_from_a_prefix_of_more_than_a_page_and_the_rest_stays(settings):
    s3, bucket = s3_client(settings, max_pool=16), settings.s3_bucket
    user, job = uuid.uuid4(), uuid.uuid4()
    small = [input_key(user, job, i) for i in range(PAGE + 5)]  # more than a page under the limit
    large = [input_key(user, job, i) for i in (PAGE + 5, PAGE + 6)]  # sorted after them: the second page
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=b"x" * (9 if k in large else 8)),
                      [*small, *large]))
    try:
        counted = _CountedLists(s3, most=4)
        assert delete_larger(counted, bucket, [inputs_prefix(user, job)], 8) == len(large)
        assert _keys(s3, bucket, inputs_prefix(user, job)) == set(small)
    finally:
        delete_prefixes(s3, bucket, user_prefixes(user))


def test_deleting_named_keys_takes_every_one_past_a_page_and_nothing_else(settings):
    s3, bucket = s3_client(settings, max_pool=16), settings.s3_bucket
    user, job = uuid.uuid4(), uuid.uuid4()
    named = [input_key(user, job, i) for i in range(PAGE + 2)]
    kept = input_key(user, job, PAGE + 2)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=b"x"), [*named, kept]))
    try:
        delete_keys(s3, bucket, named)
        assert _keys(s3, bucket, inputs_prefix(user, job)) == {kept}
        S3ObjectStore(s3, bucket).delete([kept])
        assert _keys(s3, bucket, inputs_prefix(user, job)) == set()
    finally:
        delete_prefixes(s3, bucket, user_prefixes(user))


def test_the_store_gives_the_sizes_of_the_keys_asked_that_exist_and_of_no_other(settings):
    s3, bucket = s3_client(settings), settings.s3_bucket
    user, job = uuid.uuid4(), uuid.uuid4()
    sizes = {input_key(user, job, 0): 3, input_key(user, job, 1): 5, input_key(user, job, 2): 0}
    unasked = input_key(user, job, 3)
    for key, size in {**sizes, unasked: 7}.items():
        s3.put_object(Bucket=bucket, Key=key, Body=b"x" * size)
    asked = [*sizes, input_key(user, job, 4)]  # the last never uploaded
    store = S3ObjectStore(s3, bucket)  # no listing: boto3, on a thread from an event loop
    try:
        assert store.sizes(asked) == sizes
        assert asyncio.run(store.sizes_async(asked)) == sizes
        assert store.sizes([]) == {}
    finally:
        delete_prefixes(s3, bucket, user_prefixes(user))
