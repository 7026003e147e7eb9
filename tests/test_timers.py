"""call_later / call_at / TimerHandle / loop.time()."""

import asyncio
import contextvars
import os
import math
import time

import sys

import pytest

from conftest import run_for, run_once

cvar = contextvars.ContextVar("timer_cvar", default="default")

# CPython treats a timer as due when ``when <= time() + clock_resolution``,
# so a timer may legitimately be observed up to one clock tick "early".
CLOCK_RESOLUTION = time.get_clock_info("monotonic").resolution


# -- ordering ---------------------------------------------------------------


def test_call_later_runs_callbacks_in_deadline_order(loop):
    order = []
    loop.call_later(0.03, order.append, 3)
    loop.call_later(0.01, order.append, 1)
    loop.call_later(0.02, order.append, 2)
    loop.call_later(0.005, order.append, 0)
    run_for(loop, 0.06)
    assert order == [0, 1, 2, 3]


def test_call_at_runs_callbacks_in_deadline_order(loop):
    order = []
    now = loop.time()
    deadlines = [0.025, 0.005, 0.02, 0.01, 0.015]
    for d in deadlines:
        loop.call_at(now + d, order.append, d)
    loop.call_at(now + 0.05, loop.stop)
    loop.run_forever()
    assert order == sorted(deadlines)


def test_many_timers_run_in_deadline_order(loop):
    import random

    rnd = random.Random(1234)
    order = []
    now = loop.time()
    deadlines = [now + rnd.uniform(0, 0.05) for _ in range(500)]
    for w in deadlines:
        loop.call_at(w, order.append, w)
    loop.call_at(now + 0.1, loop.stop)
    loop.run_forever()
    assert order == sorted(deadlines)


def test_equal_deadline_timers_all_run_in_the_same_iteration(loop):
    # CPython's heap does not keep scheduling order among (>2) timers with
    # identical deadlines, so only the set and the batching are checked:
    # all of them become ready in one iteration, before a callback that the
    # first of them schedules with call_soon.
    order = []
    when = loop.time() + 0.01

    def soon():
        order.append("soon")
        loop.stop()

    def fired(i):
        if not order:
            loop.call_soon(soon)
        order.append(i)

    for i in range(10):
        loop.call_at(when, fired, i)
    safety = loop.call_at(when + 5, loop.stop)
    loop.run_forever()
    safety.cancel()
    assert sorted(order[:10]) == list(range(10))
    assert order[10:] == ["soon"]


def test_two_equal_deadline_timers_run_in_scheduling_order(loop):
    order = []
    when = loop.time() + 0.005
    loop.call_at(when, order.append, "first")
    loop.call_at(when, order.append, "second")
    run_for(loop, 0.02)
    assert order == ["first", "second"]


def test_zero_and_negative_delays_run_in_deadline_order(loop):
    order = []
    loop.call_later(0, order.append, "zero")
    loop.call_later(-1, order.append, "minus-one")
    loop.call_later(-10, order.append, "minus-ten")
    run_for(loop, 0.01)
    assert order == ["minus-ten", "minus-one", "zero"]


def test_expired_timers_run_after_callbacks_already_queued(loop):
    order = []
    loop.call_later(0, order.append, "later0")
    loop.call_later(-1, order.append, "later-1")
    loop.call_soon(order.append, "soon")
    run_for(loop, 0.01)
    assert order == ["soon", "later-1", "later0"]


def test_call_at_in_the_past_runs_on_next_iteration(loop):
    order = []
    loop.call_at(loop.time() - 100, order.append, "past")
    run_once(loop)
    assert order == ["past"]


def test_timer_scheduled_from_timer_runs(loop):
    order = []

    def first():
        order.append("first")
        loop.call_later(0.005, second)

    def second():
        order.append("second")
        loop.stop()

    loop.call_later(0.005, first)
    loop.call_later(5, loop.stop)  # safety net
    loop.run_forever()
    assert order == ["first", "second"]


# -- TimerHandle ------------------------------------------------------------


def test_call_later_returns_timer_handle_with_when(loop):
    t0 = loop.time()
    h = loop.call_later(10, lambda: None)
    t1 = loop.time()
    assert isinstance(h.when(), float)
    assert t0 + 10 <= h.when() <= t1 + 10
    assert h.cancelled() is False
    h.cancel()
    assert h.cancelled() is True


def test_timer_handle_when_equals_the_float_passed_to_call_at(loop):
    when = loop.time() + 12.345678901234
    h = loop.call_at(when, lambda: None)
    assert h.when() == when
    h.cancel()
    past = 0.1
    h2 = loop.call_at(past, lambda: None)
    assert h2.when() == past
    h2.cancel()


def test_timer_handle_repr_names_the_callback(loop):
    def my_timer_callback_name():
        pass

    h = loop.call_later(10, my_timer_callback_name)
    assert "my_timer_callback_name" in repr(h)
    h2 = loop.call_at(loop.time() + 10, my_timer_callback_name)
    assert "my_timer_callback_name" in repr(h2)
    h.cancel()
    h2.cancel()


def test_call_later_passes_positional_args(loop):
    calls = []
    loop.call_later(0, lambda *a: calls.append(a), 1, 2, 3)
    loop.call_at(loop.time(), lambda *a: calls.append(a), "x")
    run_for(loop, 0.01)
    assert calls == [(1, 2, 3), ("x",)]


def test_timers_run_in_given_context(loop):
    ctx = contextvars.Context()
    ctx.run(cvar.set, "timer-ctx")
    seen = []
    loop.call_later(0, lambda: seen.append(("later", cvar.get())), context=ctx)
    loop.call_at(loop.time(), lambda: seen.append(("at", cvar.get())), context=ctx)
    token = cvar.set("scheduler")
    try:
        loop.call_later(0, lambda: seen.append(("copy", cvar.get())))
    finally:
        cvar.reset(token)
    run_for(loop, 0.01)
    assert seen == [("later", "timer-ctx"), ("at", "timer-ctx"), ("copy", "scheduler")]


# -- precision --------------------------------------------------------------


def test_loop_time_uses_the_monotonic_clock(loop):
    for _ in range(100):
        a = time.monotonic()
        t = loop.time()
        b = time.monotonic()
        assert a - 1e-6 <= t <= b + 1e-6
    assert isinstance(loop.time(), float)


def test_loop_time_never_goes_backwards(loop):
    last = loop.time()
    for _ in range(10000):
        now = loop.time()
        assert now >= last
        last = now


def test_timers_never_fire_early(loop):
    fired = []

    def cb(when):
        fired.append((when, loop.time(), time.monotonic()))

    now = loop.time()
    for d in (0.001, 0.003, 0.005, 0.01, 0.02, 0.03):
        loop.call_later(d, cb, now + d)
        w = loop.time() + d
        loop.call_at(w, cb, w)
    run_for(loop, 0.05)
    assert len(fired) == 12
    for when, at_loop, at_mono in fired:
        assert at_loop >= when - CLOCK_RESOLUTION, (when, at_loop)
        assert at_mono >= when - CLOCK_RESOLUTION, (when, at_mono)


def test_call_later_waits_roughly_the_delay(loop):
    t0 = time.monotonic()
    fired = []
    loop.call_later(0.05, lambda: (fired.append(time.monotonic()), loop.stop()))
    loop.call_later(5, loop.stop)  # safety net
    loop.run_forever()
    assert len(fired) == 1
    elapsed = fired[0] - t0
    assert 0.05 - CLOCK_RESOLUTION <= elapsed < 1.0


# -- cancellation -----------------------------------------------------------


def test_cancelled_timers_do_not_run(loop):
    calls = []
    h1 = loop.call_later(0.001, calls.append, "cancelled-later")
    h2 = loop.call_at(loop.time(), calls.append, "cancelled-at")
    loop.call_later(0.002, calls.append, "kept")
    h1.cancel()
    h2.cancel()
    run_for(loop, 0.02)
    assert calls == ["kept"]


def test_timer_can_cancel_another_timer_due_in_the_same_iteration(loop):
    calls = []
    when = loop.time() - 1
    victim = None

    def killer():
        calls.append("killer")
        victim.cancel()

    loop.call_at(when - 1, killer)
    victim = loop.call_at(when, calls.append, "victim")
    run_once(loop)
    assert calls == ["killer"]


def test_cancelling_many_timers_keeps_the_loop_working(loop):
    handles = [loop.call_later(3600 + i, lambda: None) for i in range(10_000)]
    for h in handles:
        h.cancel()
    fired = []
    loop.call_later(0.01, fired.append, "live")
    t0 = time.monotonic()
    run_for(loop, 0.03)
    assert fired == ["live"]
    assert time.monotonic() - t0 < 2.0
    # churn: schedule and cancel repeatedly while running
    kept = []

    def churn(n):
        for _ in range(1000):
            loop.call_later(60, kept.append, "never").cancel()
        if n:
            loop.call_soon(churn, n - 1)

    loop.call_soon(churn, 20)
    run_for(loop, 0.05)
    assert kept == []
    assert all(h.cancelled() for h in handles)


def test_far_future_timers_do_not_keep_run_forever_from_stopping(loop):
    h = loop.call_later(3600, lambda: None)
    t0 = time.monotonic()
    run_once(loop)
    assert time.monotonic() - t0 < 1.0
    h.cancel()


@pytest.mark.parametrize("delay", [math.inf, 1e300, 86400 * 365 * 1000])
def test_huge_or_infinite_delay_is_accepted_and_never_fires(loop, delay):
    calls = []
    h = loop.call_later(delay, calls.append, "huge")
    assert h.when() >= delay or math.isinf(delay)
    run_for(loop, 0.01)
    assert calls == []
    h.cancel()


def test_negative_infinite_deadline_runs_immediately(loop):
    calls = []
    loop.call_at(-math.inf, calls.append, "neg-inf")
    run_once(loop)
    assert calls == ["neg-inf"]


class _Payload:
    pass


def test_fired_timer_releases_its_args(loop):
    import gc
    import weakref

    payload = _Payload()
    ref = weakref.ref(payload)
    loop.call_later(0, lambda p: None, payload)
    del payload
    run_for(loop, 0.01)
    gc.collect()
    assert ref() is None


def test_cancelled_far_future_timer_releases_its_args(loop):
    import gc
    import weakref

    payload = _Payload()
    ref = weakref.ref(payload)
    h = loop.call_later(3600, lambda p: None, payload)
    del payload
    h.cancel()
    run_once(loop)
    gc.collect()
    assert ref() is None


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="CPython 3.13 changed this behaviour; ferroloop follows 3.11 (see README)")
def test_nan_deadline_as_only_timer_does_not_crash_the_loop(loop):
    import threading

    loop.call_later(math.nan, lambda: None)
    t = threading.Timer(0.05, loop.call_soon_threadsafe, (loop.stop,))
    t.start()
    try:
        loop.run_forever()
    finally:
        t.join()
    assert loop.is_running() is False


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="CPython 3.13 changed this behaviour; ferroloop follows 3.11 (see README)")
def test_nan_deadline_timer_runs_like_an_expired_timer(loop):
    # CPython: ``nan >= end_time`` is False, so a NaN deadline counts as due.
    calls = []
    loop.call_later(math.nan, calls.append, "nan")
    run_for(loop, 0.02)
    assert calls == ["nan"]


def test_timer_handle_in_a_reference_cycle_is_collected_after_close(loop):
    import gc
    import weakref

    payload = _Payload()
    ref = weakref.ref(payload)
    # payload -> timer handle -> args -> payload; the loop holds the timer
    payload.handle = loop.call_later(3600, lambda p: None, payload)
    del payload
    run_once(loop)
    loop.close()
    gc.collect()
    assert ref() is None


def test_fired_timer_handle_in_a_reference_cycle_is_garbage_collected(loop):
    import gc
    import weakref

    payload = _Payload()
    ref = weakref.ref(payload)
    payload.handle = loop.call_later(0, lambda p: None, payload)
    del payload
    run_for(loop, 0.01)
    gc.collect()
    assert ref() is None


def test_loop_dropped_unclosed_with_a_timer_cycle_is_collected(loop_impl):
    """A loop that ran, was never closed and is only referenced by a cycle through one of its
    pending timers (and a pending callback) is collected, with asyncio's ResourceWarning, and
    its file descriptors are closed."""
    import gc
    import warnings
    import weakref

    class Owner:
        def tick(self):
            pass

    def make():
        lp = loop_impl.new_event_loop()
        owner = Owner()
        owner.loop = lp

        async def setup():
            owner.timer = lp.call_later(3600, owner.tick)
            lp.call_soon(owner.tick)
            lp.stop()  # leaves the call_soon callback pending

        lp.run_until_complete(setup())
        return weakref.ref(lp)

    fds_before = len(os.listdir("/proc/self/fd"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = make()
        for _ in range(3):
            gc.collect()
    assert ref() is None, "the unclosed loop was not collected"
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    assert len(os.listdir("/proc/self/fd")) <= fds_before


def _assert_unclosed_loop_and_task_are_collected(make):
    """make() drops an unclosed loop with a task and returns weak references to both: both are
    collected (the loop's ResourceWarning is recorded, not raised)."""
    import gc
    import warnings

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        loop_ref, task_ref = make()
        for _ in range(3):
            gc.collect()
    assert loop_ref() is None, "the unclosed loop was not collected"
    assert task_ref() is None


def test_loop_dropped_unclosed_with_a_pending_task_step_is_collected(loop_impl):
    """The same with a task whose first step is still queued when the loop is dropped (a C Task
    step, which ferroloop queues without a Handle)."""
    import weakref

    async def forever():
        await asyncio.sleep(3600)

    def make():
        lp = loop_impl.new_event_loop()
        task = lp.create_task(forever())
        task.loop_ref = lp  # the task is reachable only from the loop's queue
        return weakref.ref(lp), weakref.ref(task)

    _assert_unclosed_loop_and_task_are_collected(make)


def test_loop_stopped_with_a_queued_task_step_then_dropped_unclosed_is_collected(loop_impl):
    """A task step queued while the loop ran (ferroloop hides it from the collector while it
    waits) is shown to the collector again when run_forever returns: the unclosed loop, only
    reachable through that step, is collected."""
    import weakref

    async def forever():
        while True:
            await asyncio.sleep(0)

    def make():
        lp = loop_impl.new_event_loop()
        task = lp.create_task(forever())
        task.loop_ref = lp
        lp.call_soon(lp.call_soon, lp.stop)  # a few steps run, then one stays queued
        lp.run_forever()
        assert not task.done()
        return weakref.ref(lp), weakref.ref(task)

    _assert_unclosed_loop_and_task_are_collected(make)


def test_task_step_callback_kept_elsewhere_is_tracked_after_it_ran(loop):
    """A C Task wake-up callback that something else still references after the loop ran it
    is visible to the garbage collector again (ferroloop hides queued task steps from it)."""
    import gc

    kept = []

    async def waiter(fut):
        await fut

    async def main():
        fut = loop.create_future()
        task = loop.create_task(waiter(fut))
        await asyncio.sleep(0)
        kept.extend(cb for cb, _ctx in fut._callbacks)
        fut.set_result(None)
        await task

    loop.run_until_complete(main())
    assert kept
    assert all(gc.is_tracked(cb) for cb in kept)


def test_subclass_time_drives_call_later_and_the_run_loop(loop_impl):
    # asyncio's call_later and run loop read the clock through self.time(): a subclass with a
    # virtual clock that jumps ahead makes a one-hour timer fire at once, and timers are
    # scheduled on its clock.
    class Virtual(loop_impl.loop_class):
        offset = 1000.0

        def time(self):
            return super().time() + self.offset

    lp = Virtual()
    try:
        fired = []
        h = lp.call_later(3600, fired.append, "late")
        assert h.when() > lp.offset + 3500
        lp.call_later(0.01, fired.append, "soon")
        lp.call_later(0.05, lp.stop)
        lp.offset += 7200  # the virtual clock passes the hour
        lp.run_forever()
        # All three are due in the same iteration, run in deadline order.
        assert fired == ["soon", "late"], fired
    finally:
        lp.close()
