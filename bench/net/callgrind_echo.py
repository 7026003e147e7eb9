#!/usr/bin/env python3
"""Server instructions per request of the streams echo, counted by callgrind (deterministic).

    python bench/net/callgrind_echo.py --loops ferroloop,uvloop --size 1024
    python bench/net/callgrind_echo.py --loops ferroloop --size 10240 --keep /tmp/cg

The server (server.py's `echo_stream` on `asyncio.start_server`) runs under
`valgrind --tool=callgrind` and exits once its clients are gone; the client is a plain
Python process, `--conns` connections in ping-pong, each doing N round trips. Each loop
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

HERE = os.path.dirname(os.path.abspath(__file__))


def serve(loop_name: str, conns: int) -> None:
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.dirname(HERE))
    import asyncio

    import loops
    import server

    loop = loops.factory(loop_name)()
    asyncio.set_event_loop(loop)
    done = 0

    async def handler(reader, writer):
        nonlocal done
        try:
            await server.echo_stream(reader, writer)
        finally:
            done += 1
            if done == conns:
                loop.call_later(0.05, loop.stop)

    srv = loop.run_until_complete(asyncio.start_server(handler, "127.0.0.1", 0))
    print("READY", srv.sockets[0].getsockname()[1], flush=True)
    loop.run_forever()
    srv.close()
    loop.close()


def client(port: int, conns: int, size: int, rounds: int) -> None:
    msg = b"x" * size
    sel = selectors.DefaultSelector()
    left = {}
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(msg)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        left[s] = [rounds, 0]
    while left:
        for key, _ in sel.select():
            s = key.fileobj
            st = left[s]
            st[1] += len(s.recv(1 << 20))
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


def measure(loop_name: str, conns: int, size: int, rounds: int, out: str) -> int:
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
           sys.executable, os.path.abspath(__file__), "--serve", loop_name, "--conns", str(conns)]
    with open(out + ".log", "w") as log:
        srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            tag, port = srv.stdout.readline().split()
            assert tag == "READY", tag
            client(int(port), conns, size, rounds)
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
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--base", type=int, default=100, help="round trips per connection, first run")
    ap.add_argument("--extra", type=int, default=1000, help="more round trips per connection, second run")
    ap.add_argument("--keep", help="directory for the callgrind files (default: a temporary one)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.conns)
        return 0
    tmp = args.keep or tempfile.mkdtemp(prefix="cg-echo-")
    os.makedirs(tmp, exist_ok=True)
    for name in args.loops.split(","):
        a = measure(name, args.conns, args.size, args.base, os.path.join(tmp, f"{name}-{args.size}-a.out"))
        b = measure(name, args.conns, args.size, args.base + args.extra,
                    os.path.join(tmp, f"{name}-{args.size}-b.out"))
        per = (b - a) / (args.conns * args.extra)
        print(f"{name:10s} {args.size:7d} B  {per:9,.0f} instructions/request  (files in {tmp})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
