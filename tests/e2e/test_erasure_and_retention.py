"""Erasure (DELETE /me, crypto-shredding) and retention (the sweeper) on the real stack: what a
GDPR request and the retention period must leave behind, checked where it lives — S3's listing,
the event store's bytes, the read models, the ledger's chain."""

from __future__ import annotations

import contextlib
import uuid
from datetime import timedelta

import httpx
import psycopg
import pytest
from psycopg import sql

from adapters import query
from adapters.bootstrap import build_sweeper, open_event_store
from adapters.keyring import all_erased
from domain.contracts.personal import ERASED
from infra.s3 import s3_client
from projections import audit
from projections.log import events_table
from projections.models import READ_MODELS
from projections.models.jobs_log import JOBS_LOG
from projections.replay import Replayer
from projections.store import unapplied
from tests.integration.test_stack import wait_until
from tests.put_back import rows_put_back, rows_refolded

from .conftest import Client
from .test_data_lifecycle import _objects
from .test_lifecycle import EDITS, callback, create_uploaded_job
from .test_staff_roles import staff_headers

RULE_NAME = "Grandma's living room, 12 Rue des Lilas"


def _register(http: httpx.Client, device: str) -> httpx.Response:
    return http.post("/auth/anon", json={"device_hash": device})


def _stored_text(app, settings, user_id: str) -> str:  # type: ignore[no-untyped-def]
    """Every stored event state that names the user, as text (what a database dump holds)."""
    table = sql.Identifier(app.recorder.datastore.schema, app.recorder.events_table_name)
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        rows = conn.execute(sql.SQL("SELECT convert_from(state, 'UTF8') FROM {} WHERE originator_id = %s "
                                    "OR position(%s in convert_from(state, 'UTF8')) > 0").format(table),
                            [user_id, user_id]).fetchall()
    return "\n".join(r[0] for r in rows)


def test_erasing_a_user_shreds_personal_fields_deletes_objects_and_keeps_the_ledger(http, settings):
    device = f"device-{uuid.uuid4().hex}"
    first = _register(http, device)
    user_id = first.json()["data"]["user_id"]
    client = Client.__new__(Client)
    client.http, client.token, client.user_id = http, first.json()["data"]["token"], user_id
    client.headers = {"Authorization": f"Bearer {client.token}"}
    rule = client.data("POST", "/rules", 201, json={"name": RULE_NAME, "preset_id": "interior", "concepts": EDITS})
    assert rule["name"] == RULE_NAME  # opened for its owner
    assert [r["name"] for r in client.data("GET", "/rules")["items"]] == [RULE_NAME]  # from the read model too
    client.data("POST", "/webhooks", 201, json={"url": "http://127.0.0.1:9/hook", "events": ["job.finished"]})
    job_id = create_uploaded_job(client, 2)
    client.data("POST", f"/jobs/{job_id}/execute", json={"concepts": EDITS})  # running: erasure cancels it
    assert _objects(settings, user_id)
    app = open_event_store(settings)
    stored = _stored_text(app, settings, user_id)
    assert RULE_NAME not in stored and "hmac-sha256:" not in stored and "sealed:v1:" in stored  # sealed from the start
    credits_before = client.data("GET", "/me")["credits"]

    erased = client.data("DELETE", "/me")
    assert erased["erased"] is True and erased["webhooks_deleted"] == 1 and erased["objects_deleted"] >= 2
    assert _objects(settings, user_id) == set()  # S3's own listing
    assert client.call("GET", "/me").status_code == 401  # the token is refused at once
    assert client.call("GET", "/jobs").status_code == 401
    again = _register(http, device)  # the same device: a new user (without sign-up credits)
    assert again.status_code == 201 and again.json()["data"]["user_id"] != user_id
    assert _register(http, device).json()["data"]["user_id"] == again.json()["data"]["user_id"]  # and it stays

    try:
        with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
            erased_users = all_erased(conn)
            assert uuid.UUID(user_id) in erased_users
            replayed = {e.type: e.data for e in Replayer(app, erased_users).stream(uuid.UUID(user_id))}
            assert replayed["Registered"]["device_key"] == ERASED and "Erased" in replayed
            assert [e.data["name"] for e in Replayer(app, erased_users).stream(uuid.UUID(rule["id"]))] == [ERASED]
            asked = query.run(f"SELECT name FROM rules WHERE id = '{uuid.UUID(rule['id'])}'", None,  # noqa: S608
                              settings.effective_database_url)
            assert asked.rows == [(ERASED,)]  # what an analyst's SQL over the read models shows
            key_rows = conn.execute("SELECT count(*) FROM palette_user_keys WHERE user_id = %s", [user_id]).fetchone()
            assert key_rows == (0,)
            wait_until(lambda: conn.execute("SELECT device_hash FROM palette_read.users WHERE id = %s",
                                            [user_id]).fetchone() == (ERASED,), what="the users model to erase")
            # the ledger keeps its amounts: the running job's reservation came back, nothing else moved
            state = Replayer(app, erased_users).state(uuid.UUID(user_id))["state"]
            assert (state["balance"], state["reservations"], state["erased"]) == (credits_before + 2, {}, True)
            wait_until(lambda: all(unapplied(conn, m, events_table(app.recorder))[0] == 0
                                   for m in READ_MODELS.values()), timeout_s=60, what="projections to drain")
            breaks = audit.verify(conn).breaks
            assert breaks == []
            with conn.transaction():
                report = audit.reconcile(conn, app.recorder, app.mapper.transcoder)
            assert report.ok, report.differences
            # The device's next user holds no ledger entry (no sign-up credits), and is a user all
            # the same: its balance is zeros, not the 404 of an id no one has.
            successor = again.json()["data"]["user_id"]
            assert conn.execute("SELECT count(*) FROM palette_read.billing_events WHERE user_id = %s",
                                [successor]).fetchone() == (0,)
            balance = http.get("/audit/balance", params={"user_id": successor, "as_of": "2100-01-01T00:00:00Z"},
                               headers=staff_headers(settings, "auditor"))
            assert balance.status_code == 200, balance.text
            assert (balance.json()["data"]["balance"], balance.json()["data"]["entries"]) == (0, 0)
    finally:
        app.close()
    assert client.call("DELETE", "/me").status_code == 401  # once is all a token gets


def _one_done(client: Client, http: httpx.Client, settings) -> str:  # type: ignore[no-untyped-def]
    """A job of one photo, executed and done (its credit spent)."""
    job_id = create_uploaded_job(client, 1)
    client.data("POST", f"/jobs/{job_id}/execute", json={"concepts": EDITS})
    callback(http, settings.callback_secret, job_id, {"idx": 0, "status": "done", "idempotency_key": f"{job_id}:0"})
    return job_id


def _finished_at(settings, *job_ids: str) -> list:  # type: ignore[no-untyped-def]
    """Each job's finished_at in jobs_log, once the projector has folded every one as finished."""
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        def read() -> list:  # type: ignore[type-arg]
            rows = dict(conn.execute("SELECT id::text, finished_at FROM palette_read.jobs_log WHERE id = ANY(%s)",
                                     [list(job_ids)]).fetchall())
            return [rows.get(j) for j in job_ids]
        wait_until(lambda: None not in read(), what="the jobs to be folded as finished")
        return read()


@pytest.mark.parametrize("items", [2])
def test_the_sweeper_deletes_the_objects_of_jobs_past_retention_and_nothing_newer(client, http, settings, items):
    old = create_uploaded_job(client, items)
    client.data("POST", f"/jobs/{old}/execute", json={"concepts": EDITS})
    for idx in range(items):  # one item paid for: the job keeps its objects the whole retention period
        callback(http, settings.callback_secret, old, {"idx": idx, "status": "done" if idx == 0 else "failed",
                                                       "error": "" if idx == 0 else "x",
                                                       "idempotency_key": f"{old}:{idx}"})
    newer = _one_done(client, http, settings)
    old_at, newer_at = _finished_at(settings, old, newer)
    cutoff = old_at + timedelta(microseconds=1)
    assert newer_at >= cutoff
    inputs = [k for k in _objects(settings, client.user_id) if old in k]
    assert len(inputs) == items
    sweeper = build_sweeper(settings)
    try:
        report = sweeper.step(now=cutoff + timedelta(days=settings.retention_days))
        assert report.jobs_expired >= 1 and report.objects_deleted >= items
        left = _objects(settings, client.user_id)
        assert not any(old in k for k in left) and any(newer in k for k in left)
        assert sweeper.step(now=cutoff + timedelta(days=settings.retention_days)).jobs_expired == 0  # once
    finally:
        sweeper.close()
    listed = client.data("GET", f"/jobs/{old}")  # the job stays; its objects are gone, and so are its links
    assert listed["status"] == "done" and listed["objects_expired"] is True
    assert listed["items"][0]["status"] == "done" and listed["items"][0]["output_url"] is None
    assert client.data("GET", f"/jobs/{newer}")["objects_expired"] is False
    app = open_event_store(settings)
    try:
        types = [e.type for e in Replayer(app).stream(uuid.UUID(old))]
    finally:
        app.close()
    assert types[-1] == "ObjectsExpired" and types.count("ObjectsExpired") == 1


def test_an_upload_landing_after_a_job_was_deleted_or_its_user_erased_is_swept(client, other, settings):
    from datetime import UTC, datetime

    from adapters.retention import LATE_UPLOADS_S
    from domain.contracts.keys import output_key

    job_id = create_uploaded_job(client, 1)
    client.data("POST", f"/jobs/{job_id}/cancel")
    client.data("DELETE", f"/jobs/{job_id}")
    erased_job = create_uploaded_job(other, 1)
    other.data("DELETE", "/me")
    s3 = s3_client(settings)
    late = [output_key(uuid.UUID(client.user_id), uuid.UUID(job_id), 0),
            output_key(uuid.UUID(other.user_id), uuid.UUID(erased_job), 0)]
    for key in late:  # what a worker still busy with the item would upload
        s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=b"late")
    assert all(any(k == key for k in _objects(settings, user)) for key, user in zip(late, (client.user_id,
                                                                                          other.user_id), strict=True))
    sweeper = build_sweeper(settings)
    try:
        sweeper.step(now=datetime.now(UTC))  # too soon: a late upload may still come
        assert _objects(settings, client.user_id) | _objects(settings, other.user_id) >= set(late)
        report = sweeper.step(now=datetime.now(UTC) + timedelta(seconds=LATE_UPLOADS_S + 60))
    finally:
        sweeper.close()
    assert report.objects_deleted >= 2
    assert not (_objects(settings, client.user_id) | _objects(settings, other.user_id)) & set(late)


def test_another_api_process_learns_of_an_erasure_from_the_tombstones(settings):
    from psycopg_pool import ConnectionPool

    from adapters.erasure import ErasedUsers
    from adapters.keyring import ensure_schema as ensure_keyring
    from adapters.keyring import request_erasure
    from application.personal import MemoryKeyring, Sealer

    user_id = uuid.uuid4()
    with ConnectionPool(settings.effective_database_url, min_size=1, max_size=1,
                        kwargs={"autocommit": True}) as pool:
        with pool.connection() as conn:
            ensure_keyring(conn)
        sealer = Sealer(MemoryKeyring())  # the other process's, holding the user's key
        sealer.prepare(user_id)
        elsewhere = ErasedUsers(pool, token_ttl_s=3600, on_erased=sealer.evict)
        elsewhere.refresh()
        assert user_id not in elsewhere and sealer.has_key(user_id)
        with pool.connection() as conn:
            request_erasure(conn, user_id)
        elsewhere.refresh()
        assert user_id in elsewhere and not sealer.has_key(user_id)  # its key out of memory too
        sealer.prepare(user_id)  # read again before the erasure destroyed it
        elsewhere.refresh()
        assert not sealer.has_key(user_id)  # dropped again: the tombstone is read for LATE_S more
        past = ErasedUsers(pool, token_ttl_s=-3600)  # tokens live less than the erasure is old: forgotten
        past.refresh()
        assert user_id not in past
        lapsed = ErasedUsers(pool, token_ttl_s=0)  # a token that lapsed just now passes within the verifier's leeway
        lapsed.refresh()
        assert user_id in lapsed


def test_an_erasure_made_here_is_refused_before_any_refresh_reads_its_tombstone(settings, monkeypatch):
    """DELETE /me adds the user at once; a refresh whose read missed the tombstone (its
    transaction not yet visible) must not drop it."""
    from psycopg_pool import ConnectionPool

    from adapters import keyring
    from adapters.erasure import ErasedUsers

    monkeypatch.setattr(keyring, "erased_since", lambda *_: [])  # the tombstone, not yet visible
    user_id = uuid.uuid4()
    with ConnectionPool(settings.effective_database_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        here = ErasedUsers(pool, token_ttl_s=3600)
        here.add(user_id)
        here.refresh()
        assert user_id in here


def test_a_refresh_of_erased_users_reads_only_the_recent_tombstones_and_misses_none(settings, monkeypatch):
    """The window of a token's lifetime can hold hundreds of thousands of erasures: after the
    first, a refresh reads only those requested since the newest it has (less LATE_S, for a
    transaction that committed late), and still knows every erasure in the window."""
    from psycopg_pool import ConnectionPool

    from adapters import keyring
    from adapters.erasure import LATE_S, ErasedUsers
    from adapters.keyring import ensure_schema as ensure_keyring

    reads: list[int] = []
    erased_since = keyring.erased_since

    def counted(*args):
        found = erased_since(*args)
        reads.append(len(found))
        return found

    monkeypatch.setattr(keyring, "erased_since", counted)
    hour_ago, now_ = [uuid.uuid4() for _ in range(30)], uuid.uuid4()
    with ConnectionPool(settings.effective_database_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool, \
            psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        ensure_keyring(conn)

        def tombstones(users, ago_s):
            conn.cursor().executemany(
                "INSERT INTO palette_erasures (user_id, requested_at) VALUES (%s, now() - %s * interval '1 second')",
                [(u, ago_s) for u in users])

        tombstones(hour_ago, 3600)
        tombstones([now_], 0)
        users = ErasedUsers(pool, token_ttl_s=7200)
        users.refresh()
        assert all(u in users for u in [*hour_ago, now_]) and reads[-1] >= 31
        users.refresh()
        assert reads[1] <= reads[0] - len(hour_ago)  # not the hour-old ones again (other tests' recent ones, maybe)
        late = uuid.uuid4()
        tombstones([late], LATE_S / 2)  # requested before the newest known, committed only now
        users.refresh()
        assert late in users and all(u in users for u in hour_ago)


def test_each_refresh_reads_from_the_newest_erasure_it_knows_as_that_newest_moves_up(settings, monkeypatch):
    """Not from the first refresh's newest for ever: once a newer tombstone is read, the next
    refresh reads only from it (less LATE_S). Over this test's own users alone (the others'
    tombstones come and go)."""
    from psycopg_pool import ConnectionPool

    from adapters import keyring
    from adapters.erasure import ErasedUsers
    from adapters.keyring import ensure_schema as ensure_keyring

    older, newer = uuid.uuid4(), uuid.uuid4()
    read: list[set[uuid.UUID]] = []
    erased_since = keyring.erased_since

    def mine(*args):  # type: ignore[no-untyped-def]
        found = [(u, at) for u, at in erased_since(*args) if u in (older, newer)]
        read.append({u for u, _ in found})
        return found

    monkeypatch.setattr(keyring, "erased_since", mine)
    with ConnectionPool(settings.effective_database_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool, \
            psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        ensure_keyring(conn)

        def tombstone(user_id: uuid.UUID, ago_s: float) -> None:
            conn.execute("INSERT INTO palette_erasures (user_id, requested_at) "
                         "VALUES (%s, now() - %s * interval '1 second')", [user_id, ago_s])

        tombstone(older, 3000)
        users = ErasedUsers(pool, token_ttl_s=7200)
        users.refresh()
        tombstone(newer, 1000)  # LATE_S is 300: well after the older one
        users.refresh()
        users.refresh()
        assert read == [{older}, {older, newer}, {newer}]
        assert older in users and newer in users


def test_an_operator_erases_from_the_command_line_with_one_line_answers(client, settings, monkeypatch, capsys):
    from adapters import cli

    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    nobody = uuid.uuid4()
    assert cli.main(["admin", "erase", str(nobody)]) == 2  # no such user
    assert capsys.readouterr().err.strip() == f"palette admin erase: {nobody}: user not found; nothing erased"
    assert cli.main(["admin", "erase", client.user_id]) == 0
    assert "recorded now" in capsys.readouterr().out
    assert cli.main(["admin", "erase", client.user_id]) == 0  # again: finished again, nothing new recorded
    assert "already erased" in capsys.readouterr().out
    wait_until(lambda: client.call("GET", "/presets").status_code == 401, timeout_s=10,
               what="the API process to learn of the erasure from the tombstones")
    assert client.call("GET", "/me").status_code == 401
    with pytest.raises(SystemExit) as bad:
        cli.main(["admin", "erase", "not-a-uuid"])
    assert bad.value.code == 2


def test_an_operator_erasure_the_object_store_refuses_is_one_line_and_finished_by_running_it_again(
        client, settings, monkeypatch, capsys):
    """S3 answering an error (here: no such bucket) fails only the objects' step, the last but
    one: the command says so in one line, exit 1, not a traceback, and running it again finishes."""
    from adapters import cli

    create_uploaded_job(client, 1)
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PALETTE_S3_BUCKET", f"no-such-bucket-{uuid.uuid4().hex[:8]}")
    assert cli.main(["admin", "erase", client.user_id]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"palette admin erase: {client.user_id} erased but its objects not deleted: ")
    assert "NoSuchBucket" in err and "\n" not in err and "run it again" in err
    assert _objects(settings, client.user_id) != set()  # the given: still there
    monkeypatch.setenv("PALETTE_S3_BUCKET", settings.s3_bucket)
    assert cli.main(["admin", "erase", client.user_id]) == 0
    assert "already erased" in capsys.readouterr().out
    assert _objects(settings, client.user_id) == set()


def test_erasing_a_user_registered_before_device_keys_drops_the_raw_device_hash_from_the_stored_event(settings):
    from datetime import UTC, datetime

    from adapters import bootstrap
    from adapters.erasure import erase
    from domain.user import REDACTED_DEVICE_KEY
    from tests.unit.test_device_key import store_v1_user

    raw = f"legacy-device-{uuid.uuid4().hex}"
    container = bootstrap.build(settings, pool_size=2)
    try:
        user_id = store_v1_user(container.app, raw, datetime.now(UTC))  # now: the session's audit periods see it
        recorder = container.app.recorder
        table = sql.Identifier(recorder.datastore.schema, recorder.events_table_name)

        def stored_with_raw() -> int:
            with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
                row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE position(%s::bytea in state) > 0")
                                   .format(table), [raw.encode()]).fetchone()
            return int(row[0]) if row else -1

        assert stored_with_raw() == 1  # the given: what the code before device keys stored
        done = erase(container.service, container.read_pool, container.s3, settings.s3_bucket, user_id)
        assert done.recorded and stored_with_raw() == 0
        events = list(Replayer(container.app).stream(user_id))
        assert [e.type for e in events] == ["Registered", "CreditsGranted", "Erased"]
        assert events[0].data["device_key"] == REDACTED_DEVICE_KEY and events[0].data["plan"] == "free"
    finally:
        container.close()


def test_erasing_a_user_whose_rules_were_named_before_sealing_drops_their_names_everywhere(http, settings):
    """A rule saved by the code before sealing holds its name in clear in its stored events, which
    no key sealed: erasure must drop it there, from the rules read model and from replays."""
    from datetime import UTC, datetime

    from eventsourcing.persistence import StoredEvent

    from adapters import bootstrap
    from adapters.erasure import erase
    from tests.unit.test_device_key import store_v1_user

    names = (f"Old flat {uuid.uuid4().hex}", f"Old flat renamed {uuid.uuid4().hex}")
    container = bootstrap.build(settings, pool_size=2)
    try:
        at = datetime.now(UTC)
        user_id = store_v1_user(container.app, f"legacy-device-{uuid.uuid4().hex}", at)
        rule_id = uuid.uuid4()
        encode = container.app.mapper.transcoder.encode
        edits = {"wall": {"action": "recolor", "value": "#5b7f95"}}
        container.app.recorder.insert_events([  # as the code before sealing stored a rule
            StoredEvent(rule_id, 1, "domain.rule:Rule.RuleCreated", encode(
                {"timestamp": at, "originator_topic": "domain.rule:Rule", "user_id": user_id, "name": names[0],
                 "preset_id": "interior", "concepts": edits, "protect": []})),
            StoredEvent(rule_id, 2, "domain.rule:Rule.RuleUpdated", encode(
                {"timestamp": at, "name": names[1], "concepts": edits, "protect": []})),
            StoredEvent(user_id, 3, "domain.user:User.RuleSlotTaken", encode({"timestamp": at, "rule_id": rule_id})),
        ])
        recorder = container.app.recorder
        table = sql.Identifier(recorder.datastore.schema, recorder.events_table_name)

        def stored_names() -> int:
            with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
                row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE position(%s::bytea in state) > 0 "
                                           "OR position(%s::bytea in state) > 0").format(table),
                                   [names[0].encode(), names[1].encode()]).fetchone()
            return int(row[0]) if row else -1

        def read_model_name() -> str | None:
            with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
                row = conn.execute("SELECT name FROM palette_read.rules WHERE id = %s", [rule_id]).fetchone()
            return row[0] if row else None

        snapshots = container.app.snapshots.recorder  # a snapshot the old rule's 100th event had made
        snapshots.insert_events([StoredEvent(rule_id, 2, "eventsourcing.domain:Snapshot", encode(
            {"timestamp": at, "topic": "domain.rule:Rule", "state": {"name": names[1]}}))])
        snapshot_table = sql.Identifier(snapshots.datastore.schema, snapshots.events_table_name)

        def snapshots_of_the_rule() -> int:
            with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
                row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE originator_id = %s").format(snapshot_table),
                                   [rule_id]).fetchone()
            return int(row[0]) if row else -1

        assert stored_names() == 2 and snapshots_of_the_rule() == 1
        wait_until(lambda: read_model_name() == names[1], timeout_s=30, what="the legacy rule's row")
        erase(container.service, container.read_pool, container.s3, settings.s3_bucket, user_id)
        assert stored_names() == 0 and snapshots_of_the_rule() == 0
        assert read_model_name() == ERASED
        events = list(Replayer(container.app).stream(rule_id))
        assert [e.data["name"] for e in events] == [ERASED, ERASED]
    finally:
        container.close()


def test_a_job_that_spent_nothing_keeps_its_objects_a_day_and_a_paid_one_the_retention_period(
        client, other, http, settings):
    """Canceling refunds everything, so the objects of a job canceled (or failed whole) are not
    kept a month for free: after PALETTE_UNPAID_RETENTION_DAYS they are deleted and the job
    cannot be rerun; a job with an item done, finished as late, keeps its objects."""
    from adapters.retention import LATE_UPLOADS_S

    canceled = create_uploaded_job(client, 2)
    client.data("POST", f"/jobs/{canceled}/cancel")
    failed = create_uploaded_job(other, 1)
    other.data("POST", f"/jobs/{failed}/execute", json={"concepts": EDITS})
    callback(http, settings.callback_secret, failed, {"idx": 0, "status": "failed", "error": "x",
                                                      "idempotency_key": f"{failed}:0"})
    paid = _one_done(client, http, settings)
    partly = create_uploaded_job(other, 2)  # one item done, then canceled: one credit spent
    other.data("POST", f"/jobs/{partly}/execute", json={"concepts": EDITS})
    callback(http, settings.callback_secret, partly, {"idx": 0, "status": "done", "idempotency_key": f"{partly}:0"})
    other.data("POST", f"/jobs/{partly}/cancel")
    last = max(_finished_at(settings, canceled, failed, paid, partly))
    days = settings.unpaid_retention_days
    assert days < settings.retention_days
    sweeper = build_sweeper(settings)
    with (contextlib.closing(sweeper), psycopg.connect(settings.effective_database_url, autocommit=True) as conn,
          contextlib.closing(open_event_store(settings)) as app):
        sweeper.step(now=last + timedelta(days=days) - timedelta(seconds=LATE_UPLOADS_S))  # a day not yet over
        held = _objects(settings, client.user_id) | _objects(settings, other.user_id)
        assert all(any(j in k for k in held) for j in (canceled, failed, paid, partly))
        assert client.call("POST", f"/jobs/{canceled}/rerun").status_code == 201  # meanwhile, a rerun works
        with rows_refolded(conn, app, JOBS_LOG, [paid, partly]):  # a read model astray
            conn.execute("UPDATE palette_read.jobs_log SET status = 'canceled', done_items = 0 WHERE id = %s", [paid])
            conn.execute("UPDATE palette_read.jobs_log SET done_items = 0 WHERE id = %s", [partly])
            report = sweeper.step(now=last + timedelta(days=days, seconds=1))
    assert report.jobs_expired >= 2
    held = _objects(settings, client.user_id) | _objects(settings, other.user_id)
    assert not any(canceled in k or failed in k for k in held)
    assert any(paid in k for k in held) and any(partly in k for k in held)
    r = client.call("POST", f"/jobs/{canceled}/rerun")
    assert r.status_code == 409 and r.json()["error"]["code"] == "INVALID_STATE", r.text
    app = open_event_store(settings)
    try:
        expired = [e for e in Replayer(app).stream(uuid.UUID(canceled)) if e.type == "ObjectsExpired"]
    finally:
        app.close()
    assert [e.data["retention_days"] for e in expired] == [days]


def test_what_an_upload_link_admitted_beyond_the_largest_photo_is_deleted_once_the_links_expired(client, settings):
    """A presigned PUT bounds no size: an input or a mask larger than MAX_INPUT_BYTES, sent while
    the job's links live, is deleted once they have expired; what is within the bound stays."""
    from datetime import UTC, datetime

    from adapters.retention import LATE_UPLOADS_S
    from domain.contracts.keys import MAX_INPUT_BYTES, input_key, mask_key, used_mask_key

    job_id = create_uploaded_job(client, 2)
    user, job = uuid.UUID(client.user_id), uuid.UUID(job_id)
    s3 = s3_client(settings)
    big = b"\0" * (MAX_INPUT_BYTES + 1)
    oversized = [input_key(user, job, 1), mask_key(user, job, 0, "wall")]
    for key in oversized:  # what a client sent through the job's links, after its confirm-upload
        s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=big)
    small_mask = mask_key(user, job, 0, "floor")
    s3.put_object(Bucket=settings.s3_bucket, Key=small_mask, Body=b"\x89PNG small")
    at_the_bound = [input_key(user, job, 0), used_mask_key(user, job, 0, "wall")]  # the worker's own, too
    for key in at_the_bound:
        s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=big[:MAX_INPUT_BYTES])
    sweeper = build_sweeper(settings)
    try:
        sweeper.step(now=datetime.now(UTC))  # the links may still be in use
        assert set(oversized) <= _objects(settings, client.user_id)
        report = sweeper.step(now=datetime.now(UTC) + timedelta(seconds=LATE_UPLOADS_S + 60))
    finally:
        sweeper.close()
    assert report.objects_deleted >= 2
    left = _objects(settings, client.user_id)
    assert not set(oversized) & left
    assert {small_mask, *at_the_bound} <= left


def test_a_paid_job_keeps_its_objects_the_whole_retention_period_however_it_finished(client, other, http, settings):
    """Done, or canceled once an item was done (a credit spent): its objects stay until the
    retention period is over — still there at its very end — then go, ObjectsExpired saying after
    how many days, and the pass's cursor stands past them (the next pass does not read them again)."""
    done = _one_done(client, http, settings)
    canceled = create_uploaded_job(other, 2)
    other.data("POST", f"/jobs/{canceled}/execute", json={"concepts": EDITS})
    callback(http, settings.callback_secret, canceled, {"idx": 0, "status": "done",
                                                        "idempotency_key": f"{canceled}:0"})
    other.data("POST", f"/jobs/{canceled}/cancel")
    finished = dict(zip((done, canceled), _finished_at(settings, done, canceled), strict=True))
    first, last = sorted(finished, key=lambda j: finished[j])
    period = timedelta(days=settings.retention_days)
    sweeper = build_sweeper(settings)
    try:
        sweeper.step(now=finished[last] + period)  # the last finished exactly the retention period ago
        held = _objects(settings, client.user_id) | _objects(settings, other.user_id)
        assert not any(first in k for k in held) and any(last in k for k in held)
        sweeper.step(now=finished[last] + period + timedelta(microseconds=1))
    finally:
        sweeper.close()
    held = _objects(settings, client.user_id) | _objects(settings, other.user_id)
    assert not any(done in k or canceled in k for k in held)
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        cursor = conn.execute("SELECT at FROM palette_sweeps WHERE name = 'retention'").fetchone()
    assert cursor is not None and cursor[0] >= finished[last]
    app = open_event_store(settings)
    try:
        for job_id in (done, canceled):
            expired = [e for e in Replayer(app).stream(uuid.UUID(job_id)) if e.type == "ObjectsExpired"]
            assert [e.data["retention_days"] for e in expired] == [settings.retention_days], job_id
    finally:
        app.close()


def test_an_unpaid_job_whose_objects_cannot_be_deleted_holds_back_no_other_nor_the_rest_of_the_pass(
        client, other, settings, monkeypatch):
    """S3 refuses to delete one canceled job's objects: it is logged and left to the retention
    pass; the other unpaid job's objects go all the same and the pass goes on."""
    from adapters import retention

    stuck, fine = create_uploaded_job(client, 1), create_uploaded_job(other, 1)
    client.data("POST", f"/jobs/{stuck}/cancel")
    other.data("POST", f"/jobs/{fine}/cancel")
    last = max(_finished_at(settings, stuck, fine))
    real_delete = retention.delete_prefixes

    def delete_prefixes(s3, bucket, prefixes):  # type: ignore[no-untyped-def]
        prefixes = list(prefixes)
        if any(stuck in p for p in prefixes):
            raise OSError("1 object(s) not deleted: AccessDenied (injected)")
        return real_delete(s3, bucket, prefixes)

    monkeypatch.setattr(retention, "delete_prefixes", delete_prefixes)
    sweeper = build_sweeper(settings)
    try:
        report = sweeper.step(now=last + timedelta(days=settings.unpaid_retention_days, seconds=1))
    finally:
        sweeper.close()
    assert report.jobs_expired >= 1
    assert not any(fine in k for k in _objects(settings, other.user_id))
    assert any(stuck in k for k in _objects(settings, client.user_id))  # the retention pass's, later


def test_an_unpaid_job_whose_finish_is_folded_after_a_pass_is_expired_by_the_next(client, other, http, settings):
    """jobs_log may get a job's finish late (its projector behind). A pass that finds no unpaid job
    left moves its cursor up to the last finish less PROJECTION_SLACK, not to it: a job folded
    since, having finished within that slack, is expired by the next pass."""
    unpaid = create_uploaded_job(client, 1)
    client.data("POST", f"/jobs/{unpaid}/cancel")
    paid = _one_done(other, http, settings)
    unpaid_at, paid_at = _finished_at(settings, unpaid, paid)
    now = paid_at + timedelta(days=settings.unpaid_retention_days, seconds=1)
    sweeper = build_sweeper(settings)
    with (contextlib.closing(sweeper), psycopg.connect(settings.effective_database_url, autocommit=True) as conn,
          contextlib.closing(open_event_store(settings)) as app):
        with rows_refolded(conn, app, JOBS_LOG, [unpaid]):
            conn.execute("UPDATE palette_read.jobs_log SET finished_at = NULL WHERE id = %s", [unpaid])  # not folded
            sweeper.step(now=now)
            assert any(unpaid in k for k in _objects(settings, client.user_id))
        assert _finished_at(settings, unpaid) == [unpaid_at]  # folded now
        sweeper.step(now=now)
    assert not any(unpaid in k for k in _objects(settings, client.user_id))


def test_a_pass_that_cannot_reach_the_store_leaves_the_unpaid_jobs_to_the_next_pass(client, settings):
    """The object store away for a pass (nobody at its endpoint): the unpaid pass stops at its first
    job, its cursor before it, so the next pass deletes their objects a day after all. It used to
    log each job and move its cursor past them all, leaving their objects the whole retention period."""
    jobs = []
    for _ in range(2):  # one at a time: the free plan runs one job at once
        jobs.append(create_uploaded_job(client, 1))
        client.data("POST", f"/jobs/{jobs[-1]}/cancel")
    now = max(_finished_at(settings, *jobs)) + timedelta(days=settings.unpaid_retention_days, seconds=1)
    away = build_sweeper(settings.model_copy(update={"s3_endpoint": "http://127.0.0.1:1"}))
    try:
        assert away.step(now=now).jobs_expired == 0
    finally:
        away.close()
    assert all(any(j in k for k in _objects(settings, client.user_id)) for j in jobs)
    sweeper = build_sweeper(settings)
    try:
        assert sweeper.step(now=now).jobs_expired >= 2
    finally:
        sweeper.close()
    assert not any(j in k for k in _objects(settings, client.user_id) for j in jobs)


def test_the_unpaid_cursors_slack_is_an_hour_whatever_the_databases_time_zone(client, other, http, settings):
    """A database whose sessions keep local time (a server's TimeZone, Europe/Paris here) hands
    back finishes in that zone, and an hour taken from one in wall-clock time is no hour across a
    change of clocks: the night clocks go forward, the cursor moved up to the last finish itself,
    so a job folded since, having finished within the hour before, was never expired by the pass."""
    from datetime import UTC, datetime

    unpaid = create_uploaded_job(client, 1)
    client.data("POST", f"/jobs/{unpaid}/cancel")
    paid = _one_done(other, http, settings)
    _finished_at(settings, unpaid, paid)
    last = datetime(2027, 3, 28, 1, 30, tzinfo=UTC)  # 03:30 in Paris, clocks just gone forward (later than any cursor)
    url = settings.effective_database_url
    paris = settings.model_copy(update={
        "database_url": f"{url}{'&' if '?' in url else '?'}options=-c%20TimeZone%3DEurope%2FParis"})
    now = last + timedelta(days=settings.unpaid_retention_days, seconds=1)
    sweeper = build_sweeper(paris)
    with (psycopg.connect(url, autocommit=True) as conn, contextlib.closing(sweeper),
          contextlib.closing(open_event_store(settings)) as app, rows_refolded(conn, app, JOBS_LOG, [paid, unpaid]),
          rows_put_back(conn, sql.Identifier("palette_sweeps"), "name", ["unpaid"], ["at", "id", "position"])):
        conn.execute("UPDATE palette_read.jobs_log SET finished_at = %s WHERE id = %s", [last, paid])
        conn.execute("UPDATE palette_read.jobs_log SET finished_at = NULL WHERE id = %s", [unpaid])  # not folded
        sweeper.step(now=now)
        assert any(unpaid in k for k in _objects(settings, client.user_id))
        # folded now: it finished 45 minutes before the last one
        conn.execute("UPDATE palette_read.jobs_log SET finished_at = %s WHERE id = %s",
                     [last - timedelta(minutes=45), unpaid])
        sweeper.step(now=now)
    assert not any(unpaid in k for k in _objects(settings, client.user_id))
