"""Removing a job's or a user's objects from the real S3 store."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

from adapters.objects import delete_prefixes
from domain.contracts.keys import input_key, job_prefixes, mask_key, output_key, preview_key, user_prefixes
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
    assert delete_prefixes(s3, bucket, job_prefixes(user, job)) == len(mine)
    assert all(_keys(s3, bucket, p) == set() for p in job_prefixes(user, job))
    assert set().union(*(_keys(s3, bucket, p) for p in user_prefixes(user))) == set(others)
    assert delete_prefixes(s3, bucket, job_prefixes(user, job)) == 0  # again: nothing left, no error
    assert delete_prefixes(s3, bucket, user_prefixes(user)) == len(others)
