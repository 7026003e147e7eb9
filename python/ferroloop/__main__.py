"""`python -m ferroloop script.py [args...]`: run a script with ferroloop as the default loop."""

from __future__ import annotations

import builtins
import importlib.machinery
import io
import os
import runpy
import sys
import types
import zipfile

from . import install


def _run_main(code: types.CodeType, **attrs: object) -> None:
    """Run `code` as the `__main__` module, which stays `sys.modules["__main__"]` after its last
    line (for atexit handlers and pickling), as `python` leaves it."""
    module = types.ModuleType("__main__")
    module.__dict__.update(__builtins__=builtins, **attrs)
    sys.modules["__main__"] = module
    exec(code, module.__dict__)


def _run_script(path: str) -> None:
    """Run the source file `path` as `python path` does (3.9+): `sys.argv[0]` stays as
    typed, `__file__` is absolute (so are the script's tracebacks and reprs, and a
    script that chdirs still finds its folder)."""
    abspath = os.path.abspath(path)
    with io.open_code(abspath) as f:
        code = compile(f.read(), abspath, "exec", dont_inherit=True)
    loader = importlib.machinery.SourceFileLoader("__main__", abspath)
    _run_main(code, __file__=abspath, __cached__=None, __loader__=loader)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m ferroloop SCRIPT [ARGS...]  (or -m MODULE, or -c CODE, [ARGS...])",
              file=sys.stderr)
        raise SystemExit(2)
    install()
    if sys.argv[1] == "-m":
        if len(sys.argv) < 3:
            raise SystemExit("python -m ferroloop -m: a module name is required")
        sys.argv = sys.argv[2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
        return
    if sys.argv[1] == "-c":
        if len(sys.argv) < 3:
            raise SystemExit("python -m ferroloop -c: the code to run is required")
        # As `python -c CODE args` does: argv[0] is "-c" and the current folder comes first.
        code = compile(sys.argv[2], "<string>", "exec", dont_inherit=True)
        sys.argv = ["-c", *sys.argv[3:]]
        sys.path[0] = ""
        _run_main(code, __loader__=importlib.machinery.BuiltinImporter)
        return
    sys.argv = sys.argv[1:]
    if not os.path.exists(sys.argv[0]):  # `python` says so in one line and exits 2
        print(f"python -m ferroloop: can't open file {os.path.abspath(sys.argv[0])!r}: "
              "[Errno 2] No such file or directory", file=sys.stderr)
        raise SystemExit(2)
    # As `python script.py` does: the script's folder comes first on sys.path.
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    if os.path.isfile(sys.argv[0]) and not zipfile.is_zipfile(sys.argv[0]):
        _run_script(sys.argv[0])
    else:  # a folder or zip with a __main__.py
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
