"""Real client and server libraries on the loop: uvicorn with httpx, asyncpg against PostgreSQL,
redis-py against a Redis server. Each test runs on CPython's loop and on ferroloop.

The database servers are started by session fixtures in a temporary directory (PostgreSQL's
initdb/postgres, redis-server). Where a server binary is missing the test is skipped with the
reason; `.ci/run` installs redis-server, and PostgreSQL is part of the machine image.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening on port {port}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# uvicorn + httpx
# ---------------------------------------------------------------------------------------------


async def _echo_app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/octet-stream")],
        }
    )
    await send({"type": "http.response.body", "body": b"echo:" + body})


def test_uvicorn_server_with_httpx_client(loop):
    async def main():
        # log_config=None: uvicorn's dictConfig() would close every logging handler, pytest's too
        # (3.9 then reopens pytest's log file in a later test, which the fd-leak check sees).
        config = uvicorn.Config(
            _echo_app, host="127.0.0.1", port=0, log_config=None, log_level="warning", loop="none"
        )
        server = uvicorn.Server(config)
        serving = asyncio.ensure_future(server.serve())
        while not server.started:
            assert not serving.done(), serving
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/"
        try:
            async with httpx.AsyncClient(timeout=20) as client:
                replies = await asyncio.gather(
                    *(client.post(url, content=b"req%d" % i) for i in range(40))
                )
                assert [r.status_code for r in replies] == [200] * 40
                assert [r.content for r in replies] == [b"echo:req%d" % i for i in range(40)]
                big = os.urandom(3 * 1024 * 1024)  # several reads and flow-controlled writes
                reply = await client.post(url, content=big)
                assert reply.content == b"echo:" + big
        finally:
            server.should_exit = True
            await serving

    loop.run_until_complete(main())


# ---------------------------------------------------------------------------------------------
# asyncpg + PostgreSQL
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server: (host socket dir, tcp port). Skips without initdb."""
    pytest.importorskip("asyncpg")
    initdb = shutil.which("initdb") or shutil.which("initdb", path="/usr/lib/postgresql/15/bin")
    postgres_bin = shutil.which("postgres") or shutil.which("postgres", path="/usr/lib/postgresql/15/bin")
    if not initdb or not postgres_bin:
        pytest.skip("PostgreSQL (initdb, postgres) is not installed")
    root = tempfile.mkdtemp(prefix="ferroloop-pg-")
    as_user = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user for initdb")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
    data = os.path.join(root, "data")
    subprocess.run(
        as_user + [initdb, "-D", data, "-A", "trust", "-U", "postgres"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port = _free_port()
    proc = subprocess.Popen(
        as_user + [postgres_bin, "-D", data, "-p", str(port), "-k", root, "-c", "listen_addresses=127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc, "postgres")
        yield root, port
    finally:
        _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def test_asyncpg_queries_copy_pool_and_cancellation(loop, postgres):
    import asyncpg

    sockdir, port = postgres

    async def main():
        # Unix socket connection
        conn = await asyncpg.connect(host=sockdir, port=port, user="postgres", database="postgres")
        try:
            assert await conn.fetchval("select 1 + $1::int", 41) == 42
            await conn.execute("create temp table t(i int, s text)")
            await conn.copy_records_to_table("t", records=[(i, f"s{i}") for i in range(20000)])
            assert await conn.fetchval("select count(*) from t") == 20000
            rows = await conn.fetch("select i, s from t order by i limit 3")
            assert [tuple(r) for r in rows] == [(0, "s0"), (1, "s1"), (2, "s2")]
            # a query cancelled by a timeout leaves the connection usable
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.fetchval("select pg_sleep(10)"), 0.2)
            assert await conn.fetchval("select 7") == 7
        finally:
            await conn.close()
        # TCP pool, concurrent queries
        pool = await asyncpg.create_pool(
            host="127.0.0.1", port=port, user="postgres", database="postgres", min_size=2, max_size=5
        )
        try:
            got = await asyncio.gather(
                *(pool.fetchval("select pg_sleep(0.01)::text || $1::text", str(i)) for i in range(30))
            )
            assert got == [str(i) for i in range(30)]
        finally:
            await pool.close()

    loop.run_until_complete(main())


# ---------------------------------------------------------------------------------------------
# redis-py + Redis
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_port():
    pytest.importorskip("redis")
    server = shutil.which("redis-server")
    if not server:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc, "redis-server")
        yield port
    finally:
        _stop(proc)


def test_redis_commands_pipeline_and_pubsub(loop, redis_port):
    import redis.asyncio as aredis

    async def main():
        r = aredis.Redis(host="127.0.0.1", port=redis_port)
        try:
            key = f"ferroloop-{os.getpid()}-{id(loop)}"
            await r.set(key, "v")
            assert await r.get(key) == b"v"
            pipe = r.pipeline()
            for _ in range(2000):
                pipe.incr(key + ":n")
            out = await pipe.execute()
            assert out == list(range(1, 2001))
            pubsub = r.pubsub()
            await pubsub.subscribe(key + ":ch")
            await r.publish(key + ":ch", "hello")
            message = None
            for _ in range(100):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                if message:
                    break
            assert message is not None and message["data"] == b"hello"
            await pubsub.aclose()
            await r.delete(key, key + ":n")
        finally:
            await r.aclose()

    loop.run_until_complete(main())
