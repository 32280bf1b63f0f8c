"""The operators' commands: `palette token` (a staff token) and `palette admin` (erase a user,
grant a user credits, change a user's plan, one sweeper pass)."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from uuid import uuid4

from adapters.cli.arguments import grant_credits, grant_reason, ttl, uuid_value
from adapters.cli.connect import reach_database, running_settings
from domain.plans import DEFAULT_PLANS

if TYPE_CHECKING:
    from adapters.cli.arguments import Subcommands
    from adapters.retention import Sweeper, SweepReport
    from application.services import PaletteService


def _cmd_token(args: argparse.Namespace) -> int:
    from adapters.system import SystemClock
    from adapters.tokens import TokenIssuer

    settings = running_settings()
    issuer = TokenIssuer(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience, settings.jwt_ttl_s)
    subject = args.subject or uuid4()
    print(issuer.issue(subject, SystemClock().now(), role=args.role, ttl_s=args.ttl))
    return 0


def _cmd_admin(args: argparse.Namespace) -> int:
    """Operators: erase a user (what DELETE /me does), grant a user credits, change a user's plan,
    or run one sweeper pass now."""
    from adapters import bootstrap

    settings = running_settings()
    reach_database(settings)  # PostgreSQL's reason at once, not the pools' "couldn't get a connection" 10 s on
    if args.action in ("grant", "plan"):
        container = bootstrap.build(settings, pool_size=2)
        try:
            return _grant(container.service, args) if args.action == "grant" else _plan(container.service, args)
        finally:
            container.close()
    if args.action == "sweep":
        failures = _Failures()
        sweeping = logging.getLogger("palette")  # the sweeper's, and the erasure's it finishes
        sweeping.addHandler(failures)
        try:
            sweeper = bootstrap.build_sweeper(settings)
            try:
                r = _sweep_saying_where(sweeper)
            finally:
                sweeper.close()
        finally:
            sweeping.removeHandler(failures)
        print(f"swept: {r.jobs_expired} job(s) expired (past {settings.retention_days} days, or "
              f"{settings.unpaid_retention_days} having spent nothing), "
              f"{r.erasures_finished} erasure(s) finished, {r.objects_deleted} object(s) deleted, "
              f"{r.snapshots_deleted} superseded snapshot(s) deleted")
        return _sweep_failed(failures.records) if failures.records else 0
    from botocore.exceptions import BotoCoreError, ClientError

    from adapters.cli import _store_unreachable  # imported here: adapters.cli imports this module
    from adapters.erasure import erase
    from adapters.logs import driver_reason
    from adapters.objects import NotDeleted
    from domain.errors import DomainError, NotFound

    container = bootstrap.build(settings, pool_size=2)
    try:
        done = erase(container.service, container.read_pool, container.s3, settings.s3_bucket, args.user_id)
    except NotFound as e:  # a user never registered, refused as grant and plan refuse one
        print(f"palette admin erase: {args.user_id}: {e}; nothing erased", file=sys.stderr)
        return 2
    except DomainError as e:
        print(f"palette admin erase: {args.user_id}: {e}", file=sys.stderr)
        return 1
    except (NotDeleted, BotoCoreError, ClientError) as e:
        if _store_unreachable(e):
            raise  # the one line of any command that cannot reach the object store (exit 3)
        # The objects are the erasure's one step on S3, after the tombstone, the Erased event,
        # the key and the webhooks: the rest is done, and running it again finishes it.
        print(f"palette admin erase: {args.user_id} erased but its objects not deleted: the object store "
              f"answered {type(e).__name__}: {driver_reason(e)}; run it again (or the sweeper finishes it)",
              file=sys.stderr)
        return 1
    finally:
        container.close()
    print(f"erased {args.user_id}: {'recorded now' if done.recorded else 'already erased, finished again'}; "
          f"{done.objects} object(s) and {done.webhooks} webhook endpoint(s) deleted, "
          f"{'key destroyed' if done.recorded else 'its key gone'}")
    return 0


def _grant(service: PaletteService, args: argparse.Namespace) -> int:
    """Record the grant once: its id is said before it is made, so that a run whose outcome is
    unclear (a lost connection, an interrupt) can be run again with it and grant nothing more."""
    from domain.errors import DomainError

    grant_id = args.grant_id
    if grant_id is None:
        grant_id = uuid4()
        print(f"grant {grant_id}: if this run's outcome is unclear, run it again with --grant-id {grant_id}",
              flush=True)
    try:
        done = service.grant_credits(args.user_id, args.credits, args.reason, grant_id)
    except DomainError as e:
        print(f"palette admin grant: {args.user_id}: {e}; nothing granted", file=sys.stderr)
        return 2
    if done.recorded:
        print(f"granted {args.credits} credits to {args.user_id} (grant {grant_id}): balance {done.value}")
    else:
        print(f"grant {grant_id} was already recorded for {args.user_id}: nothing granted now; balance {done.value}")
    return 0


def _plan(service: PaletteService, args: argparse.Namespace) -> int:
    from domain.errors import DomainError

    try:
        done = service.change_plan(args.user_id, args.plan)
    except DomainError as e:
        print(f"palette admin plan: {args.user_id}: {e}; plan not changed", file=sys.stderr)
        return 2
    plan = DEFAULT_PLANS[done.value]
    limits = (f"{plan.max_concurrency} job(s) at once, {plan.max_rule_slots} rule(s); "
              "credits unchanged (a plan's sign-up credits are granted at sign-up only)")
    if done.recorded:
        print(f"{args.user_id} moved to plan {plan.name}: {limits}")
    else:
        print(f"{args.user_id} was already on plan {plan.name}: nothing changed; {limits}")
    return 0


class _Failures(logging.Handler):
    """The warnings of a sweeper pass: what it could not do and went on past (a part of the pass
    that failed, an erasure it could not finish, a job's objects it could not delete), which a
    service logs, traceback and "retrying in 30 s" included. `palette admin sweep` says them in
    one line instead."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


SWEEP_PROGRESS_S = 10.0


def _sweep_saying_where(sweeper: Sweeper, every_s: float = SWEEP_PROGRESS_S,
                        say: Callable[[str], None] | None = None) -> SweepReport:
    """One sweeper pass, saying on stderr (``say``) every ``every_s`` which of its passes it is in:
    over a large backlog a pass runs minutes. A pass done sooner says nothing."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    current = ["first"]
    done = threading.Event()
    t0 = time.monotonic()

    def beat() -> None:
        while not done.wait(every_s):
            say(f"  sweeping: the {current[0]} pass, {time.monotonic() - t0:.0f}s in")

    heart = threading.Thread(target=beat, name="sweep-progress", daemon=True)
    heart.start()
    try:
        return sweeper.step(on_pass=lambda name: current.__setitem__(0, name))
    finally:
        done.set()
        heart.join()


def _sweep_failed(records: list[logging.LogRecord]) -> int:
    """The first thing the pass could not do, why, and how many more, in one line: exit 3 where
    a service did not answer (as any command that cannot reach it), else 1."""
    from adapters.cli import _is_unreachable, _store_unreachable  # imported here: adapters.cli imports this module
    from adapters.logs import driver_reason

    first = records[0]
    what = first.getMessage().split(";")[0]  # not the service's "retrying in ...": this command ends
    more = f" (and {len(records) - 1} more thing(s))" if len(records) > 1 else ""
    error = first.exc_info[1] if first.exc_info else None
    if error is not None and _store_unreachable(error):
        why, code = (f"cannot reach the object store ({driver_reason(error)}); is the stack up (`make run`) and "
                     "PALETTE_S3_ENDPOINT right?"), 3
    elif error is not None and _is_unreachable(error):
        why, code = (f"cannot reach PostgreSQL ({driver_reason(error)}); is the stack up (`make run`) and "
                     "PALETTE_DATABASE_URL right?"), 3
    else:
        why, code = (f"{type(error).__name__}: {driver_reason(error)}" if error is not None else ""), 1
    print(f"palette admin sweep: {what}{more}, the rest of the pass done{f': {why}' if why else ''}", file=sys.stderr)
    return code


def add_commands(sub: Subcommands) -> None:
    tok = sub.add_parser("token", help="mint an analyst or auditor token from the server secret")
    tok.add_argument("--role", choices=("analyst", "auditor"), required=True)
    tok.add_argument("--ttl", type=ttl, default=3600,
                     help="lifetime from 1m to 30d: seconds, or a number with s, m, h or d, e.g. 30m (default 1h)")
    tok.add_argument("--subject", type=uuid_value, help="who the token names (default: a fresh id)")
    tok.set_defaults(func=_cmd_token)
    adm = sub.add_parser("admin", help="operators: erase a user; grant credits; change a plan; run the sweeper once")
    adm_sub = adm.add_subparsers(dest="action", required=True)
    er = adm_sub.add_parser("erase", help="erase a user as DELETE /me does: jobs canceled and refunded, personal "
                            "fields' key destroyed, objects and webhooks deleted, tokens refused; the ledger "
                            "keeps its amounts (idempotent: finishes an erasure cut short)")
    er.add_argument("user_id", type=uuid_value)
    gr = adm_sub.add_parser("grant", help="grant a user credits (goodwill, a refund by hand): one CreditsGranted, "
                            "in the ledger with its reason; idempotent by its grant id (made and printed first "
                            "when not given: run it again with --grant-id after an unclear outcome)")
    gr.add_argument("user_id", type=uuid_value)
    gr.add_argument("credits", type=grant_credits, help="a whole number from 1 to 1,000,000")
    gr.add_argument("--reason", type=grant_reason, required=True,
                    help="why, kept in the event log and the billing ledger: 1 to 200 characters of text the API "
                    "stores (no NUL, no control characters but tab and line breaks)")
    gr.add_argument("--grant-id", type=uuid_value,
                    help="the grant's id (UUID); one already recorded for the user grants nothing "
                    "(default: a fresh one, printed before the grant is made)")
    pl = adm_sub.add_parser("plan", help="move a user to a plan (its limits on jobs at once and rules); the plan the "
                            "user is on already records nothing; credits are not granted")
    pl.add_argument("user_id", type=uuid_value)
    pl.add_argument("plan", choices=sorted(DEFAULT_PLANS), help="one of %(choices)s")
    adm_sub.add_parser("sweep", help="one sweeper pass now: expire jobs past PALETTE_RETENTION_DAYS (or "
                       "PALETTE_UNPAID_RETENTION_DAYS having spent nothing), finish erasures cut short, delete "
                       "late and oversized uploads, delete snapshots superseded by a newer one a load can use")
    adm.set_defaults(func=_cmd_admin)
