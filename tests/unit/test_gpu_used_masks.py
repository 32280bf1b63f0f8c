"""The masks the worker used go back to the client: written beside each output (``used/`` masks and
the instances JSON), never read back, so a retried or redelivered task writes the same bytes as
the first attempt; a client's mask is used as given and reported as the client's."""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from domain.contracts.gpu_task import MalformedTask, Task, tasks_for
from domain.contracts.keys import mask_key
from gpu_consumer.pipeline import ImagePipeline, used_masks
from gpu_consumer.worker import GpuWorker
from tests.unit.broker_fakes import FakeConsumer, Record
from tests.unit.test_gpu_worker_hardening import BUCKET, FakeCallbacks, FakeProducer, FakeS3

H, W = 96, 128
RECOLOR = {"wall": {"action": "recolor", "value": "#2255cc"}}
PRESET = ["wall", "floor", "ceiling", "sofa", "lamp"]


class RecordingS3(FakeS3):
    """Remembers every key read; ``fail_once`` names a key whose first put fails (an S3 hiccup
    after the item's masks were already written)."""

    def __init__(self, fail_once: str = "") -> None:
        super().__init__()
        self.read: list[str] = []
        self.fail_once = fail_once

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # boto3's names
        self.read.append(Key)
        return super().get_object(Bucket, Key)

    def put_object(self, Bucket: str, Key: str, Body: bytes, ContentType: str) -> None:
        if Key == self.fail_once:
            self.fail_once = ""
            raise ConnectionResetError("connection reset by peer")
        super().put_object(Bucket, Key, Body, ContentType)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def room() -> np.ndarray:
    """A room with a sofa and no lamp."""
    from gpu_consumer.demo import synthetic_room

    return (synthetic_room(H, W, lamp=False)[0].permute(1, 2, 0) * 255).round().byte().numpy()


def queued(protect: list[str], photo: np.ndarray, s3: FakeS3) -> dict[str, Any]:
    user_id, job_id = uuid.uuid4(), uuid.uuid4()
    [t] = tasks_for(user_id, job_id, 1, RECOLOR, protect, PRESET)
    s3.objects[t["input_key"]] = png(photo)
    return t


def run(s3: FakeS3, *tasks: dict[str, Any]) -> FakeCallbacks:
    """Each task through a fresh worker (as a redelivery to another process would be)."""
    callbacks = FakeCallbacks()
    for t in tasks:
        w = GpuWorker(FakeConsumer([Record(json.dumps(t).encode(), t["job_id"].encode())]), FakeProducer(),
                      ImagePipeline(s3, BUCKET, torch.device("cpu")), callbacks, io_threads=2, backoff_s=0.0)
        try:
            w.step()
        finally:
            w.close()
    return callbacks


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def written(s3: FakeS3, t: dict[str, Any]) -> dict[str, bytes]:
    keys = [t["output_key"], t["instances_key"], *t["used_mask_keys"].values()]
    return {k: s3.objects[k] for k in keys}


def test_a_done_item_has_its_masks_and_instances_and_the_edit_stayed_inside_them():
    s3 = RecordingS3()
    t = queued(["sofa"], room(), s3)
    assert run(s3, t).reports == [(t["idempotency_key"], "done", "")]
    before, after = room().astype(int), decoded(s3.objects[t["output_key"]]).astype(int)
    wall, sofa = (decoded(s3.objects[t["used_mask_keys"][c]]) for c in ("wall", "sofa"))
    assert wall.shape == sofa.shape == (H, W) and wall.dtype == np.uint8
    changed = np.abs(after - before).max(axis=2) > 0
    assert changed.any() and not (changed & (wall == 0)).any()  # only where the wall mask reaches
    assert not (changed & (sofa > 128)).any()  # never on the protected sofa
    assert changed[(wall == 255) & (sofa == 0)].mean() > 0.95  # and the whole of the wall

    doc = json.loads(s3.objects[t["instances_key"]])
    assert (doc["idx"], doc["width"], doc["height"]) == (0, W, H)
    assert {c: (v["role"], v["source"]) for c, v in doc["concepts"].items()} == {
        "wall": ("edit", "segmenter"), "sofa": ("protect", "segmenter")}
    [found] = doc["concepts"]["sofa"]["instances"]
    x0, y0, x1, y1 = found["box"]
    ys, xs = np.nonzero(sofa > 127)
    assert abs(x0 - xs.min()) <= 4 and abs(x1 - xs.max() - 1) <= 4 and abs(y0 - ys.min()) <= 4
    assert abs(y1 - ys.max() - 1) <= 4 and 0 < found["confidence"] <= 1
    assert abs(found["area"] - len(xs)) < 0.15 * len(xs)


def test_a_retried_or_redelivered_task_reads_none_of_its_own_masks_and_writes_the_same_bytes():
    s3 = RecordingS3()
    t = queued(["sofa"], room(), s3)
    run(s3, t)
    first = written(s3, t)
    # Redelivered (another worker, the masks of the first attempt in place), then retried by the
    # dispatcher's sweep with a higher attempt number.
    run(s3, t, {**t, "attempt": 1})
    assert written(s3, t) == first
    assert not any("/used/" in key for key in s3.read)
    assert set(s3.read) == {t["input_key"], t["mask_keys"]["wall"], t["mask_keys"]["sofa"]}


def test_a_put_that_fails_after_the_masks_were_written_is_retried_to_the_same_bytes():
    clean = RecordingS3()
    t = queued(["sofa"], room(), clean)
    run(clean, t)
    s3 = RecordingS3(fail_once=t["output_key"])
    s3.objects[t["input_key"]] = clean.objects[t["input_key"]]
    assert run(s3, t).reports == [(t["idempotency_key"], "done", "")]
    assert written(s3, t) == written(clean, t)


def test_a_client_mask_is_used_as_given_and_reported_as_the_clients():
    s3 = RecordingS3()
    t = queued(["sofa"], room(), s3)
    client = np.zeros((H, W), np.uint8)
    client[20:50, 70:120] = 255  # a patch of the wall only
    s3.objects[t["mask_keys"]["wall"]] = png(client)
    run(s3, t, {**t, "attempt": 1})
    used = decoded(s3.objects[t["used_mask_keys"]["wall"]])
    assert (used[client == 255] == 255).all()  # a client's mask only grows...
    assert not used[:, :60].any() and not used[60:].any()  # ...and only up to its edge
    doc = json.loads(s3.objects[t["instances_key"]])["concepts"]
    assert doc["wall"] == {"role": "edit", "source": "client", "instances": [
        {"box": [70, 20, 120, 50], "area": 30 * 50, "confidence": 1.0, "source": "client"}]}
    assert doc["sofa"]["source"] == "segmenter"


def test_a_protected_concept_not_in_the_photo_comes_back_as_an_empty_mask():
    s3 = RecordingS3()
    t = queued(["lamp"], room(), s3)
    run(s3, t)
    assert not decoded(s3.objects[t["used_mask_keys"]["lamp"]]).any()
    assert json.loads(s3.objects[t["instances_key"]])["concepts"]["lamp"] == {
        "role": "protect", "source": "segmenter", "instances": []}


def test_a_task_from_before_used_masks_parses_and_writes_none():
    s3 = RecordingS3()
    t = queued([], room(), s3)
    old = {k: v for k, v in t.items() if k not in ("used_mask_keys", "instances_key")}
    assert run(s3, old).reports == [(t["idempotency_key"], "done", "")]
    assert not any("/used/" in key for key in s3.objects)


@pytest.mark.parametrize(("name", "value"), [("used_mask_keys", ["wall"]), ("used_mask_keys", {"wall": 1}),
                                             ("instances_key", None)])
def test_malformed_used_mask_keys_are_a_malformed_task(name, value):
    t = tasks_for(uuid.uuid4(), uuid.uuid4(), 1, RECOLOR, [], PRESET)[0]
    with pytest.raises(MalformedTask, match=name):
        Task.parse(json.dumps({**t, name: value}).encode())


def test_used_masks_lie_apart_from_the_client_masks():
    user_id, job_id = uuid.uuid4(), uuid.uuid4()
    [t] = tasks_for(user_id, job_id, 1, RECOLOR, ["sofa"], PRESET)
    assert t["used_mask_keys"] == {c: f"masks/{user_id}/{job_id}/used/0_{c}.png" for c in ("wall", "sofa")}
    assert t["instances_key"] == f"masks/{user_id}/{job_id}/used/0_instances.json"
    assert set(t["mask_keys"].values()).isdisjoint(t["used_mask_keys"].values())
    assert t["mask_keys"]["wall"] == mask_key(user_id, job_id, 0, "wall")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(0, 1, width=32)), min_size=1, max_size=64))
def test_a_used_mask_is_above_zero_wherever_the_edit_could_touch_and_within_one_step_of_it(values):
    mask = torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, -1)
    stored = used_masks({"wall": mask}, ["wall"], (1, len(values)))["wall"][0].tolist()
    for value, byte in zip(values, stored, strict=True):
        assert (byte > 0) == (value > 0) and abs(byte - 255 * value) <= 1
