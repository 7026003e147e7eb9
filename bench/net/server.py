#!/usr/bin/env python3
"""One benchmark server on one event loop, in its own process.

    python bench/net/server.py --loop uvloop --kind tcp-proto [--host 127.0.0.1 --port 0]
    python bench/net/server.py --loop ferroloop --kind unix-proto --path /tmp/x.sock
    python bench/net/server.py --loop asyncio --kind tls-proto --cert c.pem --key k.pem

Kinds:
  tcp-proto    TCP echo on an asyncio.Protocol (data_received -> transport.write);
               also the server of the "tcp-proto churn" case (one echo per connection)
  tcp-stream   TCP echo on asyncio.start_server (reader.read -> writer.write; drain);
               also the server of the "tcp-stream churn" case
  unix-proto   Unix-socket echo on an asyncio.Protocol
  udp          UDP echo on a DatagramProtocol (datagram_received -> sendto)
  tls-proto    TLS echo on an asyncio.Protocol (create_server(ssl=...))
  http         HTTP/1.1 keep-alive hello world, httptools request parser
  idle         same as tcp-proto (for the many-idle-connections run)

Prints one line `READY {json}` on stdout once listening, then serves until
killed. If the loop lacks what the kind needs, prints `UNSUPPORTED {json}`
and exits with status 3. The runner measures this process from outside
(/proc/<pid>/stat, schedstat and status), so nothing here is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # bench/, for loops.py

import loops  # noqa: E402

HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 12\r\n"
    b"\r\n"
    b"Hello World!"
)


class EchoProtocol(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        self.transport = None


class EchoDatagram(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


async def echo_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    try:
        while True:
            data = await reader.read(262144)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class HttpProtocol(asyncio.Protocol):
    """Minimal keep-alive HTTP/1.1 server on httptools (as uvloop's http bench)."""

    __slots__ = ("transport", "parser", "url")

    def __init__(self, httptools):
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.url = None

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.transport = None

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except Exception:
            self.transport.close()

    # httptools callbacks
    def on_url(self, url):
        self.url = url

    def on_message_complete(self):
        self.transport.write(HTTP_RESPONSE)
        if not self.parser.should_keep_alive():
            self.transport.close()


class Unsupported(Exception):
    pass


KEEP = []  # the Server / transport objects: keep them referenced for the process's lifetime


async def start(loop, args):
    kind = args.kind
    host, port = args.host, args.port
    if kind in ("tcp-proto", "idle"):
        srv = await loop.create_server(EchoProtocol, host, port, backlog=args.backlog)
        KEEP.append(srv)
        return srv.sockets[0].getsockname()
    if kind == "tcp-stream":
        srv = await asyncio.start_server(echo_stream, host, port, backlog=args.backlog)
        KEEP.append(srv)
        return srv.sockets[0].getsockname()
    if kind == "unix-proto":
        if not hasattr(loop, "create_unix_server"):
            raise Unsupported("no create_unix_server")
        srv = await loop.create_unix_server(EchoProtocol, args.path, backlog=args.backlog)
        KEEP.append(srv)
        return args.path
    if kind == "udp":
        transport, _ = await loop.create_datagram_endpoint(EchoDatagram, local_addr=(host, port))
        KEEP.append(transport)
        return transport.get_extra_info("sockname")
    if kind == "tls-proto":
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        srv = await loop.create_server(EchoProtocol, host, port, ssl=ctx, backlog=args.backlog)
        KEEP.append(srv)
        return srv.sockets[0].getsockname()
    if kind == "http":
        try:
            import httptools
        except ImportError:
            raise Unsupported("httptools is not installed (pip install -r bench/requirements.txt)") from None

        srv = await loop.create_server(lambda: HttpProtocol(httptools), host, port, backlog=args.backlog)
        KEEP.append(srv)
        return srv.sockets[0].getsockname()
    raise SystemExit(f"unknown kind {kind!r}")


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def say(tag: str, obj) -> None:
    sys.stdout.write(f"{tag} {json.dumps(obj)}\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loop", required=True, choices=sorted(list(loops.LOOPS) + list(loops.EXTRA_LOOPS)))
    ap.add_argument("--kind", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--path", help="Unix socket path (unix-proto)")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--backlog", type=int, default=1024)
    args = ap.parse_args(argv)
    raise_nofile()
    # A loop that does not import is an error here, not "n/a": the runner probed it at start,
    # so a failure now means it broke mid-run (e.g. reinstalled under our feet).
    loop = loops.factory(args.loop)()
    asyncio.set_event_loop(loop)
    try:
        addr = loop.run_until_complete(start(loop, args))
    except Unsupported as e:
        say("UNSUPPORTED", {"reason": str(e)})
        return 3
    except (NotImplementedError, AttributeError, TypeError) as e:
        # A loop without the feature (rloop: no Unix sockets, no TLS, ...).
        say("UNSUPPORTED", {"reason": f"{type(e).__name__}: {e}"})
        return 3
    cls = type(loop)
    mod = sys.modules.get(loops.spec_of(args.loop).module)
    build = loops._extension_stamp(os.path.dirname(getattr(mod, "__file__", "") or ""))
    say("READY", {"addr": addr, "pid": os.getpid(), "loop_class": f"{cls.__module__}.{cls.__qualname__}",
                  "build": build})
    try:
        loop.run_forever()
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
