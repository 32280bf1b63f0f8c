"""Hostile but storable text (backslashes, ``\\N``, tabs, CR and LF, quotes, commas, non-BMP
characters, bidi marks, the longest allowed) sent through the real commands comes out as it was
sent on every read path: the live fold (the relay's bytes decoded as the projector's consumer
does), a catch-up's and a rebuild's folds (COPY), both `palette replay` paths (JSON lines and
CSV), the Parquet export, `palette query` (CSV and JSON) and the webhook payload. The oracle is
the values sent, never a fold (in `palette query`'s CSV, a text cell beginning as a formula does
after a quote)."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pyarrow.dataset as ds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from adapters import query
from adapters.system import RandomIds, SystemClock
from adapters.webhooks.events import payload
from application.executors import DirectExecutor
from application.services import PaletteService
from domain.contracts.envelope import decode
from domain.job import MAX_ERROR_LEN
from domain.text import csv_cell, refused_character
from domain.user import MAX_GRANT_REASON
from projections import rebuild as rebuilding
from projections import store
from projections.catchup import CatchUp
from projections.log import LogReader
from projections.parquet import export_log
from projections.replay import Replayer, as_csv, as_jsonl
from projections.stored_events import stored_message
from tests.keys import process_keys

PIECES = st.sampled_from(["\\", "\\N", "\\.", "\\\\", "\t", "\n", "\r", "\r\n", '"', "'", ",", ";", "|", "{}",
                          "\U0001f600", "\U00010348", "\u200f", "\u202e", "\u2028", "\u00a0", " ", "é", "%s"])
ALLOWED = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))


def _text(limit: int) -> st.SearchStrategy[str]:
    """Storable text of 1..``limit`` characters, mostly made of what COPY, CSV and JSON escape,
    sometimes as long as allowed."""
    mixed = st.lists(PIECES | st.text(ALLOWED, min_size=1, max_size=3), min_size=1, max_size=12).map("".join)
    longest = st.lists(PIECES, min_size=1, max_size=4).map(lambda ps: ("".join(ps) * limit)[:limit])
    return (mixed.map(lambda t: t[:limit]) | longest).filter(lambda t: refused_character(t) is None)


def _key_text(text: str) -> str:
    """``text`` as an object key's last segment allows (no control character, no empty segment)."""
    cleaned = "".join(ch for ch in text if ch >= " " and ch != "\x7f").replace("/", "_")
    return cleaned if cleaned.strip(".") else cleaned + "x"


def _forget(conn: psycopg.Connection[Any], user: uuid.UUID, job: uuid.UUID) -> None:
    """What the read models hold of this user and job, so the next fold starts from nothing."""
    for tbl, column, value in (("billing_events", "user_id", user), ("billing_heads", "user_id", user),
                               ("billing_events_tracking", "stream_id", user), ("job_items_log", "job_id", job),
                               ("job_items_log_tracking", "stream_id", job)):
        conn.execute(sql.SQL("DELETE FROM {} WHERE {} = %s").format(
            sql.Identifier("palette_read", tbl), sql.Identifier(column)), [value])


def _read_models(conn: psycopg.Connection[Any], user: uuid.UUID, job: uuid.UUID,
                 start: int) -> tuple[list[str], list[Any]]:
    """The grants' reasons from ``start`` on (a plan's sign-up grant comes before) and each item's
    output key and error, as the read models hold them."""
    reasons = [r for (r,) in conn.execute(
        "SELECT ref FROM palette_read.billing_events WHERE user_id = %s AND type = 'grant' AND position >= %s "
        "ORDER BY seq", [user, start])]
    items = [tuple(r) for r in conn.execute(
        "SELECT output_key, error FROM palette_read.job_items_log WHERE job_id = %s ORDER BY idx", [job])]
    return reasons, items


def _from_events(events: list[dict[str, Any]], user: str, job: str, start: int) -> tuple[list[str], list[Any]]:
    """What ``_read_models`` reads, from replayed envelopes."""
    reasons = [e["data"]["reason"] for e in events
               if e["stream_id"] == user and e["type"] == "CreditsGranted" and int(e["id"]) >= start]
    items = sorted((e["data"]["idx"], e["data"]["output_key"] or None, e["data"]["error"] or None)
                   for e in events if e["stream_id"] == job and e["type"] == "ItemCompleted")
    return reasons, [(k, err) for _, k, err in items]


def test_hostile_text_reads_back_as_sent_on_every_path(settings, own_log, tmp_path, monkeypatch):
    url, app = own_log
    service = PaletteService(app, DirectExecutor(app), SystemClock(), RandomIds(), **process_keys())
    monkeypatch.setattr(store, "BULK_ROWS", 1)  # a catch-up's COPY for every table, however few rows
    monkeypatch.setattr(rebuilding, "COPY_ROWS", 2)  # a rebuild's batches split streams: upserts after COPY
    reader = LogReader(app.recorder, app.mapper.transcoder)
    runs = iter(range(10**6))

    @settings_for_paths
    @given(reasons=st.lists(_text(MAX_GRANT_REASON), min_size=1, max_size=3),
           results=st.lists(st.tuples(_text(MAX_ERROR_LEN), st.booleans()), min_size=1, max_size=3),
           page=st.integers(1, 4))
    def sent_then_read(reasons: list[str], results: list[tuple[str, bool]], page: int) -> None:
        run = next(runs)
        since = datetime.now(UTC) - timedelta(seconds=1)
        user = service.register(f"strings-{uuid.uuid4()}", plan="pro").value[0]
        start = reader.head() + 1
        for reason in reasons:
            service.grant_credits(user, 1, reason)
        job = service.create_job(user, "interior", len(results)).value
        service.confirm_upload(user, job)
        service.execute_job(user, job, {"wall": {"action": "remove"}})
        sent_items = []
        for idx, (text, done) in enumerate(results):
            output_key = f"outputs/{user}/{job}/{_key_text(text)}"
            service.record_item_result(job, idx, "done" if done else "failed", f"{job}:{idx}",
                                       output_key=output_key if done else "", error="" if done else text)
            sent_items.append((output_key, None) if done else (None, text[:MAX_ERROR_LEN]))
        sent = (reasons, sent_items)
        head = reader.head()

        with psycopg.connect(url, autocommit=True) as conn:
            # live: the relay's bytes, decoded as the projector's consumer decodes a message
            _forget(conn, user, job)
            store.apply_batch(conn, [decode(stored_message(*row, app.mapper.transcoder)[0])
                                     for row in reader.rows(1, head)])
            assert _read_models(conn, user, job, start) == sent, "live fold"
            _forget(conn, user, job)
            # small pages: a later page updates rows an earlier one wrote (COPY into a staging table)
            CatchUp(conn, reader, threshold=1, page=page, first_page=page).catch_up_to(head, store.BatchResult())
            assert _read_models(conn, user, job, start) == sent, "catch-up fold"
            for model in ("billing_events", "job_items_log"):
                rebuilding.rebuild(url, app.recorder, app.mapper.transcoder, model)
            assert _read_models(conn, user, job, start) == sent, "rebuild"

        replayer = Replayer(app)
        fast = [json.loads(line) for line in replayer.all_jsonl(start)]
        assert _from_events(fast, str(user), str(job), start) == sent, "replay all (plain rows)"
        ranged = [json.loads(line) for line in as_jsonl(replayer.all(since=since))]
        assert _from_events(ranged, str(user), str(job), start) == sent, "replay all --since"
        rows = list(csv.DictReader(io.StringIO("".join(as_csv(replayer.all(since=since))))))
        decoded = [{**r, "data": json.loads(r["data"])} for r in rows]
        assert _from_events(decoded, str(user), str(job), start) == sent, "replay all --format csv"

        out = tmp_path / f"log{run}"
        export_log(app.recorder, app.mapper.transcoder, out, start=start, types_=["CreditsGranted", "ItemCompleted"])
        granted = ds.dataset(out / "type=CreditsGranted", partitioning="hive").to_table().sort_by("position")
        completed = ds.dataset(out / "type=ItemCompleted", partitioning="hive").to_table().sort_by("idx")
        exported = ([r["reason"] for r in granted.to_pylist() if r["stream_id"] == str(user)],
                    [(r["output_key"] or None, r["error"] or None) for r in completed.to_pylist()])
        assert exported == sent, "parquet export"

        asked = {  # the export's events, and the read model loaded from PostgreSQL
            f"SELECT reason FROM CreditsGranted WHERE stream_id = '{user}' ORDER BY position": out,  # noqa: S608
            f"SELECT ref AS reason FROM billing_events WHERE user_id = '{user}' AND type = 'grant' "  # noqa: S608
            f"AND position >= {start} ORDER BY seq": None}
        for sql_text, data in asked.items():
            for fmt in ("csv", "json"):
                answer = query.render(query.run(sql_text, data, url), fmt)
                got = ([r["reason"] for r in csv.DictReader(io.StringIO(answer, newline=""))] if fmt == "csv"
                       else [r["reason"] for r in json.loads(answer)])
                shown = [csv_cell(r) for r in reasons] if fmt == "csv" else reasons  # a formula's start quoted
                assert got == shown, f"palette query --format {fmt}: {sql_text}"

        job_now = service.get_job(user, job)
        for idx, (_, error) in enumerate(sent_items):
            body = json.loads(payload("item.completed", datetime.now(UTC), job_now, idx))
            assert body["data"]["item"]["error"] == error, "webhook payload"

    sent_then_read()


settings_for_paths = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
