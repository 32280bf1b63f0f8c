"""The goals, what every figure measures, and the report: a table, JSON, a measured/goal chart,
and the README's Markdown table (``python -m tests.bench.readme docs/bench.json``)."""

from __future__ import annotations

from typing import Any

from tests.bench.api import CORES, LATENCY_CLIENTS, LATENCY_CONNECTIONS, LATENCY_LOAD, WRK_CONNECTIONS
from tests.bench.core import HOT_CLIENTS, HOT_JOB_ITEMS
from tests.bench.gpu import BATCH, WARM_ITEMS
from tests.bench.harness import CORE_CLIENTS, FULL, HTTP_CLIENTS, QUICK, Results
from tests.bench.recovery import RECOVERED_MS, RESTART_LIMIT_S, RESTART_WARM_S, WINDOW_MIN_JOBS, WINDOW_S, WINDOW_STEP_S
from tests.bench.relay import ACK_SAMPLES, FAST_LAG_EVENTS_PER_S, LAG_EVENTS_PER_S
from tests.bench.rows_probe import WAIT_AFTER_S

NAIVE_PATH = "one load-decide-save per command, no cache"
NAIVE_API = f"{NAIVE_PATH}, data keys and input listings (boto3) on a worker thread each"
LAG = (f"job creations (2 events each) offered at {LAG_EVENTS_PER_S} events/s, the stack's relay and projector "
       "processes running")
FAST = f"_{FAST_LAG_EVENTS_PER_S}"

WRK = f"wrk, 1 thread, {WRK_CONNECTIONS} connections"
STACK_PROCESSES = "what runs then: PostgreSQL with its backends, the broker, S3 and the API"
SESSIONS = ("sessions of 7 requests, each sent once the one before it is answered: POST /auth/anon, POST /jobs "
            "(Idempotency-Key), confirm-upload, execute, GET /jobs/{id}, GET /me, the signed GPU callback "
            "(tests/bench/wrk/session.lua; tokens, inputs and signatures made beforehand, untimed)")
# Every figure the run reports, in report order, with exactly what it measures. The HTTP figures
# are wrk's when it is installed (as described); otherwise Python clients' (the fallback texts).
MEASURES: dict[str, str] = {
    "parquet_export_events_per_s": "`palette replay all --format parquet` over a generated log (the main log's "
                                   "events copied into schema analytics to ~200k quick, ~1M full), median of 3",
    "parquet_vs_jsonl_size": "bytes of that Parquet dataset (zstd) / bytes of `palette replay all` JSON lines",
    "api_workers": "API processes on the port (PALETTE_API_WORKERS)",
    "http_ceiling_per_s": f"a bare FastAPI app answering GET / with a small JSON document, under uvicorn with the "
                          f"API's settings, in the same run ({WRK}): the ceiling of every HTTP figure",
    "presets_per_s": f"GET /presets with a client token ({WRK})",
    "me_per_s": f"GET /me with a client token, strongly consistent ({WRK})",
    "register_per_s": f"POST /auth/anon, each a new device (tests/bench/wrk/register.lua; {WRK})",
    "register_cpu_ms": f"CPU time (user + system, from /proc) of the stack's processes ({STACK_PROCESSES}; wrk "
                       "excluded) per POST /auth/anon while register_per_s was measured, median of the runs",
    "register_cpu_by_process": "the same by process, ms per registration (postgres: the server and its backends)",
    "register_cpu_ceiling_per_s": f"{CORES} cores / register_cpu_ms: registrations per second if every core ran "
                                  "only the stack's processes and nothing waited (register_per_s's ceiling here)",
    "requests_per_s": f"HTTP API requests per second, {SESSIONS} ({WRK}); without wrk: {HTTP_CLIENTS} concurrent "
                      "users in 2 Python client processes, per second of API time, S3 uploads untimed",
    "commands_per_s": "the commands (the 5 POSTs of a session) among those requests, per second",
    "requests_cpu_ms": f"CPU time of the stack's processes ({STACK_PROCESSES}; wrk excluded) per session "
                       "request while requests_per_s was measured, median of the runs (writing the sessions' "
                       "inputs to S3 beforehand is outside it)",
    "requests_cpu_by_process": "the same by process, ms per request",
    "commands_cpu_ceiling_per_s": f"{CORES} cores / requests_cpu_ms x 5/7 (the commands among a session's "
                                  "requests): commands per second if every core ran only the stack's processes "
                                  "and nothing waited (commands_per_s's ceiling here)",
    "naive_requests_per_s": f"requests_per_s against `palette serve api --naive` ({NAIVE_API})",
    "naive_commands_per_s": f"commands_per_s against `palette serve api --naive` ({NAIVE_API})",
    "api_p50_ms": f"latency of the session requests paced at {LATENCY_LOAD:.0%} of requests_per_s: wrk with "
                  f"session.lua scheduling request i at start + i / rate ({LATENCY_CONNECTIONS} connections, latency "
                  "from each request's write, as wrk measures; a late schedule is not charged to it); without wrk: "
                  f"Python clients open loop, at most {LATENCY_CLIENTS} in flight",
    "api_p99_ms": "p99 of the same latencies",
    "api_latency_requests_per_s": "the request rate achieved while api_p50_ms and api_p99_ms were measured",
    "core_commands_per_s": f"commands per second through PaletteService in process, {CORE_CLIENTS} threads, "
                           "group commit; sessions of 5-6 commands (register, create, confirm, execute, "
                           "cancel or 2 results)",
    "naive_core_commands_per_s": f"core_commands_per_s with the direct executor ({NAIVE_PATH})",
    "hot_stream_results_per_s": f"item results per second into one {HOT_JOB_ITEMS}-item job (one stream) from "
                                f"{HOT_CLIENTS} threads in process, group commit",
    "naive_hot_stream_results_per_s": "the same with the direct executor, each 409 conflict retried",
    "relay_backlog_events": "events in the log the relay figures publish",
    "relay_events_per_s": "events per second of the relay (bootstrap.build_relay, Relay.run) from position 0 "
                          "until the last event is acknowledged and its position saved, to a fresh topic; in a "
                          "process of its own with a served process's collector settings (tests/bench/relay_rates.py)",
    "raw_producer_events_per_s": "a bare producer of the relay's client (kafka_io.LogProducer: librdkafka, linger "
                                 "5 ms) sending the same envelopes, encoded beforehand, to a fresh topic; in a process "
                                 "of its own, as the relay",
    "raw_kafka_python_events_per_s": "the same with the relay's former client (kafka-python, linger 5 ms; "
                                     "kafka_io.producer, which the dispatcher and the GPU worker keep)",
    "raw_produce_ack_p50_ms": f"one message sent by the relay's client (linger 0) and its ack awaited, "
                              f"p50 of {ACK_SAMPLES}",
    "relay_p99_ms": f"event time (set when decided, before its commit) -> broker ack (taken as the batch's acks "
                    f"arrive, before its position is saved), p99, on a second relay in the bench process; {LAG}",
    "relay_ack_events_per_s": "the events per second committed while relay_p99_ms was measured",
    "projection_lag_p50_ms": f"create_job returned (committed) -> its jobs_log tracking row seen (polled every "
                             f"10 ms by a process of its own, off the load generator's interpreter; a row never "
                             f"seen counts as the time it was waited for, {WAIT_AFTER_S:.0f} s or more); {LAG}",
    "projection_lag_p99_ms": "p99 of the same lags",
    "projection_lag_events_per_s": "the events per second committed while the projection lags were measured",
    f"projection_lag_p50_ms{FAST}": f"projection_lag_p50_ms with the job creations offered at {FAST_LAG_EVENTS_PER_S} "
                                    "events/s (more callers: 16 per 500 events/s), the log drained first",
    f"projection_lag_p99_ms{FAST}": f"p99 of the same lags (offered at {FAST_LAG_EVENTS_PER_S} events/s)",
    f"projection_lag_events_per_s{FAST}": f"the events per second committed while they were measured (offered: "
                                          f"{FAST_LAG_EVENTS_PER_S})",
    "catchup_events": "events written (core.make_backlog, mixed sessions) while the projector process was stopped, "
                      "all of them published by the stack's relay before it is started again",
    "catchup_events_per_s": f"live projector catching up N = catchup_events events after a restart (batch fold "
                            f"through the broker; N ~{QUICK.catchup_events:,} quick, ~{FULL.catchup_events:,} full): "
                            "N / seconds from its first fold (a palette_read.positions change, polled every 20 ms) "
                            "or its readiness, whichever is first, until every read model has folded the whole log "
                            "(every model's position at the log's head, then projections.store.unapplied 0 for each)",
    "catchup_start_s": "that projector process started -> ready (its consumer group joined); outside the clock of "
                       "catchup_events_per_s unless it folded before it was ready",
    "broker_restart_recovery_s": f"the broker (its log where machine.broker_storage says: memory, the default, "
                                 "restarts empty) SIGKILLed under job "
                                 f"creations offered at {LAG_EVENTS_PER_S} events/s (the lag load, "
                                 f"{RESTART_WARM_S:.0f} s of it before the kill) and restarted at once "
                                 "(supervisor.restart): seconds from the kill to the start of the first "
                                 f"{WINDOW_S:.0f} s window (over commit times, "
                                 f"one starting every {WINDOW_STEP_S * 1000:.0f} ms from the kill) of >= "
                                 f"{WINDOW_MIN_JOBS} creations whose p99 lag (create_job returned -> jobs_log tracking "
                                 f"row seen, polled every 10 ms by a process of its own; a row never seen counts as "
                                 f"over) is under "
                                 f"{RECOVERED_MS:.0f} ms; {RESTART_LIMIT_S:.0f} (and broker_restart_recovered false) "
                                 f"when no window is within {RESTART_LIMIT_S:.0f} s",
    "broker_restart_recovered": f"whether commit -> jobs_log came back under {RECOVERED_MS:.0f} ms (p99) within "
                                f"{RESTART_LIMIT_S:.0f} s of the kill",
    "broker_restart_ready_s": "the kill -> the restarted broker answering (supervisor.restart returned)",
    "broker_restart_losses": "rows palette_relay.broker_losses gained meanwhile (the relay saw the broker lose "
                             "messages)",
    "broker_restart_events_per_s": "the events per second committed from the load's start to its end (1 s after "
                                   "the recovered window was found)",
    "broker_restart_steady_p99_ms": "commit -> jobs_log p99 of the same load before the kill (its first "
                                    f"{RESTART_WARM_S - 1:.0f} s)",
    "broker_restart_back_to_steady_s": "the kill -> the first window (as for broker_restart_recovery_s) whose p99 "
                                       "is at or under max(broker_restart_steady_p99_ms, "
                                       f"{RECOVERED_MS:.0f} ms); null when none within {RESTART_LIMIT_S:.0f} s",
    "rebuild_log_events": "events in the log the rebuild and replay figures read",
    "rebuild_events": "events the jobs_log rebuild folds (the job streams' events of the log)",
    "rebuild_events_per_s": "`palette projections rebuild jobs_log`: events folded per second (rebuild_events / "
                            "seconds; fold stream by stream, COPY a batch at a time, swap)",
    "rebuild_log_events_per_s": "the same rebuild's log events covered per second (other streams' events are "
                                "skipped in SQL)",
    "naive_rebuild_events_per_s": "the log's first job events applied to jobs_log in one transaction each "
                                  "(projections.store.apply_batch per event), reading untimed",
    "replay_events_per_s": "Replayer.all_jsonl over the whole log, the lines written to memory "
                           "(what `palette replay all` prints)",
    "gpu_items_per_s": f"items per second of GpuWorker.process (bootstrap.build_gpu_worker), windows of {BATCH} "
                       "tasks, each step's leftovers in the next, 1 MP JPEGs: S3 get, masks, edits, PNG and "
                       "preview put, signed callback to the API; "
                       f"{WARM_ITEMS} warm-up items untimed",
    "naive_gpu_items_per_s": "one item at a time on the CPU: S3 get, PIL decode, masks, each op on the full "
                             "image, PIL PNG (level 6) and preview put, CallbackClient callback",
    "gpu_device": "the torch device of the pipeline run",
    "peak_rss_mb": f"peak resident memory (VmHWM) of the api process over its HTTP stages, of the relay and "
                   f"projector processes read at the end of the {LAG_EVENTS_PER_S} events/s lag stage (the "
                   f"{FAST_LAG_EVENTS_PER_S} events/s, catch-up and broker-restart stages come after it), and of "
                   "the child process that ran the GPU pipeline (gpu_worker, the largest over repeats)",
}


Part = tuple[str | None, float, bool]


def _ratio(r: Results, key: str, parts: tuple[Part, ...]) -> float | None:
    """measured / goal, the smallest over the goal's parts (1 or more = met); None when the figure
    or a baseline was not measured."""
    value = r.get(key)
    if value is None:
        return None
    ratios: list[float] = []
    for baseline, factor, higher in parts:
        if baseline is not None and not r.get(baseline):
            return None  # the baseline was not measured
        target = factor * r[baseline] if baseline is not None else factor
        if not higher and value <= 0:
            return None
        ratios.append(value / target if higher else target / value)
    return min(ratios)


# Each goal: its figure, its text, its parts (the key of a baseline or None, the factor or the
# bound, whether higher is better); a two-part goal is met when both parts are.
GOALS: list[tuple[str, str, tuple[Part, ...]]] = [
    ("commands_per_s", ">= 2000 and >= 5x naive", ((None, 2000, True), ("naive_commands_per_s", 5, True))),
    ("me_per_s", ">= 0.8x presets_per_s", (("presets_per_s", 0.8, True),)),
    ("register_per_s", ">= 0.5x presets_per_s", (("presets_per_s", 0.5, True),)),
    ("core_commands_per_s", ">= 2000 (in process)", ((None, 2000, True),)),
    ("hot_stream_results_per_s", ">= 1000", ((None, 1000, True),)),
    ("api_p99_ms", "<= 25 at 70% of peak", ((None, 25, False),)),
    ("relay_events_per_s", ">= 10000 and >= 80% of raw producer",
     ((None, 10000, True), ("raw_producer_events_per_s", 0.8, True))),
    ("relay_p99_ms", "<= 50", ((None, 50, False),)),
    ("projection_lag_p99_ms", "<= 100 at 500 events/s", ((None, 100, False),)),
    (f"projection_lag_p99_ms{FAST}", f"<= 250 at {FAST_LAG_EVENTS_PER_S} events/s", ((None, 250, False),)),
    ("catchup_events_per_s", ">= 20000 (projector restarted)", ((None, 20000, True),)),
    ("broker_restart_recovery_s", f"<= 10 (broker killed at {LAG_EVENTS_PER_S} events/s)", ((None, 10, False),)),
    ("rebuild_events_per_s", ">= 20000 and >= 10x naive",
     ((None, 20000, True), ("naive_rebuild_events_per_s", 10, True))),
    ("replay_events_per_s", ">= 50000", ((None, 50000, True),)),
    ("gpu_items_per_s", ">= 3x naive (CPU)", (("naive_gpu_items_per_s", 3, True),)),
    ("parquet_export_events_per_s", ">= 100000", ((None, 100000, True),)),
    ("parquet_vs_jsonl_size", "<= 0.25 (Parquet / JSON lines bytes)", ((None, 0.25, False),)),
]


def judge(results: Results) -> None:
    """Each goal's measured/goal ratio and verdict (None: not measured), and the measures' texts."""
    results["goals"] = {}
    for name, text, parts in GOALS:
        ratio = _ratio(results, name, parts)
        results["goals"][name] = {"goal": text, "ratio": None if ratio is None else round(ratio, 3),
                                  "met": None if ratio is None else ratio >= 1}
    results["measures"] = {k: v for k, v in MEASURES.items() if k in results}


def _shown(value: Any) -> str:
    return "null" if value is None else (f"{value:,.2f}" if isinstance(value, float) else str(value))


def table(results: Results) -> str:
    lines = [f"{'figure':<34}{'value':>14}  what it measures", "-" * 120]
    for key, what in MEASURES.items():
        if key == "peak_rss_mb" and results.get(key):
            lines.append(f"{key:<34}{'':>14}  {what}")
            lines += [f"{'  ' + name:<34}{_shown(mb):>14}" for name, mb in results[key].items()]
        elif key in results:
            lines.append(f"{key:<34}{_shown(results[key]):>14}  {what}")
    lines += ["", f"{'goal':<28}{'target':<40}{'measured/goal':>14}  result", "-" * 92]
    for name, g in results["goals"].items():
        verdict = {True: "pass", False: "SHORT", None: "not measured"}[g["met"]]
        lines.append(f"{name:<28}{g['goal']:<40}{_shown(g['ratio']):>14}  {verdict}")
    m = results["machine"]
    lines += ["", f"machine: {m['cores']} cores, {m['memory_gb']} GB, {m['cpu']}, GPU: {m['gpu'] or 'none'}; "
              f"broker storage: {m.get('broker_storage', 'unknown')}; "
              f"{results['profile']} run in {results['seconds']}s"]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{name} {_cell(v)}" for name, v in value.items())
    if isinstance(value, float) and abs(value) < 100:
        return str(float(f"{value:.3g}"))  # 3 significant digits: 0.1909 is not 0.2 beside a goal of 0.25
    return "—" if value is None else (f"{value:,.1f}" if isinstance(value, float) else str(value))


def markdown(results: Results) -> str:
    """The run as the README shows it: every figure with what it measures, its goal and verdict."""
    goals = results.get("goals", {})
    lines = ["| key | what it measures | value | goal | measured/goal | result |", "|---|---|---|---|---|---|"]
    for key, what in MEASURES.items():
        if key not in results:
            continue
        g = goals.get(key)
        verdict = "" if g is None else {True: "pass", False: "**short**", None: "not measured"}[g["met"]]
        ratio = "" if g is None or g["ratio"] is None else f"{g['ratio']:.2f}"
        lines.append(f"| `{key}` | {what.replace('|', '/')} | {_cell(results[key])} | "
                     f"{'' if g is None else g['goal']} | {ratio} | {verdict} |")
    m = results["machine"]
    lines += ["", f"Machine: {m['cores']} cores, {m['memory_gb']} GB, {m['cpu']}, GPU: {m['gpu'] or 'none'}; "
                  f"broker storage: {m.get('broker_storage', 'unknown')}; {results['profile']} profile, "
                  f"{results['seconds']} s."]
    return "\n".join(lines)


def plot(results: Results, path: str) -> None:
    """Each goal's measured/goal ratio (of a two-part goal, its smaller part) as a bar chart."""
    from PIL import Image, ImageDraw

    ratios = [(name, g["ratio"]) for name, g in results["goals"].items() if g["ratio"] is not None]
    w, row = 900, 34
    img = Image.new("RGB", (w, row * (len(ratios) + 2)), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), "measured / goal, the smaller part of a two-part goal (right of the line = goal met)",
           fill="black")
    x0, scale = 260, 200
    for i, (name, ratio) in enumerate(ratios, 1):
        y = i * row + 8
        d.text((10, y + 8), name, fill="black")
        d.rectangle([x0, y + 4, x0 + min(ratio, 3) * scale, y + row - 8], fill="#3a7" if ratio >= 1 else "#d54")
        d.text((x0 + min(ratio, 3) * scale + 6, y + 8), f"{ratio:.2f}", fill="black")
    d.line([x0 + scale, row, x0 + scale, row * (len(ratios) + 1)], fill="black", width=2)
    img.save(path)
