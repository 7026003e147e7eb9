"""Harness adaptations of CPython's test helpers, applied by _worker.py.

Each one is a place where CPython's test code builds *CPython's* loop (or
pokes a private attribute of it) as plumbing, not as the thing under test.
They swap in the loop under test while keeping the test's assertions
unchanged.  Every adaptation is listed in README.md; keep them few.
"""

_MISSING = object()


def install_global(make_loop):
    from test.test_asyncio import utils as test_utils

    orig_close_loop = test_utils.TestCase.close_loop

    # test_utils.TestCase.close_loop() (called by every test's cleanup) reads
    # loop._default_executor, a private attribute of BaseEventLoop.  For a loop
    # without it, do the same thing through the public API.
    def close_loop(loop):
        if getattr(loop, "_default_executor", _MISSING) is not _MISSING:
            return orig_close_loop(loop)
        if not loop.is_closed():
            loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
        # the rest of the original (waiting for ThreadedChildWatcher threads)
        fake = _NoExecutor(loop)
        orig_close_loop(fake)

    test_utils.TestCase.close_loop = staticmethod(close_loop)


class _NoExecutor:
    """Lets the tail of CPython's close_loop run on an already closed loop."""

    _default_executor = None

    def __init__(self, loop):
        self._loop = loop

    def is_closed(self):
        return True

    def close(self):
        pass


def _pep492(mod, make_loop):
    # BaseTest.setUp builds asyncio.BaseEventLoop() with a mocked _selector and
    # _process_events: a minimal CPython loop used only as "a loop" for the
    # lock/stream/coroutine tests.  Give it the loop under test instead.
    from test.test_asyncio import utils as test_utils

    def setUp(self):
        test_utils.TestCase.setUp(self)
        self.loop = make_loop()
        self.set_event_loop(self.loop)

    mod.BaseTest.setUp = setUp
    return ["BaseTest.setUp"]


def _runners(mod, make_loop):
    # BaseTest.new_loop builds asyncio.BaseEventLoop() with mocked _selector,
    # _process_events and _write_to_self, and replaces shutdown_asyncgens with a
    # stub that sets loop.shutdown_ag_run (checked in tearDown).  Use the loop
    # under test; keep the flag, but let the real shutdown_asyncgens run.
    def new_loop(self):
        loop = make_loop()
        loop.shutdown_ag_run = False
        real = loop.shutdown_asyncgens

        async def shutdown_asyncgens():
            loop.shutdown_ag_run = True
            await real()

        loop.shutdown_asyncgens = shutdown_asyncgens
        return loop

    mod.BaseTest.new_loop = new_loop
    return ["BaseTest.new_loop"]


def _base_events(mod, make_loop):
    # BaseEventLoopTests.setUp builds asyncio.base_events.BaseEventLoop() (a
    # loop with no I/O: mocked _selector) to test the loop's generic
    # behaviour (call_soon/call_later, run_until_complete, exception handler,
    # task factory, debug, asyncgen finalisation...).  Run those on the loop
    # under test; tests that inspect BaseEventLoop's private state are in
    # exclusions.txt.
    from test.test_asyncio import utils as test_utils

    def setUp(self):
        test_utils.TestCase.setUp(self)
        self.loop = make_loop()
        self.set_event_loop(self.loop)

    mod.BaseEventLoopTests.setUp = setUp
    return ["BaseEventLoopTests.setUp"]


MODULE_ADAPTERS = {
    "test_base_events": _base_events,
    "test_pep492": _pep492,
    "test_runners": _runners,
}


def apply(modname, mod, make_loop):
    fn = MODULE_ADAPTERS.get(modname)
    if fn is None:
        return []
    return fn(mod, make_loop)
