"""Shared fixtures: every behaviour test runs on CPython's loop and on ferroloop.

CPython's own ``asyncio.SelectorEventLoop`` is the reference: every assertion
in this suite must hold on it.  When ``ferroloop`` cannot be imported (e.g.
while the extension is not built yet) the ``ferroloop`` parameter is skipped
with the import error as reason, so the suite still runs on CPython.
"""

import asyncio
import gc
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest

try:
    import ferroloop
except ImportError as exc:  # not built / not installed yet
    ferroloop = None
    FERROLOOP_IMPORT_ERROR: Optional[BaseException] = exc
else:
    FERROLOOP_IMPORT_ERROR = None


@dataclass(frozen=True)
class LoopImpl:
    """One event loop implementation under test."""

    name: str
    new_event_loop: Callable[[], asyncio.AbstractEventLoop]
    # ``asyncio.run``-like entry point: run(main, *, debug=None)
    run: Callable[..., Any]
    loop_class: type
    policy_class: type


def _impl(name: str) -> LoopImpl:
    if name == "asyncio":
        return LoopImpl(
            name="asyncio",
            new_event_loop=asyncio.SelectorEventLoop,
            run=asyncio.run,
            loop_class=asyncio.SelectorEventLoop,
            policy_class=asyncio.DefaultEventLoopPolicy,
        )
    assert name == "ferroloop"
    if ferroloop is None:  # pragma: no cover - guarded by the skip mark
        pytest.skip(f"ferroloop is not importable: {FERROLOOP_IMPORT_ERROR!r}")
    return LoopImpl(
        name="ferroloop",
        new_event_loop=ferroloop.new_event_loop,
        run=ferroloop.run,
        loop_class=ferroloop.Loop,
        policy_class=ferroloop.EventLoopPolicy,
    )


LOOP_PARAMS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(
        "ferroloop",
        id="ferroloop",
        marks=pytest.mark.skipif(
            ferroloop is None,
            reason=f"ferroloop is not importable: {FERROLOOP_IMPORT_ERROR!r}",
        ),
    ),
]


def fd_count() -> int:
    """Number of open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def _settled_fd_count() -> int:
    # Objects from earlier tests (sockets, loops) may be waiting in a
    # reference cycle; collect them so their fds do not skew the count.
    gc.collect()
    return fd_count()


_warmed_up = set()


def _warm_up(impl: LoopImpl) -> None:
    """Create, run and close one loop of ``impl`` once per session.

    An implementation may lazily create process-wide resources (a runtime,
    a global wakeup fd, ...) the first time a loop is used.  That is not a
    per-loop leak, so do it before any fd accounting starts.
    """
    if impl.name in _warmed_up:
        return
    _warmed_up.add(impl.name)
    loop = impl.new_event_loop()
    try:
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        loop.close()


def _take_leaked_running_loop():
    """Return the running loop left set by a broken test and unset it.

    Unsetting it keeps one broken test from failing every later test with
    'Cannot run the event loop while another loop is running'.
    """
    running = asyncio.events._get_running_loop()
    if running is not None:
        asyncio.events._set_running_loop(None)
    return running


def _close_loops(loops) -> list:
    problems = []
    leaked = _take_leaked_running_loop()
    if leaked is not None:
        problems.append(f"a running loop leaked out of the test: {leaked!r}")
    for lp in loops:
        if lp.is_closed():
            continue
        try:
            lp.close()
        except Exception as e:  # e.g. a loop left marked as running
            problems.append(f"could not close {lp!r} after the test: {e!r}")
    return problems


def _assert_no_fd_leak(before: int, what: str) -> None:
    after = _settled_fd_count()
    assert after <= before, (
        f"{what} leaked file descriptors: {before} open before creating the "
        f"loop, {after} after closing it"
    )


def run_once(loop):
    """Run exactly one more loop iteration (CPython's stop() semantics)."""
    loop.call_soon(loop.stop)
    loop.run_forever()


def run_for(loop, seconds):
    """Run the loop for `seconds` (until a timer stops it)."""
    loop.call_later(seconds, loop.stop)
    loop.run_forever()


def run_python_c(script, *args):
    """`python -c script *args` in a fresh interpreter (for behaviour at interpreter exit)."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60
    )


def proc_stat(path: str) -> list:
    """The fields of a `/proc/.../stat` file after the command name: [state, ppid, ...].

    The name is in parentheses and may hold spaces and parentheses itself, so the fields start
    after the last ')'. Raises OSError when the process or thread is gone.
    """
    with open(path) as f:
        return f.read().rsplit(")", 1)[1].split()


def _main_thread_sleeps_in_poll(tid: int) -> bool:
    """Whether thread `tid` of this process is blocked in epoll_wait (a loop sleeping in its poll)."""
    try:
        state = proc_stat(f"/proc/self/task/{tid}/stat")[0]
        with open(f"/proc/self/task/{tid}/wchan") as f:
            wchan = f.read().strip()
    except OSError:
        return False
    # A kernel that hides wait channels shows "0": then a sleeping thread is taken as idle.
    return state == "S" and wchan in ("do_epoll_wait", "ep_poll", "0")


def kill_self_when_idle(signum, delay, timeout=10.0):
    """Send `signum` to this process once this (the loop's) thread sleeps in its poll.

    The signal goes `delay` seconds after the call at the earliest, and only when this thread
    is blocked in epoll_wait (at most `timeout` seconds later), so it always reaches a loop
    that is idle. A plain timer started here may fire before the loop even runs: under load
    the calling thread may not be back from Thread.start() `delay` seconds later, and a SIGINT
    raised there, outside the test's pytest.raises, interrupts the whole session (seen on 3.9).
    Returns the thread, to be joined.
    """
    import threading
    import time

    tid = threading.get_native_id()

    def kill():
        time.sleep(delay)
        deadline = time.monotonic() + timeout
        while not _main_thread_sleeps_in_poll(tid) and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(os.getpid(), signum)

    t = threading.Thread(target=kill)
    t.start()
    return t


@pytest.fixture(params=LOOP_PARAMS)
def loop_impl(request) -> LoopImpl:
    """The implementation under test (``asyncio`` or ``ferroloop``)."""
    impl = _impl(request.param)
    _warm_up(impl)
    return impl


@pytest.fixture
def loop(loop_impl):
    """A fresh event loop; closed after the test, checking no fd leaked.

    The fd count is taken right before creating the loop and right after
    closing it, so only the loop's own descriptors are accounted for
    (resources a test opens itself must be closed by the test or by a
    fixture, which ResourceWarning-as-error enforces anyway).
    """
    before = _settled_fd_count()
    lp = loop_impl.new_event_loop()
    try:
        yield lp
    finally:
        problems = _close_loops([lp])
        del lp
        assert not problems, "; ".join(problems)
        _assert_no_fd_leak(before, f"{loop_impl.name} loop")


@pytest.fixture
def loop_factory(loop_impl):
    """The loop factory of the implementation under test.

    Every loop it creates is closed after the test (if the test did not
    close it) and the test as a whole must not leak fds.
    """
    created = []

    def factory():
        lp = loop_impl.new_event_loop()
        created.append(lp)
        return lp

    before = _settled_fd_count()
    try:
        yield factory
    finally:
        problems = _close_loops(created)
        created.clear()
        assert not problems, "; ".join(problems)
        _assert_no_fd_leak(before, f"{loop_impl.name} loops")


@pytest.fixture
def sockpair():
    """A connected, non-blocking pair of stream sockets, closed afterwards."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def restore_asyncgen_hooks():
    """Restore the thread's async generator hooks after the test."""
    hooks = sys.get_asyncgen_hooks()
    try:
        yield
    finally:
        sys.set_asyncgen_hooks(firstiter=hooks.firstiter, finalizer=hooks.finalizer)


# asyncio behaviour that first appeared in CPython 3.11 (Task context=, asyncio.Runner,
# sock_recvfrom, TypeError from set_default_executor ...): the reference loop of older
# Pythons behaves differently, so these differential tests only run from 3.11 on.
requires_py311 = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="asyncio behaviour introduced in Python 3.11"
)
