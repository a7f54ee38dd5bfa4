"""Run a coroutine at once, in the caller's frame, and give it a task only if it must wait.

Python 3.12 has eager tasks; 3.11 (which tidings supports) does not. A publish to the memory
broker never suspends, so answering an HTTP publish through a task (create it, schedule it, step
it one loop iteration later) is pure overhead: :func:`run` steps the coroutine right away and,
when it finishes without suspending, hands the result over synchronously. If it does suspend,
the same coroutine carries on inside a task, from where it stopped.

Only for code that is safe to step outside a task: until its first suspension
``asyncio.current_task()`` is not its own, so ``asyncio.timeout()`` and the like fail there.
Callers decide (tidings steps eagerly only on a broker that says it never suspends).
"""

from __future__ import annotations

import asyncio
import functools
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")

#: ``done(result, None)`` or ``done(None, exception)``
Done = Callable[[Any, BaseException | None], None]


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], suspended_on: Any) -> Generator[Any, Any, T]:
    """Go on with ``coro`` inside the task that awaits this, from its first suspension: hand
    the task what ``coro`` yielded, and feed ``coro`` what the task sends or throws back."""
    yielded = suspended_on
    while True:
        try:
            value = yield yielded
        except BaseException as exc:  # thrown in by the task (its cancellation, mostly)
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                yielded = coro.send(value)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _report(done: Done, coro: Coroutine[Any, Any, Any], task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        coro.close()  # cancelled before the task ran: let the coroutine clean up now
        done(None, asyncio.CancelledError())
    elif (exc := task.exception()) is not None:
        done(None, exc)
    else:
        done(task.result(), None)


def run(
    coro: Coroutine[Any, Any, Any], done: Done, *, eager: bool, tasks: set[Any] | None = None
) -> bool:
    """Run ``coro``; ``done`` gets its outcome. True if that happened before returning.

    ``eager=False`` starts it in a task as usual. ``tasks`` keeps a reference to the task while
    it runs (the loop holds only weak ones)."""
    if eager:
        try:
            suspended_on = coro.send(None)
        except StopIteration as stop:
            done(stop.value, None)
            return True
        except Exception as exc:
            done(None, exc)
            return True
        awaitable: Any = _resume(coro, suspended_on)
    else:
        awaitable = coro
    task = asyncio.get_running_loop().create_task(_await(awaitable))
    task.add_done_callback(functools.partial(_report, done, coro))
    if tasks is not None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return False
