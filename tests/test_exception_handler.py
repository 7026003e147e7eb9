"""set/get_exception_handler, default_exception_handler, call_exception_handler."""

import asyncio
import gc
import logging

import pytest

from conftest import run_once


def asyncio_records(caplog, level=logging.ERROR):
    return [r for r in caplog.records if r.name == "asyncio" and r.levelno >= level]


def test_get_exception_handler_defaults_to_none(loop):
    assert loop.get_exception_handler() is None


def test_set_exception_handler_round_trips_and_none_resets(loop):
    def handler(lp, ctx):
        pass

    loop.set_exception_handler(handler)
    assert loop.get_exception_handler() is handler
    loop.set_exception_handler(None)
    assert loop.get_exception_handler() is None


@pytest.mark.parametrize("bad", [1, "handler", object()])
def test_set_exception_handler_rejects_non_callable(loop, bad):
    with pytest.raises(TypeError):
        loop.set_exception_handler(bad)
    assert loop.get_exception_handler() is None


def test_call_exception_handler_invokes_custom_handler_with_loop_and_context(loop):
    calls = []
    loop.set_exception_handler(lambda lp, ctx: calls.append((lp, ctx)))
    ctx = {"message": "custom message", "exception": ValueError("v")}
    loop.call_exception_handler(ctx)
    assert len(calls) == 1
    assert calls[0][0] is loop
    assert calls[0][1]["message"] == "custom message"
    assert calls[0][1]["exception"] is ctx["exception"]


def test_call_exception_handler_accepts_bound_methods_and_callables(loop):
    class Collector:
        def __init__(self):
            self.seen = []

        def __call__(self, lp, ctx):
            self.seen.append(ctx["message"])

        def method(self, lp, ctx):
            self.seen.append("method:" + ctx["message"])

    c = Collector()
    loop.set_exception_handler(c)
    loop.call_exception_handler({"message": "a"})
    loop.set_exception_handler(c.method)
    loop.call_exception_handler({"message": "b"})
    assert c.seen == ["a", "method:b"]


def test_default_exception_handler_logs_message_and_exception(loop, caplog):
    exc = ValueError("the exception")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.default_exception_handler({"message": "boom message", "exception": exc})
    records = asyncio_records(caplog)
    assert len(records) == 1
    rec = records[0]
    assert rec.levelno == logging.ERROR
    assert "boom message" in rec.getMessage()
    assert rec.exc_info is not None
    assert rec.exc_info[1] is exc


def test_default_exception_handler_logs_extra_context_keys(loop, caplog):
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.default_exception_handler({"message": "with extras", "custom_key": "custom-value"})
    records = asyncio_records(caplog)
    assert len(records) == 1
    msg = records[0].getMessage()
    assert "with extras" in msg
    assert "custom_key" in msg and "custom-value" in msg
    assert not records[0].exc_info


def test_default_exception_handler_without_message_uses_fallback(loop, caplog):
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.default_exception_handler({"exception": KeyError("k")})
    records = asyncio_records(caplog)
    assert len(records) == 1
    assert "Unhandled exception in event loop" in records[0].getMessage()


def test_call_exception_handler_without_custom_handler_logs_via_default(loop, caplog):
    exc = RuntimeError("logged")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.call_exception_handler({"message": "via default", "exception": exc})
    records = asyncio_records(caplog)
    assert len(records) == 1
    assert "via default" in records[0].getMessage()
    assert records[0].exc_info[1] is exc


def test_custom_handler_can_delegate_to_default_exception_handler(loop, caplog):
    loop.set_exception_handler(lambda lp, ctx: lp.default_exception_handler(ctx))
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.call_exception_handler({"message": "delegated"})
    records = asyncio_records(caplog)
    assert len(records) == 1
    assert "delegated" in records[0].getMessage()


def test_exception_handler_that_raises_logs_unhandled_error(loop, caplog):
    def bad_handler(lp, ctx):
        raise ZeroDivisionError("handler broke")

    loop.set_exception_handler(bad_handler)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.call_exception_handler({"message": "original"})
    records = asyncio_records(caplog)
    assert len(records) == 1
    assert "Unhandled error in exception handler" in records[0].getMessage()
    assert isinstance(records[0].exc_info[1], ZeroDivisionError)


def test_exception_handler_that_raises_from_callback_error_does_not_stop_loop(loop, caplog):
    def bad_handler(lp, ctx):
        raise ZeroDivisionError("handler broke")

    loop.set_exception_handler(bad_handler)
    calls = []

    def failing():
        raise ValueError("callback failed")

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.call_soon(failing)
        loop.call_soon(calls.append, "after")
        run_once(loop)
    assert calls == ["after"]
    assert any("Unhandled error in exception handler" in r.getMessage()
               for r in asyncio_records(caplog))


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_from_exception_handler_propagates(loop, exc_type):
    def handler(lp, ctx):
        raise exc_type()

    loop.set_exception_handler(handler)
    with pytest.raises(exc_type):
        loop.call_exception_handler({"message": "m"})


def test_never_retrieved_task_exception_is_reported_when_task_is_collected(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    async def failing():
        raise LookupError("never retrieved")

    task = loop.create_task(failing())
    run_once(loop)
    assert task.done()
    assert contexts == []
    del task
    gc.collect()
    assert len(contexts) == 1
    ctx = contexts[0]
    assert ctx["message"] == "Task exception was never retrieved"
    assert isinstance(ctx["exception"], LookupError)
    assert "future" in ctx


def test_retrieved_task_exception_is_not_reported(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    async def failing():
        raise LookupError("retrieved")

    task = loop.create_task(failing())
    run_once(loop)
    assert isinstance(task.exception(), LookupError)
    del task
    gc.collect()
    assert contexts == []


def test_never_retrieved_future_exception_is_reported_when_collected(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    fut = loop.create_future()
    fut.set_exception(OSError("future error"))
    del fut
    gc.collect()
    assert len(contexts) == 1
    assert contexts[0]["message"] == "Future exception was never retrieved"
    assert isinstance(contexts[0]["exception"], OSError)


def test_debug_mode_handler_called_from_callback_gets_handle_traceback(loop, caplog):
    loop.set_debug(True)

    def report_from_callback():
        loop.call_exception_handler({"message": "reported from a callback"})

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.call_soon(report_from_callback)
        run_once(loop)
    records = asyncio_records(caplog)
    assert len(records) == 1
    msg = records[0].getMessage()
    assert "reported from a callback" in msg
    assert "handle_traceback" in msg and "Handle created at" in msg


@pytest.mark.parametrize("debug", [False, True])
def test_error_in_protocol_callback_names_the_transport_method_as_asyncio_does(loop, debug):
    # asyncio schedules a transport's bound method (transport._call_connection_lost, exc);
    # ferroloop schedules its class's function with the transport as first argument, and the
    # message must still read "Exception in callback <Transport>._call_connection_lost(None)"
    # (arguments shown before 3.13 and in debug mode), not "...(<Transport ...>, None)".
    import re
    import socket
    import sys

    loop.set_debug(debug)
    messages = []
    loop.set_exception_handler(lambda lp, ctx: messages.append(ctx["message"]))

    class LostRaises(asyncio.Protocol):
        def connection_lost(self, exc):
            raise ValueError("from connection_lost")

    a, b = socket.socketpair()
    try:

        async def main():
            tr, _ = await loop.connect_accepted_socket(LostRaises, a)
            tr.close()
            await asyncio.sleep(0.01)

        loop.run_until_complete(main())
    finally:
        b.close()
    assert len(messages) == 1, messages
    args = "None" if debug or sys.version_info < (3, 13) else ""
    assert re.fullmatch(
        r"Exception in callback \w+\._call_connection_lost\(" + args + r"\)", messages[0]
    ), messages[0]
