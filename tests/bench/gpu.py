"""The GPU worker on 1 MP photos, in a child process (for its own peak memory): the worker of
``adapters.bootstrap.build_gpu_worker`` against one item at a time, each step done plainly.
Both paths read from and write to S3 and report through the worker's ``CallbackClient``, and
both run the same algorithms (segmenter, mask refinement, edits). The naive path runs them the
plain way: PIL decode, every edit over the whole image with its reference per-pixel formula
(``ops.apply_edits(..., crop=False, fast=False)``), PNG at PIL's default compression, no overlap."""

from __future__ import annotations

import io
import json
import random
import statistics
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from adapters.settings import Settings
from tests.bench.api import start_api
from tests.bench.harness import EDITS, Profile, Results, Stack, say, service_on

WARM_ITEMS = 2  # the first items pay one-off costs (allocator, texture cache): untimed, in both paths
BATCH = 64  # tasks per poll (the worker's window, gpu_consumer.worker.WINDOW)


def _room_jpeg(seed: int) -> bytes:
    from PIL import Image

    from gpu_consumer.demo import synthetic_room

    room = synthetic_room(800, 1280)  # 1 MP
    g = random.Random(seed)
    arr = (room[0].permute(1, 2, 0) * 255).round().byte().numpy()
    arr = (arr.astype("int16") + g.randint(-10, 10)).clip(0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _naive_run(settings: Settings, s3: Any, callbacks: Any) -> Callable[[list[Any]], None]:
    import numpy as np
    import torch
    from PIL import Image

    from domain.contracts.gpu_task import Task
    from gpu_consumer import ops
    from gpu_consumer.codec import encode_preview
    from gpu_consumer.refine import refine_masks
    from gpu_consumer.segment import built_in

    segmenter = built_in()  # the worker's

    def run(batch: list[Task]) -> None:
        for task in batch:  # one item at a time: download, decode, each op, encode, upload, callback
            data = s3.get_object(Bucket=settings.s3_bucket, Key=task.input_key)["Body"].read()
            u8 = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy())
            image = ops.to_float(u8)
            masks = segmenter.masks(image, [*task.concepts, *task.protect], optional=task.protect)
            masks = refine_masks(image, masks, client=())
            out = ops.apply_edits(image, masks, task.concepts, masks["sofa"], crop=False, fast=False)
            out_u8 = ops.to_u8(out, u8)
            png = io.BytesIO()
            Image.fromarray(out_u8.numpy()).save(png, "PNG")
            s3.put_object(Bucket=settings.s3_bucket, Key=task.output_key, Body=png.getvalue())
            s3.put_object(Bucket=settings.s3_bucket, Key=task.preview_key, Body=encode_preview(out_u8))
            callbacks.report(task, "done", task.output_key, task.preview_key)

    return run


def _in_batches(worker: Any, tasks: list[Any]) -> None:
    """As the worker's steps take them: a window at a time, each step's leftovers (past its
    budget, PALETTE_GPU_STEP_S) in the next."""
    for start in range(0, len(tasks), BATCH):
        left = tasks[start:start + BATCH]
        while left:
            left = worker.process(left)


def _gpu_phase(settings_json: str, items: int, naive: bool) -> dict[str, Any]:
    import resource

    import torch

    from adapters.bootstrap import build_gpu_worker
    from adapters.dispatcher import tasks_for
    from domain.contracts.gpu_task import Task
    from domain.contracts.keys import input_key
    from gpu_consumer.callbacks import CallbackClient
    from gpu_consumer.pipeline import pick_device
    from infra.s3 import s3_client

    torch.set_num_threads(2)
    settings = Settings.model_validate_json(settings_json)
    svc, close = service_on(settings, "public", naive=False)
    s3 = s3_client(settings, max_pool=16)
    user_id = svc.register(f"gpu-{uuid.uuid4()}", plan="bench").value[0]
    job_id = svc.create_job(user_id, "interior", items + WARM_ITEMS).value
    for idx in range(items + WARM_ITEMS):
        s3.put_object(Bucket=settings.s3_bucket, Key=input_key(user_id, job_id, idx), Body=_room_jpeg(idx))
    svc.confirm_upload(user_id, job_id)
    svc.execute_job(user_id, job_id, EDITS, ["sofa"])
    tasks = [Task.parse(json.dumps(t).encode()) for t in tasks_for(svc.app.repository.get(job_id))]
    run: Callable[[list[Task]], None]
    if naive:
        callbacks = CallbackClient(settings.api_url, settings.callback_secret)
        run, done, device = _naive_run(settings, s3, callbacks), callbacks.close, pick_device(settings.device)
    else:
        worker = build_gpu_worker(settings)  # its consumer stays idle: the tasks are handed to it
        run, done, device = partial(_in_batches, worker), worker.close, worker.pipeline.device
    try:
        run(tasks[:WARM_ITEMS])
        t0 = time.perf_counter()
        run(tasks[WARM_ITEMS:])
        elapsed = time.perf_counter() - t0
        job: Any = svc.app.repository.get(job_id)
    finally:
        done()
        close()
    assert job.done_items == items + WARM_ITEMS, f"only {job.done_items}/{items + WARM_ITEMS} items done"
    return {"items_per_s": items / elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "device": str(device)}


def bench_gpu(stack: Stack, prof: Profile, results: Results) -> None:
    import multiprocessing

    start_api(stack, naive=False)  # the callbacks' receiver
    ctx = multiprocessing.get_context("spawn")
    try:
        for naive in (True, False):
            runs = []
            for _ in range(max(1, prof.repeats - 2)):
                with ctx.Pool(1) as pool:
                    runs.append(pool.apply(_gpu_phase, (stack.settings.model_dump_json(), prof.gpu_items, naive)))
            rate = statistics.median(r["items_per_s"] for r in runs)
            results["naive_gpu_items_per_s" if naive else "gpu_items_per_s"] = round(rate, 2)
            if not naive:
                results["gpu_device"] = runs[0]["device"]
                results.setdefault("peak_rss_mb", {})["gpu_worker"] = round(max(r["peak_rss_mb"] for r in runs), 1)
            say(f"GPU worker, {'one item at a time' if naive else 'pipeline'}: {rate:.2f} items/s at 1 MP on "
                f"{runs[0]['device']} (peak RSS {max(r['peak_rss_mb'] for r in runs):.0f} MB)")
    finally:
        stack.supervisor.stop("api")
