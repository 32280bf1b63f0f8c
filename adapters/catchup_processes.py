"""Catch-up side by side: the projector folds one group of read models from the event log while
each other group (``projections.catchup.groups``: no stream type in two) is folded by a process of
its own, with its own connections, reading only its streams' events. On the 2-core bench machine
(`python -m tests.bench.catchup_direct`, 86,467 events): 16.7k-22.8k events/s in two processes
against 7.9k-13.6k in one.

The processes are forked from multiprocessing's fork server, started with the projector (it
imports the code once, ~1 s), so a catch-up does not wait for a fresh interpreter; one lives as
long as its catch-up. A process whose projector died (SIGKILL) stops after the page it is on
(each page is its own transaction, as the projector's), so it does not write beside the
projector that restarts; the server exits once the projector and its last process are gone. A
process that fails, dies, cannot start or makes no progress for ``STALL_S`` (a database that
stopped answering: it reports each page it commits) leaves its models to the projector, which
stops it and folds them itself afterwards: a catch-up never ends with a group behind, nor waits
forever for one."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from adapters.settings import Settings
from projections.store import BatchResult, add_result

log = logging.getLogger("palette.projector")
PRELOAD = ["psycopg", "adapters.bootstrap", "adapters.logs", "projections.catchup"]
# Seconds a process beside may go without committing a page (pages take well under one on the
# bench machine) before the projector stops it and folds its models itself.
STALL_S = 120.0


def _ready() -> None:
    """The first process: its fork starts the server, which imports ``PRELOAD``."""


class Orphaned(RuntimeError):
    """The projector that started this process is gone."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone's process: not ours any more, but alive
        return True
    return True


def _fold(settings_json: str, models: Sequence[str], head: int, projector: int, answer: Connection) -> None:
    """A process beside the projector (pid ``projector``): ``models`` folded up to ``head``; the
    position of each page committed is sent as it goes (an int), then what was applied (or why it
    failed, as text)."""
    import psycopg

    from adapters import logs
    from adapters.bootstrap import open_event_store
    from projections.catchup import fold_models
    from projections.log import LogReader

    def still_wanted(position: int) -> None:
        if not _alive(projector):
            raise Orphaned(f"the projector (pid {projector}) is gone: stopping at position {position}")
        answer.send(position)

    logs.configure("projector")
    try:
        settings = Settings.model_validate_json(settings_json)
        app = open_event_store(settings, pool_size=1)
        try:
            with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
                result: BatchResult | str = fold_models(conn, LogReader.of(app), models, head, still_wanted)
        finally:
            app.close()
    except (Orphaned, BrokenPipeError) as exc:  # BrokenPipeError: the projector stopped listening
        log.warning("%s", exc)
        return
    except Exception as exc:  # noqa: BLE001 - reported to the projector, which folds these models itself
        result = f"{type(exc).__name__}: {exc}"[:500]
    with contextlib.suppress(OSError):  # the projector died meanwhile
        answer.send(result)
    answer.close()


class CatchUpProcesses:
    """``CatchUp.beside``: each of ``groups`` folded up to a head by a process of its own;
    ``fold_here`` (models, head) folds a group whose process failed in the projector instead."""

    def __init__(self, settings: Settings, groups: Sequence[Sequence[str]],
                 fold_here: Callable[[Sequence[str], int], BatchResult], stall_s: float = STALL_S) -> None:
        self.settings_json = settings.model_dump_json()
        self.stall_s = stall_s
        self.pid = os.getpid()  # the projector: a process beside it stops once it is gone
        self.groups = [tuple(g) for g in groups]
        self.fold_here = fold_here
        self.ctx: Any = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)

    def warm(self) -> threading.Thread:
        """Start the fork server now, in the background (the first catch-up waits for it if it
        comes before)."""
        def start() -> None:
            process = self.ctx.Process(target=_ready, daemon=True)
            process.start()
            process.join()

        thread = threading.Thread(target=start, name="catchup-forkserver", daemon=True)
        thread.start()
        return thread

    def __call__(self, head: int) -> Callable[[], BatchResult]:
        started: list[tuple[tuple[str, ...], Any, Connection | None, str]] = []
        for models in self.groups:
            receive, send = self.ctx.Pipe(duplex=False)
            process = self.ctx.Process(target=_fold, args=(self.settings_json, models, head, self.pid, send),
                                       name=f"catchup-{'-'.join(models)}", daemon=True)
            try:
                process.start()
            except Exception as exc:  # noqa: BLE001 - no fork server, no file descriptors: folded here
                receive.close()
                started.append((models, None, None, f"it did not start: {type(exc).__name__}: {exc}"))
                continue
            finally:
                send.close()  # the child holds the only sending end: its death ends the wait below
            started.append((models, process, receive, ""))

        def wait() -> BatchResult:
            total = BatchResult()
            for models, process, receive, why in started:
                answer: BatchResult | str | None = why or None
                if receive is not None:
                    try:
                        answer = self._answer(process, receive)
                    finally:
                        receive.close()
                        process.join()
                if isinstance(answer, BatchResult):
                    add_result(total, answer)
                    continue
                why = answer if isinstance(answer, str) else f"its process ended with code {process.exitcode}"
                log.warning("catching up %s beside the projector failed (%s): folding them here",
                            ", ".join(models), why)
                add_result(total, self.fold_here(models, head))
            return total

        return wait

    def _answer(self, process: Any, receive: Connection) -> BatchResult | str | None:
        """The process's answer once it sends one; None when it died without; why, when it went
        ``stall_s`` without a page (then it is stopped: its open page rolls back)."""
        try:
            while receive.poll(self.stall_s):
                answer = receive.recv()
                if not isinstance(answer, int):  # a page's position: progress, go on waiting
                    return answer  # type: ignore[no-any-return]
        except EOFError:
            return None
        process.kill()
        return f"it made no progress for {self.stall_s:g} s and was stopped"
