"""ferroloop's API accepts exactly what the running Python's asyncio accepts.

asyncio's own loop (`asyncio.new_event_loop()`, `_UnixSelectorEventLoop` on Linux), its
`Server`, its transports and its handles are the reference, on whichever Python runs the suite
(3.9-3.13). For each of their public methods ferroloop has the method (and nothing public that
asyncio lacks), with the same parameters: names, kinds, defaults. A native method's text
signature is only a claim, so the methods are also called: with every parameter asyncio's
signature has, by keyword, and with the keywords other Python versions add or drop
(`all_errors` 3.12, `keep_alive` 3.13, `context` 3.11, `eager_start` 3.14 ...), ferroloop must
raise TypeError exactly when asyncio does. The calls are cheap: a coroutine method's coroutine
is closed unstarted (a keyword is checked when the coroutine is made), a callback is cancelled.

Each comparison builds its own asyncio loop and ferroloop loop; these tests are not
parametrized by the `loop` fixture because each needs both.
"""

import asyncio
import inspect
import os
import signal
import socket
import sys

import pytest

ferroloop = pytest.importorskip("ferroloop")

# ---- what is compared -----------------------------------------------------------------------

# Keywords asyncio's loop methods take on some Python version from 3.9 to 3.14, with a value
# that does nothing when accepted. Each is probed on every Python: accepted where the running
# asyncio accepts it, TypeError where it does not.
OTHER_VERSION_KEYWORDS = {
    "call_soon": {"context": None},
    "call_soon_threadsafe": {"context": None},
    "call_later": {"context": None},
    "call_at": {"context": None},
    "create_task": {"name": None, "context": None, "eager_start": None},  # context 3.11, eager_start 3.14
    "create_connection": {
        "ssl_shutdown_timeout": None,  # 3.11
        "happy_eyeballs_delay": None,
        "interleave": None,
        "all_errors": False,  # 3.12
    },
    "create_server": {"ssl_shutdown_timeout": None, "keep_alive": None},  # 3.11, 3.13
    "create_unix_server": {"ssl_shutdown_timeout": None, "cleanup_socket": True},  # 3.11, 3.13
    "create_unix_connection": {"ssl_shutdown_timeout": None},  # 3.11
    "connect_accepted_socket": {"ssl_shutdown_timeout": None},  # 3.11
    "start_tls": {"ssl_shutdown_timeout": None},  # 3.11
    "create_datagram_endpoint": {"reuse_address": None},  # dropped in 3.11
    "shutdown_default_executor": {"timeout": None},  # 3.12
    "sock_recvfrom_into": {"nbytes": 0},
}

# Public names of asyncio's objects ferroloop leaves out, each with its reason. Keep it short:
# every entry is a difference a program can see.
MISSING_ALLOWED = {
    # asyncio's socket transports read `max_size` bytes per recv() and let it be changed per
    # transport; ferroloop reads natively into a fixed 256 KiB buffer. An attribute that could
    # be set and then be ignored would be worse than none.
    ("tcp", "max_size"): "ferroloop reads into a fixed native buffer",
    ("udp", "max_size"): "ferroloop reads into a fixed native buffer",
}

# Public names ferroloop has and asyncio lacks, each with its reason.
EXTRA_ALLOWED: dict = {}


def _noop(*args):
    pass


async def _nothing():
    pass


# The smallest call of each synchronous loop method worth probing (all arguments by keyword),
# and what undoes it. A coroutine method needs neither: its required parameters get None and
# its coroutine is closed before it starts.
def _sync_probes(loop, fds):
    probes = {
        "call_soon": ({"callback": _noop}, lambda h: h.cancel()),
        "call_soon_threadsafe": ({"callback": _noop}, lambda h: h.cancel()),
        "call_later": ({"delay": 3600, "callback": _noop}, lambda h: h.cancel()),
        "call_at": ({"when": loop.time() + 3600, "callback": _noop}, lambda h: h.cancel()),
        "create_future": ({}, None),
        "create_task": lambda: ({"coro": _nothing()}, _finish_task),
        "set_task_factory": ({"factory": None}, None),
        "get_task_factory": ({}, None),
        "time": ({}, None),
        "get_debug": ({}, None),
        "set_debug": ({"enabled": False}, None),
        "is_closed": ({}, None),
        "is_running": ({}, None),
        "stop": ({}, None),
        "get_exception_handler": ({}, None),
        "set_exception_handler": ({"handler": None}, None),
        "add_reader": ({"fd": fds[0], "callback": _noop}, lambda _: loop.remove_reader(fds[0])),
        "remove_reader": ({"fd": fds[0]}, None),
        "add_writer": ({"fd": fds[0], "callback": _noop}, lambda _: loop.remove_writer(fds[0])),
        "remove_writer": ({"fd": fds[0]}, None),
        "add_signal_handler": (
            {"sig": signal.SIGUSR2, "callback": _noop},
            lambda _: loop.remove_signal_handler(signal.SIGUSR2),
        ),
        "remove_signal_handler": ({"sig": signal.SIGUSR2}, None),
        "run_in_executor": ({"executor": None, "func": _noop}, lambda f: loop.run_until_complete(f)),
    }
    # (made when used: create_task's coroutine must not be left unawaited)
    return {n: (p if callable(p) else (lambda p=p: p)) for n, p in probes.items()}


def _finish_task(task):
    task.cancel()
    try:
        task.get_loop().run_until_complete(task)
    except asyncio.CancelledError:
        pass


def _public(obj):
    return {name for name in dir(obj) if not name.startswith("_")}


def _params(func):
    """The parameters as (name, kind, default), annotations left out."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()]


def _same_default(a, b):
    return a is b or (type(a) is type(b) and a == b)


def _assert_same_signature(what, reference, ours):
    ref, got = _params(reference), _params(ours)
    same = [p[:2] for p in got] == [p[:2] for p in ref] and all(
        _same_default(a[2], b[2]) for a, b in zip(ref, got)
    )
    if not same:
        raise AssertionError(
            f"{what}: parameters differ\n  asyncio:   {inspect.signature(reference)}"
            f"\n  ferroloop: {inspect.signature(ours)}"
        )


def _object_differences(kind, reference, ours):
    """How `ours` differs from `reference`: public names (less the allowed differences),
    callables, coroutine functions, method signatures. A list of messages."""
    problems = []
    ref_names, our_names = _public(reference), _public(ours)
    missing = {n for n in ref_names - our_names if (kind, n) not in MISSING_ALLOWED}
    extra = {n for n in our_names - ref_names if (kind, n) not in EXTRA_ALLOWED}
    if missing:
        problems.append(f"{kind}: ferroloop lacks asyncio's {sorted(missing)}")
    if extra:
        problems.append(f"{kind}: ferroloop has {sorted(extra)}, which asyncio lacks here")
    for name in sorted(ref_names & our_names):
        a, b = getattr(reference, name), getattr(ours, name)
        if callable(a) != callable(b):
            problems.append(f"{kind}.{name}: callable on one side only")
        elif not callable(a):
            continue
        elif inspect.iscoroutinefunction(a) != inspect.iscoroutinefunction(b):
            problems.append(f"{kind}.{name}: a coroutine function on one side only")
        else:
            try:
                _assert_same_signature(f"{kind}.{name}", a, b)
            except AssertionError as exc:
                problems.append(str(exc))
    return problems


def _outcome(call):
    """'TypeError' (with its message) if call() raised it, else 'accepted'."""
    try:
        result = call()
    except TypeError as exc:
        return "TypeError", str(exc)
    return "accepted", result


def _dispose(result, undo):
    if inspect.iscoroutine(result):
        result.close()
    elif undo is not None:
        undo(result)


@pytest.fixture
def loops():
    fds = socket.socketpair()
    reference = asyncio.new_event_loop()
    ours = ferroloop.new_event_loop()
    try:
        yield reference, ours, [s.fileno() for s in fds]
    finally:
        reference.close()
        ours.close()
        for s in fds:
            s.close()


# asyncio's public loop methods on this Python, by class (so the test ids are known at
# collection); the stdlib loop asyncio.new_event_loop() makes here.
_REFERENCE_LOOP_CLASS = asyncio.SelectorEventLoop
_LOOP_METHODS = sorted(
    n for n in _public(_REFERENCE_LOOP_CLASS) if callable(getattr(_REFERENCE_LOOP_CLASS, n))
)


def _probe_cases():
    cases = []
    for name in _LOOP_METHODS:
        params = inspect.signature(getattr(_REFERENCE_LOOP_CLASS, name)).parameters
        keywords = [
            p.name
            for p in params.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        keywords += [k for k in OTHER_VERSION_KEYWORDS.get(name, ()) if k not in keywords]
        keywords.append("no_such_keyword")
        cases += [pytest.param(name, k, id=f"{name}-{k}") for k in keywords]
    return cases


# ---- the loop ---------------------------------------------------------------------------------


def test_loop_has_exactly_asyncios_public_names(loops):
    reference, ours, _ = loops
    missing = _public(reference) - _public(ours)
    extra = _public(ours) - _public(reference)
    assert not missing, f"ferroloop's loop lacks {sorted(missing)}"
    assert not extra, f"ferroloop's loop has {sorted(extra)}, which asyncio's lacks here"


def test_loop_implements_every_method_asyncio_implements():
    # A method asyncio's loop implements must not fall back to AbstractEventLoop's
    # NotImplementedError on ferroloop.
    abstract = asyncio.AbstractEventLoop
    for name in _public(abstract):
        base = getattr(abstract, name)
        if getattr(_REFERENCE_LOOP_CLASS, name) is not base:
            assert getattr(ferroloop.Loop, name) is not base, f"ferroloop does not implement {name}"


@pytest.mark.parametrize("name", _LOOP_METHODS)
def test_loop_method_signature_matches_asyncio(loops, name):
    reference, ours, _ = loops
    a, b = getattr(reference, name), getattr(ours, name, None)
    assert b is not None, f"ferroloop's loop lacks {name}"
    assert inspect.iscoroutinefunction(a) == inspect.iscoroutinefunction(b)
    _assert_same_signature(name, a, b)


@pytest.mark.parametrize("name, keyword", _probe_cases())
def test_loop_method_takes_a_keyword_exactly_when_asyncio_does(loops, name, keyword):
    reference, ours, fds = loops
    ref_method = getattr(reference, name)
    coroutine = inspect.iscoroutinefunction(ref_method)
    params = inspect.signature(ref_method).parameters
    if keyword in params and params[keyword].default is not inspect.Parameter.empty:
        value = params[keyword].default
    else:
        value = OTHER_VERSION_KEYWORDS.get(name, {}).get(keyword)
    outcomes = []
    for loop in (reference, ours):
        if coroutine:
            kwargs = {
                p.name: None
                for p in params.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            }
            undo = None
        else:
            probes = _sync_probes(loop, fds)
            if name not in probes:
                pytest.skip(f"{name} starts real work: its signature is compared instead")
            kwargs, undo = probes[name]()
        if keyword in kwargs and keyword != "no_such_keyword":
            kwargs = dict(kwargs)  # the required parameter itself, by keyword
        else:
            kwargs = {**kwargs, keyword: value}
        kind, result = _outcome(lambda: getattr(loop, name)(**kwargs))
        if kind == "accepted":
            _dispose(result, undo)
        elif name == "create_task":
            kwargs["coro"].close()
        outcomes.append(kind)
    assert outcomes[1] == outcomes[0], (
        f"{name}({keyword}=...): asyncio {outcomes[0]}, ferroloop {outcomes[1]}"
    )


@pytest.mark.parametrize(
    "name",
    [n for n in _LOOP_METHODS if not inspect.signature(getattr(_REFERENCE_LOOP_CLASS, n)).parameters.keys() - {"self"}],
)
def test_loop_method_without_parameters_rejects_an_argument(loops, name):
    reference, ours, _ = loops
    for loop in (reference, ours):
        kind, result = _outcome(lambda: getattr(loop, name)(1))
        assert kind == "TypeError", f"{type(loop).__name__}.{name}(1) was accepted"


# ---- Server, transports, handles ------------------------------------------------------------


async def _objects(loop, tmp_path):
    """One of each object a loop hands out: {kind: object}, and what closes them."""
    out = {}
    closers = []
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    closers.append(server)
    out["Server"] = server
    port = server.sockets[0].getsockname()[1]
    tcp, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    closers.append(tcp)
    out["tcp"] = tcp
    udp, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    closers.append(udp)
    out["udp"] = udp
    r, w = os.pipe()
    rpipe, _ = await loop.connect_read_pipe(asyncio.Protocol, os.fdopen(r, "rb", 0))
    wpipe, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, os.fdopen(w, "wb", 0))
    closers += [rpipe, wpipe]
    out["read pipe"], out["write pipe"] = rpipe, wpipe
    proc, _ = await loop.subprocess_exec(asyncio.SubprocessProtocol, sys.executable, "-c", "")
    closers.append(proc)
    out["subprocess"] = proc
    out["subprocess stdin"] = proc.get_pipe_transport(0)
    out["subprocess stdout"] = proc.get_pipe_transport(1)
    out["Handle"] = loop.call_soon(_noop)
    out["TimerHandle"] = loop.call_later(3600, _noop)
    return out, closers


async def _close(closers):
    for obj in closers:
        obj.close()
    for obj in closers:
        if isinstance(obj, asyncio.AbstractServer):
            await obj.wait_closed()
        elif isinstance(obj, asyncio.SubprocessTransport):
            while obj.get_returncode() is None:
                await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


def test_servers_transports_and_handles_match_asyncio(tmp_path):
    sides = []
    for new_loop in (asyncio.new_event_loop, ferroloop.new_event_loop):
        loop = new_loop()
        try:
            objects, closers = loop.run_until_complete(_objects(loop, tmp_path))
            loop.run_until_complete(_close(closers))
            for h in (objects["Handle"], objects["TimerHandle"]):
                h.cancel()
        finally:
            loop.close()
        sides.append(objects)
    reference, ours = sides
    problems = []
    for kind in reference:
        problems += _object_differences(kind, reference[kind], ours[kind])
    assert not problems, "\n".join(problems)


def test_tls_transport_class_matches_asyncio():
    from asyncio import sslproto

    from ferroloop._net import tls

    if not tls.FAST:
        pytest.skip("ferroloop uses asyncio's own SSLProtocol on this Python")
    problems = _object_differences(
        "TLS transport", sslproto._SSLProtocolTransport, tls._SSLProtocolTransport
    )
    assert not problems, "\n".join(problems)


def test_transport_methods_take_keywords_as_asyncio_does(tmp_path):
    # The native fast paths (`write`, `sendto`, `is_closing`) parse their arguments themselves.
    async def calls(loop):
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tcp, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        udp, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=("127.0.0.1", port)
        )
        results = []
        try:
            for call in (
                lambda: tcp.write(data=b"x"),
                lambda: tcp.write(b"x", b"y"),
                lambda: tcp.write(b"x", bogus=1),
                lambda: tcp.is_closing(1),
                lambda: tcp.is_closing(bogus=1),
                lambda: tcp.get_write_buffer_size(1),
                lambda: udp.sendto(data=b"x"),
                lambda: udp.sendto(b"x", addr=None),
                lambda: udp.sendto(data=b"x", addr=None),
                lambda: udp.sendto(b"x", None, None),
                lambda: udp.sendto(b"x", bogus=1),
            ):
                results.append(_outcome(call)[0])
        finally:
            tcp.close()
            udp.close()
            server.close()
            await server.wait_closed()
            await asyncio.sleep(0.01)
        return results

    outcomes = []
    for new_loop in (asyncio.new_event_loop, ferroloop.new_event_loop):
        loop = new_loop()
        try:
            outcomes.append(loop.run_until_complete(calls(loop)))
        finally:
            loop.close()
    assert outcomes[1] == outcomes[0]
