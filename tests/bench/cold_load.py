"""A cold load of one long user stream on real PostgreSQL (not part of `palette bench`): a fresh
embedded stack, one user grown to ``--events`` events through the group committer (which takes
its snapshots as it goes), then ``--repeats`` loads by a group committer that has never seen it:
from the newest snapshot (what the API does), and folding the whole stream (the same loader
without the snapshot table: what it did before). Each load is timed from the read being queued
to its answer, on a writer thread already started. With ``--throughput-rounds N``, then what the
snapshot query costs on the hot path: ``core_commands_per_s``'s mixed sessions (96 threads, 10 s)
through a group committer loading with snapshots and through one loading without, alternated N
times (medians).

    .venv/bin/python -m tests.bench.cold_load --events 20050 --repeats 15 --throughput-rounds 4"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from adapters.bootstrap import open_event_store
from adapters.pg_streams import PgStreamLoader, pg_stream_loader
from adapters.system import RandomIds, SystemClock
from application.executors import GroupCommitter
from application.ports import StreamLoader
from application.services import PaletteApplication, PaletteService
from application.unit_of_work import UnitOfWork, touches
from domain.user import User
from tests.bench.core import core_commands_per_s
from tests.bench.harness import PLANS, running_stack, say
from tests.keys import process_keys

QUEUED_TOGETHER = 90  # grants queued at once while growing the stream (about one batch each)


def grant(user_id: uuid.UUID) -> Any:
    """A command granting the user one credit (one event on its stream), for the group committer."""
    @touches(user_id)
    def command(uow: UnitOfWork) -> None:
        user = uow.get(User, user_id)
        assert user is not None
        user.grant(1, "one more event", SystemClock().now())

    return command


def grown_user(app: PaletteApplication, events: int) -> tuple[uuid.UUID, int]:
    """A new user with ``events`` events (at least its registration's); the snapshots taken."""
    writer = GroupCommitter(app, pg_stream_loader(app)).start()
    try:
        service = PaletteService(app, writer, SystemClock(), RandomIds(), **process_keys())
        user_id = service.register(f"cold-{uuid.uuid4()}").value[0]
        while (version := _version(writer, user_id)) < events:
            for f in [writer.submit(grant(user_id)) for _ in range(min(QUEUED_TOGETHER, events - version))]:
                f.result()
        _version(writer, user_id)  # queued behind the last save: its snapshot is written
        return user_id, writer.snapshots_taken
    finally:
        writer.stop()


def _version(writer: GroupCommitter, user_id: uuid.UUID) -> int:
    user = writer.read(user_id)
    assert user is not None
    return int(user.version)


def cold_load_ms(app: PaletteApplication, loader: Callable[[], StreamLoader | None], user_id: uuid.UUID,
                 repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` first reads of ``user_id`` by a new group committer."""
    times = []
    for _ in range(repeats):
        writer = GroupCommitter(app, loader()).start()
        try:
            writer.read(uuid.uuid4())  # the writer thread running, nothing of the user cached
            t0 = time.perf_counter()
            writer.read(user_id)
            times.append((time.perf_counter() - t0) * 1000)
        finally:
            writer.stop()
    return times


def throughput(app: PaletteApplication, kinds: dict[str, Callable[[], StreamLoader | None]],
               rounds: int) -> dict[str, float]:
    """Median commands per second of the mixed sessions through a group committer on each loader."""
    rates: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(rounds):
        for name, loader in kinds.items():
            writer = GroupCommitter(app, loader()).start()
            try:
                service = PaletteService(app, writer, SystemClock(), RandomIds(), plans=PLANS, **process_keys())
                rates[name].append(core_commands_per_s(service, 10.0, 96))
            finally:
                writer.stop()
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_050, help="the user stream's length (default 20050)")
    parser.add_argument("--repeats", type=int, default=15, help="cold loads of each kind (default 15)")
    parser.add_argument("--throughput-rounds", type=int, default=0,
                        help="alternated rounds of mixed sessions with and without snapshots (default 0)")
    args = parser.parse_args()
    with running_stack() as stack:
        app = open_event_store(stack.settings)
        try:
            user_id, taken = grown_user(app, max(2, args.events))
            say(f"a user of {args.events:,} events; {taken} snapshots taken on the way")
            kinds: dict[str, Callable[[], StreamLoader | None]] = {
                "from its newest snapshot": lambda: pg_stream_loader(app),
                "the whole stream folded": lambda: PgStreamLoader(app.recorder),  # type: ignore[arg-type]
            }
            for name, loader in kinds.items():
                times = cold_load_ms(app, loader, user_id, args.repeats)
                say(f"cold load, {name}: median {statistics.median(times):.2f} ms "
                    f"(min {min(times):.2f}, max {max(times):.2f}; {args.repeats} loads)")
            if args.throughput_rounds:
                rates = throughput(app, kinds, args.throughput_rounds)
                say("mixed sessions, commands/s (medians of "
                    f"{args.throughput_rounds}): " + ", ".join(f"{name}: {r:,.0f}" for name, r in rates.items()))
        finally:
            app.close()


if __name__ == "__main__":
    main()
