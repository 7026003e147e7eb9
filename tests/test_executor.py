"""run_in_executor / set_default_executor / shutdown_default_executor."""

import asyncio
import concurrent.futures
import sys
import threading

import pytest

from conftest import requires_py311


class InlineExecutor(concurrent.futures.Executor):
    """A concurrent.futures.Executor that is not a ThreadPoolExecutor."""

    def submit(self, fn, /, *args, **kwargs):
        f = concurrent.futures.Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:
            f.set_exception(e)
        return f


def test_run_in_executor_default_pool_returns_result(loop):
    async def main():
        return await loop.run_in_executor(None, pow, 2, 10)

    assert loop.run_until_complete(main()) == 1024


def test_run_in_executor_returns_asyncio_future_of_the_loop(loop):
    fut = loop.run_in_executor(None, int, "5")
    assert isinstance(fut, asyncio.Future)
    assert fut.get_loop() is loop
    assert loop.run_until_complete(fut) == 5


def test_run_in_executor_runs_in_another_thread(loop):
    main_thread = threading.current_thread()

    async def main():
        return await loop.run_in_executor(None, threading.current_thread)

    worker = loop.run_until_complete(main())
    assert worker is not main_thread


def test_run_in_executor_propagates_exception(loop):
    def fail():
        raise ArithmeticError("in worker")

    async def main():
        await loop.run_in_executor(None, fail)

    with pytest.raises(ArithmeticError, match="in worker"):
        loop.run_until_complete(main())


def test_run_in_executor_many_calls_complete(loop):
    async def main():
        futs = [loop.run_in_executor(None, lambda i=i: i * i) for i in range(200)]
        return await asyncio.gather(*futs)

    assert loop.run_until_complete(main()) == [i * i for i in range(200)]


def test_run_in_executor_with_custom_executor(loop):
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="custom-pool") as pool:
        async def main():
            return await loop.run_in_executor(pool, lambda: threading.current_thread().name)

        name = loop.run_until_complete(main())
    assert name.startswith("custom-pool")


def test_run_in_executor_with_non_thread_pool_executor_argument(loop):
    async def main():
        return await loop.run_in_executor(InlineExecutor(), sum, [1, 2, 3])

    assert loop.run_until_complete(main()) == 6


def test_set_default_executor_is_used_by_run_in_executor(loop):
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="default-pool")
    try:
        loop.set_default_executor(pool)

        async def main():
            return await loop.run_in_executor(None, lambda: threading.current_thread().name)

        assert loop.run_until_complete(main()).startswith("default-pool")
    finally:
        pool.shutdown(wait=True)


@requires_py311
def test_set_default_executor_rejects_non_thread_pool_executor(loop):
    with pytest.raises(TypeError):
        loop.set_default_executor(InlineExecutor())
    with pytest.raises(TypeError):
        loop.set_default_executor(object())


@pytest.mark.skipif(sys.version_info >= (3, 11), reason="Python 3.11 raises TypeError instead")
def test_set_default_executor_of_another_kind_is_deprecated_but_used_before_py311(loop):
    with pytest.warns(DeprecationWarning, match="not an instance of ThreadPoolExecutor") as caught:
        loop.set_default_executor(InlineExecutor())
    assert caught[0].filename == __file__  # reported at the caller, as asyncio's stacklevel=2

    async def main():
        return await loop.run_in_executor(None, sum, [1, 2, 3])

    assert loop.run_until_complete(main()) == 6


def test_shutdown_default_executor_joins_worker_threads(loop):
    async def main():
        return await loop.run_in_executor(None, threading.current_thread)

    worker = loop.run_until_complete(main())
    assert worker.is_alive()
    loop.run_until_complete(loop.shutdown_default_executor())
    worker.join(5)
    assert not worker.is_alive()


def test_run_in_executor_after_shutdown_default_executor_raises(loop):
    loop.run_until_complete(loop.shutdown_default_executor())
    with pytest.raises(RuntimeError):
        loop.run_in_executor(None, print)


def test_shutdown_default_executor_without_executor_is_a_noop(loop):
    loop.run_until_complete(loop.shutdown_default_executor())


def test_shutdown_default_executor_waits_for_running_jobs(loop):
    release = threading.Event()
    done = []

    def job():
        release.wait(5)
        done.append(True)

    async def main():
        loop.run_in_executor(None, job)
        await asyncio.sleep(0)
        loop.call_later(0.02, release.set)
        await loop.shutdown_default_executor()
        return list(done)

    assert loop.run_until_complete(main()) == [True]


def test_run_in_executor_with_coroutine_function_raises_type_error_in_debug_mode(loop):
    loop.set_debug(True)

    async def coro_fn():
        pass

    with pytest.raises(TypeError):
        loop.run_in_executor(None, coro_fn)


def test_run_in_executor_with_non_callable_raises_type_error_in_debug_mode(loop):
    loop.set_debug(True)
    with pytest.raises(TypeError):
        loop.run_in_executor(None, 42)


def test_asyncio_to_thread_uses_the_loop_executor(loop):
    async def main():
        return await asyncio.to_thread(lambda a, b: (a + b, threading.current_thread()), 1, 2)

    value, thread = loop.run_until_complete(main())
    assert value == 3
    assert thread is not threading.current_thread()


def test_cancelling_the_future_of_run_in_executor(loop):
    started = threading.Event()
    release = threading.Event()

    def job():
        started.set()
        release.wait(5)
        return "finished"

    async def main():
        fut = loop.run_in_executor(None, job)
        await loop.run_in_executor(None, started.wait, 5)
        fut.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await fut
        # the loop survives the worker finishing after cancellation
        await asyncio.sleep(0.01)

    loop.run_until_complete(main())
    loop.run_until_complete(loop.shutdown_default_executor())
