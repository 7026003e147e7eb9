"""Cold-path helpers called from the native core: message formatting and logging.

Nothing here runs per callback in normal operation; it runs when something goes wrong
(an exception in a callback), in debug mode, or for a repr.
"""

from __future__ import annotations

import inspect
import logging
import reprlib
import sys
import traceback

logger = logging.getLogger("asyncio")

try:  # the stdlib's own formatter, so reprs and messages read exactly like asyncio's
    from asyncio import format_helpers as _fh
except ImportError:  # pragma: no cover - every supported Python has it
    _fh = None


try:  # 3.13+ shows a callback's arguments only in debug mode (they may hold secrets)
    _FORMAT_TAKES_DEBUG = _fh is not None and "debug" in inspect.signature(
        _fh._format_callback_source
    ).parameters
except (TypeError, ValueError):  # pragma: no cover - a signature that cannot be read
    _FORMAT_TAKES_DEBUG = False


def _rebind_own_method(func, args):
    """`(method, rest)` when `func` is a ferroloop transport's own method scheduled as
    `call_soon(Class.method, transport, *rest)` (no bound method is made per call); asyncio
    schedules the bound method, and its messages name it so: `Class.method(*rest)`."""
    if args:
        obj = args[0]
        cls = type(obj)
        if cls.__module__.startswith("ferroloop.") and getattr(
            cls, getattr(func, "__name__", ""), None
        ) is func:
            try:
                return func.__get__(obj, cls), tuple(args)[1:]
            except Exception:  # pragma: no cover - every function and descriptor binds
                pass
    return func, args


def format_callback_source(func, args, debug=False) -> str:
    """asyncio's `_format_callback_source`; `debug` is the loop's debug mode, which 3.13+ pass."""
    func, args = _rebind_own_method(func, args)
    if _fh is not None:
        try:
            if _FORMAT_TAKES_DEBUG:
                return _fh._format_callback_source(func, args, debug=debug)
            return _fh._format_callback_source(func, args)
        except Exception:
            pass
    if _FORMAT_TAKES_DEBUG and not debug:
        args = ()
    try:
        r = reprlib.repr(func)
    except Exception:
        r = object.__repr__(func)
    return f"{getattr(func, '__qualname__', r)}{tuple(args)!r}"


def format_created_at(tb) -> str:
    if tb:
        frame = tb[-1]
        return f"created at {frame[0]}:{frame[1]}"
    return ""


def extract_stack():
    """A short traceback of the caller of the loop method (debug mode's `_source_traceback`)."""
    # frame 0: this function; frame 1: the native method's caller.
    f = sys._getframe(1)
    if _fh is not None:
        return _fh.extract_stack(f)
    stack = traceback.StackSummary.extract(traceback.walk_stack(f), limit=10, lookup_lines=False)
    stack.reverse()
    return stack


def format_handle(handle) -> str:
    cb = getattr(handle, "_callback", None)
    owner = getattr(cb, "__self__", None)
    import asyncio

    if isinstance(owner, asyncio.Task):
        return repr(owner)
    return str(handle)


def warn_slow_callback(handle, dt: float) -> None:
    logger.warning("Executing %s took %.3f seconds", format_handle(handle), dt)
