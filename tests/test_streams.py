"""asyncio streams (StreamReader / StreamWriter) over the loop's transports.

ferroloop's stream transport feeds a stdlib ``StreamReaderProtocol``'s reader itself (see
``crates/ferroloop/src/streams.rs``), so these tests pin down what ``data_received`` ->
``feed_data`` does: bytes in order whatever the chunking, the reader woken, reading paused past
twice the limit and resumed, EOF, and every case that must stay on the generic path (subclasses,
overrides on the instance, a reader at EOF, a buffer held by a memoryview, a dead reader).
Each test runs on CPython's loop and on ferroloop; the peer is a blocking socket in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import threading
import time
import weakref

import pytest
from conftest import run_python_c

TIMEOUT = 10


def run(loop, coro, timeout=TIMEOUT):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


class Conn:
    """A stream connection to a blocking peer socket (`peer`), opened on the running loop."""

    def __init__(self, reader, writer, peer):
        self.reader, self.writer, self.peer = reader, writer, peer
        self.threads = []

    @classmethod
    async def open(cls, **kwargs):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            reader, writer = await asyncio.open_connection(*listener.getsockname(), **kwargs)
            peer, _ = listener.accept()
        peer.settimeout(TIMEOUT)
        return cls(reader, writer, peer)

    def in_thread(self, func, *args):
        errors = []

        def target():
            try:
                func(*args)
            except BaseException as exc:  # re-raised by close()
                errors.append(exc)

        t = threading.Thread(target=target, daemon=True)
        t.start()
        self.threads.append((t, errors))

    def send_chunks(self, chunks, pause=0.0, eof=True):
        """Have the peer send `chunks` one by one (sleeping `pause` between), then half-close."""

        def send():
            for c in chunks:
                self.peer.sendall(c)
                if pause:
                    time.sleep(pause)
            if eof:
                self.peer.shutdown(socket.SHUT_WR)

        self.in_thread(send)

    async def close(self):
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, AssertionError, BufferError, asyncio.InvalidStateError):
            pass  # the cases that closed the transport with an error
        for t, errors in self.threads:
            t.join(TIMEOUT)
            assert not t.is_alive(), "peer thread hung"
            if errors:
                raise errors[0]
        self.peer.close()


def handler_calls(loop):
    calls = []
    loop.set_exception_handler(lambda lp, ctx: calls.append(ctx))
    return calls


def random_chunks(total, seed):
    rnd = random.Random(seed)
    data = os.urandom(total)
    chunks, i = [], 0
    while i < total:
        n = rnd.choice([1, 2, 7, 100, 1000, 4096, 5000, 65536, 70000])
        chunks.append(data[i : i + n])
        i += n
    return data, chunks


# ---- data, in order, whatever the chunking -------------------------------------------------


@pytest.mark.parametrize("total", [10, 5000, 300_000, 3_000_000])
def test_read_gets_every_byte_in_order_from_many_chunks(loop, total):
    async def main():
        calls = handler_calls(loop)
        c = await Conn.open()
        data, chunks = random_chunks(total, total)
        c.send_chunks(chunks, pause=0.0005 if total < 100_000 else 0.0)
        got = bytearray()
        sizes = [1, 3, 1000, 262144, 17]
        i = 0
        while True:
            block = await c.reader.read(sizes[i % len(sizes)])
            i += 1
            if not block:
                break
            assert isinstance(block, bytes)
            got += block
        assert bytes(got) == data
        assert c.reader.at_eof()
        await c.close()
        assert calls == []

    run(loop, main())


def test_readexactly_readuntil_readline_across_chunk_boundaries(loop):
    async def main():
        c = await Conn.open()
        stream = b"alpha\nbe" + b"ta\n" + b"x" * 10 + b"gam" + b"ma||rest" + b"!" * 5
        # One byte at a time, so every separator straddles reads.
        c.send_chunks([stream[i : i + 1] for i in range(len(stream))], pause=0.001)
        assert await c.reader.readline() == b"alpha\n"
        assert await c.reader.readuntil(b"\n") == b"beta\n"
        assert await c.reader.readexactly(10) == b"x" * 10
        assert await c.reader.readuntil(b"||") == b"gamma||"
        assert await c.reader.readexactly(4) == b"rest"
        with pytest.raises(asyncio.IncompleteReadError) as info:
            await c.reader.readexactly(6)
        assert info.value.partial == b"!" * 5
        assert await c.reader.read() == b""
        await c.close()

    run(loop, main())


def test_readexactly_larger_than_the_limit_resumes_a_paused_transport(loop):
    async def main():
        c = await Conn.open(limit=1024)
        data, chunks = random_chunks(2_000_000, 7)
        c.send_chunks(chunks)
        got = []
        for _ in range(4):
            got.append(await c.reader.readexactly(500_000))
        assert b"".join(got) == data
        assert await c.reader.read() == b""
        await c.close()

    run(loop, main())


# ---- limits and read-side flow control -----------------------------------------------------


def test_limit_overrun_in_readuntil_and_readline(loop):
    async def main():
        c = await Conn.open(limit=16)
        c.send_chunks([b"a" * 40 + b"\n", b"short\n", b"b" * 10 + b"|" + b"c" * 30 + b"|"])
        with pytest.raises(ValueError):
            await c.reader.readline()  # overrun: the line is dropped
        assert await c.reader.readline() == b"short\n"
        assert await c.reader.readuntil(b"|") == b"b" * 10 + b"|"
        with pytest.raises(asyncio.LimitOverrunError) as info:
            await c.reader.readuntil(b"|")
        # readuntil leaves the data in the buffer on overrun.
        assert info.value.consumed >= 16
        assert await c.reader.readexactly(31) == b"c" * 30 + b"|"
        await c.close()

    run(loop, main())


def test_large_input_pauses_reading_past_twice_the_limit_and_loses_no_byte(loop):
    async def main():
        limit = 4096
        c = await Conn.open(limit=limit)
        data = os.urandom(4 * 1024 * 1024)
        c.send_chunks([data])
        transport = c.writer.transport
        # Do not read: the reader buffers until it holds more than 2 * limit, then pauses the
        # transport. Nothing is read while paused.
        deadline = time.monotonic() + TIMEOUT
        while transport.is_reading():
            assert time.monotonic() < deadline, "reading was never paused"
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)
        assert not transport.is_reading()
        buffered = len(c.reader._buffer)
        assert 2 * limit < buffered <= 2 * limit + 256 * 1024
        await asyncio.sleep(0.05)
        assert len(c.reader._buffer) == buffered  # really paused
        # Reading drains the buffer and resumes the transport; every byte arrives.
        digest, n = hashlib.sha256(), 0
        while block := await c.reader.read(65536):
            digest.update(block)
            n += len(block)
        assert n == len(data)
        assert digest.digest() == hashlib.sha256(data).digest()
        await c.close()

    run(loop, main())


def test_a_transport_that_cannot_pause_is_forgotten_and_everything_is_buffered(loop):
    class Unpausable:
        def __init__(self, transport):
            self.transport = transport

        def pause_reading(self):
            raise NotImplementedError

        def resume_reading(self):
            raise AssertionError("never paused")

    async def main():
        calls = handler_calls(loop)
        c = await Conn.open(limit=1024)
        c.reader._transport = Unpausable(c.writer.transport)
        data = os.urandom(200_000)
        c.send_chunks([data])
        assert await c.reader.readexactly(len(data)) == data
        assert c.reader._transport is None
        assert c.writer.transport.is_reading()
        await c.close()
        assert calls == []

    run(loop, main())


# ---- EOF ---------------------------------------------------------------------------------


def test_eof_after_data_delivers_the_data_then_eof(loop):
    async def main():
        c = await Conn.open()
        c.send_chunks([b"last words"])
        assert await c.reader.read() == b"last words"
        assert c.reader.at_eof()
        assert await c.reader.read(10) == b""
        # The peer half-closed; this side can still write.
        c.writer.write(b"reply")
        await c.writer.drain()
        assert c.peer.recv(100) == b"reply"
        await c.close()

    run(loop, main())


def test_data_after_feed_eof_is_a_fatal_data_received_error(loop):
    # feed_data asserts the reader is not at EOF: the error goes to the exception handler
    # and the transport is closed, exactly as data_received raising would.
    async def main():
        calls = handler_calls(loop)
        c = await Conn.open()
        c.reader.feed_eof()
        c.send_chunks([b"too late"], eof=False)
        deadline = time.monotonic() + TIMEOUT
        while not c.writer.transport.is_closing():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        await c.close()
        if __debug__:
            assert [ctx["message"] for ctx in calls] == [
                "Fatal error: protocol.data_received() call failed."
            ]
            assert isinstance(calls[0]["exception"], AssertionError)

    run(loop, main())


# ---- the reader's waiter -------------------------------------------------------------------


def test_a_cancelled_waiter_is_dropped_without_a_result(loop):
    async def main():
        calls = handler_calls(loop)
        c = await Conn.open()
        waiter = loop.create_future()
        waiter.cancel()
        c.reader._waiter = waiter
        c.send_chunks([b"data"], eof=False)
        deadline = time.monotonic() + TIMEOUT
        while c.reader._waiter is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert waiter.cancelled()
        assert await c.reader.read(100) == b"data"
        await c.close()
        assert calls == []

    run(loop, main())


def test_a_waiter_that_is_already_done_makes_data_received_fail(loop):
    async def main():
        calls = handler_calls(loop)
        c = await Conn.open()
        waiter = loop.create_future()
        waiter.set_result("someone else's")
        c.reader._waiter = waiter
        c.send_chunks([b"data"], eof=False)
        deadline = time.monotonic() + TIMEOUT
        while not c.writer.transport.is_closing():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert c.reader._waiter is None
        assert [ctx["message"] for ctx in calls] == [
            "Fatal error: protocol.data_received() call failed."
        ]
        assert isinstance(calls[0]["exception"], asyncio.InvalidStateError)
        await c.close()

    run(loop, main())


def test_waiter_methods_set_on_the_future_instance_are_called(loop):
    async def main():
        c = await Conn.open()
        seen = []
        waiter = loop.create_future()

        def set_result(result):
            seen.append(("set_result", result))
            asyncio.Future.set_result(waiter, result)

        waiter.set_result = set_result
        c.reader._waiter = waiter
        c.send_chunks([b"one"], eof=False)
        assert await asyncio.wait_for(waiter, TIMEOUT) is None
        assert seen == [("set_result", None)]
        assert await c.reader.read(100) == b"one"

        # A waiter that says it is cancelled is dropped without a result.
        waiter = loop.create_future()
        waiter.cancelled = lambda: seen.append("cancelled") or True
        c.reader._waiter = waiter
        c.send_chunks([b"two"], eof=False)
        deadline = time.monotonic() + TIMEOUT
        while c.reader._waiter is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert seen[1:] == ["cancelled"] and not waiter.done()
        assert await c.reader.read(100) == b"two"
        await c.close()

    run(loop, main())


def test_a_cancelled_read_task_leaves_the_data_for_the_next_read(loop):
    async def main():
        c = await Conn.open()
        task = asyncio.ensure_future(c.reader.read(100))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        c.send_chunks([b"after cancel"], eof=False)
        assert await c.reader.read(100) == b"after cancel"
        await c.close()

    run(loop, main())


# ---- what must take the generic path -------------------------------------------------------


def test_a_stream_reader_protocol_subclass_gets_data_received_calls(loop):
    seen = []

    class Recording(asyncio.StreamReaderProtocol):
        def data_received(self, data):
            seen.append(bytes(data))
            super().data_received(data)

    async def main():
        with socket.create_server(("127.0.0.1", 0)) as listener:
            reader = asyncio.StreamReader(limit=1024)
            transport, _ = await loop.create_connection(
                lambda: Recording(reader), *listener.getsockname()
            )
            peer, _ = listener.accept()
        with peer:
            payload = os.urandom(100_000)
            threading.Thread(target=peer.sendall, args=(payload,), daemon=True).start()
            assert await reader.readexactly(len(payload)) == payload
            assert b"".join(seen) == payload
            transport.close()

    run(loop, main())


def test_data_received_set_on_the_protocol_instance_is_called(loop):
    async def main():
        c = await Conn.open()
        protocol = c.writer.transport.get_protocol()
        seen = []
        original = protocol.data_received

        def spy(data):
            seen.append(data)
            original(data)

        protocol.data_received = spy
        c.send_chunks([b"spied on"])
        assert await c.reader.read() == b"spied on"
        assert b"".join(seen) == b"spied on"
        await c.close()

    run(loop, main())


def test_feed_data_overridden_on_a_reader_subclass_or_instance_is_called(loop):
    seen = []

    class Reader(asyncio.StreamReader):
        def feed_data(self, data):
            seen.append(("class", bytes(data)))
            super().feed_data(data)

    async def main():
        with socket.create_server(("127.0.0.1", 0)) as listener:
            reader = Reader()
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.create_connection(lambda: protocol, *listener.getsockname())
            peer, _ = listener.accept()
        with peer:
            peer.sendall(b"one")
            assert await reader.read(10) == b"one"
            plain = asyncio.StreamReader()

            def feed_data(data):
                seen.append(("instance", bytes(data)))
                asyncio.StreamReader.feed_data(plain, data)

            plain.feed_data = feed_data
            protocol._stream_reader_wr = weakref.ref(plain)
            peer.sendall(b"two")
            assert await plain.read(10) == b"two"
            assert seen == [("class", b"one"), ("instance", b"two")]
            transport.close()

    run(loop, main())


def test_a_buffer_held_by_a_memoryview_makes_data_received_fail(loop):
    async def main():
        calls = handler_calls(loop)
        c = await Conn.open()
        c.send_chunks([b"first"], eof=False)
        assert await c.reader.readexactly(2) == b"fi"
        view = memoryview(c.reader._buffer)  # the buffer cannot be resized now
        c.peer.sendall(b"second")
        deadline = time.monotonic() + TIMEOUT
        while not c.writer.transport.is_closing():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        view.release()
        assert [ctx["message"] for ctx in calls] == [
            "Fatal error: protocol.data_received() call failed."
        ]
        assert isinstance(calls[0]["exception"], BufferError)
        assert bytes(c.reader._buffer) == b"rst"
        await c.close()

    run(loop, main())


def test_data_for_a_reader_that_is_gone_is_dropped(loop):
    async def main():
        calls = handler_calls(loop)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            transport, protocol = await loop.create_connection(
                lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
                *listener.getsockname(),
            )
            peer, _ = listener.accept()
        with peer:
            assert protocol._stream_reader is None  # only a weak reference was kept
            peer.sendall(b"nobody listens")
            await asyncio.sleep(0.05)
            assert not transport.is_closing()
            transport.write(b"still open")
            peer.settimeout(TIMEOUT)
            assert peer.recv(100) == b"still open"
            transport.close()
        assert calls == []

    run(loop, main())


# ---- the stdlib classes changed while connections exist ------------------------------------


def _patched(cls, name, make):
    """Replace `cls.name` with `make(original)`; returns a function that puts it back."""
    original = cls.__dict__[name]
    setattr(cls, name, make(original))

    def restore():
        setattr(cls, name, original)

    return restore


@pytest.mark.parametrize(
    "cls, name",
    [
        (asyncio.StreamReader, "feed_data"),
        (asyncio.StreamReader, "_wakeup_waiter"),
        (asyncio.StreamReaderProtocol, "data_received"),
    ],
)
def test_a_stream_method_replaced_on_the_class_is_called_then_restored(loop, cls, name):
    """A connection fed while the stdlib class is intact, then with one of the functions
    data_received goes through replaced on the class (the replacement is called for each
    chunk), then with it put back: every byte arrives, in order."""
    calls = []

    def make(original):
        def spy(self, *args):
            calls.append(args)
            return original(self, *args)

        return spy

    async def main():
        c = await Conn.open()
        c.peer.sendall(b"before")
        assert await c.reader.readexactly(6) == b"before"
        restore = _patched(cls, name, make)
        try:
            c.peer.sendall(b"during")
            assert await c.reader.readexactly(6) == b"during"
            assert calls, f"{cls.__name__}.{name} replaced on the class was not called"
        finally:
            restore()
        n = len(calls)
        c.peer.sendall(b"after")
        assert await c.reader.readexactly(5) == b"after"
        assert len(calls) == n
        await c.close()

    run(loop, main())


def test_a_stream_reader_property_replaced_on_the_class_is_used_then_restored(loop):
    """`StreamReaderProtocol._stream_reader` replaced on the class by a property naming another
    reader: the data goes to that reader; put back, to the connection's own."""

    async def main():
        other = asyncio.StreamReader()
        c = await Conn.open()
        c.peer.sendall(b"mine")
        assert await c.reader.readexactly(4) == b"mine"
        restore = _patched(
            asyncio.StreamReaderProtocol, "_stream_reader", lambda _: property(lambda self: other)
        )
        try:
            c.peer.sendall(b"theirs")
            assert await asyncio.wait_for(other.readexactly(6), TIMEOUT) == b"theirs"
        finally:
            restore()
        c.peer.sendall(b"mine again")
        assert await c.reader.readexactly(10) == b"mine again"
        await c.close()

    run(loop, main())


@pytest.mark.parametrize("cls", [asyncio.StreamReader, asyncio.StreamReaderProtocol])
def test_an_unrelated_class_attribute_set_between_reads_changes_nothing(loop, cls):
    async def main():
        c = await Conn.open()
        c.peer.sendall(b"one")
        assert await c.reader.readexactly(3) == b"one"
        cls._ferroloop_test_marker = 1
        try:
            c.peer.sendall(b"two")
            assert await c.reader.readexactly(3) == b"two"
        finally:
            del cls._ferroloop_test_marker
        c.peer.sendall(b"three")
        assert await c.reader.readexactly(5) == b"three"
        await c.close()

    run(loop, main())


@pytest.mark.parametrize("cls", [asyncio.StreamReader, asyncio.StreamReaderProtocol])
def test_class_level_defaults_for_the_instance_attributes_change_nothing(loop, cls):
    names = ["_waiter", "_buffer", "_paused", "_limit", "_eof", "_transport", "_stream_reader_wr"]

    async def main():
        c = await Conn.open()
        c.peer.sendall(b"one")
        assert await c.reader.readexactly(3) == b"one"
        for name in names:
            setattr(cls, name, None)
        try:
            c.peer.sendall(b"two")
            assert await c.reader.readexactly(3) == b"two"
        finally:
            for name in names:
                delattr(cls, name)
        c.peer.sendall(b"three")
        assert await c.reader.readexactly(5) == b"three"
        await c.close()

    run(loop, main())


def test_readers_whose_attributes_live_in_a_dict_or_under_built_names_are_fed(loop):
    seen = []

    async def main():
        c = await Conn.open()
        vars(c.reader)  # the instance now has a real __dict__
        vars(c.writer._protocol)
        c.peer.sendall(b"one")
        assert await c.reader.readexactly(3) == b"one"
        # Many attributes: more than a class's shared keys hold.
        for i in range(40):
            setattr(c.reader, f"extra_{i}", i)
        c.peer.sendall(b"two")
        assert await c.reader.readexactly(3) == b"two"

        reader = asyncio.StreamReader()
        name = "".join(["feed", "_da", "ta"])

        def feed_data(data):
            seen.append(bytes(data))
            asyncio.StreamReader.feed_data(reader, data)

        setattr(reader, name, feed_data)
        c.writer._protocol._stream_reader_wr = weakref.ref(reader)
        c.peer.sendall(b"three")
        assert await asyncio.wait_for(reader.readexactly(5), TIMEOUT) == b"three"
        assert seen == [b"three"]
        await c.close()

    run(loop, main())


def test_data_received_replaced_on_the_class_of_another_connection_is_called(loop):
    """Two connections, one fed before the change: after `data_received` is replaced on the
    class, both call the replacement."""
    seen = []

    def make(original):
        def spy(self, data):
            seen.append(bytes(data))
            return original(self, data)

        return spy

    async def main():
        a, b = await Conn.open(), await Conn.open()
        a.peer.sendall(b"a1")
        assert await a.reader.readexactly(2) == b"a1"
        restore = _patched(asyncio.StreamReaderProtocol, "data_received", make)
        try:
            a.peer.sendall(b"a2")
            b.peer.sendall(b"b1")
            assert await a.reader.readexactly(2) == b"a2"
            assert await b.reader.readexactly(2) == b"b1"
        finally:
            restore()
        assert sorted(seen) == [b"a2", b"b1"]
        await a.close()
        await b.close()

    run(loop, main())


# ---- the same instances changed once data flowed ---------------------------------------------


@pytest.mark.parametrize(
    "target, name",
    [
        ("reader", "feed_data"),
        ("reader", "_wakeup_waiter"),
        ("protocol", "data_received"),
    ],
)
def test_a_method_set_on_the_instance_after_reads_is_called_then_deleted(loop, target, name):
    """A connection fed several times, then one of the functions data_received goes through
    set on that very reader or protocol: the next chunk goes through it; deleted, no more."""
    calls = []

    async def main():
        c = await Conn.open()
        for i in range(3):
            c.peer.sendall(b"warm%d" % i)
            assert await c.reader.readexactly(5) == b"warm%d" % i
        obj = c.reader if target == "reader" else c.writer.transport.get_protocol()
        original = getattr(obj, name)

        def spy(*args):
            calls.append(args)
            return original(*args)

        setattr(obj, name, spy)
        c.peer.sendall(b"during")
        assert await c.reader.readexactly(6) == b"during"
        assert calls, f"{name} set on the {target} instance was not called"
        delattr(obj, name)
        n = len(calls)
        c.peer.sendall(b"after")
        assert await c.reader.readexactly(5) == b"after"
        assert len(calls) == n
        await c.close()

    run(loop, main())


_FRESH_INSTANCE_PATCH = """
import asyncio, socket, sys

loop_name, target, name = sys.argv[1:]
if loop_name == "ferroloop":
    import ferroloop
    loop = ferroloop.new_event_loop()
else:
    loop = asyncio.SelectorEventLoop()
calls = []

async def main():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        peer, _ = listener.accept()
    with peer:
        for i in range(3):
            peer.sendall(b"warm%d" % i)
            assert await reader.readexactly(5) == b"warm%d" % i
        obj = reader if target == "reader" else writer.transport.get_protocol()
        original = getattr(obj, name)

        def spy(*args):
            calls.append(args)
            return original(*args)

        setattr(obj, name, spy)
        peer.sendall(b"during")
        assert await reader.readexactly(6) == b"during"
        assert calls, f"{name} set on the {target} instance was not called"
        delattr(obj, name)
        n = len(calls)
        peer.sendall(b"after")
        assert await reader.readexactly(5) == b"after"
        assert len(calls) == n
        writer.close()

loop.run_until_complete(asyncio.wait_for(main(), 10))
loop.close()
print("ok")
"""


@pytest.mark.parametrize(
    "target, name",
    [
        ("reader", "feed_data"),
        ("reader", "_wakeup_waiter"),
        ("protocol", "data_received"),
    ],
)
def test_a_method_set_on_the_instance_after_reads_in_a_fresh_interpreter(
    loop_impl, target, name
):
    """As above, in an interpreter where no instance of the stdlib classes ever had an
    attribute of that name (which the classes' shared attribute keys remember)."""
    proc = run_python_c(_FRESH_INSTANCE_PATCH, loop_impl.name, target, name)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_a_method_set_on_another_reader_is_not_called_for_this_one(loop):
    """`feed_data` set on another reader of the same class changes nothing for this one."""

    async def main():
        c = await Conn.open()
        c.peer.sendall(b"one")
        assert await c.reader.readexactly(3) == b"one"
        other = asyncio.StreamReader()
        other.feed_data = lambda data: pytest.fail("the other reader's feed_data was called")
        c.peer.sendall(b"two")
        assert await c.reader.readexactly(3) == b"two"
        del other.feed_data
        c.peer.sendall(b"three")
        assert await c.reader.readexactly(5) == b"three"
        await c.close()

    run(loop, main())


def test_set_protocol_mid_stream_sends_the_next_data_to_the_new_protocol(loop):
    """A stream connection fed, then its transport given another protocol (a plain one, then
    a StreamReaderProtocol over another reader): each gets the data from then on."""

    class Collect(asyncio.Protocol):
        def __init__(self):
            self.data = bytearray()
            self.got = asyncio.Event()

        def data_received(self, data):
            self.data += data
            self.got.set()

    async def main():
        c = await Conn.open()
        tr = c.writer.transport
        own = tr.get_protocol()
        c.peer.sendall(b"first")
        assert await c.reader.readexactly(5) == b"first"
        collect = Collect()
        tr.set_protocol(collect)
        c.peer.sendall(b"second")
        await asyncio.wait_for(collect.got.wait(), TIMEOUT)
        assert collect.data == b"second"
        other = asyncio.StreamReader()
        tr.set_protocol(asyncio.StreamReaderProtocol(other))
        c.peer.sendall(b"third")
        assert await asyncio.wait_for(other.readexactly(5), TIMEOUT) == b"third"
        tr.set_protocol(own)
        c.peer.sendall(b"fourth")
        assert await c.reader.readexactly(6) == b"fourth"
        assert collect.data == b"second"
        await c.close()

    run(loop, main())


def test_a_waiter_cancelled_after_reads_is_dropped_and_one_already_done_fails(loop):
    """With reads before (the direct paths warm): a cancelled waiter is dropped silently, one
    that holds a result makes data_received fail with InvalidStateError."""

    async def main():
        calls = handler_calls(loop)
        c = await Conn.open()
        for i in range(3):
            c.peer.sendall(b"warm%d" % i)
            assert await c.reader.readexactly(5) == b"warm%d" % i
        waiter = loop.create_future()
        waiter.cancel()
        c.reader._waiter = waiter
        c.peer.sendall(b"data")
        deadline = time.monotonic() + TIMEOUT
        while c.reader._waiter is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert waiter.cancelled() and calls == []
        assert await c.reader.readexactly(4) == b"data"
        waiter = loop.create_future()
        waiter.set_result("someone else's")
        c.reader._waiter = waiter
        c.peer.sendall(b"more")
        while not c.writer.transport.is_closing():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert waiter.result() == "someone else's"
        assert [ctx["message"] for ctx in calls] == [
            "Fatal error: protocol.data_received() call failed."
        ]
        assert isinstance(calls[0]["exception"], asyncio.InvalidStateError)
        await c.close()

    run(loop, main())


# ---- the writer side of an echo -------------------------------------------------------------


@pytest.mark.parametrize("size", [1024, 10 * 1024, 100 * 1024])
def test_stream_echo_server_round_trips(loop, size):
    async def echo(reader, writer):
        try:
            while data := await reader.read(262144):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def client(address, rounds):
        with socket.create_connection(address, timeout=TIMEOUT) as s:
            for i in range(rounds):
                msg = bytes([i % 251]) * size
                s.sendall(msg)
                got = bytearray()
                while len(got) < size:
                    chunk = s.recv(size - len(got))
                    assert chunk
                    got += chunk
                assert got == msg
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""

    async def main():
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        await loop.run_in_executor(None, client, address, 50)
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_is_closing_follows_close(loop):
    async def main():
        c = await Conn.open()
        assert c.writer.transport.is_closing() is False
        assert c.writer.is_closing() is False
        c.writer.close()
        assert c.writer.transport.is_closing() is True
        with pytest.raises(TypeError):
            c.writer.transport.is_closing(1)
        await c.close()

    run(loop, main())


def test_transport_methods_given_wrong_arguments_raise_type_error(loop):
    """The native `_read_ready`, `write` and `is_closing` take arguments as Python methods do:
    a wrong call raises TypeError (and does nothing), `write(data=...)` works."""

    async def main():
        c = await Conn.open()
        tr = c.writer.transport
        for call in (
            lambda: tr._read_ready(1),
            lambda: tr._read_ready(x=1),
            lambda: tr.write(),
            lambda: tr.write(b"a", b"b"),
            lambda: tr.write(b"a", bogus=1),
            lambda: tr.is_closing(1),
            lambda: tr.is_closing(x=1),
        ):
            with pytest.raises(TypeError):
                call()
        tr.write(data=b"kw")
        tr.write(b"!")
        got = b""
        while len(got) < 3:
            got += c.peer.recv(10)
        assert got == b"kw!"
        c.send_chunks([b"reply"])
        assert await c.reader.read() == b"reply"
        await c.close()

    run(loop, main())
