"""Run every script in examples/ on CPython's default loop and on ferroloop.

Each example runs twice, as two simultaneous subprocesses: ``python script.py``
(stock asyncio loop) and ``python -m ferroloop script.py`` (ferroloop installed
as the event loop policy).  Both runs must exit 0 with an empty stderr and
print the same stdout.

The examples mostly sleep, so to keep the suite fast the pairs are started in
the background, a few at a time (``FERROLOOP_EXAMPLES_JOBS`` pairs, default 4;
set it to 1 to run one pair at a time), as soon as the first example test runs;
each test then waits for its own pair.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES_DIR.glob("*.py"))

# Scripts whose line order is genuinely nondeterministic; their stdout is
# compared as a sorted list of lines (same lines, same counts, any order).
UNORDERED = {
    # The producer's 0.1 s sleeps and the consumers' 0.2 s sleeps expire at
    # the same nominal instants ("Produced 2" and "Consumer A processed 0" are
    # both due at t=0.3 s), so which prints first depends on sub-millisecond
    # timer jitter and on the loop's clock resolution.
    "11_queue_producer_consumer.py": "producer/consumer timers tie",
    # Three pool threads pick up tasks 0-2 (and then 3-4) and print
    # "Task n starting" in whatever order the OS schedules them.
    "17_thread_pool_executor.py": "threads start in any order",
}

# Messages printed from worker threads.  print() writes the text and the
# newline separately, so two threads can interleave between them and produce
# "Task 3 startingTask 4 starting\n\n" (seen on CPython's own loop with the
# unbuffered stdout these tests use).  For these scripts the messages are cut
# out of the raw output before it is split into lines.
THREAD_MESSAGES = {
    "17_thread_pool_executor.py": re.compile(r"Task \d+ starting"),
}

# Third-party modules an example imports; the example is skipped if missing.
REQUIRES = {
    "19_aiohttp_client.py": "aiohttp",
}

# Wall-clock limit for one run of a script.  The slowest examples take ~4 s.
# The pytest-timeout limit is larger, so that our own failure (which shows the
# output so far and kills the process group) fires first.
SCRIPT_TIMEOUT = 60
TEST_TIMEOUT = SCRIPT_TIMEOUT + 30

JOBS = max(1, int(os.environ.get("FERROLOOP_EXAMPLES_JOBS", "4")))

# Environment switches that make asyncio log debug warnings ("Executing ...
# took 0.105 seconds") to stderr, which would break the empty-stderr check.
_NOISY_ENV = ("PYTHONASYNCIODEBUG", "PYTHONDEVMODE")


def _missing_requirement(script: str) -> str | None:
    module = REQUIRES.get(script)
    if module is not None and importlib.util.find_spec(module) is None:
        return f"{script} needs {module!r}, which is not installed"
    return None


class _Runner:
    """Runs script pairs on a small thread pool; kills leftovers on close."""

    def __init__(self, jobs: int) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=jobs, thread_name_prefix="example-pair"
        )
        self._futures: dict[str, concurrent.futures.Future] = {}
        self._live: set[subprocess.Popen[str]] = set()
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, script: str) -> None:
        if script not in self._futures:
            self._futures[script] = self._pool.submit(self._run_pair, script)

    def result(self, script: str):
        self.submit(script)
        return self._futures[script].result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._closed = True
            live = list(self._live)
        for proc in live:
            _kill(proc)
        self._pool.shutdown(wait=True)

    def _start(self, args: list[str]) -> subprocess.Popen[str]:
        with self._lock:
            if self._closed:
                raise RuntimeError("example runner already closed")
            proc = _start(args)
            self._live.add(proc)
        return proc

    def _run_pair(self, script: str):
        deadline = time.monotonic() + SCRIPT_TIMEOUT
        procs = [self._start([script]), self._start(["-m", "ferroloop", script])]
        try:
            return [_collect(proc, deadline) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    _kill(proc)
                    proc.communicate()
            with self._lock:
                self._live.difference_update(procs)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _NOISY_ENV}
    env["PYTHONIOENCODING"] = "utf-8"
    # Same buffering everywhere, and a killed run still shows what it printed.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=EXAMPLES_DIR,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        # Own process group, so that a hung run can be killed together with
        # its children (e.g. ProcessPoolExecutor workers).
        start_new_session=True,
    )


def _kill(proc: subprocess.Popen[str]) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # pragma: no cover - non-POSIX
            proc.kill()
    except ProcessLookupError:
        pass


def _collect(proc: subprocess.Popen[str], deadline: float) -> tuple[int | None, str, str]:
    """Return (returncode, stdout, stderr); returncode None means timed out."""
    try:
        out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, err = proc.communicate()
        return None, out, err
    return proc.returncode, out, err


def _check_clean(label: str, result: tuple[int | None, str, str]) -> None:
    rc, out, err = result
    what = f"timed out after {SCRIPT_TIMEOUT}s" if rc is None else f"exit code {rc}"
    assert rc == 0 and err == "", (
        f"{label}: {what}\n--- stdout ---\n{out}--- stderr ---\n{err}"
    )


def _comparable(script: str, out: str) -> list[str]:
    pattern = THREAD_MESSAGES.get(script)
    if pattern is None:
        lines = out.splitlines()
    else:
        rest = pattern.sub("", out).splitlines()
        lines = pattern.findall(out) + [line for line in rest if line]
    if script in UNORDERED:
        lines.sort()
    return lines


@pytest.fixture(scope="module")
def runner(request: pytest.FixtureRequest):
    pairs = _Runner(JOBS)
    # Queue every selected example up front, in test order, so later pairs
    # run while earlier tests are still waiting.
    this_file = Path(__file__).resolve()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        item_path = getattr(item, "path", None)
        if (
            callspec is not None
            and "script" in callspec.params
            and item_path is not None
            and Path(item_path).resolve() == this_file
            and _missing_requirement(callspec.params["script"]) is None
        ):
            pairs.submit(callspec.params["script"])
    yield pairs
    pairs.close()


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_output_matches_default_loop(runner: _Runner, script: str) -> None:
    reason = _missing_requirement(script)
    if reason is not None:
        pytest.skip(reason)

    default, ferro = runner.result(script)
    _check_clean(f"python {script}", default)
    _check_clean(f"python -m ferroloop {script}", ferro)
    assert default[1].strip(), f"{script} printed nothing on the default loop"

    assert _comparable(script, ferro[1]) == _comparable(script, default[1])


_LOOP_PROBE = """\
import asyncio
import ferroloop

async def main():
    return isinstance(asyncio.get_running_loop(), ferroloop.Loop)

print("asyncio.run:", asyncio.run(main()))
loop = asyncio.new_event_loop()
print("new_event_loop:", isinstance(loop, ferroloop.Loop))
loop.close()
"""


@pytest.mark.timeout(TEST_TIMEOUT)
def test_runner_really_uses_ferroloop(tmp_path: Path) -> None:
    """Guard against the comparison above passing only because
    `python -m ferroloop` ran the examples on the stock loop."""
    probe = tmp_path / "probe_loop.py"
    probe.write_text(_LOOP_PROBE)
    proc = _start(["-m", "ferroloop", str(probe)])
    try:
        result = _collect(proc, time.monotonic() + SCRIPT_TIMEOUT)
    finally:
        if proc.poll() is None:
            _kill(proc)
            proc.communicate()
    _check_clean("python -m ferroloop probe_loop.py", result)
    assert result[1].splitlines() == ["asyncio.run: True", "new_event_loop: True"]


def _python(args, cwd: Path) -> "subprocess.CompletedProcess[str]":
    """`python *args` in `cwd`, its output captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )


_MAIN_PROBE = """\
import os
import sys

print("argv0:", sys.argv[0])
print("file:", __file__)
print("path0:", sys.path[0])
"""


@pytest.mark.timeout(TEST_TIMEOUT)
def test_runner_gives_the_script_the_file_and_argv_that_python_gives_it(tmp_path: Path) -> None:
    """`python -m ferroloop probe.py` with a relative path must set `__file__`,
    `sys.argv[0]` and `sys.path[0]` as `python probe.py` does: `__file__` is
    absolute (3.9+), so a script that chdirs or prints a traceback sees the
    same paths on both."""
    (tmp_path / "probe.py").write_text(_MAIN_PROBE)
    results = []
    for args in (["probe.py"], ["-m", "ferroloop", "probe.py"]):
        proc = _python(args, tmp_path)
        _check_clean(f"python {' '.join(args)}", (proc.returncode, proc.stdout, proc.stderr))
        results.append(proc.stdout)
    assert results[1] == results[0]
    assert f"file: {tmp_path / 'probe.py'}" in results[0].splitlines()


@pytest.mark.timeout(TEST_TIMEOUT)
def test_runner_reports_a_missing_script_in_one_line_and_exits_2(tmp_path: Path) -> None:
    for args in (["missing.py"], ["-m", "ferroloop", "missing.py"]):
        proc = _python(args, tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stdout == ""
        assert proc.stderr.count("\n") == 1
        assert f"can't open file {str(tmp_path / 'missing.py')!r}" in proc.stderr


_C_PROBE = """\
import asyncio, sys
async def main():
    return type(asyncio.get_running_loop()).__module__
print("argv:", sys.argv, "path0:", repr(sys.path[0]), "file:", "__file__" in globals())
print("loop:", asyncio.run(main()))
"""


@pytest.mark.timeout(TEST_TIMEOUT)
def test_runner_runs_code_given_with_c_as_python_c_does(tmp_path: Path) -> None:
    results = []
    for args in (["-c", _C_PROBE, "a"], ["-m", "ferroloop", "-c", _C_PROBE, "a"]):
        proc = _python(args, tmp_path)
        _check_clean("python " + " ".join(args[:-2]), (proc.returncode, proc.stdout, proc.stderr))
        results.append(proc.stdout.splitlines())
    default, ferro = results
    assert ferro[0] == default[0] == "argv: ['-c', 'a'] path0: '' file: False"
    assert default[1] == "loop: asyncio.unix_events"
    assert ferro[1] == "loop: ferroloop._loop"
