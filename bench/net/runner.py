#!/usr/bin/env python3
"""ferroloop network benchmarks: one server process per loop, one load generator for all.

    python bench/run.py --suite net              # full run (~8-9 min on 2 cores)
    python bench/run.py --suite net --quick      # smoke run (~1 min)
    python bench/run.py --suite net --loops ferroloop,uvloop,native --cases tcp-proto,udp --repeat 5
    python bench/net/runner.py ...               # the same, directly

Each (case group, server, repeat) starts a fresh server process
(bench/net/server.py on one loop, or the native Rust server), drives it with the
Rust load generator (bench/netbench, `loadgen`) or wrk (HTTP), and reads the
server's CPU time (user+system, all threads) from /proc/<pid> right before and
right after the measured phase: server CPU per request = delta / requests.
Throughput is the client's count over the client's clock. Medians over repeats;
ratios are to uvloop, "higher is better" for both ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import glob
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
REPO = os.path.dirname(BENCH)
CRATE = os.path.join(BENCH, "netbench")
TARGET = os.path.join(CRATE, "target")
LOADGEN = os.path.join(TARGET, "release", "loadgen")
NATIVE = os.path.join(TARGET, "release", "native_server")
SERVER_PY = os.path.join(HERE, "server.py")

sys.path.insert(0, BENCH)
import loops as loops_mod  # noqa: E402
from _common import parse_list, save_results, table  # noqa: E402

PY_LOOPS = list(loops_mod.LOOPS)  # asyncio, uvloop, rloop, rsloop, ferroloop
EXTRA_LOOPS = list(loops_mod.EXTRA_LOOPS)  # run only when named in --loops (rsloop-std)
# What ferroloop is held against.
PEERS = [n for n in PY_LOOPS + EXTRA_LOOPS if n not in ("asyncio", "ferroloop")]
SERVERS = PY_LOOPS + ["native"]
BASELINE = "uvloop"
BUILDS: Dict[str, set] = {}  # server -> extension builds seen in READY lines (a rebuild mid-run is flagged)
NOISY = 0.20  # spread of CPU/req over repeats above which a cell is marked "~"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KIB = 1024


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # row label, e.g. "tcp-proto 1KiB"
    group: str  # server kind (server.py --kind); one server process serves a group's cases
    client: str  # loadgen mode, "wrk" or "idle"
    size: int = 0  # message bytes
    what: str = ""


NATIVE_MODE = {
    "tcp-proto": "tcp",
    "tcp-stream": "tcp",
    "unix-proto": "unix",
    "udp": "udp",
    "tls-proto": "tls",
    "http": "http",
    "idle": "tcp",
}

CASES: List[Case] = [
    Case("tcp-proto 1KiB", "tcp-proto", "tcp", 1 * KIB, "TCP echo, asyncio.Protocol, ping-pong"),
    Case("tcp-proto 10KiB", "tcp-proto", "tcp", 10 * KIB, "TCP echo, asyncio.Protocol, ping-pong"),
    Case("tcp-proto 100KiB", "tcp-proto", "tcp", 100 * KIB, "TCP echo, asyncio.Protocol, ping-pong"),
    Case("tcp-stream 1KiB", "tcp-stream", "tcp", 1 * KIB, "TCP echo, start_server streams, read/write/drain"),
    Case("tcp-stream 10KiB", "tcp-stream", "tcp", 10 * KIB, "TCP echo, start_server streams, read/write/drain"),
    Case("tcp-stream 100KiB", "tcp-stream", "tcp", 100 * KIB, "TCP echo, start_server streams, read/write/drain"),
    Case("unix-proto 1KiB", "unix-proto", "unix", 1 * KIB, "Unix-socket echo, asyncio.Protocol"),
    Case("udp 1KiB", "udp", "udp", 1 * KIB, "UDP echo, DatagramProtocol, one socket per client"),
    Case("tls-proto 1KiB", "tls-proto", "tls", 1 * KIB, "TLS 1.3 echo, asyncio.Protocol over create_server(ssl=)"),
    Case("tls-proto 10KiB", "tls-proto", "tls", 10 * KIB, "TLS 1.3 echo, asyncio.Protocol over create_server(ssl=)"),
    Case("http hello", "http", "wrk", 0, "HTTP/1.1 keep-alive hello world (httptools) under wrk"),
    Case("tcp-proto churn", "tcp-proto", "churn", 64,
         "TCP connection churn, asyncio.Protocol: connect, 64 B echo, client closes; CPU per connection"),
    Case("tcp-stream churn", "tcp-stream", "churn", 64,
         "TCP connection churn, start_server streams: connect, 64 B echo, client closes; CPU per connection"),
    Case("idle conns", "idle", "idle", 0, "many idle TCP connections: server RSS delta / connections"),
]


def case_key(c: Case) -> str:
    return c.name.replace(" ", "/")


# ---------------------------------------------------------------------------
# /proc readings
# ---------------------------------------------------------------------------


def proc_cpu(pid: int) -> Tuple[float, float, float]:
    """(schedstat seconds summed over live threads, (utime+stime) seconds from /proc/pid/stat,
    stime seconds from /proc/pid/stat).

    schedstat is nanosecond-exact but only covers live threads; stat covers the whole
    thread group (dead threads too) in clock ticks. The runner reports schedstat and
    keeps stat as a cross-check."""
    ns = 0
    for p in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(p) as f:
                ns += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    fields = st[st.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ns / 1e9, ticks / CLK_TCK, int(fields[12]) / CLK_TCK


def machine_busy_s() -> float:
    """CPU seconds all CPUs spent busy so far (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# ---------------------------------------------------------------------------
# Subprocesses
# ---------------------------------------------------------------------------


def _child_setup(cpu: Optional[int]):
    def fn():
        # Die with the runner (PR_SET_PDEATHSIG = 1), so no server outlives a killed run.
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
        except Exception:
            pass
        if cpu is not None:
            try:
                os.sched_setaffinity(0, {cpu})
            except OSError:
                pass

    return fn


class Proc:
    """A child with line-oriented stdout read under a timeout."""

    def __init__(self, cmd: List[str], cpu: Optional[int], stdin: bool = True):
        self.cmd = cmd
        self.errf = tempfile.TemporaryFile()
        self.p = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.errf,
            bufsize=0,
            cwd=REPO,
            preexec_fn=_child_setup(cpu),
        )
        self.buf = b""

    @property
    def pid(self) -> int:
        return self.p.pid

    def readline(self, timeout: float) -> Optional[str]:
        """Next stdout line, or None at EOF; raises TimeoutError."""
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no output from {os.path.basename(self.cmd[0])} in {timeout:.0f} s")
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                if self.buf:
                    line, self.buf = self.buf, b""
                    return line.decode(errors="replace")
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def expect(self, tags: Tuple[str, ...], timeout: float) -> Tuple[str, Dict[str, Any]]:
        while True:
            line = self.readline(timeout)
            if line is None:
                rc = self.p.wait(timeout=5)
                raise ChildFailed(f"{os.path.basename(self.cmd[0])} exited ({rc}): {self.stderr_tail(1)}",
                                  self.stderr_tail())
            tag, _, rest = line.partition(" ")
            if tag in tags:
                return tag, json.loads(rest) if rest.strip() else {}

    def send(self, text: str) -> None:
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def close_stdin(self) -> None:
        try:
            self.p.stdin.close()
        except (OSError, AttributeError):
            pass

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            self.errf.seek(0)
            data = self.errf.read().decode(errors="replace")
        except OSError:
            return ""
        ls = [ln for ln in data.strip().splitlines() if ln.strip()]
        return "\n".join(ls[-lines:])

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.kill()
            except ProcessLookupError:
                pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.p.stdin, self.p.stdout):
            try:
                if f:
                    f.close()
            except OSError:
                pass
        self.errf.close()


class ChildFailed(RuntimeError):
    def __init__(self, msg: str, stderr: str = ""):
        super().__init__(msg)
        self.stderr = stderr


class Unsupported(RuntimeError):
    pass


# ---------------------------------------------------------------------------
# Setup: build, certificates
# ---------------------------------------------------------------------------


def build_tools() -> None:
    cargo = shutil.which("cargo")
    if not cargo:
        if os.path.exists(LOADGEN) and os.path.exists(NATIVE):
            log("note: cargo not found; using the existing bench/netbench binaries")
            return
        raise SystemExit("cargo not found and bench/netbench is not built")
    log("building bench/netbench (loadgen, native_server) in release mode ...")
    r = subprocess.run(
        [cargo, "build", "--release", "--quiet", "--manifest-path", os.path.join(CRATE, "Cargo.toml"),
         "--target-dir", TARGET],
        cwd=CRATE,
    )
    if r.returncode != 0:
        raise SystemExit("cargo build of bench/netbench failed")


def make_certs(d: str) -> Dict[str, str]:
    """A throwaway CA and a localhost/127.0.0.1 leaf certificate (EC P-256), PEM files in `d`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = _dt.datetime.now(_dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ferroloop bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1))
        .not_valid_after(now + _dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1))
        .not_valid_after(now + _dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": os.path.join(d, "ca.pem"), "cert": os.path.join(d, "cert.pem"), "key": os.path.join(d, "key.pem")}
    with open(paths["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


def snapshot_ferroloop(tmp: str) -> Optional[str]:
    """Copy the installed ferroloop package into `tmp` and put that copy first on PYTHONPATH (inherited
    by the probe and every server), so a rebuild/reinstall during the run cannot mix builds."""
    import importlib.util

    spec = importlib.util.find_spec("ferroloop")
    if spec is None or not spec.origin:
        return None
    src = os.path.dirname(spec.origin)
    dst = os.path.join(tmp, "snapshot")
    shutil.copytree(src, os.path.join(dst, "ferroloop"), ignore=shutil.ignore_patterns("__pycache__"))
    os.environ["PYTHONPATH"] = dst + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    log(f"ferroloop: benchmarking a snapshot of {src} (see --no-snapshot)")
    return src


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------------------
# One server process serving one group of cases
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    conns: int
    duration: float
    warmup: float
    idle_conns: int
    server_cpu: Optional[int]
    client_cpu: Optional[int]
    tmp: str
    certs: Dict[str, str]


def start_server(server: str, group: str, st: Settings, tag: str) -> Tuple[Proc, str]:
    path = os.path.join(st.tmp, f"{tag}.sock")
    if server == "native":
        mode = NATIVE_MODE[group]
        cmd = [NATIVE, mode]
        if mode == "unix":
            cmd += ["--path", path]
        if mode == "tls":
            cmd += ["--cert", st.certs["cert"], "--key", st.certs["key"]]
    else:
        cmd = [sys.executable, SERVER_PY, "--loop", server, "--kind", group, "--path", path,
               "--cert", st.certs["cert"], "--key", st.certs["key"]]
    proc = Proc(cmd, st.server_cpu, stdin=False)
    try:
        tag_, info = proc.expect(("READY", "UNSUPPORTED"), timeout=60)
    except BaseException:
        proc.kill()
        raise
    if tag_ == "UNSUPPORTED":
        proc.kill()
        raise Unsupported(info.get("reason", "unsupported"))
    if info.get("build"):
        BUILDS.setdefault(server, set()).add(info["build"])
    addr = info["addr"]
    if isinstance(addr, list):
        addr = f"{addr[0]}:{addr[1]}"
    return proc, addr


def measure_echo(case: Case, srv: Proc, addr: str, st: Settings) -> Dict[str, Any]:
    cmd = [LOADGEN, case.client, "--conns", str(st.conns), "--size", str(case.size),
           "--warmup", str(st.warmup), "--duration", str(st.duration)]
    if case.client == "unix":
        cmd += ["--path", addr]
    else:
        cmd += ["--addr", addr]
    if case.client == "tls":
        cmd += ["--ca", st.certs["ca"], "--name", "localhost"]
    cl = Proc(cmd, st.client_cpu)
    try:
        cl.expect(("WARM",), timeout=st.warmup + 30)
        c0, s0, k0 = proc_cpu(srv.pid)
        m0 = machine_busy_s()
        w0 = time.perf_counter()
        cl.send("go\n")
        _, res = cl.expect(("RESULT",), timeout=st.duration + 30)
        c1, s1, k1 = proc_cpu(srv.pid)
        m1 = machine_busy_s()
        w1 = time.perf_counter()
        cl.close_stdin()
        cl.p.wait(timeout=30)
    finally:
        cl.kill()
    n = res["requests"]
    if n <= 0:
        raise ChildFailed("no requests completed")
    return {
        "requests": n,
        "elapsed": res["elapsed"],
        "rps": n / res["elapsed"],
        "mbps": res["bytes"] / res["elapsed"] / 1e6,
        "cpu_s": c1 - c0,
        "cpu_stat_s": s1 - s0,
        "cpu_sys_stat_s": k1 - k0,
        "cpu_us_per_req": (c1 - c0) / n * 1e6,
        "cpu_util": (c1 - c0) / (w1 - w0),
        "client_util": res.get("client_cpu", float("nan")) / res["elapsed"],
        "background": max(0.0, (m1 - m0) - (c1 - c0) - res.get("client_cpu", 0.0)) / (w1 - w0),
        "lost": res.get("lost", 0),
    }


WRK_REQ = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")


def run_wrk(addr: str, st: Settings, seconds: int) -> Dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{st.conns}", f"-d{seconds}s", "--timeout", "10s", f"http://{addr}/"]
    pre = _child_setup(st.client_cpu)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, preexec_fn=pre)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped in between
    client_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if r.returncode != 0:
        raise ChildFailed(f"wrk failed ({r.returncode}): {r.stderr.strip()[-300:]}")
    out = r.stdout
    m = WRK_REQ.search(out)
    if not m:
        raise ChildFailed(f"cannot parse wrk output: {out[-300:]}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if bad or (errs and any(int(x) for x in errs.groups())):
        raise ChildFailed(f"wrk saw errors: {out.strip().splitlines()[-4:]}")
    n = int(m.group(1))
    el = float(m.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    rps = float(WRK_RPS.search(out).group(1)) if WRK_RPS.search(out) else n / el
    return {"requests": n, "elapsed": el, "rps": rps, "client_util": client_cpu / el}


def measure_wrk(case: Case, srv: Proc, addr: str, st: Settings) -> Dict[str, Any]:
    if not shutil.which("wrk"):
        raise Unsupported("wrk not installed (apt-get install wrk)")
    run_wrk(addr, st, 1)  # warm-up (wrk takes whole seconds)
    c0, s0, k0 = proc_cpu(srv.pid)
    m0 = machine_busy_s()
    w0 = time.perf_counter()
    res = run_wrk(addr, st, max(1, round(st.duration)))
    c1, s1, k1 = proc_cpu(srv.pid)
    m1 = machine_busy_s()
    w1 = time.perf_counter()
    n = res["requests"]
    if n <= 0:
        raise ChildFailed("wrk completed no requests")
    res.update({
        "mbps": float("nan"),
        "cpu_s": c1 - c0,
        "cpu_stat_s": s1 - s0,
        "cpu_sys_stat_s": k1 - k0,
        "cpu_us_per_req": (c1 - c0) / n * 1e6,
        "cpu_util": (c1 - c0) / (w1 - w0),
        "background": max(0.0, (m1 - m0) - (c1 - c0) - res["client_util"] * res["elapsed"]) / (w1 - w0),
        "lost": 0,
    })
    return res


def measure_idle(case: Case, srv: Proc, addr: str, st: Settings) -> Dict[str, Any]:
    def hold(count: int, keep: bool):
        cl = Proc([LOADGEN, "idle", "--addr", addr, "--count", str(count), "--concurrency", "50"], st.client_cpu)
        try:
            _, info = cl.expect(("HELD",), timeout=120)
            if info["conns"] != count:
                raise ChildFailed(f"held {info['conns']} of {count}")
            return cl, info
        except BaseException:
            cl.kill()
            raise

    # Warm-up: a few connections opened and reset, so first-use allocations are done.
    cl, _ = hold(min(200, st.idle_conns), False)
    cl.close_stdin()
    cl.p.wait(timeout=30)
    cl.kill()
    time.sleep(0.3)
    rss0 = proc_rss_kib(srv.pid)
    c0, s0, k0 = proc_cpu(srv.pid)
    cl, info = hold(st.idle_conns, True)
    try:
        time.sleep(0.3)
        c1, s1, k1 = proc_cpu(srv.pid)
        rss1 = proc_rss_kib(srv.pid)
        if not srv.alive():
            raise ChildFailed("server died while holding the connections")
        cl.close_stdin()
        cl.p.wait(timeout=30)
    finally:
        cl.kill()
    n = info["conns"]
    return {
        "requests": n,
        "elapsed": info["elapsed"],
        "rps": n / info["elapsed"],  # connections established (and echoed once) per second
        "mbps": float("nan"),
        "cpu_s": c1 - c0,
        "cpu_stat_s": s1 - s0,
        "cpu_sys_stat_s": k1 - k0,
        "cpu_us_per_req": (c1 - c0) / n * 1e6,  # server CPU per accepted connection
        "cpu_util": float("nan"),
        "client_util": float("nan"),
        "background": float("nan"),
        "lost": 0,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "kib_per_conn": (rss1 - rss0) / n,
    }


def run_group(server: str, group: str, cases: List[Case], st: Settings, tag: str,
              ) -> Dict[str, Dict[str, Any]]:
    """Start the server, run every case of the group on it. Returns {case name: result|error}."""
    out: Dict[str, Dict[str, Any]] = {}
    try:
        srv, addr = start_server(server, group, st, tag)
    except Unsupported as e:
        return {c.name: {"unsupported": str(e)} for c in cases}
    except (ChildFailed, TimeoutError, OSError) as e:
        err = {"error": str(e), "stderr": getattr(e, "stderr", "")}
        return {c.name: err for c in cases}
    try:
        for c in cases:
            try:
                if c.client == "wrk":
                    out[c.name] = measure_wrk(c, srv, addr, st)
                elif c.client == "idle":
                    out[c.name] = measure_idle(c, srv, addr, st)
                else:
                    out[c.name] = measure_echo(c, srv, addr, st)
                if not srv.alive():
                    raise ChildFailed("server exited during the run")
            except Unsupported as e:
                out[c.name] = {"unsupported": str(e)}
            except (ChildFailed, TimeoutError, OSError, subprocess.TimeoutExpired) as e:
                time.sleep(0.2)
                tail = srv.stderr_tail() if srv else ""
                out[c.name] = {"error": f"{type(e).__name__}: {e}",
                               "stderr": (getattr(e, "stderr", "") + "\n" + tail).strip()}
                if not srv.alive():
                    for rest in cases[cases.index(c) + 1:]:
                        out[rest.name] = {"error": "server died earlier", "stderr": tail}
                    break
    finally:
        srv.kill()
    return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def med(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_us(x: float) -> str:
    if x != x:
        return "–"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_rate(x: float) -> str:
    if x != x:
        return "–"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def aggregate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    cpu = [s["cpu_us_per_req"] for s in samples]
    a = {
        "n": len(samples),
        "rps": med([s["rps"] for s in samples]),
        "mbps": med([s["mbps"] for s in samples]),
        "cpu_us_per_req": med(cpu),
        "cpu_min": min(cpu),
        "cpu_max": max(cpu),
        "cpu_util": med([s["cpu_util"] for s in samples]),
        "client_util": med([s.get("client_util", float("nan")) for s in samples]),
        "background": max((s.get("background", 0.0) for s in samples), default=float("nan")),
        "lost": sum(s.get("lost", 0) for s in samples),
        "cpu_stat_vs_sched": med([s["cpu_stat_s"] / s["cpu_s"] for s in samples if s["cpu_s"] > 0]),
        # the kernel's share of the server's CPU (stat ticks; the rest is user space)
        "sys_share": med([s["cpu_sys_stat_s"] / s["cpu_stat_s"] for s in samples
                          if s.get("cpu_stat_s", 0) > 0 and "cpu_sys_stat_s" in s]),
    }
    if "kib_per_conn" in samples[0]:
        a["kib_per_conn"] = med([s["kib_per_conn"] for s in samples])
        kp = [s["kib_per_conn"] for s in samples]
        a["kib_min"], a["kib_max"] = min(kp), max(kp)
    return a


def report(meta: Dict[str, Any], probes: Dict[str, Dict[str, Any]], servers: List[str], cases: List[Case],
           aggs: Dict[str, Dict[str, Dict[str, Any]]], status: Dict[str, Dict[str, str]]) -> str:
    L: List[str] = []
    L.append("## Network benchmarks")
    L.append("")
    L.append(f"- Python {meta['python']} (`{meta['executable']}`); {meta['machine']}")
    L.append(f"- Load average (1 min) {meta['loadavg_start'][0]} at start, {meta['loadavg_end'][0]} at end")
    if "other_cpu_median" in meta:
        quiet = meta["other_cpu_median"] <= 0.05 and meta["other_cpu_max"] <= 0.25
        L.append(f"- Other processes' CPU during the measured phases: median {meta['other_cpu_median']:.0%}, "
                 f"max {meta['other_cpu_max']:.0%} of one core"
                 + ("" if quiet else " — **the machine was not quiet; treat the figures with care**"))
    L.append("- Servers:")
    for s in servers:
        if s == "native":
            L.append("  - **native**: bench/netbench `native_server` (Rust, tokio current_thread, one thread; "
                     "rustls for TLS) — the floor")
            continue
        p = probes.get(s, {})
        if p.get("available"):
            build = f" ({p['build']})" if p.get("build") and s == "ferroloop" else ""
            where = p["module_file"]
            if s == "ferroloop" and meta.get("ferroloop_snapshot_of"):
                where = f"a copy taken at the start of {meta['ferroloop_snapshot_of']}"
            L.append(f"  - **{s}** {p['version']} — `{p['loop_class']}` from `{where}`{build}")
        else:
            L.append(f"  - **{s}**: n/a ({p.get('reason', 'not importable')})")
    for s, builds in sorted(meta.get("builds_seen", {}).items()):
        if len(builds) > 1:
            L.append(f"- **warning: {s} was rebuilt during the run**; its figures mix builds: "
                     + "; ".join(f"`{b}`" for b in builds))
    L.append(
        f"- Mode: {meta['mode']}; {meta['repeat']} repeat(s), each a fresh server process per (group, server), "
        f"servers rotated; {meta['conns']} concurrent connections (sockets for UDP) in ping-pong; "
        f"{meta['warmup']} s warm-up then {meta['duration']} s measured per case; churn: {meta['conns']} "
        f"clients, each connecting, echoing 64 bytes and closing (client first, plain close) in a loop; idle: "
        f"{meta['idle_conns']} connections."
    )
    L.append(f"- Load generator: bench/netbench `loadgen` (Rust, tokio current_thread, one thread) for echo "
             f"and idle; `wrk -t1 -c{meta['conns']}` for HTTP. CPU pinning: {meta['pinning']}.")
    L.append("- **CPU/req** = server process user+system CPU (all threads, /proc/<pid>/task/*/schedstat) "
             "over the measured phase ÷ requests (round trips; HTTP requests; whole connections for churn; "
             "accepted connections for idle). "
             "Medians over repeats.")
    L.append(f"- **vs {BASELINE}**: {BASELINE} CPU/req ÷ loop CPU/req, and loop req/s ÷ {BASELINE} req/s: "
             f"**above 1 = better than {BASELINE}**. **× floor** = loop CPU/req ÷ native CPU/req (1.00 = native).")
    L.append("")

    def cell(c: Case, s: str) -> Optional[Dict[str, Any]]:
        return aggs.get(c.name, {}).get(s)

    def st(c: Case, s: str) -> str:
        return status.get(c.name, {}).get(s, "–")

    echo_cases = [c for c in cases if c.client != "idle"]
    idle_cases = [c for c in cases if c.client == "idle"]

    if echo_cases:
        L.append(f"### Server CPU per request, µs (lower is better); (vs {BASELINE}, higher is better) [× native floor]")
        L.append("")
        rows = []
        for c in echo_cases:
            r = [c.name]
            b = cell(c, BASELINE)
            nat = cell(c, "native")
            for s in servers:
                a = cell(c, s)
                if not a:
                    r.append(st(c, s))
                    continue
                txt = fmt_us(a["cpu_us_per_req"])
                if a["n"] > 1 and (a["cpu_max"] - a["cpu_min"]) > NOISY * a["cpu_us_per_req"]:
                    txt = "~" + txt
                if b and s != BASELINE and s != "native":
                    txt += f" ({b['cpu_us_per_req'] / a['cpu_us_per_req']:.2f}×)"
                if nat and s != "native":
                    txt += f" [{a['cpu_us_per_req'] / nat['cpu_us_per_req']:.2f}]"
                r.append(txt)
            rows.append(r)
        L.append(table(["workload"] + servers, rows, ["l"] + ["r"] * len(servers)))
        L.append("")
        L.append(f"`~` marks a noisy cell: CPU/req spread (max−min)/median above {NOISY:.0%} over the repeats.")
        L.append("")

        L.append(f"### Throughput, requests/s (higher is better); (vs {BASELINE})")
        L.append("")
        rows = []
        for c in echo_cases:
            r = [c.name]
            b = cell(c, BASELINE)
            for s in servers:
                a = cell(c, s)
                if not a:
                    r.append(st(c, s))
                    continue
                txt = fmt_rate(a["rps"])
                if b and s != BASELINE:
                    txt += f" ({a['rps'] / b['rps']:.2f}×)"
                r.append(txt)
            rows.append(r)
        L.append(table(["workload"] + servers, rows, ["l"] + ["r"] * len(servers)))
        L.append("")
        if any(c.client == "churn" for c in echo_cases):
            L.append("Churn rows count whole connections (connect, one 64-byte echo, close): "
                     "µs per connection above, connections/s here.")
            L.append("")

    if idle_cases:
        L.append("### Idle connections: server memory per connection (RSS delta ÷ connections)")
        L.append("")
        rows = []
        for c in idle_cases:
            for label, key, fmt, inv in (
                ("KiB/conn (lower is better)", "kib_per_conn", lambda x: f"{x:.2f}", True),
                ("server CPU µs/accept", "cpu_us_per_req", fmt_us, True),
                ("accepts/s (connect + 1-byte echo)", "rps", fmt_rate, False),
            ):
                r = [f"{c.name}: {label}"]
                b = cell(c, BASELINE)
                for s in servers:
                    a = cell(c, s)
                    if not a:
                        r.append(st(c, s))
                        continue
                    txt = fmt(a[key])
                    if b and s != BASELINE and a[key] > 0 and b[key] > 0:
                        ratio = b[key] / a[key] if inv else a[key] / b[key]
                        txt += f" ({ratio:.2f}×)"
                    r.append(txt)
                rows.append(r)
        L.append(table(["metric"] + servers, rows, ["l"] + ["r"] * len(servers)))
        L.append("")

    # Acceptance view for ferroloop (issue 4, point 3).
    if "ferroloop" in servers:
        L.append("### ferroloop against the targets (server CPU/req)")
        L.append("")
        rows = []
        for c in cases:
            f = cell(c, "ferroloop")
            if not f:
                rows.append([c.name, st(c, "ferroloop"), "", "", "", "", ""])
                continue
            key = "kib_per_conn" if c.client == "idle" else "cpu_us_per_req"
            peers = [(s, cell(c, s)) for s in PEERS if s in servers and cell(c, s)]
            best = min(peers, key=lambda p: p[1][key]) if peers else None
            b = cell(c, BASELINE)
            nat = cell(c, "native")
            vs_uv = b[key] / f[key] if b and f[key] > 0 else float("nan")
            fl = f[key] / nat[key] if nat and nat[key] > 0 and c.client != "idle" else float("nan")
            if c.client == "idle":
                target = f"KiB/conn ≤ {BASELINE}"
                ok = b is not None and f[key] <= b[key]
            elif c.client == "churn":
                target = "< peers"
                ok = best is None or f[key] < best[1][key]
            elif c.group in ("tcp-proto", "udp", "unix-proto"):
                target = "< peers, ≤ 1.10× floor"
                ok = (best is None or f[key] < best[1][key]) and (fl == fl and fl <= 1.10)
            elif c.group in ("tcp-stream", "tls-proto"):
                target = f"< peers, ≥ 1.3× {BASELINE}"
                ok = (best is None or f[key] < best[1][key]) and vs_uv >= 1.3
            else:
                target = "< peers"
                ok = best is None or f[key] < best[1][key]
            unit = "KiB" if c.client == "idle" else "µs"
            rows.append([
                c.name,
                f"{fmt_us(f[key])} {unit}",
                f"{best[0]} {fmt_us(best[1][key])}" if best else "–",
                f"{vs_uv:.2f}×" if vs_uv == vs_uv else "–",
                f"{fl:.2f}" if fl == fl else "–",
                target,
                "yes" if ok else "**no**",
            ])
        L.append(table(["workload", "ferroloop", "best peer", f"vs {BASELINE}", "× floor", "target", "met"],
                       rows, ["l", "r", "r", "r", "r", "l", "l"]))
        L.append("")

    # Detail
    L.append("### Detail (medians; spread = (max−min)/median of CPU/req)")
    L.append("")
    rows = []
    for c in cases:
        for s in servers:
            a = cell(c, s)
            if not a:
                rows.append([c.name, s, st(c, s), "", "", "", "", "", "", ""])
                continue
            sp = (a["cpu_max"] - a["cpu_min"]) / a["cpu_us_per_req"] * 100 if a["cpu_us_per_req"] else 0
            util = a["cpu_util"]
            cutil = a.get("client_util", float("nan"))
            bg = a.get("background", float("nan"))
            extra = f"lost {a['lost']}" if a.get("lost") else ""
            if "kib_per_conn" in a:
                extra = f"{a['kib_per_conn']:.2f} KiB/conn"
            rows.append([
                c.name, s, fmt_rate(a["rps"]),
                "–" if a["mbps"] != a["mbps"] else f"{a['mbps']:.0f}",
                fmt_us(a["cpu_us_per_req"]),
                "–" if util != util else f"{util * 100:.0f}%",
                "–" if cutil != cutil else f"{cutil * 100:.0f}%",
                "–" if bg != bg else f"{bg * 100:.0f}%",
                f"{sp:.0f}%" if a["n"] > 1 else "–",
                extra,
            ])
    L.append(table(["workload", "server", "req/s", "MB/s", "CPU µs/req", "server CPU", "client CPU", "other CPU",
                    "spread", "note"], rows, ["l", "l", "r", "r", "r", "r", "r", "r", "r", "l"]))
    L.append("")
    L.append("`server CPU` / `client CPU`: each process's CPU use over the measured phase (100% = one core "
             "busy). A server near 100% was the bottleneck; a client near 100% means the load generator "
             "saturated first, and CPU/req is then the figure that tells the loops apart. `other CPU`: the "
             "most CPU that anything else on the machine used during one of the measured phases (from "
             "/proc/stat, in % of one core): above ~25% the machine was not quiet during that phase. "
             "Spread above ~20% means a noisy figure: rerun with more `--repeat`.")
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def select_cases(value: Optional[str]) -> List[Case]:
    if not value:
        return list(CASES)
    want = [v.strip() for v in value.split(",") if v.strip()]
    out = []
    for c in CASES:
        if any(w == c.group or w == c.name or w == case_key(c) or w == c.client for w in want):
            out.append(c)
    if not out:
        groups = sorted({c.group for c in CASES})
        raise SystemExit(f"no case matches {value!r} (groups: {', '.join(groups)})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="run.py --suite net", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loops", help=f"servers, comma-separated; default all: {','.join(SERVERS)}")
    ap.add_argument("--cases", help="case groups or names, comma-separated; default all: "
                    + ",".join(dict.fromkeys(c.group for c in CASES)))
    ap.add_argument("--repeat", type=int, help="fresh-server runs per (case, server); default 5 (1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.5 s phases, 1,000 idle connections, 1 repeat")
    ap.add_argument("--duration", type=float, help="measured seconds per case (default 1.2; 0.5 with --quick)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds per case (default 0.4; 0.2 with --quick)")
    ap.add_argument("--conns", type=int, default=10, help="concurrent connections (default 10)")
    ap.add_argument("--idle-conns", type=int, help="idle connections (default 5000; 1000 with --quick)")
    ap.add_argument("--pin", choices=["split", "same", "none"], default="split",
                    help="split (default): server on the first CPU, load generator on the second; same: both on "
                    "the first CPU; none: let the scheduler place them")
    ap.add_argument("--no-pin", dest="pin", action="store_const", const="none", help="same as --pin none")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build for bench/netbench")
    ap.add_argument("--no-snapshot", action="store_true", help="run ferroloop from where it is installed "
                    "instead of from a copy taken at the start (a reinstall mid-run then mixes builds)")
    ap.add_argument("--output", help="JSON path (default bench/results/<timestamp>-net-<mode>.json)")
    ap.add_argument("--no-save", action="store_true", help="do not write the JSON file")
    ap.add_argument("--list", action="store_true", help="list cases and servers, then exit")
    args = ap.parse_args(argv)

    if args.list:
        print("Cases (group: name — what):")
        for c in CASES:
            print(f"  {c.group:11s} {c.name:18s} {c.what}")
        print("Servers:", ", ".join(SERVERS))
        return 0

    servers = parse_list(args.loops, SERVERS + EXTRA_LOOPS, "server")
    if not args.loops:
        servers = list(SERVERS)
    cases = select_cases(args.cases)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    if repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    duration = args.duration if args.duration is not None else (0.5 if args.quick else 1.2)
    warmup = args.warmup if args.warmup is not None else (0.2 if args.quick else 0.4)
    idle_conns = args.idle_conns if args.idle_conns is not None else (1000 if args.quick else 5000)
    if BASELINE not in servers:
        log(f"note: adding {BASELINE} to the run for the ratio columns")
        servers.insert(min(1, len(servers)), BASELINE)

    raise_nofile()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < idle_conns + 100:
        log(f"warning: RLIMIT_NOFILE {soft} < {idle_conns} idle connections + slack; lowering --idle-conns")
        idle_conns = max(10, soft - 100)
    cpus = sorted(os.sched_getaffinity(0))
    pin = args.pin
    if pin == "split" and len(cpus) < 2:
        log("note: fewer than 2 CPUs available; not pinning")
        pin = "none"
    server_cpu, client_cpu = {"split": (cpus[0], cpus[-1]), "same": (cpus[0], cpus[0])}.get(pin, (None, None))

    t_start = time.perf_counter()
    load1 = os.getloadavg()[0]
    if load1 > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load1:.2f} on {os.cpu_count()} CPUs; results will be noisy")
    if not args.no_build:
        build_tools()
    for b in (LOADGEN, NATIVE):
        if not os.path.exists(b):
            raise SystemExit(f"{b} missing: build bench/netbench (see bench/README.md)")

    tmp = tempfile.mkdtemp(prefix="ferroloop-netbench-")
    snapshot_of = None
    if "ferroloop" in servers and not args.no_snapshot:
        snapshot_of = snapshot_ferroloop(tmp)

    # Loop versions, probed like the core suite (each in its own subprocess).
    from run import probe_loops, machine_info  # bench/run.py

    probes = probe_loops([s for s in servers if s != "native"])
    available = [s for s in servers if s == "native" or probes[s].get("available")]
    for s in servers:
        if s not in available:
            log(f"note: {s} is n/a, skipped: {probes[s].get('reason')}")

    certs = make_certs(tmp)
    st = Settings(args.conns, duration, warmup, idle_conns, server_cpu, client_cpu, tmp, certs)

    meta = {
        "suite": "net",
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "executable": sys.executable,
        "machine": machine_info(),
        "mode": "quick" if args.quick else "full",
        "repeat": repeat,
        "duration": duration,
        "warmup": warmup,
        "conns": args.conns,
        "idle_conns": idle_conns,
        "pinning": "off" if pin == "none" else f"server on CPU {server_cpu}, load generator on CPU {client_cpu}",
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "argv": sys.argv[1:] if argv is None else list(argv),
        "ferroloop_snapshot_of": snapshot_of,
    }

    groups: Dict[str, List[Case]] = {}
    for c in cases:
        groups.setdefault(c.group, []).append(c)
    samples: Dict[str, Dict[str, List[Dict[str, Any]]]] = {c.name: {s: [] for s in available} for c in cases}
    status: Dict[str, Dict[str, str]] = {c.name: {} for c in cases}
    errors: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for s in servers:
        if s not in available:
            for c in cases:
                status[c.name][s] = "n/a"
    total = repeat * len(groups) * len(available)
    done = 0
    try:
        for r in range(repeat):
            k = r % len(available)
            order = available[k:] + available[:k]
            for g, gcases in groups.items():
                for s in order:
                    done += 1
                    tag = f"[{done:3d}/{total}] r{r + 1} {g:10s} {s:9s}"
                    todo = [c for c in gcases if c.name not in errors or s not in errors[c.name]]
                    todo = [c for c in todo if status[c.name].get(s) != "n/a"]
                    if not todo:
                        log(f"{tag} skipped (n/a or failed before)")
                        continue
                    res = run_group(s, g, todo, st, f"{s}-{g}-{r}")
                    msgs = []
                    for c in todo:
                        x = res[c.name]
                        if "unsupported" in x:
                            status[c.name][s] = "n/a"
                            msgs.append(f"{c.name}: n/a ({x['unsupported'][:60]})")
                        elif "error" in x:
                            status[c.name][s] = "FAIL"
                            errors.setdefault(c.name, {})[s] = x
                            msgs.append(f"{c.name}: FAIL {x['error'][:200]}")
                            if x.get("stderr"):
                                log("    " + x["stderr"].strip().replace("\n", "\n    "))
                        else:
                            samples[c.name][s].append(x)
                            if c.client == "idle":
                                msgs.append(f"{c.name}: {x['kib_per_conn']:.2f} KiB/conn "
                                            f"{x['cpu_us_per_req']:.1f} µs/accept")
                            else:
                                msgs.append(f"{c.name}: {fmt_rate(x['rps'])}/s {x['cpu_us_per_req']:.2f} µs "
                                            f"(srv {x['cpu_util'] * 100:.0f}% cli {x['client_util'] * 100:.0f}% "
                                            f"other {x['background'] * 100:.0f}%)")
                    log(f"{tag} " + "; ".join(msgs))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    aggs: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for c in cases:
        for s in available:
            if samples[c.name][s] and s not in errors.get(c.name, {}):
                aggs.setdefault(c.name, {})[s] = aggregate(samples[c.name][s])

    bgs = [x["background"] for c in cases for s in available for x in samples[c.name][s]
           if x.get("background") == x.get("background")]
    if bgs:
        meta["other_cpu_median"] = round(statistics.median(bgs), 3)
        meta["other_cpu_max"] = round(max(bgs), 3)
    meta["builds_seen"] = {s: sorted(b) for s, b in BUILDS.items()}
    for s, b in BUILDS.items():
        if len(b) > 1:
            log(f"warning: {s} was rebuilt during the run: {sorted(b)}")
    wall = time.perf_counter() - t_start
    meta["wall_s"] = round(wall, 1)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    md = report(meta, probes, servers, cases, aggs, status)
    fails = [(cn, s, e) for cn, d in errors.items() for s, e in d.items()]
    if fails:
        md += "\n### Failures\n\n" + "\n".join(f"- `{cn}` on `{s}`: {e['error']}" for cn, s, e in fails) + "\n"
    md += f"\nTotal wall time: {wall:.0f} s.\n"
    print(md)

    if not args.no_save:
        doc = {
            "meta": meta,
            "loops": {s: probes.get(s, {"name": "native"}) for s in servers},
            "cases": {c.name: dataclasses.asdict(c) for c in cases},
            "results": {
                c.name: {
                    s: {"samples": samples[c.name].get(s, []), "summary": aggs.get(c.name, {}).get(s),
                        "status": status[c.name].get(s), "error": errors.get(c.name, {}).get(s)}
                    for s in servers
                }
                for c in cases
            },
            "markdown": md,
        }
        path = save_results(doc, args.output, "net-" + meta["mode"])
        log(f"saved {os.path.relpath(path)}")
    log(f"total wall time {wall:.0f} s")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
