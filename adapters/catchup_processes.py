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
process that fails, dies or cannot start leaves its models to the projector, which folds them
itself afterwards: a catch-up never ends with a group behind. Nor does it wait forever on one: a
process that sends nothing for ``STALL_S`` while the projector waits on it (it reports each page it
commits; a write blocked on a lock has nothing else to time it out) is stopped, its database
session ended (so its open page rolls back and its locks go), and its models folded here."""

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
    """A process beside the projector (pid ``projector``): ``models`` folded up to ``head``. It
    sends ("session", its writing connection's backend pid), ("page", position) after each page
    it commits, then ("done", what was applied) or ("failed", why)."""
    import psycopg

    from adapters import logs
    from adapters.bootstrap import open_event_store
    from projections.catchup import fold_models
    from projections.log import LogReader

    def page_committed(position: int) -> None:
        if not _alive(projector):
            raise Orphaned(f"the projector (pid {projector}) is gone: stopping at position {position}")
        answer.send(("page", position))

    logs.configure("projector")
    result: tuple[str, BatchResult | str]
    try:
        settings = Settings.model_validate_json(settings_json)
        app = open_event_store(settings, pool_size=1)
        try:
            with psycopg.connect(settings.effective_database_url, autocommit=True) as conn:
                answer.send(("session", conn.info.backend_pid))
                result = ("done", fold_models(conn, LogReader.of(app), models, head, page_committed))
        finally:
            app.close()
    except (Orphaned, BrokenPipeError) as exc:  # BrokenPipeError: the projector stopped listening
        log.warning("%s", exc)
        return
    except Exception as exc:  # noqa: BLE001 - reported to the projector, which folds these models itself
        result = ("failed", f"{type(exc).__name__}: {exc}"[:500])
    with contextlib.suppress(OSError):  # the projector died meanwhile
        answer.send(result)
    answer.close()


class CatchUpProcesses:
    """``CatchUp.beside``: each of ``groups`` folded up to a head by a process of its own;
    ``fold_here`` (models, head) folds a group whose process failed in the projector instead."""

    def __init__(self, settings: Settings, groups: Sequence[Sequence[str]],
                 fold_here: Callable[[Sequence[str], int], BatchResult], stall_s: float = STALL_S) -> None:
        self.settings_json = settings.model_dump_json()
        self.database_url = settings.effective_database_url
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
                        if process.is_alive():  # _answer did not get to the end (it raised)
                            process.kill()
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
        """The process's answer once it sends one; None when it died without one; why, when it
        sent nothing for ``stall_s`` (it is stopped, and its database session ended)."""
        session: int | None = None
        try:
            while receive.poll(self.stall_s):
                kind, value = receive.recv()
                if kind == "session":
                    session = value
                elif kind != "page":  # "done" or "failed": the answer
                    return value  # type: ignore[no-any-return]
        except (EOFError, OSError):
            return None
        process.kill()
        try:  # its answer may have come in just after the wait
            while receive.poll(0):
                kind, value = receive.recv()
                if kind in ("done", "failed"):
                    return value  # type: ignore[no-any-return]
        except (EOFError, OSError):
            pass
        ended = self._end_session(session) if session is not None else "it had none yet"
        return f"it sent nothing for {self.stall_s:g} s and was stopped; its database session: {ended}"

    def _end_session(self, backend_pid: int) -> str:
        """End a stopped process's database session (a statement waiting on a lock would
        otherwise hold its page's locks until the wait ends), waiting up to 10 s for it to go."""
        import psycopg

        try:
            with psycopg.connect(self.database_url, autocommit=True, connect_timeout=10) as conn:
                row = conn.execute("SELECT pg_terminate_backend(%s, 10000)", [backend_pid]).fetchone()
        except psycopg.Error as exc:
            return f"not ended ({type(exc).__name__}: {exc})"[:200]
        return f"{backend_pid} ended" if row and row[0] else f"{backend_pid} already gone"
