"""Bad arguments raise the same exception types as CPython's loop.

Note: CPython only validates callbacks (non-callable, coroutine) in debug
mode; without debug mode it accepts them and the error surfaces when the
callback runs.  The strict checks are therefore asserted in debug mode,
where both loops must raise TypeError.
"""

import asyncio
import math

import sys

import pytest

from conftest import requires_py311, run_for, run_once


async def coro_fn():
    pass


SCHEDULERS = {
    "call_soon": lambda lp, cb: lp.call_soon(cb),
    "call_soon_threadsafe": lambda lp, cb: lp.call_soon_threadsafe(cb),
    "call_later": lambda lp, cb: lp.call_later(0.001, cb),
    "call_at": lambda lp, cb: lp.call_at(lp.time(), cb),
}


# -- callbacks --------------------------------------------------------------


@pytest.mark.parametrize("bad", [1, None, "callback"], ids=["int", "None", "str"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_scheduling_non_callable_raises_type_error_in_debug_mode(loop, scheduler, bad):
    loop.set_debug(True)
    with pytest.raises(TypeError):
        SCHEDULERS[scheduler](loop, bad)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_scheduling_coroutine_object_raises_type_error_in_debug_mode(loop, scheduler):
    loop.set_debug(True)
    coro = coro_fn()
    try:
        with pytest.raises(TypeError):
            SCHEDULERS[scheduler](loop, coro)
    finally:
        coro.close()


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_scheduling_coroutine_function_raises_type_error_in_debug_mode(loop, scheduler):
    loop.set_debug(True)
    with pytest.raises(TypeError):
        SCHEDULERS[scheduler](loop, coro_fn)


def _marked_coroutine_functions():
    """Plain functions that asyncio.iscoroutinefunction takes for coroutine functions by a mark
    (no CO_COROUTINE flag): asyncio's own `_is_coroutine` (set by @asyncio.coroutine on 3.9 and
    3.10, read through 3.13) and inspect.markcoroutinefunction (3.12+)."""
    import inspect

    marked = {}
    mark = getattr(asyncio.coroutines, "_is_coroutine", None)
    if mark is not None:

        def by_asyncio_mark():
            pass

        by_asyncio_mark._is_coroutine = mark
        marked["asyncio-mark"] = by_asyncio_mark
    if hasattr(inspect, "markcoroutinefunction"):

        def by_inspect_mark():
            pass

        marked["inspect-mark"] = inspect.markcoroutinefunction(by_inspect_mark)
    return marked


_MARKED = _marked_coroutine_functions()


@pytest.mark.parametrize("kind", sorted(_MARKED))
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_scheduling_marked_coroutine_function_raises_type_error_in_debug_mode(
    loop, scheduler, kind
):
    func = _MARKED[kind]
    assert asyncio.iscoroutinefunction(func)
    loop.set_debug(True)
    with pytest.raises(TypeError):
        SCHEDULERS[scheduler](loop, func)
    # The same as a bound method.
    holder = type("Holder", (), {"method": func})()
    with pytest.raises(TypeError):
        SCHEDULERS[scheduler](loop, holder.method)


def test_function_with_unrelated_attributes_is_scheduled(loop):
    # A function with a __dict__ (functools.wraps, attributes) that carries no mark runs.
    import functools

    ran = []

    def inner():
        ran.append(1)

    @functools.wraps(inner)
    def wrapper():
        inner()

    wrapper.tag = "x"
    for _ in range(3):
        loop.call_soon(wrapper)
    run_once(loop)
    assert ran == [1, 1, 1]


def test_non_callable_callback_without_debug_never_breaks_the_loop(loop):
    # CPython accepts it and reports a TypeError through the exception
    # handler when it runs; a loop that rejects it up front is also fine.
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    try:
        loop.call_soon(1)
    except TypeError:
        rejected_early = True
    else:
        rejected_early = False
    calls = []
    loop.call_soon(calls.append, "next")
    run_once(loop)
    assert calls == ["next"]
    if rejected_early:
        assert contexts == []
    else:
        assert len(contexts) == 1
        assert isinstance(contexts[0]["exception"], TypeError)


def test_call_soon_without_callback_raises_type_error(loop):
    with pytest.raises(TypeError):
        loop.call_soon()


def test_call_later_without_callback_raises_type_error(loop):
    with pytest.raises(TypeError):
        loop.call_later(1)


def test_call_soon_with_unknown_keyword_raises_type_error(loop):
    with pytest.raises(TypeError):
        loop.call_soon(print, "x", end="")


def test_scheduling_methods_accept_callback_and_delay_as_keywords(loop):
    calls = []
    loop.call_soon(callback=calls.append)  # no *args: the callback may be named
    loop.call_soon(callback=lambda: calls.append("soon"))
    loop.call_soon_threadsafe(callback=lambda: calls.append("threadsafe"))
    loop.call_later(0, callback=lambda: calls.append("later"))
    loop.call_later(delay=0, callback=lambda: calls.append("later-kw"))
    loop.call_at(when=loop.time(), callback=lambda: calls.append("at"), context=None)
    loop.set_exception_handler(lambda lp, ctx: calls.append(type(ctx["exception"]).__name__))
    run_for(loop, 0.01)
    assert calls == ["TypeError", "soon", "threadsafe", "later", "later-kw", "at"]


@pytest.mark.parametrize(
    "call",
    [
        lambda lp: lp.call_soon(print, callback=print),
        lambda lp: lp.call_soon_threadsafe(print, 1, callback=print),
        lambda lp: lp.call_later(0, print, delay=0),
        lambda lp: lp.call_at(0, print, callback=print),
        lambda lp: lp.call_later(callback=print),
        lambda lp: lp.call_at(when=0),
    ],
    ids=["soon-twice", "threadsafe-twice", "later-delay-twice", "at-twice", "later-no-delay", "at-no-callback"],
)
def test_scheduling_argument_given_twice_or_missing_raises_type_error(loop, call):
    with pytest.raises(TypeError):
        call(loop)


# -- delays and deadlines ---------------------------------------------------


@pytest.mark.parametrize("bad", ["1", object(), [], None], ids=["str", "object", "list", "None"])
def test_call_later_with_non_number_delay_raises_type_error(loop, bad):
    with pytest.raises(TypeError):
        loop.call_later(bad, print)


def test_call_later_with_int_delay_too_large_for_a_float_raises_overflow_error(loop):
    with pytest.raises(OverflowError):
        loop.call_later(10**400, print)


@requires_py311
def test_call_at_none_raises_type_error(loop):
    with pytest.raises(TypeError):
        loop.call_at(None, print)


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="CPython 3.13 changed this behaviour; ferroloop follows 3.11 (see README)")
def test_call_later_nan_delay_does_not_break_the_loop(loop):
    h = loop.call_later(math.nan, lambda: None)
    calls = []
    loop.call_later(0.005, calls.append, "normal")
    run_for(loop, 0.02)
    assert calls == ["normal"]
    h.cancel()


def test_call_later_accepts_int_delay(loop):
    calls = []
    loop.call_later(0, calls.append, "int")
    h = loop.call_later(1, calls.append, "cancelled")
    assert h.when() >= 1
    h.cancel()
    run_for(loop, 0.01)
    assert calls == ["int"]


# -- tasks and futures ------------------------------------------------------


@pytest.mark.parametrize(
    "bad", [1, None, coro_fn, "coroutine"], ids=["int", "None", "coroutine-function", "str"]
)
def test_create_task_with_non_coroutine_raises_type_error(loop, bad):
    with pytest.raises(TypeError):
        loop.create_task(bad)


def test_create_task_with_future_raises_type_error(loop):
    fut = loop.create_future()
    with pytest.raises(TypeError):
        loop.create_task(fut)


def test_create_task_converts_non_string_name_to_string(loop):
    task = loop.create_task(coro_fn(), name=123)
    assert task.get_name() == "123"
    loop.run_until_complete(task)


@pytest.mark.parametrize(
    "bad", [1, None, coro_fn, "awaitable", object()],
    ids=["int", "None", "coroutine-function", "str", "object"],
)
def test_run_until_complete_with_non_awaitable_raises_type_error(loop, bad):
    with pytest.raises(TypeError):
        loop.run_until_complete(bad)
    # the failed call did not leave the loop running or broken
    assert loop.is_running() is False
    assert loop.run_until_complete(asyncio.sleep(0, "ok")) == "ok"


@pytest.mark.parametrize("bad", [1, "factory"])
def test_set_task_factory_with_non_callable_raises_type_error(loop, bad):
    with pytest.raises(TypeError):
        loop.set_task_factory(bad)


@pytest.mark.parametrize("bad", [1, "handler"])
def test_set_exception_handler_with_non_callable_raises_type_error(loop, bad):
    with pytest.raises(TypeError):
        loop.set_exception_handler(bad)


@requires_py311
def test_set_default_executor_with_non_executor_raises_type_error(loop):
    with pytest.raises(TypeError):
        loop.set_default_executor("executor")


def test_run_in_executor_with_coroutine_object_raises_type_error_in_debug_mode(loop):
    loop.set_debug(True)
    coro = coro_fn()
    try:
        with pytest.raises(TypeError):
            loop.run_in_executor(None, coro)
    finally:
        coro.close()


# -- harmless calls ---------------------------------------------------------


def test_stop_on_a_loop_that_is_not_running_is_allowed(loop):
    loop.stop()
    loop.run_forever()  # consumes the stop request after one iteration


def test_cancel_of_handle_after_loop_closed_is_allowed(loop):
    h = loop.call_soon(print)
    th = loop.call_later(10, print)
    loop.close()
    h.cancel()
    th.cancel()
    assert h.cancelled() and th.cancelled()
