"""The GPU worker's loop against small fakes (a consumer, a producer, S3 and the callback): what a
task the worker cannot handle does, duplicates across polls, and the bounds of its caches."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from adapters.bootstrap import S3_UNREACHABLE
from domain.contracts.callback import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_callback
from domain.contracts.keys import MAX_INPUT_BYTES
from gpu_consumer import ops
from gpu_consumer.callbacks import CallbackClient, CallbackUnavailable
from gpu_consumer.codec import BadInput
from gpu_consumer.pipeline import ImagePipeline
from gpu_consumer.worker import PARKED_ERROR_CHARS, GpuWorker, Prefetch, RecentKeys, StartedItems, Task
from tests.unit.broker_fakes import FakeConsumer, FakeLog, Record

DLQ = "palette.gpu-jobs.dlq"
BUCKET = "images"


class Acknowledged:
    """A send's future, as kafka-python's: ``get`` answers once the broker took the message."""

    def get(self, timeout: float = 0) -> None:
        return None


class Refused:
    """A send the broker did not acknowledge: flush returns all the same (kafka-python's does),
    its future raises."""

    def get(self, timeout: float = 0) -> None:
        raise TimeoutError("the DLQ copy was not acknowledged")


@dataclass
class FakeProducer:
    sent: list[tuple[str, bytes | None, bytes, dict[str, bytes]]] = field(default_factory=list)
    refusing: bool = False  # the broker takes no send (it is away)

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"",
             headers: list[tuple[str, bytes]] | None = None) -> Acknowledged | Refused:
        if self.refusing:
            return Refused()
        self.sent.append((topic, key, value, dict(headers or [])))
        return Acknowledged()

    def parked(self) -> list[tuple[bytes, dict[str, bytes]]]:
        return [(value, headers) for topic, _, value, headers in self.sent if topic == DLQ]

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class FakeCallbacks:
    reports: list[tuple[str, str, str]] = field(default_factory=list)
    unavailable: bool = False

    def report(self, task: Task, status: str, output_key: str = "", preview_key: str = "", error: str = "") -> str:
        if self.unavailable:
            raise CallbackUnavailable("callback answered 503")
        self.reports.append((task.idempotency_key, status, error))
        return "recorded"

    def close(self) -> None:
        pass


class FakeS3:
    """Objects in a dict; ``failing_puts`` puts raise first, as an S3 hiccup would."""

    class exceptions:  # boto3's shape
        class NoSuchKey(Exception):
            pass

        class ClientError(Exception):
            response: dict[str, Any] = {}

    def __init__(self, failing_puts: int = 0) -> None:
        self.objects: dict[str, bytes] = {}
        self.failing_puts = failing_puts

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # boto3's names
        if Key not in self.objects:
            raise self.exceptions.NoSuchKey(Key)
        data = self.objects[Key]
        return {"Body": io.BytesIO(data), "ContentLength": len(data)}

    def head_bucket(self, Bucket: str) -> dict[str, Any]:
        return {}

    def put_object(self, Bucket: str, Key: str, Body: bytes, ContentType: str) -> None:
        if self.failing_puts:
            self.failing_puts -= 1
            raise ConnectionResetError("connection reset by peer")
        self.objects[Key] = Body


class StoreAway(FakeS3):
    """The object store not answering while ``down`` (its bucket's HEAD neither): every object's
    get, or only those of ``keys``."""

    def __init__(self, keys: set[str] | None = None) -> None:
        super().__init__()
        self.down = True
        self.keys = keys

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        from botocore.exceptions import EndpointConnectionError

        if self.down and (self.keys is None or Key in self.keys):
            raise EndpointConnectionError(endpoint_url=f"http://127.0.0.1:8333/{Bucket}/{Key}")
        return super().get_object(Bucket, Key)

    def head_bucket(self, Bucket: str) -> dict[str, Any]:
        from botocore.exceptions import EndpointConnectionError

        if self.down:
            raise EndpointConnectionError(endpoint_url=f"http://127.0.0.1:8333/{Bucket}")
        return {}


def photo() -> bytes:
    """A small room (the built-in segmenter refuses an image where nothing looks like a wall)."""
    from gpu_consumer.demo import synthetic_room

    room = (synthetic_room(32, 48)[0].permute(1, 2, 0) * 255).round().byte().numpy()
    buf = io.BytesIO()
    Image.fromarray(room).save(buf, "PNG")
    return buf.getvalue()


def task(concepts: dict[str, dict[str, str]] | None = None, idx: int = 0, job_id: str | None = None) -> dict[str, Any]:
    job_id = job_id or str(uuid.uuid4())
    return {
        "job_id": job_id, "user_id": str(uuid.uuid4()), "idx": idx, "preset": "interior",
        "concepts": concepts or {"wall": {"action": "recolor", "value": "#2255cc"}}, "protect": [],
        "input_key": f"in/{job_id}/{idx}", "output_key": f"out/{job_id}/{idx}.png",
        "preview_key": f"out/{job_id}/{idx}.jpg", "mask_keys": {}, "idempotency_key": f"{job_id}:{idx}",
        "attempt": 0,
    }


def record(t: dict[str, Any], offset: int = 0) -> Record:
    return Record(json.dumps(t).encode(), t["job_id"].encode(), offset)


def worker(*polls: list[Record], s3: FakeS3 | None = None, remember_bytes: int = 1 << 20,
           ) -> tuple[GpuWorker, FakeS3, FakeProducer, FakeCallbacks, FakeConsumer]:
    s3 = s3 or FakeS3()
    for records in polls:
        for r in records:
            try:
                t = json.loads(r.value or b"null")
            except (ValueError, RecursionError):
                continue
            if isinstance(t, dict) and isinstance(t.get("input_key"), str):
                s3.objects[t["input_key"]] = photo()
    consumer, producer, callbacks = FakeConsumer(*polls), FakeProducer(), FakeCallbacks()
    pipeline = ImagePipeline(s3, BUCKET, torch.device("cpu"))
    w = GpuWorker(consumer, producer, pipeline, callbacks, io_threads=2, backoff_s=0.0,
                  remember_bytes=remember_bytes, unavailable_pause_s=0.0)
    return w, s3, producer, callbacks, consumer


def worker_over_log(s3: FakeS3, tasks: list[dict[str, Any]], **options: Any,
                    ) -> tuple[GpuWorker, FakeLog, FakeProducer, FakeCallbacks]:
    """A worker reading ``tasks`` from a log of its own, each task's photo in ``s3`` (no pauses; S3
    unreachable as the served worker takes it); ``options`` go to GpuWorker."""
    log = FakeLog()
    for t in tasks:
        s3.objects[t["input_key"]] = photo()
        log.append(json.dumps(t).encode(), t["job_id"].encode())
    producer, callbacks = FakeProducer(), FakeCallbacks()
    w = GpuWorker(log, producer, ImagePipeline(s3, BUCKET, torch.device("cpu")), callbacks, io_threads=2,
                  backoff_s=0.0, unavailable_pause_s=0.0, unreachable=S3_UNREACHABLE, **options)
    return w, log, producer, callbacks


# -- bad input: failed at once, parked, never retried ------------------------------------------
@pytest.mark.parametrize(("edit", "reason"), [
    ({"action": "recolor", "value": "#5b7f95\n"}, "#rrggbb"),
    ({"action": "texture", "value": "velvet"}, "unknown texture"),
    ({"action": "tone", "value": "sepia"}, "unknown tone"),
    ({"action": "melt", "value": ""}, "unknown action"),
])
def test_an_edit_the_ops_refuse_fails_its_item_at_once_and_parks_the_task(edit, reason):
    t = task({"wall": edit})
    w, s3, producer, callbacks, consumer = worker([record(t)])
    try:
        w.step()
    finally:
        w.close()
    assert len(callbacks.reports) == 1
    key, status, error = callbacks.reports[0]
    assert (key, status) == (t["idempotency_key"], "failed") and reason in error
    assert w.stats["retried"] == 0 and w.stats["dlq"] == 1
    assert w.stats["failed"] == 1 and w.stats["done"] == 0
    [(value, headers)] = producer.parked()
    assert json.loads(value)["idempotency_key"] == t["idempotency_key"] and reason in headers["error"].decode()
    assert t["output_key"] not in s3.objects and consumer.commits == 1


# kafka-python's max_request_size (the GPU worker's producer keeps it): a larger message is
# refused by send() itself, MessageSizeTooLargeError, out of the step and so out of the process.
MAX_REQUEST_SIZE = 1_048_576


def _huge_malformed() -> Record:
    """A task under the broker's 1 MB whose parser's error quotes 600 KB of it."""
    t = task({"w" * 600_000: {"action": 7}})  # type: ignore[dict-item]
    return Record(json.dumps(t).encode(), t["job_id"].encode(), 0)


def _huge_refused() -> Record:
    """A well-formed task the ops refuse, its value 200,000 non-ASCII characters: 400 KB as it
    came, 1.2 MB as json.dumps writes it again (six bytes for each)."""
    t = task({"wall": {"action": "texture", "value": "\u00e9" * 200_000}})
    return Record(json.dumps(t, ensure_ascii=False).encode(), t["job_id"].encode(), 0)


@pytest.mark.parametrize("make", [_huge_malformed, _huge_refused])
def test_a_parked_task_fits_the_producers_largest_message_whatever_its_error_quotes(make):
    bad, good = make(), task()
    assert len(bad.value) < MAX_REQUEST_SIZE
    w, _, producer, callbacks, consumer = worker([bad, record(good, 1)])
    step_once(w)
    [(value, headers)] = producer.parked()
    assert len(value) + sum(len(v) for v in headers.values()) < MAX_REQUEST_SIZE - 4096
    assert headers["error"] and (good["idempotency_key"], "done", "") in callbacks.reports
    assert consumer.commits == 1


def step_once(w: Any) -> None:
    try:
        w.step()
    finally:
        w.close()


def test_a_transient_fault_is_still_retried_then_succeeds():
    t = task()
    w, _, producer, callbacks, _ = worker([record(t)], s3=FakeS3(failing_puts=1))
    step_once(w)
    assert callbacks.reports == [(t["idempotency_key"], "done", "")]
    assert w.stats["retried"] == 1 and producer.parked() == []


@pytest.mark.parametrize("failing_puts", [0, 1])
def test_the_output_and_preview_carry_the_photos_colour_profile(failing_puts: int):
    """A Display P3 photo (every iPhone's) edited and stored without its profile showed washed
    out beside the original; its output and preview now carry it, on the first try and on a
    retry, which fetches the photo again."""
    from tests.unit.test_upload_pixels import _srgb_icc

    profile = _srgb_icc()  # any RGB display profile
    t = task()
    w, s3, _, callbacks, _ = worker([record(t)], s3=FakeS3(failing_puts=failing_puts))
    with Image.open(io.BytesIO(photo())) as room:
        buf = io.BytesIO()
        room.save(buf, "JPEG", quality=95, icc_profile=profile)
    s3.objects[t["input_key"]] = buf.getvalue()
    step_once(w)
    assert callbacks.reports == [(t["idempotency_key"], "done", "")] and w.stats["retried"] == failing_puts
    for key in (t["output_key"], t["preview_key"]):
        with Image.open(io.BytesIO(s3.objects[key])) as stored:
            assert stored.info.get("icc_profile") == profile, key


def test_a_persistent_fault_is_parked_after_three_attempts():
    t = task()
    w, _, producer, callbacks, _ = worker([record(t)], s3=FakeS3(failing_puts=1000))
    step_once(w)
    [(_, status, error)] = callbacks.reports
    assert status == "failed" and "after 3 attempts" in error and "ConnectionResetError" in error
    assert w.stats["retried"] == 2
    [(_, headers)] = producer.parked()
    # the fault's text (an S3 error's names endpoints and buckets) is for the operators, not the client
    assert "connection reset by peer" in headers["error"].decode() and "connection reset by peer" not in error


# -- malformed tasks: parked, reported when they name an item, never a crash ------------------
def _malformed() -> list[tuple[bytes | None, bool]]:
    """(value, whether it names a job and an index to report failed)."""
    good = task()
    cases: list[tuple[bytes | None, bool]] = [
        (b"definitely not json", False), (b"[1, 2]", False), (b"null", False), (None, False),
        (json.dumps({**good, "job_id": "../../users/me"}).encode(), False),
        (json.dumps({**good, "idx": "1"}).encode(), False),
        (json.dumps({**good, "idx": True}).encode(), False),
        # Nested past the parser's recursion limit: RecursionError, no ValueError, from the parse
        # and from the look for an item to report; that one ended the step (and the process, on
        # the same task each restart).
        (b"[" * 100_000, False), (b'{"job_id": ' + b"[" * 100_000, False),
    ]
    for name, value in [("concepts", ["wall"]), ("concepts", {"wall": "recolor"}),
                        ("concepts", {"wall": {"action": 7}}), ("protect", "sofa"), ("mask_keys", None),
                        ("input_key", 12), ("attempt", "x")]:
        cases.append((json.dumps({**task(), name: value}).encode(), True))
    bare = task()
    del bare["output_key"]
    cases.append((json.dumps(bare).encode(), True))
    return cases


@pytest.mark.parametrize(("value", "names_an_item"), _malformed())
def test_a_malformed_task_is_parked_and_the_next_task_still_runs(value, names_an_item):
    good = task()
    w, _, producer, callbacks, consumer = worker([Record(value, b"k", 7), record(good, 8)])
    try:
        w.step()
    finally:
        w.close()
    assert len(producer.parked()) == 1 and w.stats["retried"] == 0
    failed = [r for r in callbacks.reports if r[1] == "failed"]
    assert len(failed) == (1 if names_an_item else 0)
    if names_an_item:
        [(_, headers)] = producer.parked()
        detail = headers["error"].decode().split(": ", 2)[2]  # "malformed task: <type>: <the parser's text>"
        assert "malformed task" in failed[0][2] and detail not in failed[0][2]
    assert (good["idempotency_key"], "done", "") in callbacks.reports
    assert consumer.commits == 1


def test_an_unacknowledged_result_leaves_the_offset_uncommitted_and_its_task_comes_again():
    """The API restarting is no reason to exit: the poll comes again from its first offset, and
    what the API had acknowledged before it went away is not sent twice."""
    first, second = task(), task()
    w, _, _, callbacks, consumer = worker([record(first, 4), record(second, 5)])
    unacknowledged = callbacks.report

    def first_only(t: Task, status: str, *args: Any) -> str:
        if t.idempotency_key != first["idempotency_key"]:
            raise CallbackUnavailable("callback answered 503")
        return unacknowledged(t, status, *args)

    callbacks.report = first_only  # type: ignore[method-assign]
    w.unavailable_pause_s = 0.01
    try:
        assert w.step() == 0
        assert consumer.commits == 0 and w._pause_s == 0.01
        assert w.step() == 0
        assert consumer.commits == 0 and w._pause_s == 0.02  # doubling while the API stays away
        callbacks.report = unacknowledged  # type: ignore[method-assign]
        assert w.step() == 2
    finally:
        w.close()
    assert consumer.commits == 1 and w._pause_s == 0
    assert [k for k, _, _ in callbacks.reports] == [first["idempotency_key"], second["idempotency_key"]]


def test_a_malformed_task_reported_while_the_api_is_away_comes_again_instead_of_ending_the_process():
    bad = json.dumps({**task(), "protect": "sofa"}).encode()  # names an item: reported failed
    w, _, _, callbacks, consumer = worker([Record(bad, b"k", 3)])
    callbacks.unavailable = True
    try:
        assert w.step() == 0
        callbacks.unavailable = False
        w.step()
    finally:
        w.close()
    assert [status for _, status, _ in callbacks.reports] == ["failed"] and consumer.commits == 1


@pytest.mark.parametrize("value", [
    json.dumps({**task(), "protect": "sofa"}).encode(),  # does not parse
    json.dumps(task({"wall": {"action": "texture", "value": "velvet"}})).encode(),  # the ops refuse it
])
def test_a_bad_task_is_parked_once_however_long_the_api_is_away_and_reported_once_it_is_back(value, caplog):
    """Each pause while the API does not acknowledge its failure, its poll comes again: its report
    with it, not another copy on the DLQ (it parked one a pause, for as long as the API was away),
    nor another log line saying it was parked."""
    caplog.set_level(logging.WARNING, logger="palette.gpu")
    w, _, producer, callbacks, consumer = worker([Record(value, b"k", 3)])
    callbacks.unavailable = True
    try:
        for _ in range(3):
            assert w.step() == 0
        callbacks.unavailable = False
        w.step()
        w.step()
    finally:
        w.close()
    assert len(producer.parked()) == 1
    assert sum("parked on the DLQ" in r.getMessage() for r in caplog.records) == 1
    assert [status for _, status, _ in callbacks.reports] == ["failed"] and consumer.commits == 1


@pytest.mark.parametrize("value", [
    json.dumps({**task(), "protect": "sofa"}).encode(),  # does not parse
    json.dumps(task({"wall": {"action": "texture", "value": "velvet"}})).encode(),  # the ops refuse it
])
def test_a_bad_task_whose_parked_copy_the_broker_did_not_take_commits_nothing_and_is_parked_once_it_does(value):
    """Else its item was reported, its offset committed, and the DLQ's copy, what an operator
    reads, lost: the producer's flush does not raise for it."""
    w, _, producer, callbacks, consumer = worker([Record(value, b"k", 3)])
    producer.refusing = True
    try:
        assert w.step() == 0
        assert consumer.commits == 0 and producer.parked() == [] and callbacks.reports == []
        producer.refusing = False
        w.step()
    finally:
        w.close()
    assert len(producer.parked()) == 1 and consumer.commits == 1
    assert [status for _, status, _ in callbacks.reports] == ["failed"]


def test_every_callback_of_the_poll_ends_before_the_step_does():
    """One unacknowledged result must not leave the others running while the poll comes again
    (they would be sent twice, and pile up while the API stays away). The three callbacks run
    side by side; the first is refused at once, the others a little later."""
    tasks = [task(idx=i) for i in range(3)]
    w, _, _, callbacks, _ = worker([record(t, i) for i, t in enumerate(tasks)])
    w.pool.shutdown()
    w.pool = ThreadPoolExecutor(3)  # a thread per callback, so all three are in flight together
    together, ended = threading.Barrier(3, timeout=10), []

    def refused(t: Task, status: str, *args: Any) -> str:
        together.wait()
        if t.idx > 0:
            threading.Event().wait(0.1)  # still in flight when the first one is refused
        ended.append(t.idempotency_key)
        raise CallbackUnavailable("callback answered 503")

    callbacks.report = refused  # type: ignore[method-assign]
    try:
        assert w.step() == 0
        assert sorted(ended) == sorted(t["idempotency_key"] for t in tasks)
    finally:
        w.close()


def test_a_poll_that_found_its_topic_recreated_is_not_sought_back_into_the_old_log():
    class Rewinding(FakeConsumer):
        def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Record]]:
            polled = super().poll(timeout_ms, max_records)
            self.rewound = set(polled)  # the consumer moved these to the start of the new log
            return polled

    polled = [record(task(), 900)]
    w, _, _, callbacks, _ = worker(polled)
    w.consumer = consumer = Rewinding(polled)
    callbacks.unavailable = True
    try:
        assert w.step() == 0
    finally:
        w.close()
    assert consumer.polls == deque()  # nothing sought back to offset 900 (FakeConsumer.seek queues a poll)


# -- duplicates across polls ----------------------------------------------------------------------
def test_a_task_seen_again_in_a_later_poll_is_skipped():
    t = task()
    w, _, _, callbacks, consumer = worker([record(t, 1)], [record(t, 2)], [record(task(), 3)])
    try:
        for _ in range(3):
            w.step()
    finally:
        w.close()
    assert [r for r in callbacks.reports if r[0] == t["idempotency_key"]] == [(t["idempotency_key"], "done", "")]
    assert w.stats["skipped"] == 1 and w.stats["done"] == 2 and consumer.commits == 3


def test_a_task_is_processed_again_once_its_key_was_forgotten():
    """The memory is bounded: beyond it a duplicate costs a recomputation, recorded once by the API."""
    first, others = task(), [task() for _ in range(3)]
    budget = 2 * (len(first["idempotency_key"]) + RecentKeys.ENTRY_OVERHEAD)  # two keys
    w, _, _, callbacks, _ = worker([record(first)], [record(t) for t in others], [record(first)],
                                   remember_bytes=budget)
    try:
        for _ in range(3):
            w.step()
    finally:
        w.close()
    assert [r[0] for r in callbacks.reports].count(first["idempotency_key"]) == 2
    assert len(w.finished) == 2 and w.finished.nbytes <= budget


@settings(max_examples=50, deadline=None)
@given(keys=st.lists(st.text(max_size=60), max_size=80), budget=st.integers(0, 2000))
def test_remembered_keys_stay_within_their_byte_budget(keys, budget):
    recent = RecentKeys(budget)
    for key in keys:
        recent.add(key)
        assert recent.nbytes <= budget
        assert recent.nbytes == sum(len(k) + RecentKeys.ENTRY_OVERHEAD for k in recent._keys)
        if len(key) + RecentKeys.ENTRY_OVERHEAD <= budget:
            assert key in recent  # the newest key is always kept


# -- the texture cache ------------------------------------------------------------------------
def test_the_texture_cache_stays_within_its_byte_budget_over_many_image_sizes():
    budget = 64 * 1024
    pipeline = ImagePipeline(FakeS3(), BUCKET, torch.device("cpu"), texture_cache_bytes=budget)
    edits = {"floor": {"action": "texture", "value": "wood"}}
    for size in range(16, 64, 2):
        image = torch.rand(1, 3, size, size + 3)
        ops.apply_edits(image, {"floor": torch.ones(1, 1, size, size + 3)}, edits, None, pipeline.texture_cache)
        held = sum(t.element_size() * t.nelement() for t in pipeline.texture_cache._entries.values())
        assert held <= budget and held == pipeline.texture_cache.nbytes
    assert len(pipeline.texture_cache) >= 1


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), max_size=40),
       budget=st.integers(0, 40_000))
def test_the_texture_cache_keeps_the_most_recent_textures_that_fit(sizes, budget):
    cache = ops.TextureCache(budget)
    for h, w in sizes:
        tex = torch.zeros(3, h, w)
        cache.put(("wood", h, w, "cpu"), tex)
        assert cache.nbytes <= budget
        assert cache.nbytes == sum(cache.size_of(t) for t in cache._entries.values())
        fits = cache.size_of(tex) <= budget
        assert (cache.get(("wood", h, w, "cpu")) is tex) == fits  # an entry over the budget is not kept


# -- an item that kills the process editing it ---------------------------------------------------
def _die_editing(directory: str, tasks: list[dict[str, Any]], poison: str, stage: str) -> None:
    """A worker process with two compute threads that dies (as the kernel's OOM killer ends one)
    editing or decoding (``stage``) ``poison``, with the other item's edit under way at that moment
    when it has one."""
    import os
    import threading

    from gpu_consumer.worker import StartedItems

    other_editing = threading.Event()
    w, *_ = worker([record(t, i) for i, t in enumerate(tasks)])
    real_edit, real_fetch = w.pipeline.edit, w.pipeline.fetch

    poison_edits = []

    def edit(image: Any, masks: Any, t: Task, profile: Any = None) -> Any:
        if t.idempotency_key == poison:
            poison_edits.append(t)
            if len(poison_edits) == 1:
                other_editing.wait(5)  # the other item on the device too, when it is not edited alone
            if stage == "fails-then-edit" and len(poison_edits) == 1:
                raise RuntimeError("CUDA out of memory")  # retried off the fast path, where it kills
            os._exit(137)
        other_editing.set()
        threading.Event().wait(1)  # mid-edit should the process die now
        return real_edit(image, masks, t, profile)

    def fetch(t: Task) -> Any:
        if t.idempotency_key == poison:
            other_editing.wait(5)
            os._exit(137)  # a photo or a mask whose decode takes the process's memory
        return real_fetch(t)

    w.compute_pool = ThreadPoolExecutor(2)
    w.backoff_s = 0.01
    w.started = StartedItems(Path(directory))
    w.pipeline.edit = edit  # type: ignore[method-assign]
    if stage == "decode":
        w.pipeline.fetch = fetch  # type: ignore[method-assign]
    w.step()


@pytest.mark.parametrize("stage", ["edit", "decode", "fails-then-edit"])
def test_an_item_that_kills_its_process_is_failed_alone_and_never_the_item_beside_it(tmp_path: Path, stage: str):
    import multiprocessing

    from gpu_consumer.worker import CRASH_LIMIT, StartedItems

    innocent, poison = task(), task()
    spawn = multiprocessing.get_context("spawn")
    deaths = []
    for _ in range(CRASH_LIMIT):
        child = spawn.Process(target=_die_editing,
                              args=(str(tmp_path), [innocent, poison], poison["idempotency_key"], stage))
        child.start()
        child.join(120)
        assert child.exitcode == 137
        notes = StartedItems(tmp_path)
        deaths.append((notes.deaths(innocent["idempotency_key"]), notes.deaths(poison["idempotency_key"])))
    # The first death finds both on the device; after it each is edited alone, the innocent one to
    # its end (its note gone), the poison to the second death.
    assert deaths == [(1, 1), (0, 2)]
    w, s3, producer, callbacks, consumer = worker([record(innocent), record(poison, 1)])
    w.started = notes
    step_once(w)
    assert sorted((k, status) for k, status, _ in callbacks.reports) == sorted(
        [(innocent["idempotency_key"], "done"), (poison["idempotency_key"], "failed")])
    assert f"stopped {CRASH_LIMIT} times" in dict((k, e) for k, _, e in callbacks.reports)[poison["idempotency_key"]]
    assert poison["output_key"] not in s3.objects and innocent["output_key"] in s3.objects
    assert w.stats["crashed"] == 1 and len(producer.parked()) == 1 and consumer.commits == 1
    assert list(tmp_path.iterdir()) == []  # both reported: no note left


def test_a_poll_read_again_or_a_stop_counts_no_death_and_a_note_that_cannot_be_kept_stops_nothing(tmp_path: Path):
    from gpu_consumer.worker import StartedItems

    t = task()
    w, _, _, callbacks, _ = worker([record(t)], [record(t)])
    w.started = StartedItems(tmp_path)
    callbacks.unavailable = True
    w.step()  # edited, its result not acknowledged: read again, edited again, never a death
    callbacks.unavailable = False
    step_once(w)
    assert callbacks.reports == [(t["idempotency_key"], "done", "")] and list(tmp_path.iterdir()) == []
    stopping = StartedItems(tmp_path)
    stopping.begin("k")
    assert stopping.deaths("k") == 1  # what a process killed now would leave
    stopping.stop()  # told to stop: a SIGKILL after the grace is not the item's doing
    stopping.begin("k2")
    assert list(tmp_path.iterdir()) == []
    w, _, _, callbacks, _ = worker([record(t)])
    w.started = StartedItems(Path("/proc/no-notes-here"))  # cannot be written: logged, edited anyway
    step_once(w)
    assert callbacks.reports == [(t["idempotency_key"], "done", "")]


def _die_with_one_waiting(directory: str, tasks: list[dict[str, Any]], poison: str, waiting: str) -> None:
    """One compute thread: the poison's edit kills the process once ``waiting`` is decoded (its
    note put back) and waits for the thread."""
    import os
    import threading
    import time

    from gpu_consumer.worker import StartedItems

    w, *_ = worker([record(t, i) for i, t in enumerate(tasks)])
    real_fetch = w.pipeline.fetch
    decoded = threading.Event()
    notes = StartedItems(Path(directory))

    def fetch(t: Task) -> Any:
        out = real_fetch(t)
        if t.idempotency_key == waiting:
            decoded.set()
        return out

    def edit(image: Any, masks: Any, t: Task, profile: Any = None) -> Any:
        decoded.wait(10)
        deadline = time.monotonic() + 10
        while notes.deaths(waiting) and time.monotonic() < deadline:  # its decode's note put back
            threading.Event().wait(0.01)
        os._exit(137)

    w.compute_pool = ThreadPoolExecutor(1)
    w.started = StartedItems(Path(directory))
    w.pipeline.fetch = fetch  # type: ignore[method-assign]
    w.pipeline.edit = edit  # type: ignore[method-assign]
    w.step()


def test_an_item_decoded_and_waiting_when_another_kills_the_process_is_not_counted(tmp_path: Path):
    import multiprocessing

    from gpu_consumer.worker import StartedItems

    poison, waiting = task(), task()
    child = multiprocessing.get_context("spawn").Process(
        target=_die_with_one_waiting,
        args=(str(tmp_path), [poison, waiting], poison["idempotency_key"], waiting["idempotency_key"]))
    child.start()
    child.join(120)
    assert child.exitcode == 137
    notes = StartedItems(tmp_path)
    assert (notes.deaths(poison["idempotency_key"]), notes.deaths(waiting["idempotency_key"])) == (1, 0)


def test_a_death_between_an_items_decode_and_its_edit_is_not_counted_against_it(tmp_path: Path):
    """Decoded items wait for a compute thread: the process dying then (another item's edit) is
    not theirs, and a note of an earlier death stays as it was."""
    from gpu_consumer.worker import StartedItems

    notes = StartedItems(tmp_path)
    notes.begin("waiting")
    assert notes.deaths("waiting") == 1  # killed while decoding it: counted
    notes.pause("waiting")
    assert notes.deaths("waiting") == 0
    suspect = StartedItems(tmp_path)
    suspect.begin("once-died")
    suspect = StartedItems(tmp_path)  # that process died: the next one knows
    suspect.begin("once-died")
    suspect.pause("once-died")
    assert suspect.deaths("once-died") == 1  # back to the one death it had, not cleared, not two
    suspect.end("once-died")
    assert suspect.deaths("once-died") == 0


def _mask_png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (48, 32), value).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("wall", "sofa", "outcome"), [
    (0, 255, "failed"), (255, 0, "done"),
    (127, 0, "failed"), (128, 0, "done"),  # the concept is what is more than half white, as decode reads it
])
def test_an_edit_whose_client_mask_is_empty_fails_but_an_empty_protect_mask_is_no_matter(wall, sofa, outcome):
    t = {**task(), "protect": ["sofa"], "mask_keys": {"wall": "m/wall.png", "sofa": "m/sofa.png"}}
    w, s3, _, callbacks, _ = worker([record(t)])
    s3.objects.update({"m/wall.png": _mask_png(wall), "m/sofa.png": _mask_png(sofa)})
    step_once(w)
    [(_, status, error)] = callbacks.reports
    assert status == outcome and (("mask of wall is empty" in error) == (outcome == "failed")), error


def _half_mask_png(left: int, right: int) -> bytes:
    image = Image.new("L", (48, 32), left)
    image.paste(right, (24, 0, 48, 32))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("wall", "sofa", "outcome"), [
    (_mask_png(255), _mask_png(255), "failed"),  # the whole wall protected
    (_half_mask_png(0, 255), _mask_png(255), "failed"),  # half a wall, all of it under the sofa
    (_half_mask_png(0, 255), _half_mask_png(0, 255), "failed"),  # the same half
    (_mask_png(255), _half_mask_png(0, 255), "done"),  # half the wall left to recolor
], ids=["all-protected", "inside-protected", "same-as-protected", "half-left"])
def test_an_edit_whose_mask_lies_wholly_under_a_protected_one_fails_instead_of_an_unchanged_photo(
        wall: bytes, sofa: bytes, outcome: str) -> None:
    """Protection wins over an edit: an edit mask every pixel of which is protected changed
    nothing, and the item was reported done, billed, its output the photo as it came."""
    t = {**task(), "protect": ["sofa"], "mask_keys": {"wall": "m/wall.png", "sofa": "m/sofa.png"}}
    w, s3, _, callbacks, _ = worker([record(t)])
    s3.objects.update({"m/wall.png": wall, "m/sofa.png": sofa})
    step_once(w)
    [(_, status, error)] = callbacks.reports
    assert status == outcome, (status, error)
    if outcome == "failed":
        assert error.startswith("the mask of wall lies wholly under what is protected (sofa)"), error
        assert t["output_key"] not in s3.objects


def test_an_item_with_another_edit_left_to_show_is_edited_though_one_edit_lies_under_a_protected_mask() -> None:
    """Only an item that would come out unchanged fails: the floor's recolor still shows."""
    edits = {"wall": {"action": "recolor", "value": "#2255cc"}, "floor": {"action": "recolor", "value": "#884422"}}
    t = {**task(edits),
         "protect": ["sofa"], "mask_keys": {"wall": "m/wall.png", "floor": "m/floor.png", "sofa": "m/sofa.png"}}
    w, s3, _, callbacks, _ = worker([record(t)])
    s3.objects.update({"m/wall.png": _half_mask_png(0, 255), "m/floor.png": _half_mask_png(255, 0),
                       "m/sofa.png": _half_mask_png(0, 255)})
    step_once(w)
    [(_, status, error)] = callbacks.reports
    assert status == "done", (status, error)


@pytest.mark.parametrize("sofa", [None, 0])
def test_a_removal_whose_mask_leaves_nothing_around_it_fails_instead_of_a_black_photo(sofa: int | None) -> None:
    """A remove fills its hole from the pixels around it: a client mask of the whole photo (an
    empty protect mask protecting nothing) left none, and the item was reported done, billed,
    its output black."""
    keys = {"wall": "m/wall.png", **({"sofa": "m/sofa.png"} if sofa is not None else {})}
    t = {**task({"wall": {"action": "remove", "value": ""}}), "protect": [] if sofa is None else ["sofa"],
         "mask_keys": keys}
    w, s3, _, callbacks, _ = worker([record(t)])
    s3.objects.update({"m/wall.png": _mask_png(255), **({"m/sofa.png": _mask_png(sofa)} if sofa is not None else {})})
    step_once(w)
    [(_, status, error)] = callbacks.reports
    assert status == "failed" and error.startswith("the mask of wall covers the whole photo"), (status, error)
    assert t["output_key"] not in s3.objects


def test_a_removal_of_the_whole_photo_but_a_protected_half_fills_from_that_half() -> None:
    """Protected pixels are kept, so they are what the hole is filled from: a remove mask of the
    whole photo with half of it protected leaves that half around the hole, no fill from nothing."""
    t = {**task({"wall": {"action": "remove", "value": ""}}), "protect": ["sofa"],
         "mask_keys": {"wall": "m/wall.png", "sofa": "m/sofa.png"}}
    w, s3, _, callbacks, _ = worker([record(t)])
    s3.objects.update({"m/wall.png": _mask_png(255), "m/sofa.png": _half_mask_png(0, 255)})
    step_once(w)
    [(_, status, error)] = callbacks.reports
    assert status == "done", (status, error)
    assert t["output_key"] in s3.objects


@pytest.mark.parametrize(("upload", "reason"), [
    (b"not an image", "the mask of sofa is not a readable image"),
    (b"\xff\xd8" + b"\0" * MAX_INPUT_BYTES, "the mask of sofa is larger than 20 MB"),
    (_mask_png(255)[:60], "the mask of sofa is not a readable image"),
])
def test_a_mask_that_cannot_be_read_fails_its_item_naming_its_concept(upload: bytes, reason: str):
    """Each of an item's masks (up to one a concept of its preset) failed it as "the mask is not a
    readable image" or "input is larger than 20 MB", the photo's words: the client could not tell
    which upload to send again."""
    t = {**task(), "protect": ["sofa"], "mask_keys": {"wall": "m/wall.png", "sofa": "m/sofa.png"}}
    w, s3, _, callbacks, _ = worker([record(t)])
    s3.objects.update({"m/wall.png": _mask_png(255), "m/sofa.png": upload})
    step_once(w)
    [(_, status, error)] = callbacks.reports
    assert status == "failed" and error.startswith(reason), error


def test_an_item_waiting_for_its_turn_holds_its_client_masks_at_a_byte_a_pixel_and_edits_the_same():
    """A client mask was held as float32 from its decode to its edit: an item of a 4096x4096 photo
    with a 1x1 PNG for each of its preset's 12 concepts held 770 MB of masks (from 800 bytes of
    uploads) while it waited its turn, and a few items wait at once, ahead of the device."""
    from gpu_consumer.codec import decode_mask

    def ramp(flip: bool) -> bytes:  # soft masks: every level counts
        levels = np.tile(np.linspace(0, 255, 48).round().astype(np.uint8), (32, 1))
        buf = io.BytesIO()
        Image.fromarray(levels[:, ::-1] if flip else levels).save(buf, "PNG")
        return buf.getvalue()

    t = Task.parse(json.dumps({**task({"wall": {"action": "recolor", "value": "#2255cc"}}), "protect": ["sofa"],
                               "mask_keys": {"wall": "m/wall.png", "sofa": "m/sofa.png"}}).encode())
    s3 = FakeS3()
    s3.objects.update({t.input_key: photo(), "m/wall.png": ramp(False), "m/sofa.png": ramp(True)})
    pipeline = ImagePipeline(s3, BUCKET, torch.device("cpu"))
    image, masks, _ = pipeline.fetch(t)
    assert {c: (m.dtype, m.nbytes) for c, m in masks.items()} == dict.fromkeys(["wall", "sofa"], (torch.uint8, 32 * 48))
    as_decoded = {c: decode_mask(s3.objects[f"m/{c}.png"], (32, 48)) for c in masks}  # float, as before
    assert torch.equal(pipeline.edit(image, masks, t).image, pipeline.edit(image, as_decoded, t).image)


def test_an_item_whose_job_is_canceled_while_it_waits_in_the_poll_is_not_edited():
    first, waiting = task(), task()
    asked: list[list[str]] = []

    def canceled(job_ids):  # the poll's start sees nothing canceled; by the next asking, the second job is
        asked.append(list(job_ids))
        return set() if len(asked) == 1 else {waiting["job_id"]}

    w, s3, _, callbacks, _ = worker([record(first), record(waiting, 1)])
    w.canceled_lookup = canceled
    w.recheck_canceled_s = 0.0  # ask before every item
    step_once(w)
    assert [(key, status) for key, status, _ in callbacks.reports] == [(first["idempotency_key"], "done")]
    assert waiting["output_key"] not in s3.objects and w.stats["skipped"] == 1 and len(asked) >= 2


@given(st.lists(st.integers(0, 4), max_size=30))
def test_each_users_items_take_turns_in_a_poll(owners: list[int]):
    from gpu_consumer.worker import fair_order

    users = [str(uuid.UUID(int=o + 1)) for o in owners]
    tasks = [Task.parse(json.dumps({**task(idx=i), "user_id": u}).encode()) for i, u in enumerate(users)]
    ordered = fair_order(tasks)
    assert sorted(t.idx for t in ordered) == list(range(len(tasks)))  # the same tasks, none lost or doubled
    for u in set(users):  # each user's in their own order
        assert [t.idx for t in ordered if t.user_id == u] == [t.idx for t in tasks if t.user_id == u]
    total = {u: users.count(u) for u in users}
    seen = dict.fromkeys(users, 0)
    for t in ordered:  # no user gets a second turn while another still waiting has had fewer
        assert all(seen[t.user_id] <= seen[v] for v in seen if seen[v] < total[v] and v != t.user_id)
        seen[t.user_id] += 1


# -- steps with a budget: a heavy poll does not hold another user's item for all of it ---------
def log_worker(log: FakeLog, compute_threads: int = 1, window: int = 16, pipeline: type[ImagePipeline] = ImagePipeline,
               started: StartedItems | None = None) -> tuple[GpuWorker, FakeS3, FakeCallbacks]:
    """A worker on ``log`` whose steps' budget is spent at once: each step begins one item per
    compute thread, and leaves the rest for the next."""
    s3, callbacks = FakeS3(), FakeCallbacks()
    w = GpuWorker(log, FakeProducer(), pipeline(s3, BUCKET, torch.device("cpu")), callbacks, io_threads=2,
                  max_records=window, compute_threads=compute_threads, backoff_s=0.0, unavailable_pause_s=0.0,
                  step_s=0.0, started=started)
    return w, s3, callbacks


def append(log: FakeLog, s3: FakeS3, user: int, idx: int) -> str:
    t = {**task(idx=idx, job_id=str(uuid.UUID(int=user + 1))), "user_id": str(uuid.UUID(int=user + 1))}
    s3.objects[t["input_key"]] = photo()
    log.append(json.dumps(t).encode(), t["job_id"].encode())
    return str(t["idempotency_key"])


def test_a_later_users_item_goes_before_the_rest_of_a_heavy_poll():
    log = FakeLog()
    w, s3, callbacks = log_worker(log)
    heavy = [append(log, s3, 0, i) for i in range(5)]
    try:
        assert w.step() == 1  # the first of the heavy user's items; the rest wait
        assert log.commits == [1]  # no further than the first item left
        light = append(log, s3, 1, 0)  # another user's item, behind the heavy user's four
        assert w.step() == 1
        assert [k for k, _, _ in callbacks.reports] == [heavy[0], light]  # served least recently: first
        assert log.commits == [1, 1]  # the heavy user's next item is still to do
        while w.step():
            pass
    finally:
        w.close()
    assert [k for k, _, _ in callbacks.reports] == [heavy[0], light, *heavy[1:]]
    assert log.commits[-1] == 6 and w.stats["skipped"] >= 1  # the light item came again, dropped


@settings(max_examples=25, deadline=None)
@given(arrivals=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), min_size=1, max_size=10),
       compute_threads=st.integers(1, 2), window=st.integers(1, 6))
def test_steps_with_a_spent_budget_edit_every_item_once_and_never_commit_past_one_not_done(
        arrivals: list[tuple[int, int]], compute_threads: int, window: int):
    """Tasks arrive over the steps (user, step); every one is reported once (each user's in their
    order, with one compute thread: two finish side by side in either order), and the group's
    offset never passes a task whose result was not reported."""
    log = FakeLog()
    w, s3, callbacks = log_worker(log, compute_threads, window)
    count: dict[int, int] = {}
    keys: dict[int, list[str]] = {}
    try:
        for step in range(200):
            for user, at in arrivals:
                if at == step:
                    keys.setdefault(user, []).append(append(log, s3, user, count.setdefault(user, 0)))
                    count[user] += 1
            w.step()
            reported = {k for k, _, _ in callbacks.reports}
            offsets = [i for i, r in enumerate(log.records)
                       if json.loads(r.value or b"")["idempotency_key"] not in reported]
            assert not log.commits or log.commits[-1] <= min(offsets, default=len(log.records))
            if step > 4 and not offsets:
                break
    finally:
        w.close()
    done = [k for k, status, _ in callbacks.reports if status == "done"]
    assert sorted(done) == sorted(k for ks in keys.values() for k in ks)  # each once, none lost
    for ks in keys.values() if compute_threads == 1 else ():
        assert [k for k in done if k in ks] == ks
    assert log.commits[-1] == len(log.records)


@given(st.lists(st.integers(0, 4), min_size=1, max_size=30), st.dictionaries(st.integers(0, 4), st.integers(0, 9)))
def test_the_users_served_least_recently_take_the_first_turns(owners: list[int], served: dict[int, int]):
    from gpu_consumer.worker import fair_order

    users = [str(uuid.UUID(int=o + 1)) for o in owners]
    last = {str(uuid.UUID(int=o + 1)): step for o, step in served.items()}
    tasks = [Task.parse(json.dumps({**task(idx=i), "user_id": u}).encode()) for i, u in enumerate(users)]
    ordered = fair_order(tasks, last)
    first = {}
    for position, t in enumerate(ordered):
        first.setdefault(t.user_id, position)
    for u in first:  # a user never served, or served before another, has its first turn before that one's
        for v in first:
            if last.get(u, -1) < last.get(v, -1):
                assert first[u] < first[v]



class SlowFetches(ImagePipeline):
    """Fetches that take a while (a large photo's GET and decode), counted by key."""

    fetched: Counter[str] = Counter()

    def fetch(self, task: Task) -> Any:
        SlowFetches.fetched[task.idempotency_key] += 1
        time.sleep(0.1)  # the work of a slow fetch, not a wait for anything
        return super().fetch(task)


def test_a_step_waits_for_the_fetches_of_what_it_left_and_hands_them_to_the_next(tmp_path: Path):
    """An item left while its fetch still ran was taken, at the next step, for one a process died
    on (its note still on disk); and each step fetched again what the last had fetched."""
    log, started = FakeLog(), StartedItems(tmp_path)
    w, s3, callbacks = log_worker(log, pipeline=SlowFetches, started=started)
    SlowFetches.fetched.clear()
    keys = [append(log, s3, 0, i) for i in range(6)]
    try:
        while w.step():
            assert all(started.deaths(k) == 0 for k in keys)  # nothing counted against an item left
    finally:
        w.close()
    assert [k for k, _, _ in callbacks.reports] == keys and w.stats["crashed"] == 0
    assert SlowFetches.fetched == dict.fromkeys(keys, 1)  # each fetched once


def test_an_item_a_process_died_on_is_edited_in_its_step_whatever_the_budget(tmp_path: Path):
    """Left for later, it would hold its partition's commit while other items keep the budget."""
    log, started = FakeLog(), StartedItems(tmp_path)
    w, s3, callbacks = log_worker(log, started=started)
    suspect = append(log, s3, 0, 0)
    others = [append(log, s3, 1, i) for i in range(3)]
    started._write(suspect, 1)  # one process died while it was on the device
    try:
        w.step()
    finally:
        w.close()
    assert [k for k, _, _ in callbacks.reports] == [others[0], suspect]  # alone, after the step's others
    assert log.commits == [2]


def test_a_malformed_task_read_again_behind_an_item_left_for_later_is_parked_once():
    log = FakeLog()
    w, s3, callbacks = log_worker(log)
    for i in range(3):
        append(log, s3, 0, i)
    bad = {**task(idx=0), "concepts": ["wall"]}  # names an item; does not parse
    log.append(json.dumps(bad).encode(), bad["job_id"].encode())
    try:
        while w.step():
            pass
    finally:
        w.close()
    assert len(w.producer.parked()) == 1  # type: ignore[attr-defined]
    assert [status for k, status, _ in callbacks.reports if k == bad["idempotency_key"]] == ["failed"]


# -- found in a mutation review --------------------------------------------------------------------
def test_a_task_twice_in_one_poll_is_edited_and_reported_once():
    t = task()
    w, _, _, callbacks, consumer = worker([record(t, 1), record(t, 2)])
    step_once(w)
    assert callbacks.reports == [(t["idempotency_key"], "done", "")]
    assert w.stats["skipped"] == 1 and w.stats["done"] == 1 and consumer.commits == 1


def test_once_the_api_answers_that_a_job_was_canceled_its_later_items_are_not_edited():
    job_id = str(uuid.uuid4())
    first, later = task(idx=0, job_id=job_id), task(idx=1, job_id=job_id)
    w, s3, _, callbacks, _ = worker([record(first)], [record(later, 1)])
    recorded = callbacks.report

    def canceled(t: Task, status: str, *args: Any) -> str:
        recorded(t, status, *args)
        return "ignored_canceled"

    callbacks.report = canceled  # type: ignore[method-assign]
    try:
        w.step()
        w.step()
    finally:
        w.close()
    assert [k for k, _, _ in callbacks.reports] == [first["idempotency_key"]]
    assert later["output_key"] not in s3.objects and w.stats["skipped"] == 1


def test_a_done_item_is_reported_with_its_output_and_preview_both_stored_before():
    t = task()
    w, s3, _, callbacks, _ = worker([record(t)])
    named: list[tuple[str, str, bool]] = []

    def report(t: Task, status: str, output_key: str = "", preview_key: str = "", error: str = "") -> str:
        named.append((output_key, preview_key, {output_key, preview_key} <= set(s3.objects)))
        return "recorded"

    callbacks.report = report  # type: ignore[method-assign]
    step_once(w)
    assert named == [(t["output_key"], t["preview_key"], True)]
    assert Image.open(io.BytesIO(s3.objects[t["output_key"]])).format == "PNG"
    assert Image.open(io.BytesIO(s3.objects[t["preview_key"]])).format == "JPEG"


def test_a_result_the_api_does_not_acknowledge_during_a_retry_comes_again_uncommitted():
    t = task()
    w, _, _, callbacks, consumer = worker([record(t)], s3=FakeS3(failing_puts=1))  # the first try's upload fails
    acknowledged, away = callbacks.report, [True]

    def away_once(t: Task, status: str, *args: Any) -> str:
        if away:
            away.pop()
            raise CallbackUnavailable("callback answered 503")
        return acknowledged(t, status, *args)

    callbacks.report = away_once  # type: ignore[method-assign]
    try:
        assert w.step() == 0 and consumer.commits == 0  # not an attempt that failed: the API was away
        assert w.step() == 1
    finally:
        w.close()
    assert callbacks.reports == [(t["idempotency_key"], "done", "")] and consumer.commits == 1


def test_an_input_the_store_says_is_too_large_is_refused_without_reading_it():
    class Huge(FakeS3):
        def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # boto3's names
            body = io.BytesIO(b"")
            body.read = lambda *_: pytest.fail("the body was read")  # type: ignore[method-assign]
            return {"Body": body, "ContentLength": MAX_INPUT_BYTES + 1}

    pipeline = ImagePipeline(Huge(), BUCKET, torch.device("cpu"))
    with pytest.raises(BadInput, match="larger than 20 MB"):
        pipeline.fetch(Task.parse(json.dumps(task()).encode()))


def test_an_input_the_store_does_not_size_is_read_no_further_than_a_byte_past_the_limit():
    """The size check trusted the store's ContentLength: an answer without one (a chunked GET from
    an S3-compatible store) was read to its end, however large what a presigned PUT let through."""
    asked: list[int | None] = []

    class Endless(io.RawIOBase):
        def read(self, size: int | None = -1) -> bytes:
            asked.append(size)
            if size is None or size < 0:
                pytest.fail("the body was read to its end")
            return b"\xff" * size

    class Unsized(FakeS3):
        def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # boto3's names
            return {"Body": Endless()}

    pipeline = ImagePipeline(Unsized(), BUCKET, torch.device("cpu"))
    with pytest.raises(BadInput, match="the photo is larger than 20 MB"):
        pipeline.fetch(Task.parse(json.dumps(task()).encode()))
    assert asked == [MAX_INPUT_BYTES + 1]

    class Trickle(FakeS3):  # short reads (each less than asked) still come to the whole photo
        def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # boto3's names
            whole = io.BytesIO(photo())
            body = io.BytesIO()
            body.read = lambda size=-1: whole.read(min(size, 100))  # type: ignore[method-assign]
            return {"Body": body}

    image = ImagePipeline(Trickle(), BUCKET, torch.device("cpu")).fetch(Task.parse(json.dumps(task()).encode())).image
    assert image.shape == (32, 48, 3)


class Begun:
    """A pool that runs nothing: it records the fetches begun."""

    def __init__(self) -> None:
        self.begun: list[Task] = []

    def submit(self, fetch: Any, t: Task) -> Future[Any]:
        self.begun.append(t)
        return Future()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 10), ahead=st.integers(1, 4))
def test_each_items_fetch_begins_ahead_turns_before_its_own(n: int, ahead: int):
    tasks = [Task.parse(json.dumps(task(idx=i)).encode()) for i in range(n)]
    pool = Begun()
    fetches = Prefetch(pool, lambda t: t, tasks, ahead)  # type: ignore[arg-type]
    assert pool.begun == tasks[:ahead]
    for i in range(n):
        fetches.turn(i)
        assert pool.begun == tasks[:i + 1 + ahead]


SECRET = "callback-secret"


def answering(answer: int | Exception, body: Any = None) -> tuple[CallbackClient, list[httpx.Request]]:
    """A CallbackClient whose API answers every request with ``answer`` (a status, or an error)."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, json=body)

    client = CallbackClient("http://api.test", SECRET)
    client.http.close()
    client.http = httpx.Client(base_url="http://api.test", transport=httpx.MockTransport(handle))
    return client, seen


def test_a_callback_is_signed_over_the_very_bytes_it_sends_for_its_job_and_item():
    t = Task.parse(json.dumps(task(idx=3)).encode())
    client, seen = answering(200, {"data": {"outcome": "recorded"}})
    assert client.report(t, "done", "out.png", "out.jpg") == "recorded"
    [request] = seen
    assert request.url.path == f"/jobs/{t.job_id}/callback"
    assert json.loads(request.content) == {"idx": 3, "status": "done", "idempotency_key": t.idempotency_key,
                                           "output_key": "out.png", "preview_key": "out.jpg"}
    h = request.headers
    assert verify_callback(SECRET, int(time.time()), t.job_id, request.content, timestamp=h[TIMESTAMP_HEADER],
                           signature=h[SIGNATURE_HEADER], nonce=h[NONCE_HEADER], allow_shared_secret=False)


def test_a_result_reported_again_in_the_same_second_is_signed_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API takes a signature once (a replay is refused 401): a report sent again at once (the
    poll after an unacknowledged callback, or a redelivered task) must not sign as the first did."""
    monkeypatch.setattr(time, "time", lambda: 1_750_000_000.0)
    t = Task.parse(json.dumps(task()).encode())
    client, seen = answering(200, {"data": {"outcome": "recorded"}})
    client.report(t, "done", "o", "p")
    client.report(t, "done", "o", "p")
    first, again = (r.headers for r in seen)
    assert seen[0].content == seen[1].content and first[TIMESTAMP_HEADER] == again[TIMESTAMP_HEADER]
    assert first[NONCE_HEADER] != again[NONCE_HEADER] and first[SIGNATURE_HEADER] != again[SIGNATURE_HEADER]


def test_a_callback_carries_the_trace_of_the_request_that_queued_its_job() -> None:
    parent = f"00-{'ab' * 16}-{'cd' * 8}-01"
    t = Task.parse(json.dumps({**task(), "traceparent": parent}).encode())
    client, seen = answering(200, {"data": {"outcome": "recorded"}})
    client.report(t, "done", "o", "p")
    assert seen[0].headers.get("traceparent") == parent


def test_a_failed_items_error_reaches_the_api_escaped_and_at_most_2000_characters():
    t = Task.parse(json.dumps(task()).encode())
    client, seen = answering(200, {"data": {"outcome": "recorded"}})
    client.report(t, "failed", error="\x00bad" * 1000)
    error = json.loads(seen[0].content)["error"]
    assert len(error) == 2000 and error.startswith("\\x00bad") and "\x00" not in error


@pytest.mark.parametrize(("answer", "body", "outcome"), [
    (200, {"data": {"outcome": "recorded"}}, "recorded"),
    (200, {"data": {"outcome": "ignored_canceled"}}, "ignored_canceled"),
    (404, {"error": "no such job"}, "refused"),
    (409, {"error": "the job takes no results"}, "refused"),
    (401, {}, None), (429, {}, None), (500, {}, None), (503, {}, None),
    (200, {"data": {}}, None),  # acknowledged without an outcome: not taken as recorded
    (httpx.ConnectError("connection refused"), None, None),
])
def test_the_apis_answer_says_whether_a_result_was_taken_refused_or_must_come_again(answer, body, outcome):
    t = Task.parse(json.dumps(task()).encode())
    client, _ = answering(answer, body)
    if outcome is None:
        with pytest.raises(CallbackUnavailable):
            client.report(t, "done", "o", "p")
    else:
        assert client.report(t, "done", "o", "p") == outcome


def test_a_result_the_api_could_not_record_for_contention_comes_again_and_is_never_dropped():
    """The API answers 409 CONFLICT when a save met conflicts through all its retries (two API
    processes recording results of one user's jobs, say): nothing was recorded, and the answer
    asks to try again. It was taken as a refusal: the item dropped, its key remembered as
    finished (the dispatcher's sweep sending the task again was skipped as a duplicate) and the
    offset committed, so the job never finished and its reservation was never settled."""
    from adapters.api.envelope import fail

    conflict = fail("CONFLICT", "too much contention; try again")
    answers = [httpx.Response(409, content=conflict.body, headers={"content-type": "application/json"}),
               httpx.Response(200, json={"data": {"outcome": "recorded"}})]
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0) if len(answers) > 1 else answers[0]

    t = task()
    w, _, _, _, consumer = worker([record(t, 7)])
    w.callbacks = CallbackClient("http://api.test", SECRET)
    w.callbacks.http.close()
    w.callbacks.http = httpx.Client(base_url="http://api.test", transport=httpx.MockTransport(handle))
    assert w.step() == 0 and consumer.commits == 0  # not acknowledged: the poll comes again
    assert t["idempotency_key"] not in w.finished
    assert w.step() == 1 and consumer.commits == 1 and len(seen) == 2


def test_an_object_store_that_cannot_be_reached_is_waited_out_not_charged_to_the_items():
    """The store restarting (SeaweedFS killed under ``palette up``: back ~1.5 s later) outlasted
    an item's three attempts (0.2 + 0.4 s apart), and every item in flight was reported failed
    with ``EndpointConnectionError``, its job failed. A store that cannot be reached is no fault
    of the item's: the poll comes again after a pause, as for an unacknowledged callback."""

    from adapters.bootstrap import S3_UNREACHABLE

    t = task()
    s3 = StoreAway()
    w, _, producer, callbacks, consumer = worker([record(t, 7)], s3=s3)
    w.unreachable = S3_UNREACHABLE
    try:
        assert w.step() == 0
        assert callbacks.reports == [] and producer.parked() == [] and consumer.commits == 0
        s3.down = False  # the store is back
        assert w.step() == 1
    finally:
        w.close()
    assert callbacks.reports == [(t["idempotency_key"], "done", "")] and consumer.commits == 1


class StoreHung(StoreAway):
    """The object store taking connections and answering nothing (its process stopped, a proxy
    in front of it holding them) while ``down``: botocore's reads time out."""

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        from botocore.exceptions import ReadTimeoutError

        if self.down:
            raise ReadTimeoutError(endpoint_url=f"http://127.0.0.1:8333/{Bucket}/{Key}")
        return FakeS3.get_object(self, Bucket, Key)

    def head_bucket(self, Bucket: str) -> dict[str, Any]:
        from botocore.exceptions import ReadTimeoutError

        if self.down:
            raise ReadTimeoutError(endpoint_url=f"http://127.0.0.1:8333/{Bucket}")
        return {}


def test_an_object_store_that_does_not_answer_is_waited_out_not_charged_to_the_items():
    """A store that takes the connection and never answers raises ReadTimeoutError, which the
    worker took for an answer (its bucket's HEAD "answered"): every item in flight was failed
    after its three attempts and its job refunded, where a store that cannot be reached is waited
    out (the stack's own health check counts a read timeout as no answer too)."""

    from adapters.bootstrap import S3_UNREACHABLE

    t = task()
    s3 = StoreHung()
    w, _, producer, callbacks, consumer = worker([record(t, 7)], s3=s3)
    w.unreachable = S3_UNREACHABLE
    try:
        assert w.step() == 0
        assert callbacks.reports == [] and producer.parked() == [] and consumer.commits == 0
        s3.down = False  # the store answers again
        assert w.step() == 1
    finally:
        w.close()
    assert callbacks.reports == [(t["idempotency_key"], "done", "")] and consumer.commits == 1


def test_a_parked_tasks_error_header_is_whole_characters_within_its_bound() -> None:
    """A byte cut split the character across the bound (a strict reader of the DLQ refused the
    header), and a lone surrogate in the reason (a task's JSON may carry one escaped) made the
    send raise instead of parking."""
    w, _s3, producer, _callbacks, _consumer = worker()
    try:
        w._park(b"k", b"{}", "x" + "\u00e9" * PARKED_ERROR_CHARS)
        w._park(b"k", b"{}", "bad value \udc80")
    finally:
        w.close()
    [(_, cut), (_, surrogate)] = producer.parked()
    assert cut["error"].decode("utf-8") == "x" + "\u00e9" * ((PARKED_ERROR_CHARS - 1) // 2)
    assert surrogate["error"] == b"bad value \\udc80"
