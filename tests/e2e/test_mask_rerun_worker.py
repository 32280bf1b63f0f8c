"""Masks back to the client, through the real API, S3, dispatcher and GPU worker: GET /jobs/{id}
links the masks the worker used and their instances; a client corrects one and runs the photos
again from the finished job (POST /jobs/{id}/rerun) without uploading them, and the new output
obeys the corrected mask. A module of its own: ``gpu_apps`` keeps the dispatcher and the worker
running until the module ends, and test_mask_rerun.py's tests stand in for the worker."""

from __future__ import annotations

import io
import uuid

import httpx
import numpy as np
from PIL import Image

from domain.contracts.keys import input_key
from infra.s3 import s3_client
from tests.integration.test_stack import wait_until

from .conftest import Client
from .test_mask_rerun import EDITS

H, W = 240, 320


def room() -> np.ndarray:
    """The photo: a room with a sofa in front of the wall (no lamp)."""
    from gpu_consumer.demo import synthetic_room

    return (synthetic_room(H, W, lamp=False)[0].permute(1, 2, 0) * 255).round().byte().numpy()


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")  # lossless: the oracle compares pixels exactly
    return buf.getvalue()


def fetch(url: str) -> bytes:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, r.text
    return r.content


def image(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(fetch(url))))


def finished(client: Client, job_id: str) -> dict:
    return wait_until(lambda: (j := client.data("GET", f"/jobs/{job_id}"))["status"] in ("done", "failed") and j,
                      timeout_s=180, what="the GPU worker to finish the job")


def changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return np.abs(after.astype(int) - before.astype(int)).max(axis=2) > 0


def test_masks_come_back_and_a_corrected_mask_runs_again_without_uploading(client, gpu_apps, settings):
    photo = room()
    created = client.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})
    slot = created["upload"][0]
    assert httpx.put(slot["url"], content=png(photo), headers={"Content-Type": slot["content_type"]}).status_code == 200
    client.data("POST", f"/jobs/{created['job_id']}/confirm-upload")
    client.data("POST", f"/jobs/{created['job_id']}/execute", json=EDITS)
    [item] = finished(client, created["job_id"])["items"]
    assert item["status"] == "done" and set(item["mask_urls"]) == {"wall", "sofa"}

    # The masks are the ones the edit used: it changed nothing outside the wall's, nothing on the
    # protected sofa, and the whole of the wall.
    wall, sofa = image(item["mask_urls"]["wall"]), image(item["mask_urls"]["sofa"])
    edited = changed(photo, image(item["output_url"]))
    assert not (edited & (wall == 0)).any() and not (edited & (sofa > 128)).any()
    assert edited[(wall == 255) & (sofa == 0)].mean() > 0.95
    found = httpx.get(item["instances_url"], timeout=30).json()
    assert {c: (v["role"], v["source"]) for c, v in found["concepts"].items()} == {
        "wall": ("edit", "segmenter"), "sofa": ("protect", "segmenter")}
    [sofa_found] = found["concepts"]["sofa"]["instances"]
    assert abs(sofa_found["area"] - int((sofa > 127).sum())) < 0.15 * int((sofa > 127).sum())

    # Correct the wall's mask (its left half is not to be touched) and run the photo again.
    rerun = client.data("POST", f"/jobs/{created['job_id']}/rerun", 201)
    new_id = rerun["job_id"]
    assert rerun["source_job_id"] == created["job_id"] and rerun["inputs_copied"] == 1
    slots = {(s["idx"], s["concept"]): s for s in rerun["masks"]}
    assert set(slots) == {(0, "wall"), (0, "sofa")} and all(s["copied"] for s in slots.values())
    corrected = wall.copy()
    corrected[:, : W // 2] = 0
    assert httpx.put(slots[0, "wall"]["url"], content=png(corrected),
                     headers={"Content-Type": "image/png"}).status_code == 200
    s3 = s3_client(settings)
    copied = s3.get_object(Bucket=settings.s3_bucket, Key=input_key(uuid.UUID(client.user_id), uuid.UUID(new_id), 0))
    assert copied["Body"].read() == png(photo)  # the photo, copied in S3: nothing uploaded again
    assert client.data("POST", f"/jobs/{new_id}/confirm-upload")["status"] == "uploaded"
    client.data("POST", f"/jobs/{new_id}/execute", json=EDITS)
    [again] = finished(client, new_id)["items"]
    assert again["status"] == "done"

    redone = changed(photo, image(again["output_url"]))
    left, right = np.zeros_like(redone), np.zeros_like(redone)
    left[:, : W // 2 - 2] = True  # a client's mask may grow by 2 px where the photo continues it
    right[:, W // 2 + 2:] = True
    assert not (redone & left).any()
    assert redone[right & (corrected == 255) & (sofa == 0)].mean() > 0.95
    assert not (redone & (sofa > 128)).any()
    sources = httpx.get(again["instances_url"], timeout=30).json()["concepts"]
    assert {c: v["source"] for c, v in sources.items()} == {"wall": "client", "sofa": "client"}
    assert not image(again["mask_urls"]["wall"])[:, : W // 2 - 2].any()
    assert client.data("GET", "/me")["credits"] == 48  # one credit per run
