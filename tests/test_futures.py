"""loop.create_future(): what the future is, in and out of debug mode, and who decides debug.

ferroloop makes the future without running `Future.__init__` when the loop's own
`get_debug` would answer False (see `callbacks::bare_future`); these tests pin down that the
result is the same future as asyncio's, and that a `get_debug` replaced on a subclass or on
the instance is still asked, as `Future.__init__` asks it.
"""

import asyncio
import gc
import sys

import pytest

from conftest import run_once


def _made_at(fut, line):
    """The future's creation traceback (debug mode) holds this file's `line`. (asyncio's
    ends in its Python `create_future`, ferroloop's in the caller's frame.)"""
    tb = fut._source_traceback or []
    return any(f[0] == __file__ and f[1] == line for f in tb)


def test_create_future_is_a_pending_c_future_of_the_loop(loop):
    fut = loop.create_future()
    ref = asyncio.Future(loop=loop)  # made by Future.__init__
    assert type(fut) is asyncio.Future
    assert fut.get_loop() is loop
    assert not fut.done() and not fut.cancelled()
    assert fut._state == "PENDING"
    assert fut._source_traceback is None
    assert fut._log_traceback is False
    assert fut._asyncio_future_blocking is False
    for name in ("_state", "_callbacks", "_result", "_exception", "_loop", "_source_traceback",
                 "_cancel_message", "_log_traceback", "_asyncio_future_blocking"):
        assert getattr(fut, name) == getattr(ref, name), name
    assert repr(fut) == repr(ref) == "<Future pending>"


def test_create_future_results_callbacks_and_cancellation(loop):
    seen = []
    a, b, c = loop.create_future(), loop.create_future(), loop.create_future()
    for fut in (a, b, c):
        fut.add_done_callback(lambda f: seen.append(f))
    a.set_result(1)
    b.set_exception(ValueError("boom"))
    assert c.cancel("why")
    assert seen == []  # done callbacks run on the loop, not inline
    run_once(loop)
    assert seen == [a, b, c]
    assert a.result() == 1
    with pytest.raises(ValueError, match="boom"):
        b.result()
    with pytest.raises(asyncio.CancelledError):
        c.result()


def test_awaiting_created_futures_from_tasks(loop):
    async def waiter(fut):
        return await fut

    futs = [loop.create_future() for _ in range(3)]
    tasks = [loop.create_task(waiter(f)) for f in futs]
    for i, f in enumerate(futs):
        loop.call_soon(f.set_result, i)
    assert loop.run_until_complete(asyncio.gather(*tasks)) == [0, 1, 2]


def test_unretrieved_exception_of_a_created_future_is_reported(loop):
    reported = []
    loop.set_exception_handler(lambda lp, ctx: reported.append(ctx))
    fut = loop.create_future()
    fut.set_exception(RuntimeError("never retrieved"))
    del fut
    gc.collect()
    assert len(reported) == 1
    assert reported[0]["message"] == "Future exception was never retrieved"
    assert str(reported[0]["exception"]) == "never retrieved"


def test_debug_mode_future_records_where_it_was_created(loop):
    loop.set_debug(True)
    fut = loop.create_future()
    line = sys._getframe().f_lineno - 1
    assert _made_at(fut, line)
    loop.set_debug(False)
    assert loop.create_future()._source_traceback is None


def test_subclass_get_debug_is_asked_by_create_future(loop):
    asked = []

    class Loop(type(loop)):
        def get_debug(self):
            asked.append(1)
            return True

    lp = Loop()
    try:
        fut = lp.create_future()
        line = sys._getframe().f_lineno - 1
        assert asked
        assert _made_at(fut, line)
    finally:
        lp.close()


def test_instance_get_debug_is_asked_by_create_future(loop):
    asked = []

    def get_debug():
        asked.append(1)
        return True

    loop.get_debug = get_debug
    try:
        fut = loop.create_future()
        line = sys._getframe().f_lineno - 1
        assert asked
        assert _made_at(fut, line)
    finally:
        del loop.get_debug
    asked.clear()
    assert loop.create_future()._source_traceback is None
    assert not asked


def test_error_from_get_debug_propagates_from_create_future(loop):
    fail = False

    class Loop(type(loop)):
        def get_debug(self):
            if fail:
                raise ZeroDivisionError("from get_debug")
            return False

    lp = Loop()
    try:
        fail = True
        with pytest.raises(ZeroDivisionError, match="from get_debug"):
            lp.create_future()
        fail = False
        assert lp.create_future()._source_traceback is None
    finally:
        fail = False
        lp.close()


def test_created_futures_are_freed(loop):
    import weakref

    refs = []
    for _ in range(100):
        fut = loop.create_future()
        refs.append(weakref.ref(fut))
        fut.set_result(None)
    del fut
    assert all(r() is None for r in refs)
