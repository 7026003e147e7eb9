"""The process side of the loop: signal handlers, pipe transports, subprocesses, fork.

Every test runs on CPython's loop and on ferroloop (the ``loop`` fixture, which also checks
that the loop leaks no fd).  Peers are independent: raw fds and blocking reads in threads for
pipes, real child processes for subprocesses.  Every wait has a timeout and every child is
reaped (``os.waitpid(pid, WNOHANG)`` raising ChildProcessError proves no zombie is left).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import pytest

from conftest import kill_self_when_idle, requires_py311

TIMEOUT = 10
PY = sys.executable


def run(loop, coro, timeout=TIMEOUT):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


def run_until(loop, predicate, timeout=TIMEOUT):
    async def wait():
        while not predicate():
            await asyncio.sleep(0.005)

    run(loop, wait(), timeout)


def assert_reaped(pid):
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@pytest.fixture(autouse=True)
def _restore_signals():
    """Whatever a test does, leave SIGUSR1/SIGUSR2/SIGINT handlers and the wakeup fd as found."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    signal.set_wakeup_fd(wakeup)


# ---- signals ----------------------------------------------------------------------------


def test_signal_handler_runs_with_args_then_default_is_restored(loop):
    calls = []
    loop.add_signal_handler(signal.SIGUSR1, calls.append, "usr1")
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN)
    os.kill(os.getpid(), signal.SIGUSR1)
    run_until(loop, lambda: calls)
    assert calls == ["usr1"]
    assert loop.remove_signal_handler(signal.SIGUSR1) is True
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert loop.remove_signal_handler(signal.SIGUSR1) is False


def test_signal_handler_runs_as_a_callback_not_inside_the_signal(loop):
    # The handler is scheduled (call_soon semantics): it runs from the loop, so it may
    # stop the loop, and the same signal twice before a run gives two calls.
    order = []
    loop.add_signal_handler(signal.SIGUSR1, order.append, "handler")
    os.kill(os.getpid(), signal.SIGUSR1)
    order.append("after kill")
    run_until(loop, lambda: "handler" in order)
    assert order == ["after kill", "handler"]
    loop.remove_signal_handler(signal.SIGUSR1)


def test_signal_wakes_a_sleeping_loop_at_once(loop):
    caught = []

    def handler():
        caught.append(time.monotonic())
        loop.stop()

    loop.add_signal_handler(signal.SIGUSR2, handler)
    safety = loop.call_later(30, loop.stop)
    t = kill_self_when_idle(signal.SIGUSR2, 0.05)
    t0 = time.monotonic()
    try:
        loop.run_forever()
    finally:
        t.join()
        safety.cancel()
        loop.remove_signal_handler(signal.SIGUSR2)
    assert len(caught) == 1
    assert caught[0] - t0 < 2.0


def test_signal_from_another_process_wakes_the_loop(loop):
    fut = loop.create_future()
    loop.add_signal_handler(signal.SIGUSR1, lambda: fut.done() or fut.set_result("got it"))
    child = subprocess.Popen(
        [PY, "-c", f"import os, signal, time; time.sleep(0.05); os.kill({os.getpid()}, signal.SIGUSR1)"]
    )
    try:
        assert run(loop, fut) == "got it"
    finally:
        child.wait(TIMEOUT)
        loop.remove_signal_handler(signal.SIGUSR1)


def test_signal_handler_runs_in_the_context_of_registration(loop):
    var = contextvars.ContextVar("var", default="unset")
    seen = []
    var.set("at registration")
    loop.add_signal_handler(signal.SIGUSR1, lambda: seen.append(var.get()))
    var.set("later")
    os.kill(os.getpid(), signal.SIGUSR1)
    run_until(loop, lambda: seen)
    assert seen == ["at registration"]
    loop.remove_signal_handler(signal.SIGUSR1)


def test_signal_handler_error_goes_to_the_exception_handler(loop):
    errors = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))

    def handler():
        raise ZeroDivisionError

    loop.add_signal_handler(signal.SIGUSR1, handler)
    os.kill(os.getpid(), signal.SIGUSR1)
    run_until(loop, lambda: errors)
    assert isinstance(errors[0]["exception"], ZeroDivisionError)
    loop.remove_signal_handler(signal.SIGUSR1)


def test_replacing_a_signal_handler(loop):
    calls = []
    loop.add_signal_handler(signal.SIGUSR1, calls.append, 1)
    loop.add_signal_handler(signal.SIGUSR1, calls.append, 2)
    os.kill(os.getpid(), signal.SIGUSR1)
    run_until(loop, lambda: calls)
    assert calls == [2]
    assert loop.remove_signal_handler(signal.SIGUSR1)


def test_signal_handler_argument_errors(loop):
    def handler():
        pass

    async def coro_fn():
        pass

    with pytest.raises(TypeError):
        loop.add_signal_handler("boom", handler)
    with pytest.raises(TypeError):
        loop.remove_signal_handler("boom")
    for bad in (0, -1, signal.NSIG + 1):
        with pytest.raises(ValueError):
            loop.add_signal_handler(bad, handler)
        with pytest.raises(ValueError):
            loop.remove_signal_handler(bad)
    with pytest.raises(RuntimeError):
        loop.add_signal_handler(signal.SIGKILL, handler)
    with pytest.raises(RuntimeError):
        loop.add_signal_handler(signal.SIGSTOP, handler)
    assert loop.remove_signal_handler(signal.SIGKILL) is False
    with pytest.raises(TypeError):
        loop.add_signal_handler(signal.SIGUSR1, coro_fn)
    coro = coro_fn()
    try:
        with pytest.raises(TypeError):
            loop.add_signal_handler(signal.SIGUSR1, coro)
    finally:
        coro.close()
    # None of the failures left a handler installed.
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGKILL) is signal.SIG_DFL


def test_signal_handler_outside_the_main_thread_is_a_runtime_error(loop):
    errors = []

    def other():
        try:
            loop.add_signal_handler(signal.SIGUSR1, lambda: None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(TIMEOUT)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_add_signal_handler_on_a_closed_loop(loop_factory):
    lp = loop_factory()
    lp.close()
    with pytest.raises(RuntimeError):
        lp.add_signal_handler(signal.SIGUSR1, lambda: None)


def test_sigint_handler_removal_restores_default_int_handler(loop):
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    assert loop.remove_signal_handler(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_close_restores_handlers_and_the_wakeup_fd(loop_factory, loop_impl):
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        previous = signal.set_wakeup_fd(a.fileno())
        lp = loop_factory()
        lp.add_signal_handler(signal.SIGUSR1, lambda: None)
        lp.add_signal_handler(signal.SIGUSR2, lambda: None)
        lp.close()
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
        current = signal.set_wakeup_fd(previous)
        if loop_impl.name == "ferroloop":
            assert current == a.fileno()  # the wakeup fd set before the loop's
        else:
            assert current in (-1, a.fileno())  # asyncio sets none
    finally:
        a.close()
        b.close()


def test_signal_handler_and_runner_sigint(loop_impl):
    # A loop with a signal handler (so with its wakeup fd installed) still lets the
    # Runner's Ctrl+C cancel the main task and raise KeyboardInterrupt.
    async def main():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)
        try:
            await asyncio.sleep(30)
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)

    t = kill_self_when_idle(signal.SIGINT, 0.1)
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop_impl.run(main())
    finally:
        t.join()
    assert time.monotonic() - t0 < 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---- pipes ------------------------------------------------------------------------------


class ReadProto(asyncio.Protocol):
    def __init__(self, loop):
        self.events = []
        self.data = bytearray()
        self.done = loop.create_future()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def data_received(self, data):
        self.data += data

    def eof_received(self):
        self.events.append("eof")

    def connection_lost(self, exc):
        self.events.append(("lost", exc))
        self.done.set_result(exc)


class WriteProto(asyncio.BaseProtocol):
    def __init__(self, loop):
        self.events = []
        self.done = loop.create_future()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def pause_writing(self):
        self.events.append("pause")

    def resume_writing(self):
        self.events.append("resume")

    def connection_lost(self, exc):
        self.events.append(("lost", exc))
        self.done.set_result(exc)


@requires_py311
def test_read_pipe_data_eof_and_close(loop):
    rfd, wfd = os.pipe()
    pipe = io.open(rfd, "rb", 0)
    proto = ReadProto(loop)
    try:
        transport, p = run(loop, loop.connect_read_pipe(lambda: proto, pipe))
        assert p is proto and proto.transport is transport
        assert proto.events == ["made"]
        assert transport.get_extra_info("pipe") is pipe
        assert transport.is_reading()
        os.write(wfd, b"hello ")
        run_until(loop, lambda: len(proto.data) >= 6)
        os.write(wfd, b"world")
        run_until(loop, lambda: len(proto.data) >= 11)
    finally:
        os.close(wfd)
    assert run(loop, proto.done) is None
    assert bytes(proto.data) == b"hello world"
    assert proto.events == ["made", "eof", ("lost", None)]
    assert pipe.closed
    assert transport.is_closing()
    transport.close()  # idempotent, no second connection_lost
    loop.run_until_complete(asyncio.sleep(0.01))
    assert proto.events.count(("lost", None)) == 1


def test_read_pipe_close_by_us(loop):
    rfd, wfd = os.pipe()
    pipe = io.open(rfd, "rb", 0)
    proto = ReadProto(loop)
    try:
        transport, _ = run(loop, loop.connect_read_pipe(lambda: proto, pipe))
        transport.close()
        transport.close()
        assert transport.is_closing()
        assert run(loop, proto.done) is None
        assert proto.events == ["made", ("lost", None)]
        assert pipe.closed
    finally:
        os.close(wfd)


@requires_py311
def test_read_pipe_pause_and_resume_reading(loop):
    rfd, wfd = os.pipe()
    pipe = io.open(rfd, "rb", 0)
    proto = ReadProto(loop)
    try:
        transport, _ = run(loop, loop.connect_read_pipe(lambda: proto, pipe))
        transport.pause_reading()
        transport.pause_reading()
        assert not transport.is_reading()
        os.write(wfd, b"held")
        loop.run_until_complete(asyncio.sleep(0.05))
        assert proto.data == b""
        transport.resume_reading()
        transport.resume_reading()
        assert transport.is_reading()
        run_until(loop, lambda: proto.data == b"held")
        transport.close()
        run(loop, proto.done)
    finally:
        os.close(wfd)


def test_read_pipe_refuses_a_regular_file(loop):
    with tempfile.TemporaryFile() as f:
        with pytest.raises(ValueError):
            run(loop, loop.connect_read_pipe(asyncio.Protocol, f))
        with pytest.raises(ValueError):
            run(loop, loop.connect_write_pipe(asyncio.BaseProtocol, f))
        assert not f.closed  # not the transport's to close


def test_write_pipe_write_writelines_and_eof(loop):
    rfd, wfd = os.pipe()
    pipe = io.open(wfd, "wb", 0)
    proto = WriteProto(loop)
    try:
        transport, p = run(loop, loop.connect_write_pipe(lambda: proto, pipe))
        assert p is proto and proto.events == ["made"]
        assert transport.get_extra_info("pipe") is pipe
        assert transport.can_write_eof()
        transport.write(b"abc")
        transport.write(bytearray(b"def"))
        transport.write(memoryview(b"ghi"))
        transport.writelines([b"j", b"kl"])
        transport.write(b"")
        with pytest.raises((TypeError, AssertionError)):  # asyncio: an assert; ferroloop: TypeError
            transport.write("text")
        assert transport.get_write_buffer_size() == 0
        assert os.read(rfd, 100) == b"abcdefghijkl"
        transport.write_eof()
        assert transport.is_closing()
        assert run(loop, proto.done) is None
        assert proto.events == ["made", ("lost", None)]
        assert pipe.closed
        assert os.read(rfd, 100) == b""  # EOF: the write end is closed
        transport.write(b"dropped")  # after close: dropped silently, as asyncio does
        transport.close()
        loop.run_until_complete(asyncio.sleep(0.01))
        assert proto.events == ["made", ("lost", None)]
    finally:
        os.close(rfd)


def test_write_pipe_flow_control(loop):
    rfd, wfd = os.pipe()
    pipe = io.open(wfd, "wb", 0)
    proto = WriteProto(loop)
    chunks = []
    try:
        transport, _ = run(loop, loop.connect_write_pipe(lambda: proto, pipe))
        low, high = transport.get_write_buffer_limits()
        assert (low, high) == (16 * 1024, 64 * 1024)
        payload = os.urandom(1024 * 1024)
        transport.write(payload)  # the pipe holds ~64 KiB, the rest is buffered
        assert transport.get_write_buffer_size() > high
        assert proto.events == ["made", "pause"]

        def drain():
            total = 0
            while total < len(payload):
                chunk = os.read(rfd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)

        t = threading.Thread(target=drain)
        t.start()
        run_until(loop, lambda: transport.get_write_buffer_size() == 0)
        t.join(TIMEOUT)
        assert b"".join(chunks) == payload
        assert proto.events == ["made", "pause", "resume"]
        transport.set_write_buffer_limits(high=10)
        assert transport.get_write_buffer_limits() == (2, 10)
        with pytest.raises(ValueError):
            transport.set_write_buffer_limits(high=1, low=2)
        transport.close()
        run(loop, proto.done)
        assert pipe.closed
    finally:
        os.close(rfd)


def test_write_pipe_close_flushes_the_buffer_first(loop):
    rfd, wfd = os.pipe()
    pipe = io.open(wfd, "wb", 0)
    proto = WriteProto(loop)
    received = []
    try:
        transport, _ = run(loop, loop.connect_write_pipe(lambda: proto, pipe))
        payload = os.urandom(300 * 1024)
        transport.write(payload)
        transport.close()
        assert transport.is_closing()

        def drain():
            while True:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    return
                received.append(chunk)

        t = threading.Thread(target=drain)
        t.start()
        assert run(loop, proto.done) is None
        t.join(TIMEOUT)
        assert b"".join(received) == payload
        assert proto.events[-1] == ("lost", None)
    finally:
        os.close(rfd)


def test_write_pipe_abort_drops_the_buffer(loop):
    rfd, wfd = os.pipe()
    pipe = io.open(wfd, "wb", 0)
    proto = WriteProto(loop)
    try:
        transport, _ = run(loop, loop.connect_write_pipe(lambda: proto, pipe))
        transport.write(os.urandom(256 * 1024))
        assert transport.get_write_buffer_size() > 0
        transport.abort()
        assert transport.get_write_buffer_size() == 0
        assert run(loop, proto.done) is None
        assert pipe.closed
        loop.run_until_complete(asyncio.sleep(0.01))
        assert [e for e in proto.events if isinstance(e, tuple)] == [("lost", None)]
    finally:
        os.close(rfd)


def test_write_pipe_notices_the_reader_went_away(loop):
    rfd, wfd = os.pipe()
    pipe = io.open(wfd, "wb", 0)
    proto = WriteProto(loop)
    transport, _ = run(loop, loop.connect_write_pipe(lambda: proto, pipe))
    os.close(rfd)
    run(loop, proto.done)
    assert [e for e in proto.events if isinstance(e, tuple)] == [("lost", None)]
    assert pipe.closed
    transport.write(b"ignored")  # silently dropped


def test_write_pipe_over_a_socket(loop):
    rsock, wsock = socket.socketpair()
    pipe = io.open(wsock.detach(), "wb", 0)
    proto = WriteProto(loop)
    try:
        transport, _ = run(loop, loop.connect_write_pipe(lambda: proto, pipe))
        transport.write(b"over a socket")
        rsock.settimeout(TIMEOUT)
        assert rsock.recv(100) == b"over a socket"
        rsock.close()
        run(loop, proto.done)
        assert pipe.closed
    finally:
        rsock.close()


def test_pty_both_ways(loop):
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    write_slave = os.dup(slave)
    read_obj = io.open(slave, "rb", 0)
    write_obj = io.open(write_slave, "wb", 0)
    rproto = ReadProto(loop)
    wproto = WriteProto(loop)
    try:
        rt, _ = run(loop, loop.connect_read_pipe(lambda: rproto, read_obj))
        wt, _ = run(loop, loop.connect_write_pipe(lambda: wproto, write_obj))
        wt.write(b"to master")
        got = bytearray()

        def read_master():
            got.extend(os.read(master, 100))
            return len(got) >= 9

        run_until(loop, read_master)
        assert bytes(got) == b"to master"
        os.write(master, b"to slave")
        run_until(loop, lambda: len(rproto.data) >= 8)
        assert bytes(rproto.data) == b"to slave"
        rt.close()
        wt.close()
        run(loop, rproto.done)
        run(loop, wproto.done)
        assert read_obj.closed and write_obj.closed
    finally:
        os.close(master)


def test_pty_master_sees_eio_as_a_close(loop):
    master, slave = os.openpty()
    master_obj = io.open(master, "rb", 0)
    proto = ReadProto(loop)
    rt, _ = run(loop, loop.connect_read_pipe(lambda: proto, master_obj))
    os.write(slave, b"x")
    run_until(loop, lambda: proto.data)
    os.close(slave)  # reading the master now fails with EIO: routine, not logged
    exc = run(loop, proto.done)
    assert exc is None or (isinstance(exc, OSError) and exc.errno == 5)
    assert master_obj.closed
    assert rt.is_closing()


def test_pipe_fd_is_owned_by_its_transport(loop, loop_impl):
    rfd, wfd = os.pipe()
    pipe = io.open(rfd, "rb", 0)
    proto = ReadProto(loop)
    try:
        transport, _ = run(loop, loop.connect_read_pipe(lambda: proto, pipe))
        if loop_impl.name == "ferroloop":
            with pytest.raises(RuntimeError):
                loop.add_reader(rfd, lambda: None)
        transport.close()
        run(loop, proto.done)
    finally:
        os.close(wfd)


# ---- subprocesses -----------------------------------------------------------------------


class ProcProto(asyncio.SubprocessProtocol):
    def __init__(self, loop):
        self.events = []
        self.data = {1: bytearray(), 2: bytearray()}
        self.done = loop.create_future()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def pipe_data_received(self, fd, data):
        assert self.events[0] == "made"
        self.data[fd] += data
        if not self.events or self.events[-1] != ("data", fd):
            self.events.append(("data", fd))

    def pipe_connection_lost(self, fd, exc):
        self.events.append(("pipe_lost", fd, exc))

    def process_exited(self):
        self.events.append(("exited", self.transport.get_returncode()))

    def connection_lost(self, exc):
        self.events.append(("lost", exc))
        self.done.set_result(None)


def test_subprocess_exec_protocol_callback_order(loop):
    proto = None

    def factory():
        nonlocal proto
        proto = ProcProto(loop)
        return proto

    code = "import sys; sys.stdout.write('out'); sys.stderr.write('err'); sys.exit(3)"
    transport, p = run(loop, loop.subprocess_exec(factory, PY, "-c", code, stdin=subprocess.DEVNULL))
    assert p is proto
    pid = transport.get_pid()
    assert transport.get_extra_info("subprocess").pid == pid
    assert transport.get_pipe_transport(0) is None  # DEVNULL
    assert transport.get_pipe_transport(1) is not None
    assert transport.get_pipe_transport(2) is not None
    run(loop, proto.done)
    assert transport.get_returncode() == 3
    assert bytes(proto.data[1]) == b"out" and bytes(proto.data[2]) == b"err"
    assert proto.events[0] == "made"
    assert proto.events[-1] == ("lost", None)
    assert ("exited", 3) in proto.events
    assert {e[1] for e in proto.events if e[0] == "pipe_lost"} == {1, 2}
    for fd in (1, 2):
        assert proto.events.index(("data", fd)) < proto.events.index(("pipe_lost", fd, None))
    transport.close()
    assert transport.is_closing()
    assert_reaped(pid)
    with pytest.raises(ProcessLookupError):
        transport.send_signal(signal.SIGTERM)


def test_subprocess_shell_returncode(loop):
    async def main():
        proc = await asyncio.create_subprocess_shell("echo $((6*7)); exit 7", stdout=subprocess.PIPE)
        out, err = await proc.communicate()
        return proc, out, err

    proc, out, err = run(loop, main())
    assert (out, err, proc.returncode) == (b"42\n", None, 7)
    assert_reaped(proc.pid)


def test_process_wait_while_a_grandchild_holds_stdout_by_python_version(loop):
    # Before 3.11, Process.wait() returns when the child exits; from 3.11 it also waits for
    # the pipes to close (here: until the grandchild, which inherited stdout, is gone).
    # (On every version a wait() that starts after the exit was seen returns at once: the shell
    # here exits only once wait() is pending, when its stdin closes.)
    async def main():
        proc = await asyncio.create_subprocess_shell(
            "sleep 30 & echo $!; read line; exit 0", stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        grandchild = int(await proc.stdout.readline())
        try:
            waiter = asyncio.ensure_future(proc.wait())
            await asyncio.sleep(0)
            assert proc.returncode is None and not waiter.done()
            proc.stdin.close()
            while proc.returncode is None:  # the shell has exited
                await asyncio.sleep(0.005)
            for _ in range(5):
                await asyncio.sleep(0.01)
            assert waiter.done() == (sys.version_info < (3, 11))
        finally:
            os.kill(grandchild, signal.SIGKILL)
        assert await waiter == 0
        assert await proc.stdout.read() == b""

    run(loop, main())


def test_communicate_one_megabyte_through_cat(loop):
    payload = os.urandom(1024 * 1024)

    async def main():
        proc = await asyncio.create_subprocess_exec(
            "cat", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await proc.communicate(payload)
        return proc, out, err

    proc, out, err = run(loop, main())
    assert out == payload and err == b"" and proc.returncode == 0
    assert_reaped(proc.pid)


def test_stream_one_megabyte_both_ways_with_drain(loop):
    payload = os.urandom(1024 * 1024)

    async def main():
        proc = await asyncio.create_subprocess_exec("cat", stdin=subprocess.PIPE, stdout=subprocess.PIPE)

        async def feed():
            for i in range(0, len(payload), 100_000):
                proc.stdin.write(payload[i:i + 100_000])
                await proc.stdin.drain()
            proc.stdin.close()
            await proc.stdin.wait_closed()

        feeder = asyncio.ensure_future(feed())
        out = await proc.stdout.read()
        await feeder
        return proc, out, await proc.wait()

    proc, out, rc = run(loop, main())
    assert out == payload and rc == 0
    assert_reaped(proc.pid)


def test_communicate_timeout_then_kill(loop):
    async def main():
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", "import time; time.sleep(30)", stdout=subprocess.PIPE
        )
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(proc.communicate(), 0.2)
        proc.kill()
        return proc, await proc.wait()

    proc, rc = run(loop, main())
    assert rc == -signal.SIGKILL
    assert proc.returncode == -signal.SIGKILL
    assert_reaped(proc.pid)


def test_terminate_and_send_signal(loop):
    async def main(how):
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", "import sys, time; print('up', flush=True); time.sleep(30)", stdout=subprocess.PIPE
        )
        assert await proc.stdout.readline() == b"up\n"
        if how == "terminate":
            proc.terminate()
        else:
            proc.send_signal(signal.SIGUSR1)
        await proc.stdout.read()
        return proc, await proc.wait()

    for how, sig in (("terminate", signal.SIGTERM), ("send_signal", signal.SIGUSR1)):
        proc, rc = run(loop, main(how))
        assert rc == -sig
        assert_reaped(proc.pid)


def test_missing_program_raises_file_not_found(loop):
    with pytest.raises(FileNotFoundError):
        run(loop, asyncio.create_subprocess_exec("/nonexistent/ferroloop-no-such-program"))
    with pytest.raises(FileNotFoundError):
        run(loop, loop.subprocess_exec(asyncio.SubprocessProtocol, "/nonexistent/x", cwd="/"))


def test_subprocess_argument_errors(loop):
    proto = asyncio.SubprocessProtocol
    for kwargs in (
        {"universal_newlines": True},
        {"shell": True},
        {"bufsize": 4096},
        {"text": True},
        {"encoding": "utf-8"},
        {"errors": "strict"},
    ):
        with pytest.raises(ValueError):
            run(loop, loop.subprocess_exec(proto, "true", **kwargs))
    for kwargs in (
        {"universal_newlines": True},
        {"shell": False},
        {"bufsize": 4096},
        {"text": True},
        {"encoding": "utf-8"},
        {"errors": "strict"},
    ):
        with pytest.raises(ValueError):
            run(loop, loop.subprocess_shell(proto, "true", **kwargs))
    with pytest.raises(ValueError):
        run(loop, loop.subprocess_shell(proto, ["true"]))


def test_stdio_redirections_cwd_env_and_session(loop, tmp_path):
    rfd, wfd = os.pipe()
    out_file = tmp_path / "out.txt"
    code = (
        "import os, sys\n"
        "sys.stdout.write(os.getcwd() + '|' + os.environ['FERRO_X'] + '|')\n"
        "sys.stderr.write('to-stdout|')\n"
        "sys.stdout.flush()\n"
        "print(os.getsid(0) == os.getpid(), end='|')\n"
        "os.write(int(sys.argv[1]), b'passed fd')\n"
        "print(oct(os.umask(0)), end='')\n"
    )

    def preexec():
        os.umask(0o027)

    async def main():
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", code, str(wfd),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=str(tmp_path), env={**os.environ, "FERRO_X": "x"},
            start_new_session=True, pass_fds=(wfd,), preexec_fn=preexec, close_fds=True,
        )
        out, _ = await proc.communicate()
        return proc, out

    try:
        proc, out = run(loop, main())
        os.close(wfd)
        wfd = -1
        parts = out.decode().split("|")
        assert parts[0] == os.path.realpath(tmp_path)
        assert parts[1] == "x"
        assert "to-stdout" in parts
        assert "True" in parts
        assert parts[-1] == "0o27"  # preexec_fn ran in the child
        assert os.read(rfd, 100) == b"passed fd"

        async def to_file():
            with open(out_file, "wb") as f:
                proc = await asyncio.create_subprocess_exec(PY, "-c", "print('in a file')", stdout=f)
                return await proc.wait()

        assert run(loop, to_file()) == 0
        assert out_file.read_bytes() == b"in a file\n"
    finally:
        os.close(rfd)
        if wfd != -1:
            os.close(wfd)


def test_many_concurrent_subprocesses(loop):
    async def one(i):
        proc = await asyncio.create_subprocess_exec("sh", "-c", f"echo {i}", stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        return proc.pid, int(out)

    async def main():
        return await asyncio.gather(*(one(i) for i in range(30)))

    results = run(loop, main(), timeout=30)
    assert [n for _, n in results] == list(range(30))
    for pid, _ in results:
        assert_reaped(pid)


def test_transport_close_kills_a_running_child(loop):
    async def main():
        transport, proto = await loop.subprocess_exec(
            lambda: ProcProto(loop), PY, "-c", "import time; time.sleep(30)"
        )
        pid = transport.get_pid()
        assert transport.get_returncode() is None
        transport.close()
        await proto.done
        return transport, proto, pid

    transport, proto, pid = run(loop, main())
    assert transport.get_returncode() == -signal.SIGKILL
    assert proto.events[-1] == ("lost", None)
    assert_reaped(pid)


def test_child_exit_before_pipes_close(loop):
    # The child exits while a grandchild keeps stdout open: process_exited comes first,
    # connection_lost only once the pipe closes.
    async def main():
        transport, proto = await loop.subprocess_exec(
            lambda: ProcProto(loop), "sh", "-c", "(sleep 0.3; echo late) & exit 0",
            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        await proto.done
        transport.close()
        return proto

    proto = run(loop, main())
    exited = proto.events.index(("exited", 0))
    assert exited < proto.events.index(("pipe_lost", 1, None)) < proto.events.index(("lost", None))
    assert bytes(proto.data[1]) == b"late\n"


def test_subprocess_pipes_are_connected_before_connection_made(loop):
    # The pipe transports exist when the process protocol's connection_made runs, and
    # subprocess_exec returns only after it ran.
    class Proto(ProcProto):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.pipes_at_made = [transport.get_pipe_transport(fd) is not None for fd in (0, 1, 2)]

    async def main():
        transport, proto = await loop.subprocess_exec(
            lambda: Proto(loop), PY, "-c", "import sys; sys.stdout.write(sys.stdin.read())",
        )
        assert proto.events == ["made"]
        assert proto.pipes_at_made == [True, True, True]
        stdin = transport.get_pipe_transport(0)
        stdin.write(b"ping")
        stdin.close()
        await proto.done
        transport.close()
        return proto

    proto = run(loop, main())
    assert bytes(proto.data[1]) == b"ping"
    assert proto.events[0] == "made" and proto.events[-1] == ("lost", None)
    assert {e[1] for e in proto.events if e[0] == "pipe_lost"} == {0, 1, 2}


def test_subprocess_pipes_go_through_overridden_connect_pipe_methods(loop):
    # A loop whose connect_read_pipe / connect_write_pipe are replaced gets its replacements
    # called for a subprocess's pipes (CPython's test_subprocess.test_pause_reading does it).
    calls = []
    connect_read_pipe = loop.connect_read_pipe
    connect_write_pipe = loop.connect_write_pipe

    async def read_pipe(*args, **kw):
        calls.append("read")
        return await connect_read_pipe(*args, **kw)

    async def write_pipe(*args, **kw):
        calls.append("write")
        return await connect_write_pipe(*args, **kw)

    loop.connect_read_pipe = read_pipe
    loop.connect_write_pipe = write_pipe

    async def main():
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", "import sys; print(sys.stdin.read().upper())",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        return await proc.communicate(b"abc")

    try:
        out, err = run(loop, main())
    finally:
        del loop.connect_read_pipe, loop.connect_write_pipe
    assert (out, err) == (b"ABC\n", b"")
    assert calls == ["write", "read", "read"]


def test_subprocess_stdout_flow_control_pauses_and_resumes_reading(loop):
    size = 256 * 1024

    async def main():
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", f"import sys; sys.stdout.write('x' * {size})",
            stdout=subprocess.PIPE, limit=1024,
        )
        transport = proc._transport.get_pipe_transport(1)
        seen = []

        def spy_on(name):
            method = getattr(transport, name)

            def spy():
                seen.append(name)
                method()

            setattr(transport, name, spy)

        spy_on("pause_reading")
        spy_on("resume_reading")
        chunks = []
        while True:
            chunk = await proc.stdout.read(4096)
            if not chunk:
                break
            chunks.append(chunk)
            await asyncio.sleep(0)
        await proc.wait()
        return b"".join(chunks), seen

    data, seen = run(loop, main())
    assert data == b"x" * size
    assert "pause_reading" in seen and "resume_reading" in seen


def _open_fds():
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_subprocess_spawns_leak_no_fds_and_no_children(loop):
    async def one(i):
        proc = await asyncio.create_subprocess_exec(
            "/bin/echo", str(i),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate()
        return proc.pid, out, err, proc.returncode

    async def main(n):
        return await asyncio.gather(*(one(i) for i in range(n)))

    run(loop, main(2))  # first use: the loop's own lazily made fds
    gc.collect()
    before = _open_fds()
    results = run(loop, main(40), timeout=30)
    gc.collect()
    assert _open_fds() == before
    assert [(out, err, rc) for _, out, err, rc in results] == [
        (b"%d\n" % i, b"", 0) for i in range(40)
    ]
    for pid, *_ in results:
        assert_reaped(pid)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_subprocess_exec_cancelled_while_connecting_kills_and_reaps_the_child(loop):
    spawned = []

    class Proto(ProcProto):
        def connection_made(self, transport):
            super().connection_made(transport)
            spawned.append(transport.get_pid())

    async def main():
        task = asyncio.current_task()

        def factory():
            # Cancel the task once subprocess_exec has spawned the child and waits for the
            # pipes (and the protocol) to be connected.
            loop.call_soon(task.cancel)
            return Proto(loop)

        await loop.subprocess_exec(factory, PY, "-c", "import time; time.sleep(30)")

    async def warm_up():  # the loop's own lazily made fds
        proc = await asyncio.create_subprocess_exec(PY, "-c", "pass")
        await proc.wait()

    run(loop, warm_up())
    gc.collect()
    before = _open_fds()
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(main())
    # Closing a transport calls connection_lost (and closes the fd) on a later iteration, so let
    # the loop run those before counting: on 3.9 CPython's loop can stop before they ran.
    for _ in range(50):
        gc.collect()
        if _open_fds() == before:
            break
        run(loop, asyncio.sleep(0.01))
    assert _open_fds() == before
    assert len(spawned) == 1
    assert_reaped(spawned[0])


def test_subprocess_pipes_are_logged_in_debug_mode(loop, caplog):
    loop.set_debug(True)

    async def main():
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", "pass", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        return await proc.communicate()

    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        assert run(loop, main()) == (b"", b"")
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("Write pipe ") and " connected: " in m for m in messages) == 1
    assert sum(m.startswith("Read pipe ") and " connected: " in m for m in messages) == 2


def test_read_pipe_calls_an_eof_received_set_on_the_instance(loop):
    rfd, wfd = os.pipe()
    pipe = io.open(rfd, "rb", 0)
    events = []
    done = loop.create_future()

    class Proto(asyncio.Protocol):
        def connection_lost(self, exc):
            events.append("lost")
            done.set_result(None)

    proto = Proto()
    proto.eof_received = lambda: events.append("eof")
    run(loop, loop.connect_read_pipe(lambda: proto, pipe))
    os.close(wfd)
    run(loop, done)
    assert events == ["eof", "lost"]


# ---- fork -------------------------------------------------------------------------------


def _in_child(fn):
    """Run fn() in a forked child; return its exit status (0: fn returned True)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if fn() else 2
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_forked_child_cannot_use_the_loop(loop, loop_impl):
    if loop_impl.name != "ferroloop":
        pytest.skip("ferroloop's fork guard (asyncio's loop has undefined behaviour there)")
    loop.add_signal_handler(signal.SIGUSR1, lambda: None)

    def child():
        ok = 0
        try:
            loop.run_forever()
        except RuntimeError as exc:
            ok += "fork" in str(exc)
        coro = asyncio.sleep(0)
        try:
            loop.run_until_complete(coro)
        except RuntimeError as exc:
            ok += "fork" in str(exc)
        finally:
            coro.close()
        # The inherited wakeup fd was reset: a signal in the child does not reach the parent.
        ok += signal.set_wakeup_fd(-1) == -1
        return ok == 3

    assert _in_child(child) == 0
    # The parent's loop is intact.
    calls = []
    loop.add_signal_handler(signal.SIGUSR1, calls.append, 1)
    os.kill(os.getpid(), signal.SIGUSR1)
    run_until(loop, lambda: calls)
    assert loop.run_until_complete(asyncio.sleep(0, "still usable")) == "still usable"
    loop.remove_signal_handler(signal.SIGUSR1)


def test_closing_the_inherited_loop_in_a_forked_child_leaves_the_parent_loop_working(
    loop, loop_impl, sockpair
):
    if loop_impl.name != "ferroloop":
        pytest.skip("CPython's loop unregisters the parent's fds when its child closes it")
    a, b = sockpair
    got = []
    loop.add_reader(a, lambda: got.append(a.recv(16)))

    def child():
        loop.close()
        return True

    assert _in_child(child) == 0
    b.send(b"after-fork")
    run_until(loop, lambda: got)
    assert got == [b"after-fork"]
    loop.remove_reader(a)
