#!/usr/bin/env python3
"""Server instructions per request of an echo server, counted by callgrind (deterministic).

    python bench/net/callgrind_echo.py --loops ferroloop,uvloop --size 1024
    python bench/net/callgrind_echo.py --loops ferroloop --size 10240 --keep /tmp/cg
    python bench/net/callgrind_echo.py --kind tls-proto --size 1024,10240

Kinds (the servers of bench/net/server.py):
  tcp-stream  `echo_stream` on `asyncio.start_server` (the default)
  tcp-proto   `EchoProtocol` on `loop.create_server`
  tls-proto   `EchoProtocol` on `loop.create_server(ssl=...)` (TLS 1.3; the client is
              Python's `ssl`, certificates from runner.make_certs)
  tcp-stream-churn, tcp-proto-churn
              the same servers, and a client that opens a connection per round trip
              (connect, one `--size`-byte echo, close): the figure is then the cost of a
              whole connection (accept, transport, protocol, echo, EOF, close)

The server runs under `valgrind --tool=callgrind` and exits once its clients are gone;
the client is a plain Python process, `--conns` connections in ping-pong, each doing N
round trips. Each loop
runs twice, with N = `--base` and N = `--base + --extra`: the difference in total
instructions over `conns * extra` requests is the cost per request, start-up and
connection set-up excluded. A wall-clock benchmark on a shared machine cannot tell a 2%
change; this can. (valgrind counts each byte of a `rep movsb` copy as an instruction, so
large messages overstate memcpy.) `--keep DIR` keeps the callgrind files for
`callgrind_annotate`.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import socket
import subprocess
import sys
import tempfile
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("tcp-stream", "tcp-proto", "tls-proto", "tcp-stream-churn", "tcp-proto-churn")


def serve(loop_name: str, kind: str, expect: int, certs: Optional[str]) -> None:
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.dirname(HERE))
    import asyncio

    import loops
    import server

    loop = loops.factory(loop_name)()
    asyncio.set_event_loop(loop)
    done = 0

    def one_gone():
        nonlocal done
        done += 1
        if done == expect:
            loop.call_later(0.05, loop.stop)

    if kind.startswith("tcp-stream"):
        async def handler(reader, writer):
            try:
                await server.echo_stream(reader, writer)
            finally:
                one_gone()

        coro = asyncio.start_server(handler, "127.0.0.1", 0)
    else:
        class Echo(server.EchoProtocol):
            def connection_lost(self, exc):
                super().connection_lost(exc)
                one_gone()

        ctx = None
        if kind == "tls-proto":
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(os.path.join(certs, "cert.pem"), os.path.join(certs, "key.pem"))
        coro = loop.create_server(Echo, "127.0.0.1", 0, ssl=ctx)
    srv = loop.run_until_complete(coro)
    print("READY", srv.sockets[0].getsockname()[1], flush=True)
    loop.run_forever()
    srv.close()
    loop.close()


def connect(port: int, certs: Optional[str]) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if certs is None:
        return s
    import ssl

    ctx = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
    return ctx.wrap_socket(s, server_hostname="localhost")  # blocking handshake


def receive(s: socket.socket) -> int:
    """What one readable event brings (all of it: an SSL socket may buffer records)."""
    if not hasattr(s, "pending"):
        return len(s.recv(1 << 20))
    import ssl

    got = 0
    while True:
        try:
            data = s.recv(1 << 20)
        except ssl.SSLWantReadError:
            return got
        if not data:
            return got
        got += len(data)
        if not s.pending():
            return got


def client(port: int, conns: int, size: int, rounds: int, certs: Optional[str]) -> None:
    msg = b"x" * size
    sel = selectors.DefaultSelector()
    left = {}
    for _ in range(conns):
        s = connect(port, certs)
        s.sendall(msg)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        left[s] = [rounds, 0]
    while left:
        for key, _ in sel.select():
            s = key.fileobj
            st = left[s]
            st[1] += receive(s)
            if st[1] < size:
                continue
            st[0] -= 1
            st[1] -= size
            if st[0] == 0:
                sel.unregister(s)
                s.close()
                del left[s]
            else:
                s.setblocking(True)
                s.sendall(msg)
                s.setblocking(False)


def churn_client(port: int, conns: int, size: int, rounds: int) -> None:
    """`conns * rounds` whole connections, one after another: connect, echo, close."""
    msg = b"x" * size
    for _ in range(conns * rounds):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(msg)
        got = 0
        while got < size:
            data = s.recv(1 << 20)
            if not data:
                raise SystemExit("server closed a churn connection before its echo")
            got += len(data)
        s.close()


def measure(loop_name: str, kind: str, conns: int, size: int, rounds: int, out: str,
            certs: Optional[str]) -> int:
    churn = kind.endswith("-churn")
    expect = conns * rounds if churn else conns
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
           sys.executable, os.path.abspath(__file__), "--serve", loop_name, "--kind", kind,
           "--expect", str(expect)]
    if certs is not None:
        cmd += ["--certs", certs]
    with open(out + ".log", "w") as log:
        srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            tag, port = srv.stdout.readline().split()
            assert tag == "READY", tag
            if churn:
                churn_client(int(port), conns, size, rounds)
            else:
                client(int(port), conns, size, rounds, certs)
            if srv.wait(timeout=600) != 0:
                raise SystemExit(f"server failed, see {out}.log")
        finally:
            if srv.poll() is None:
                srv.kill()
    with open(out) as f:
        m = re.search(r"^summary: (\d+)", f.read(), re.M)
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loops", default="ferroloop,uvloop")
    ap.add_argument("--kind", default="tcp-stream", choices=KINDS)
    ap.add_argument("--size", default="1024", help="message size(s) in bytes, comma-separated")
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--base", type=int, default=100, help="round trips per connection, first run")
    ap.add_argument("--extra", type=int, default=1000, help="more round trips per connection, second run")
    ap.add_argument("--keep", help="directory for the callgrind files (default: a temporary one)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--certs", help=argparse.SUPPRESS)
    ap.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.kind, args.expect, args.certs)
        return 0
    tmp = args.keep or tempfile.mkdtemp(prefix="cg-echo-")
    os.makedirs(tmp, exist_ok=True)
    certs = None
    if args.kind == "tls-proto":
        certs = make_certs(os.path.join(tmp, "certs"))
    for size in [int(x) for x in args.size.split(",")]:
        for name in args.loops.split(","):
            base = os.path.join(tmp, f"{name}-{args.kind}-{size}")
            a = measure(name, args.kind, args.conns, size, args.base, base + "-a.out", certs)
            b = measure(name, args.kind, args.conns, size, args.base + args.extra, base + "-b.out", certs)
            per = (b - a) / (args.conns * args.extra)
            unit = "connection" if args.kind.endswith("-churn") else "request"
            print(f"{args.kind:10s} {name:10s} {size:7d} B  {per:9,.0f} instructions/{unit}  (files in {tmp})",
                  flush=True)
    return 0


def make_certs(d: str) -> str:
    """runner.make_certs's CA and localhost leaf, as ca.pem / cert.pem / key.pem in `d`."""
    sys.path.insert(0, HERE)
    import runner

    os.makedirs(d, exist_ok=True)
    runner.make_certs(d)
    return d


if __name__ == "__main__":
    sys.exit(main())
