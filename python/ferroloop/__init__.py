"""ferroloop: the asyncio event loop, written in Rust.

    import ferroloop
    ferroloop.run(main())                      # like asyncio.run, on ferroloop
    asyncio.run(main(), loop_factory=ferroloop.new_event_loop)   # Python 3.12+
    ferroloop.install()                        # make ferroloop the default loop
"""

from __future__ import annotations

import asyncio as _asyncio
import sys as _sys
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


class EventLoopPolicy(_BasePolicy):
    """An asyncio event loop policy whose loops are ferroloop loops."""

    def _loop_factory(self) -> Loop:
        return new_event_loop()

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
        with _asyncio.Runner(debug=debug, loop_factory=new_event_loop) as runner:
            return runner.run(main)
    from ._runner import run_legacy

    return run_legacy(main, debug=debug)
