"""The benchmark harness compares ferroloop with its peers by default (`bench/README.md`)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loops_line(*args):
    out = subprocess.run(
        [sys.executable, *args, "--list"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=True,
    ).stdout
    lines = [line for line in out.splitlines() if line.startswith("Loops:")]
    assert len(lines) == 1, out
    return [name.strip() for name in lines[0].split(":", 1)[1].split(",")]


def test_a_default_benchmark_run_includes_ferroloop_and_its_peers():
    loops = _loops_line("bench/run.py")
    for name in ("asyncio", "uvloop", "rloop", "rsloop", "ferroloop"):
        assert name in loops, loops
    # A variant that is only run when named stays out of the default set.
    assert "rsloop-std" not in loops
