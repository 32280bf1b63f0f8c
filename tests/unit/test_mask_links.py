"""The API side of masks back to the client, without I/O: presigned PUT URLs for masks equal
boto3's, a done item links its used masks and instances (other items link none, as before),
and a new job made from a finished one copies its inputs and the masks there are."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from unittest import mock

import botocore.auth
import pytest

from adapters.api.routes_jobs import _job_public, _rerun_copies
from adapters.s3_signing import PutUrls
from adapters.settings import Settings
from application.services import RerunSource
from domain.contracts.keys import input_key, mask_key, used_mask_key
from domain.job import Job
from infra.s3 import s3_client

NOW = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)


def settings() -> Settings:
    return Settings(s3_endpoint="http://127.0.0.1:8333", s3_access_key="AKID", s3_secret_key="secret",
                    s3_region="us-east-1", s3_bucket="palette-images")


@pytest.mark.parametrize("key", ["masks/u/j/0_wall.png", "masks/a b/c~d+e%f_sofa.png"])
def test_presigned_put_urls_are_the_very_ones_boto3_makes(key: str) -> None:
    s = settings()
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        expected = s3_client(s).generate_presigned_url(
            "put_object", Params={"Bucket": "palette-images", "Key": key}, ExpiresIn=900)
    assert PutUrls(s, NOW).url(key) == expected


@pytest.mark.parametrize("key", ["inputs/u/j/0.jpg", "inputs/a b/c~d+e%f/199.jpg"])
def test_presigned_upload_urls_sign_the_content_type_as_boto3_does(key: str) -> None:
    """POST /jobs's upload URLs: an upload must send the Content-Type they were made for."""
    s = settings()
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        expected = s3_client(s).generate_presigned_url(
            "put_object", Params={"Bucket": "palette-images", "Key": key, "ContentType": "image/jpeg"}, ExpiresIn=900)
    made = PutUrls(s, NOW, content_type="image/jpeg")
    assert made.url(key) == expected and "content-type%3Bhost" in expected


def test_a_done_item_links_each_used_mask_and_its_instances_and_no_other_item_does() -> None:
    user_id, job_id = uuid.uuid4(), uuid.uuid4()
    job = Job.create(job_id, user_id, "interior", 3, NOW)
    job.confirm_upload(NOW)
    job.execute({"wall": {"action": "recolor", "value": "#2255cc"}}, ["sofa"], None, NOW)
    job.record_result(0, "done", f"outputs/{user_id}/{job_id}/0_result.png", "", "", f"{job_id}:0", NOW)
    job.record_result(1, "failed", "", "", "no wall", f"{job_id}:1", NOW)
    public = _job_public(SimpleNamespace(settings=settings()), job)  # type: ignore[arg-type]
    done, failed, pending = (item.model_dump(mode="json") for item in public.items)
    assert set(done["mask_urls"]) == {"wall", "sofa"}
    assert done["mask_urls"]["sofa"].startswith(
        f"http://127.0.0.1:8333/palette-images/masks/{user_id}/{job_id}/used/0_sofa.png?")
    assert f"/masks/{user_id}/{job_id}/used/0_instances.json?" in done["instances_url"]
    assert failed == {"idx": 1, "status": "failed", "output_url": None, "preview_url": None, "error": "no wall"}
    assert pending == {"idx": 2, "status": "pending", "output_url": None, "preview_url": None, "error": None}


def test_a_new_job_gets_every_input_and_the_used_masks_there_are_as_its_client_masks() -> None:
    user_id, source_id, job_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    present = {input_key(user_id, source_id, i) for i in range(2)} | {
        used_mask_key(user_id, source_id, 0, "wall"), used_mask_key(user_id, source_id, 0, "sofa"),
        used_mask_key(user_id, source_id, 0, "floor")}  # a concept the source did not use: not copied
    copies = _rerun_copies(user_id, source_id, job_id, RerunSource(2, ("wall", "sofa")), present)
    assert sorted(copies) == sorted([
        (input_key(user_id, source_id, 0), input_key(user_id, job_id, 0)),
        (input_key(user_id, source_id, 1), input_key(user_id, job_id, 1)),
        (used_mask_key(user_id, source_id, 0, "wall"), mask_key(user_id, job_id, 0, "wall")),
        (used_mask_key(user_id, source_id, 0, "sofa"), mask_key(user_id, job_id, 0, "sofa")),
    ])


def test_a_job_past_retention_links_nothing_its_objects_are_gone() -> None:
    user_id, job_id = uuid.uuid4(), uuid.uuid4()
    job = Job.create(job_id, user_id, "interior", 2, NOW)
    job.confirm_upload(NOW)
    job.execute({"wall": {"action": "recolor", "value": "#2255cc"}}, [], None, NOW)
    job.record_result(0, "done", f"outputs/{user_id}/{job_id}/0_result.png", "", "", f"{job_id}:0", NOW)
    job.record_result(1, "failed", "", "", "no wall", f"{job_id}:1", NOW)
    before = _job_public(SimpleNamespace(settings=settings()), job)  # type: ignore[arg-type]
    assert before.items[0].output_url is not None and before.objects_expired is False
    assert job.expire(30, NOW) is True
    after = _job_public(SimpleNamespace(settings=settings()), job).model_dump(mode="json")  # type: ignore[arg-type]
    assert after["objects_expired"] is True and after["status"] == "done"
    assert after["items"] == [
        {"idx": 0, "status": "done", "output_url": None, "preview_url": None, "error": None},
        {"idx": 1, "status": "failed", "output_url": None, "preview_url": None, "error": "no wall"}]
