"""Analysts' Parquet exports and `palette query` on the real stack: the dataset holds every event
of the log with its data in typed columns (older versions upcast), the filters select what the
log says they should, read models export as they are, and queries answer but never write.

The expected values come from the envelope codec (``Replayer``: Python's JSON decoder, the
upcasters), the exports from Arrow's JSON reader over states PostgreSQL joined: two paths."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from psycopg import sql

from adapters import cli
from adapters.bootstrap import event_store_env
from adapters.query import QueryError, run
from application.services import PaletteApplication
from domain.user import REDACTED_DEVICE_KEY
from projections.parquet import TIMESTAMP, ExportError, export_log, export_table
from projections.replay import Replayer

from .test_projections import drained, service, workload  # noqa: F401 - shared module fixture
from .test_stack import wait_until

RULE = uuid.uuid4()
LEGACY = uuid.uuid4()  # the stream of the v1 Registered (other tests may store legacy events too)


@pytest.fixture(scope="module")
def log(apps, service, settings) -> Replayer:  # noqa: F811
    workload(service, 5, random.Random(7))
    # a User.Registered stored at version 1 (the raw device hash): the export must upcast it
    app = service.app
    legacy = LEGACY
    state = json.dumps({"timestamp": {"_type_": "datetime_iso", "_data_": datetime.now(UTC).isoformat()},
                        "originator_topic": "domain.user:User", "device_hash": "raw-secret-hash",
                        "plan": "free"}).encode()
    # and a state that is not one line of compact JSON (indented): it takes the codec's path
    slot = json.dumps({"timestamp": {"_type_": "datetime_iso", "_data_": datetime.now(UTC).isoformat()},
                       "rule_id": {"_type_": "uuid_hex", "_data_": RULE.hex}}, indent=1).encode()
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        for version, topic, data in ((1, "Registered", state), (2, "RuleSlotTaken", b" " + slot)):
            conn.execute(f"INSERT INTO {app.recorder.events_table_name} (originator_id, originator_version, "  # noqa: S608
                         "topic, state) VALUES (%s, %s, %s, %s)", [legacy, version, f"domain.user:User.{topic}", data])
        wait_until(lambda: drained(service, conn), timeout_s=60, what="projections to drain")
    return Replayer(app)


def _rows(path: Path, event_type: str) -> dict[int, dict[str, Any]]:
    table = ds.dataset(path / f"type={event_type}", format="parquet", partitioning="hive").to_table()
    return {r["position"]: r for r in table.to_pylist()}


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, uuid.UUID) else value


def test_the_parquet_dataset_holds_every_event_with_typed_columns(log, tmp_path):
    stats = export_log(log.app.recorder, log.app.mapper.transcoder, tmp_path / "log")
    events = list(log.all())
    assert stats.events == len(events)
    by_type: dict[str, list[Any]] = {}
    for env in events:
        by_type.setdefault(env.type, []).append(env)
    assert {p.name for p in (tmp_path / "log").iterdir()} == {f"type={t}" for t in by_type}
    for event_type, envs in by_type.items():
        rows = _rows(tmp_path / "log", event_type)
        assert sorted(rows) == [e.id for e in envs], event_type
        for env in envs:
            row = rows[env.id]
            assert (row["stream_id"], row["version"], row["timestamp"]) == (str(env.stream_id), env.version,
                                                                           env.timestamp)
            assert str(row["day"]) == env.timestamp.date().isoformat()
            for name, value in env.data.items():
                if name == "class_version":
                    continue
                got = row[name]
                if isinstance(value, dict):
                    got = json.loads(got)
                assert got == _plain(value), (event_type, name)
    schema = {t: ds.dataset(tmp_path / "log" / f"type={t}", format="parquet").schema
              for t in ("CreditsGranted", "JobCreated", "ItemCompleted", "JobQueued")}
    assert schema["CreditsGranted"].field("amount").type == pa.int64()
    assert schema["JobCreated"].field("user_id").type == pa.string()
    assert schema["ItemCompleted"].field("idx").type == pa.int64()
    assert schema["JobQueued"].field("protect").type == pa.list_(pa.string())
    assert all(s.field("timestamp").type == TIMESTAMP for s in schema.values())


def test_an_older_version_is_upcast_and_an_unusual_state_decoded(log, tmp_path):
    export_log(log.app.recorder, log.app.mapper.transcoder, tmp_path / "log", types_=["Registered"])
    rows = list(_rows(tmp_path / "log", "Registered").values())
    legacy = [r for r in rows if r["stream_id"] == str(LEGACY)]
    assert len(legacy) == 1 and legacy[0]["plan"] == "free" and legacy[0]["device_key"] == REDACTED_DEVICE_KEY
    assert "device_hash" not in legacy[0]  # the v1 credential never reaches the file
    assert all(r["device_key"] == REDACTED_DEVICE_KEY or r["device_key"].startswith(("hmac-sha256:", "sealed:v1:"))
               for r in rows)
    export_log(log.app.recorder, log.app.mapper.transcoder, tmp_path / "slots", types_=["RuleSlotTaken"])
    slots = _rows(tmp_path / "slots", "RuleSlotTaken").values()
    assert [(r["stream_id"], r["version"]) for r in slots if r["rule_id"] == str(RULE)] == [
        (legacy[0]["stream_id"], 2)]


def test_type_time_and_position_filters_select_what_the_log_says(log, tmp_path):
    events = list(log.all())
    chosen = [e for e in events if e.type in ("CreditsGranted", "ItemCompleted")]
    middle = chosen[len(chosen) // 4]  # both bounds are times of exported events: each bound is inclusive
    late = chosen[3 * len(chosen) // 4].timestamp
    stats = export_log(log.app.recorder, log.app.mapper.transcoder, tmp_path / "f", start=1,
                       since=middle.timestamp, until=late, types_=["CreditsGranted", "ItemCompleted"])
    want = {e.id for e in events if e.type in ("CreditsGranted", "ItemCompleted")
            and middle.timestamp <= e.timestamp <= late}
    got = set()
    for t in ("CreditsGranted", "ItemCompleted"):
        if (tmp_path / "f" / f"type={t}").exists():
            got |= set(_rows(tmp_path / "f", t))
    assert got == want and stats.events == len(want)
    after = export_log(log.app.recorder, log.app.mapper.transcoder, tmp_path / "p", start=middle.id)
    assert after.events == sum(1 for e in events if e.id >= middle.id)
    with pytest.raises(ExportError, match="unknown event type"):
        export_log(log.app.recorder, log.app.mapper.transcoder, tmp_path / "x", types_=["Nope"])
    with pytest.raises(ExportError, match="already holds"):
        export_log(log.app.recorder, log.app.mapper.transcoder, tmp_path / "f")


def test_a_read_model_exports_as_its_table(log, settings, tmp_path):
    with psycopg.connect(settings.effective_database_url) as conn:
        want = {(str(r[0]), r[1], r[2])
                for r in conn.execute("SELECT id, status, done_items FROM palette_read.jobs_log")}
        stats = export_table(conn, "jobs_log", tmp_path)
    table = ds.dataset(tmp_path / "jobs_log", format="parquet").to_table()
    assert stats.events == table.num_rows == len(want) > 0
    assert {(r["id"], r["status"], r["done_items"]) for r in table.to_pylist()} == want
    assert table.schema.field("created_at").type == TIMESTAMP
    assert table.schema.field("done_items").type == pa.int32()


def test_query_answers_over_exports_and_live_read_models_and_refuses_writes(log, settings, tmp_path):
    export_log(log.app.recorder, log.app.mapper.transcoder, tmp_path)
    events = list(log.all())
    created = [e for e in events if e.type == "JobCreated"]
    got = run("SELECT preset, count(*) AS n FROM JobCreated GROUP BY preset ORDER BY preset", tmp_path, None)
    presets: dict[str, int] = {}
    for e in created:
        presets[e.data["preset"]] = presets.get(e.data["preset"], 0) + 1
    assert got.columns == ["preset", "n"] and dict(got.rows) == presets
    assert run("SELECT count(*) FROM events", tmp_path, None).rows == [(len(events),)]
    # a read model without an export comes from PostgreSQL, read-only
    with psycopg.connect(settings.effective_database_url) as conn:
        (jobs,) = conn.execute("SELECT count(*) FROM palette_read.jobs_log").fetchone() or (0,)
    assert run("SELECT count(*) FROM jobs_log", tmp_path, settings.effective_database_url).rows == [(jobs,)]
    assert len(run("SELECT * FROM range(50)", None, None, limit=7).rows) == 7
    assert run("SELECT * FROM range(50)", None, None, limit=7).truncated
    for sql_text, why in (("DELETE FROM JobCreated", "only SELECT"), ("CREATE TABLE t (a int)", "only SELECT"),
                          ("SELECT 1; SELECT 2", "one statement"), ("SELEC 1", "Parser Error"),
                          (f"COPY (SELECT 1) TO '{tmp_path}/x.csv'", "only SELECT"),
                          ("SELECT * FROM read_csv('/etc/passwd')", "Permission"),
                          ("SELECT * FROM nowhere", "Catalog Error")):
        with pytest.raises(QueryError, match=why):
            run(sql_text, tmp_path, None)
    assert not (tmp_path / "x.csv").exists()


def test_cli_errors_are_one_line(log, settings, tmp_path, monkeypatch, capsys):
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    assert cli.main(["query", "DROP TABLE users", "--no-db"]) == 2
    assert cli.main(["query", "SELECT * FROM JobCreated", "--data", str(tmp_path / "none")]) == 2
    assert cli.main(["replay", "all", "--format", "parquet"]) == 2
    assert cli.main(["replay", "all", "--format", "parquet", "--type", "Nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith(("palette query:", "palette replay all:")) for line in err), err
    assert cli.main(["replay", "all", "--format", "parquet", "--out", str(tmp_path / "ok")]) == 0
    assert cli.main(["query", "SELECT count(*) AS n FROM events", "--data", str(tmp_path / "ok"), "--format",
                     "json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == [{"n": sum(1 for _ in log.all())}]


NOW = {"_type_": "datetime_iso", "_data_": "2026-11-22T01:38:20.174777+00:00"}
UNREADABLE_AT = datetime(1970, 1, 1, tzinfo=UTC)
CREATED = {"timestamp": NOW, "user_id": {"_type_": "uuid_hex", "_data_": RULE.hex}, "preset": "seller", "item_count": 2}


@pytest.mark.parametrize(("topic", "odd", "want"), [
    ("JobCreated", {"preset": "interior", "item_count": 3}, {"preset": None}),  # no timestamp: unreadable
    ("JobCreated", {"timestamp": "yesterday", "preset": "interior"}, {"preset": None}),
    ("JobCreated", {"timestamp": {**NOW, "_data_": "2026-11-22T01:38:20"}, "preset": "interior"},
     {"preset": None}),  # a time without its UTC offset: unreadable
    ("JobCreated", {**CREATED, "item_count": "three"}, {"preset": "seller", "item_count": None}),
    ("JobCreated", {**CREATED, "item_count": 2**70}, {"preset": "seller", "item_count": None}),
    ("JobFinished", {"timestamp": NOW, "status": ["done"]}, {"status": '["done"]'}),
    ("JobCreated", [CREATED, {**CREATED, "preset": "interior"}], {"preset": None}),  # two objects on its line
])
def test_an_event_arrow_cannot_read_is_exported_as_the_replay_reads_it(settings, schema, tmp_path, topic, odd,
                                                                        want):
    """A stored state on one line of JSON that the replay reads as unreadable (at the epoch) or
    with a field of another type than its class says goes through the envelope codec, beside the
    events Arrow reads, a field its column cannot hold as null: such an event ended the whole
    export with Arrow's error (a traceback), and two objects on one line were two rows, one of
    them no event (no position, no stream)."""
    app = PaletteApplication(env=event_store_env(settings, schema=schema))
    try:
        table = sql.Identifier(schema, app.recorder.events_table_name)
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            for name, state in (("JobCreated", CREATED), (topic, odd), ("JobCreated", CREATED)):
                conn.execute(sql.SQL("INSERT INTO {} (originator_id, originator_version, topic, state) "
                                     "VALUES (%s, 1, %s, %s)").format(table),
                             [uuid.uuid4(), f"domain.job:Job.{name}",
                              b"".join(json.dumps(one).encode() for one in (state if isinstance(state, list)
                                                                              else [state]))])
        events = list(Replayer(app).all())
        stats = export_log(app.recorder, app.mapper.transcoder, tmp_path / "log")
        assert stats.events == len(events) == 3
        # what the dataset cannot show is counted, for the command to say (a null reads as absent)
        unreadable = "_unreadable" in events[1].data
        nulled = 0 if unreadable else list(want.values()).count(None)
        assert (stats.unreadable, stats.nulled) == (int(unreadable), nulled)
        for env in events:
            row = _rows(tmp_path / "log", env.type)[env.id]
            assert (row["stream_id"], row["version"], row["timestamp"]) == (str(env.stream_id), 1, env.timestamp)
            if env.id == 2:
                assert {k: row[k] for k in want} == want
                assert (env.timestamp == UNREADABLE_AT) == ("_unreadable" in env.data)
            else:
                assert (row["user_id"], row["preset"], row["item_count"]) == (str(RULE), "seller", 2)
    finally:
        app.close()


def test_a_read_model_the_database_has_no_table_for_is_refused_in_one_line(fresh_db, tmp_path):
    """A query naming a read model on a database whose read models were never made (the stack's
    projector never ran there) is refused as a query (one line); it escaped as the export's
    error, a traceback from `palette query`."""
    with pytest.raises(QueryError, match=r"no read model table palette_read\.users"):
        run("SELECT count(*) FROM users", None, fresh_db)


def test_an_erased_users_sealed_fields_are_exported_as_erased_and_no_one_elses(log, service, tmp_path):  # noqa: F811
    """The export reads the log as stored: a rule's name is its user's sealed text, which for an
    erased user (``erased``, as the CLI reads the tombstones) must leave as "erased", not as the
    ciphertext of a key destroyed or not yet (the same guarantee as the replay's)."""
    preset = "interior"
    named: dict[str, tuple[uuid.UUID, uuid.UUID]] = {}
    for who in ("gone", "kept"):
        user_id, _ = service.register(f"export-{who}-{uuid.uuid4().hex}").value
        edits = {"wall": {"action": "recolor", "value": "#ffffff"}}
        rule_id = service.create_rule(user_id, f"{who}'s kitchen", preset, edits).value
        named[who] = (user_id, rule_id)
    gone, kept = named["gone"][0], named["kept"][0]
    export_log(service.app.recorder, service.app.mapper.transcoder, tmp_path, erased={gone})
    names = {r["stream_id"]: r["name"] for r in _rows(tmp_path, "RuleCreated").values()}
    assert names[str(named["gone"][1])] == "erased"
    assert names[str(named["kept"][1])].startswith(f"sealed:v1:{kept}:")
    assert service.rule_name(names[str(named["kept"][1])]) == "kept's kitchen"
