"""The timing wheel that drives every ping and deadline, on a loop whose clock the test sets.

Deterministic: no sleeps; the fake loop's time only moves when the test moves it."""

from __future__ import annotations

import gc
import math
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tidings.wheel import Wheel


class Handle:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The two things a Wheel asks of its loop: the time, and one timer at a time."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.timers: list[Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        handle = Handle(when, callback)
        self.timers.append(handle)
        return handle

    def pending(self) -> list[Handle]:
        return [h for h in self.timers if not h.cancelled and h.callback is not None]

    def run_until(self, end: float) -> None:
        """Move the clock to ``end``, running each timer at its time, as a loop would."""
        while True:
            due = [h for h in self.pending() if h.when <= end]
            if not due:
                break
            handle = min(due, key=lambda h: h.when)
            self.now = max(self.now, handle.when)
            callback, handle.callback = handle.callback, None  # type: ignore[assignment]
            callback()
        self.now = end


class Member:
    def __init__(self, log: list[tuple[Member, float]], loop: FakeLoop) -> None:
        self.wheel_bucket: set[Any] | None = None
        self.log, self.loop = log, loop
        self.then: Callable[[Member], None] | None = None

    def on_tick(self) -> None:
        self.log.append((self, self.loop.now))
        if self.then is not None:
            self.then(self)


def wheel_on(loop: FakeLoop, resolution: float) -> Wheel[Member]:
    return Wheel(resolution, loop)  # type: ignore[arg-type]


def test_a_deadline_is_never_early_and_late_by_less_than_the_resolution() -> None:
    loop, log = FakeLoop(1000.3), []
    wheel = wheel_on(loop, 0.5)
    delays = [0.1, 0.5, 0.7, 2.0, 2.01, 9.99]
    members = [Member(log, loop) for _ in delays]
    for member, delay in zip(members, delays, strict=True):
        wheel.schedule(member, delay)
    assert len(wheel) == len(members)
    loop.run_until(1100.0)
    when = {m: t for m, t in log}
    assert len(log) == len(members)  # each once: a member is not scheduled again by itself
    for member, delay in zip(members, delays, strict=True):
        due = 1000.3 + delay
        assert due <= when[member] < due + 0.5
    assert len(wheel) == 0 and not loop.pending()  # no timer left behind


def test_one_timer_at_a_time_for_the_earliest_deadline() -> None:
    loop = FakeLoop(0.0)
    wheel = wheel_on(loop, 1.0)
    late, early = Member([], loop), Member([], loop)
    wheel.schedule(late, 30.0)
    wheel.schedule(early, 5.0)
    assert [h.when for h in loop.pending()] == [5.0]
    loop.run_until(5.0)
    assert [h.when for h in loop.pending()] == [30.0]


def test_rescheduling_replaces_the_deadline_and_cancel_releases_the_member() -> None:
    loop, log = FakeLoop(0.0), []
    wheel = wheel_on(loop, 1.0)
    kept, gone = Member(log, loop), Member(log, loop)
    wheel.schedule(kept, 3.0)
    wheel.schedule(kept, 10.0)  # as a pong re-arms the next ping
    wheel.schedule(gone, 3.0)
    wheel.cancel(gone)
    assert len(wheel) == 1 and gone.wheel_bucket is None
    ref = weakref.ref(gone)
    del gone
    gc.collect()
    assert ref() is None  # the wheel keeps no reference to a cancelled member
    loop.run_until(100.0)
    assert log == [(kept, 10.0)]


def test_a_callback_may_cancel_or_reschedule_members_of_the_same_tick() -> None:
    loop, log = FakeLoop(0.0), []
    wheel = wheel_on(loop, 1.0)
    first, second, again = Member(log, loop), Member(log, loop), Member(log, loop)
    for member in (first, second, again):
        wheel.schedule(member, 2.0)

    def cancel_the_other(member: Member) -> None:
        wheel.cancel(second if member is first else first)

    def broken(member: Member) -> None:
        raise RuntimeError("a failing callback does not stop the others")

    first.then = second.then = cancel_the_other
    again.then = lambda m: wheel.schedule(m, 3.0) if len(log) < 4 else broken(m)
    loop.run_until(20.0)
    ticked = [m for m, _ in log]
    assert ticked.count(again) == 3  # at 2, 5 and 8
    assert (first in ticked) != (second in ticked)  # whichever came first cancelled the other
    assert len(wheel) == 0


@pytest.mark.parametrize(("n", "interval", "resolution"), [(20_000, 25.0, 1.0), (997, 0.2, 0.05)])
def test_spread_scatters_connections_accepted_together_over_the_interval(
    n: int, interval: float, resolution: float
) -> None:
    """20,000 connections accepted in the same instant: their first pings come spread evenly
    over the ticks of one interval, not all in one tick (deterministic: no random numbers)."""
    loop, log = FakeLoop(5000.0), []
    wheel = wheel_on(loop, resolution)
    for _ in range(n):
        wheel.spread(Member(log, loop), interval)
    loop.run_until(5000.0 + interval + resolution)
    assert len(log) == n
    assert all(5000.0 < t <= 5000.0 + interval + resolution for _, t in log)
    per_tick = Counter(t for _, t in log)
    ticks = math.ceil(interval / resolution)
    assert len(per_tick) >= ticks  # every tick of the interval gets its share
    assert max(per_tick.values()) <= 1.1 * n / ticks + 2  # and none much more than that


def test_spread_keeps_its_evenness_for_any_number_of_connections() -> None:
    loop = FakeLoop(0.0)
    wheel = wheel_on(loop, 1.0)
    members = []
    for count in range(1, 200):
        member = Member([], loop)
        wheel.spread(member, 100.0)
        members.append(member)
        # the largest bucket among the first `count` members: never more than a few times
        # the even share, which a run of equal (or random) offsets would not guarantee
        largest = max(Counter(id(m.wheel_bucket) for m in members).values())
        assert largest <= 3 + count // 50
