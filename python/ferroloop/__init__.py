"""ferroloop: the asyncio event loop, written in Rust.

    import ferroloop
    ferroloop.run(main())                      # like asyncio.run, on ferroloop
    asyncio.run(main(), loop_factory=ferroloop.new_event_loop)   # Python 3.12+
    ferroloop.install()                        # make ferroloop the default loop
"""

from __future__ import annotations

import asyncio as _asyncio
import sys as _sys
import threading as _threading
from typing import Any as _Any, Coroutine as _Coroutine, Optional as _Optional, TypeVar as _TypeVar

from ._ferroloop import Handle, TimerHandle, __version__
from ._loop import Loop

__all__ = ["Loop", "Handle", "TimerHandle", "EventLoopPolicy", "new_event_loop", "install", "run", "__version__"]


def new_event_loop() -> Loop:
    """Return a new ferroloop event loop."""
    return Loop()


_BasePolicy = getattr(_asyncio.events, "BaseDefaultEventLoopPolicy", None) or getattr(
    _asyncio.events, "_BaseDefaultEventLoopPolicy"
)


# asyncio's Unix default policy, for its child watcher API (Python 3.9-3.13; 3.14 removed it).
_UnixWatcherPolicy: _Any = None
if _sys.platform != "win32" and hasattr(_asyncio, "AbstractChildWatcher"):
    from asyncio import unix_events as _unix_events

    _UnixWatcherPolicy = getattr(_unix_events, "_UnixDefaultEventLoopPolicy", None)


class EventLoopPolicy(_BasePolicy):
    """An asyncio event loop policy whose loops are ferroloop loops."""

    def _loop_factory(self) -> Loop:
        return new_event_loop()

    if _UnixWatcherPolicy is not None:
        # The child watcher API of asyncio's default Unix policy. ferroloop's loops watch their
        # children with pidfds and never ask for a watcher, but asyncio's own loops do each
        # time they start a subprocess: an asyncio.SelectorEventLoop() made while this policy
        # is installed (uvicorn --loop asyncio, a test harness) raised a bare
        # NotImplementedError instead. The watcher lives in a private asyncio policy that
        # shares this policy's per-thread loop, so it is made and attached as asyncio does.

        def _watcher_policy(self) -> _Any:
            watchers = self.__dict__.get("_watchers")
            if watchers is None:
                watchers = _UnixWatcherPolicy()
                watchers._local = self._local
                self._watchers = watchers
            return watchers

        def get_child_watcher(self) -> _Any:
            return self._watcher_policy().get_child_watcher()

        def set_child_watcher(self, watcher: _Any) -> None:
            self._watcher_policy().set_child_watcher(watcher)

        def set_event_loop(self, loop: _Any) -> None:
            super().set_event_loop(loop)
            watchers = self.__dict__.get("_watchers")
            watcher = None if watchers is None else watchers._watcher
            if watcher is not None and _threading.current_thread() is _threading.main_thread():
                watcher.attach_loop(loop)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


def install() -> None:
    """Make ferroloop the loop `asyncio.run()` and `asyncio.new_event_loop()` create."""
    _asyncio.set_event_loop_policy(EventLoopPolicy())


_T = _TypeVar("_T")


def run(main: _Coroutine[_Any, _Any, _T], *, debug: _Optional[bool] = None) -> _T:
    """Run the coroutine `main` on a new ferroloop loop and return its result (asyncio.run's semantics)."""
    if _sys.version_info >= (3, 12):
        return _asyncio.run(main, debug=debug, loop_factory=new_event_loop)
    if _sys.version_info >= (3, 11):
        # asyncio.run's own check, before a loop is made: without it, Runner's shutdown of the
        # loop it made fails instead, with a RuntimeError that names the wrong problem.
        if _asyncio.events._get_running_loop() is not None:
            raise RuntimeError("asyncio.run() cannot be called from a running event loop")
        with _asyncio.Runner(debug=debug, loop_factory=new_event_loop) as runner:
            return runner.run(main)
    from ._runner import run_legacy

    return run_legacy(main, debug=debug)
