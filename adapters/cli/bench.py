"""`palette bench`: the benchmark harness of a source checkout (tests/bench)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from adapters.cli.arguments import event_count
from adapters.cli.outputs import unwritable
from domain.text import one_line

if TYPE_CHECKING:
    from adapters.cli.arguments import Subcommands


def _cmd_bench(args: argparse.Namespace) -> int:
    """The harness is no part of the installed packages: it is imported from tests/bench."""
    import importlib
    from pathlib import Path

    # Each would be ignored without a word: the chart is the whole benchmark's, and N sizes the
    # audit run as --quick sizes the others.
    if args.plot_path is not None and (args.quality or args.audit_events is not None):
        print("palette bench: --plot charts the whole benchmark; --quality and --audit-events draw none",
              file=sys.stderr)
        return 2
    if args.quick and args.audit_events is not None:
        print("palette bench: --quick shortens the whole benchmark or --quality; --audit-events N is sized by N",
              file=sys.stderr)
        return 2
    for option, path in (("--json", args.json_path), ("--plot", args.plot_path)):
        if path is not None and (why := unwritable(Path(path))) is not None:
            print(f"palette bench: cannot write {one_line(path)} ({option}): {why}", file=sys.stderr)
            return 2
    # A console script's sys.path starts with its own directory, not the working directory
    # (`python -m` would put it first): from a checkout's root, tests/ becomes importable.
    root = Path.cwd()
    if (root / "tests" / "bench" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        bench = importlib.import_module("tests.bench")
    except ModuleNotFoundError as e:
        if e.name not in ("tests", "tests.bench"):
            print(f"palette bench: {e} (the benchmark needs the dev extras: pip install -e '.[dev]')",
                  file=sys.stderr)
            return 2
        print("palette bench runs from a source checkout: tests/bench is not importable here", file=sys.stderr)
        return 2
    if args.quality:
        quality = importlib.import_module("tests.bench.quality")
        return int(quality.main(args.quick, args.json_path))
    return int(bench.main(args.quick, args.json_path, args.plot_path, args.audit_events))


def add_commands(sub: Subcommands) -> None:
    bench = sub.add_parser("bench", help="measure every performance goal against a naive baseline "
                           "(from a source checkout: runs tests/bench)",
                           description="Starts its own embedded stack on free ports and measures every performance "
                           "goal next to a naive baseline. The harness is tests/bench: run it from the root of a "
                           "source checkout.")
    bench.add_argument("--quick", action="store_true", help="the short profile (about 10 minutes on a 2-core machine)")
    instead = bench.add_mutually_exclusive_group()
    instead.add_argument("--quality", action="store_true",
                         help="edit quality against ground truth instead (generated scenes, both mask sources)")
    bench.add_argument("--json", dest="json_path", help="write the results as JSON here")
    bench.add_argument("--plot", dest="plot_path", help="write a PNG chart of measured/goal here")
    instead.add_argument("--audit-events", type=event_count, metavar="N",
                         help="instead: write a log of about N events (1 or more), then time rebuilding users, "
                              "billing_events and jobs_log, `audit reconcile` and `replay all` over it")
    bench.set_defaults(func=_cmd_bench)
