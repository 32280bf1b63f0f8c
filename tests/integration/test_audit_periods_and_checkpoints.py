"""Auditors' period reports and signed checkpoints on the real stack.

The report's figures are checked against an oracle that folds the raw User events of the log
(``_oracle``: plain arithmetic on what domain/user.py records), not the billing projection the
report reads; the identity must hold on workloads hypothesis generates through the service's
real commands. A consistent rewrite of one user's chain (every later hash recomputed) passes
``verify`` and is caught by ``verify_heads`` against a signed checkpoint; a checkpoint altered
or verified under another key is refused."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from adapters import checkpoints, cli
from adapters.system import SystemClock
from domain.errors import DomainError
from projections import audit
from projections.models.billing_events import ledger_hash
from projections.replay import Replayer

from .test_projections import service, wait_drained, workload  # noqa: F401 - shared module fixture

FIELDS = ("users", "opening", "granted", "placed", "spent", "refunded", "closing", "held_opening", "held_closing")


@pytest.fixture(scope="module")
def busy(apps, service) -> Replayer:  # noqa: F811
    workload(service, 4, random.Random(5))
    return Replayer(service.app)


def _oracle(replayer: Replayer, upto: int, since: Any, until: Any) -> dict[str, dict[str, int]]:
    """Per plan (the user's plan at ``until``), the period's figures folded from the raw events."""
    users: dict[str, dict[str, Any]] = {}
    for e in replayer.all():
        if e.id > upto or e.stream_type != "User" or e.timestamp >= until:
            continue
        u = users.setdefault(str(e.stream_id), {f: 0 for f in FIELDS} | {"plan": "unknown", "rows": 0})
        before, inside = e.timestamp < since, e.timestamp >= since
        d = e.data
        if e.type in ("Registered", "PlanChanged"):
            u["plan"] = d["plan"]
            continue
        if e.type == "CreditsGranted":
            effect, held, flows = d["amount"], 0, {"granted": d["amount"]}
        elif e.type == "CreditsReserved":
            effect, held, flows = -d["amount"], d["amount"], {"placed": d["amount"]}
        elif e.type == "CreditsSettled":
            effect, held = d["refunded"], -(d["spent"] + d["refunded"])
            flows = {"spent": d["spent"], "refunded": d["refunded"]}
        else:
            continue
        u["rows"] += 1
        u["closing"] += effect
        u["held_closing"] += held
        if before:
            u["opening"] += effect
            u["held_opening"] += held
        if inside:
            for k, v in flows.items():
                u[k] += v
    plans: dict[str, dict[str, int]] = {}
    for u in users.values():
        if not u["rows"]:
            continue  # no ledger entry before the period's end: not in the ledger's report either
        p = plans.setdefault(u["plan"], {f: 0 for f in FIELDS})
        p["users"] += 1
        for f in FIELDS[1:]:
            p[f] += u[f]
    return plans


def _figures(f: audit.PeriodFigures) -> dict[str, int]:
    return {name: getattr(f, name) for name in FIELDS}


def _check(report: audit.PeriodReport, replayer: Replayer) -> None:
    assert not report.unfolded, "the ledger had not folded the log up to the report's position"
    want = _oracle(replayer, report.position, report.since, report.until)
    assert {p.plan: _figures(p) for p in report.plans} == want
    total = {f: sum(p[f] for p in want.values()) for f in FIELDS}
    assert _figures(report.total) == total
    t = report.total
    assert t.opening + t.granted - t.spent == t.closing + t.reserved  # the identity, from the oracle's numbers too
    assert total["opening"] + total["granted"] - total["spent"] == total["closing"] + (
        total["held_closing"] - total["held_opening"])
    assert report.ok


def test_a_period_report_equals_the_fold_of_the_raw_log(busy, service, settings):  # noqa: F811
    wait_drained(service, settings)
    events = [e for e in busy.all() if e.stream_type == "User"]
    since, until = events[len(events) // 3].timestamp, events[2 * len(events) // 3].timestamp
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        report = audit.period_report(conn, service.app.recorder, service.app.mapper.transcoder, since, until)
        everything = audit.period_report(conn, service.app.recorder, service.app.mapper.transcoder,
                                         events[0].timestamp - timedelta(days=1),
                                         events[-1].timestamp + timedelta(days=1))
        halfway = audit.period_report(conn, service.app.recorder, service.app.mapper.transcoder,
                                      events[0].timestamp - timedelta(days=1),
                                      events[-1].timestamp + timedelta(days=1), at=events[len(events) // 2].id)
        for start, end in ((until, since), (until, until)):  # an empty period [t, t) is refused too
            with pytest.raises(ValueError, match="after its start"):
                audit.period_report(conn, service.app.recorder, service.app.mapper.transcoder, start, end)
        head = service.app.recorder.max_notification_id()
        with pytest.raises(ValueError, match="not a position of the log"):
            audit.period_report(conn, service.app.recorder, service.app.mapper.transcoder, since, until, at=head + 1)
    _check(report, busy)
    _check(everything, busy)
    _check(halfway, busy)  # the log up to ``at``, nothing after it
    assert halfway.position == events[len(events) // 2].id
    assert report.total.granted > 0 and everything.total.opening == 0
    # the whole history: what is outstanding is every grant not yet spent
    assert everything.total.outstanding == everything.total.granted - everything.total.spent


def test_a_plan_changed_after_the_period_leaves_the_user_under_the_plan_it_had(busy, service, settings):  # noqa: F811
    user_id = service.register(f"period-{uuid.uuid4()}", plan="free").value[0]
    service.grant_credits(user_id, 7, "bonus")
    service.change_plan(user_id, "pro")
    wait_drained(service, settings)
    *_, granted, changed = busy.stream(user_id)
    assert (granted.type, changed.type) == ("CreditsGranted", "PlanChanged")
    assert granted.timestamp < changed.timestamp
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        report = audit.period_report(conn, service.app.recorder, service.app.mapper.transcoder, granted.timestamp,
                                     changed.timestamp)  # the period ends as the plan changes
    assert {p.plan: p.granted for p in report.plans if p.granted} == {"free": 7}
    _check(report, busy)


def test_a_period_report_at_the_logs_head_is_the_report_of_the_whole_log(busy, service, settings):  # noqa: F811
    wait_drained(service, settings)
    events = [e for e in busy.all() if e.stream_type == "User"]
    since, until = events[0].timestamp - timedelta(days=1), events[-1].timestamp + timedelta(days=1)
    head = service.app.recorder.max_notification_id()
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        report = audit.period_report(conn, service.app.recorder, service.app.mapper.transcoder, since, until, at=head)
    assert report.position == head
    _check(report, busy)


def _run(service, ops: list[tuple[str, int]]) -> None:  # noqa: F811
    """Commands drawn by hypothesis, through the real service: grants, jobs settled done/failed or
    canceled, plan changes."""
    user_id = service.register(f"period-{uuid.uuid4()}", plan="pro").value[0]
    for op, n in ops:
        try:
            if op == "grant":
                service.grant_credits(user_id, n, "bonus")
            elif op == "plan":
                service.change_plan(user_id, "free" if n % 2 else "pro")
            else:
                job_id = service.create_job(user_id, "interior", n).value
                service.confirm_upload(user_id, job_id)
                service.execute_job(user_id, job_id, {}, None, None)
                for idx in range(n):
                    if op == "cancel" and idx == n // 2:
                        service.cancel_job(user_id, job_id)
                        break
                    service.record_item_result(job_id, idx, "failed" if op == "fail" else "done", f"{job_id}:{idx}")
        except DomainError:
            continue  # out of credits or over the plan's concurrency: the command recorded nothing


OPS = st.lists(st.tuples(st.sampled_from(["grant", "done", "fail", "cancel", "open", "plan"]), st.integers(1, 4)),
               min_size=1, max_size=8)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(workloads=st.lists(OPS, min_size=1, max_size=3), data=st.data())
def test_the_period_identity_holds_on_generated_workloads(busy, service, settings, workloads, data):  # noqa: F811
    for ops in workloads:
        _run(service, ops)
    wait_drained(service, settings)
    stamps = sorted({e.timestamp for e in busy.all() if e.stream_type == "User"})
    # two of them, drawn as fractions of the log: sampled_from(stamps) drew from a list that grows with
    # every example's workload, which hypothesis refuses as a flaky strategy (FlakyStrategyDefinition)
    i, j = sorted(k * (len(stamps) - 1) // 10**6 for k in data.draw(
        st.lists(st.integers(0, 10**6), min_size=2, max_size=2)))
    assume(i < j)
    a, b = stamps[i], stamps[j]
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        report = audit.period_report(conn, service.app.recorder, service.app.mapper.transcoder, a, b)
    _check(report, busy)


@pytest.fixture
def tx(settings) -> Iterator[psycopg.Connection[Any]]:
    """A connection whose changes are rolled back: tampering never outlives the test."""
    with psycopg.connect(settings.effective_database_url) as conn:
        yield conn
        conn.rollback()


def _checkpoint(service, settings, key: Ed25519PrivateKey) -> dict[str, Any]:  # noqa: F811
    wait_drained(service, settings)
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        return checkpoints.take(conn, service.app.recorder, key, SystemClock().now())


def _rewrite_consistently(tx: psycopg.Connection[Any], user_id: Any) -> None:
    """Change the amount of the user's first grant and recompute every later hash and the head:
    a chain that is internally perfect."""
    rows = tx.execute("SELECT id, user_id, seq, type, amount, balance_delta, ref, occurred_at, position "
                      "FROM palette_read.billing_events WHERE user_id = %s ORDER BY seq", [user_id]).fetchall()
    prev = "0" * 64
    for n, (row_id, uid, seq, kind, amount, delta, ref, at, position) in enumerate(rows):
        if n == 0:
            amount, delta = amount + 1_000, delta + 1_000
        row = {"user_id": uid, "seq": seq, "type": kind, "amount": amount, "balance_delta": delta, "ref": ref,
               "occurred_at": at, "position": position}
        digest = ledger_hash(prev, row)
        tx.execute("UPDATE palette_read.billing_events SET amount = %s, balance_delta = %s, prev_hash = %s, "
                   "hash = %s WHERE id = %s", [amount, delta, prev, digest, row_id])
        prev = digest
    tx.execute("UPDATE palette_read.billing_heads SET last_hash = %s WHERE user_id = %s", [prev, user_id])


def test_a_consistent_rewrite_passes_verify_but_not_a_signed_checkpoint(busy, service, settings, tx):  # noqa: F811
    key = Ed25519PrivateKey.generate()
    doc = _checkpoint(service, settings, key)
    payload = checkpoints.verified_payload(json.loads(json.dumps(doc)), key.public_key())
    assert payload["complete"] and payload["heads"]
    assert audit.verify(tx).breaks == [] and audit.verify_heads(tx, payload["heads"]) == []
    (victim,) = tx.execute("SELECT user_id FROM palette_read.billing_events GROUP BY user_id HAVING count(*) >= 3 "
                           "ORDER BY user_id LIMIT 1").fetchone() or (None,)
    _rewrite_consistently(tx, victim)
    assert audit.verify(tx).breaks == []  # today's verify cannot tell
    breaks = audit.verify_heads(tx, payload["heads"])
    assert [b.user_id for b in breaks] == [str(victim)]
    assert "rewritten" in breaks[0].reason


def test_a_checkpoint_holds_each_users_last_ledger_row(busy, service, settings, tx):  # noqa: F811
    """The head that pins a chain is its last row: any earlier one leaves the rows after it free."""
    wait_drained(service, settings)
    payload = checkpoints.take(tx, service.app.recorder, Ed25519PrivateKey.generate(), SystemClock().now(),
                               wait_s=0)["payload"]
    last_rows = tx.execute("SELECT DISTINCT ON (e.user_id) e.user_id::text, e.seq, e.hash, e.position "
                           "FROM palette_read.billing_events e ORDER BY e.user_id, e.seq DESC").fetchall()
    assert any(seq > 1 for _, seq, _, _ in last_rows)
    assert payload["heads"] == [list(r) for r in last_rows]


def test_a_user_without_a_heads_row_is_still_in_the_checkpoint(busy, service, settings, tx):  # noqa: F811
    """Heads used to be read from billing_heads joined to the ledger: delete a user's heads row,
    let the next checkpoint be taken without them (still `complete`), then rewrite their chain
    consistently (the heads row put back to match): verify against that checkpoint passed."""
    wait_drained(service, settings)
    (victim,) = tx.execute("SELECT user_id FROM palette_read.billing_events GROUP BY user_id HAVING count(*) >= 3 "
                           "ORDER BY user_id LIMIT 1").fetchone() or (None,)
    (last_seq,) = tx.execute("SELECT seq FROM palette_read.billing_heads WHERE user_id = %s", [victim]).fetchone() \
        or (None,)
    tx.execute("DELETE FROM palette_read.billing_heads WHERE user_id = %s", [victim])
    key = Ed25519PrivateKey.generate()
    payload = checkpoints.take(tx, service.app.recorder, key, SystemClock().now(), wait_s=0)["payload"]
    assert payload["complete"]
    assert str(victim) in {h[0] for h in payload["heads"]}
    tx.execute("INSERT INTO palette_read.billing_heads (user_id, seq, last_hash) VALUES (%s, %s, '')",
               [victim, last_seq])
    _rewrite_consistently(tx, victim)
    assert audit.verify(tx).breaks == []
    assert [b.user_id for b in audit.verify_heads(tx, payload["heads"])] == [str(victim)]


def test_an_altered_checkpoint_or_another_key_is_refused(busy, service, settings):  # noqa: F811
    key = Ed25519PrivateKey.generate()
    doc = _checkpoint(service, settings, key)
    forged = json.loads(json.dumps(doc))
    forged["payload"]["heads"][0][2] = "f" * 64  # a head moved to match a rewritten chain
    with pytest.raises(checkpoints.CheckpointError, match="does not verify"):
        checkpoints.verified_payload(forged, key.public_key())
    with pytest.raises(checkpoints.CheckpointError, match="does not verify"):
        checkpoints.verified_payload(doc, Ed25519PrivateKey.generate().public_key())
    resigned = checkpoints.sign(forged["payload"], Ed25519PrivateKey.generate())  # an insider's own key
    with pytest.raises(checkpoints.CheckpointError, match="does not verify"):
        checkpoints.verified_payload(resigned, key.public_key())


def test_cli_checkpoint_to_the_object_store_and_verify_latest(busy, service, settings, tmp_path,  # noqa: F811
                                                              monkeypatch, capsys):
    key_file = tmp_path / "audit.pem"
    for name, value in settings.as_env().items():
        monkeypatch.setenv(name, value)
    assert cli.main(["audit", "checkpoint", "--no-s3"]) == 2  # no key yet, nowhere to keep it
    assert cli.main(["audit", "keygen", "--out", str(key_file)]) == 0
    assert cli.main(["audit", "keygen", "--out", str(key_file)]) == 2  # never overwritten
    assert key_file.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("PALETTE_AUDIT_SIGNING_KEY_FILE", str(key_file))
    wait_drained(service, settings)
    assert cli.main(["audit", "checkpoint", "--out", str(tmp_path / "cp.json")]) == 0
    out = capsys.readouterr()
    assert "s3://" in out.out and "public key" in out.out
    public = out.out.strip().rsplit(" ", 1)[-1]
    assert cli.main(["audit", "verify", "--checkpoint", "latest", "--public-key", public]) == 0
    assert cli.main(["audit", "verify", "--checkpoint", str(tmp_path / "cp.json")]) == 0
    assert "all match" in capsys.readouterr().out
    assert cli.main(["audit", "verify", "--checkpoint", str(tmp_path / "cp.json"), "--public-key", "00" * 32]) == 2
    assert cli.main(["audit", "verify", "--checkpoint", str(tmp_path / "missing.json")]) == 2
    assert cli.main(["audit", "verify", "--public-key", public]) == 2  # a key with nothing to check it on
    assert cli.main(["audit", "report", "--from", "2030-01-02", "--to", "2030-01-01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--public-key needs --checkpoint" in err[2]
    assert len(err) == 4 and all(line.startswith("palette audit") for line in err), err
    assert cli.main(["audit", "report", "--from", "2000-01-01", "--to", "2100-01-01", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["complete"] and report["total"]["opening"] == 0
    unknown = uuid.uuid4()  # before: exit 0 and zeros, as if the user had spent everything
    assert cli.main(["audit", "balance", "--user", str(unknown), "--as-of", "2100-01-01"]) == 2
    said = capsys.readouterr()
    assert said.out == "" and said.err == f"palette audit balance: no ledger entries for user {unknown} " \
        "(no such user, or not projected yet)\n"


def test_cli_verify_latest_falls_back_to_the_checkpoint_directory_when_the_object_store_is_away(
        busy, service, settings, tmp_path, monkeypatch, capsys):  # noqa: F811
    """`audit checkpoint` keeps a copy in PALETTE_AUDIT_CHECKPOINT_DIR so that a store that does not
    answer loses none: `verify --checkpoint latest` then checks that copy (saying so), and exits 3
    in one line only when there is none either."""
    from tests.conftest import free_port

    key_file, kept = tmp_path / "audit.pem", tmp_path / "kept"
    public = checkpoints.public_hex(checkpoints.keygen(key_file))
    for name, value in settings.as_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PALETTE_AUDIT_SIGNING_KEY_FILE", str(key_file))
    monkeypatch.setenv("PALETTE_AUDIT_CHECKPOINT_DIR", str(kept))
    wait_drained(service, settings)
    assert cli.main(["audit", "checkpoint"]) == 0
    [local] = kept.glob("*.json")
    assert f"s3://{settings.s3_bucket}/audit/checkpoints/{local.name}" in capsys.readouterr().out
    monkeypatch.setenv("PALETTE_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert cli.main(["audit", "verify", "--checkpoint", "latest", "--public-key", public]) == 0
    said = capsys.readouterr()
    assert said.err.count("\n") == 1 and said.err.startswith("palette audit verify: cannot reach the object store (")
    assert said.err.endswith(f": verifying against the newest local copy, {local}\n")
    assert f"({local}, signature valid): all match" in said.out
    local.unlink()
    assert cli.main(["audit", "verify", "--checkpoint", "latest", "--public-key", public]) == 3
    said = capsys.readouterr()
    assert said.out == "" and said.err.count("\n") == 1
    assert said.err.endswith(f"{kept} holds no checkpoint to fall back on\n")
    monkeypatch.delenv("PALETTE_AUDIT_CHECKPOINT_DIR")
    assert cli.main(["audit", "verify", "--checkpoint", "latest", "--public-key", public]) == 3
    assert capsys.readouterr().err.endswith("PALETTE_AUDIT_CHECKPOINT_DIR is not set to fall back on\n")


def test_the_scheduled_checkpointer_signs_whenever_the_log_has_moved(busy, service, settings, tmp_path):  # noqa: F811
    key_file = tmp_path / "audit.pem"
    public = checkpoints.keygen(key_file)
    configured = settings.model_copy(update={"audit_signing_key_file": str(key_file),
                                             "audit_checkpoint_interval_s": 60.0,
                                             "audit_checkpoint_dir": str(tmp_path / "kept")})
    with pytest.raises(checkpoints.CheckpointError, match="off"):
        checkpoints.Checkpointer(settings.model_copy(update={"audit_signing_key_file": str(key_file)}))
    worker = checkpoints.Checkpointer(configured)
    wait_drained(service, settings)
    kept, s3 = worker.step()  # the directory first: an object store that does not answer loses no copy there
    assert s3.startswith(f"s3://{settings.s3_bucket}/audit/checkpoints/") and kept.startswith(str(tmp_path / "kept"))
    assert worker.step() == []  # nothing new in the log: nothing new to sign
    workload(service, 1, random.Random(3))
    wait_drained(service, settings)
    assert worker.step()
    _, doc = checkpoints.CheckpointStore(None, "", tmp_path / "kept").latest()
    payload = checkpoints.verified_payload(doc, public)
    assert payload["log_position"] == service.app.recorder.max_notification_id()
    assert payload["complete"] and len(list((tmp_path / "kept").glob("*.json"))) == 2


def test_a_deleted_head_row_is_named_against_a_signed_checkpoint(busy, service, settings, tx):  # noqa: F811
    key = Ed25519PrivateKey.generate()
    payload = checkpoints.verified_payload(_checkpoint(service, settings, key), key.public_key())
    user_id, seq, _, position = payload["heads"][0]
    tx.execute("DELETE FROM palette_read.billing_events WHERE user_id = %s AND seq = %s", [user_id, seq])
    assert [(b.user_id, b.seq, b.position, b.reason) for b in audit.verify_heads(tx, payload["heads"])] == [
        (user_id, seq, position, "no ledger row at the checkpointed head")]


def test_chains_grown_since_a_checkpoint_still_match_it(busy, service, settings):  # noqa: F811
    """Users go on being billed after a checkpoint: only the row at each signed head is compared."""
    key = Ed25519PrivateKey.generate()
    payload = checkpoints.verified_payload(_checkpoint(service, settings, key), key.public_key())
    grown = uuid.UUID(payload["heads"][0][0])
    service.grant_credits(grown, 5, "bonus")
    wait_drained(service, settings)
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        (seq,) = conn.execute("SELECT max(seq) FROM palette_read.billing_events WHERE user_id = %s",
                              [grown]).fetchone() or (None,)
        assert seq == payload["heads"][0][1] + 1
        assert audit.verify_heads(conn, payload["heads"]) == []


def test_a_checkpoint_taken_before_the_ledger_folded_the_log_says_it_is_incomplete(busy, service, settings,  # noqa: F811
                                                                                  tx):
    wait_drained(service, settings)
    tx.execute("UPDATE palette_read.billing_events_tracking SET version = version - 1 WHERE stream_id = "
               "(SELECT stream_id FROM palette_read.billing_events_tracking ORDER BY stream_id LIMIT 1)")
    doc = checkpoints.take(tx, service.app.recorder, Ed25519PrivateKey.generate(), SystemClock().now(), wait_s=0)
    assert doc["payload"]["complete"] is False


def test_a_checkpoint_whose_ledger_lacks_only_the_logs_last_event_is_incomplete(busy, service, settings,  # noqa: F811
                                                                               tx):
    """The checkpoint covers the log up to and with its log position: the event there counts."""
    user_id = service.register(f"last-{uuid.uuid4()}", plan="pro").value[0]
    service.grant_credits(user_id, 5, "bonus")  # the log's last event
    wait_drained(service, settings)
    tx.execute("UPDATE palette_read.billing_events_tracking SET version = version - 1 WHERE stream_id = %s",
               [user_id])
    doc = checkpoints.take(tx, service.app.recorder, Ed25519PrivateKey.generate(), SystemClock().now(), wait_s=0)
    assert doc["payload"]["complete"] is False


def test_cli_verify_fails_when_a_signed_head_does_not_match_the_ledger(busy, service, settings, tmp_path,  # noqa: F811
                                                                      own_store, capsys):
    key = Ed25519PrivateKey.generate()
    payload = _checkpoint(service, settings, key)["payload"]
    payload["heads"][0][2] = "f" * 64  # signed, but not what the ledger's row at that head hashes to
    (tmp_path / "cp.json").write_text(json.dumps(checkpoints.sign(payload, key)))
    assert cli.main(["audit", "verify", "--checkpoint", str(tmp_path / "cp.json"),
                     "--public-key", checkpoints.public_hex(key.public_key())]) == 1
    assert f"BROKEN user {payload['heads'][0][0]} at seq {payload['heads'][0][1]}" in capsys.readouterr().out


@pytest.fixture
def own_store(settings, tmp_path, monkeypatch) -> checkpoints.CheckpointStore:
    """The CLI's environment with a bucket and a checkpoint directory of this test's own: the
    session's bucket holds other tests' checkpoints, signed by other keys."""
    from infra.s3 import s3_client

    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    client = s3_client(settings)
    client.create_bucket(Bucket=bucket)
    for name, value in settings.as_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PALETTE_S3_BUCKET", bucket)
    monkeypatch.setenv("PALETTE_AUDIT_CHECKPOINT_DIR", str(tmp_path / "kept"))
    return checkpoints.CheckpointStore(client, bucket, tmp_path / "kept")


def test_cli_verify_fails_when_a_user_is_lost_since_the_checkpoint_before(busy, service, settings, tx,  # noqa: F811
                                                                         own_store, capsys, monkeypatch):
    """A user whose whole chain and heads row are deleted passes plain verify, and the checkpoint
    signed after the deletion does not hold them: only the one signed before it can tell (verify
    checked the latest alone, and passed)."""
    key = Ed25519PrivateKey.generate()
    public = checkpoints.public_hex(key.public_key())
    own_store.put(_checkpoint(service, settings, key))
    (victim,) = tx.execute("SELECT user_id FROM palette_read.billing_heads ORDER BY user_id LIMIT 1").fetchone() \
        or (None,)
    tx.execute("DELETE FROM palette_read.billing_events WHERE user_id = %s", [victim])
    tx.execute("DELETE FROM palette_read.billing_heads WHERE user_id = %s", [victim])
    assert audit.verify(tx).breaks == []  # a chain deleted whole, with its head, leaves no break
    later = checkpoints.take(tx, service.app.recorder, key, SystemClock().now(), wait_s=0)
    tx.rollback()  # the user is back; the later checkpoint was signed without them
    assert str(victim) not in {h[0] for h in later["payload"]["heads"]}
    [kept, _] = own_store.put(later)
    for named in ("latest", kept):
        assert cli.main(["audit", "verify", "--checkpoint", named, "--public-key", public]) == 1
        out = capsys.readouterr().out
        assert f"BROKEN user {victim} at seq " in out and "missing from this one" in out, out
        assert out.count("BROKEN") == 1 and "1 lost or gone backwards" in out
    with monkeypatch.context() as away:  # the object store does not answer: the directory's copy is compared
        from tests.conftest import free_port

        away.setenv("PALETTE_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
        assert cli.main(["audit", "verify", "--checkpoint", kept, "--public-key", public]) == 1
        said = capsys.readouterr()
        assert said.err.count("\n") == 1 and said.err.startswith("palette audit verify: cannot reach the object store")
        assert said.err.endswith(f"comparing with the one before it in {own_store.directory}\n")
        assert f"BROKEN user {victim} at seq " in said.out
    own_store.put(_checkpoint(service, settings, key))  # the user is in the next one again
    assert cli.main(["audit", "verify", "--checkpoint", "latest", "--public-key", public]) == 0
    assert "every head kept" in capsys.readouterr().out


def test_cli_verify_refuses_a_checkpoint_before_it_that_does_not_verify(busy, service, settings,  # noqa: F811
                                                                       own_store, capsys):
    key = Ed25519PrivateKey.generate()
    own_store.put(_checkpoint(service, settings, Ed25519PrivateKey.generate()))  # another signer's
    own_store.put(_checkpoint(service, settings, key))
    assert cli.main(["audit", "verify", "--checkpoint", "latest",
                     "--public-key", checkpoints.public_hex(key.public_key())]) == 2
    said = capsys.readouterr()
    assert said.out == "" and said.err.count("\n") == 1
    assert said.err.startswith("palette audit verify: the checkpoint before it, s3://")
    assert "does not verify" in said.err


def test_cli_verify_of_a_file_says_in_one_line_when_the_object_store_refuses_the_look_before_it(
        busy, service, settings, tmp_path, own_store, capsys, monkeypatch):  # noqa: F811
    """verify --checkpoint FILE reads the object store for the checkpoint before it: a store that
    answers with an error (no such bucket, access denied) was a traceback, where a FILE alone
    never touched the store before, and `latest` says such a store in one line too."""
    key = Ed25519PrivateKey.generate()
    public = checkpoints.public_hex(key.public_key())
    (tmp_path / "cp.json").write_text(json.dumps(_checkpoint(service, settings, key)))
    monkeypatch.setenv("PALETTE_S3_BUCKET", f"gone-{uuid.uuid4().hex[:12]}")  # answers NoSuchBucket
    for named in (str(tmp_path / "cp.json"), "latest"):
        assert cli.main(["audit", "verify", "--checkpoint", named, "--public-key", public]) == 2
        said = capsys.readouterr()
        assert said.out == "" and said.err.count("\n") == 1, said
        assert said.err.startswith("palette audit verify: ") and "NoSuchBucket" in said.err, said.err


def test_cli_verify_and_export_tell_their_progress_on_stderr(busy, service, settings, monkeypatch, capsys):  # noqa: F811
    # Both read the whole ledger, which grows with every job: they ran silent for as long as it took.
    import functools

    from adapters.cli import auditors, outputs

    for name, value in settings.as_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(auditors, "progress_lines", functools.partial(outputs.progress_lines, every=7))
    monkeypatch.setattr(auditors, "with_progress", functools.partial(outputs.with_progress, every=7))
    wait_drained(service, settings)

    def counts(err: str, what: str) -> list[int]:
        return [int(line.split()[0].replace(",", "")) for line in err.splitlines()
                if line.startswith("  ") and line.split("(")[0].strip().endswith(what)]

    assert cli.main(["audit", "verify"]) == 0
    out, err = capsys.readouterr()
    checked = int(out.split("verified ", 1)[1].split()[0].replace(",", ""))
    told = counts(err, "ledger rows checked")
    assert checked >= 14 and told == list(range(7, checked + 1, 7))
    assert cli.main(["audit", "export"]) == 0
    out, err = capsys.readouterr()
    rows = len(out.splitlines())
    assert rows >= 14 and counts(err, "ledger rows") == list(range(7, rows + 1, 7))
    assert f"done: {rows:,} ledger rows in " in err
