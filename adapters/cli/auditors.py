"""`palette audit`: the auditors' queries over the billing_events projection, its reconciliation
with the log, the hash chains and their signed checkpoints."""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.cli.arguments import file_name, given_text, path_value, time_value, uuid_value
from adapters.cli.connect import event_store, running_settings
from adapters.cli.outputs import progress_lines, unwritable, with_progress
from domain.text import csv_cell, one_line

if TYPE_CHECKING:
    from adapters.cli.arguments import Subcommands
    from projections.audit import ChainBreak, Verification


def _report_text(report: Any, fmt: str) -> str:
    """An audit period report as a table, CSV or JSON."""
    import csv
    import io
    import json

    from projections.audit import FIGURES

    if fmt == "json":
        return json.dumps(report.as_dict(), indent=2)
    rows = [p.as_dict() for p in [*report.plans, report.total]]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["plan", *FIGURES, "balanced"])
        writer.writerows([[csv_cell(r["plan"]), *(r[f] for f in FIGURES), r["balanced"]] for r in rows])
        return buf.getvalue().rstrip("\n")
    t = report.total
    where = (f"reconciled to the log at position {report.position:,}: every user event up to it folded, "
             "none after it counted" if not report.unfolded else
             f"INCOMPLETE: {report.unfolded:,} user event(s) at or before position {report.position:,} not folded "
             "into billing_events (see `palette projections status` / `dlq list`)")
    widths = {f: 2 + max(len(f), *(len(f"{r[f]:,}") for r in rows)) for f in FIGURES}
    plan_w = 2 + max(len("plan"), *(len(r["plan"]) for r in rows))
    lines = [f"period {report.since.isoformat()} (inclusive) to {report.until.isoformat()} (exclusive)", where, "",
             "plan".ljust(plan_w) + "".join(f.rjust(widths[f]) for f in FIGURES)]
    lines += [r["plan"].ljust(plan_w) + "".join(f"{r[f]:,}".rjust(widths[f]) for f in FIGURES) for r in rows]
    verdict = "holds" if report.ok else "DOES NOT HOLD"
    lines += ["", f"opening + granted - spent = closing + reserved: {t.opening:,} + {t.granted:,} - {t.spent:,} = "
              f"{t.opening + t.granted - t.spent:,}; {t.closing:,} + {t.reserved:,} = {t.closing + t.reserved:,}: "
              f"{verdict}" + ("" if all(p.balanced for p in report.plans) else " (for some plan)"),
              "opening/closing: spendable balance; reserved: net credits moved into reservations in the period "
              "(placed - spent - refunded = held_closing - held_opening); outstanding: owed to users at the end "
              "(closing + held_closing)"]
    return "\n".join(lines)


def _audit_report(args: argparse.Namespace, conn: Any, settings: Any) -> int:
    from projections import audit

    if (app := _log_at(settings, args.at, "report")) is None:
        return 2
    try:
        report = audit.period_report(conn, app.recorder, app.mapper.transcoder, args.since, args.until,
                                     at=args.at)
    except ValueError as e:
        print(f"palette audit report: {e}", file=sys.stderr)
        return 2
    finally:
        app.close()
    print(_report_text(report, args.format))
    return 0 if report.ok else 1


def _audit_checkpoint(args: argparse.Namespace, conn: Any, settings: Any) -> int:
    from adapters import checkpoints
    from adapters.cli import _store_unreachable  # imported here: adapters.cli imports this module
    from adapters.logs import driver_reason
    from adapters.system import SystemClock

    if args.out is not None and (why := unwritable(args.out)) is not None:
        print(f"palette audit checkpoint: cannot write {one_line(args.out)}: {why}", file=sys.stderr)
        return 2
    if args.out is not None and args.out.resolve().is_file():  # a checkpoint kept, or the signing key
        print(f"palette audit checkpoint: {one_line(args.out)} exists: a checkpoint file is never overwritten "
              "(name a new one)", file=sys.stderr)
        return 2
    try:
        key = checkpoints.private_key(settings)
        store = checkpoints.CheckpointStore.of(settings, use_s3=not args.no_s3)
        if args.out is None and store.directory is None and args.no_s3:
            raise checkpoints.CheckpointError("--no-s3 needs --out FILE or PALETTE_AUDIT_CHECKPOINT_DIR")
        app = event_store(settings)
        try:
            doc = checkpoints.take(conn, app.recorder, key, SystemClock().now())
        finally:
            app.close()
        try:
            where = store.put(doc) if (store.s3 is not None or store.directory is not None) else []
            unkept: Exception | None = None
        except Exception as e:  # the object store did not answer: the file asked for is still written
            if not _store_unreachable(e):
                raise
            where, unkept = ([str(store.directory / store.name(doc["payload"]))] if store.directory else []), e
    except checkpoints.CheckpointError as e:
        print(f"palette audit checkpoint: {e}", file=sys.stderr)
        return 2
    if args.out is not None:
        import json

        from adapters.whole_files import write_whole

        try:  # whole or not at all: a cut file would be read as a checkpoint that is not JSON
            write_whole(args.out, json.dumps(doc, separators=(",", ":")))
        except OSError as e:
            kept = f" (the checkpoint is kept at {', '.join(where)})" if where else ""
            print(f"palette audit checkpoint: cannot write {one_line(args.out)}: {e.strerror or e}{kept}",
                  file=sys.stderr)
            return 2
        where.append(str(args.out))
    if unkept is not None:
        kept = f"; the checkpoint is kept at {', '.join(where)} only" if where else "; the checkpoint is kept nowhere"
        print(f"palette audit checkpoint: cannot reach the object store ({driver_reason(unkept)}){kept}",
              file=sys.stderr)
        return 3
    payload = doc["payload"]
    print(f"checkpoint of {len(payload['heads']):,} chain heads at log position {payload['log_position']:,}"
          + ("" if payload["complete"] else " (INCOMPLETE: the ledger had not folded every event up to it)")
          + f" signed and kept at {', '.join(where)}")
    print(f"public key (Ed25519, hex): {doc['public_key']}")
    return 0


def _latest_checkpoint(settings: Any) -> tuple[str, Any, Any] | None:
    """The newest checkpoint, in the object store or PALETTE_AUDIT_CHECKPOINT_DIR, and the store
    it came from; the directory's newest when the object store does not answer (said on stderr,
    in one line), None when the directory holds none either (said too: the caller exits 3, as for
    any store not reached)."""
    from adapters import checkpoints
    from adapters.cli import _store_unreachable  # imported here: adapters.cli imports this module
    from adapters.logs import driver_reason

    try:
        store = checkpoints.CheckpointStore.of(settings)
        return (*store.latest(), store)
    except Exception as e:  # an endpoint botocore cannot use is one it cannot reach, as everywhere
        if not _store_unreachable(e):
            _refused(e, settings)
            raise
        away = f"cannot reach the object store ({driver_reason(e)})"
    local = checkpoints.CheckpointStore.of(settings, use_s3=False)
    if (folder := local.directory) is None or not folder.is_dir() or not any(folder.glob("*.json")):
        kept = "PALETTE_AUDIT_CHECKPOINT_DIR is not set" if folder is None else f"{folder} holds no checkpoint"
        print(f"palette audit verify: {away}, and {kept} to fall back on", file=sys.stderr)
        return None
    try:  # the same bounded read as any checkpoint file (a regular file, at most MAX_FILE_BYTES)
        where, doc = local.latest()
    except checkpoints.CheckpointError as e:
        raise checkpoints.CheckpointError(f"{away}; its newest local copy: {e}") from None
    print(f"palette audit verify: {away}: verifying against the newest local copy, {where}", file=sys.stderr)
    return where, doc, local


def _refused(e: Exception, settings: Any) -> None:
    """Raise, in one line, the object store's answer of an error (no such bucket, access denied)
    to a look at the checkpoints (``e``, when it is one): it was a traceback."""
    from botocore.exceptions import BotoCoreError, ClientError

    from adapters import checkpoints
    from adapters.logs import driver_reason

    if isinstance(e, (ClientError, BotoCoreError)):
        raise checkpoints.CheckpointError(f"the object store refused to list or read the checkpoints in bucket "
                                          f"{settings.s3_bucket}: {driver_reason(e)}") from None


def _earlier_checkpoint(settings: Any, store: Any, payload: dict[str, Any], key: Any) -> tuple[str, Any] | None:
    """The checkpoint signed just before ``payload``'s (its where and verified payload; None: none
    was), from ``store``, else from the object store and PALETTE_AUDIT_CHECKPOINT_DIR (the
    directory's alone, said on stderr, when the object store does not answer). Raises
    CheckpointError when it does not verify under ``key``: a store holding an object there that
    is no checkpoint of this signer's is not passed over."""
    from adapters import checkpoints
    from adapters.cli import _store_unreachable  # imported here: adapters.cli imports this module
    from adapters.logs import driver_reason

    if store is None:
        try:
            store = checkpoints.CheckpointStore.of(settings)
            found = store.before(payload)
        except Exception as e:  # a CheckpointError too: only a store not reached falls back
            if not _store_unreachable(e):
                _refused(e, settings)
                raise
            store = checkpoints.CheckpointStore.of(settings, use_s3=False)
            kept = ("; not compared with the checkpoint before it (PALETTE_AUDIT_CHECKPOINT_DIR is not set)"
                    if store.directory is None else f"; comparing with the one before it in {store.directory}")
            print(f"palette audit verify: cannot reach the object store ({driver_reason(e)}){kept}", file=sys.stderr)
            found = store.before(payload) if store.directory is not None else None
    else:
        try:
            found = store.before(payload)
        except Exception as e:
            _refused(e, settings)
            raise
    if found is None:
        return None
    where, doc = found
    try:
        return where, checkpoints.verified_payload(doc, key)
    except checkpoints.CheckpointError as e:
        raise checkpoints.CheckpointError(f"the checkpoint before it, {where}: {e}") from None


def _audit_verify(args: argparse.Namespace, conn: Any, settings: Any) -> int:
    from adapters import checkpoints
    from projections import audit

    anchored = ""
    head_breaks: list[Any] = []
    lost: list[str] = []  # what the checkpoint before it holds and this one does not
    if args.public_key and not args.checkpoint:  # a key checks a checkpoint's signature, nothing else
        print("palette audit verify: --public-key needs --checkpoint", file=sys.stderr)
        return 2
    if args.checkpoint:
        try:
            key = checkpoints.trusted_key(settings, args.public_key)
            store = None
            if args.checkpoint == "latest":
                if (latest := _latest_checkpoint(settings)) is None:
                    return 3
                where, doc, store = latest
            else:
                where, doc = args.checkpoint, checkpoints.read_file(Path(args.checkpoint))
            payload = checkpoints.verified_payload(doc, key)
            earlier = _earlier_checkpoint(settings, store, payload, key)
        except checkpoints.CheckpointError as e:
            print(f"palette audit verify: {e}", file=sys.stderr)
            return 2
        head_breaks = audit.verify_heads(conn, payload["heads"])
        anchored = (f"; {len(payload['heads']):,} chain heads of the checkpoint at log position "
                    f"{payload['log_position']:,} ({where}, signature valid): "
                    + ("all match" if not head_breaks else f"{len(head_breaks)} do not match"))
        compared, lost = _against_earlier(payload, earlier)
        anchored += compared
    report = audit.verify(conn, progress=progress_lines("ledger rows checked"))
    _print_findings(report, head_breaks, lost)
    bad = report.broken + len(head_breaks) + len(lost)
    print(f"verified {report.checked:,} ledger rows: {'OK' if not bad else f'{bad:,} broken chain(s)'}{anchored}")
    return 0 if not bad else 1


def _against_earlier(payload: dict[str, Any], earlier: tuple[str, Any] | None) -> tuple[str, list[str]]:
    """The summary's clause on the checkpoint before this one, and a BROKEN line for each head it
    holds that this one lost or holds at an earlier seq (first, a log position gone backwards)."""
    from projections import audit

    if earlier is None:
        return "; no checkpoint before it to compare with", []
    before_where, before = earlier
    lost = [f"BROKEN user {b.user_id} at seq {b.seq} (checkpoint before it, {before_where}): {b.reason}"
            for b in audit.heads_regressions(before["heads"], payload["heads"])]
    if int(payload["log_position"]) < int(before["log_position"]):
        lost.insert(0, f"BROKEN checkpoint: its log position {payload['log_position']:,} is before "
                       f"{before['log_position']:,}, that of the checkpoint before it ({before_where})")
    return (f"; against the checkpoint before it ({before_where}, log position {before['log_position']:,}): "
            + ("every head kept" if not lost else f"{len(lost):,} lost or gone backwards")), lost


def _print_findings(report: Verification, head_breaks: list[ChainBreak], lost: list[str]) -> None:
    """The first findings of each kind (chains, checkpointed heads, heads lost since the checkpoint
    before), then a count of the rest: however much is broken, the output stays short."""
    from projections import audit

    for b in [*report.breaks, *head_breaks[:audit.FIRST_FINDINGS]]:  # each by user id
        where_ = f"position {b.position}" if b.position is not None else "its end"
        print(f"BROKEN user {b.user_id} at seq {b.seq} ({where_}): {b.reason}")
    if report.broken > len(report.breaks):
        print(f"... and {report.broken - len(report.breaks):,} more broken chain(s)")
    if len(head_breaks) > audit.FIRST_FINDINGS:
        print(f"... and {len(head_breaks) - audit.FIRST_FINDINGS:,} more checkpointed head(s) not matched")
    for line in lost[:audit.FIRST_FINDINGS]:
        print(line)
    if len(lost) > audit.FIRST_FINDINGS:
        print(f"... and {len(lost) - audit.FIRST_FINDINGS:,} more head(s) lost or gone backwards since the "
              "checkpoint before it")


def _cmd_audit(args: argparse.Namespace) -> int:
    import psycopg

    from projections import schema

    if args.action == "ledger" and args.since is not None and args.until is not None and args.until < args.since:
        print("palette audit ledger: the period's end (--to) must be after its start (--from)", file=sys.stderr)
        return 2  # as `replay all` and `audit report` refuse theirs: an empty answer would pass for "no entries"
    if isinstance(sys.stdout, io.TextIOWrapper):  # a grant's reason may hold what a latin-1 or ASCII locale cannot
        sys.stdout.reconfigure(encoding="utf-8")  # spell: UTF-8, as `palette query` and `replay` write
    settings = running_settings()
    if args.action == "keygen":
        return _audit_keygen(args)
    action = {"report": _audit_report, "checkpoint": _audit_checkpoint, "ledger": _audit_ledger,
              "balance": _audit_balance, "export": _audit_export, "verify": _audit_verify,
              "reconcile": _audit_reconcile}[args.action]
    with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
        schema.ensure_schema(conn)
        return action(args, conn, settings)


def _audit_ledger(args: argparse.Namespace, conn: Any, settings: Any) -> int:
    from projections import audit

    try:
        rows = audit.known_ledger(conn, args.user, args.since, args.until)
    except LookupError as e:  # no such user (or not projected yet), as balance says
        print(f"palette audit ledger: {e.args[0]}", file=sys.stderr)
        return 2
    print(f"{'seq':>5} {'occurred_at':<33}{'type':<8}{'amount':>8}{'delta':>8}{'balance':>9}  ref")
    for r in rows:
        print(f"{r['seq']:>5} {r['occurred_at'].isoformat():<33}{r['type']:<8}{r['amount']:>8}"  # a grant's
              f"{r['balance_delta']:>8}{r['balance']:>9}  {one_line(r['ref'])}")  # reason may break lines
    if not rows:
        print("no ledger entries for this user in that range")
    return 0


def _audit_balance(args: argparse.Namespace, conn: Any, settings: Any) -> int:
    import json

    from projections import audit

    try:
        balance = audit.known_balance_as_of(conn, args.user, args.as_of)
    except LookupError as e:  # no such user (or not projected yet)
        print(f"palette audit balance: {e.args[0]}", file=sys.stderr)
        return 2
    print(json.dumps(balance, indent=2))
    return 0


def _audit_export(args: argparse.Namespace, conn: Any, settings: Any) -> int:
    import csv
    import json

    from projections import audit

    exported = with_progress(audit.export(conn), what="ledger rows")
    if args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(audit.LEDGER_COLUMNS)
        for r in exported:
            writer.writerow([csv_cell(r[c]) for c in audit.LEDGER_COLUMNS])
    else:
        for r in exported:
            sys.stdout.write(json.dumps(r, default=str) + "\n")
    return 0


def _audit_reconcile(args: argparse.Namespace, conn: Any, settings: Any) -> int:
    from projections import audit

    if (app := _log_at(settings, args.at, "reconcile")) is None:
        return 2
    try:
        t0 = time.monotonic()
        report = audit.reconcile(
            conn, app.recorder, app.mapper.transcoder,
            progress=lambda n: print(f"... {n:,} user events folded", file=sys.stderr, flush=True),
            at=args.at)
        log_size = app.recorder.max_notification_id() or 0
    finally:
        app.close()
    for d in report.differences:
        print(f"DIFF {d}")
    verdict = "OK" if report.ok else (f"{len(report.differences)} difference(s), of which "
                                      f"{len(report.balance_mismatches)} ledger/aggregate balance mismatch(es)")
    print(f"reconciled {report.events:,} user events (of {log_size:,} in the log; folded up to "
          f"position {report.position:,} at least), "
          f"{report.ledger_rows:,} ledger rows, {report.users:,} users "
          f"in {time.monotonic() - t0:.1f}s: {verdict}")
    return 0 if report.ok else 1


def _log_at(settings: Any, at: int | None, command: str) -> Any | None:
    """The event store, open, where ``--at`` names a position of its log (or is not given); else
    None, the refusal said on stderr as ``palette audit command``'s."""
    app = event_store(settings)
    try:
        refused = _refused_position(at, app)
    except BaseException:
        app.close()
        raise
    if refused is None:
        return app
    app.close()
    print(f"palette audit {command}: {refused}", file=sys.stderr)
    return None


def _refused_position(at: int | None, app: Any) -> str | None:
    """Why ``--at`` names no position of the log (None: it does, or it is not given)."""
    if at is None:
        return None
    if at < 0:
        return f"--at must be a log position (0 or more), not {at}"
    head = int(app.recorder.max_notification_id() or 0)
    return f"--at {at:,} is past the log's head (position {head:,})" if at > head else None


def _audit_keygen(args: argparse.Namespace) -> int:
    from adapters import checkpoints
    from adapters.settings import breaks_lines

    if breaks_lines(str(args.out)):  # a key that no setting could name
        print(f"palette audit keygen: --out {one_line(args.out)} holds a line break, which "
              "PALETTE_AUDIT_SIGNING_KEY_FILE (a setting, one line) cannot: name another file", file=sys.stderr)
        return 2
    try:
        public = checkpoints.keygen(args.out)
    except checkpoints.CheckpointError as e:
        print(f"palette audit keygen: {e}", file=sys.stderr)
        return 2
    print(f"signing key written to {args.out} (mode 0600): keep it off the database host's backups, and set "
          f"PALETTE_AUDIT_SIGNING_KEY_FILE={args.out} where checkpoints are taken")
    print(f"public key (Ed25519, hex), for auditors (PALETTE_AUDIT_PUBLIC_KEY): {checkpoints.public_hex(public)}")
    return 0


def add_commands(sub: Subcommands) -> None:
    aud = sub.add_parser("audit", help="auditors: queries over the billing_events projection")
    asub = aud.add_subparsers(dest="action", required=True)
    al = asub.add_parser("ledger", help="a user's ledger with running balance")
    al.add_argument("--user", type=uuid_value, required=True)
    al.add_argument("--from", dest="since", type=time_value, metavar="TIME",
                    help="period start, inclusive (ISO-8601; no offset: UTC)")
    al.add_argument("--to", dest="until", type=time_value, metavar="TIME",
                    help="period end, inclusive, unlike audit report's (ISO-8601; no offset: UTC)")
    ab = asub.add_parser("balance", help="a user's balance as of a time, with the positions used")
    ab.add_argument("--user", type=uuid_value, required=True)
    ab.add_argument("--as-of", type=time_value, required=True, metavar="TIME", help="ISO-8601; no offset: UTC")
    rec = asub.add_parser("reconcile", help="prove the projection equals the fold of the event log (exit 1 if not); "
                          "safe on a live system: one snapshot of the projection, the log folded to match it")
    rec.add_argument("--at", type=int, metavar="POSITION", default=None,
                     help="every event up to this log position must be folded (default: the log's head at start)")
    ae = asub.add_parser("export", help="every ledger row, paged by position")
    ae.add_argument("--format", choices=("csv", "jsonl"), default="jsonl")
    av = asub.add_parser("verify", help="recompute the per-user hash chains (exit 1 at a break); with --checkpoint, "
                         "also check every chain head a signed checkpoint holds (catches a consistent rewrite), and "
                         "that each head of the checkpoint signed just before it is still there, at its seq or past")
    av.add_argument("--checkpoint", type=file_name, metavar="FILE|latest",
                    help="a checkpoint file, or `latest` from the object store / PALETTE_AUDIT_CHECKPOINT_DIR "
                         "(the directory's alone, said on stderr, when the object store does not answer)")
    av.add_argument("--public-key", type=given_text, metavar="HEX|PEM_FILE",
                    help="with --checkpoint: the public key to trust (default: PALETTE_AUDIT_PUBLIC_KEY, else "
                         "the signing key's)")
    ar = asub.add_parser("report", help="a period's opening, granted, reserved, spent, refunded, closing and "
                         "outstanding credits by plan, at one log position (exit 1 if the identity fails)",
                         description="Figures for [--from, --to): opening/closing = spendable balance; reserved = "
                         "net credits moved into reservations in the period (placed - spent - refunded); "
                         "outstanding = owed to users at --to (closing + still held). Checks opening + granted - "
                         "spent = closing + reserved.")
    ar.add_argument("--from", dest="since", type=time_value, required=True, metavar="TIME",
                    help="period start (inclusive), ISO-8601; no offset: UTC")
    ar.add_argument("--to", dest="until", type=time_value, required=True, metavar="TIME",
                    help="period end (exclusive), ISO-8601; no offset: UTC")
    ar.add_argument("--at", type=int, metavar="POSITION", help="count the log up to here (default: its head)")
    ar.add_argument("--format", choices=("table", "csv", "json"), default="table")
    ack = asub.add_parser("checkpoint", help="sign the ledger's chain heads and log position (Ed25519, the key of "
                          "PALETTE_AUDIT_SIGNING_KEY or PALETTE_AUDIT_SIGNING_KEY_FILE) and keep the checkpoint in "
                          "the object store (audit/checkpoints/), PALETTE_AUDIT_CHECKPOINT_DIR and/or a file")
    ack.add_argument("--out", type=path_value, help="also write the checkpoint to this new file (never overwritten)")
    ack.add_argument("--no-s3", action="store_true", help="do not use the object store")
    akg = asub.add_parser("keygen", help="make an Ed25519 signing key file for checkpoints; prints the public key")
    akg.add_argument("--out", type=path_value, required=True, help="the key file to create (never overwritten)")
    aud.set_defaults(func=_cmd_audit)
