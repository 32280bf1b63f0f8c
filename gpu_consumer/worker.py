"""The GPU worker loop: consumer group ``palette-gpu`` on ``palette.gpu-jobs``.

Per step: poll a window of tasks; edit them on the device (an item at a time per compute thread:
one per core on the CPU, one on CUDA), each user's items taking turns with the others', the users
served least recently first; fetch and decode each item a few turns before its own (threads); drop
an item whose job was canceled meanwhile before its edit; encode, upload and report each item
through the signed callback while the next item computes. With a step budget (``step_s``), once
a step has run that long the items not yet begun are left for a later step: one user's poll of
heavy items holds another's for about the budget and an item, not for the whole poll. The Kafka
offset is committed only after every callback of the step was acknowledged, and only up to the
first task left for later (each partition is moved back there; what was done past it comes again
and is dropped as a duplicate).

Masks back to the client: with each output the worker stores the masks the edit used (refined,
protect included; a protected concept not in the photo as an empty mask) under the task's
``used_mask_keys`` and an instances JSON under ``instances_key`` (per concept: role, source
``client`` or ``segmenter``, and instances with box, area and confidence), all before the
callback, so a reported item has them. It reads client masks only from ``mask_keys``, never from
where it writes: a retried or redelivered task computes from the same inputs as the first
attempt, and writes the same bytes again.

What fails, and how: a task that cannot be parsed, or whose edits the ops refuse (any
``ValueError``, e.g. a colour ``"#5b7f95\n"`` or an unknown texture), is bad input: it is parked on
``palette.gpu-jobs.dlq`` at once and its item (when the task names a job and an index) reported
``failed`` with the reason. An unreadable upload (``BadInput``) fails its item. Anything else (an
S3 hiccup) is retried with backoff up to 3 attempts, then parked and reported ``failed``, so the
job still terminates and refunds; but a store that cannot be reached, or refuses with a 5xx a write
of no item's too (its disk full), is waited out as an unacknowledged callback is. What reaches the
client is the reason for bad input; for a task
that does not parse or a fault of ours, only the exception's type: its text (an S3 error names
endpoints and buckets) goes to the DLQ and the log, for the operators. Nothing a task holds stops
the loop. An unacknowledged callback (``CallbackUnavailable``: the API restarting or refusing)
ends the step without committing: the poll's tasks come again from their first offsets after a
pause that doubles while the API stays away (up to ``UNAVAILABLE_MAX_S``), and those it had
acknowledged are skipped then.

Duplicates (at-least-once delivery, the dispatcher's sweep) are dropped within a poll and across
polls: the keys of the results the API acknowledged are remembered, least recently seen out
first, within a byte budget.

An item whose decoding or editing kills the process (its memory, say) would otherwise come back to
every worker after it for ever, with the items behind it: each decode and edit is noted on disk
while it runs (``StartedItems``); an item one process died on is edited alone, after the poll's
others, and one that ``CRASH_LIMIT`` processes died on is reported ``failed`` and parked instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from domain.contracts import topics, trace
from domain.contracts.gpu_task import Task
from domain.contracts.loop import ConsumerLoop
from domain.text import utf8_head
from gpu_consumer.callbacks import CallbackClient, CallbackUnavailable
from gpu_consumer.codec import BadInput
from gpu_consumer.pipeline import Edited, Fetched, ImagePipeline

log = logging.getLogger("palette.gpu")
GROUP = topics.GPU_GROUP
DLQ_TOPIC = topics.GPU_DLQ
MAX_ATTEMPTS = 3
FOR_OPERATORS = "; the details are kept for the operators"  # what a client sees of a fault of ours
# A parked task's error, in its header and in its JSON, is cut to this many characters.
PARKED_ERROR_CHARS = 2000
# The largest parked message: kafka-python's send() itself refuses one past its max_request_size
# (1 MiB, with the key and the error header), which ended the step. A task the worker writes
# again larger than that (json.dumps writes each non-ASCII character as 6 bytes) is parked as a
# stand-in: its error, its size and its first 4 KB.
PARKED_MAX_BYTES = 1_000_000
UNAVAILABLE_MAX_S = 5.0  # the longest pause while the API does not acknowledge results
# Written (then deleted) when an item's upload was refused with a 5xx: a store that refuses this
# too cannot write at all (its disk full, say), which no item is failed for.
PROBE_KEY = "palette-probe/gpu-worker-write"
# As large as a small output, so that it takes an output's way into the store: a few bytes are
# kept in SeaweedFS's filer entry, a write that succeeded on the full disk where outputs failed.
PROBE_BYTES = 256 * 1024
REMEMBER_BYTES = 8 * 1024 * 1024


RECHECK_CANCELED_S = 2.0
WINDOW = 64  # tasks a step chooses from (each a small JSON record): other users' come into view
PREFETCH = 2  # items fetched and decoded ahead of those on the device (beyond one per compute thread)
CRASH_LIMIT = 2  # processes that may die editing an item before it is failed instead
STARTED_KEPT_S = 7 * 24 * 3600.0  # a note of an item begun that never came back is removed after this


def server_refused(error: BaseException) -> bool:
    """Whether ``error`` is an S3 answer of status 5xx (``InternalError``, ``ServiceUnavailable``,
    ``SlowDown``): the store's own trouble, as botocore's ClientError carries it."""
    # As infra.s3.answered_status reads it, not imported: this package takes domain.contracts only.
    response = getattr(error, "response", None)
    meta = response.get("ResponseMetadata") if isinstance(response, dict) else None
    status = meta.get("HTTPStatusCode") if isinstance(meta, dict) else None
    return isinstance(status, int) and status >= 500


class StoreUnavailable(CallbackUnavailable):
    """The object store could not be reached through an item's retries, or took no write at all
    (its disk full): the step ends without committing and its poll comes again after a pause (as
    for an unacknowledged callback)."""


class DlqUnavailable(CallbackUnavailable):
    """The broker did not acknowledge a parked copy (the producer's flush returns all the same,
    its send's future raises): the step ends without committing and its poll comes again after a
    pause, its parking with it, rather than the offset committed with the DLQ's copy lost."""


class StartedItems:
    """The items being decoded or edited, one small file each in ``directory`` (the name a hash of
    the idempotency key, the content how many processes have begun them): it outlives a process
    killed mid-edit, so the next one to get the item knows. A note is taken as a decode or an edit
    begins and put back as it ends, so it names only what was being decoded or on the device when
    a process died. A process
    told to stop takes its own notes back (a SIGKILL after the stop's grace is not the item's
    doing). Notes are a safeguard: one that cannot be written is logged and the item edited."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._mine: dict[str, int] = {}  # the edits under way here, with the count before this one
        self._stopping = False
        self._lock = threading.Lock()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            cutoff = time.time() - STARTED_KEPT_S  # items never seen again (their job canceled meanwhile)
            for path in directory.glob("*.started"):
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("notes of items begun cannot be kept in %s (%s): a crashing item is not counted", directory, e)

    def _path(self, key: str) -> Path:
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.started"

    def deaths(self, key: str) -> int:
        """How many processes died editing ``key`` (its note, when no edit of it is under way here)."""
        try:
            return int(self._path(key).read_text() or 0)
        except (OSError, ValueError):
            return 0

    def begin(self, key: str) -> None:
        with self._lock:
            if self._stopping or key in self._mine:
                return
            earlier = self._mine[key] = self.deaths(key)
        self._write(key, earlier + 1)

    def pause(self, key: str) -> None:
        """A step of ``key`` that could kill the process (its decode, or an edit that raised) ended
        and the item goes on: a death from now until its next step is not its doing (the count
        goes back to what it was; ``end`` forgets it once the item is edited or reported)."""
        with self._lock:
            if key not in self._mine:
                return
            earlier = self._mine.pop(key)
        self._write(key, earlier)

    def end(self, key: str) -> None:
        """The edit of ``key`` ended (done, refused, or failed by an exception): forget it."""
        with self._lock:
            self._mine.pop(key, None)
        self._write(key, 0)

    def stop(self) -> None:
        """This process was told to stop: its edits under way are not the items' doing."""
        with self._lock:
            self._stopping = True
            mine, self._mine = self._mine, {}
        for key, earlier in mine.items():
            self._write(key, earlier)

    def _write(self, key: str, count: int) -> None:
        try:
            if count:
                self._path(key).write_text(str(count))
            else:
                self._path(key).unlink(missing_ok=True)
        except OSError as e:
            log.warning("the note of item %s cannot be kept (%s)", key, e)


class RecentKeys:
    """A set of strings, least recently added or looked up out first, within ``budget_bytes``.
    Each key is charged its length plus ``ENTRY_OVERHEAD`` (the dictionary slot and str header)."""

    ENTRY_OVERHEAD = 100

    def __init__(self, budget_bytes: int = REMEMBER_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()  # results are reported from the I/O threads

    def _cost(self, key: str) -> int:
        return len(key) + self.ENTRY_OVERHEAD

    def add(self, key: str) -> None:
        cost = self._cost(key)
        if cost > self.budget_bytes:
            return
        with self._lock:
            if key in self._keys:
                self._keys.move_to_end(key)
                return
            self._keys[key] = None
            self.nbytes += cost
            while self.nbytes > self.budget_bytes:
                evicted, _ = self._keys.popitem(last=False)
                self.nbytes -= self._cost(evicted)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        with self._lock:
            if key not in self._keys:
                return False
            self._keys.move_to_end(key)
            return True

    def __len__(self) -> int:
        return len(self._keys)


def owner(task: Task) -> str:
    return task.user_id or task.job_id


def fair_order(tasks: list[Task], served: dict[str, int] | None = None) -> list[Task]:
    """``tasks`` taking each user's in turn (each user's in their order), the users served least
    recently first (``served``: the step in which each last had an item begun; none yet: first):
    one user's many heavy items do not all go before another user's one, in a poll or across."""
    by_user: dict[str, list[Task]] = {}
    for t in tasks:
        by_user.setdefault(owner(t), []).append(t)
    last = served or {}
    queues = sorted(by_user.values(), key=lambda q: last.get(owner(q[0]), -1))  # stable: ties in poll order
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


class Prefetch:
    """The fetches of a step's items, each begun ``ahead`` turns before its own: few decoded images
    wait at once, and those of the items a step leaves are kept for the next (``kept``, by key)."""

    def __init__(self, pool: ThreadPoolExecutor, fetch: Callable[[Task], Fetched], tasks: list[Task],
                 ahead: int, kept: dict[str, Future[Fetched]] | None = None) -> None:
        self.pool, self.fetch, self.tasks, self.ahead = pool, fetch, tasks, ahead
        self._kept = dict(kept or {})
        self._futures: dict[int, Future[Fetched]] = {}  # begun, not yet taken by its item's turn
        self._taken: set[int] = set()
        self._lock = threading.Lock()
        with self._lock:
            for i in range(min(ahead, len(tasks))):
                self._begin(i)

    def _begin(self, i: int) -> None:
        if i not in self._futures and i not in self._taken:
            kept = self._kept.pop(self.tasks[i].idempotency_key, None)
            self._futures[i] = kept or self.pool.submit(self.fetch, self.tasks[i])

    def turn(self, i: int) -> Future[Fetched]:
        """Item ``i``'s turn on the device: its fetch (no longer held here), and the fetch
        ``ahead`` turns on begun."""
        with self._lock:
            if i + self.ahead < len(self.tasks):
                self._begin(i + self.ahead)
            self._begin(i)
            self._taken.add(i)
            return self._futures.pop(i)

    def left(self) -> dict[str, Future[Fetched]]:
        """The step is over: the fetches of the items it left, by key. One not begun is dropped;
        one under way is waited for, so that its note (StartedItems) is back before the next step
        reads it; one that failed is fetched again at its item's turn."""
        with self._lock:
            futures, self._futures = self._futures, {}
        begun = {i: f for i, f in futures.items() if not f.cancel()}
        wait(begun.values())
        return {self.tasks[i].idempotency_key: f for i, f in begun.items() if f.exception() is None}


class GpuWorker(ConsumerLoop):
    def __init__(self, consumer: Any, producer: Any, pipeline: ImagePipeline, callbacks: CallbackClient,
                 canceled_lookup: Callable[[Sequence[str]], set[str]] | None = None,
                 io_threads: int = 8, max_records: int = 16, backoff_s: float = 0.2,
                 compute_threads: int = 1, remember_bytes: int = REMEMBER_BYTES,
                 unavailable_pause_s: float = 0.5, started: StartedItems | None = None,
                 step_s: float | None = None, unreachable: tuple[type[BaseException], ...] = ()) -> None:
        self.consumer = consumer
        self.producer = producer
        self.pipeline = pipeline
        self.callbacks = callbacks
        self.canceled_lookup = canceled_lookup
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="gpu-io")
        # On the CPU, items compute side by side (torch releases the GIL in its kernels) with one
        # intra-op thread each; on CUDA one thread feeds the device.
        self.compute_pool = ThreadPoolExecutor(compute_threads, thread_name_prefix="gpu-compute")
        self.compute_threads = compute_threads
        self.max_records = max_records  # the window a step chooses its items from
        self.step_s = step_s  # None: a step edits its whole poll
        self._steps = 0
        self._served: dict[str, int] = {}  # the step each user in the window last had an item begun in
        self._kept: dict[str, Future[Fetched]] = {}  # fetches of the items the last step left, by key
        # what was parked already (it comes again): malformed records, and items ("item KEY")
        self.parked = RecentKeys(remember_bytes)
        self.backoff_s = backoff_s
        self.unavailable_pause_s = unavailable_pause_s  # the first pause; it doubles while it lasts
        # The object store's "cannot connect" errors (the adapters' S3 client's): a store restarting
        # outlasts the retries, and is no fault of the item's, so its poll comes again as for an
        # unacknowledged callback instead of failing every item in flight.
        self.unreachable = unreachable
        self._pause_s = 0.0
        self.canceled = RecentKeys(remember_bytes)
        self.finished = RecentKeys(remember_bytes)  # idempotency keys whose result the API acknowledged
        self.started = started  # None: a process that dies editing an item gets it again, unbounded
        self.stats = {"done": 0, "failed": 0, "dlq": 0, "skipped": 0, "retried": 0, "crashed": 0}
        self.observe_item: Callable[[Task, float], None] | None = None  # seconds editing each item (metrics)
        # A job canceled while its items wait in this poll: looked up again before an item is
        # edited, at most every ``recheck_canceled_s`` (a poll of heavy items lasts minutes).
        self.recheck_canceled_s = RECHECK_CANCELED_S
        self._poll_jobs: list[str] = []
        self._checked_at = 0.0
        self._check_lock = threading.Lock()

    # -- one item, all stages, with retries (the slow path after a first failure) ---------
    def _finish(self, task: Task, edited: Edited) -> None:
        self.pipeline.store(task, edited)
        self._report(task, "done", task.output_key, task.preview_key)

    def _report(self, task: Task, status: str, output_key: str = "", preview_key: str = "", error: str = "") -> None:
        outcome = self.callbacks.report(task, status, output_key, preview_key, error)
        log.info("item %d of job %s %s (%s)", task.idx, task.job_id, status, outcome,
                 extra={"job_id": task.job_id, "user_id": task.user_id or None,
                        "trace_id": trace.trace_id(task.traceparent) or None})
        if outcome == "ignored_canceled":
            self.canceled.add(task.job_id)
        self.finished.add(task.idempotency_key)
        if self.started is not None:
            self.started.end(task.idempotency_key)
        self.stats["done" if status == "done" else "failed"] += 1

    def _park_task(self, key: bytes | None, data: dict[str, Any], reason: str) -> None:
        """Park a task's JSON object with its error (cut to PARKED_ERROR_CHARS) in it."""
        self._park(key, json.dumps({**data, "error": reason[:PARKED_ERROR_CHARS]}).encode(), reason)

    def _park_item(self, task: Task, data: dict[str, Any], reason: str, level: int = logging.ERROR) -> bool:
        """Park ``task`` once, and say so in the log at ``level``: its report, which the API may not
        acknowledge, comes again with its poll after a pause (each pause while the API stays away),
        its parking and its log line not. Whether it was parked now."""
        mark = f"item {task.idempotency_key}"
        if mark in self.parked:
            return False
        log.log(level, "task %s parked on the DLQ: %s", task.idempotency_key, reason[:300])
        self._park_task(task.job_id.encode(), data, reason)
        self.parked.add(mark)
        return True

    def _park(self, key: bytes | None, value: bytes, reason: str) -> None:
        if len(value) > PARKED_MAX_BYTES:
            value = json.dumps({"error": reason[:PARKED_ERROR_CHARS], "parked_bytes": len(value),
                                "head": value[:4096].decode("utf-8", "replace")}).encode()
        sent = self.producer.send(DLQ_TOPIC, key=key, value=value,
                                  headers=[("error", utf8_head(reason, PARKED_ERROR_CHARS))])
        self.producer.flush()
        try:
            sent.get(timeout=30)  # flush does not raise for a send the broker refused: this does
        except Exception as e:  # noqa: BLE001 - the broker's error (this package takes no kafka import)
            raise DlqUnavailable(f"the DLQ did not take a parked task ({type(e).__name__})") from None
        self.stats["dlq"] += 1

    def _reject(self, task: Task, error: BaseException) -> None:
        """Bad input the ops refused: parked and reported at once (retrying cannot help)."""
        reason = f"bad input: {type(error).__name__}: {error}"
        self._park_item(task, task.raw, reason, logging.WARNING)
        self._report(task, "failed", error=reason)

    def _abandon(self, task: Task, deaths: int) -> None:
        """An item ``deaths`` processes died editing: parked and failed, never edited again."""
        reason = (f"the worker stopped {deaths} times while editing this item (its memory or time, "
                  "likely): not tried again")
        if self._park_item(task, task.raw, reason):
            self.stats["crashed"] += 1
        self._report(task, "failed", error=reason)

    def _reject_record(self, record: Any, error: BaseException, seen: str) -> None:
        """A task that does not parse: parked as it came, once (``seen`` names it in ``parked``: it
        comes again behind a task left for later, or with a poll the API did not acknowledge); its
        item reported when it names one, until the API acknowledges it."""
        reason = f"malformed task: {type(error).__name__}: {error}"
        task, data = Task.identify(record.value)
        if seen not in self.parked:
            log.error("malformed task at offset %s parked on the DLQ: %s", record.offset, reason[:300])
            if data is not None:
                self._park_task(record.key, data, reason)
            else:
                self._park(record.key, record.value or b"", reason)
            self.parked.add(seen)
        if task is not None and task.idempotency_key not in self.finished:
            self._report(task, "failed", error=f"malformed task ({type(error).__name__}){FOR_OPERATORS}")

    def _retry(self, task: Task, first_error: BaseException) -> None:
        error: BaseException = first_error
        for attempt in range(2, MAX_ATTEMPTS + 1):
            self.stats["retried"] += 1
            time.sleep(self.backoff_s * 2 ** (attempt - 2))
            try:
                self._finish(task, self._edit(self._fetch(task), task))
                return
            except BadInput as e:
                self._report(task, "failed", error=str(e))
                return
            except ValueError as e:
                self._reject(task, e)
                return
            except CallbackUnavailable:
                raise
            except Exception as e:  # noqa: BLE001 - counted as a failed attempt
                error = e
        if self.unreachable and isinstance(error, self.unreachable) and not self._store_answers():
            raise StoreUnavailable(f"object store unreachable ({type(error).__name__})") from None
        if server_refused(error) and not self._store_writes():
            raise StoreUnavailable(f"object store refuses writes ({type(error).__name__}: {error})") from None
        reason = f"processing failed after {MAX_ATTEMPTS} attempts: {type(error).__name__}: {error}"
        self._park_item(task, {**task.raw, "attempt": MAX_ATTEMPTS}, reason)
        self._report(task, "failed",
                     error=f"processing failed after {MAX_ATTEMPTS} attempts ({type(error).__name__}){FOR_OPERATORS}")

    def _store_answers(self) -> bool:
        """Whether the object store answers a request of no item's (its bucket's HEAD): when it
        does, an item's "cannot connect" error is the item's own (its object or its upload), which
        is failed as any other, not waited out for ever with every task behind it."""
        try:
            self.pipeline.s3.head_bucket(Bucket=self.pipeline.bucket)
        except self.unreachable:
            return False
        except Exception:  # noqa: BLE001 - an answer (403, 404): the store is there
            return True
        return True

    def _store_writes(self) -> bool:
        """Whether the object store takes a write of no item's (PROBE_KEY, deleted again): an item
        whose upload is refused with a 5xx while the store writes is failed as any other; while it
        refuses this one too (a full disk under SeaweedFS answers every PUT 500 InternalError), the
        poll comes again after a pause, and the items finish once it writes again instead of
        failing, and refunding, every job in flight."""
        s3, bucket = self.pipeline.s3, self.pipeline.bucket
        try:
            s3.put_object(Bucket=bucket, Key=PROBE_KEY, Body=bytes(PROBE_BYTES), ContentType="application/octet-stream")
        except Exception as e:  # noqa: BLE001 - any other refusal is an answer: the store is there
            return not (server_refused(e) or (bool(self.unreachable) and isinstance(e, self.unreachable)))
        with contextlib.suppress(Exception):  # a probe left behind is overwritten by the next
            s3.delete_object(Bucket=bucket, Key=PROBE_KEY)
        return True

    # -- a poll's worth of items --------------------------------------------------------------
    def process(self, tasks: list[Task]) -> list[Task]:
        """Process tasks; returns once every result is acknowledged (raises CallbackUnavailable),
        with the tasks left for a later step (past ``step_s``, those not begun on the device)."""
        if self.canceled_lookup is not None and tasks:
            for job_id in self.canceled_lookup(sorted({t.job_id for t in tasks})):
                self.canceled.add(job_id)
        live, suspects, seen, abandoned = [], [], set(), []
        for t in tasks:
            key = t.idempotency_key
            if t.job_id in self.canceled or key in seen or key in self.finished:  # canceled, or a duplicate
                self.stats["skipped"] += 1
                if self.started is not None and key not in seen:
                    self.started.end(key)
                continue
            seen.add(t.idempotency_key)
            deaths = self.started.deaths(key) if self.started is not None else 0
            if deaths >= CRASH_LIMIT:
                abandoned.append(self.pool.submit(self._abandon, t, deaths))
            elif deaths:  # a process died editing it, maybe by it: alone, after the others
                suspects.append(t)
            else:
                live.append(t)
        self._steps += 1
        self._served = {owner(t): self._served[owner(t)] for t in tasks if owner(t) in self._served}
        live = fair_order(live, self._served)
        self._poll_jobs = sorted({t.job_id for t in [*live, *suspects]})
        self._checked_at = time.monotonic()
        deadline = None if self.step_s is None else time.monotonic() + self.step_s
        fetches = Prefetch(self.pool, self._fetch, live, self.compute_threads + PREFETCH, self._kept)
        computed = [self.compute_pool.submit(self._in_turn, i, task, fetches, deadline) for i, task in enumerate(live)]
        results = [c.result() for c in computed]
        self._kept = fetches.left()
        left = [task for task, result in zip(live, results, strict=True) if result is None]
        pending = abandoned + [result for result in results if result is not None]
        # Alone, so that no other item is on the device should it kill this process too; never left
        # for a later step, budget spent or not (it would hold its partition's commit for ever).
        for t in suspects:
            fetch = self.pool.submit(self._fetch, t)
            pending.append(self.compute_pool.submit(self._compute, t, fetch).result())
        unacknowledged = []
        for f in pending:  # every item's upload and callback ends before the step does
            try:
                f.result()
            except CallbackUnavailable as e:
                unacknowledged.append(e)
        if unacknowledged:
            raise unacknowledged[0]  # the offset stays uncommitted
        return left

    def _in_turn(self, i: int, task: Task, fetches: Prefetch, deadline: float | None) -> Future[None] | None:
        """The ``i``-th item's turn on a compute thread; None when the step's budget is spent (each
        compute thread begins one item at least): the item is left for a later step."""
        if deadline is not None and i >= self.compute_threads and time.monotonic() > deadline:
            return None
        self._served[owner(task)] = self._steps
        return self._compute(task, fetches.turn(i))

    def _compute(self, task: Task, fetched: Future[Fetched]) -> Future[None]:
        """Edit one fetched item, then hand its upload and callback to the I/O threads."""
        try:
            item = fetched.result()
            if not self._still_wanted(task):
                return self.pool.submit(self._drop, task)
            started = time.perf_counter()
            out = self._edit(item, task)
            if self.observe_item is not None:
                self.observe_item(task, time.perf_counter() - started)
        except BadInput as e:
            return self.pool.submit(self._report, task, "failed", "", "", str(e))
        except ValueError as e:
            return self.pool.submit(self._reject, task, e)
        except Exception as e:  # noqa: BLE001 - retried off the fast path
            return self.pool.submit(self._retry, task, e)
        return self.pool.submit(self._finish_or_retry, task, out)

    def _fetch(self, task: Task) -> Fetched:
        """The pipeline's fetch, its decodes noted on disk while they run, as an edit is (a photo
        or a mask whose decode kills the process must not come back for ever)."""
        if self.started is None:
            return self.pipeline.fetch(task)
        self.started.begin(task.idempotency_key)
        try:
            return self.pipeline.fetch(task)
        finally:
            self.started.pause(task.idempotency_key)

    def _edit(self, item: Fetched, task: Task) -> Edited:
        """The pipeline's edit, noted on disk while it runs (StartedItems). An edit that raises
        keeps the deaths noted before it: an item that fails once, then kills the process on its
        retry, still reaches CRASH_LIMIT."""
        if self.started is None:
            return self.pipeline.edit(item.image, item.masks, task, item.profile)
        self.started.begin(task.idempotency_key)
        try:
            edited = self.pipeline.edit(item.image, item.masks, task, item.profile)
        except BaseException:
            self.started.pause(task.idempotency_key)
            raise
        self.started.end(task.idempotency_key)
        return edited

    def run(self, stop: threading.Event) -> None:
        started = self.started
        if started is not None:  # told to stop: the edits under way are not the items' doing
            def on_stop() -> None:
                stop.wait()
                started.stop()

            threading.Thread(target=on_stop, name="gpu-stop", daemon=True).start()
        super().run(stop)

    def _still_wanted(self, task: Task) -> bool:
        """Whether ``task``'s job is still to be edited: not canceled since the poll began (the
        read model asked again when the last asking is ``recheck_canceled_s`` old)."""
        if self.canceled_lookup is not None:
            with self._check_lock:
                if time.monotonic() - self._checked_at >= self.recheck_canceled_s:
                    self._checked_at = time.monotonic()
                    for job_id in self.canceled_lookup(self._poll_jobs):
                        self.canceled.add(job_id)
        return task.job_id not in self.canceled

    def _drop(self, task: Task) -> None:
        """An item of a job canceled meanwhile: not edited (its credit came back at the cancel)."""
        self.stats["skipped"] += 1
        if self.started is not None:
            self.started.end(task.idempotency_key)

    def _finish_or_retry(self, task: Task, out: Edited) -> None:
        try:
            self._finish(task, out)
        except CallbackUnavailable:
            raise
        except ValueError as e:  # the encoder refused the result: retrying cannot help
            self._reject(task, e)
        except Exception as e:  # noqa: BLE001 - an S3 hiccup: the whole item is retried
            self._retry(task, e)

    def step(self, timeout_ms: int = 200) -> int:
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.max_records)
        tasks, where = [], {}
        try:
            for tp, records in polled.items():
                for record in records:
                    try:
                        task = Task.parse(record.value)
                    except Exception as e:  # noqa: BLE001 - whatever a task holds, it is parked, never a crash
                        seen = f"{tp}@{record.offset}:{hashlib.sha256(record.value or b'').hexdigest()[:32]}"
                        self._reject_record(record, e, seen)
                        continue
                    tasks.append(task)
                    where[id(task)] = (tp, record.offset)
            left = self.process(tasks)
        except CallbackUnavailable as e:
            self._again(polled, e)
            return 0
        if polled:
            self._pause_s = 0.0  # results acknowledged again (an empty poll says nothing of the API)
            self._come_again([where[id(t)] for t in left])
            self.producer.flush()
            self.consumer.commit()
        return len(tasks) - len(left)

    def _come_again(self, left: list[tuple[Any, int]]) -> None:
        """Move each partition back to its first task left for a later step: the commit after it
        goes no further, and the tasks from there come again (those done already are dropped by
        their keys)."""
        first: dict[Any, int] = {}
        for tp, offset in left:
            first[tp] = min(offset, first.get(tp, offset))
        self._seek_back(first)

    def _again(self, polled: dict[Any, list[Any]], error: CallbackUnavailable) -> None:
        """The API did not acknowledge a result: read the poll's records again from their first
        offsets after a pause, rather than exit (a restart would join the group again)."""
        self._seek_back({tp: records[0].offset for tp, records in polled.items() if records})
        self._pause_s = min(UNAVAILABLE_MAX_S, max(self.unavailable_pause_s, 2 * self._pause_s))
        log.warning("%s: the poll's tasks come again in %.1f s", error, self._pause_s)
        time.sleep(self._pause_s)

    def _seek_back(self, offsets: dict[Any, int]) -> None:
        """Move each partition back to its offset in ``offsets``; one the poll moved to its start
        stays there, and one no longer assigned is left to the group."""
        rewound: set[Any] = getattr(self.consumer, "rewound", set())  # a recreated topic: left at its start
        for tp, offset in offsets.items():
            if tp not in rewound:
                try:
                    self.consumer.seek(tp, offset)
                except Exception:  # noqa: BLE001 - no longer assigned: the group hands it on from its offset
                    log.debug("%s is no longer assigned", tp)

    def close(self) -> None:
        self.compute_pool.shutdown(wait=True)
        self.pool.shutdown(wait=True)
        self.consumer.close()
        self.producer.close()
        self.callbacks.close()
