"""Subprocess side of the harness: run ONE workload on ONE loop, print one JSON line.

Invoked by run.py; not meant to be run by hand, but you can:

    python bench/_worker.py run --loop uvloop --workload queue [--quick]
    python bench/_worker.py probe asyncio uvloop rloop ferroloop

The result is printed on stdout as a single line prefixed with MARKER, so that
anything else a loop may print does not confuse the parent.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import gc
import json
import os
import sys
import traceback

import loops
from workloads import WORKLOADS

MARKER = "@@BENCH-RESULT@@ "


def emit(obj) -> None:
    sys.stdout.write(MARKER + json.dumps(obj) + "\n")
    sys.stdout.flush()


def teardown(loop) -> None:
    """Shut the loop down the way asyncio.run() does, then close it."""
    if loop.is_closed():
        return
    try:
        if loop.is_running():
            raise RuntimeError("loop still running after the workload returned")
        loop.run_until_complete(loop.shutdown_asyncgens())
        sde = getattr(loop, "shutdown_default_executor", None)
        if sde is not None:
            loop.run_until_complete(sde())
    finally:
        loop.close()


def run_one(loop_name: str, workload_name: str, quick: bool, gc_off: bool = False) -> dict:
    spec = WORKLOADS[workload_name]
    make = loops.factory(loop_name)
    params = spec.quick if quick else spec.full
    loop = make()
    cls = type(loop)
    try:
        if spec.warmup:
            spec.fn(loop, **spec.warmup)
        gc.collect()
        if gc_off:
            gc.disable()
        try:
            elapsed, n_ops, extra = spec.fn(loop, **params)
        finally:
            gc.enable()
    finally:
        teardown(loop)
    if not (isinstance(elapsed, float) and elapsed > 0 and n_ops > 0):
        raise RuntimeError(f"bad result from {workload_name}: elapsed={elapsed!r} n_ops={n_ops!r}")
    # The workload must not leave a loop installed behind it.
    if asyncio._get_running_loop() is not None:
        raise RuntimeError("a running loop is still set after the workload")
    return {
        "loop": loop_name,
        "workload": workload_name,
        "loop_class": f"{cls.__module__}.{cls.__qualname__}",
        "params": params,
        "elapsed": elapsed,
        "n_ops": n_ops,
        "extra": extra,
        "pid": os.getpid(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--loop", required=True, choices=sorted(list(loops.LOOPS) + list(loops.EXTRA_LOOPS)))
    p_run.add_argument("--workload", required=True, choices=list(WORKLOADS))
    p_run.add_argument("--quick", action="store_true")
    p_run.add_argument("--deadline", type=float, default=0,
                       help="dump all thread stacks to stderr and exit after this many seconds")
    p_run.add_argument("--gc-off", action="store_true", help="disable the cyclic GC in the measured run")
    p_probe = sub.add_parser("probe")
    p_probe.add_argument("names", nargs="+", choices=sorted(list(loops.LOOPS) + list(loops.EXTRA_LOOPS)))
    args = ap.parse_args(argv)

    if args.cmd == "probe":
        emit({n: loops.probe(n) for n in args.names})
        return 0

    if args.cmd == "run" and args.deadline > 0:
        # A hung loop (lost callback, missed wake-up) shows where it hangs instead of just dying.
        faulthandler.dump_traceback_later(args.deadline, exit=True)
    try:
        result = run_one(args.loop, args.workload, args.quick, args.gc_off)
    except loops.LoopUnavailable as e:
        emit({"unavailable": str(e)})
        return 3
    except BaseException:
        traceback.print_exc()
        return 1
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
