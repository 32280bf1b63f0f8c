"""The operators' commands: `palette token` (a staff token) and `palette admin` (erase a user,
one sweeper pass)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING
from uuid import uuid4

from adapters.cli.arguments import ttl, uuid_value
from adapters.cli.connect import running_settings

if TYPE_CHECKING:
    from adapters.cli.arguments import Subcommands


class OneLine(logging.Formatter):
    """A log record as one line after ``prefix``: its message and its error's type, no traceback
    (a command's output; a service's log keeps the traceback)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        error = record.exc_info[1] if record.exc_info else None
        return self.prefix + record.getMessage() + (f" ({type(error).__name__})" if error is not None else "")


def _cmd_token(args: argparse.Namespace) -> int:
    from adapters.system import SystemClock
    from adapters.tokens import TokenIssuer

    settings = running_settings()
    issuer = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience, settings.jwt_ttl_s)
    subject = args.subject or uuid4()
    print(issuer.issue(subject, SystemClock().now(), role=args.role, ttl_s=args.ttl))
    return 0


def _cmd_admin(args: argparse.Namespace) -> int:
    """Operators: erase a user (what DELETE /me does), or run one sweeper pass now."""
    from adapters import bootstrap

    settings = running_settings()
    if args.action == "sweep":
        sweeper = bootstrap.build_sweeper(settings)
        said = logging.StreamHandler(sys.stderr)  # what the pass logs (a pass that failed), a line each
        said.setFormatter(OneLine("palette admin sweep: "))
        said.setLevel(logging.WARNING)
        sweeping = logging.getLogger("palette")
        sweeping.addHandler(said)
        try:
            r = sweeper.step()
        finally:
            sweeping.removeHandler(said)
            sweeper.close()
        print(f"swept: {r.jobs_expired} job(s) expired (past {settings.retention_days} days, or "
              f"{settings.unpaid_retention_days} having spent nothing), "
              f"{r.erasures_finished} erasure(s) finished, {r.objects_deleted} object(s) deleted, "
              f"{r.snapshots_deleted} superseded snapshot(s) deleted")
        if r.failed:
            print(f"palette admin sweep: {len(r.failed)} pass(es) failed, tried again by the next sweep: "
                  f"{', '.join(r.failed)}", file=sys.stderr)
            return 1
        return 0
    from adapters.erasure import erase
    from domain.errors import DomainError

    container = bootstrap.build(settings, pool_size=2)
    try:
        done = erase(container.service, container.read_pool, container.s3, settings.s3_bucket, args.user_id)
    except DomainError as e:
        print(f"palette admin erase: {e}", file=sys.stderr)
        return 1
    finally:
        container.close()
    print(f"erased {args.user_id}: {'recorded now' if done.recorded else 'already erased, finished again'}; "
          f"{done.objects} object(s) and {done.webhooks} webhook endpoint(s) deleted, "
          f"{'key destroyed' if done.recorded else 'its key gone'}")
    return 0


def add_commands(sub: Subcommands) -> None:
    tok = sub.add_parser("token", help="mint an analyst or auditor token from the server secret")
    tok.add_argument("--role", choices=("analyst", "auditor"), required=True)
    tok.add_argument("--ttl", type=ttl, default=3600,
                     help="lifetime from 1m to 30d: seconds, or a number with s, m, h or d, e.g. 30m (default 1h)")
    tok.add_argument("--subject", type=uuid_value, help="who the token names (default: a fresh id)")
    tok.set_defaults(func=_cmd_token)
    adm = sub.add_parser("admin", help="operators: erase a user; run the sweeper once")
    adm_sub = adm.add_subparsers(dest="action", required=True)
    er = adm_sub.add_parser("erase", help="erase a user as DELETE /me does: jobs canceled and refunded, personal "
                            "fields' key destroyed, objects and webhooks deleted, tokens refused; the ledger "
                            "keeps its amounts (idempotent: finishes an erasure cut short)")
    er.add_argument("user_id", type=uuid_value)
    adm_sub.add_parser("sweep", help="one sweeper pass now: expire jobs past PALETTE_RETENTION_DAYS (or "
                       "PALETTE_UNPAID_RETENTION_DAYS having spent nothing), finish erasures cut short, delete "
                       "late and oversized uploads, delete snapshots superseded by a newer one a load can use")
    adm.set_defaults(func=_cmd_admin)
