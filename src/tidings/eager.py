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
import contextvars
import functools
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")

try:  # what asyncio's own eager tasks (3.12) do: run a step "as" a task that is not running
    from asyncio.tasks import _enter_task, _leave_task

    #: this asyncio lets code run a step in another task's name (:func:`step_as`)
    EAGER = True
except ImportError:  # pragma: no cover - an asyncio without them: writer tasks send themselves
    EAGER = False

#: ``done(result, None)`` or ``done(None, exception)``
Done = Callable[[Any, BaseException | None], None]


@types.coroutine
def resume(
    coro: Coroutine[Any, Any, T], step: Any, error: BaseException | None = None
) -> Generator[Any, Any, T]:
    """Go on with a coroutine that suspended outside any task, in the task awaiting this.

    What ``await coro`` would do had the task started it: the task is handed what ``coro``
    yielded (``step``: the future it waits on), and whatever the task sends or throws back goes
    to ``coro``; ``error``, if given, is thrown into it first."""
    while True:
        if error is not None:
            thrown, error = error, None
            try:
                step = coro.throw(thrown)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        try:
            value = yield step
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation included: it is coro's to handle
            error = exc
            continue
        try:
            step = coro.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def step_as(
    task: asyncio.Task[Any],
    context: contextvars.Context,
    start: Callable[[], Coroutine[Any, Any, Any]],
) -> tuple[Coroutine[Any, Any, Any] | None, Any, BaseException | None] | None:
    """Run the first step of the coroutine ``start()`` makes as if ``task`` were running it,
    in ``context``, from a loop callback (no task is running).

    ``asyncio.current_task()`` is ``task`` meanwhile, so code that needs a current task
    (``asyncio.timeout``) works in that step. Uses asyncio's private ``_enter_task`` and
    ``_leave_task`` (what 3.12's eager tasks use; checked by tests/test_internals.py).

    Returns None if a task is running (``start`` is not called): the caller lets ``task``
    do the work itself. Otherwise ``(coro, step, error)``: ``(None, None, None)`` if the
    coroutine finished in that step, ``(None, None, exc)`` if ``start`` or the step raised
    ``exc``, else ``(coro, step, None)``: it suspended, waiting on ``step``; ``task`` must go on
    with it (:func:`resume`)."""
    loop = task.get_loop()
    try:
        _enter_task(loop, task)
    except RuntimeError:  # called from inside a task
        return None
    try:
        coro = start()
        step = context.run(coro.send, None)
    except StopIteration:
        return None, None, None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        return None, None, exc
    finally:
        _leave_task(loop, task)
    return coro, step, None


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
        awaitable: Any = resume(coro, suspended_on)
    else:
        awaitable = coro
    task = asyncio.get_running_loop().create_task(_await(awaitable))
    task.add_done_callback(functools.partial(_report, done, coro))
    if tasks is not None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return False
