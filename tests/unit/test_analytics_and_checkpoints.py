"""The pure parts of the analysts' and auditors' tools: Parquet schemas from the event classes,
`palette query`'s refusals and rendering, checkpoint signatures and keys, and the ledger's hash
chain (no I/O beyond
temporary files; the real-stack behaviour is in tests/integration)."""

from __future__ import annotations

import base64
import dataclasses
import json
import typing
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from eventsourcing.domain import Aggregate
from hypothesis import given
from hypothesis import strategies as st

from adapters import checkpoints
from adapters.query import QueryError, Result, render, run
from adapters.settings import Settings
from domain.contracts.envelope import EventEnvelope
from domain.contracts.streams import STREAMS
from projections import audit
from projections.memory import MemoryReadStore
from projections.models.billing_events import GENESIS, ledger_hash
from projections.parquet import ENVELOPE, TIMESTAMP, event_schemas, topics_for


def test_every_event_class_has_a_schema_with_its_fields_typed():
    schemas = event_schemas()
    classes = {f"{cls.__module__}:{cls.__qualname__}.{name}": attr for cls in STREAMS.values()
               for name, attr in vars(cls).items()
               if isinstance(attr, type) and issubclass(attr, Aggregate.Event) and name not in ("Created", "Event")}
    assert set(schemas) == set(classes)
    for topic, spec in schemas.items():
        assert spec.schema.names[:4] == ENVELOPE.names, topic
        hints = typing.get_type_hints(classes[topic])
        data = set(hints) - {"originator_id", "originator_version", "timestamp", "originator_id_type",
                             "originator_topic"}
        assert set(spec.schema.names[4:]) == data, topic
    granted = schemas["domain.user:User.CreditsGranted"].schema
    assert (granted.field("amount").type, granted.field("reason").type) == (pa.int64(), pa.string())
    queued = schemas["domain.job:Job.JobQueued"]
    assert queued.class_version == 2 and queued.texts == ("concepts",) and queued.uuids == ("rule_id",)
    assert queued.schema.field("protect").type == pa.list_(pa.string())
    assert all(s.schema.field("timestamp").type == TIMESTAMP for s in schemas.values())


def test_unknown_event_types_are_refused_with_the_known_ones():
    assert topics_for(None) == []
    assert topics_for(["CreditsGranted"]) == ["domain.user:User.CreditsGranted"]
    with pytest.raises(ValueError, match=r"unknown event type\(s\) \['Nope'\]; known: \['CreditsGranted'"):
        topics_for(["Nope"])


@pytest.mark.parametrize(("query", "why"), [
    ("INSERT INTO t VALUES (1)", "only SELECT"), ("ATTACH 'x.db'", "only SELECT"), ("PRAGMA version", "only SELECT"),
    ("SELECT 1; DROP TABLE t", "one statement"), ("", "one statement"), ("SELECT FROM WHERE", "Parser Error"),
    ("SELECT * FROM read_parquet('/etc/*.parquet')", "Permission"), ("INSTALL httpfs", "only SELECT"),
    (b"SELECT '\xff'".decode(errors="surrogateescape"), r"not UTF-8 text \(at character 9\)"),
])
def test_query_refuses_anything_but_one_select_in_one_line(query, why):
    with pytest.raises(QueryError, match=why) as e:
        run(query, None, None)
    assert "\n" not in str(e.value)


def test_query_bounds_its_output_and_renders_table_csv_and_json(tmp_path):
    result = run("SELECT range AS n, 'x' || range AS label FROM range(10)", None, None, limit=4)
    assert result.truncated and result.rows == [(0, "x0"), (1, "x1"), (2, "x2"), (3, "x3")]
    table = render(result, "table").splitlines()
    assert table[0].split() == ["n", "label"] and table[-1] == "(4 rows)" and table[2].split() == ["0", "x0"]
    assert render(result, "csv").splitlines() == ["n,label", "0,x0", "1,x1", "2,x2", "3,x3"]
    assert json.loads(render(result, "json"))[3] == {"n": 3, "label": "x3"}
    assert render(Result(["a"], [], False), "table").splitlines()[-1] == "(0 rows)"
    with pytest.raises(QueryError, match="no such directory"):
        run("SELECT 1", Path("/nonexistent/palette"), None)
    (tmp_path / "file").write_text("")
    with pytest.raises(QueryError, match="file: not a directory"):
        run("SELECT 1", tmp_path / "file", None)


def test_query_json_keeps_every_column_of_a_join_whose_names_repeat():
    """``SELECT *`` over jobs_log joined with job_items_log names ``status`` twice (and the join's
    key columns too): a JSON object keeps one value per name, so the second took the first's place
    and the job's status was gone from every row. A repeated name is told apart as DuckDB's own
    result frames do (``status_1``), never onto a name the query already has."""
    result = run("SELECT 'done' AS status, 'failed' AS status, 'x' AS status_1, 'y' AS status", None, None)
    assert json.loads(render(result, "json")) == [
        {"status": "done", "status_2": "failed", "status_1": "x", "status_3": "y"}]
    assert render(result, "csv").splitlines()[0] == "status,status,status_1,status"  # as the query named them


def test_query_reads_no_file_of_the_working_directory_s_dot_tmp(tmp_path, monkeypatch):
    """DuckDB's default spill folder is ``.tmp`` in the working directory, and locking file access
    to --data still allowed it: a SELECT read (and globbed) any file there, with or without --data."""
    work, data = tmp_path / "work", tmp_path / "data"
    (work / ".tmp").mkdir(parents=True)
    data.mkdir()
    (work / ".tmp" / "private.csv").write_text("secret\n42\n")
    monkeypatch.chdir(work)
    for folder in (data, None):
        for sql_text in ("SELECT * FROM read_csv('.tmp/private.csv')",
                         f"SELECT * FROM read_csv('{work}/.tmp/private.csv')",  # noqa: S608 - a test's path
                         "SELECT * FROM glob('.tmp/*')"):
            with pytest.raises(QueryError, match="Permission"):
                run(sql_text, folder, None)
    assert not any(p.name != "private.csv" for p in (work / ".tmp").iterdir())
    assert run("SELECT count(*) FROM range(10)", data, None).rows == [(10,)]


def test_a_query_leaves_no_spill_folder_behind_whether_it_ran_or_duckdb_did_not_start(tmp_path, monkeypatch):
    import tempfile

    import duckdb

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert run("SELECT 1", None, None).rows == [(1,)]
    with pytest.raises(QueryError):
        run("SELECT * FROM no_such_table", None, None)

    def refused(*_args: object, **_kwargs: object) -> None:
        raise duckdb.IOException("could not open the database")

    monkeypatch.setattr(duckdb, "connect", refused)
    with pytest.raises(duckdb.IOException):
        run("SELECT 1", None, None)
    assert list(tmp_path.iterdir()) == []


def _payload(heads: list[list[object]]) -> dict[str, object]:
    return {"kind": checkpoints.KIND, "taken_at": "2026-12-01T00:00:00+00:00", "log_position": 7, "complete": True,
            "heads": heads}


@given(heads=st.lists(st.tuples(st.uuids().map(str), st.integers(1, 10**6), st.text("0123456789abcdef", min_size=64,
                                                                                    max_size=64),
                                st.integers(1, 10**9)).map(list), max_size=5),
       change=st.integers(0, 3))
def test_a_signed_checkpoint_verifies_and_any_change_to_it_does_not(heads, change):
    key = Ed25519PrivateKey.generate()
    doc = json.loads(json.dumps(checkpoints.sign(_payload(heads), key)))  # as stored and read back
    assert checkpoints.verified_payload(doc, key.public_key())["heads"] == heads
    tampered = json.loads(json.dumps(doc))
    if heads:  # a change that always changes it: a drawn number may be the one written (123456789 was)
        head = tampered["payload"]["heads"][0]
        value = head[change]
        head[change] = value + 1 if isinstance(value, int) else ("1" if value[0] == "0" else "0") + value[1:]
    else:
        tampered["payload"]["log_position"] = 8
    with pytest.raises(checkpoints.CheckpointError, match="does not verify"):
        checkpoints.verified_payload(tampered, key.public_key())
    with pytest.raises(checkpoints.CheckpointError, match="does not verify"):
        checkpoints.verified_payload(doc, Ed25519PrivateKey.generate().public_key())


def test_a_checkpoint_signs_its_payload_as_sorted_compact_json_so_a_reordered_copy_still_verifies():
    """The signed bytes are the payload's JSON with sorted keys and no spaces (checked here with
    the key alone): a copy rewritten by a tool that orders keys otherwise still verifies."""
    key = Ed25519PrivateKey.generate()
    payload = _payload([[str(uuid.uuid4()), 3, "ab" * 32, 11]])
    doc = checkpoints.sign(payload, key)
    signed = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    key.public_key().verify(bytes.fromhex(doc["signature"]), signed)
    reordered = {**doc, "payload": dict(reversed(list(payload.items())))}
    assert checkpoints.verified_payload(json.loads(json.dumps(reordered)), key.public_key()) == payload


@pytest.mark.parametrize("doc", [None, [], {"payload": {}}, {"payload": {"kind": "x"}, "algorithm": "Ed25519"},
                                 {"payload": _payload([]), "algorithm": "RSA"},
                                 {"payload": _payload([]), "algorithm": "Ed25519", "signature": "zz"}])
def test_what_is_not_a_checkpoint_is_refused_in_one_line(doc):
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.verified_payload(doc, Ed25519PrivateKey.generate().public_key())


def test_keys_come_from_hex_base64_or_a_pem_file_and_bad_ones_are_named(tmp_path):
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes_raw()
    public = checkpoints.public_hex(key.public_key())
    for text in (raw.hex(), base64.b64encode(raw).decode()):
        assert checkpoints.public_hex(checkpoints.private_key(Settings(audit_signing_key=text)).public_key()) == public
    pem = tmp_path / "k.pem"
    made = checkpoints.keygen(pem)
    assert pem.stat().st_mode & 0o777 == 0o600
    from_file = checkpoints.private_key(Settings(audit_signing_key_file=str(pem))).public_key()
    assert checkpoints.public_hex(from_file) == checkpoints.public_hex(made)
    with pytest.raises(checkpoints.CheckpointError, match="not overwritten"):
        checkpoints.keygen(pem)
    for bad in ("abc", "00" * 31, "!" * 44, base64.b64encode(bytes(31)).decode()):  # the last: base64 of 31 bytes
        with pytest.raises(checkpoints.CheckpointError, match="PALETTE_AUDIT_SIGNING_KEY"):
            checkpoints.private_key(Settings(audit_signing_key=bad))
    with pytest.raises(checkpoints.CheckpointError, match="no signing key"):
        checkpoints.private_key(Settings())
    with pytest.raises(checkpoints.CheckpointError, match="cannot read"):
        checkpoints.private_key(Settings(audit_signing_key_file=str(tmp_path / "missing.pem")))
    assert checkpoints.public_hex(checkpoints.trusted_key(Settings(audit_public_key=public), None)) == public
    with pytest.raises(checkpoints.CheckpointError, match="no public key to trust"):
        checkpoints.trusted_key(Settings(), None)
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.public_key("not a key")


def test_a_checkpoint_or_key_path_with_a_nul_is_refused_in_one_line(tmp_path):
    """`palette audit keygen --out` and `audit verify --checkpoint` with a NUL in the path raised
    os.open's ValueError as a traceback (`audit checkpoint --out` already said it in one line)."""
    for call, said in ((lambda: checkpoints.keygen(tmp_path / "k\x00.pem"), "cannot write"),
                       (lambda: checkpoints.read_file(tmp_path / "c\x00.json"), "cannot read")):
        with pytest.raises(checkpoints.CheckpointError, match=f"{said} .*embedded null byte") as e:
            call()
        assert "\n" not in str(e.value) and "\x00" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_passphrase_protected_signing_key_file_is_refused_in_one_line(tmp_path):
    """A PEM key under a passphrase (what `openssl genpkey -aes256` makes) raised cryptography's
    TypeError through `palette audit checkpoint`, `serve checkpointer` and `audit verify
    --checkpoint` (which falls back on the signing key): a traceback, not a line."""
    key = Ed25519PrivateKey.generate()
    locked = tmp_path / "locked.pem"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(checkpoints.CheckpointError, match=r"locked\.pem is under a passphrase") as e:
        checkpoints.private_key(Settings(audit_signing_key_file=str(locked)))
    assert "\n" not in str(e.value)
    with pytest.raises(checkpoints.CheckpointError, match="no public key to trust"):
        checkpoints.trusted_key(Settings(audit_signing_key_file=str(locked)), None)


LEDGER_CHANGES = {"user_id": uuid.uuid4(), "seq": 99, "type": "adjust", "amount": 7, "balance_delta": -7,
                  "ref": "other", "occurred_at": datetime(2027, 1, 1, tzinfo=UTC), "position": 10**6,
                  "prev_hash": "f" * 64}


@pytest.mark.parametrize("field", sorted(LEDGER_CHANGES))
def test_the_ledger_is_chained_and_a_change_to_any_field_of_a_row_breaks_its_hash(field):
    user, job, at = uuid.uuid4(), str(uuid.uuid4()), datetime(2026, 11, 1, tzinfo=UTC)
    steps = [("Registered", {"plan": "free"}), ("CreditsGranted", {"amount": 10, "reason": "trial"}),
             ("CreditsReserved", {"amount": 4, "job_id": job}),
             ("CreditsSettled", {"spent": 3, "refunded": 1, "job_id": job})]
    store = MemoryReadStore()
    store.apply([EventEnvelope(id=100 + n, stream_id=user, stream_type="User", version=n + 1, type=kind,
                               timestamp=at, data=data) for n, (kind, data) in enumerate(steps)])
    rows = sorted(store.table("billing_events").values(), key=lambda r: r["seq"])
    assert [(r["seq"], r["type"], r["amount"], r["balance_delta"], r["ref"]) for r in rows] == [
        (1, "grant", 10, 10, "trial"), (2, "reserve", 4, -4, job), (3, "spend", 3, 0, job), (4, "refund", 1, 1, job)]
    assert [r["prev_hash"] for r in rows] == [GENESIS] + [r["hash"] for r in rows[:-1]]
    for row in rows:
        assert ledger_hash(row["prev_hash"], {**row, "occurred_at": at.astimezone(timezone(timedelta(hours=2)))}) \
            == row["hash"]  # the same instant, written in another zone
        tampered = {**row, field: LEDGER_CHANGES[field]}
        assert ledger_hash(tampered["prev_hash"], tampered) != row["hash"], field


def test_a_period_balances_only_when_both_the_spendable_and_the_held_credits_roll_forward():
    # by hand: opening 10 spendable, 4 held; granted 5; 6 placed; of those held, 3 spent and 2 refunded
    # (spendable 10 + 5 - 6 + 2 = 11; held 4 + 6 - 3 - 2 = 5)
    sound = audit.PeriodFigures("pro", users=1, opening=10, granted=5, placed=6, spent=3, refunded=2, closing=11,
                                held_opening=4, held_closing=5)
    assert sound.reserved == 1 and sound.outstanding == 16 and sound.balanced
    # the spendable side still rolls forward, but held credits moved with no reservation or settlement
    assert not dataclasses.replace(sound, held_closing=6).balanced
    assert not dataclasses.replace(sound, closing=12).balanced


def test_a_report_whose_total_balances_is_not_ok_while_one_plans_figures_do_not():
    # by hand: each plan opens with 10 and moves nothing, but free closes at 11 and pro at 9 (a ledger
    # row's delta not its type's, in each): the total, 20 -> 20, balances and hides both
    free = audit.PeriodFigures("free", users=1, opening=10, closing=11)
    pro = audit.PeriodFigures("pro", users=1, opening=10, closing=9)
    total = audit.PeriodFigures("TOTAL", users=2, opening=20, closing=20)
    at = datetime(2026, 11, 1, tzinfo=UTC)
    report = audit.PeriodReport(at, at + timedelta(days=1), 7, 0, total, [free, pro])
    assert total.balanced and not free.balanced and not pro.balanced
    assert not report.ok and not report.as_dict()["ok"]
    assert audit.PeriodReport(at, at + timedelta(days=1), 7, 0, total, [dataclasses.replace(free, closing=10),
                                                                        dataclasses.replace(pro, closing=10)]).ok


def test_a_validly_signed_document_of_another_algorithm_or_kind_is_no_checkpoint():
    key = Ed25519PrivateKey.generate()
    for doc in ({**checkpoints.sign(_payload([]), key), "algorithm": "RSA"},
                checkpoints.sign({**_payload([]), "kind": "palette.something.else/1"}, key)):
        with pytest.raises(checkpoints.CheckpointError, match="not a checkpoint"):
            checkpoints.verified_payload(doc, key.public_key())


def test_the_latest_checkpoint_is_the_one_at_the_furthest_log_position(tmp_path):
    store = checkpoints.CheckpointStore(None, "", tmp_path)
    key = Ed25519PrivateKey.generate()
    for position in (9, 10, 100_000):  # names sort by position whatever its number of digits
        store.put(checkpoints.sign({**_payload([]), "log_position": position}, key))
    assert store.latest()[1]["payload"]["log_position"] == 100_000


def test_an_older_checkpoint_copied_under_a_name_that_sorts_last_is_not_taken_for_the_latest(tmp_path):
    """Names are not signed: a copy of an old checkpoint named past the newest (what a bucket with
    object lock still takes) passed for the latest, and `verify --checkpoint latest` then checked
    only the old heads, missing a rewrite of the rows after them."""
    store = checkpoints.CheckpointStore(None, "", tmp_path)
    key = Ed25519PrivateKey.generate()
    [old] = store.put(checkpoints.sign({**_payload([]), "log_position": 9}, key))
    store.put(checkpoints.sign({**_payload([]), "log_position": 10}, key))
    planted = tmp_path / f"{99:020d}-20261201T000000000000Z.json"
    planted.write_bytes(Path(old).read_bytes())
    with pytest.raises(checkpoints.CheckpointError, match=r"renamed or copied, not the checkpoint its name says") as e:
        store.latest()
    assert str(planted) in str(e.value) and "log position 9)" in str(e.value)


def test_the_checkpoint_before_is_found_by_its_payload_and_a_renamed_copy_is_refused(tmp_path):
    store = checkpoints.CheckpointStore(None, "", tmp_path)
    key = Ed25519PrivateKey.generate()
    for position in (9, 10, 100_000):
        store.put(checkpoints.sign({**_payload([]), "log_position": position}, key))
    latest = store.latest()[1]["payload"]
    assert store.before(latest)[1]["payload"]["log_position"] == 10  # type: ignore[index]
    assert store.before({**_payload([]), "log_position": 9}) is None
    [old] = [p for p in tmp_path.glob("*.json") if p.name.startswith(f"{9:020d}")]
    (tmp_path / f"{99:020d}-20261201T000000000000Z.json").write_bytes(old.read_bytes())
    with pytest.raises(checkpoints.CheckpointError, match=r"renamed or copied"):
        store.before(latest)


def test_heads_lost_or_gone_backwards_since_the_checkpoint_before_are_breaks():
    a, b, c, d = (str(uuid.UUID(int=n)) for n in range(1, 5))
    earlier = [[c, 3, "h", 30], [a, 5, "h", 10], [b, 2, "h", 20]]
    later = [[a, 7, "h", 40], [b, 1, "h", 20], [d, 1, "h", 50]]  # a grew, b went back, c is gone, d is new
    found = audit.heads_regressions(earlier, later)
    assert [(f.user_id, f.seq, f.position) for f in found] == [(b, 1, None), (c, 3, 30)]
    assert "went backwards" in found[0].reason and "missing from this one" in found[1].reason
    assert audit.heads_regressions(earlier, earlier) == []


def test_a_public_key_pem_of_an_algorithm_cryptography_does_not_know_is_refused_in_one_line(tmp_path, monkeypatch):
    """As the signing key file's: a PEM whose algorithm cryptography does not support (its
    UnsupportedAlgorithm is no ValueError) went through `palette audit verify --public-key` as a
    traceback, and so did a file it could not read."""
    def tlv(tag: int, body: bytes) -> bytes:
        return bytes([tag, len(body)]) + body
    spki = tlv(0x30, tlv(0x30, tlv(0x06, bytes([0x2A, 0x03, 0x04]))) + tlv(0x03, b"\x00" + bytes(32)))  # OID 1.2.3.4
    unknown = tmp_path / "unknown.pem"
    unknown.write_bytes(b"-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(spki) + b"-----END PUBLIC KEY-----\n")
    with pytest.raises(checkpoints.CheckpointError, match=r"unknown\.pem holds no Ed25519 public key"):
        checkpoints.public_key(str(unknown))

    def refused(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refused)  # as a file of another user's, mode 0600
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"cannot read the public key file .*unknown\.pem: Permission denied"):
        checkpoints.public_key(str(unknown))
