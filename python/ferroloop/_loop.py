"""`ferroloop.Loop`: the native `LoopCore` plus asyncio's cold-path glue.

Rule of frequency: whatever runs per callback, per event or per timer is native
(`call_soon`, `call_later`, `call_at`, `time`, `get_debug`, `create_future`, `create_task`, the
run loop itself). What is here runs once per loop, per executor job or per error: argument
checking, executors, async generator finalisation, the exception handler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
import traceback
import warnings
import weakref
from asyncio import coroutines, futures, tasks

from . import _ferroloop
from ._signatures import since
from ._net import NetworkMixin
from ._unix import UnixMixin

logger = logging.getLogger("asyncio")


def _stop_loop_of(fut) -> None:
    # run_until_complete's done callback. A future that finished with SystemExit or
    # KeyboardInterrupt has already made run_forever return by raising through it.
    if not fut.cancelled():
        exc = fut.exception()
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            return
    futures._get_loop(fut).stop()


# Before 3.12, C asyncio schedules every task step and future callback with
# `getattr(loop, "call_soon")(...)`, which builds a bound method per call; 3.12+ calls the
# method without binding it.
_BIND_CALL_SOON = sys.version_info < (3, 12)
_core_call_soon = _ferroloop.LoopCore.call_soon
_core_time = _ferroloop.LoopCore.time
_core_create_task = _ferroloop.LoopCore.create_task


class Loop(_ferroloop.LoopCore, NetworkMixin, UnixMixin, asyncio.AbstractEventLoop):
    """ferroloop's event loop: an `asyncio.AbstractEventLoop` with a Rust core."""

    def __init__(self) -> None:
        self.slow_callback_duration = 0.1
        self._default_executor = None
        self._executor_shutdown_called = False
        self._exception_handler = None
        self._asyncgens = weakref.WeakSet()
        self._asyncgens_shutdown_called = False
        self._coroutine_origin_tracking_enabled = False
        self._coroutine_origin_tracking_saved_depth = None
        self._unix_init()
        self.set_debug(coroutines._is_debug_mode())
        if type(self).time is not _core_time:
            # A subclass with its own clock: call_later and the run loop use it, as asyncio's do.
            self._use_python_time(True)
        if _BIND_CALL_SOON and type(self).call_soon is _core_call_soon:
            # One bound method, found in the instance dict by C asyncio's lookup, instead of a
            # new one per task step. It refers to the loop: close() removes it, so a closed
            # loop is freed as soon as it is unreferenced (an unclosed one, like asyncio's own
            # loop, by the garbage collector).
            self.__dict__["call_soon"] = self.call_soon

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} running={self.is_running()} "
            f"closed={self.is_closed()} debug={self.get_debug()}>"
        )

    # ---- running and stopping -------------------------------------------------------------

    def run_forever(self) -> None:
        """Run until stop() is called."""
        self._check_fork()
        self._check_closed()
        self._check_running()
        self._set_coroutine_origin_tracking(self.get_debug())
        old_hooks = sys.get_asyncgen_hooks()
        try:
            sys.set_asyncgen_hooks(
                firstiter=self._asyncgen_firstiter_hook,
                finalizer=self._asyncgen_finalizer_hook,
            )
            self._run_forever_native()
        finally:
            self._set_coroutine_origin_tracking(False)
            sys.set_asyncgen_hooks(*old_hooks)

    def run_until_complete(self, future):
        """Run until the future (a Future, Task or coroutine) is done; return its result."""
        self._check_fork()
        self._check_closed()
        self._check_running()
        new_task = not futures.isfuture(future)
        future = tasks.ensure_future(future, loop=self)
        if new_task:
            # The caller never sees this task: don't warn that it was destroyed pending if an
            # exception (e.g. KeyboardInterrupt) stops the loop first.
            future._log_destroy_pending = False
        future.add_done_callback(_stop_loop_of)
        try:
            self.run_forever()
        except BaseException:
            if new_task and future.done() and not future.cancelled():
                # The exception escaped run_forever: mark it retrieved so it isn't logged
                # a second time when the task is collected.
                future.exception()
            raise
        finally:
            future.remove_done_callback(_stop_loop_of)
        if not future.done():
            raise RuntimeError("Event loop stopped before Future completed.")
        return future.result()

    def close(self) -> None:
        """Close the loop: drop pending callbacks, release fds, shut the executor down."""
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        if self.get_debug():
            logger.debug("Close %r", self)
        self._unix_close()
        self._net_close()
        self._close_native()
        bound = self.__dict__.get("call_soon")
        if type(bound) is type(self.is_closed) and bound.__self__ is self:
            del self.__dict__["call_soon"]
        executor = self._default_executor
        if executor is not None:
            self._default_executor = None
            executor.shutdown(wait=False)

    def __del__(self, _warn=warnings.warn, _finalizing=sys.is_finalizing) -> None:
        try:
            closed = self.is_closed()
        except Exception:
            return
        if not closed:
            _warn(f"unclosed event loop {self!r}", ResourceWarning, source=self)
            if not self.is_running():
                try:
                    self.close()
                except Exception:
                    # A loop left unclosed in the event loop policy (`set_event_loop(loop)`,
                    # never closed) dies while the interpreter tears its modules down, when
                    # the globals the Python half of close() uses may already be None. The
                    # process is exiting: release what is native and say nothing, as asyncio.
                    if not _finalizing():
                        raise
                    self._close_native()

    def set_debug(self, enabled) -> None:
        super().set_debug(enabled)
        if self.is_running():
            self.call_soon_threadsafe(self._set_coroutine_origin_tracking, bool(enabled))

    def _set_coroutine_origin_tracking(self, enabled: bool) -> None:
        if bool(enabled) == bool(self._coroutine_origin_tracking_enabled):
            return
        if enabled:
            self._coroutine_origin_tracking_saved_depth = sys.get_coroutine_origin_tracking_depth()
            sys.set_coroutine_origin_tracking_depth(coroutines._DEBUG_STACK_DEPTH if hasattr(coroutines, "_DEBUG_STACK_DEPTH") else 10)
        else:
            sys.set_coroutine_origin_tracking_depth(self._coroutine_origin_tracking_saved_depth)
        self._coroutine_origin_tracking_enabled = enabled

    if sys.version_info < (3, 11):

        def create_task(self, coro, *, name=None):
            """Schedule the coroutine as a Task (asyncio takes `context=` from 3.11 on)."""
            return _core_create_task(self, coro, name=name)

    # ---- file descriptor watchers -----------------------------------------------------------

    def add_reader(self, fd, callback, *args) -> None:
        """Call callback(*args) whenever fd is readable (level-triggered)."""
        self._ensure_fd_no_transport(fd)
        self._add_reader(fd, callback, *args)

    def remove_reader(self, fd) -> bool:
        self._ensure_fd_no_transport(fd)
        return self._remove_reader(fd)

    def add_writer(self, fd, callback, *args) -> None:
        """Call callback(*args) whenever fd is writable (level-triggered)."""
        self._ensure_fd_no_transport(fd)
        self._add_writer(fd, callback, *args)

    def remove_writer(self, fd) -> bool:
        self._ensure_fd_no_transport(fd)
        return self._remove_writer(fd)

    # ---- executors --------------------------------------------------------------------------

    def run_in_executor(self, executor, func, *args):
        self._check_closed()
        if self.get_debug():
            self._check_callback(func, "run_in_executor")
        if executor is None:
            executor = self._default_executor
            if self._executor_shutdown_called:
                raise RuntimeError("Executor shutdown has been called")
            if executor is None:
                executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="asyncio")
                self._default_executor = executor
        return futures.wrap_future(executor.submit(func, *args), loop=self)

    def set_default_executor(self, executor) -> None:
        if not isinstance(executor, concurrent.futures.ThreadPoolExecutor):
            if sys.version_info >= (3, 11):
                raise TypeError("executor must be ThreadPoolExecutor instance")
            # Before 3.11 asyncio only deprecated it (with the message 3.8 wrote).
            warnings.warn(
                "Using the default executor that is not an instance of "
                "ThreadPoolExecutor is deprecated and will be prohibited "
                "in Python 3.9",
                DeprecationWarning,
                2,
            )
        self._default_executor = executor

    @since(timeout=(3, 12))
    async def shutdown_default_executor(self, timeout=None) -> None:
        """Shut the default executor down, waiting for its jobs (at most `timeout` seconds)."""
        self._executor_shutdown_called = True
        if self._default_executor is None:
            return
        future = self.create_future()
        thread = threading.Thread(target=self._shutdown_executor_in_thread, args=(future,))
        thread.start()
        try:
            if timeout is None:
                await future
            else:
                await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            warnings.warn(
                "The executor did not finishing joining its threads within "
                f"{timeout} seconds.",
                RuntimeWarning,
                stacklevel=2,
            )
            self._default_executor.shutdown(wait=False)
        else:
            thread.join()

    def _shutdown_executor_in_thread(self, future) -> None:
        try:
            self._default_executor.shutdown(wait=True)
            if not self.is_closed():
                self.call_soon_threadsafe(futures._set_result_unless_cancelled, future, None)
        except Exception as ex:
            if not self.is_closed() and not future.cancelled():
                self.call_soon_threadsafe(future.set_exception, ex)

    # ---- async generators -------------------------------------------------------------------

    def _asyncgen_finalizer_hook(self, agen) -> None:
        self._asyncgens.discard(agen)
        if not self.is_closed():
            self.call_soon_threadsafe(self.create_task, agen.aclose())

    def _asyncgen_firstiter_hook(self, agen) -> None:
        if self._asyncgens_shutdown_called:
            warnings.warn(
                f"asynchronous generator {agen!r} was scheduled after "
                f"loop.shutdown_asyncgens() call",
                ResourceWarning,
                source=self,
            )
        self._asyncgens.add(agen)

    async def shutdown_asyncgens(self) -> None:
        """Shut down all active asynchronous generators."""
        self._asyncgens_shutdown_called = True
        if not len(self._asyncgens):
            return
        closing = list(self._asyncgens)
        self._asyncgens.clear()
        results = await asyncio.gather(*[ag.aclose() for ag in closing], return_exceptions=True)
        for result, agen in zip(results, closing):
            if isinstance(result, Exception):
                self.call_exception_handler(
                    {
                        "message": f"an error occurred during closing of "
                        f"asynchronous generator {agen!r}",
                        "exception": result,
                        "asyncgen": agen,
                    }
                )

    # ---- errors -----------------------------------------------------------------------------

    def get_exception_handler(self):
        return self._exception_handler

    def set_exception_handler(self, handler) -> None:
        if handler is not None and not callable(handler):
            raise TypeError(f"A callable object or None is expected, got {handler!r}")
        self._exception_handler = handler

    def default_exception_handler(self, context) -> None:
        """Log the error described by `context` to the 'asyncio' logger, as asyncio does."""
        message = context.get("message") or "Unhandled exception in event loop"
        exception = context.get("exception")
        exc_info = (type(exception), exception, exception.__traceback__) if exception is not None else False
        current = self._current_handle
        if "source_traceback" not in context and current is not None and current._source_traceback:
            context["handle_traceback"] = current._source_traceback
        lines = [message]
        for key in sorted(context):
            if key in {"message", "exception"}:
                continue
            value = context[key]
            if key in ("source_traceback", "handle_traceback"):
                what = "Object" if key == "source_traceback" else "Handle"
                value = f"{what} created at (most recent call last):\n" + "".join(
                    traceback.format_list(value)
                ).rstrip()
            else:
                value = repr(value)
            lines.append(f"{key}: {value}")
        logger.error("\n".join(lines), exc_info=exc_info)

    @staticmethod
    def _handler_context(context):
        # 3.12+: a custom handler runs in the context of the task, future or handle that
        # failed, so it sees the context variables the failing code saw.
        for key in ("task", "future", "handle"):
            thing = context.get(key)
            if thing is not None:
                get_context = getattr(thing, "get_context", None)
                ctx = get_context() if get_context is not None else None
                return ctx if hasattr(ctx, "run") else None
        return None

    def call_exception_handler(self, context) -> None:
        """Pass `context` to the installed exception handler, or to the default one."""
        if self._exception_handler is None:
            try:
                self.default_exception_handler(context)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException:
                logger.error("Exception in default exception handler", exc_info=True)
            return
        try:
            ctx = self._handler_context(context) if sys.version_info >= (3, 12) else None
            if ctx is not None:
                ctx.run(self._exception_handler, self, context)
            else:
                self._exception_handler(self, context)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            try:
                self.default_exception_handler(
                    {
                        "message": "Unhandled error in exception handler",
                        "exception": exc,
                        "context": context,
                    }
                )
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException:
                logger.error(
                    "Exception in default exception handler while handling an unexpected "
                    "error in custom exception handler",
                    exc_info=True,
                )
