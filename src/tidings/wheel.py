"""Deadlines for many connections from ONE event-loop timer: a timing wheel.

A ``loop.call_later`` per connection costs memory (the handle, its bound method and the event
loop's own timer object) and a heap operation each time it is re-armed, for every idle
connection (bench/RESULTS.md, "Figures behind the code"). A :class:`Wheel` keeps
its members in buckets, one per tick of ``resolution`` seconds, and arms one loop timer for the
earliest non-empty bucket; a member costs a set entry and the one attribute naming its bucket.

Timing: a member scheduled ``delay`` seconds from now is called back at the first tick at or
after its deadline: never early (but for the loop clock's own granularity, ~1 ms), late by
less than ``resolution`` plus whatever else the loop is busy with. :meth:`Wheel.spread`
schedules a first deadline at a point spread over the interval (a low-discrepancy sequence, not
random numbers), so connections accepted in the same second fall in different ticks instead of
being pinged together for the rest of their lives.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger("tidings.wheel")

#: the fractional part of the golden ratio: its successive multiples, modulo 1, fill [0, 1)
#: evenly whatever their number (the gaps between any first N of them are within a small
#: constant factor of 1/N)
_GOLDEN = (math.sqrt(5) - 1) / 2


class Member(Protocol):
    """What a :class:`Wheel` calls back. ``wheel_bucket`` is the wheel's bookkeeping (the
    bucket the member sits in, None when it is not scheduled): initialise it to None and
    leave it alone."""

    wheel_bucket: set[Any] | None

    def on_tick(self) -> None:
        """The deadline passed. Not scheduled any more: schedule again to be called again."""


M = TypeVar("M", bound=Member)


class Wheel(Generic[M]):
    """Calls ``on_tick`` of each member once its deadline passed, from one loop timer."""

    __slots__ = ("_armed", "_buckets", "_loop", "_phase", "_ticks", "_timer", "resolution")

    def __init__(self, resolution: float, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the event loop (default: the one running when first used)."""
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self.resolution = resolution
        self._loop = loop
        self._buckets: dict[int, set[M]] = {}
        self._ticks: list[int] = []  # a heap of the buckets' ticks
        self._timer: asyncio.TimerHandle | None = None
        self._armed = math.inf  # the tick the timer is set for; -inf while ticking
        self._phase = 0.0

    def __len__(self) -> int:
        """Members scheduled."""
        return sum(len(bucket) for bucket in self._buckets.values())

    def _time(self) -> float:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop.time()

    def schedule(self, member: M, delay: float) -> None:
        """Call ``member.on_tick()`` once, ``delay`` seconds from now (see the module's
        docstring for how late); replaces the member's earlier deadline, if any."""
        self.cancel(member)
        tick = math.ceil((self._time() + delay) / self.resolution)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = set()
            heapq.heappush(self._ticks, tick)
            if tick < self._armed:
                self._arm(tick)
        bucket.add(member)
        member.wheel_bucket = bucket

    def spread(self, member: M, interval: float) -> None:
        """Schedule a first deadline somewhere in ``(0, interval]``: successive calls spread
        evenly over the interval (and so over its ticks), at any rate of calls."""
        self._phase = (self._phase + _GOLDEN) % 1.0
        self.schedule(member, interval * (1.0 - self._phase))

    def cancel(self, member: M) -> None:
        """Forget ``member``'s deadline: the wheel keeps no reference to it afterwards."""
        bucket = member.wheel_bucket
        if bucket is not None:
            member.wheel_bucket = None
            bucket.discard(member)

    def _arm(self, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = tick
        assert self._loop is not None
        self._timer = self._loop.call_at(tick * self.resolution, self._tick)

    def _tick(self) -> None:
        # every bucket up to the one the timer was set for is due (the loop may run a timer a
        # clock-resolution early), and any earlier one the loop was too busy to reach in time
        now = max(math.floor(self._time() / self.resolution), int(self._armed))
        self._timer = None
        self._armed = -math.inf  # members scheduled by the callbacks: armed once, below
        try:
            ticks = self._ticks
            while ticks and ticks[0] <= now:
                bucket = self._buckets.pop(heapq.heappop(ticks))
                for member in list(bucket):  # a callback may cancel a member still to come
                    if member.wheel_bucket is not bucket:
                        continue
                    member.wheel_bucket = None
                    try:
                        member.on_tick()
                    except Exception:
                        log.exception("a timer callback failed")
        finally:
            self._armed = math.inf
            if self._ticks:
                self._arm(self._ticks[0])
