"""Event loops the harness knows about, and how to make one.

Each entry names a module and a factory attribute.  A loop whose module does
not import (or whose factory fails) is "n/a": reported and skipped.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
from typing import Any, Callable, Dict, Optional


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    name: str
    module: str
    factory: str = "new_event_loop"
    dist: Optional[str] = None  # distribution name for importlib.metadata, if not `module`
    # Undo what importing the module does to asyncio's stream functions (rsloop replaces
    # asyncio.open_connection/start_server with its own classes), so asyncio's run.
    keep_asyncio_streams: bool = False


LOOPS: Dict[str, LoopSpec] = {
    # CPython's default loop: asyncio.new_event_loop() on the default policy.
    "asyncio": LoopSpec("asyncio", "asyncio"),
    "uvloop": LoopSpec("uvloop", "uvloop"),
    "rloop": LoopSpec("rloop", "rloop"),
    # rsloop has no wheel and its sdist needs a pinned nightly Rust; see bench/README.md.
    "rsloop": LoopSpec("rsloop", "rsloop"),
    "ferroloop": LoopSpec("ferroloop", "ferroloop"),
}

# Variants that are not run unless asked for by name (--loops).
EXTRA_LOOPS: Dict[str, LoopSpec] = {
    # rsloop with asyncio's own streams (StreamReader/StreamWriter), as every other loop runs.
    "rsloop-std": LoopSpec("rsloop-std", "rsloop", dist="rsloop", keep_asyncio_streams=True),
}

BASELINE = "uvloop"


class LoopUnavailable(Exception):
    pass


def spec_of(name: str) -> LoopSpec:
    return LOOPS[name] if name in LOOPS else EXTRA_LOOPS[name]


_STREAM_FUNCTIONS = ("open_connection", "start_server", "open_unix_connection", "start_unix_server")


def factory(name: str) -> Callable[[], Any]:
    """Return the loop factory for `name`, or raise LoopUnavailable."""
    spec = spec_of(name)
    saved = []
    if spec.keep_asyncio_streams:
        import asyncio
        import asyncio.streams

        saved = [(m, f, getattr(m, f)) for m in (asyncio, asyncio.streams) for f in _STREAM_FUNCTIONS
                 if hasattr(m, f)]
    try:
        mod = importlib.import_module(spec.module)
    except Exception as e:  # ImportError, or a broken extension module
        raise LoopUnavailable(f"import {spec.module}: {type(e).__name__}: {e}") from None
    finally:
        for m, f, fn in saved:
            setattr(m, f, fn)
    fn = getattr(mod, spec.factory, None)
    if not callable(fn):
        raise LoopUnavailable(f"{spec.module}.{spec.factory} missing")
    return fn


def version(name: str) -> str:
    spec = spec_of(name)
    if spec.module == "asyncio":
        return f"CPython {platform.python_version()}"
    mod = importlib.import_module(spec.module)
    v = getattr(mod, "__version__", None)
    if v:
        return str(v)
    try:
        from importlib.metadata import version as dist_version

        return dist_version(spec.dist or spec.module)
    except Exception:
        return "?"


def _extension_stamp(mod_dir: str) -> Optional[str]:
    """Newest compiled extension in the package dir, with its mtime: tells builds apart."""
    import datetime
    import glob

    sos = glob.glob(os.path.join(mod_dir, "*.so")) if mod_dir else []
    if not sos:
        return None
    newest = max(sos, key=os.path.getmtime)
    st = os.stat(newest)
    when = datetime.datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds")
    return f"{os.path.basename(newest)} {st.st_size // 1024} KiB, built {when}"


def probe(name: str) -> Dict[str, Any]:
    """Import the loop, make one and close it. Returns a JSON-able description."""
    info: Dict[str, Any] = {"name": name, "available": False}
    try:
        make = factory(name)
        loop = make()
        try:
            cls = type(loop)
            info["loop_class"] = f"{cls.__module__}.{cls.__qualname__}"
        finally:
            loop.close()
        info["version"] = version(name)
        mod = importlib.import_module(spec_of(name).module)
        mod_dir = os.path.dirname(getattr(mod, "__file__", "") or "")
        info["module_file"] = mod_dir
        info["build"] = _extension_stamp(mod_dir)
        info["available"] = True
    except LoopUnavailable as e:
        info["reason"] = str(e)
    except Exception as e:
        info["reason"] = f"factory failed: {type(e).__name__}: {e}"
    return info
