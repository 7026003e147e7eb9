"""call_soon / call_soon_threadsafe / Handle / stop() / callback errors."""

import asyncio
import contextlib
import contextvars
import socket
import sys
import threading
import time

import pytest

from conftest import run_for, run_once, run_python_c

cvar = contextvars.ContextVar("cvar", default="default")


# -- ordering ---------------------------------------------------------------


def test_call_soon_runs_callbacks_in_fifo_order(loop):
    order = []
    for i in range(100):
        loop.call_soon(order.append, i)
    run_once(loop)
    assert order == list(range(100))


def test_call_soon_passes_positional_args(loop):
    calls = []
    loop.call_soon(lambda *args: calls.append(args), 1, "two", None)
    loop.call_soon(lambda: calls.append(()))
    run_once(loop)
    assert calls == [(1, "two", None), ()]


def test_call_soon_rejects_keyword_arguments_for_the_callback(loop):
    with pytest.raises(TypeError):
        loop.call_soon(print, sep="-")


def test_callbacks_scheduled_by_callbacks_run_after_already_queued_ones(loop):
    order = []

    def a():
        order.append("a")
        loop.call_soon(order.append, "a2")

    def b():
        order.append("b")
        loop.call_soon(order.append, "b2")

    loop.call_soon(a)
    loop.call_soon(b)
    run_for(loop, 0.01)
    assert order == ["a", "b", "a2", "b2"]


def test_callback_scheduled_by_callback_runs_after_io_and_timers_of_same_iteration(loop):
    # CPython runs only the callbacks that were ready when the iteration
    # started (``ntodo``).  A callback scheduled by a running callback waits
    # for the next iteration, after the I/O poll, so I/O callbacks and due
    # timers found by that poll run before it.
    a, b = socket.socketpair()
    with a, b:
        order = []
        spins = 0

        def spin():
            nonlocal spins
            spins += 1
            order.append(f"S{spins}")
            if spins < 4:
                loop.call_soon(spin)
            else:
                loop.stop()

        def on_readable():
            order.append("R")
            loop.remove_reader(a)

        b.send(b"x")
        loop.add_reader(a, on_readable)
        loop.call_soon(spin)
        loop.call_later(0, order.append, "T")
        loop.run_forever()
        assert order.index("R") < order.index("S2")
        assert order.index("T") < order.index("S2")
        assert order == ["S1", "R", "T", "S2", "S3", "S4"]


def test_io_callbacks_run_before_timers_due_in_the_same_iteration(loop):
    a, b = socket.socketpair()
    with a, b:
        order = []

        def on_readable():
            order.append("io")
            loop.remove_reader(a)

        b.send(b"x")
        loop.call_later(-1, order.append, "timer")
        loop.add_reader(a, on_readable)
        run_once(loop)
        assert order == ["io", "timer"]


def test_self_rescheduling_callback_does_not_starve_timers_or_io(loop):
    a, b = socket.socketpair()
    with a, b:
        seen = set()
        starved = []
        deadline = time.monotonic() + 5

        def spin():
            if time.monotonic() > deadline:  # safety net: everything starves
                starved.append(True)
                loop.stop()
                return
            loop.call_soon(spin)

        def on_readable():
            seen.add("io")
            loop.remove_reader(a)

        def on_timer():
            seen.add("timer")
            loop.stop()

        loop.call_soon(spin)
        loop.add_reader(a, on_readable)
        b.send(b"x")
        loop.call_later(0.02, on_timer)
        loop.run_forever()
        assert seen == {"io", "timer"}
        assert starved == []


# -- contexts ---------------------------------------------------------------


def test_call_soon_runs_callback_in_given_context(loop):
    ctx = contextvars.Context()
    ctx.run(cvar.set, "in-ctx")
    seen = []

    def cb():
        seen.append(cvar.get())
        cvar.set("changed-by-callback")

    loop.call_soon(cb, context=ctx)
    run_once(loop)
    assert seen == ["in-ctx"]
    # the callback ran inside ``ctx`` itself, so its change is visible there
    assert ctx[cvar] == "changed-by-callback"
    assert cvar.get() == "default"


def test_call_soon_without_context_uses_copy_of_current_context(loop):
    seen = []

    def cb():
        seen.append(cvar.get())
        cvar.set("changed-by-callback")

    token = cvar.set("at-schedule-time")
    try:
        loop.call_soon(cb)
        cvar.set("after-schedule")
        run_once(loop)
        assert cvar.get() == "after-schedule"
    finally:
        cvar.reset(token)
    assert seen == ["at-schedule-time"]


def test_each_call_soon_gets_its_own_context_copy(loop):
    seen = []

    def writer():
        cvar.set("written")

    def reader():
        seen.append(cvar.get())

    loop.call_soon(writer)
    loop.call_soon(reader)
    run_once(loop)
    assert seen == ["default"]


def _in_empty_context(fn, *args):
    """Calls fn(*args) in a new, empty context (the case where ferroloop makes no copy)."""
    return contextvars.Context().run(fn, *args)


def test_callbacks_scheduled_from_an_empty_context_do_not_share_variables(loop):
    seen = []
    other = contextvars.ContextVar("other", default=0)

    def writer(tag):
        seen.append((tag, cvar.get(), other.get()))
        cvar.set("written-by-" + tag)
        other.set(other.get() + 1)

    def schedule():
        loop.call_soon(writer, "a")
        loop.call_soon(writer, "b")
        loop.call_later(0, writer, "timer")
        loop.call_soon_threadsafe(writer, "threadsafe")
        loop.call_soon(writer, "c")

    _in_empty_context(schedule)
    run_for(loop, 0.02)
    assert sorted(seen) == sorted(
        [("a", "default", 0), ("b", "default", 0), ("timer", "default", 0),
         ("threadsafe", "default", 0), ("c", "default", 0)]
    )
    assert cvar.get() == "default"


def test_set_and_reset_in_a_callback_from_an_empty_context(loop):
    seen = []

    def set_and_reset():
        token = cvar.set("temporary")
        cvar.reset(token)

    def set_only():
        cvar.set("kept")

    def reader():
        seen.append(cvar.get())

    _in_empty_context(lambda: [loop.call_soon(f) for f in (set_and_reset, reader, set_only, reader)])
    run_once(loop)
    assert seen == ["default", "default"]


def test_handle_context_from_an_empty_context(loop):
    """The handle's context (asked for before, during and after the run) is the one its
    callback runs in, and keeps what the callback set."""
    ran_in = []
    handles = {}

    def cb(tag):
        cvar.set("set-by-" + tag)
        if tag == "during":
            ran_in.append(handles[tag]._context)

    def schedule():
        for tag in ("before", "during", "after"):
            handles[tag] = loop.call_soon(cb, tag)

    _in_empty_context(schedule)
    before = handles["before"]._context
    assert isinstance(before, contextvars.Context) and len(before) == 0
    before.run(cvar.set, "set-before-run")
    run_once(loop)
    assert handles["before"]._context is before
    assert before[cvar] == "set-by-before"
    assert ran_in == [handles["during"]._context]
    assert ran_in[0][cvar] == "set-by-during"
    assert handles["after"]._context[cvar] == "set-by-after"


def test_handle_run_again_keeps_its_context(loop):
    """A handle run again by hand sees what its first run set, as in asyncio (debug mode: only
    there does ferroloop keep a one-shot handle's callback after it ran)."""
    loop.set_debug(True)
    seen = []

    def cb():
        seen.append(cvar.get())
        cvar.set("set-by-run-%d" % len(seen))

    h = _in_empty_context(loop.call_soon, cb)
    run_once(loop)
    h._run()
    assert seen == ["default", "set-by-run-1"]
    assert h._context[cvar] == "set-by-run-2"


def test_nested_handle_run_from_an_empty_context(loop):
    """A callback that runs a queued handle by hand: each runs in its own context (debug mode,
    so that the queued handle can run a second time, as in asyncio)."""
    loop.set_debug(True)
    seen = []
    handles = []

    def inner_cb():
        seen.append(("inner", cvar.get()))
        cvar.set("inner")

    def outer_cb():
        cvar.set("outer")
        handles[0]._run()
        seen.append(("outer", cvar.get()))

    def schedule():
        loop.call_soon(outer_cb)
        handles.append(loop.call_soon(inner_cb))

    _in_empty_context(schedule)
    run_once(loop)
    assert seen == [("inner", "default"), ("outer", "outer"), ("inner", "inner")]


def test_handle_run_from_its_own_callback_cannot_reenter_its_context(loop, caplog):
    """A handle run by hand from inside its own callback: its context is already entered, so
    the inner run fails (reported to the exception handler) as in asyncio (debug mode, where
    ferroloop keeps a one-shot handle's callback)."""
    loop.set_debug(True)
    errors = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx.get("exception")))
    seen = []
    handles = []

    def cb():
        seen.append(cvar.get())
        cvar.set("outer")
        if len(seen) == 1:
            handles[0]._run()
        seen.append(cvar.get())

    handles.append(_in_empty_context(loop.call_soon, cb))
    run_once(loop)
    assert seen == ["default", "outer"]
    if sys.version_info >= (3, 12):
        # 3.12+ runs the exception handler in the handle's context too, which is still
        # entered: the handler cannot run, and asyncio logs that instead.
        assert errors == []
        assert "Unhandled error in exception handler" in caplog.text
        assert "cannot enter context" in caplog.text
    else:
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert handles[0]._context[cvar] == "outer"


def test_reader_callback_keeps_its_context_across_events(loop):
    """A watcher's context persists across its runs (it is one handle), as in asyncio."""
    a, b = socket.socketpair()
    seen = []
    try:
        def on_readable():
            a.recv(1)
            seen.append(cvar.get())
            cvar.set("set-by-run-%d" % len(seen))
            if len(seen) < 3:
                b.send(b"x")
            else:
                loop.stop()

        _in_empty_context(loop.add_reader, a.fileno(), on_readable)
        b.send(b"x")
        loop.run_forever()
        loop.remove_reader(a.fileno())
    finally:
        a.close()
        b.close()
    assert seen == ["default", "set-by-run-1", "set-by-run-2"]


def test_call_soon_threadsafe_runs_callback_in_given_context(loop):
    ctx = contextvars.Context()
    ctx.run(cvar.set, "threadsafe-ctx")
    seen = []
    loop.call_soon_threadsafe(lambda: seen.append(cvar.get()), context=ctx)
    run_once(loop)
    assert seen == ["threadsafe-ctx"]


# -- handles ----------------------------------------------------------------


def test_call_soon_returns_handle_that_is_not_cancelled(loop):
    h = loop.call_soon(lambda: None)
    assert h.cancelled() is False
    run_once(loop)
    assert h.cancelled() is False


def test_cancelled_handle_does_not_run(loop):
    calls = []
    h = loop.call_soon(calls.append, "cancelled")
    loop.call_soon(calls.append, "kept")
    h.cancel()
    assert h.cancelled() is True
    run_once(loop)
    assert calls == ["kept"]


def test_handle_cancel_is_idempotent(loop):
    h = loop.call_soon(lambda: None)
    h.cancel()
    h.cancel()
    assert h.cancelled() is True
    run_once(loop)


def test_callback_can_cancel_a_later_callback_of_the_same_iteration(loop):
    calls = []
    later = None

    def first():
        calls.append("first")
        later.cancel()

    loop.call_soon(first)
    later = loop.call_soon(calls.append, "later")
    run_once(loop)
    assert calls == ["first"]


def test_cancel_after_run_is_harmless(loop):
    calls = []
    h = loop.call_soon(calls.append, 1)
    run_once(loop)
    h.cancel()
    assert h.cancelled() is True
    run_once(loop)
    assert calls == [1]


def test_handle_repr_names_the_callback(loop):
    def my_distinctive_callback():
        pass

    h = loop.call_soon(my_distinctive_callback)
    assert "my_distinctive_callback" in repr(h)
    h.cancel()
    assert "my_distinctive_callback" in repr(h) or "cancelled" in repr(h)
    run_once(loop)


def test_threadsafe_handle_repr_names_the_callback(loop):
    def another_distinctive_callback():
        pass

    h = loop.call_soon_threadsafe(another_distinctive_callback)
    assert "another_distinctive_callback" in repr(h)
    run_once(loop)


# -- call_soon_threadsafe ---------------------------------------------------


def test_call_soon_threadsafe_from_thread_wakes_sleeping_loop_promptly(loop):
    ran = []
    started = threading.Event()

    def worker():
        started.wait(5)
        time.sleep(0.05)
        loop.call_soon_threadsafe(ran.append, time.monotonic())
        loop.call_soon_threadsafe(loop.stop)

    # Safety net so a broken wakeup fails instead of hanging; the loop
    # itself has nothing to do but sleep until then.
    safety = loop.call_later(10, loop.stop)
    loop.call_soon(started.set)
    t = threading.Thread(target=worker)
    t.start()
    try:
        t0 = time.monotonic()
        loop.run_forever()
        elapsed = time.monotonic() - t0
    finally:
        t.join()
    safety.cancel()
    assert len(ran) == 1
    assert elapsed < 1.0, f"loop woke up only after {elapsed:.3f}s"


def test_write_to_self_from_a_thread_wakes_the_sleeping_loop(loop):
    # A known recipe (e.g. https://stackoverflow.com/a/43275001): a thread feeds an
    # asyncio.Queue with put_nowait() and wakes the loop with its private _write_to_self().
    # Not thread-safe by asyncio's rules, but it works on asyncio's loops outside debug mode.
    # The queue is made inside the running loop: before 3.10 a Queue binds to a loop when made.

    def worker(queue):
        time.sleep(0.05)
        queue.put_nowait("item")
        loop._write_to_self()

    async def main():
        queue = asyncio.Queue()
        t = threading.Thread(target=worker, args=(queue,))
        t.start()
        try:
            t0 = time.monotonic()
            item = await asyncio.wait_for(queue.get(), 10)
            return item, time.monotonic() - t0
        finally:
            t.join()

    item, elapsed = loop.run_until_complete(main())
    assert item == "item"
    assert elapsed < 1.0, f"loop woke up only after {elapsed:.3f}s"
    # Waking a loop that is not sleeping (or not running) is harmless.
    loop._write_to_self()
    run_once(loop)


def test_call_soon_threadsafe_from_a_thread_honours_its_context_after_handles_were_reused(loop):
    # Spent handles are reused for later calls (ferroloop); each call still takes the caller's
    # context of the moment: empty, then with a variable set, then an explicit one.
    seen = []

    def cb(tag):
        seen.append((tag, cvar.get()))
        cvar.set("set-by-callback")

    for i in range(20):
        loop.call_soon(cb, "warm")
    run_once(loop)
    given = contextvars.Context()
    given.run(cvar.set, "given")

    def worker():
        loop.call_soon_threadsafe(cb, "empty")
        cvar.set("thread")
        loop.call_soon_threadsafe(cb, "thread")
        loop.call_soon_threadsafe(cb, "given", context=given)
        loop.call_soon_threadsafe(cb, "empty-again", context=contextvars.Context())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    run_once(loop)
    assert seen[20:] == [
        ("empty", "default"),
        ("thread", "thread"),
        ("given", "given"),
        ("empty-again", "default"),
    ]
    assert given[cvar] == "set-by-callback"
    # Copies made for the calls without context= are the callbacks' own.
    assert cvar.get() == "default"


def test_call_soon_threadsafe_checks_callback_and_closed_loop_after_handles_were_reused(loop):
    ran = []

    def plain(i):
        ran.append(i)

    async def coro_fn():
        pass

    for i in range(5):
        loop.call_soon_threadsafe(plain, i)
    run_once(loop)
    h = loop.call_soon_threadsafe(plain, 5)
    assert not h.cancelled()
    h.cancel()
    assert h.cancelled()
    loop.set_debug(True)  # asyncio checks callbacks in debug mode
    for method in (loop.call_soon, loop.call_soon_threadsafe):
        with pytest.raises(TypeError):
            method(coro_fn)
        with pytest.raises(TypeError):
            method(42)
    loop.set_debug(False)
    run_once(loop)
    assert ran == [0, 1, 2, 3, 4]
    loop.close()
    with pytest.raises(RuntimeError):
        loop.call_soon_threadsafe(plain, 6)
    with pytest.raises(RuntimeError):
        loop.call_soon(plain, 6)


def _from_thread(fn, *args):
    """Runs fn(*args) in a new thread, in an empty context (ferroloop's plain
    call_soon_threadsafe path: the callback is queued, its handle is not), and returns its
    result."""
    out = []

    def run():
        try:
            out.append((True, contextvars.Context().run(fn, *args)))
        except BaseException as e:  # re-raised in the calling thread
            out.append((False, e))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


def test_threadsafe_handles_from_a_thread_cancel_only_their_own_callback(loop):
    calls = []

    def produce():
        kept = [loop.call_soon_threadsafe(calls.append, i) for i in range(6)]
        # Handles dropped at once (reused by ferroloop) between the kept ones.
        for i in range(6, 12):
            loop.call_soon_threadsafe(calls.append, i)
        kept[1].cancel()
        kept[4].cancel()
        return kept

    kept = _from_thread(produce)
    assert [h.cancelled() for h in kept] == [False, True, False, False, True, False]
    assert len({id(h) for h in kept}) == 6
    run_once(loop)
    assert calls == [0, 2, 3, 5, 6, 7, 8, 9, 10, 11]
    # Cancelling after the run changes nothing for later callbacks.
    kept[0].cancel()
    assert kept[0].cancelled()
    _from_thread(lambda: [loop.call_soon_threadsafe(calls.append, i) for i in (12, 13)])
    run_once(loop)
    assert calls[-2:] == [12, 13]


def test_threadsafe_handle_from_a_thread_cancelled_then_dropped_does_not_run(loop):
    calls = []

    def produce():
        loop.call_soon_threadsafe(calls.append, "a")
        loop.call_soon_threadsafe(calls.append, "b").cancel()
        loop.call_soon_threadsafe(calls.append, "c")

    _from_thread(produce)
    run_once(loop)
    assert calls == ["a", "c"]


def _context_of(h):
    """Handle.get_context() (3.12+), or the attribute it reads before."""
    return h.get_context() if hasattr(h, "get_context") else h._context


def test_threadsafe_handle_from_a_thread_gives_its_context_to_the_callback(loop):
    seen = []

    def cb(tag):
        seen.append((tag, cvar.get()))
        cvar.set("set-by-" + tag)

    def produce():
        loop.call_soon_threadsafe(cb, "warm")  # the same function twice: the plain path
        loop.call_soon_threadsafe(cb, "first")
        h = loop.call_soon_threadsafe(cb, "asked")
        ctx = _context_of(h)
        ctx.run(cvar.set, "set-before-the-run")
        loop.call_soon_threadsafe(cb, "last")
        return h, ctx

    h, ctx = _from_thread(produce)
    run_once(loop)
    assert seen == [
        ("warm", "default"),
        ("first", "default"),
        ("asked", "set-before-the-run"),
        ("last", "default"),
    ]
    assert _context_of(h) is ctx
    assert ctx[cvar] == "set-by-asked"
    assert cvar.get() == "default"


def test_threadsafe_callback_from_a_thread_that_raises_goes_to_the_handler(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    calls = []

    def boom(i):
        calls.append(i)
        if i == 1:
            raise ValueError("boom")

    _from_thread(lambda: [loop.call_soon_threadsafe(boom, i) for i in range(3)])
    run_once(loop)
    assert calls == [0, 1, 2]
    assert len(contexts) == 1
    ctx = contexts[0]
    assert isinstance(ctx["exception"], ValueError)
    assert ctx["message"].startswith("Exception in callback")
    assert "boom" in ctx["message"]
    handle = ctx["handle"]
    assert handle._callback is boom
    assert handle._args == (1,)
    assert "boom" in repr(handle)
    # A handle the caller kept is the one reported.
    h = _from_thread(loop.call_soon_threadsafe, boom, 1)
    run_once(loop)
    assert len(contexts) == 2
    assert contexts[1]["handle"] is h


def test_threadsafe_handle_from_a_thread_names_its_callback_until_it_runs(loop):
    def distinctive_threadsafe_callback(x):
        pass

    def produce():
        loop.call_soon_threadsafe(distinctive_threadsafe_callback, 0)
        return loop.call_soon_threadsafe(distinctive_threadsafe_callback, 1)

    h = _from_thread(produce)
    assert "distinctive_threadsafe_callback" in repr(h)
    assert h._callback is distinctive_threadsafe_callback
    assert h._args == (1,)
    run_once(loop)
    assert not h.cancelled()


def test_threadsafe_callback_from_a_thread_lets_go_of_its_arguments_once_run(loop):
    import gc
    import weakref

    class Arg:
        pass

    ran = []
    refs = []

    def produce():
        for _ in range(3):
            a = Arg()
            refs.append(weakref.ref(a))
            loop.call_soon_threadsafe(ran.append, a)
            del a

    _from_thread(produce)
    run_once(loop)
    assert len(ran) == 3
    ran.clear()
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_threadsafe_handle_kept_past_its_run_lets_go_of_its_arguments_once_dropped(loop):
    import weakref

    class Arg:
        pass

    ran = []

    def produce():
        a = Arg()
        ref = weakref.ref(a)
        loop.call_soon_threadsafe(ran.append, None)
        return loop.call_soon_threadsafe(ran.append, a), ref

    h, ref = _from_thread(produce)
    run_once(loop)  # runs while the caller still holds the handle
    assert len(ran) == 2
    ran.clear()
    del h
    # The loop goes idle (or stops): nothing it keeps holds the argument.
    run_for(loop, 0.01)
    assert ref() is None


def test_threadsafe_arguments_from_a_thread_whose_del_schedules_more(loop):
    ran = []

    class Arg:
        def __init__(self, i):
            self.i = i

        def __del__(self):
            loop.call_soon_threadsafe(ran.append, ("del", self.i))

    def consume(a):
        ran.append(("run", a.i))

    def produce():
        for i in range(4):
            loop.call_soon_threadsafe(consume, Arg(i))

    _from_thread(produce)
    run_for(loop, 0.01)
    assert [x for x in ran if x[0] == "run"] == [("run", i) for i in range(4)]
    assert sorted(x for x in ran if x[0] == "del") == [("del", i) for i in range(4)]


def test_threadsafe_callbacks_queued_from_a_thread_are_dropped_by_close(loop_factory):
    import weakref

    class Arg:
        pass

    lp = loop_factory()
    a = Arg()
    ref = weakref.ref(a)
    h = _from_thread(lambda arg: [lp.call_soon_threadsafe(print, arg) for _ in range(2)][-1], a)
    del a
    lp.close()
    del h
    assert ref() is None
    with pytest.raises(RuntimeError):
        _from_thread(lp.call_soon_threadsafe, print)


def test_call_soon_threadsafe_from_many_threads_runs_every_callback(loop):
    n_threads, per_thread = 8, 200
    got = []
    done = threading.Barrier(n_threads + 1)

    def worker(k):
        for i in range(per_thread):
            loop.call_soon_threadsafe(got.append, (k, i))
        done.wait(5)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    done.wait(5)
    for t in threads:
        t.join()
    run_once(loop)
    assert len(got) == n_threads * per_thread
    # FIFO per producing thread
    for k in range(n_threads):
        assert [i for (kk, i) in got if kk == k] == list(range(per_thread))


# -- stop() -----------------------------------------------------------------


def test_stop_before_run_forever_makes_it_run_one_iteration(loop):
    order = []

    def a():
        order.append("a")
        loop.call_soon(order.append, "a2")

    loop.call_soon(a)
    loop.call_soon(order.append, "b")
    loop.stop()
    loop.run_forever()
    assert order == ["a", "b"]
    # the callback scheduled during that iteration is still pending
    run_once(loop)
    assert order == ["a", "b", "a2"]


def test_stop_inside_callback_finishes_the_current_iteration(loop):
    order = []

    def a():
        order.append("a")
        loop.stop()
        loop.call_soon(order.append, "a2")

    loop.call_soon(a)
    loop.call_soon(order.append, "b")
    loop.run_forever()
    assert order == ["a", "b"]
    run_once(loop)
    assert order == ["a", "b", "a2"]


def _assert_run_forever_runs_until_its_own_stop(loop):
    """run_forever() runs a callback that reschedules itself until that callback stops the
    loop, on its third run (no earlier stop request cuts it short)."""
    ticks = []

    def tick():
        ticks.append(1)
        if len(ticks) == 3:
            loop.stop()
        else:
            loop.call_soon(tick)

    loop.call_soon(tick)
    loop.run_forever()
    assert len(ticks) == 3


def test_stop_request_is_consumed_by_one_run_forever(loop):
    loop.stop()
    loop.run_forever()
    # a second run_forever must not stop immediately due to the old request
    _assert_run_forever_runs_until_its_own_stop(loop)


def test_stop_called_twice_stops_only_once(loop):
    loop.call_soon(loop.stop)
    loop.call_soon(loop.stop)
    loop.run_forever()
    calls = []
    loop.call_soon(calls.append, 1)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert calls == [1]


# -- running-loop state -----------------------------------------------------


def test_get_running_loop_inside_callback_returns_the_loop(loop):
    seen = []
    loop.call_soon(lambda: seen.append(asyncio.get_running_loop()))
    loop.call_soon(lambda: seen.append(asyncio.get_event_loop()))
    run_once(loop)
    assert seen[0] is loop
    assert seen[1] is loop


def test_is_running_true_inside_callback_false_outside(loop):
    seen = []
    assert loop.is_running() is False
    loop.call_soon(lambda: seen.append(loop.is_running()))
    run_once(loop)
    assert seen == [True]
    assert loop.is_running() is False


def test_no_running_loop_after_run_forever_returns(loop):
    run_once(loop)
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()


def test_asyncgen_hooks_installed_while_running_and_restored_after(loop):
    before = sys.get_asyncgen_hooks()
    seen = []
    loop.call_soon(lambda: seen.append(sys.get_asyncgen_hooks()))
    run_once(loop)
    assert seen[0].firstiter is not None
    assert seen[0].finalizer is not None
    assert sys.get_asyncgen_hooks() == before


# -- errors in callbacks ----------------------------------------------------


def test_exception_in_callback_goes_to_exception_handler_and_loop_continues(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append((lp, ctx)))
    calls = []

    def boom():
        raise ZeroDivisionError("boom")

    h = loop.call_soon(boom)
    loop.call_soon(calls.append, "after")
    run_once(loop)
    assert calls == ["after"]
    assert len(contexts) == 1
    lp, ctx = contexts[0]
    assert lp is loop
    assert {"message", "exception", "handle"} <= set(ctx)
    assert isinstance(ctx["exception"], ZeroDivisionError)
    assert str(ctx["exception"]) == "boom"
    assert ctx["handle"] is h
    assert ctx["message"].startswith("Exception in callback")


def test_exception_in_callback_is_logged_by_default_handler(loop, caplog):
    def failing_callback_xyz():
        raise ValueError("oops-xyz")

    with caplog.at_level("ERROR", logger="asyncio"):
        loop.call_soon(failing_callback_xyz)
        run_once(loop)
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert len(records) == 1
    rec = records[0]
    assert "Exception in callback" in rec.getMessage()
    assert "failing_callback_xyz" in rec.getMessage()
    assert rec.exc_info is not None and isinstance(rec.exc_info[1], ValueError)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_callback_propagates_out_of_run_forever(loop, exc_type):
    handled = []
    loop.set_exception_handler(lambda lp, ctx: handled.append(ctx))

    def raiser():
        raise exc_type()

    loop.call_soon(raiser)
    with pytest.raises(exc_type):
        loop.run_forever()
    assert handled == []
    assert loop.is_running() is False
    assert loop.is_closed() is False
    assert asyncio.events._get_running_loop() is None


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_loop_is_usable_after_base_exception_in_callback(loop, exc_type):
    order = []

    def raiser():
        order.append("raiser")
        raise exc_type()

    loop.call_soon(order.append, 1)
    loop.call_soon(raiser)
    loop.call_soon(order.append, 2)
    hooks_before = sys.get_asyncgen_hooks()
    with pytest.raises(exc_type):
        loop.run_forever()
    assert sys.get_asyncgen_hooks() == hooks_before
    assert order == [1, "raiser"]
    # callbacks still queued behind the raising one run on the next run
    run_once(loop)
    assert order == [1, "raiser", 2]

    async def main():
        await asyncio.sleep(0)
        return "still works"

    assert loop.run_until_complete(main()) == "still works"


def test_keyboard_interrupt_in_callback_leaves_run_until_complete(loop):
    def raiser():
        raise KeyboardInterrupt

    async def main():
        loop.call_soon(raiser)
        await asyncio.sleep(10)

    task = loop.create_task(main())
    with pytest.raises(KeyboardInterrupt):
        loop.run_until_complete(task)
    assert loop.is_running() is False
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(task)


# -- threads ----------------------------------------------------------------


def test_loops_run_concurrently_in_separate_threads(loop_factory):
    loops = [loop_factory() for _ in range(4)]
    results = {}
    errors = []

    def runner(idx, lp):
        try:
            async def main():
                assert asyncio.get_running_loop() is lp
                order = []
                for d in (0.02, 0.01, 0.03):
                    lp.call_later(d, order.append, d)
                await asyncio.sleep(0.05)
                return order, asyncio.get_running_loop()

            results[idx] = lp.run_until_complete(main())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=runner, args=(i, lp)) for i, lp in enumerate(loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert len(results) == len(loops)
    for i, lp in enumerate(loops):
        order, running = results[i]
        assert order == [0.01, 0.02, 0.03]
        assert running is lp
    # the main thread has no running loop
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()


@contextlib.contextmanager
def _running_in_a_thread(loop):
    """Run `loop` forever in a new thread; yields the thread once the loop runs, stops the loop
    (call_soon_threadsafe) and joins the thread afterwards."""
    ready = threading.Event()

    def serve():
        loop.call_soon(ready.set)
        loop.run_forever()

    t = threading.Thread(target=serve)
    t.start()
    try:
        assert ready.wait(5)
        yield t
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


def test_loop_running_in_thread_is_driven_by_call_soon_threadsafe(loop):
    with _running_in_a_thread(loop) as t:

        async def work(x):
            await asyncio.sleep(0.001)
            return x * 2, threading.current_thread() is t

        for i in range(20):
            fut = asyncio.run_coroutine_threadsafe(work(i), loop)
            assert fut.result(5) == (i * 2, True)
    assert not t.is_alive()


def test_call_soon_from_another_thread_raises_in_debug_mode(loop):
    loop.set_debug(True)
    errors = []
    with _running_in_a_thread(loop):
        try:
            loop.call_soon(lambda: None)
        except RuntimeError as e:
            errors.append(e)
    assert len(errors) == 1
    assert "thread" in str(errors[0])


# -- references ---------------------------------------------------------------


class _Payload:
    pass


def test_callback_and_args_are_released_after_running(loop):
    import gc
    import weakref

    payload = _Payload()
    ref = weakref.ref(payload)

    def cb(p):
        pass

    loop.call_soon(cb, payload)
    del payload
    run_once(loop)
    gc.collect()
    assert ref() is None


def test_cancelled_handle_releases_its_args(loop):
    import gc
    import weakref

    payload = _Payload()
    ref = weakref.ref(payload)
    h = loop.call_soon(lambda p: None, payload)
    del payload
    h.cancel()
    run_once(loop)
    gc.collect()
    assert ref() is None


# -- stop() combined with errors ----------------------------------------------


def test_stop_request_does_not_survive_a_keyboard_interrupt(loop):
    def stop_then_raise():
        loop.stop()
        raise KeyboardInterrupt

    loop.call_soon(stop_then_raise)
    with pytest.raises(KeyboardInterrupt):
        loop.run_forever()
    # run_forever resets the stop request when it exits, however it exits
    _assert_run_forever_runs_until_its_own_stop(loop)


def test_exception_in_call_soon_threadsafe_callback_goes_to_handler(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    def boom():
        raise ValueError("threadsafe boom")

    t = threading.Thread(target=loop.call_soon_threadsafe, args=(boom,))
    t.start()
    t.join()
    run_once(loop)
    assert len(contexts) == 1
    assert isinstance(contexts[0]["exception"], ValueError)


# -- debug-mode details ---------------------------------------------------------


def test_debug_mode_handle_repr_shows_creation_site(loop):
    loop.set_debug(True)

    def debug_cb():
        pass

    h = loop.call_soon(debug_cb)
    th = loop.call_later(10, debug_cb)
    assert "debug_cb" in repr(h) and "created at" in repr(h)
    assert "debug_cb" in repr(th) and "created at" in repr(th)
    th.cancel()
    run_once(loop)


@pytest.mark.parametrize("debug", [False, True])
def test_handle_repr_and_error_message_show_arguments_as_asyncio_does(loop, debug):
    # 3.13+ show a callback's arguments only in debug mode (they may hold secrets); before
    # 3.13 they are always shown.
    loop.set_debug(debug)
    shown = debug or sys.version_info < (3, 13)
    messages = []
    loop.set_exception_handler(lambda lp, ctx: messages.append(ctx["message"]))

    def args_cb(*args):
        raise ValueError

    h = loop.call_soon(args_cb, "arg-one", 2)
    th = loop.call_later(10, args_cb, "arg-two")
    assert ("args_cb('arg-one', 2)" in repr(h)) is shown
    assert ("args_cb('arg-two')" in repr(th)) is shown
    if not shown:
        assert "args_cb() at" in repr(h) and "args_cb() at" in repr(th)
    th.cancel()
    run_once(loop)
    assert len(messages) == 1
    assert messages[0].startswith("Exception in callback ")
    assert ("args_cb('arg-one', 2)" in messages[0]) is shown
    if not shown:
        assert "args_cb() at" in messages[0]


def test_debug_mode_callback_error_context_has_source_traceback(loop):
    loop.set_debug(True)
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    def boom():
        raise ValueError

    loop.call_soon(boom)
    run_once(loop)
    assert len(contexts) == 1
    assert "source_traceback" in contexts[0]
    assert contexts[0]["source_traceback"]


# -- kinds of callables ----------------------------------------------------------


def test_call_soon_accepts_any_kind_of_callable(loop):
    import functools

    got = []

    class CallableObject:
        def __call__(self, x):
            got.append(("object", x))

    class Holder:
        def method(self, x):
            got.append(("method", x))

        @staticmethod
        def static(x):
            got.append(("static", x))

    loop.call_soon(functools.partial(lambda a, b: got.append(("partial", a, b)), 1), 2)
    loop.call_soon(CallableObject(), 3)
    loop.call_soon(Holder().method, 4)
    loop.call_soon(Holder.static, 5)
    loop.call_soon(got.append, ("builtin", 6))
    loop.call_soon(lambda: got.append(("lambda",)))
    run_once(loop)
    assert got == [("partial", 1, 2), ("object", 3), ("method", 4), ("static", 5),
                   ("builtin", 6), ("lambda",)]


def test_handle_repr_names_bound_methods_and_partials(loop):
    import functools

    class Holder:
        def some_method_name(self):
            pass

    def partial_target_name(a):
        pass

    h1 = loop.call_soon(Holder().some_method_name)
    h2 = loop.call_soon(functools.partial(partial_target_name, 1))
    assert "some_method_name" in repr(h1)
    assert "partial_target_name" in repr(h2)
    run_once(loop)


def test_asyncio_all_tasks_and_current_task_see_the_loop_tasks(loop):
    async def sleeper():
        await asyncio.sleep(10)

    async def main():
        tasks = [asyncio.create_task(sleeper()) for _ in range(3)]
        await asyncio.sleep(0)
        current = asyncio.current_task()
        everything = asyncio.all_tasks()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return tasks, current, everything

    tasks, current, everything = loop.run_until_complete(main())
    assert set(tasks) | {current} == everything
    assert asyncio.all_tasks(loop) == set()


def test_handle_in_a_reference_cycle_is_garbage_collected(loop):
    import gc
    import weakref

    payload = _Payload()
    ref = weakref.ref(payload)
    # payload -> handle -> args -> payload
    payload.handle = loop.call_soon(lambda p: None, payload)
    del payload
    run_once(loop)
    gc.collect()
    assert ref() is None


def test_exception_passed_to_handler_keeps_its_traceback(loop):
    import traceback

    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    def failing_callback_with_traceback():
        raise ValueError("with traceback")

    loop.call_soon(failing_callback_with_traceback)
    run_once(loop)
    exc = contexts[0]["exception"]
    assert exc.__traceback__ is not None
    frames = [f.name for f in traceback.extract_tb(exc.__traceback__)]
    assert "failing_callback_with_traceback" in frames


def test_handle_in_error_context_still_names_the_callback(loop):
    seen = []
    loop.set_exception_handler(lambda lp, ctx: seen.append(repr(ctx["handle"])))

    def named_failing_callback():
        raise ValueError

    loop.call_soon(named_failing_callback)
    run_once(loop)
    assert len(seen) == 1
    assert "named_failing_callback" in seen[0]


def test_default_handler_log_of_callback_error_includes_traceback(loop, caplog):
    def callback_with_logged_traceback():
        raise ValueError("logged with traceback")

    with caplog.at_level("ERROR", logger="asyncio"):
        loop.call_soon(callback_with_logged_traceback)
        run_once(loop)
    assert "Traceback (most recent call last)" in caplog.text
    assert "callback_with_logged_traceback" in caplog.text
    assert "ValueError: logged with traceback" in caplog.text


def test_loop_releases_the_gil_while_sleeping(loop):
    done = threading.Event()

    def cpu_work():
        # pure-Python work: needs the GIL the whole time
        total = 0
        for i in range(300_000):
            total += i
        done.set()
        loop.call_soon_threadsafe(loop.stop)

    safety = loop.call_later(5, loop.stop)
    t = threading.Thread(target=cpu_work)
    t0 = time.monotonic()
    loop.call_soon(t.start)
    loop.run_forever()
    elapsed = time.monotonic() - t0
    t.join()
    safety.cancel()
    assert done.is_set()
    assert elapsed < 2.0, f"thread only progressed after {elapsed:.2f}s"


def test_no_lost_wakeups_under_concurrent_call_soon_threadsafe(loop):
    n_threads, per_thread = 4, 2000
    total = n_threads * per_thread
    count = 0

    def inc():
        nonlocal count
        count += 1
        if count == total:
            loop.stop()

    def producer():
        for i in range(per_thread):
            loop.call_soon_threadsafe(inc)
            if i % 100 == 0:
                time.sleep(0.0005)  # let the loop go back to sleep sometimes

    safety = loop.call_later(10, loop.stop)
    threads = [threading.Thread(target=producer) for _ in range(n_threads)]
    t0 = time.monotonic()
    loop.call_soon(lambda: [t.start() for t in threads])
    loop.run_forever()
    elapsed = time.monotonic() - t0
    for t in threads:
        t.join()
    safety.cancel()
    assert count == total
    assert elapsed < 5.0


def test_ferroloop_keeps_spent_handles_across_short_sleeps_and_trims_idle_surplus():
    """A burst's spent handles stay pooled while bursts keep coming (a producer thread wakes the
    loop every few ms: freeing and reallocating them each time costs page faults); the surplus
    is released once the loop has slept with it for a second, and when the loop stops."""
    import ferroloop

    lp = ferroloop.new_event_loop()
    try:
        ran = []
        sizes = {}

        def burst():
            for i in range(5000):
                lp.call_soon(ran.append, i)

        async def main():
            burst()
            await asyncio.sleep(0.01)  # runs the burst, then sleeps with the surplus
            sizes["after short sleep"] = lp._handle_pool_size()
            burst()
            await asyncio.sleep(0.01)
            sizes["after second burst"] = lp._handle_pool_size()
            await asyncio.sleep(1.2)
            await asyncio.sleep(0.01)  # this sleep trims the surplus, now over a second old
            sizes["after a second idle"] = lp._handle_pool_size()
            burst()
            await asyncio.sleep(0)
            await asyncio.sleep(0)

        lp.run_until_complete(main())
        assert len(ran) == 15000
        assert sizes["after short sleep"] >= 4000  # kept across a short sleep
        assert sizes["after second burst"] >= 4000  # the second burst reused them
        assert sizes["after a second idle"] <= 256
        assert lp._handle_pool_size() <= 256  # trimmed when the loop stopped
    finally:
        lp.close()


# -- interpreter exit -------------------------------------------------------

_FINALIZER_SCRIPT = """\
import sys

if sys.argv[1] == "ferroloop":
    import ferroloop
    loop = ferroloop.new_event_loop()
else:
    import asyncio
    loop = asyncio.SelectorEventLoop()
loop.close()


class Late:
    def __del__(self):
        for schedule in (
            lambda: loop.call_soon(print, "never"),
            lambda: loop.call_later(1, print, "never"),
            lambda: loop.call_at(1, print, "never"),
        ):
            try:
                schedule()
            except RuntimeError as exc:
                print("raised", exc, flush=True)


# A cycle in a module global: only the interpreter's last collections free it, after
# Py_FinalizeEx has cleared Py_IsInitialized() (as an unclosed transport's __del__ runs).
late = Late()
late.self = late
"""


def test_scheduling_on_a_closed_loop_from_a_finalizer_at_interpreter_exit_raises(loop_impl):
    # It aborted the process: the rejected call's error path attached to the interpreter with
    # PyO3, which panics once the interpreter is finalizing.
    proc = run_python_c(_FINALIZER_SCRIPT, loop_impl.name)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["raised Event loop is closed"] * 3, proc.stderr
    assert "panicked" not in proc.stderr


def test_handle_kept_by_debug_mode_in_a_reference_cycle_is_garbage_collected(loop):
    # Debug mode keeps a handle's callback after it runs, so the collector must see the handle
    # (ferroloop allocates handles itself, tracked as PyType_GenericAlloc would).
    import gc
    import weakref

    loop.set_debug(True)
    payload = _Payload()
    ref = weakref.ref(payload)
    payload.handle = loop.call_soon(lambda p: None, payload)
    payload.timer = loop.call_later(0, lambda p: None, payload)
    del payload
    run_for(loop, 0.01)
    gc.collect()
    assert ref() is None


def test_handles_do_not_start_garbage_collections():
    # A burst of handles (a producer thread far ahead of the loop, 100k call_later) must not
    # make CPython's collector walk its generations: ferroloop's handles are outside the
    # young-generation count, where the running CPython's layout is known.
    import gc

    import ferroloop
    from ferroloop import _ferroloop

    if not _ferroloop._HANDLES_OUTSIDE_GC_COUNT:
        pytest.skip("handles use CPython's own allocator on this Python")
    loop = ferroloop.new_event_loop()
    started = []

    def on_gc(phase, info):
        if phase == "start":
            started.append(info["generation"])

    keep = []

    def burst():
        for _ in range(5000):
            keep.append(loop.call_soon(int))
            keep.append(loop.call_later(60, int))

    gc.collect()
    gc.callbacks.append(on_gc)
    try:
        # In an empty context, as a fresh thread's: a handle then shares the loop's empty
        # context instead of copying the caller's (a context copy is an object of its own).
        contextvars.Context().run(burst)
    finally:
        gc.callbacks.remove(on_gc)
    assert started == []
    assert gc.is_tracked(keep[0]) is False  # queued one-shot handles stay hidden (untrack)
    for h in keep:
        h.cancel()
    loop.close()
    keep.clear()
    gc.collect()

