"""Conformance worker: runs ONE module of CPython's test.test_asyncio in this
process with the loop under test installed.  Started by run.py (one process per
module); it can also be run by hand for debugging, e.g.

    python tests/conformance/_worker.py --module test_futures2 --loop uvloop \
        --events /tmp/ev.jsonl

What it does, in order:
  1. loads the loop under test ("target"): a module exposing new_event_loop(),
     Loop and EventLoopPolicy (ferroloop, uvloop), or "asyncio" (a renamed
     subclass of CPython's SelectorEventLoop, to self-test the harness);
  2. installs the recorder hooks (which loop types each test created / ran);
  3. makes the target the loop every test gets: the _loop_factory of CPython's
     default policy classes (so set_event_loop_policy(None) in tearDownModule
     keeps it), asyncio.SelectorEventLoop / asyncio.EventLoop;
  4. imports the module, applies adapters.py, replaces the selector/proactor-
     parametrised TestCase classes with one "Ferro..." class whose
     create_event_loop()/new_loop() returns the target;
  5. runs the tests (minus exclusions) and writes one JSON line per test to
     --events, flushed as it goes, so the parent keeps the results of a worker
     that hangs or crashes and can restart it after the culprit.
"""
import argparse
import asyncio
import asyncio.base_events
import faulthandler
import importlib
import inspect
import json
import os
import re
import sys
import time
import traceback
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import adapters  # noqa: E402

MAX_TB = 6000


# --------------------------------------------------------------------------
# the loop under test

class Target:
    def __init__(self, name, loop_classes, factory, policy):
        self.name = name
        self.loop_classes = loop_classes
        self.factory = factory
        self.policy = policy


def load_target(spec):
    if spec == "asyncio":
        # A harness self-test: CPython's own loop, but under its own class so
        # the recorder can tell it from CPython loops that a test made itself.
        base = asyncio.SelectorEventLoop

        class StandInLoop(base):
            pass

        StandInLoop.__module__ = "conformance_standin"

        class StandInPolicy(asyncio.DefaultEventLoopPolicy):
            _loop_factory = StandInLoop

        return Target("asyncio-standin", (StandInLoop,), StandInLoop, StandInPolicy)
    mod = importlib.import_module(spec)
    loop_cls = getattr(mod, "Loop")
    classes = loop_cls if isinstance(loop_cls, tuple) else (loop_cls,)
    return Target(spec, classes, mod.new_event_loop, getattr(mod, "EventLoopPolicy", None))


# --------------------------------------------------------------------------
# recording which loops each test used

def _typename(obj):
    t = type(obj)
    return "%s.%s" % (t.__module__, t.__qualname__)


class Recorder:
    """Collects, per test, the loop types created and run.

    Categories: 'target' (the loop under test), 'cpython' (any real
    asyncio.BaseEventLoop that is not the target, e.g. a SelectorEventLoop a
    test built itself), 'mock' (test_utils.TestLoop, CPython's virtual-time
    mock loop).
    """

    def __init__(self, target):
        self.target = target
        self.current = None
        self.outside = self._new()
        self.hooks = []
        from test.test_asyncio import utils as test_utils
        self.TestLoop = test_utils.TestLoop

    @staticmethod
    def _new():
        return {"created": set(), "ran": set(), "cats": set(), "ran_cats": set()}

    def begin(self):
        self.current = self._new()

    def end(self):
        rec, self.current = self.current, None
        return rec

    def classify(self, loop):
        if isinstance(loop, self.target.loop_classes):
            return "target"
        if isinstance(loop, self.TestLoop):
            return "mock"
        if isinstance(loop, asyncio.base_events.BaseEventLoop):
            return "cpython"
        return "other"

    def note(self, what, loop):
        try:
            rec = self.current if self.current is not None else self.outside
            cat = self.classify(loop)
            rec["cats"].add(cat)
            if what == "ran":
                rec["ran_cats"].add(cat)
            rec[what].add(_typename(loop))
        except Exception:  # never let bookkeeping break a test
            pass

    # -- hooks ---------------------------------------------------------------
    def install(self):
        rec = self
        BEL = asyncio.base_events.BaseEventLoop

        orig_init = BEL.__init__

        def __init__(self, *args, **kwargs):
            orig_init(self, *args, **kwargs)
            rec.note("created", self)

        BEL.__init__ = __init__
        self.hooks.append("asyncio.BaseEventLoop.__init__")
        self._wrap_run_methods(BEL, "asyncio.BaseEventLoop")
        for cls in self.target.loop_classes:
            if not issubclass(cls, BEL):
                self._wrap_run_methods(cls, _typename_cls(cls))

    def _wrap_run_methods(self, cls, label):
        rec = self
        for name in ("run_forever", "run_until_complete"):
            orig = getattr(cls, name, None)
            if orig is None:
                continue

            def make(orig, name):
                def wrapper(self, *args, **kwargs):
                    rec.note("ran", self)
                    return orig(self, *args, **kwargs)
                wrapper.__name__ = name
                wrapper.__qualname__ = "%s.%s" % (cls.__qualname__, name)
                wrapper.__doc__ = getattr(orig, "__doc__", None)
                return wrapper
            try:
                setattr(cls, name, make(orig, name))
                self.hooks.append("%s.%s" % (label, name))
            except (TypeError, AttributeError):
                # immutable (e.g. pure extension) type: creation is still
                # recorded by the factories below.
                pass


def _typename_cls(cls):
    return "%s.%s" % (cls.__module__, cls.__qualname__)


def category(rec):
    """'cpython' (flagged) if a CPython loop ran, or one was created while the
    target never was; 'target' if the loop under test was created or ran;
    else 'none' (no loop, or only test_utils.TestLoop)."""
    cats = rec["cats"]
    ran_foreign = bool(rec.get("ran_cats", set()) & {"cpython", "other"})
    if ran_foreign:
        return "cpython"
    if "target" in cats:
        return "target"
    if "cpython" in cats or "other" in cats:
        return "cpython"
    return "none"


def loops_json(rec):
    return {"created": sorted(rec["created"]), "ran": sorted(rec["ran"]),
            "category": category(rec)}


# --------------------------------------------------------------------------
# installing the target as the loop every test gets

def install_target(target, recorder, mode):
    def make_loop(*args, **kwargs):
        # *args: the selector some mixins pass to SelectorEventLoop; ignored.
        loop = target.factory()
        recorder.note("created", loop)
        return loop

    orig_classes = target.loop_classes

    class _TargetMeta(type):
        def __call__(cls, *args, **kwargs):
            return make_loop()

        def __instancecheck__(cls, obj):
            return isinstance(obj, orig_classes)

        def __subclasscheck__(cls, sub):
            return isinstance(sub, type) and issubclass(sub, orig_classes)

    class SelectorEventLoop(metaclass=_TargetMeta):
        """Conformance harness: stands for the loop under test."""

    from asyncio import events, unix_events
    if mode == "factory":
        fac = staticmethod(make_loop)
        for ns, name in ((events, "BaseDefaultEventLoopPolicy"),
                         (events, "_BaseDefaultEventLoopPolicy"),
                         (unix_events, "_UnixDefaultEventLoopPolicy")):
            cls = getattr(ns, name, None)
            if cls is not None:
                cls._loop_factory = fac
    elif mode == "policy":
        if target.policy is None:
            raise SystemExit("target %s has no EventLoopPolicy" % target.name)

        class RecordingPolicy(target.policy):
            def new_event_loop(self):
                loop = super().new_event_loop()
                recorder.note("created", loop)
                return loop

        RecordingPolicy.__name__ = RecordingPolicy.__qualname__ = target.policy.__name__
        RecordingPolicy.__module__ = target.policy.__module__
        asyncio.DefaultEventLoopPolicy = RecordingPolicy
        unix_events.DefaultEventLoopPolicy = RecordingPolicy
    else:
        raise SystemExit("unknown --install mode %r" % mode)
    asyncio.set_event_loop_policy(None)

    for ns in (asyncio, unix_events):
        ns.SelectorEventLoop = SelectorEventLoop
        if hasattr(ns, "EventLoop"):  # 3.13+
            ns.EventLoop = SelectorEventLoop
    return make_loop


# --------------------------------------------------------------------------
# loop-parametrised TestCase classes

_SEL_RE = re.compile(r"Selector|Select|EPoll|Epoll|Kqueue|Proactor|IocpEventLoop|Poll")
_FACTORY_METHODS = ("create_event_loop", "new_loop")


def retarget_parametrised(mod, make_loop):
    """Replace every group of selector/proactor-parametrised concrete classes
    (same bases, a create_event_loop()/new_loop() that builds a
    SelectorEventLoop/ProactorEventLoop) with ONE class, named Ferro<Name>,
    subclassing the group's generic member, whose factory returns the target.
    Returns {new_name: [replaced names]}."""
    groups = {}
    for name, obj in sorted(vars(mod).items()):
        if not (isinstance(obj, type) and issubclass(obj, unittest.TestCase)):
            continue
        if obj.__module__ != mod.__name__:
            continue
        for meth in _FACTORY_METHODS:
            fn = obj.__dict__.get(meth)
            if fn is None:
                continue
            try:
                src = inspect.getsource(fn)
            except (OSError, TypeError):
                src = ""
            if "SelectorEventLoop" in src or "ProactorEventLoop" in src:
                groups.setdefault((obj.__bases__, meth), []).append(name)
    done = {}
    for (bases, meth), names in groups.items():
        classes = [getattr(mod, n) for n in names]

        def rank(cls):
            n = cls.__name__
            return (bool(getattr(cls, "__unittest_skip__", False)),
                    "Proactor" in n or "Kqueue" in n,
                    "Select" not in n)
        rep = sorted(classes, key=rank)[0]
        if getattr(rep, "__unittest_skip__", False) or "Proactor" in rep.__name__:
            for n in names:   # nothing runnable here (Windows-only group)
                delattr(mod, n)
            continue
        new_name = "Ferro" + _SEL_RE.sub("", rep.__name__)
        while hasattr(mod, new_name) or new_name in done:
            new_name += "_"

        def factory(self, *args, **kwargs):
            return make_loop()
        factory.__name__ = meth
        new = type(new_name, (rep,), {meth: factory, "__module__": mod.__name__,
                                      "__qualname__": new_name,
                                      "__doc__": "%s on the loop under test" % rep.__name__})
        for n in names:
            delattr(mod, n)
        setattr(mod, new_name, new)
        done[new_name] = names
    return done


# --------------------------------------------------------------------------
# result collection

class Sink:
    def __init__(self, path):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, obj):
        self.f.write(json.dumps(obj, default=str) + "\n")
        self.f.flush()


def _message(err):
    try:
        lines = traceback.format_exception_only(err[0], err[1])
        return "".join(lines).strip().splitlines()[0] if lines else repr(err[1])
    except Exception:
        return repr(err[1])


class Result(unittest.TextTestResult):
    def __init__(self, stream, descriptions, verbosity, *, sink, recorder,
                 test_timeout, fault_file):
        super().__init__(stream, descriptions, verbosity)
        self.sink = sink
        self.recorder = recorder
        self.test_timeout = test_timeout
        self.fault_file = fault_file
        self.cur = None

    def _fixture(self, test, outcome, message, tb=None):
        # errors/skips of setUpClass, setUpModule... (unittest's _ErrorHolder)
        desc = getattr(test, "description", None) or str(test)
        desc = desc.replace(_common.PKG + ".", "")
        self.sink.write({"event": "test", "id": "<fixture> " + desc, "outcome": outcome,
                         "message": message, "traceback": tb, "duration": 0.0,
                         "loops": loops_json(self.recorder.outside)})

    def startTest(self, test):
        super().startTest(test)
        tid = _common.short_id(test.id())
        self.cur = {"id": tid, "outcome": "passed", "message": None,
                    "traceback": None, "t0": time.monotonic()}
        self.recorder.begin()
        self.sink.write({"event": "start", "id": tid})
        if self.test_timeout:
            faulthandler.dump_traceback_later(self.test_timeout, exit=True,
                                              file=self.fault_file)

    def stopTest(self, test):
        if self.test_timeout:
            faulthandler.cancel_dump_traceback_later()
        rec = self.recorder.end() or Recorder._new()
        cur, self.cur = self.cur, None
        if cur is not None:
            ev = {"event": "test", "id": cur["id"], "outcome": cur["outcome"],
                  "message": cur["message"], "traceback": cur["traceback"],
                  "duration": round(time.monotonic() - cur["t0"], 3),
                  "loops": loops_json(rec)}
            if cur["outcome"] in ("failed", "error"):
                ev["internals"] = test_internals(test)
            self.sink.write(ev)
        super().stopTest(test)

    def _set(self, outcome, message, err=None, test=None):
        if self.cur is None:
            return False
        if self.cur["outcome"] in ("failed", "error"):
            return True  # the first failure wins
        self.cur["outcome"] = outcome
        self.cur["message"] = message
        if err is not None:
            self.cur["traceback"] = self._exc_info_to_string(err, test)[-MAX_TB:]
        return True

    def addError(self, test, err):
        super().addError(test, err)
        if not isinstance(test, unittest.TestCase) or self.cur is None:
            self._fixture(test, "error", _message(err),
                          self._exc_info_to_string(err, test)[-MAX_TB:])
        else:
            self._set("error", _message(err), err, test)

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._set("failed", _message(err), err, test)

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        if not isinstance(test, unittest.TestCase) or self.cur is None:
            self._fixture(test, "skipped", reason)
        elif self.cur["outcome"] == "passed":
            self.cur["outcome"] = "skipped"
            self.cur["message"] = reason

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        if self.cur is not None:
            self.cur["message"] = "expected failure"

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._set("failed", "unexpected success")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            if issubclass(err[0], unittest.SkipTest):
                return
            kind = "failed" if issubclass(err[0], test.failureException) else "error"
            self._set(kind, "%s %s" % (subtest._subDescription(), _message(err)), err, test)


def test_internals(test):
    """CPython-internal names the test method's source touches (a triage hint)."""
    try:
        fn = getattr(type(test), test._testMethodName)
        return _common.internals_hints(inspect.getsource(fn))
    except Exception:
        return []


def flatten(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from flatten(t)
        else:
            yield t


# --------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", required=True, help="e.g. test_events")
    ap.add_argument("--loop", default=os.environ.get("FERROLOOP_CONFORMANCE_LOOP", "ferroloop"))
    ap.add_argument("--install", default="factory", choices=("factory", "policy"))
    ap.add_argument("--events", required=True, help="JSON-lines output file")
    ap.add_argument("--fault-file", help="faulthandler output (default: stderr)")
    ap.add_argument("--exclusions", help="JSON list of {pattern, reason} for this module")
    ap.add_argument("--skip-ids", help="file: ids already done (restart after a crash)")
    ap.add_argument("--test-timeout", type=float, default=0)
    ap.add_argument("--tests", help="comma-separated fnmatch patterns: run only these")
    ap.add_argument("-v", "--verbosity", type=int, default=2)
    args = ap.parse_args(argv)

    fault_file = open(args.fault_file, "a") if args.fault_file else sys.stderr
    faulthandler.enable(file=fault_file, all_threads=True)
    sink = Sink(args.events)
    excl = []
    if args.exclusions:
        with open(args.exclusions, encoding="utf-8") as f:
            excl = json.load(f)
    skip_ids = set()
    if args.skip_ids and os.path.exists(args.skip_ids):
        with open(args.skip_ids, encoding="utf-8") as f:
            skip_ids = {line.strip() for line in f if line.strip()}
    only = [p for p in (args.tests or "").split(",") if p]

    def excluded_by(tid):
        for e in excl:
            if _common.id_matches(e["pattern"], tid):
                return e
        return None

    target = load_target(args.loop)
    recorder = Recorder(target)
    recorder.install()
    make_loop = install_target(target, recorder, args.install)
    adapters.install_global(make_loop)

    modname = args.module
    sink.write({"event": "meta", "module": modname, "target": target.name,
                "target_classes": [_typename_cls(c) for c in target.loop_classes],
                "python": sys.version.split()[0], "executable": sys.executable,
                "install": args.install, "hooks": recorder.hooks, "pid": os.getpid()})
    try:
        mod = importlib.import_module(_common.PKG + "." + modname)
    except unittest.SkipTest as exc:
        e = excluded_by(modname)
        sink.write({"event": "test", "id": modname,
                    "outcome": "excluded" if e else "skipped",
                    "message": e["reason"] if e else "module skipped: %s" % exc,
                    "excluded_by": e["pattern"] if e else None, "loops": None})
        sink.write({"event": "finished"})
        os._exit(0)
    except BaseException:
        sink.write({"event": "test", "id": modname, "outcome": "error",
                    "message": "import failed: %s" % _message(sys.exc_info()),
                    "traceback": traceback.format_exc()[-MAX_TB:], "loops": None})
        sink.write({"event": "finished"})
        os._exit(0)

    notes = {}
    notes["adapters"] = adapters.apply(modname, mod, make_loop)
    notes["parametrised"] = retarget_parametrised(mod, make_loop)
    sink.write({"event": "prepared", "notes": notes})

    suite = unittest.defaultTestLoader.loadTestsFromModule(mod)
    to_run = []
    collected = []
    for t in flatten(suite):
        tid = _common.short_id(t.id())
        collected.append(tid)
        if tid in skip_ids:
            continue
        if only and not any(_common.id_matches(p, tid) for p in only):
            continue
        e = excluded_by(tid)
        if e is not None:
            sink.write({"event": "test", "id": tid, "outcome": "excluded",
                        "message": e["reason"], "excluded_by": e["pattern"],
                        "loops": None})
            continue
        to_run.append(t)
    sink.write({"event": "collected", "ids": collected})

    stream = unittest.runner._WritelnDecorator(sys.stderr)
    result = Result(stream, True, args.verbosity, sink=sink, recorder=recorder,
                    test_timeout=args.test_timeout, fault_file=fault_file)
    t0 = time.monotonic()
    unittest.TestSuite(to_run).run(result)
    result.printErrors()
    sys.stderr.flush()
    sink.write({"event": "finished", "duration": round(time.monotonic() - t0, 3),
                "outside_loops": loops_json(recorder.outside)})
    sys.stdout.flush()
    # don't let leftover non-daemon threads or atexit hooks hang the worker
    os._exit(0)


if __name__ == "__main__":
    main()
