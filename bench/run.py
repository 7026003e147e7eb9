#!/usr/bin/env python3
"""ferroloop benchmark runner.

Runs every (workload, loop) pair in a fresh subprocess, `--repeat` times,
interleaving loops (rotated order each repeat) to spread machine noise.
Prints a Markdown report to stdout (progress goes to stderr) and saves the
raw samples and the report as JSON under bench/results/.

    python bench/run.py                      # full run, all workloads, all loops
    python bench/run.py --quick              # smoke run (small N, 1 repeat)
    python bench/run.py --loops ferroloop,uvloop --workloads timers,queue --repeat 7
    python bench/run.py --suite net [--quick]  # network benchmarks (bench/net/runner.py)

Ratio = baseline (uvloop) median time / loop median time: >1 means faster than uvloop.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_worker.py")

sys.path.insert(0, HERE)
import loops as loops_mod  # noqa: E402
from _worker import MARKER  # noqa: E402
from workloads import WORKLOADS  # noqa: E402
from _common import parse_list, save_results, table  # noqa: E402


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# Subprocess plumbing
# ---------------------------------------------------------------------------


def run_worker(args: List[str], timeout: float) -> Dict[str, Any]:
    """Run _worker.py with `args`; return {"ok": bool, "result"|"error": ...}."""
    cmd = [sys.executable, WORKER] + args
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE,
        start_new_session=True,  # so a timeout can kill the whole group (future server workloads)
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        return {"ok": False, "error": f"timeout after {timeout:.0f} s", "stderr": err[-4000:]}
    payload = None
    for line in out.splitlines():
        if line.startswith(MARKER):
            payload = json.loads(line[len(MARKER):])
    if proc.returncode == 0 and payload is not None:
        return {"ok": True, "result": payload}
    if proc.returncode == 3 and payload and "unavailable" in payload:
        return {"ok": False, "unavailable": payload["unavailable"]}
    if "most recent call first" in err and err.lstrip().startswith("Timeout ("):
        return {"ok": False, "error": "timeout (hung; stack dump in stderr/JSON)", "stderr": err[-4000:]}
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}"
    else:
        why = f"exit code {proc.returncode}"
    last = [ln for ln in err.strip().splitlines() if ln.strip()]
    return {
        "ok": False,
        "error": f"{why}: {last[-1] if last else '(no stderr)'}",
        "stderr": err[-4000:],
    }


def probe_loops(names: List[str]) -> Dict[str, Dict[str, Any]]:
    """Probe each loop in its own subprocess (a crashing import must not take the others down)."""
    probes = {}
    for name in names:
        r = run_worker(["probe", name], timeout=60)
        if r["ok"]:
            probes[name] = r["result"][name]
        else:
            probes[name] = {"name": name, "available": False, "reason": f"probe failed: {r.get('error')}"}
    return probes


# ---------------------------------------------------------------------------
# Aggregation and formatting
# ---------------------------------------------------------------------------


def aggregate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Median over repeats for the main timing, each phase, and numeric extras."""
    agg: Dict[str, Any] = {}
    times = [s["elapsed"] for s in samples]
    n_ops = samples[0]["n_ops"]
    agg["n"] = len(samples)
    agg["n_ops"] = n_ops
    agg["median_s"] = statistics.median(times)
    agg["min_s"] = min(times)
    agg["max_s"] = max(times)
    agg["us_per_op"] = agg["median_s"] / n_ops * 1e6
    phases: Dict[str, Any] = {}
    for ph in samples[0]["extra"].get("phases", {}):
        pt = [s["extra"]["phases"][ph]["elapsed"] for s in samples]
        pn = samples[0]["extra"]["phases"][ph]["n_ops"]
        med = statistics.median(pt)
        phases[ph] = {
            "n_ops": pn,
            "median_s": med,
            "min_s": min(pt),
            "max_s": max(pt),
            "us_per_op": med / pn * 1e6,
        }
    agg["phases"] = phases
    extras: Dict[str, float] = {}
    for k, v in samples[0]["extra"].items():
        if k != "phases" and isinstance(v, (int, float)) and not isinstance(v, bool):
            extras[k] = statistics.median(s["extra"][k] for s in samples)
    agg["extras"] = extras
    return agg


def fmt_s(x: float) -> str:
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.1:
        return f"{x:.3f}"
    return f"{x:.4f}"


def fmt_us(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}"


def fmt_ops(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def report(
    meta: Dict[str, Any],
    probes: Dict[str, Dict[str, Any]],
    loop_names: List[str],
    wl_names: List[str],
    aggs: Dict[str, Dict[str, Dict[str, Any]]],
    errors: Dict[str, Dict[str, str]],
    baseline: str,
) -> str:
    lines: List[str] = []
    lines.append("## Event-loop benchmarks")
    lines.append("")
    lines.append(f"- Python {meta['python']} ({meta['python_impl']}, `{meta['executable']}`)")
    lines.append(
        f"- Machine: {meta['machine']}; load average (1 min) {meta['loadavg_start'][0]} at start, "
        f"{meta['loadavg_end'][0]} at end"
    )
    lines.append("- Loops:")
    for name in loop_names:
        p = probes[name]
        if p.get("available"):
            build = f" ({p['build']})" if p.get("build") and name == "ferroloop" else ""
            lines.append(
                f"  - **{name}** {p['version']} — `{p['loop_class']}` from `{p['module_file']}`{build}"
            )
        else:
            lines.append(f"  - **{name}**: n/a ({p.get('reason', 'not importable')})")
    lines.append(
        f"- Mode: {meta['mode']}, {meta['repeat']} repeat(s) per (workload, loop), each in a fresh "
        f"subprocess, loops interleaved; cyclic GC {meta['gc']}; median reported; "
        f"spread = (max−min)/median."
    )
    lines.append(
        f"- **vs {baseline}** = {baseline} median time / loop median time (>1 = faster than {baseline})."
    )
    lines.append("")

    # Build the row list: (row_label, workload, phase or None)
    rowspec = []
    for wl in wl_names:
        spec = WORKLOADS[wl]
        label = f"{wl}/{spec.main_phase}" if spec.main_phase else wl
        rowspec.append((label, wl, None))
        phase_names: List[str] = []
        for ln in loop_names:
            a = aggs.get(wl, {}).get(ln)
            if a:
                phase_names = list(a["phases"])
                break
        for ph in phase_names:
            rowspec.append((f"{wl}/{ph}", wl, ph))

    def cell(wl: str, ln: str, ph: Optional[str]) -> Optional[Dict[str, Any]]:
        a = aggs.get(wl, {}).get(ln)
        if not a:
            return None
        return a if ph is None else a["phases"].get(ph)

    def status(wl: str, ln: str) -> str:
        if not probes[ln].get("available"):
            return "n/a"
        e = errors.get(wl, {}).get(ln)
        if e:
            return "FAIL" if not e.startswith("timeout") else "TIMEOUT"
        return "–"

    # Long table: every (workload, loop)
    rows = []
    for label, wl, ph in rowspec:
        for ln in loop_names:
            c = cell(wl, ln, ph)
            if c is None:
                st = status(wl, ln)
                any_c = next((cell(wl, o, ph) for o in loop_names if cell(wl, o, ph)), None)
                rows.append([label, fmt_ops(any_c["n_ops"]) if any_c else "", ln, st, st, st, ""])
                continue
            b = cell(wl, baseline, ph)
            ratio = f"{b['median_s'] / c['median_s']:.2f}×" if b else "–"
            n_samples = aggs[wl][ln]["n"]
            spread = (c["max_s"] - c["min_s"]) / c["median_s"] * 100 if c["median_s"] else 0.0
            rows.append(
                [
                    label,
                    fmt_ops(c["n_ops"]),
                    ln,
                    fmt_s(c["median_s"]),
                    fmt_us(c["us_per_op"]),
                    ratio,
                    f"{spread:.0f}%" if n_samples > 1 else "–",
                ]
            )
    lines.append(
        table(
            ["workload", "ops", "loop", "median s", "µs/op", f"vs {baseline}", "spread"],
            rows,
            ["l", "r", "l", "r", "r", "r", "r"],
        )
    )
    lines.append("")

    # Compact matrices: µs/op and ratio
    lines.append(f"### µs/op (lower is better) and ratio vs {baseline} (higher is better)")
    lines.append("")
    rows = []
    for label, wl, ph in rowspec:
        r = [label]
        for ln in loop_names:
            c = cell(wl, ln, ph)
            if c is None:
                r.append(status(wl, ln))
                continue
            b = cell(wl, baseline, ph)
            ratio = f" ({b['median_s'] / c['median_s']:.2f}×)" if b else ""
            r.append(f"{fmt_us(c['us_per_op'])}{ratio}")
        rows.append(r)
    lines.append(table(["workload"] + loop_names, rows, ["l"] + ["r"] * len(loop_names)))
    lines.append("")

    # Other metrics
    extra_rows = []
    for wl in wl_names:
        for key in WORKLOADS[wl].report:
            r = [f"{wl}: {key}"]
            any_val = False
            for ln in loop_names:
                a = aggs.get(wl, {}).get(ln)
                v = a["extras"].get(key) if a else None
                if v is None:
                    r.append(status(wl, ln))
                else:
                    any_val = True
                    r.append(f"{v:.1f}" if isinstance(v, float) else str(v))
            if any_val:
                extra_rows.append(r)
    if extra_rows:
        lines.append("### Other metrics (median)")
        lines.append("")
        lines.append(table(["metric"] + loop_names, extra_rows, ["l"] + ["r"] * len(loop_names)))
        lines.append("")

    # Failures
    fails = [(wl, ln, e) for wl, d in errors.items() for ln, e in d.items()]
    if fails:
        lines.append("### Failures")
        lines.append("")
        for wl, ln, e in fails:
            lines.append(f"- `{wl}` on `{ln}`: {e}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs, {cpu}"


def pop_suite(argv: List[str]) -> tuple:
    """Take `--suite NAME` / `--suite=NAME` out of argv: (suite, rest)."""
    rest: List[str] = []
    suite = "core"
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--suite" and i + 1 < len(argv):
            suite = argv[i + 1]
            i += 2
            continue
        if a.startswith("--suite="):
            suite = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if suite not in ("core", "net"):
        raise SystemExit(f"unknown suite {suite!r} (known: core, net)")
    return suite, rest


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    suite, argv = pop_suite(argv)
    if suite == "net":
        from net import runner  # bench/net/runner.py: servers in their own processes

        return runner.main(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["core", "net"], default="core",
                    help="core: these loop-core micro-benchmarks (default); net: the network "
                    "benchmarks (see `--suite net --help`)")
    ap.add_argument("--loops", help=f"comma-separated, default all: {','.join(loops_mod.LOOPS)}")
    ap.add_argument("--workloads", help=f"comma-separated, default all: {','.join(WORKLOADS)}")
    ap.add_argument("--repeat", type=int, help="runs per (workload, loop); default 5 (1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="small N smoke run (implies --repeat 1)")
    ap.add_argument("--baseline", default=loops_mod.BASELINE, help="loop for the ratio (default uvloop); "
                    "added to the run if missing and available")
    ap.add_argument("--gc-off", action="store_true", help="disable the cyclic GC during the measured "
                    "section (default: GC on, as in real programs)")
    ap.add_argument("--timeout", type=float, help="per-subprocess timeout in s (default: per workload)")
    ap.add_argument("--output", help="JSON path (default bench/results/<timestamp>.json)")
    ap.add_argument("--no-save", action="store_true", help="do not write the JSON file")
    ap.add_argument("--list", action="store_true", help="list workloads and loops, then exit")
    args = ap.parse_args(argv)

    if args.list:
        print("Workloads:")
        for w in WORKLOADS.values():
            print(f"  {w.name:22s} {w.description}")
        print("Loops:", ", ".join(loops_mod.LOOPS))
        return 0

    loop_names = parse_list(args.loops, list(loops_mod.LOOPS), "loop")
    wl_names = parse_list(args.workloads, list(WORKLOADS), "workload")
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    if repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    baseline = args.baseline
    if baseline not in loops_mod.LOOPS:
        raise SystemExit(f"unknown baseline loop {baseline!r}")

    t_start = time.perf_counter()
    load1 = os.getloadavg()[0]
    if load1 > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load1:.2f} on {os.cpu_count()} CPUs; timings will be noisy")
    probes = probe_loops(sorted(set(loop_names) | {baseline}))
    if baseline not in loop_names and probes[baseline].get("available"):
        log(f"note: adding baseline loop {baseline!r} to the run for the ratio column")
        loop_names.append(baseline)
    available = [ln for ln in loop_names if probes[ln].get("available")]
    for ln in loop_names:
        if ln not in available:
            log(f"note: loop {ln!r} is n/a, skipped: {probes[ln].get('reason')}")
    if not available:
        raise SystemExit("no selected loop is available")

    meta = {
        "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "executable": sys.executable,
        "machine": machine_info(),
        "mode": "quick" if args.quick else "full",
        "repeat": repeat,
        "baseline": baseline,
        "gc": "off during measured section" if args.gc_off else "on",
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "argv": list(argv),
    }

    # Schedule: repeats outermost; within a repeat, workloads in order and the loop
    # order rotated by the repeat index, so no loop always runs first / last.
    samples: Dict[str, Dict[str, List[Dict[str, Any]]]] = {w: {ln: [] for ln in available} for w in wl_names}
    errors: Dict[str, Dict[str, str]] = {}
    stderr_tails: Dict[str, Dict[str, str]] = {}
    total = repeat * len(wl_names) * len(available)
    done = 0
    for r in range(repeat):
        k = r % len(available)
        order = available[k:] + available[:k]
        for wl in wl_names:
            spec = WORKLOADS[wl]
            timeout = args.timeout or (spec.timeout if not args.quick else max(60.0, spec.timeout / 3))
            for ln in order:
                done += 1
                tag = f"[{done:3d}/{total}] r{r + 1} {wl:22s} {ln:10s}"
                if ln in errors.get(wl, {}):
                    log(f"{tag} skipped (failed before)")
                    continue
                wargs = ["run", "--loop", ln, "--workload", wl, "--deadline", f"{max(1.0, timeout - 5):.0f}"]
                wargs += (["--quick"] if args.quick else []) + (
                    ["--gc-off"] if args.gc_off else [])
                res = run_worker(wargs, timeout)
                if res["ok"]:
                    s = res["result"]
                    samples[wl][ln].append(s)
                    msg = f"{s['elapsed']:.4f} s  {s['elapsed'] / s['n_ops'] * 1e6:.3f} µs/op"
                    for ph, pv in s["extra"].get("phases", {}).items():
                        msg += f"  | {ph}: {pv['elapsed']:.4f} s"
                    log(f"{tag} {msg}")
                else:
                    err = res.get("error") or f"unavailable: {res.get('unavailable')}"
                    errors.setdefault(wl, {})[ln] = err
                    stderr_tails.setdefault(wl, {})[ln] = res.get("stderr", "")
                    log(f"{tag} FAILED: {err}")
                    if res.get("stderr"):
                        log("    " + res["stderr"].strip().replace("\n", "\n    "))

    aggs: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for wl in wl_names:
        for ln in available:
            if samples[wl][ln] and ln not in errors.get(wl, {}):
                aggs.setdefault(wl, {})[ln] = aggregate(samples[wl][ln])

    wall = time.perf_counter() - t_start
    meta["wall_s"] = round(wall, 1)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    md = report(meta, probes, loop_names, wl_names, aggs, errors, baseline)
    md += f"\nTotal wall time: {wall:.0f} s ({total} subprocess runs).\n"
    print(md)

    if not args.no_save:
        doc = {
            "meta": meta,
            "loops": {ln: probes[ln] for ln in loop_names},
            "workloads": {
                wl: {
                    "description": WORKLOADS[wl].description,
                    "params": WORKLOADS[wl].quick if args.quick else WORKLOADS[wl].full,
                }
                for wl in wl_names
            },
            "results": {
                wl: {
                    ln: {
                        "samples": [
                            {"elapsed": s["elapsed"], "n_ops": s["n_ops"], "extra": s["extra"]}
                            for s in samples[wl].get(ln, [])
                        ],
                        "summary": aggs.get(wl, {}).get(ln),
                        "error": errors.get(wl, {}).get(ln),
                        "stderr": stderr_tails.get(wl, {}).get(ln),
                    }
                    for ln in loop_names
                    if probes[ln].get("available")
                }
                for wl in wl_names
            },
            "markdown": md,
        }
        path = save_results(doc, args.output, meta["mode"])
        log(f"saved {os.path.relpath(path)}")
    log(f"total wall time {wall:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
