"""adapters.loop_pg.Together: calls made while a run is under way are answered by the next run."""

from __future__ import annotations

import asyncio

import pytest

from adapters.loop_pg import Together


class Recorder:
    """A run that records its batches and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.fail_on: set[int] = set()
        self.short = False  # answers one fewer than asked

    async def __call__(self, args: list[int]) -> list[int]:
        self.batches.append(args)
        self.started.set()
        await self.release.wait()
        if self.fail_on.intersection(args):
            raise ValueError("refused")
        answers = [a * 10 for a in args]
        return answers[:-1] if self.short else answers


def test_calls_made_while_a_run_is_under_way_go_together_into_the_next_one_at_most_most_at_a_time() -> None:
    async def scenario() -> tuple[list[list[int]], list[int]]:
        run = Recorder()
        together = Together(run, most=3)
        first = asyncio.ensure_future(together(0))
        await run.started.wait()  # the first run holds 0 alone
        rest = [asyncio.ensure_future(together(i)) for i in range(1, 8)]
        run.release.set()
        answers = await asyncio.gather(first, *rest)
        return run.batches, answers

    batches, answers = asyncio.run(scenario())
    assert batches == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert answers == [i * 10 for i in range(8)]


def test_a_failed_run_fails_its_callers_only_and_the_next_run_still_goes() -> None:
    async def scenario() -> list[object]:
        run = Recorder()
        run.fail_on = {2}
        together = Together(run, most=2)
        calls = [asyncio.ensure_future(together(i)) for i in range(1, 5)]
        run.release.set()
        return list(await asyncio.gather(*calls, return_exceptions=True))

    got = asyncio.run(scenario())
    assert [type(g) for g in got[:2]] == [ValueError, ValueError] and got[2:] == [30, 40]


def test_a_run_that_answers_too_few_fails_its_callers_rather_than_leave_them_waiting() -> None:
    async def scenario() -> list[object]:
        run = Recorder()
        run.short = True
        together = Together(run)
        calls = [asyncio.ensure_future(together(i)) for i in range(3)]
        run.release.set()
        return list(await asyncio.gather(*calls, return_exceptions=True))

    assert all(isinstance(g, RuntimeError) for g in asyncio.run(scenario()))


def test_a_caller_that_goes_away_takes_no_other_callers_answer_with_it() -> None:
    async def scenario() -> tuple[list[list[int]], list[object]]:
        run = Recorder()
        together = Together(run)
        calls = [asyncio.ensure_future(together(i)) for i in range(3)]
        await run.started.wait()
        calls[0].cancel()
        run.release.set()
        return run.batches, list(await asyncio.gather(*calls, return_exceptions=True))

    batches, got = asyncio.run(scenario())
    assert batches == [[0, 1, 2]]  # the cancelled call's argument was still run
    assert isinstance(got[0], asyncio.CancelledError) and got[1:] == [10, 20]


def test_each_event_loop_runs_its_own_calls() -> None:
    run_calls: list[list[int]] = []

    async def run(args: list[int]) -> list[int]:
        run_calls.append(args)
        return [-a for a in args]

    together = Together(run)

    async def two() -> list[int]:
        return list(await asyncio.gather(together(1), together(2)))

    assert asyncio.run(two()) == [-1, -2]
    assert asyncio.run(two()) == [-1, -2]  # a second loop: the first loop's state is not reused
    assert run_calls == [[1, 2], [1, 2]]
    assert len(together._by_loop) == 1


@pytest.mark.parametrize("most", [1, 500])
def test_most_bounds_a_run(most: int) -> None:
    seen: list[int] = []

    async def run(args: list[int]) -> list[int]:
        seen.append(len(args))
        await asyncio.sleep(0)
        return args

    together = Together(run, most=most)

    async def many() -> list[int]:
        return list(await asyncio.gather(*(together(i) for i in range(1200))))

    assert asyncio.run(many()) == list(range(1200))
    assert max(seen) <= most and sum(seen) == 1200


def test_a_run_cancelled_while_its_loop_goes_on_leaves_no_cancelled_call_to_fail_the_next_run() -> None:
    async def scenario() -> tuple[list[object], int]:
        run = Recorder()
        together = Together(run)
        first = asyncio.ensure_future(together(1))
        await run.started.wait()
        second = asyncio.ensure_future(together(2))  # waiting for the next run
        await asyncio.sleep(0)
        running = together._by_loop[asyncio.get_running_loop()].running
        assert running is not None
        running.cancel()
        got = list(await asyncio.gather(first, second, return_exceptions=True))
        run.release.set()
        return got, await asyncio.wait_for(together(3), 1)  # not the cancelled 2's run, nor waiting forever

    got, third = asyncio.run(scenario())
    assert all(isinstance(g, asyncio.CancelledError) for g in got) and third == 30


def test_a_caller_waits_for_a_stalled_run_at_most_its_timeout_and_the_calls_after_it_are_answered() -> None:
    """A statement stalled on a lock, or on a database that stopped answering: its callers get
    PoolTimeout (the API's 503) at their deadline, not an answer that never comes; the run, once
    it ends, serves the calls made meanwhile."""
    from psycopg_pool import PoolTimeout

    async def scenario() -> tuple[list[object], list[int]]:
        run = Recorder()
        together = Together(run, timeout_s=0.05)
        # (the outer bound only turns a caller that would wait forever into this test's failure)
        stalled = await asyncio.wait_for(asyncio.gather(together(1), together(2), return_exceptions=True), 10)
        run.release.set()
        return list(stalled), [await together(3)]

    stalled, after = asyncio.run(scenario())
    assert all(isinstance(s, PoolTimeout) for s in stalled)
    assert after == [30]


def test_a_run_that_never_ends_is_given_up_at_the_deadline_and_the_next_calls_get_a_run_of_their_own() -> None:
    """A database that stopped answering without closing the socket: the stalled run is given up
    (its callers get PoolTimeout, its statement is cancelled) and the calls after it are answered
    by a run of their own, though the stalled statement never returns."""
    from psycopg_pool import PoolTimeout

    cancelled: list[list[int]] = []

    async def run(args: list[int]) -> list[int]:
        if 1 in args:
            try:
                await asyncio.Event().wait()  # never set
            except asyncio.CancelledError:
                cancelled.append(args)
                raise
        return [a * 10 for a in args]

    async def scenario() -> tuple[list[object], int]:
        together = Together(run, timeout_s=0.05)
        stalled = await asyncio.wait_for(asyncio.gather(together(1), return_exceptions=True), 10)
        return list(stalled), await asyncio.wait_for(together(2), 10)

    stalled, after = asyncio.run(scenario())
    assert [type(s) for s in stalled] == [PoolTimeout]
    assert after == 20 and cancelled == [[1]]
