"""run_until_complete / run_forever / close / tasks / futures / asyncgens / debug."""

import asyncio
import contextvars
import gc
import logging
import sys
import time
import warnings

import pytest

from conftest import kill_self_when_idle, requires_py311, run_once, run_python_c

cvar = contextvars.ContextVar("run_cvar", default="default")


# -- run_until_complete -----------------------------------------------------


def test_run_until_complete_coroutine_returns_its_result(loop):
    async def main():
        await asyncio.sleep(0)
        return 42

    assert loop.run_until_complete(main()) == 42


def test_run_until_complete_future_returns_its_result(loop):
    fut = loop.create_future()
    loop.call_later(0.01, fut.set_result, "done")
    assert loop.run_until_complete(fut) == "done"


def test_run_until_complete_already_done_future_returns_result(loop):
    fut = loop.create_future()
    fut.set_result(7)
    assert loop.run_until_complete(fut) == 7


def test_run_until_complete_task_returns_its_result(loop):
    async def main():
        return "task-result"

    task = loop.create_task(main())
    assert loop.run_until_complete(task) == "task-result"
    assert task.done()


def test_run_until_complete_accepts_awaitable_object(loop):
    class Awaitable:
        def __await__(self):
            yield from asyncio.sleep(0).__await__()
            return "awaited"

    assert loop.run_until_complete(Awaitable()) == "awaited"


def test_run_until_complete_wraps_coroutine_in_task_of_this_loop(loop):
    async def main():
        task = asyncio.current_task()
        return task, asyncio.get_running_loop()

    task, running = loop.run_until_complete(main())
    assert isinstance(task, asyncio.Task)
    assert task.get_loop() is loop
    assert running is loop


def test_run_until_complete_raises_the_exception_of_the_coroutine(loop):
    class MyError(Exception):
        pass

    async def main():
        await asyncio.sleep(0)
        raise MyError("from coroutine")

    with pytest.raises(MyError, match="from coroutine"):
        loop.run_until_complete(main())


def test_run_until_complete_raises_the_exception_of_the_future(loop):
    fut = loop.create_future()
    loop.call_soon(fut.set_exception, LookupError("from future"))
    with pytest.raises(LookupError, match="from future"):
        loop.run_until_complete(fut)


def test_run_until_complete_of_cancelled_future_raises_cancelled_error(loop):
    fut = loop.create_future()
    loop.call_soon(fut.cancel)
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(fut)


def test_run_until_complete_raises_if_loop_stopped_before_future_completed(loop):
    fut = loop.create_future()
    loop.call_soon(loop.stop)
    with pytest.raises(RuntimeError, match="Event loop stopped before Future completed."):
        loop.run_until_complete(fut)
    assert not fut.done()
    # the loop is still usable and the future can still complete
    loop.call_soon(fut.set_result, 1)
    assert loop.run_until_complete(fut) == 1


def test_run_until_complete_with_future_of_another_loop_raises_value_error(loop_factory):
    loop1 = loop_factory()
    loop2 = loop_factory()
    fut = loop2.create_future()
    with pytest.raises(ValueError):
        loop1.run_until_complete(fut)


def test_run_until_complete_can_be_called_repeatedly(loop):
    async def add(a, b):
        await asyncio.sleep(0)
        return a + b

    for i in range(50):
        assert loop.run_until_complete(add(i, 1)) == i + 1


def test_asyncio_primitives_work_inside_run_until_complete(loop):
    async def producer(q):
        for i in range(5):
            await q.put(i)
            await asyncio.sleep(0.001)
        await q.put(None)

    async def consumer(q):
        got = []
        while (item := await q.get()) is not None:
            got.append(item)
        return got

    async def main():
        q = asyncio.Queue()
        _, got = await asyncio.gather(producer(q), consumer(q))
        ev = asyncio.Event()
        asyncio.get_running_loop().call_later(0.005, ev.set)
        await asyncio.wait_for(ev.wait(), 5)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.sleep(10), 0.01)
        return got

    assert loop.run_until_complete(main()) == [0, 1, 2, 3, 4]


def test_asyncio_sleep_waits_at_least_the_delay(loop):
    async def main():
        t0 = loop.time()
        await asyncio.sleep(0.02)
        return loop.time() - t0

    elapsed = loop.run_until_complete(main())
    assert 0.02 - 1e-9 <= elapsed < 1.0


# -- re-entrancy ------------------------------------------------------------


def _runtime_errors_in_a_callback(loop, call):
    """Run call() in a callback of `loop` (run once); the messages of the RuntimeErrors it
    raised."""
    errors = []

    def cb():
        try:
            call()
        except RuntimeError as e:
            errors.append(str(e))

    loop.call_soon(cb)
    run_once(loop)
    return errors


def test_run_until_complete_while_running_raises_runtime_error(loop):
    def call():
        fut = loop.create_future()
        loop.run_until_complete(fut)

    assert _runtime_errors_in_a_callback(loop, call) == ["This event loop is already running"]


def test_run_forever_while_running_raises_runtime_error(loop):
    errors = _runtime_errors_in_a_callback(loop, loop.run_forever)
    assert errors == ["This event loop is already running"]
    assert loop.is_running() is False


def _try_run_inside(outer, inner):
    errors = []

    def cb():
        try:
            inner.run_forever()
        except RuntimeError as e:
            errors.append(("run_forever", str(e)))
        fut = inner.create_future()
        try:
            inner.run_until_complete(fut)
        except RuntimeError as e:
            errors.append(("run_until_complete", str(e)))
        # the outer loop is still the running one
        errors.append(("running", asyncio.get_running_loop() is outer))

    outer.call_soon(cb)
    outer.call_soon(outer.stop)
    outer.run_forever()
    return errors


ANOTHER_LOOP_MSG = "Cannot run the event loop while another loop is running"


def test_running_a_second_loop_inside_a_callback_raises_runtime_error(loop_impl, loop_factory):
    if loop_impl.name == "asyncio" and sys.version_info[:3] == (3, 13, 0):
        pytest.skip("CPython 3.13.0's run_forever clears the outer running loop when its setup fails")
    outer = loop_factory()
    inner = loop_factory()
    assert _try_run_inside(outer, inner) == [
        ("run_forever", ANOTHER_LOOP_MSG),
        ("run_until_complete", ANOTHER_LOOP_MSG),
        ("running", True),
    ]
    # both loops remain usable afterwards
    run_once(inner)
    run_once(outer)


def test_running_a_cpython_loop_inside_a_callback_raises_runtime_error(loop):
    if sys.version_info[:3] == (3, 13, 0):
        pytest.skip("CPython 3.13.0's run_forever clears the outer running loop when its setup fails")
    cpython_loop = asyncio.SelectorEventLoop()
    try:
        assert _try_run_inside(loop, cpython_loop) == [
            ("run_forever", ANOTHER_LOOP_MSG),
            ("run_until_complete", ANOTHER_LOOP_MSG),
            ("running", True),
        ]
    finally:
        cpython_loop.close()


def test_running_loop_inside_a_cpython_loop_callback_raises_runtime_error(loop):
    if sys.version_info[:3] == (3, 13, 0):
        pytest.skip("CPython 3.13.0's run_forever clears the outer running loop when its setup fails")
    cpython_loop = asyncio.SelectorEventLoop()
    try:
        assert _try_run_inside(cpython_loop, loop) == [
            ("run_forever", ANOTHER_LOOP_MSG),
            ("run_until_complete", ANOTHER_LOOP_MSG),
            ("running", True),
        ]
    finally:
        cpython_loop.close()


def test_loops_can_run_one_after_another_in_the_same_thread(loop_factory):
    async def main(x):
        await asyncio.sleep(0)
        return asyncio.get_running_loop(), x

    loops = [loop_factory() for _ in range(3)]
    for i, lp in enumerate(loops):
        running, x = lp.run_until_complete(main(i))
        assert running is lp and x == i


# -- close ------------------------------------------------------------------


def test_close_while_running_raises_runtime_error(loop):
    errors = _runtime_errors_in_a_callback(loop, loop.close)
    assert errors == ["Cannot close a running event loop"]
    assert loop.is_closed() is False


def test_close_is_idempotent(loop):
    assert loop.is_closed() is False
    loop.close()
    assert loop.is_closed() is True
    loop.close()
    assert loop.is_closed() is True


def test_close_discards_pending_callbacks(loop):
    calls = []
    loop.call_soon(calls.append, 1)
    loop.call_later(0, calls.append, 2)
    loop.close()
    assert calls == []


def _closed_loop_operations():
    async def coro():
        pass

    def create_task(lp):
        c = coro()
        try:
            lp.create_task(c)
        finally:
            c.close()

    def run_until_complete(lp):
        c = coro()
        try:
            lp.run_until_complete(c)
        finally:
            c.close()

    return [
        pytest.param(lambda lp: lp.call_soon(print), id="call_soon"),
        pytest.param(lambda lp: lp.call_soon_threadsafe(print), id="call_soon_threadsafe"),
        pytest.param(lambda lp: lp.call_later(1, print), id="call_later"),
        pytest.param(lambda lp: lp.call_at(lp.time() + 1, print), id="call_at"),
        pytest.param(create_task, id="create_task"),
        pytest.param(run_until_complete, id="run_until_complete"),
        pytest.param(lambda lp: lp.run_forever(), id="run_forever"),
        pytest.param(lambda lp: lp.run_in_executor(None, print), id="run_in_executor"),
        pytest.param(lambda lp: lp.add_reader(0, print), id="add_reader"),
        pytest.param(lambda lp: lp.add_writer(1, print), id="add_writer"),
    ]


@pytest.mark.parametrize("operation", _closed_loop_operations())
def test_operations_on_a_closed_loop_raise_event_loop_is_closed(loop, operation):
    loop.close()
    with pytest.raises(RuntimeError, match="^Event loop is closed$"):
        operation(loop)


def test_closed_loop_still_reports_its_state(loop):
    loop.close()
    assert loop.is_closed() is True
    assert loop.is_running() is False
    assert isinstance(loop.time(), float)
    assert loop.get_debug() in (True, False)


# -- tasks ------------------------------------------------------------------


def test_create_task_returns_task_bound_to_the_loop(loop):
    async def main():
        return "ok"

    task = loop.create_task(main())
    assert isinstance(task, asyncio.Task)
    assert task.get_loop() is loop
    assert loop.run_until_complete(task) == "ok"


def test_create_task_with_name(loop):
    async def main():
        return asyncio.current_task().get_name()

    task = loop.create_task(main(), name="my-task-name")
    assert task.get_name() == "my-task-name"
    assert loop.run_until_complete(task) == "my-task-name"


@requires_py311
def test_create_task_runs_in_the_given_context(loop):
    ctx = contextvars.Context()
    ctx.run(cvar.set, "task-ctx")

    async def main():
        seen = cvar.get()
        cvar.set("changed-by-task")
        return seen

    task = loop.create_task(main(), context=ctx)
    assert loop.run_until_complete(task) == "task-ctx"
    assert ctx[cvar] == "changed-by-task"
    assert cvar.get() == "default"


def test_create_task_copies_the_current_context_by_default(loop):
    async def main():
        seen = cvar.get()
        cvar.set("changed-by-task")
        return seen

    token = cvar.set("creator")
    try:
        task = loop.create_task(main())
    finally:
        cvar.reset(token)
    assert loop.run_until_complete(task) == "creator"
    assert cvar.get() == "default"


def test_task_factory_is_used_by_create_task_and_run_until_complete(loop):
    made = []

    def factory(lp, coro, **kwargs):
        task = asyncio.Task(coro, loop=lp, **kwargs)
        made.append((lp, task))
        return task

    assert loop.get_task_factory() is None
    loop.set_task_factory(factory)
    assert loop.get_task_factory() is factory

    async def main():
        return "via-factory"

    task = loop.create_task(main(), name="factory-named")
    assert made == [(loop, task)]
    assert task.get_name() == "factory-named"
    assert loop.run_until_complete(task) == "via-factory"
    assert loop.run_until_complete(main()) == "via-factory"
    assert len(made) == 2


@requires_py311
def test_task_factory_receives_context(loop):
    received = []

    def factory(lp, coro, **kwargs):
        received.append(kwargs.get("context"))
        return asyncio.Task(coro, loop=lp, **kwargs)

    loop.set_task_factory(factory)
    ctx = contextvars.Context()
    ctx.run(cvar.set, "factory-ctx")

    async def main():
        return cvar.get()

    task = loop.create_task(main(), context=ctx)
    assert received == [ctx]
    assert loop.run_until_complete(task) == "factory-ctx"


def test_set_task_factory_none_restores_default(loop):
    loop.set_task_factory(lambda lp, coro: asyncio.Task(coro, loop=lp))
    loop.set_task_factory(None)
    assert loop.get_task_factory() is None

    async def main():
        return 1

    assert loop.run_until_complete(main()) == 1


@pytest.mark.parametrize("bad", [1, "factory", object()])
def test_set_task_factory_rejects_non_callable(loop, bad):
    with pytest.raises(TypeError):
        loop.set_task_factory(bad)
    assert loop.get_task_factory() is None


def test_create_future_returns_asyncio_future_bound_to_the_loop(loop):
    fut = loop.create_future()
    assert isinstance(fut, asyncio.Future)
    assert fut.get_loop() is loop
    assert not fut.done()
    loop.call_soon(fut.set_result, "value")
    assert loop.run_until_complete(fut) == "value"


def test_future_done_callbacks_run_via_the_loop(loop):
    fut = loop.create_future()
    seen = []
    fut.add_done_callback(lambda f: seen.append((f.result(), asyncio.get_running_loop())))
    fut.set_result(3)
    assert seen == []  # scheduled with call_soon, not called synchronously
    run_once(loop)
    assert seen == [(3, loop)]


def test_many_tasks_complete(loop):
    async def worker(i):
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        return i * 2

    async def main():
        return await asyncio.gather(*(worker(i) for i in range(1000)))

    assert loop.run_until_complete(main()) == [i * 2 for i in range(1000)]


def test_pending_task_can_be_cancelled(loop):
    async def sleeper():
        await asyncio.sleep(10)

    async def main():
        task = asyncio.create_task(sleeper())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert loop.run_until_complete(main()) is True


# -- entry points -----------------------------------------------------------


@requires_py311
def test_asyncio_runner_with_loop_factory(loop_impl, loop_factory):
    async def main():
        await asyncio.sleep(0)
        return asyncio.get_running_loop()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        running = runner.run(main())
        assert running is runner.get_loop()
        assert isinstance(running, loop_impl.loop_class)
        assert runner.run(main()) is running
    assert running.is_closed()


@pytest.mark.parametrize("debug", [None, False, True])
def test_run_entry_point_runs_main_on_a_fresh_loop(loop_impl, debug):
    async def main():
        lp = asyncio.get_running_loop()
        await asyncio.sleep(0)
        return lp, lp.get_debug()

    lp, got_debug = loop_impl.run(main(), debug=debug)
    assert isinstance(lp, loop_impl.loop_class)
    assert lp.is_closed()
    if debug is not None:
        assert got_debug is debug


def test_run_entry_point_propagates_exception(loop_impl):
    async def main():
        raise KeyError("from main")

    with pytest.raises(KeyError):
        loop_impl.run(main())


def test_run_entry_point_inside_a_running_loop_fails_fast_as_asyncio_run(loop_impl, recwarn):
    # asyncio.run checks for a running loop before it makes one: the error names it, and no
    # loop is made (before this check, 3.11's Runner made one, failed in its shutdown, and
    # the RuntimeError said "Cannot run the event loop while another loop is running").
    async def inner():
        pass

    async def outer():
        coro = inner()
        try:
            with pytest.raises(RuntimeError) as ei:
                loop_impl.run(coro)
        finally:
            coro.close()
        return str(ei.value)

    message = loop_impl.run(outer())
    assert message == "asyncio.run() cannot be called from a running event loop"
    assert not [w for w in recwarn if "was never awaited" in str(w.message)]


def test_run_entry_point_cancels_leftover_tasks(loop_impl):
    cancelled = []

    async def leftover():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main():
        asyncio.create_task(leftover())
        await asyncio.sleep(0)

    loop_impl.run(main())
    assert cancelled == [True]


def test_event_loop_policy_creates_loops_of_the_implementation(loop_impl):
    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(loop_impl.policy_class())
    try:
        async def main():
            return asyncio.get_running_loop()

        lp = asyncio.run(main())
        assert isinstance(lp, loop_impl.loop_class)
        assert lp.is_closed()
    finally:
        asyncio.set_event_loop_policy(old)



@pytest.mark.skipif(
    not hasattr(asyncio, "AbstractChildWatcher"), reason="no child watchers (Python 3.14+)"
)
def test_asyncio_loop_spawns_subprocesses_while_the_policy_is_installed(loop_impl):
    # asyncio's own loops ask the policy for a child watcher each time they start a
    # subprocess (e.g. uvicorn --loop asyncio in a process that installed ferroloop).
    old = asyncio.get_event_loop_policy()
    policy = loop_impl.policy_class()
    asyncio.set_event_loop_policy(policy)
    stdlib_loop = asyncio.SelectorEventLoop()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12 deprecated watchers
            assert isinstance(policy.get_child_watcher(), asyncio.AbstractChildWatcher)

        async def main():
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "print('hi')", stdout=asyncio.subprocess.PIPE
            )
            return await proc.communicate()

        assert stdlib_loop.run_until_complete(main()) == (b"hi\n", None)
    finally:
        stdlib_loop.close()
        asyncio.set_event_loop_policy(old)


# -- async generators -------------------------------------------------------


async def _agen_recording_its_finaliser(finalised):
    """Yields 1 and 2; its finally clause appends the loop it runs on to `finalised`."""
    try:
        yield 1
        yield 2
    finally:
        finalised.append(asyncio.get_running_loop())


def test_shutdown_asyncgens_finalises_an_unfinished_async_generator(loop):
    finalised = []

    gen = _agen_recording_its_finaliser(finalised)

    async def first():
        return await gen.__anext__()  # noqa: F821 (deleted after use)

    assert loop.run_until_complete(first()) == 1
    assert finalised == []
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert finalised == [loop]
    del gen


def test_shutdown_asyncgens_reports_errors_of_aclose_to_handler(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    async def agen():
        try:
            yield 1
        finally:
            raise ValueError("aclose failed")

    gen = agen()

    async def first():
        return await gen.__anext__()  # noqa: F821 (deleted after use)

    loop.run_until_complete(first())
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert len(contexts) == 1
    assert isinstance(contexts[0]["exception"], ValueError)
    assert contexts[0]["asyncgen"] is gen
    del gen


def test_garbage_collected_async_generator_is_finalised_by_the_loop(loop):
    finalised = []

    async def main():
        gen = _agen_recording_its_finaliser(finalised)
        assert await gen.__anext__() == 1
        del gen
        gc.collect()
        # the loop's finalizer hook schedules aclose() as a task
        for _ in range(5):
            await asyncio.sleep(0)

    loop.run_until_complete(main())
    assert finalised == [loop]


def test_shutdown_asyncgens_with_no_generators_is_a_noop(loop):
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_asyncgens())


# -- debug mode -------------------------------------------------------------


def test_set_debug_get_debug(loop):
    loop.set_debug(True)
    assert loop.get_debug() is True
    loop.set_debug(False)
    assert loop.get_debug() is False


def test_debug_mode_warns_about_slow_callbacks(loop, caplog):
    loop.set_debug(True)
    loop.slow_callback_duration = 0.01

    def slow_callback_abc():
        time.sleep(0.05)

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.call_soon(slow_callback_abc)
        run_once(loop)
    msgs = [r.getMessage() for r in caplog.records
            if r.name == "asyncio" and r.levelno == logging.WARNING]
    slow = [m for m in msgs if m.startswith("Executing") and "took" in m]
    assert len(slow) == 1, msgs
    assert "slow_callback_abc" in slow[0]
    assert "seconds" in slow[0]


def test_debug_mode_does_not_warn_about_fast_callbacks(loop, caplog):
    loop.set_debug(True)
    loop.slow_callback_duration = 1.0

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.call_soon(lambda: None)
        run_once(loop)
    assert not [r for r in caplog.records
                if r.name == "asyncio" and "took" in r.getMessage()]


def test_no_slow_callback_warning_without_debug(loop, caplog):
    loop.set_debug(False)
    loop.slow_callback_duration = 0.01

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.call_soon(time.sleep, 0.03)
        run_once(loop)
    assert not [r for r in caplog.records
                if r.name == "asyncio" and "took" in r.getMessage()]


def test_slow_callback_duration_defaults_to_100ms(loop):
    assert loop.slow_callback_duration == pytest.approx(0.1)


# -- signals while idle -----------------------------------------------------


def test_sigint_while_loop_is_idle_raises_keyboard_interrupt_promptly(loop):
    import signal

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    safety = loop.call_later(10, loop.stop)
    t = kill_self_when_idle(signal.SIGINT, 0.05)
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_forever()
    finally:
        t.join()
    assert time.monotonic() - t0 < 2.0
    safety.cancel()
    assert loop.is_running() is False
    assert loop.run_until_complete(asyncio.sleep(0, "usable")) == "usable"


def test_python_signal_handler_exception_while_idle_leaves_run_forever(loop):
    import signal

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        safety = loop.call_later(10, loop.stop)
        t = kill_self_when_idle(signal.SIGUSR1, 0.05)
        t0 = time.monotonic()
        try:
            with pytest.raises(Interrupted):
                loop.run_forever()
        finally:
            t.join()
        assert time.monotonic() - t0 < 2.0
        safety.cancel()
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert loop.is_running() is False


def test_python_signal_handler_runs_while_loop_is_idle(loop):
    import signal

    seen = []

    def handler(signum, frame):
        seen.append(time.monotonic())

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        t = kill_self_when_idle(signal.SIGUSR1, 0.02)
        t0 = time.monotonic()
        try:
            loop.call_later(0.5, loop.stop)
            loop.run_forever()
        finally:
            t.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert len(seen) == 1
    # handled while the loop was still sleeping, not only after it woke up
    assert seen[0] - t0 < 0.4


# -- SystemExit / KeyboardInterrupt from tasks --------------------------------


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_task_propagates_out_of_run_until_complete(loop, exc_type):
    async def main():
        await asyncio.sleep(0)
        raise exc_type()

    with pytest.raises(exc_type):
        loop.run_until_complete(main())
    assert loop.is_running() is False
    assert loop.run_until_complete(asyncio.sleep(0, "usable")) == "usable"


# -- object lifetime ----------------------------------------------------------


def test_unclosed_loop_warns_when_garbage_collected(loop_impl):
    import warnings

    lp = loop_impl.new_event_loop()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del lp
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) and "unclosed" in str(w.message)
               for w in caught), [str(w.message) for w in caught]


def test_closed_loop_is_garbage_collected(loop_impl):
    import weakref

    lp = loop_impl.new_event_loop()

    async def main():
        await asyncio.sleep(0)

    lp.run_until_complete(main())
    lp.call_soon(lp.stop)  # a pending self-reference
    lp.close()
    ref = weakref.ref(lp)
    del lp
    gc.collect()
    assert ref() is None


def test_finished_task_is_garbage_collected(loop):
    import weakref

    async def main():
        await asyncio.sleep(0)
        return 1

    task = loop.create_task(main())
    loop.run_until_complete(task)
    ref = weakref.ref(task)
    del task
    gc.collect()
    assert ref() is None


def test_run_until_complete_stopped_early_does_not_stop_loop_when_future_completes_later(loop):
    fut = loop.create_future()
    loop.call_soon(loop.stop)
    with pytest.raises(RuntimeError):
        loop.run_until_complete(fut)
    # run_until_complete removed its done-callback from ``fut``: completing
    # the future later must not stop an unrelated run_forever.
    ticks = []

    def tick():
        ticks.append(1)
        if len(ticks) < 5:
            loop.call_soon(tick)
        else:
            loop.stop()

    loop.call_soon(fut.set_result, None)
    loop.call_soon(tick)
    loop.run_forever()
    assert len(ticks) == 5


def test_exhausted_async_generator_is_not_kept_alive_by_the_loop(loop):
    import weakref

    async def agen():
        yield 1

    refs = []

    async def main():
        gen = agen()
        async for _ in gen:
            pass
        refs.append(weakref.ref(gen))

    loop.run_until_complete(main())
    gc.collect()
    assert refs[0]() is None
    loop.run_until_complete(loop.shutdown_asyncgens())


def test_shutdown_asyncgens_finalises_several_generators(loop):
    finalised = []

    def make(tag):
        async def agen():
            try:
                yield tag
                yield tag
            finally:
                finalised.append(tag)
        return agen()

    gens = [make(i) for i in range(5)]

    async def start_all():
        for g in gens:  # noqa: F821 (deleted after use)
            await g.__anext__()

    loop.run_until_complete(start_all())
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert sorted(finalised) == list(range(5))
    del gens


def test_close_shuts_down_the_default_executor(loop):
    import threading

    async def main():
        return await loop.run_in_executor(None, threading.current_thread)

    worker = loop.run_until_complete(main())
    loop.close()
    worker.join(5)
    assert not worker.is_alive()


def test_close_with_watchers_and_timers_still_registered(loop):
    import socket

    a, b = socket.socketpair()
    with a, b:
        loop.add_reader(a, lambda: None)
        loop.add_writer(b, lambda: None)
        loop.call_later(3600, lambda: None)
        loop.call_soon(lambda: None)
        loop.close()
        assert loop.is_closed()


def test_run_entry_point_turns_sigint_into_cancellation_of_main(loop_impl):
    import signal

    cancelled = []

    async def main():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    t0 = time.monotonic()
    t = kill_self_when_idle(signal.SIGINT, 0.05)
    try:
        with pytest.raises(KeyboardInterrupt):
            loop_impl.run(main())
    finally:
        t.join()
    assert cancelled == [True]
    assert time.monotonic() - t0 < 2.0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("env", [{"PYTHONASYNCIODEBUG": "1"}, {"PYTHONDEVMODE": "1"}, {}])
def test_new_loop_debug_default_follows_environment(loop_impl, env):
    import os
    import subprocess

    make = {
        "asyncio": "import asyncio; lp = asyncio.SelectorEventLoop()",
        "ferroloop": "import ferroloop; lp = ferroloop.new_event_loop()",
    }[loop_impl.name]
    code = make + "; print(lp.get_debug()); lp.close()"
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("PYTHONASYNCIODEBUG", "PYTHONDEVMODE")}
    full_env.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=full_env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("True" if env else "False")


def test_pending_task_is_reported_destroyed_after_loop_close(loop):
    import weakref

    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    async def sleeper():
        await asyncio.sleep(3600)

    task = loop.create_task(sleeper())
    run_once(loop)
    ref = weakref.ref(task)
    del task
    loop.close()
    gc.collect()
    assert ref() is None, "pending task (and its sleep timer) leaked after close"
    assert [c["message"] for c in contexts] == ["Task was destroyed but it is pending!"]


def test_closed_loop_is_freed_by_reference_counting(loop_impl):
    # Futures and task steps were made through the loop before it was closed; once closed and
    # unreferenced, nothing of it may be left for the garbage collector.
    import weakref

    lp = loop_impl.new_event_loop()

    async def main():
        running = asyncio.get_running_loop()
        fut = running.create_future()
        running.call_soon(fut.set_result, 1)
        await fut
        await asyncio.sleep(0)

    lp.run_until_complete(main())
    lp.close()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        ref = weakref.ref(lp)
        del lp
        assert ref() is None
    finally:
        if was_enabled:
            gc.enable()


def test_create_future_is_bound_to_the_loop_running_or_not(loop):
    outside = loop.create_future()
    assert type(outside) is asyncio.Future and outside.get_loop() is loop

    async def main():
        inside = loop.create_future()
        loop.call_soon(inside.set_result, "ok")
        return inside.get_loop(), await inside

    assert loop.run_until_complete(main()) == (loop, "ok")
    outside.set_result(None)  # the loop is not running: no callback to schedule


def test_loop_subclass_call_soon_override_sees_task_steps(loop_impl):
    # C tasks and futures schedule their steps and callbacks with loop.call_soon: an override
    # in a subclass sees them all.
    seen = []

    class Counting(loop_impl.loop_class):
        def call_soon(self, callback, *args, context=None):
            seen.append(callback)
            return super().call_soon(callback, *args, context=context)

    lp = Counting()
    try:

        async def main():
            fut = lp.create_future()
            lp.call_soon(fut.set_result, 7)
            await asyncio.sleep(0)
            return await fut

        assert lp.run_until_complete(main()) == 7
    finally:
        lp.close()
    # run_until_complete's task step, the explicit call, sleep(0)'s step, the future's wake-up
    assert len(seen) >= 4, seen
    assert seen.count(seen[1]) == 1


_UNCLOSED_POLICY_LOOP_SCRIPT = """\
import asyncio
import sys

if sys.argv[1] == "ferroloop":
    import ferroloop
    ferroloop.install()
else:
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())

# The pre-asyncio.run idiom, without close(): the policy keeps the loop until the
# interpreter tears its modules down.
loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)
print(loop.run_until_complete(asyncio.sleep(0, "ran")))
"""


def test_loop_left_unclosed_in_the_policy_is_closed_quietly_at_interpreter_exit(loop_impl):
    proc = run_python_c(_UNCLOSED_POLICY_LOOP_SCRIPT, loop_impl.name)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ran\n", "")
