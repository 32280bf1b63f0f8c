"""S3Listing against the real S3 store (SeaweedFS): the keys it lists page by page are the ones
boto3's paginator lists, and ``missing`` names exactly the keys that were never put."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import uvloop

from adapters.objects import delete_prefixes
from adapters.s3_listing import ListingFailed, S3Listing
from adapters.settings import Settings
from infra.s3 import s3_client

ODD = ["a b.jpg", "a+b.jpg", "a%2Bb.jpg", "ü/é 漢字.jpg", "k=v&x=y.jpg", "tilde~star*(1).jpg", "sp  ace .jpg"]


def test_the_listing_is_boto3s_page_after_page_and_missing_names_what_was_never_put(settings: Settings) -> None:
    s3, bucket = s3_client(settings, max_pool=16), settings.s3_bucket
    root = f"listing-{uuid.uuid4().hex}/"
    prefix = f"{root}job/"
    wanted = [f"{prefix}in/{i:05}.jpg" for i in range(2100)] + [f"{prefix}in/{name}" for name in ODD]
    left_out = {wanted[7], wanted[1000], wanted[2099], f"{prefix}in/a+b.jpg", f"{prefix}in/ü/é 漢字.jpg"}
    siblings = [f"{root}jobs/in/00000.jpg", f"{root}job-2/in/00001.jpg", f"{root}jo/in/a b.jpg"]
    put = [k for k in wanted if k not in left_out] + siblings
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=b"x"), put))
    try:
        pages = list(s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix))
        by_boto3 = {o["Key"] for page in pages for o in page.get("Contents", [])}
        assert len(pages) == 3 and by_boto3 == set(wanted) - left_out

        async def scenario() -> tuple[set[str], list[str], set[str]]:
            listing = S3Listing.from_settings(settings, max_keys=1000)
            try:
                present = await listing.sizes_of(wanted)
                return (await listing.keys(prefix), [k for k in wanted if k not in present], await listing.keys(root))
            finally:
                await listing.close()

        keys, missing, everything = uvloop.run(scenario())
        assert keys == by_boto3
        assert missing == [k for k in wanted if k in left_out]
        assert everything == set(put)
    finally:
        delete_prefixes(s3, bucket, [root])


def test_a_listing_with_wrong_credentials_fails_naming_the_s3_error(settings: Settings) -> None:
    wrong = S3Listing(
        settings.effective_s3_endpoint, settings.s3_region, settings.s3_access_key, "not-the-secret", settings.s3_bucket
    )

    async def scenario() -> None:
        try:
            await wrong.keys("in/")
        finally:
            await wrong.close()

    with pytest.raises(ListingFailed) as failed:
        asyncio.run(scenario())
    assert failed.value.status == 403 and failed.value.code == "SignatureDoesNotMatch"
    assert "not-the-secret" not in str(failed.value)
