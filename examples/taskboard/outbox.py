"""The outbox relay: publishes what committed transactions left in the outbox table.

A request handler commits the change and the publications it causes together (store.py), then
:meth:`Relay.kick` wakes the relay, which publishes the oldest rows in order and deletes those
that went out. A publish that fails (the broker is unreachable, say) stays in the table and is
retried, oldest first, with a backoff doubling from 50 ms up to ``max_backoff`` seconds, until it
succeeds: a change that committed is never lost because the broker blinked. Rows left by a crash
or a restart are published when the next relay starts, and a relay also looks at the table every
``poll`` seconds, for rows that another process wrote.

Several processes may share the database (several workers, several nodes): each relay claims a
batch of rows for ``lease`` seconds before publishing them, so the others leave them alone.
Delivery is still *at least once*: a process can die between publishing and deleting a row, and
then its lease runs out and another relay publishes the row again. Every publication therefore
carries what a client needs to drop a repeat: the task's ``id`` and ``version`` in ``tasks``, and
the outbox row's ``event`` id everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .store import Store

log = logging.getLogger("taskboard.outbox")

Publish = Callable[[str, Any], Awaitable[object]]


class Relay:
    """Moves outbox rows into tidings. ``publish(channel, data)``: ``hub.publish`` usually.

    ``poll``, ``max_backoff``: seconds; ``lease``: seconds a batch of rows is reserved for this
    relay while it publishes them (another relay takes them over after that)."""

    FIRST_BACKOFF = 0.05

    def __init__(
        self,
        store: Store,
        publish: Publish,
        *,
        poll: float = 2.0,
        max_backoff: float = 5.0,
        lease: float = 30.0,
    ) -> None:
        self.store = store
        self.publish = publish
        self.poll = poll
        self.max_backoff = max_backoff
        self.lease = lease
        self.published = 0  # publications that went out
        self.failures = 0  # publish attempts that raised
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()  # set while the last look found the outbox empty
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        """Something was committed: look at the outbox now."""
        self._empty.clear()
        self._wake.set()

    async def settled(self) -> None:
        """Wait until this relay has found nothing left to publish (rows that another relay
        has claimed count as taken)."""
        self.kick()
        await self._empty.wait()

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="taskboard-outbox")

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop relaying; what is still in the outbox waits there for the next start.

        The publish under way may finish (up to ``timeout`` seconds), so the rows this relay
        claimed are given back rather than left to their lease."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            self._wake.clear()
            try:
                drained = await self.drain()
            except Exception:
                # the database itself failed: keep trying, as for a broker failure
                log.exception("reading the outbox failed")
                drained = False
            if drained:
                backoff = 0.0
                if not self._wake.is_set():  # else a commit came after the last look
                    self._empty.set()
                # until the next commit here, or the next look for other processes' rows
                await _until(self.poll, self._wake, self._stop)
            else:
                # a kick is no reason to hammer a failing broker: only stopping cuts this short
                backoff = min(self.max_backoff, max(self.FIRST_BACKOFF, backoff * 2))
                await _until(backoff, self._stop)

    async def drain(self) -> bool:
        """Publish claimable rows in order until there are none (True) or a publish fails
        (False: the failing row and the rest of its batch go back unpublished, to be retried
        in order)."""
        while True:
            rows = await self.store.claim(self.lease)
            if not rows:
                return True
            done: list[int] = []
            failed: tuple[int, str] | None = None
            try:
                for entry, channel, data in rows:
                    if self._stop.is_set():
                        break
                    try:
                        await self.publish(channel, {**data, "event": entry})
                    except Exception as exc:
                        failed = (entry, repr(exc))
                        break
                    done.append(entry)
                    self.published += 1
            finally:
                # also when stopped halfway: what did not go out is given back at once
                await self.store.published(done)
                rest = [row[0] for row in rows[len(done) :]]
                if rest:
                    bad, error = failed if failed is not None else (None, "")
                    await self.store.unclaim(rest, failed=bad, error=error)
            if failed is not None:
                self.failures += 1
                log.warning(
                    "publishing outbox entry %d failed (will retry): %s", failed[0], failed[1]
                )
                return False
            if self._stop.is_set():
                return False


async def _until(timeout: float, *events: asyncio.Event) -> None:
    """Wait ``timeout`` seconds, or less if one of ``events`` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
