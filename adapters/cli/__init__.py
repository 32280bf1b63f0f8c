"""The `palette` command line. Each module adds the commands of one audience: stack (env, up,
serve), read_models (projections), analysts (replay, export, query), auditors (audit), operators
(token, admin) and bench; this one parses and runs them, and turns the failures a user can fix
into one line and an exit status."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from adapters.cli import analysts, auditors, bench, operators, read_models, stack
from adapters.cli.outputs import SIGPIPE_EXIT, stdout_closed, stdout_gone
from adapters.logs import driver_reason
from adapters.settings import SettingsError
from domain.text import one_line
from infra.config import unproxied_loopback
from infra.supervisor import StackError

COMMANDS = (stack, read_models, analysts, auditors, bench, operators)


class _Parser(argparse.ArgumentParser):
    """argparse's refusal in one line, as every other refusal of the command line (its usage,
    several lines of it, is what --help prints), an argument it did not expect escaped to stay on
    that line; its subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {one_line(message)} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="palette", description="Palette: event-sourced photo-editing backend.")
    sub = p.add_subparsers(dest="command", required=True)
    for commands in COMMANDS:
        commands.add_commands(sub)
    return p


def _is_unreachable(e: BaseException) -> bool:
    import psycopg
    from eventsourcing.persistence import OperationalError

    return isinstance(e, (psycopg.OperationalError, OperationalError))


def _disk_full(e: BaseException) -> str | None:
    """PostgreSQL's own words when ``e`` is its refusal of a write on a full disk (SQLSTATE 53100,
    ``could not extend file ...: No space left on device``), else None: it answered, so "cannot
    reach PostgreSQL ... is the stack up?" (and its HINT line as the reason) would mislead."""
    from adapters.api.unavailable import disk_full

    if (refusal := disk_full(e)) is None:
        return None
    diag = getattr(refusal, "diag", None)
    return str(getattr(diag, "message_primary", None) or "No space left on device")


# PostgreSQL's refusals of what a command is not allowed: a read-only transaction (a standby, a
# database or role made read-only) and a privilege the role lacks.
REFUSALS = frozenset({"25006", "42501"})


def _refusal(e: BaseException) -> BaseException | None:
    """PostgreSQL's refusal of a statement as not allowed (REFUSALS), raised as it is or under
    eventsourcing's error (its cause), else None."""
    import psycopg

    for error in (e, e.__cause__):
        if isinstance(error, psycopg.Error) and error.sqlstate in REFUSALS:
            return error
    return None


def _broker_unreachable(e: BaseException) -> bool:
    """No broker answered in time (kafka-python's bootstrap, an acknowledgement waited on)."""
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    return isinstance(e, (KafkaTimeoutError, KafkaConnectionError))


def _store_unreachable(e: BaseException) -> bool:
    """The object store did not answer (no server at PALETTE_S3_ENDPOINT, a timeout), or its
    endpoint is no URL botocore can use."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return isinstance(e, (BotoConnectionError, HTTPClientError)) or (
        isinstance(e, ValueError) and str(e).startswith("Invalid endpoint:"))


# Writing the output failed for a reason its reader cannot fix by reading on (a full disk, a
# quota, a file too big, an I/O error): not a closed pipe, and no file of ours to name.
OUTPUT_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `timeout`, a service manager's stop) delivered as Ctrl-C is, so that it unwinds a
    command the same way: an export's staging folder removed, a running DuckDB query interrupted
    (adapters/query.py stops its worker on KeyboardInterrupt), a connection closed; exit 143."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    unproxied_loopback(os.environ)  # before any client is made; the processes it starts inherit it
    args = parser().parse_args(argv)
    if sys.stdout is None:  # started with stdout closed (`>&-`): nowhere to write what it prints
        print(f"palette {args.command}: stdout is closed; redirect it (> FILE or > /dev/null)", file=sys.stderr)
        return 2
    if args.command not in ("up", "serve"):  # those two install their own handlers
        signal.signal(signal.SIGTERM, _terminated)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a reader gone away shows here, not at the interpreter's exit
        return code
    except BrokenPipeError:
        if not stdout_closed():
            raise  # a socket's peer went away, not stdout's reader
        return stdout_gone()
    except (SettingsError, StackError) as e:
        print(f"palette {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if (said := _said_why(args.command, e)) is None:
            raise
        return said
    except KeyboardInterrupt as e:
        return 128 + e.signum if isinstance(e, Terminated) else 130


def _said_why(command: str, e: Exception) -> int | None:
    """The one line a command stopped by ``e`` says, and its exit code (3: a part of the stack
    away or refusing, 2: a file or the output); None: a fault of ours, left to its traceback."""
    if logging.getLogger().handlers and (_is_unreachable(e) or _broker_unreachable(e)):
        # A service's log (`palette serve` configures one) keeps where it met the error: a
        # timeout hours into its run is not the start-up's unreachable stack. The one line
        # below is what a command without a log says.
        logging.getLogger("palette.serve").error("stopped on %s", type(e).__name__, exc_info=e)
    if _is_unreachable(e) and (full := _disk_full(e)) is not None:
        print(f"palette {command}: PostgreSQL cannot write: its disk is full ({full}); "
              "free space where its data is (PALETTE_DATA_DIR's pg/, or pg-elsewhere's)", file=sys.stderr)
        return 3
    if _is_unreachable(e):
        reason = driver_reason(e)
        hint = ("is PALETTE_DATA_DIR the running stack's (its secrets.json holds the password) and "
                "PALETTE_DATABASE_URL right?" if "password authentication failed" in reason else
                "is the stack up (`make run`) and PALETTE_DATABASE_URL right?")
        print(f"palette {command}: cannot reach PostgreSQL ({reason}); {hint}", file=sys.stderr)
        return 3
    if (refusal := _refusal(e)) is not None:
        print(f"palette {command}: PostgreSQL refused ({driver_reason(refusal)}); is PALETTE_DATABASE_URL "
              "the primary's, as the stack's role?", file=sys.stderr)
        return 3
    if _broker_unreachable(e):  # `palette serve gpu`, which needs no database, meets it first
        print(f"palette {command}: cannot reach the broker ({driver_reason(e)}); "
              "is the stack up (`make run`) and PALETTE_KAFKA_BOOTSTRAP right?", file=sys.stderr)
        return 3
    if _store_unreachable(e):
        print(f"palette {command}: cannot reach the object store ({driver_reason(e)}); "
              "is the stack up (`make run`) and PALETTE_S3_ENDPOINT right?", file=sys.stderr)
        return 3
    if isinstance(e, OSError) and e.filename is not None:  # a file we read or write
        print(f"palette {command}: {one_line(e.filename)}: {e.strerror or e}", file=sys.stderr)
        return 2
    if isinstance(e, OSError) and e.errno in OUTPUT_ERRORS:  # stdout: > a file on a full disk, /dev/full
        print(f"palette {command}: cannot write the output: {e.strerror or e}", file=sys.stderr)
        stdout_gone()  # what is still buffered cannot be written either: not at the interpreter's exit
        return 2
    return None


__all__ = ["SIGPIPE_EXIT", "Terminated", "main", "parser"]
