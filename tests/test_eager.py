"""tidings.eager: a coroutine runs at once, and in a task only from where it first waits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tidings import eager


class Outcomes:
    def __init__(self) -> None:
        self.got: list[tuple[Any, BaseException | None]] = []
        self.event = asyncio.Event()

    def __call__(self, result: Any, exc: BaseException | None) -> None:
        self.got.append((result, exc))
        self.event.set()

    async def wait(self) -> tuple[Any, BaseException | None]:
        await asyncio.wait_for(self.event.wait(), 5)
        return self.got[0]


async def test_a_coroutine_that_never_waits_is_done_before_run_returns() -> None:
    steps: list[str] = []

    async def work() -> int:
        steps.append("ran")
        return 42

    done = Outcomes()
    assert eager.run(work(), done, eager=True) is True
    assert steps == ["ran"] and done.got == [(42, None)]


async def test_a_coroutine_that_waits_goes_on_in_a_task() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    trace: list[Any] = []

    async def work() -> str:
        trace.append(asyncio.current_task())  # the caller's task: no task of its own yet
        value = await gate
        trace.append(asyncio.current_task())
        await asyncio.sleep(0)  # a bare yield to the loop works as in any task
        return value + "!"

    done = Outcomes()
    tasks: set[Any] = set()
    me = asyncio.current_task()
    assert eager.run(work(), done, eager=True, tasks=tasks) is False
    assert trace == [me] and not done.got and len(tasks) == 1
    gate.set_result("hi")
    assert await done.wait() == ("hi!", None)
    assert trace[1] is not None and trace[1] is not me
    await asyncio.sleep(0)
    assert not tasks  # released once finished


@pytest.mark.parametrize("before_waiting", [True, False])
async def test_errors_reach_done(before_waiting: bool) -> None:
    async def work() -> None:
        if not before_waiting:
            await asyncio.sleep(0)
        raise ValueError("boom")

    done = Outcomes()
    assert eager.run(work(), done, eager=True) is before_waiting
    result, exc = await done.wait()
    assert result is None and isinstance(exc, ValueError)


async def test_cancelling_the_task_cancels_the_coroutine() -> None:
    cleaned = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.set()

    done = Outcomes()
    tasks: set[asyncio.Task[None]] = set()
    eager.run(work(), done, eager=True, tasks=tasks)
    (task,) = tasks
    task.cancel()
    _, exc = await done.wait()
    assert isinstance(exc, asyncio.CancelledError) and cleaned.is_set()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_not_eager_starts_nothing_before_returning() -> None:
    steps: list[str] = []

    async def work() -> int:
        steps.append("ran")
        return 1

    done = Outcomes()
    assert eager.run(work(), done, eager=False) is False
    assert steps == []
    assert await done.wait() == (1, None)
