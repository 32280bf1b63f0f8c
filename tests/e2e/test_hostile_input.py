"""Hostile text at every string a client can send: NUL, lone surrogates, C0/C1 controls,
non-characters, 64 KiB strings, in every field of every endpoint, headers and query strings
included. Each answer is a 4xx or a success, never a 5xx; afterwards /health is 200, no process
restarted, the read models fold every stream the fuzz wrote to and a fresh user's job (GET /jobs
lists a caller's own jobs from the write side while the projector is behind, so a listing alone
proves nothing of the projector), and nothing was parked."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from adapters.tokens import TokenIssuer
from domain.contracts.callback import sign_callback
from tests import figures
from tests.integration.test_stack import wait_until

from .conftest import Client
from .test_lifecycle import create_uploaded_job

PROCESSES = ("api", "relay", "projector")
ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())  # surrogates too
HOSTILE = st.sampled_from(["\x00", "\ud800", "\udfff", "\ufffe", "\uffff", "\ufdd0", "\U0010ffff", "\x1b",
                           "\x7f", "\x85", "\x9f", "\u202e", "\n", "\r\n", "\t", "\u200b"])
TEXT = st.one_of(
    st.text(ANY_CHAR, max_size=40),
    st.builds(lambda a, h, b: a + h + b, st.text(ANY_CHAR, max_size=8), HOSTILE, st.text(ANY_CHAR, max_size=8)),
    st.sampled_from(["wall", "interior", "#5b7f95", "#5b7f95\n", "warm", "wood", "remove"]),
    st.builds(lambda c: c * 65536, st.sampled_from(["a", "\x00", "\ud800", "é"])),
)
CONCEPTS = st.dictionaries(TEXT, st.fixed_dictionaries({
    "action": st.one_of(st.sampled_from(["recolor", "tone", "texture", "remove"]), TEXT),
    "value": st.one_of(st.none(), TEXT)}), max_size=3)


def _raw_json(body: Any) -> bytes:
    """JSON as a hostile client writes it: lone surrogates escaped (\\ud800), as JSON allows."""
    return json.dumps(body).encode()


def _path(text: str) -> str:
    """Percent-encoded UTF-8 (surrogates too), cut to what a request line may carry."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")[:4000]


def _header(text: str) -> bytes:
    """A header value as HTTP lets a client send one: its UTF-8 bytes (surrogates too) without
    the control bytes the protocol itself forbids (NUL, CR, LF...); bytes over 0x7f stay."""
    raw = text.encode("utf-8", "surrogatepass")
    return bytes(b for b in raw if b == 0x09 or (b >= 0x20 and b != 0x7F))[:8000].strip() or b"x"


class Tally:
    def __init__(self) -> None:
        self.requests = 0
        self.server_errors: list[str] = []

    def send(self, http: httpx.Client, method: str, path: str, **kw: Any) -> None:
        with http.stream(method, path, **kw) as r:  # a stream (SSE) is left after its status line
            self.requests += 1
            if r.status_code >= 500:
                self.server_errors.append(f"{method} {path[:60]} -> {r.status_code} {r.read()[:200]!r}")


def _pids(apps: Any) -> dict[str, int | None]:
    return {name: apps.supervisor.pid(name) for name in PROCESSES}


# The read models that fold each kind of stream (each tracks every event of its streams).
MODELS_OF = {"User": ("users", "billing_events"), "Job": ("jobs_log", "job_items_log"), "Rule": ("rules",)}


def _unfolded(settings: Any, streams: dict[str, str]) -> list[str]:
    """The ``model:stream`` pairs of these streams (id -> kind) whose read model has not folded the
    stream up to its last stored event."""
    behind = []
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        for stream, kind in streams.items():
            last = conn.execute("SELECT max(originator_version) FROM public.palette_events WHERE originator_id = %s",
                                [stream]).fetchone()
            for model in MODELS_OF[kind]:
                tracked = conn.execute(sql.SQL("SELECT version FROM {} WHERE stream_id = %s").format(
                    sql.Identifier("palette_read", f"{model}_tracking")), [stream]).fetchone()
                if last is None or last[0] is None or tracked is None or tracked[0] < last[0]:
                    behind.append(f"{model}:{stream}")
    return behind


def _parked(settings: Any) -> int:
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM palette_read.dead_letters").fetchone()
    return int(row[0]) if row else 0


def test_hostile_text_in_every_field_never_stops_palette(apps, http, settings, client):
    pids, parked = _pids(apps), _parked(settings)
    rule_id = client.data("POST", "/rules", 201, json={"name": "base", "preset_id": "interior", "concepts": {
        "wall": {"action": "remove"}}})["id"]
    job_id = create_uploaded_job(client, 1)
    tally = Tally()
    auth = {**client.headers, "content-type": "application/json"}
    staff = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience, 3600)
    auditor = {"Authorization": f"Bearer {staff.issue(uuid.uuid4(), datetime.now(UTC), role='auditor')}"}

    @settings_for_fuzz
    @given(a=TEXT, b=TEXT, c=TEXT, concepts=CONCEPTS, protect=st.lists(TEXT, max_size=3))
    def attack(a: str, b: str, c: str, concepts: dict[str, Any], protect: list[str]) -> None:
        bodies = [
            ("POST", "/auth/anon", {"device_hash": a}, {}),
            ("POST", "/rules", {"name": a, "preset_id": b, "concepts": concepts, "protect": protect}, {}),
            ("PUT", f"/rules/{rule_id}", {"name": a, "concepts": concepts, "protect": protect}, {}),
            ("POST", "/jobs", {"preset": a, "item_count": 1}, {"Idempotency-Key": _header(c)}),
            ("POST", f"/jobs/{job_id}/execute", {"concepts": concepts, "protect": protect},
             {"traceparent": _header(c)}),
            ("POST", "/webhooks", {"url": a, "events": [b, "job.queued"]}, {"traceparent": _header(a)}),
        ]
        for method, path, body, extra in bodies:
            tally.send(http, method, path, content=_raw_json(body), headers={**auth, **extra})
        tally.send(http, "GET", f"/jobs?cursor={_path(a)}", headers=client.headers)
        tally.send(http, "GET", f"/presets/{_path(b)}", headers=client.headers)
        tally.send(http, "GET", f"/webhooks/{_path(b)}/deliveries", headers=client.headers)
        tally.send(http, "DELETE", f"/jobs/{_path(c)}", headers=client.headers)
        tally.send(http, "DELETE", "/me", headers={"Authorization": b"Bearer " + _header(a)})  # never erases
        tally.send(http, "GET", f"/audit/report?from={_path(a)}&to={_path(b)}&at={_path(c)}", headers=auditor)
        tally.send(http, "GET", f"/jobs/{job_id}/events", headers={**client.headers, "Last-Event-ID": _header(c)})
        callback = _raw_json({"idx": 0, "status": "failed", "output_key": a, "preview_key": b, "error": c,
                              "idempotency_key": a})
        ts, nonce = int(time.time()), uuid.uuid4().hex[:16]
        tally.send(http, "POST", f"/jobs/{job_id}/callback", content=callback, headers={
            "content-type": "application/json", "X-Palette-Timestamp": str(ts), "X-Palette-Nonce": nonce,
            "X-Palette-Signature": sign_callback(settings.callback_secret, ts, job_id, callback, nonce)})

    attack()
    figures.add("hostile input: requests tried", tally.requests)
    figures.add("hostile input: 5xx answers", len(tally.server_errors))
    assert tally.server_errors == []

    assert http.get("/health").status_code == 200
    assert _pids(apps) == pids, "a process restarted"
    figures.add("hostile input: processes restarted", sum(1 for n in PROCESSES if _pids(apps)[n] != pids[n]))
    newcomer = Client(http)
    fresh = newcomer.data("POST", "/jobs", 201, json={"preset": "interior", "item_count": 1})["job_id"]
    t0 = time.monotonic()
    wait_until(lambda: any(j["job_id"] == fresh for j in newcomer.data("GET", "/jobs")["items"]),
               timeout_s=30, what="a fresh user's job in GET /jobs after the fuzz")
    figures.add("hostile input: ms until a fresh job is listed after the fuzz", int((time.monotonic() - t0) * 1000))
    # Listed from the write side if need be: the projector is alive only if it has folded them.
    written = {client.user_id: "User", rule_id: "Rule", job_id: "Job", newcomer.user_id: "User", fresh: "Job"}
    wait_until(lambda: not _unfolded(settings, written), timeout_s=60,
               what="the read models to fold the fuzzed streams and a fresh user's job")
    assert _parked(settings) == parked, "hostile input reached the read side"


settings_for_fuzz = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
