"""Datagram transports under load: bursts, many peers, closing mid-burst, errors.

ferroloop's native `_read_ready` receives several datagrams per readiness event and caches
address tuples and sockaddrs; CPython's loop receives one datagram per iteration. Everything
asserted here holds on both (the ``loop`` fixture runs each test on each loop).
"""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from conftest import requires_py311

TIMEOUT = 10


def run(loop, coro, timeout=TIMEOUT):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


def udp_peer(family=socket.AF_INET, host="127.0.0.1"):
    """A blocking datagram socket bound to `host` (a free port), or to the path `host` for
    AF_UNIX."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.bind(host if family == socket.AF_UNIX else (host, 0))
    except BaseException:
        s.close()
        raise
    s.settimeout(TIMEOUT)
    return s


@pytest.fixture
def peers(loop):
    """Makes peer sockets (udp_peer's arguments) and closes them after the test, before the
    loop fixture counts its fds."""
    made = []

    def make(*args):
        made.append(udp_peer(*args))
        return made[-1]

    try:
        yield make
    finally:
        for s in made:
            s.close()


async def open_endpoint(loop, on_datagram=None, **kw):
    """A datagram endpoint with a Recorder, bound to 127.0.0.1 unless `kw` says otherwise:
    (transport, protocol, the endpoint's own address)."""
    if not kw:
        kw = {"local_addr": ("127.0.0.1", 0)}
    transport, proto = await loop.create_datagram_endpoint(
        lambda: Recorder(loop, on_datagram), **kw
    )
    return transport, proto, transport.get_extra_info("sockname")


async def close_endpoint(transport, proto):
    """Close the transport; return the exception connection_lost() was called with."""
    transport.close()
    return await proto.lost


class Recorder(asyncio.DatagramProtocol):
    """Records datagrams and errors; `wait(n)` resolves once n datagrams arrived."""

    def __init__(self, loop, on_datagram=None):
        self.loop = loop
        self.transport = None
        self.received = []
        self.errors = []
        self.lost = loop.create_future()
        self.on_datagram = on_datagram
        self._waiters = []
        self.error = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.received.append((data, addr))
        for n, fut in self._waiters:
            if len(self.received) >= n and not fut.done():
                fut.set_result(None)
        if self.on_datagram is not None:
            self.on_datagram(self, data, addr)

    def error_received(self, exc):
        self.errors.append(exc)
        if not self.error.done():
            self.error.set_result(exc)

    def connection_lost(self, exc):
        self.lost.set_result(exc)

    async def wait(self, n):
        if len(self.received) >= n:
            return
        fut = self.loop.create_future()
        self._waiters.append((n, fut))
        await fut


def test_burst_is_delivered_in_order(loop, peers):
    """A burst queued before the loop looks (more than one batch): every datagram, in order,
    with its sender's address."""
    senders = [peers() for _ in range(3)]

    async def main():
        transport, proto, dest = await open_endpoint(loop)
        expected = []
        for i in range(150):  # all queued in the kernel before the loop polls again
            p = senders[i % 3]
            payload = b"%d" % i
            p.sendto(payload, dest)
            expected.append((payload, p.getsockname()))
        await proto.wait(len(expected))
        assert proto.received == expected
        await close_endpoint(transport, proto)

    run(loop, main())


@pytest.mark.parametrize("how", ["close", "abort"])
def test_close_in_datagram_received_stops_delivery(loop, peers, how):
    peer = peers()

    def on_datagram(proto, data, addr):
        getattr(proto.transport, how)()

    async def main():
        transport, proto, dest = await open_endpoint(loop, on_datagram)
        for i in range(10):
            peer.sendto(b"%d" % i, dest)
        assert await proto.lost is None
        await asyncio.sleep(0.05)
        assert proto.received == [(b"0", peer.getsockname())]
        assert transport.is_closing()

    run(loop, main())


def test_stop_in_datagram_received_ends_delivery_for_this_run(loop, peers):
    """asyncio receives one datagram per readiness event, so loop.stop() called from
    datagram_received leaves the datagrams still queued for the next run of the loop."""
    peer = peers()

    def on_datagram(proto, data, addr):
        loop.stop()

    transport, proto, dest = run(loop, open_endpoint(loop, on_datagram))
    try:
        for i in range(5):
            peer.sendto(b"%d" % i, dest)
        loop.run_forever()
        assert [d for d, _ in proto.received] == [b"0"]
        loop.run_forever()
        assert [d for d, _ in proto.received] == [b"0", b"1"]
    finally:
        # closed outside the loop: the datagrams still queued must not reach on_datagram
        transport.close()
        run(loop, proto.lost)


@requires_py311  # datagram transports gained pause_reading() in CPython 3.11
def test_pause_reading_in_datagram_received_holds_the_rest_until_resume(loop, peers):
    """asyncio's datagram transports have pause_reading/resume_reading/is_reading (from its
    selector transport base); pausing inside datagram_received delivers nothing more."""
    peer = peers()

    def on_datagram(proto, data, addr):
        proto.transport.pause_reading()

    async def main():
        transport, proto, dest = await open_endpoint(loop, on_datagram)
        assert transport.is_reading()
        for i in range(5):
            peer.sendto(b"%d" % i, dest)
        await proto.wait(1)
        await asyncio.sleep(0.05)
        assert [d for d, _ in proto.received] == [b"0"]
        assert not transport.is_reading()
        transport.pause_reading()  # already paused: no-op
        transport.resume_reading()
        await proto.wait(2)
        await asyncio.sleep(0.05)
        assert [d for d, _ in proto.received] == [b"0", b"1"]
        transport.close()
        assert not transport.is_reading()
        transport.resume_reading()  # closing: no-op
        await proto.lost

    run(loop, main())


def test_exception_in_datagram_received_goes_to_handler(loop, peers):
    """A raising datagram_received is reported to the exception handler; the datagrams after
    it are still delivered, in order."""
    peer = peers()
    reported = []

    def on_datagram(proto, data, addr):
        if data == b"boom":
            raise ZeroDivisionError("boom")

    async def main():
        loop.set_exception_handler(lambda lp, ctx: reported.append(ctx.get("exception")))
        transport, proto, dest = await open_endpoint(loop, on_datagram)
        sent = [b"a", b"boom", b"b", b"boom", b"c"]
        for d in sent:
            peer.sendto(d, dest)
        await proto.wait(len(sent))
        assert [d for d, _ in proto.received] == sent
        assert len(reported) == 2 and all(isinstance(e, ZeroDivisionError) for e in reported)
        assert not transport.is_closing()
        await close_endpoint(transport, proto)

    run(loop, main())


def test_callbacks_scheduled_per_datagram_all_run_in_order(loop, peers):
    peer = peers()
    order = []

    def on_datagram(proto, data, addr):
        order.append(("dgram", data))
        loop.call_soon(order.append, ("cb", data))

    async def main():
        transport, proto, dest = await open_endpoint(loop, on_datagram)
        for i in range(50):
            peer.sendto(b"%d" % i, dest)
        await proto.wait(50)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert [d for k, d in order if k == "dgram"] == [b"%d" % i for i in range(50)]
        assert [d for k, d in order if k == "cb"] == [b"%d" % i for i in range(50)]
        # a callback never runs before the datagram that scheduled it
        for i in range(50):
            assert order.index(("dgram", b"%d" % i)) < order.index(("cb", b"%d" % i))
        await close_endpoint(transport, proto)

    run(loop, main())


def test_echo_to_many_peers(loop, peers):
    """More peers than any address cache has slots: every reply reaches its own sender."""
    senders = [peers() for _ in range(150)]

    def echo(proto, data, addr):
        proto.transport.sendto(data + b"!", addr)

    async def main():
        transport, proto, dest = await open_endpoint(loop, echo)
        for rnd in range(2):
            for i, p in enumerate(senders):
                p.sendto(b"%d-%d" % (rnd, i), dest)
            await proto.wait(len(senders) * (rnd + 1))
            for i, p in enumerate(senders):
                data, addr = await loop.run_in_executor(None, p.recvfrom, 100)
                assert (data, addr) == (b"%d-%d!" % (rnd, i), dest)
        assert {a for _, a in proto.received} == {p.getsockname() for p in senders}
        for data, addr in proto.received:
            assert type(addr) is tuple and type(addr[0]) is str and type(addr[1]) is int
            assert addr == senders[int(data.split(b"-")[1])].getsockname()
        await close_endpoint(transport, proto)

    run(loop, main())


def test_sendto_address_objects(loop, peers):
    """Fresh tuples, reused tuples, subclasses and host names: each datagram goes where its
    own address says."""
    a, b = peers(), peers()

    class Host(str):
        pass

    class Port(int):
        pass

    async def main():
        transport, proto, _ = await open_endpoint(loop)
        pa, pb = a.getsockname()[1], b.getsockname()[1]
        expect = {pa: [], pb: []}
        reused = {pa: ("127.0.0.1", pa), pb: ("127.0.0.1", pb)}
        for i in range(200):
            port = pa if i % 3 else pb
            kind = i % 5
            if kind == 0:
                addr = tuple(["127.0.0.1", port])  # a new object every time
            elif kind == 1:
                addr = reused[port]
            elif kind == 2:
                addr = (Host("127.0.0.1"), Port(port))
            elif kind == 3:
                addr = ("localhost", port)
            else:
                addr = ["127.0.0.1", port][0], port
            payload = b"%d" % i
            transport.sendto(payload, addr)
            expect[port].append(payload)
            del addr
        for sock, port in ((a, pa), (b, pb)):
            got = []
            for _ in expect[port]:
                data, _ = await loop.run_in_executor(None, sock.recvfrom, 100)
                got.append(data)
            assert got == expect[port]
        await close_endpoint(transport, proto)

    run(loop, main())


@pytest.mark.parametrize("addr", ["127.0.0.1", ("127.0.0.1",), ("127.0.0.1", "x")])
def test_sendto_bad_address_is_fatal_as_in_asyncio(loop, addr):
    """A malformed address (not an OSError) is a fatal write error: reported to the exception
    handler, the transport closed with the TypeError."""
    reported = []

    async def main():
        loop.set_exception_handler(lambda lp, ctx: reported.append(ctx))
        transport, proto, _ = await open_endpoint(loop)
        transport.sendto(b"x", addr)
        assert transport.is_closing()
        exc = await proto.lost
        assert isinstance(exc, TypeError)
        assert [ctx["message"] for ctx in reported] == ["Fatal write error on datagram transport"]

    run(loop, main())


def test_connected_sock_sends_to_its_peer(loop, peers):
    """An endpoint made from an already connected socket sends with send(): the address
    passed to sendto is not used (asyncio's behaviour)."""
    a, b = peers(), peers()

    async def main():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.connect(a.getsockname())
        transport, proto, _ = await open_endpoint(loop, sock=sock)
        transport.sendto(b"hello", b.getsockname())
        data, addr = await loop.run_in_executor(None, a.recvfrom, 100)
        assert (data, addr) == (b"hello", sock.getsockname())
        await close_endpoint(transport, proto)

    run(loop, main())


def test_icmp_error_goes_to_error_received(loop):
    """A connected endpoint whose peer port is closed: the ICMP error is reported through
    error_received, and the transport stays usable."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()

    async def main():
        transport, proto, _ = await open_endpoint(loop, remote_addr=closed)
        transport.sendto(b"anyone?")
        exc = await proto.error
        assert isinstance(exc, ConnectionRefusedError)
        assert not transport.is_closing()
        assert await close_endpoint(transport, proto) is None

    run(loop, main())


def test_ipv6_echo(loop, peers):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        peer = peers(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no ::1")

    async def main():
        transport, proto, dest = await open_endpoint(loop, local_addr=("::1", 0))
        for i in range(40):
            peer.sendto(b"%d" % i, dest)
        await proto.wait(40)
        assert [d for d, _ in proto.received] == [b"%d" % i for i in range(40)]
        assert all(a[:2] == peer.getsockname()[:2] for _, a in proto.received)
        transport.sendto(b"back", proto.received[0][1])
        data, addr = await loop.run_in_executor(None, peer.recvfrom, 100)
        assert data == b"back" and addr[:2] == dest[:2]
        await close_endpoint(transport, proto)

    run(loop, main())


def test_unix_datagram_echo(loop, peers, tmp_path):
    server_path = str(tmp_path / "srv.sock")
    peer_path = str(tmp_path / "peer.sock")
    peer = peers(socket.AF_UNIX, peer_path)

    def echo(proto, data, addr):
        proto.transport.sendto(data.upper(), addr)

    async def main():
        transport, proto, _ = await open_endpoint(
            loop, echo, local_addr=server_path, family=socket.AF_UNIX
        )
        # a Unix datagram queue holds few datagrams (net.unix.max_dgram_qlen, often 10)
        for rnd in range(5):
            for i in range(5):
                peer.sendto(b"u%d-%d" % (rnd, i), server_path)
            await proto.wait(5 * (rnd + 1))
            for i in range(5):
                data, addr = await loop.run_in_executor(None, peer.recvfrom, 100)
                assert (data, addr) == (b"U%d-%d" % (rnd, i), server_path)
        assert proto.received == [
            (b"u%d-%d" % (rnd, i), peer_path) for rnd in range(5) for i in range(5)
        ]
        await close_endpoint(transport, proto)

    run(loop, main())


def test_transport_subclass_and_stray_self(loop, loop_impl, peers):
    """ferroloop only: the native methods read a transport's slots directly only for the exact
    class; a subclass instance takes the generic attribute path, anything else gets the
    AttributeError a Python method would raise (never a crash)."""
    if loop_impl.name != "ferroloop":
        pytest.skip("ferroloop's transport class")
    from ferroloop._net.datagram import DatagramTransport

    class Sub(DatagramTransport):
        pass

    loop._make_datagram_transport = lambda *a, **kw: Sub(loop, *a, **kw)
    peer = peers()

    def echo(proto, data, addr):
        proto.transport.sendto(data * 2, addr)

    async def main():
        transport, proto, dest = await open_endpoint(loop, echo)
        assert type(transport) is Sub
        for i in range(40):
            peer.sendto(b"%d" % i, dest)
        await proto.wait(40)
        for i in range(40):
            data, _ = await loop.run_in_executor(None, peer.recvfrom, 100)
            assert data == b"%d%d" % (i, i)
        with pytest.raises(AttributeError):
            DatagramTransport.sendto(object(), b"x", dest)
        with pytest.raises(AttributeError):
            DatagramTransport._read_ready(object())
        await close_endpoint(transport, proto)

    run(loop, main())


@pytest.mark.parametrize("family", ["inet", "unix"])
def test_connected_endpoint_sendto_without_address(loop, peers, family, tmp_path):
    """A connected endpoint: sendto(data) and sendto(data, its own address) both reach the
    peer, in order; an empty datagram is not sent (3.11); another address is a ValueError."""
    if family == "inet":
        peer = peers()
        peer_addr = peer.getsockname()
        kw = {"remote_addr": peer_addr}
    else:
        peer_addr = str(tmp_path / "peer.sock")
        peer = peers(socket.AF_UNIX, peer_addr)
        kw = {"remote_addr": peer_addr, "local_addr": str(tmp_path / "me.sock"),
              "family": socket.AF_UNIX}

    async def main():
        transport, proto, _ = await open_endpoint(loop, **kw)
        assert transport.get_extra_info("peername") == peer_addr
        sent = []
        for i in range(8):  # a Unix datagram queue may hold as few as 10
            payload = b"c%d" % i
            if i % 2:
                transport.sendto(payload)
            else:
                transport.sendto(payload, peer_addr)
            sent.append(payload)
        if sys.version_info < (3, 12):  # newer CPythons may send empty datagrams
            transport.sendto(b"")
        with pytest.raises(ValueError, match="Invalid address"):
            transport.sendto(b"x", ("127.0.0.1", 1) if family == "inet" else "/nonexistent")
        got = []
        for _ in sent:
            data, addr = await loop.run_in_executor(None, peer.recvfrom, 100)
            got.append(data)
            assert addr == transport.get_extra_info("sockname")
        assert got == sent
        peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            peer.recvfrom(100)  # nothing more: the empty datagram was not sent
        await close_endpoint(transport, proto)

    run(loop, main())


def test_transport_methods_given_wrong_arguments_raise_type_error(loop, peers):
    """The native `_read_ready` and `sendto` take arguments as the Python methods do: a wrong
    call raises TypeError (and does nothing), keywords are accepted where Python accepts them."""
    peer = peers()

    async def main():
        transport, proto, dest = await open_endpoint(loop)
        for call in (
            lambda: transport._read_ready(1),
            lambda: transport._read_ready(x=1),
            lambda: transport.sendto(b"a", None, 1),
            lambda: transport.sendto(),
            lambda: transport.sendto(b"a", bogus=1),
        ):
            with pytest.raises(TypeError):
                call()
        transport.sendto(data=b"kw", addr=peer.getsockname())
        transport.sendto(b"kw2", addr=peer.getsockname())
        assert peer.recvfrom(100)[0] == b"kw"
        assert peer.recvfrom(100)[0] == b"kw2"
        peer.sendto(b"back", dest)
        await proto.wait(1)
        assert proto.received == [(b"back", peer.getsockname())]
        await close_endpoint(transport, proto)

    run(loop, main())
