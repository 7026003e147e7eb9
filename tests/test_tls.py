"""TLS transports: record boundaries, close_notify, flow control and app protocols over ssl=.

Every test runs on CPython's loop and on ferroloop (the ``loop`` fixture). The peer is a thread
doing TLS by hand over a blocking socket (an SSLObject on memory BIOs), so it controls exactly
how the TLS bytes are cut into socket writes: records split byte by byte, many records in one
write, close_notify in the same write as the last data.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time

import pytest

from conftest import requires_py311
from test_network import ThreadPeer, run, tls_contexts  # noqa: F401  (fixture)

# ferroloop's TLS layer follows the sslproto of CPython 3.11+; before 3.11 both loops run the
# older stdlib SSLProtocol, whose EOF and error reporting these tests do not describe.
pytestmark = requires_py311

TIMEOUT = 10


class ManualTLS:
    """Server-side TLS over a blocking socket, by hand: we choose how bytes hit the wire."""

    def __init__(self, conn, context):
        self.conn = conn
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        conn.settimeout(TIMEOUT)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                data = conn.recv(65536)
                if not data:
                    raise ConnectionError("EOF during handshake")
                self.incoming.write(data)
        self.flush()

    def flush(self):
        data = self.outgoing.read()
        if data:
            self.conn.sendall(data)

    def records(self, *chunks):
        """The TLS bytes of one record per chunk (not sent)."""
        for chunk in chunks:
            self.obj.write(chunk)
        return self.outgoing.read()

    def close_notify(self):
        with contextlib.suppress(ssl.SSLWantReadError):
            self.obj.unwrap()
        return self.outgoing.read()

    def recv_exactly(self, n):
        got = bytearray()
        while len(got) < n:
            try:
                got += self.obj.read(n - len(got))
                continue
            except ssl.SSLWantReadError:
                pass
            data = self.conn.recv(65536)
            if not data:
                raise ConnectionError(f"EOF after {len(got)} of {n} bytes")
            self.incoming.write(data)
        self.flush()
        return bytes(got)


class Collect(asyncio.Protocol):
    def __init__(self, loop):
        self.data = bytearray()
        self.calls = []
        self.lost = loop.create_future()
        self.eof = False
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.calls.append("made")

    def data_received(self, data):
        assert isinstance(data, bytes)
        self.data += data
        self.calls.append("data")

    def eof_received(self):
        self.eof = True
        self.calls.append("eof")

    def connection_lost(self, exc):
        self.calls.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)


def test_split_records_and_many_records_per_read(loop, tls_contexts):
    """A record cut into 1-byte writes, many records in one write, then close_notify together
    with the last record: all data arrives in order, then eof_received, then connection_lost."""
    server_ctx, client_ctx = tls_contexts
    big = bytes(range(256)) * 70  # 17,920 bytes: two records
    small = [b"r%03d" % i for i in range(50)]

    def peer(conn):
        tls = ManualTLS(conn, server_ctx)
        for b in tls.records(b"split:" + big):
            conn.sendall(bytes([b]))
            if b % 97 == 0:
                time.sleep(0.0005)
        # Odd cuts across record boundaries.
        wire = tls.records(*small)
        for i in range(0, len(wire), 37):
            conn.sendall(wire[i:i + 37])
        time.sleep(0.05)
        conn.sendall(tls.records(b"last") + tls.close_notify())
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    async def main(peer):
        transport, proto = await loop.create_connection(
            lambda: Collect(loop), *peer.address, ssl=client_ctx, server_hostname="localhost"
        )
        exc = await asyncio.wait_for(proto.lost, TIMEOUT)
        assert exc is None
        assert bytes(proto.data) == b"split:" + big + b"".join(small) + b"last"
        assert proto.calls[0] == "made"
        assert proto.calls[-2:] == ["eof", "lost"]
        assert set(proto.calls[1:-2]) == {"data"}
        assert transport.is_closing()

    with ThreadPeer(peer) as p:
        run(loop, main(p))


def test_echo_sizes_and_write_types(loop, tls_contexts):
    """Writes of bytes, bytearray and memoryview of many sizes come back intact; write(str)
    raises TypeError; write(b'') is a no-op."""
    server_ctx, client_ctx = tls_contexts
    sizes = [1, 100, 1024, 10 * 1024, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 100_000, 300_000]

    def peer(conn):
        tls = ManualTLS(conn, server_ctx)
        for n in sizes:
            data = tls.recv_exactly(n)
            tls.obj.write(data)
            tls.flush()
        conn.sendall(tls.close_notify())

    async def main(peer):
        reader, writer = await asyncio.open_connection(
            *peer.address, ssl=client_ctx, server_hostname="localhost"
        )
        with pytest.raises(TypeError):
            writer.write("text")
        writer.write(b"")
        for i, n in enumerate(sizes):
            payload = bytes((i + j) % 251 for j in range(n))
            kind = i % 3
            if kind == 0:
                writer.write(payload)
            elif kind == 1:
                writer.write(bytearray(payload))
            else:
                writer.write(memoryview(payload))
            await writer.drain()
            assert await reader.readexactly(n) == payload
        assert await reader.read() == b""
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()

    with ThreadPeer(peer) as p:
        run(loop, main(p))


def test_extra_info_and_transport(loop, tls_contexts):
    server_ctx, client_ctx = tls_contexts

    def peer(conn):
        tls = ManualTLS(conn, server_ctx)
        assert tls.recv_exactly(4) == b"ping"
        conn.sendall(tls.records(b"pong") + tls.close_notify())

    async def main(peer):
        transport, proto = await loop.create_connection(
            lambda: Collect(loop), *peer.address, ssl=client_ctx, server_hostname="localhost"
        )
        assert "ssl" in type(transport).__name__.lower()
        assert transport.get_extra_info("sslcontext") is client_ctx
        sslobj = transport.get_extra_info("ssl_object")
        assert isinstance(sslobj, ssl.SSLObject)
        assert transport.get_extra_info("peercert")["subject"]
        assert transport.get_extra_info("cipher") == sslobj.cipher()
        assert transport.get_extra_info("compression") == sslobj.compression()
        assert transport.get_extra_info("peername") == peer.address
        assert transport.get_extra_info("socket") is not None
        assert transport.get_extra_info("nope", 42) == 42
        assert not transport.can_write_eof()
        with pytest.raises(NotImplementedError):
            transport.write_eof()
        assert transport.get_protocol() is proto
        transport.write(b"ping")
        assert await asyncio.wait_for(proto.lost, TIMEOUT) is None
        assert bytes(proto.data) == b"pong"

    with ThreadPeer(peer) as p:
        run(loop, main(p))


def test_server_buffered_protocol_and_flow_control(loop, tls_contexts):
    """A BufferedProtocol app behind create_server(ssl=): data arrives through get_buffer /
    buffer_updated; pause_reading on the TLS transport holds data back until resume_reading;
    a small write high-water mark makes the TLS transport call pause_writing/resume_writing."""
    server_ctx, client_ctx = tls_contexts
    got = bytearray()
    events = []
    done = loop.create_future()
    payload = bytes(range(256)) * 400  # 102,400 bytes

    class Buffered(asyncio.BufferedProtocol):
        def connection_made(self, transport):
            self.transport = transport
            # A memoryview: the stdlib fills the buffer through slices of it.
            self.buf = memoryview(bytearray(1000))
            transport.set_write_buffer_limits(high=1)
            transport.pause_reading()
            events.append("paused")
            loop.call_later(0.1, self.resume)

        def resume(self):
            events.append("resumed")
            self.transport.resume_reading()

        def get_buffer(self, sizehint):
            return self.buf

        def buffer_updated(self, nbytes):
            events.append("data") if events[-1] != "data" else None
            got.extend(self.buf[:nbytes])
            if len(got) == len(payload):
                self.transport.write(b"x" * 200_000)
                self.transport.write(bytes(got))

        def pause_writing(self):
            events.append("pause_writing")

        def resume_writing(self):
            events.append("resume_writing")

        def eof_received(self):
            events.append("eof")

        def connection_lost(self, exc):
            if not done.done():
                done.set_result(exc)

    async def main():
        server = await loop.create_server(Buffered, "127.0.0.1", 0, ssl=server_ctx)
        address = server.sockets[0].getsockname()
        reader, writer = await asyncio.open_connection(
            *address, ssl=client_ctx, server_hostname="localhost"
        )
        writer.write(payload)
        await writer.drain()
        assert await reader.readexactly(200_000) == b"x" * 200_000
        assert await reader.readexactly(len(payload)) == payload
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()
        await asyncio.wait_for(done, TIMEOUT)
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert bytes(got) == payload
    reading = [e for e in events if e in ("paused", "resumed", "data")]
    assert reading[:3] == ["paused", "resumed", "data"]
    assert "pause_writing" in events
    assert events.index("resume_writing") > events.index("pause_writing")


def test_close_flushes_pending_writes(loop, tls_contexts):
    """Data written right before close() reaches the peer, followed by close_notify."""
    server_ctx, client_ctx = tls_contexts
    received = []

    def peer(conn):
        tls = ManualTLS(conn, server_ctx)
        buf = bytearray()
        while True:
            try:
                chunk = tls.obj.read(65536)
            except ssl.SSLWantReadError:
                data = conn.recv(65536)
                if not data:
                    break
                tls.incoming.write(data)
                continue
            if not chunk:  # close_notify
                break
            buf += chunk
        received.append(bytes(buf))
        with contextlib.suppress(OSError):
            conn.sendall(tls.close_notify())

    async def main(peer):
        transport, proto = await loop.create_connection(
            lambda: Collect(loop), *peer.address, ssl=client_ctx, server_hostname="localhost"
        )
        for i in range(20):
            transport.write(b"%05d" % i * 1000)
        transport.close()
        assert transport.is_closing()
        transport.write(b"after close")  # ignored, like asyncio
        await asyncio.wait_for(proto.lost, TIMEOUT)

    with ThreadPeer(peer) as p:
        run(loop, main(p))
    assert received == [b"".join(b"%05d" % i * 1000 for i in range(20))]


def test_app_exception_in_data_received_is_fatal(loop, tls_contexts):
    """An exception from the app's data_received goes to the exception handler and closes the
    connection; connection_lost gets the exception, like asyncio."""
    server_ctx, client_ctx = tls_contexts
    seen = []

    class Boom(Collect):
        def data_received(self, data):
            raise ZeroDivisionError("boom")

    def peer(conn):
        tls = ManualTLS(conn, server_ctx)
        conn.sendall(tls.records(b"hello"))
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    async def main(peer):
        loop.set_exception_handler(lambda lp, ctx: seen.append(ctx))
        transport, proto = await loop.create_connection(
            lambda: Boom(loop), *peer.address, ssl=client_ctx, server_hostname="localhost"
        )
        exc = await asyncio.wait_for(proto.lost, TIMEOUT)
        assert isinstance(exc, ZeroDivisionError)

    with ThreadPeer(peer) as p:
        run(loop, main(p))
    assert seen and isinstance(seen[0]["exception"], ZeroDivisionError)
    assert seen[0]["message"] == "Fatal error on SSL protocol"


def test_start_tls_then_echo_many_records(loop, tls_contexts):
    """start_tls on a plain connection, then records of every size in both directions."""
    server_ctx, client_ctx = tls_contexts
    sizes = [5, 5000, 17000, 70000]

    def peer(conn):
        assert conn.recv(8) == b"STARTTLS"
        conn.sendall(b"OK")
        tls = ManualTLS(conn, server_ctx)
        for n in sizes:
            tls.obj.write(tls.recv_exactly(n))
            tls.flush()
        conn.sendall(tls.close_notify())

    async def main(peer):
        reader, writer = await asyncio.open_connection(*peer.address)
        writer.write(b"STARTTLS")
        assert await reader.readexactly(2) == b"OK"
        await writer.start_tls(client_ctx, server_hostname="localhost")
        for n in sizes:
            payload = bytes([n % 256]) * n
            writer.write(payload)
            assert await reader.readexactly(n) == payload
        assert await reader.read() == b""
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()

    if not hasattr(asyncio.StreamWriter, "start_tls"):
        pytest.skip("StreamWriter.start_tls needs Python 3.11")
    with ThreadPeer(peer) as p:
        run(loop, main(p))


def test_handshake_failure_and_timeout(loop, tls_contexts):
    """A certificate the client does not trust fails create_connection with
    SSLCertVerificationError; a peer that never answers the handshake times out."""
    server_ctx, _ = tls_contexts
    strict = ssl.create_default_context()  # does not trust the test CA

    def silent(conn):
        conn.settimeout(TIMEOUT)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    async def bad_cert(address):
        with pytest.raises(ssl.SSLCertVerificationError):
            await loop.create_connection(
                asyncio.Protocol, *address, ssl=strict, server_hostname="localhost"
            )

    async def timeout(address):
        with pytest.raises((ConnectionAbortedError, asyncio.TimeoutError)):
            await loop.create_connection(
                asyncio.Protocol, *address, ssl=strict, server_hostname="localhost",
                ssl_handshake_timeout=0.2,
            )

    def handshake(conn):
        with contextlib.suppress(ssl.SSLError, OSError):
            ManualTLS(conn, server_ctx)

    with ThreadPeer(handshake) as p:
        run(loop, bad_cert(p.address))
    with ThreadPeer(silent) as p:
        run(loop, timeout(p.address))


def test_custom_sslobject_class_is_used(loop, tls_contexts):
    """A context's own `sslobject_class` keeps its read/write methods on the data path."""
    server_ctx, _ = tls_contexts
    calls = {"read": 0, "write": 0}

    class CountingSSLObject(ssl.SSLObject):
        def read(self, *args, **kwargs):
            calls["read"] += 1
            return super().read(*args, **kwargs)

        def write(self, data):
            calls["write"] += 1
            return super().write(data)

    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.sslobject_class = CountingSSLObject

    def peer(conn):
        tls = ManualTLS(conn, server_ctx)
        tls.obj.write(tls.recv_exactly(5))
        tls.flush()
        conn.sendall(tls.close_notify())

    async def main(peer):
        reader, writer = await asyncio.open_connection(*peer.address, ssl=client_ctx)
        assert isinstance(writer.get_extra_info("ssl_object"), CountingSSLObject)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        assert await reader.read() == b""
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()

    with ThreadPeer(peer) as p:
        run(loop, main(p))
    assert calls["read"] >= 1 and calls["write"] >= 1


class Echo(Collect):
    """Collect, and write back each chunk at once (from inside data_received)."""

    def __init__(self, loop):
        super().__init__(loop)
        self.writing = []

    def data_received(self, data):
        super().data_received(data)
        self.transport.write(data)

    def pause_writing(self):
        self.writing.append("pause")

    def resume_writing(self):
        self.writing.append("resume")


def test_record_completed_by_a_later_read_is_delivered_whole(loop, tls_contexts):
    """Each record arrives in two socket writes cut at different places (inside the header,
    in the middle, before the last byte): once the second part is there, the whole record
    reaches the app, with no further bytes needed from the peer (the peer waits for the echo
    before sending anything else)."""
    server_ctx, client_ctx = tls_contexts
    sizes = [16 * 1024, 10 * 1024, 1, 5000, 16 * 1024 - 1, 3000]

    def peer(conn):
        tls = ManualTLS(conn, server_ctx)
        for i, n in enumerate(sizes):
            payload = bytes([i + 1]) * n
            wire = tls.records(payload)
            cut = [3, len(wire) // 2, len(wire) - 1][i % 3]
            conn.sendall(wire[:cut])
            time.sleep(0.02)
            conn.sendall(wire[cut:])
            assert tls.recv_exactly(n) == payload
        conn.sendall(tls.close_notify())
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    async def main(peer):
        transport, proto = await loop.create_connection(
            lambda: Echo(loop), *peer.address, ssl=client_ctx, server_hostname="localhost"
        )
        assert await asyncio.wait_for(proto.lost, TIMEOUT) is None
        assert bytes(proto.data) == b"".join(bytes([i + 1]) * n for i, n in enumerate(sizes))
        assert proto.calls[-2:] == ["eof", "lost"]

    with ThreadPeer(peer) as p:
        run(loop, main(p))


def test_pause_reading_in_data_received_holds_back_later_records(loop, tls_contexts):
    """The app pauses reading on its first data; records that arrive meanwhile (many in one
    write, close_notify among them) are delivered only after resume_reading, in order, then
    eof_received and connection_lost."""
    server_ctx, client_ctx = tls_contexts
    first = b"first" * 100
    later = [b"later%03d" % i * (1 + i * 37) for i in range(40)]
    ready = []

    class Pausing(Collect):
        def data_received(self, data):
            super().data_received(data)
            if len(self.calls) == 2:
                self.transport.pause_reading()
                ready.append(loop.time())
                loop.call_later(0.2, self.resume)

        def resume(self):
            self.calls.append("resume")
            self.transport.resume_reading()

    def peer(conn):
        tls = ManualTLS(conn, server_ctx)
        conn.sendall(tls.records(first))
        time.sleep(0.05)
        conn.sendall(tls.records(*later) + tls.close_notify())
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    async def main(peer):
        transport, proto = await loop.create_connection(
            lambda: Pausing(loop), *peer.address, ssl=client_ctx, server_hostname="localhost"
        )
        await asyncio.wait_for(proto.lost, TIMEOUT)
        assert bytes(proto.data) == first + b"".join(later)
        assert proto.calls[:3] == ["made", "data", "resume"]
        assert proto.calls[-2:] == ["eof", "lost"]
        assert set(proto.calls[3:-2]) == {"data"}

    with ThreadPeer(peer) as p:
        run(loop, main(p))


def test_large_echo_under_write_flow_control(loop, tls_contexts):
    """The app echoes 512 KiB from inside data_received while the peer reads nothing until
    it has sent it all, through a small socket send buffer: the TLS transport calls
    pause_writing, queues the rest, resumes once the peer reads, and every byte comes back
    in order."""
    server_ctx, client_ctx = tls_contexts
    total = 512 * 1024
    payload = bytes(i * 7 % 251 for i in range(total))

    def peer(conn):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        tls = ManualTLS(conn, server_ctx)
        # Records of many sizes, cut at odd places.
        pos = 0
        step = 1
        while pos < total:
            n = min(step * 997 % 20000 + 1, total - pos)
            wire = tls.records(payload[pos:pos + n])
            for i in range(0, len(wire), 6000):
                conn.sendall(wire[i:i + 6000])
            pos += n
            step += 1
        assert tls.recv_exactly(total) == payload
        conn.sendall(tls.close_notify())
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    async def main(peer):
        transport, proto = await loop.create_connection(
            lambda: Echo(loop), *peer.address, ssl=client_ctx, server_hostname="localhost"
        )
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        transport.set_write_buffer_limits(high=32768)
        assert await asyncio.wait_for(proto.lost, TIMEOUT) is None
        assert bytes(proto.data) == payload
        assert proto.writing[:2] == ["pause", "resume"]

    with ThreadPeer(peer) as p:
        run(loop, main(p))


def test_peer_close_mid_record(loop, tls_contexts):
    """The peer sends a record and half of the next, then shuts its side down without
    close_notify: the complete record is delivered, the half one is not, then (as asyncio's
    sslproto does on a transport EOF) eof_received and connection_lost(None)."""
    server_ctx, client_ctx = tls_contexts

    def peer(conn):
        tls = ManualTLS(conn, server_ctx)
        whole = tls.records(b"hello")
        half = tls.records(b"x" * 5000)
        conn.sendall(whole + half[: len(half) // 2])
        time.sleep(0.05)
        conn.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    async def main(peer):
        transport, proto = await loop.create_connection(
            lambda: Collect(loop), *peer.address, ssl=client_ctx, server_hostname="localhost"
        )
        exc = await asyncio.wait_for(proto.lost, TIMEOUT)
        assert bytes(proto.data) == b"hello"
        return exc, proto.calls

    with ThreadPeer(peer) as p:
        exc, calls = run(loop, main(p))
    assert exc is None
    assert calls == ["made", "data", "eof", "lost"]

