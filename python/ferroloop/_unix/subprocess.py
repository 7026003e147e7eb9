"""`subprocess_exec` / `subprocess_shell`: children spawned with `subprocess.Popen`, their pipes
as pipe transports, their exit watched by the reactor.

The exit of a child is learnt from a pidfd (`os.pidfd_open`) registered with the loop's
`_add_reader`: it becomes readable when the child terminates, and the loop reaps it with
`waitpid(WNOHANG)`. Where pidfds are missing (old kernels, seccomp) a daemon thread blocks in
`waitpid` and reports with `call_soon_threadsafe`. Either way each child is reaped exactly once
(no zombies), without SIGCHLD and without asyncio's child watchers.

The transport follows asyncio's subprocess transport contract: the pipes are connected first
(stdin, stdout, stderr), then connection_made; pipe_data_received / pipe_connection_lost /
process_exited in the order they happen, queued until connection_made; connection_lost once
the child exited and every pipe is closed. close() closes the pipes and kills a child that is
still running.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import subprocess
import sys
import threading
import types
import warnings
from asyncio import protocols, transports

from .._ferroloop import spawn_features as _spawn_features
from .pipes import PipesMixin, ReadPipeTransport, WritePipeTransport

logger = logging.getLogger("asyncio")

_PIPE = subprocess.PIPE
_STDOUT = subprocess.STDOUT
_DEVNULL = subprocess.DEVNULL


def _format_pipe(fd) -> str:
    if fd == _PIPE:
        return "<pipe>"
    if fd == _STDOUT:
        return "<stdout>"
    return repr(fd)


def _check_binary_args(bufsize, text, encoding, errors) -> None:
    if bufsize != 0:
        raise ValueError("bufsize must be 0")
    if text:
        raise ValueError("text must be False")
    if encoding is not None:
        raise ValueError("encoding must be None")
    if errors is not None:
        raise ValueError("errors must be None")


# ---- spawning without Popen ------------------------------------------------------------
#
# Popen clones with CLONE_VFORK: the loop thread sleeps until the child has been scheduled
# and has exec'd, which on busy CPUs is most of what a loop spends per child. For the options
# below the child is started natively instead (`_ferroloop.spawn`: the same child as Popen's,
# see crates/ferroloop/src/spawn.rs), the loop goes on, and subprocess_exec awaits the exec's
# outcome on a close-on-exec pipe, as Popen reads it. The Popen object, which only
# get_extra_info("subprocess") and the signalling methods need, is made when first asked
# for. Anything else (preexec_fn, pass_fds, close_fds=False, user/group, umask,
# process_group, pipesize, closed fds 0-2...) goes to Popen, and so do a bad fd and a child
# that fails before its exec (a missing cwd), so those errors are Popen's own.

try:
    from .._ferroloop import spawn as _native_spawn
except ImportError:  # (not on this platform)
    _native_spawn = None
_NATIVE, _CLOSE_RANGE = _spawn_features()
_NATIVE_OPTIONS = frozenset(
    ("executable", "close_fds", "cwd", "env", "restore_signals", "start_new_session")
)  # (close_fds only when true)
# A redirection, as _ferroloop.spawn takes it.
_INHERIT, _NEW_PIPE, _NULL, _AS_STDOUT = -1, -2, -3, -4
_STAGE_EXEC = 2
_Popen = subprocess.Popen
_audit = sys.audit
_cleanup = getattr(subprocess, "_cleanup", None)
_fsencode = os.fsencode
_dirname = os.path.dirname


def _stdio_code(spec):
    """`spec` (stdin/stdout/stderr as given) as a spawn code, or None if Popen must do it."""
    if spec is None:
        return _INHERIT
    if spec == _PIPE:
        return _NEW_PIPE
    if spec == _DEVNULL:
        return _NULL
    if isinstance(spec, int):
        return spec if spec >= 0 else None
    try:
        fd = spec.fileno()
    except Exception:
        return None  # (Popen raises what it raises)
    return fd if isinstance(fd, int) and fd >= 0 else None


class _Spawned:
    """A child started by _ferroloop.spawn whose exec has not been confirmed yet."""

    __slots__ = ("files", "filename", "pending", "pid")

    def __init__(self, pending, pid, files, filename):
        self.pending = pending
        self.pid = pid
        self.files = files
        self.filename = filename  # what Popen names in an exec error


def _popen_would_posix_spawn(path, codes, cwd, start_new_session) -> bool:
    """Would Popen (this Python's, close_fds=True) start this child with os.posix_spawn? Its
    child then has glibc's two internal signals (32, 33) ignored, which exec keeps; the child
    made here mirrors that."""
    if not (getattr(subprocess, "_USE_POSIX_SPAWN", False)
            and getattr(subprocess, "_HAVE_POSIX_SPAWN_CLOSEFROM", False)):
        return False
    if not _dirname(path) or cwd is not None or start_new_session:
        return False
    for code in codes:
        if code == _AS_STDOUT:
            code = codes[1]
        if 0 <= code <= 2:
            return False
    return True


def _spawn_without_popen(args, shell, stdin, stdout, stderr, kwargs):
    """Start the child natively if Popen's behaviour for these arguments is reproduced
    exactly; return a _Spawned, or None to use Popen."""
    if not _NATIVE or subprocess.Popen is not _Popen:
        return None  # (also when subprocess.Popen is replaced, by a mock say: it is called)
    for name in kwargs:
        if name not in _NATIVE_OPTIONS:
            return None
    get = kwargs.get
    if not get("close_fds", True) or not _CLOSE_RANGE:
        # (Popen spawns those with posix_spawn, whose child has glibc's internal signals
        # ignored: left to it.)
        return None
    codes = [_stdio_code(stdin), _stdio_code(stdout), _stdio_code(stderr)]
    if stderr == _STDOUT:
        # Popen: stdout's child fd, or the interpreter's own stdout when not redirected.
        if codes[1] != _INHERIT:
            codes[2] = _AS_STDOUT
        else:
            try:
                codes[2] = sys.__stdout__.fileno()
            except Exception:
                return None
    if None in codes:
        return None
    for target, code in enumerate(codes):
        # An fd 0-2 dup'ed elsewhere must still be the parent's when its turn comes (Popen
        # dups such fds out of the way first).
        if 0 <= code < target and codes[code] != _INHERIT:
            return None
    # The argument list and program as Popen._execute_child makes them.
    if isinstance(args, (str, bytes)):
        argv = [args]
    elif isinstance(args, os.PathLike):
        if shell:
            return None
        argv = [args]
    else:
        argv = list(args)
    executable = get("executable")
    if shell:
        argv = ["/bin/sh", "-c"] + argv
        if executable:
            argv[0] = executable
    if executable is None:
        executable = argv[0]
    cwd = get("cwd")
    env = get("env")
    try:
        path = _fsencode(executable)
        argv_b = [_fsencode(a) for a in argv]
        cwd_b = None if cwd is None else _fsencode(cwd)
        if env is not None:
            env_b = []
            for k, v in env.items():
                k = _fsencode(k)
                if b"=" in k:
                    return None
                env_b.append(k + b"=" + _fsencode(v))
        else:
            env_b = None
        if _dirname(path):
            paths = [path]
        else:
            paths = [os.path.join(_fsencode(d), path) for d in os.get_exec_path(env)]
    except Exception:
        return None
    start_new_session = bool(get("start_new_session", False))
    ignore_internal = _popen_would_posix_spawn(path, codes, cwd, start_new_session)
    if _cleanup is not None:
        _cleanup()  # (as Popen() does: reap Popen objects dropped while running)
    _audit("subprocess.Popen", executable, argv, cwd, env)
    try:
        pending, pid, p2c, c2p, err = _native_spawn(
            paths, argv_b, env_b, cwd_b, (codes[0], codes[1], codes[2]), True,
            bool(get("restore_signals", True)), start_new_session, ignore_internal,
        )
    except (OSError, ValueError, TypeError):
        return None
    # The files Popen would make (io.open(fd, mode, 0) is a FileIO).
    files = (
        io.FileIO(p2c, "wb") if p2c >= 0 else None,
        io.FileIO(c2p, "rb") if c2p >= 0 else None,
        io.FileIO(err, "rb") if err >= 0 else None,
    )
    return _Spawned(pending, pid, files, executable)


def _set_done(fut) -> None:
    if not fut.done():
        fut.set_result(None)


def _adopt_popen(args, pid, files, returncode):
    """A `subprocess.Popen` for a child spawned without it, as Popen(args, bufsize=0) would
    have left it (its own __init__ sets every attribute; only the spawning is skipped)."""
    popen = _Popen.__new__(_Popen)

    def _execute_child(*_args):
        popen.pid = pid
        popen._child_created = True

    popen._execute_child = _execute_child
    try:
        _Popen.__init__(popen, args, bufsize=0, universal_newlines=False)
    finally:
        del popen._execute_child
    popen.stdin, popen.stdout, popen.stderr = files
    popen.returncode = returncode
    return popen


class _PipeProto(protocols.BaseProtocol):
    """The protocol of one of the child's pipes: forwards events to the transport."""

    __slots__ = ("disconnected", "fd", "pipe", "proc")

    def __init__(self, proc, fd):
        self.proc = proc
        self.fd = fd
        self.pipe = None
        self.disconnected = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self.fd} pipe={self.pipe!r}>"

    def connection_made(self, transport) -> None:
        self.pipe = transport

    def connection_lost(self, exc) -> None:
        self.disconnected = True
        proc = self.proc
        self.proc = None
        proc._pipe_connection_lost(self.fd, exc)

    def pause_writing(self) -> None:
        self.proc._protocol.pause_writing()

    def resume_writing(self) -> None:
        self.proc._protocol.resume_writing()


class _ReadPipeProto(_PipeProto, protocols.Protocol):
    __slots__ = ()

    def data_received(self, data) -> None:
        proc = self.proc
        if proc._pending_calls is None:
            proc._loop.call_soon(proc._protocol.pipe_data_received, self.fd, data)
        else:
            proc._pending_calls.append((proc._protocol.pipe_data_received, (self.fd, data)))


class _UnconnectedPipe:
    """Stands for a pipe that was never connected (spawning failed half-way): counts as closed."""

    pipe = None
    disconnected = True


class SubprocessTransport(transports.SubprocessTransport):
    """A child process and its pipes."""

    def __init__(self, loop, protocol, args, shell, stdin, stdout, stderr, bufsize,
                 waiter=None, extra=None, _use_popen=False, **kwargs):
        self._extra = {} if extra is None else extra  # (transports.BaseTransport.__init__)
        self._closed = False
        self._protocol = protocol
        self._loop = loop
        # The Popen; for a child spawned without one, made when first needed from
        # _popen_args (then cleared). _proc is dropped once connection_lost has run.
        self._proc = None
        self._popen_args = None
        self._released = False
        self._files = (None, None, None)  # the pipes' files (Popen's stdin, stdout, stderr)
        self._native_pipes = False  # made by _ferroloop.spawn (non-blocking already)
        self._spawned = None  # a _Spawned until its exec is confirmed
        self._pid = None
        self._returncode = None
        self._exit_waiters = []
        self._pending_calls = collections.deque()
        self._pipes = {}
        self._finished = False
        if stdin == _PIPE:
            self._pipes[0] = None
        if stdout == _PIPE:
            self._pipes[1] = None
        if stderr == _PIPE:
            self._pipes[2] = None
        try:
            spawned = None
            if not _use_popen:
                spawned = _spawn_without_popen(args, shell, stdin, stdout, stderr, kwargs)
            if spawned is None:
                self._proc = proc = subprocess.Popen(
                    args, shell=shell, stdin=stdin, stdout=stdout, stderr=stderr,
                    universal_newlines=False, bufsize=bufsize, **kwargs,
                )
                self._pid = proc.pid
                self._files = (proc.stdin, proc.stdout, proc.stderr)
                self._extra["subprocess"] = proc
            else:
                self._spawned = spawned
                self._pid = spawned.pid
                self._files = spawned.files
                self._native_pipes = True
                self._popen_args = args
        except BaseException:
            self.close()
            raise
        if loop.get_debug():
            program = args if isinstance(args, (bytes, str)) else args[0]
            logger.debug("process %r created: pid %s", program, self._pid)
        self._waiter = waiter

    def __repr__(self) -> str:
        info = [type(self).__name__]
        if self._closed:
            info.append("closed")
        if self._pid is not None:
            info.append(f"pid={self._pid}")
        if self._returncode is not None:
            info.append(f"returncode={self._returncode}")
        elif self._pid is not None:
            info.append("running")
        else:
            info.append("not started")
        stdin = self._pipes.get(0)
        stdout = self._pipes.get(1)
        stderr = self._pipes.get(2)
        if stdin is not None:
            info.append(f"stdin={stdin.pipe}")
        if stdout is not None and stderr is stdout:
            info.append(f"stdout=stderr={stdout.pipe}")
        else:
            if stdout is not None:
                info.append(f"stdout={stdout.pipe}")
            if stderr is not None:
                info.append(f"stderr={stderr.pipe}")
        return "<{}>".format(" ".join(info))

    # ---- public API ---------------------------------------------------------------------

    def set_protocol(self, protocol) -> None:
        self._protocol = protocol

    def get_protocol(self):
        return self._protocol

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proto in self._pipes.values():
            if proto is None or proto.pipe is None or proto.disconnected:
                continue  # (a disconnected pipe's transport is closed already)
            proto.pipe.close()
        if self._pid is not None and self._returncode is None and not self._child_finished():
            if self._loop is not None and self._loop.get_debug():
                logger.warning("Close running child process: kill %r", self)
            try:
                self._popen().kill()
            except ProcessLookupError:
                pass

    def __del__(self, _warn=warnings.warn) -> None:
        if not self._closed:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self.close()

    def get_pid(self):
        return self._pid

    def get_returncode(self):
        return self._returncode

    def get_extra_info(self, name, default=None):
        if name == "subprocess" and self._popen_args is not None:
            self._popen()
        return self._extra.get(name, default)

    def get_pipe_transport(self, fd):
        proto = self._pipes.get(fd)
        return proto.pipe if proto is not None else None

    def send_signal(self, signal) -> None:
        self._check_proc()
        self._popen().send_signal(signal)

    def terminate(self) -> None:
        self._check_proc()
        self._popen().terminate()

    def kill(self) -> None:
        self._check_proc()
        self._popen().kill()

    async def _wait(self):
        """Wait for the child to exit (and, from Python 3.11, every pipe to close); return its
        return code."""
        if self._returncode is not None:
            return self._returncode
        waiter = self._loop.create_future()
        self._exit_waiters.append(waiter)
        return await waiter

    # ---- internals ----------------------------------------------------------------------

    def _popen(self):
        """The child's Popen, made now if it was spawned without one."""
        args = self._popen_args
        if args is None:
            return self._proc
        self._popen_args = None
        proc = _adopt_popen(args, self._pid, self._files, self._returncode)
        self._extra["subprocess"] = proc
        if not self._released:
            self._proc = proc
        return proc

    def _check_proc(self) -> None:
        if self._released or (self._proc is None and self._popen_args is None):
            raise ProcessLookupError()

    def _child_finished(self) -> bool:
        """Has the child terminated (even if nobody reaped it yet)? Does not reap it."""
        proc = self._proc
        if proc is not None and proc.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self._pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True  # reaped by someone else
        except (AttributeError, OSError):
            return self._popen().poll() is not None

    async def _connect_pipes(self, waiter) -> None:
        loop = self._loop
        stdin, stdout, stderr = self._files
        try:
            if stdin is not None:
                _, proto = await loop.connect_write_pipe(lambda: _PipeProto(self, 0), stdin)
                self._pipes[0] = proto
            if stdout is not None:
                _, proto = await loop.connect_read_pipe(lambda: _ReadPipeProto(self, 1), stdout)
                self._pipes[1] = proto
            if stderr is not None:
                _, proto = await loop.connect_read_pipe(lambda: _ReadPipeProto(self, 2), stderr)
                self._pipes[2] = proto
            loop.call_soon(self._protocol.connection_made, self)
            for callback, data in self._pending_calls:
                loop.call_soon(callback, *data)
            self._pending_calls = None
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._abandon_unconnected_pipes()
            if waiter is not None and not waiter.cancelled():
                waiter.set_exception(exc)
        else:
            if waiter is not None and not waiter.cancelled():
                waiter.set_result(None)

    def _connect_pipes_now(self) -> None:
        """The pipes' transports built at once, for a loop whose connect_read_pipe /
        connect_write_pipe are ferroloop's own (awaiting them would only build the same
        transports, a loop iteration or two each). The pipe protocols are ours: their
        connection_made runs at once (stdin, stdout, stderr), before the process protocol's,
        which is queued as _connect_pipes queues it; reading starts at once, and whatever the
        pipes report reaches the process protocol through _call, after its connection_made."""
        loop = self._loop
        stdin, stdout, stderr = self._files
        nonblocking = self._native_pipes
        try:
            if stdin is not None:
                proto = _PipeProto(self, 0)
                WritePipeTransport(loop, stdin, proto, _subprocess=True, _nonblocking=nonblocking)
                self._pipes[0] = proto
            if stdout is not None:
                proto = _ReadPipeProto(self, 1)
                ReadPipeTransport(loop, stdout, proto, _subprocess=True, _nonblocking=nonblocking)
                self._pipes[1] = proto
            if stderr is not None:
                proto = _ReadPipeProto(self, 2)
                ReadPipeTransport(loop, stderr, proto, _subprocess=True, _nonblocking=nonblocking)
                self._pipes[2] = proto
        except BaseException:
            self._abandon_unconnected_pipes()
            raise
        loop.call_soon(self._protocol.connection_made, self)
        for callback, data in self._pending_calls:
            loop.call_soon(callback, *data)
        self._pending_calls = None

    def _abandon_spawn(self) -> None:
        """The natively started child failed before running: close its pipes; the transport
        is dropped without further ado."""
        self._closed = True
        self._popen_args = None
        self._released = True
        for f in self._files:
            if f is not None:
                f.close()

    def _abandon_unconnected_pipes(self) -> None:
        # Close the Popen pipe files no transport took, so they do not leak and the
        # transport can still finish once the child exits.
        files = dict(enumerate(self._files))
        for fd, proto in list(self._pipes.items()):
            if proto is None:
                f = files.get(fd)
                if f is not None:
                    f.close()
                self._pipes[fd] = _UnconnectedPipe()
        if self._returncode is not None and not self._finished:
            self._try_finish()

    def _call(self, callback, *data) -> None:
        if self._pending_calls is not None:
            self._pending_calls.append((callback, data))
        else:
            self._loop.call_soon(callback, *data)

    def _pipe_connection_lost(self, fd, exc) -> None:
        if self._pending_calls is None:
            self._loop.call_soon(self._protocol.pipe_connection_lost, fd, exc)
        else:
            self._pending_calls.append((self._protocol.pipe_connection_lost, (fd, exc)))
        if self._returncode is not None:
            self._try_finish()

    def _pipe_data_received(self, fd, data) -> None:
        self._call(self._protocol.pipe_data_received, fd, data)

    def _process_exited(self, returncode) -> None:
        if self._returncode is not None or self._loop is None:
            return
        if self._loop.get_debug():
            logger.info("%r exited with return code %r", self, returncode)
        self._returncode = returncode
        proc = self._proc
        if proc is not None and proc.returncode is None:
            # We reaped the child: tell the Popen object (it would warn otherwise).
            proc.returncode = returncode
        self._call(self._protocol.process_exited)
        self._try_finish()
        if _WAIT_RETURNS_AT_EXIT:
            self._wake_exit_waiters()

    def _wake_exit_waiters(self) -> None:
        waiters = self._exit_waiters
        if waiters is None:
            return
        self._exit_waiters = None
        for waiter in waiters:
            if not waiter.cancelled():
                waiter.set_result(self._returncode)

    def _try_finish(self) -> None:
        if self._returncode is None or self._finished:
            return
        for p in self._pipes.values():
            if p is None or not p.disconnected:
                return
        self._finished = True
        self._call(self._call_connection_lost, None)

    def _call_connection_lost(self, exc) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._wake_exit_waiters()
            self._loop = None
            self._proc = None
            self._released = True
            self._protocol = None


# Before 3.11, asyncio's Process.wait() returns once the child has exited, even while a pipe
# is still open (a grandchild holding stdout); from 3.11 it also waits for the pipes to close.
_WAIT_RETURNS_AT_EXIT = sys.version_info < (3, 11)


@types.coroutine
def _one_iteration():
    """Yield to the loop once: the awaiting task resumes after the callbacks queued so far."""
    yield


def _reap_blocking(pid: int):
    """waitpid(pid) until it reports the exit; the return code, or None if it was reaped elsewhere."""
    while True:
        try:
            wpid, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return None
        if wpid == pid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
            return os.waitstatus_to_exitcode(status)


class SubprocessMixin:
    """subprocess_exec / subprocess_shell and the child watcher."""

    # pid -> pidfd (None when a waitpid thread watches it)
    _unix_children = None

    async def subprocess_shell(self, protocol_factory, cmd, *, stdin=_PIPE, stdout=_PIPE,
                               stderr=_PIPE, universal_newlines=False, shell=True, bufsize=0,
                               encoding=None, errors=None, text=None, **kwargs):
        """Run `cmd` through the shell; return (transport, protocol)."""
        if not isinstance(cmd, (bytes, str)):
            raise ValueError("cmd must be a string")
        if universal_newlines:
            raise ValueError("universal_newlines must be False")
        if not shell:
            raise ValueError("shell must be True")
        _check_binary_args(bufsize, text, encoding, errors)
        protocol = protocol_factory()
        debug_log = None
        if self.get_debug():
            # The command itself is not logged: it may hold secrets.
            debug_log = f"run shell command {cmd!r}"
            self._unix_log_subprocess(debug_log, stdin, stdout, stderr)
        transport = await self._make_subprocess_transport(
            protocol, cmd, True, stdin, stdout, stderr, bufsize, **kwargs)
        if debug_log is not None and self.get_debug():
            logger.info("%s: %r", debug_log, transport)
        return transport, protocol

    async def subprocess_exec(self, protocol_factory, program, *args, stdin=_PIPE, stdout=_PIPE,
                              stderr=_PIPE, universal_newlines=False, shell=False, bufsize=0,
                              encoding=None, errors=None, text=None, **kwargs):
        """Run `program` with `args`; return (transport, protocol)."""
        if universal_newlines:
            raise ValueError("universal_newlines must be False")
        if shell:
            raise ValueError("shell must be False")
        if bufsize != 0 or text or encoding is not None or errors is not None:
            _check_binary_args(bufsize, text, encoding, errors)
        popen_args = (program,) + args
        protocol = protocol_factory()
        debug_log = None
        if self.get_debug():
            debug_log = f"execute program {program!r}"
            self._unix_log_subprocess(debug_log, stdin, stdout, stderr)
        transport = await self._make_subprocess_transport(
            protocol, popen_args, False, stdin, stdout, stderr, bufsize, **kwargs)
        if debug_log is not None and self.get_debug():
            logger.info("%s: %r", debug_log, transport)
        return transport, protocol

    def _unix_log_subprocess(self, msg, stdin, stdout, stderr) -> None:
        info = [msg]
        if stdin is not None:
            info.append(f"stdin={_format_pipe(stdin)}")
        if stdout is not None and stderr == _STDOUT:
            info.append(f"stdout=stderr={_format_pipe(stdout)}")
        else:
            if stdout is not None:
                info.append(f"stdout={_format_pipe(stdout)}")
            if stderr is not None:
                info.append(f"stderr={_format_pipe(stderr)}")
        logger.debug(" ".join(info))

    async def _make_subprocess_transport(self, protocol, args, shell, stdin, stdout, stderr,
                                         bufsize, extra=None, **kwargs):
        self._check_closed()
        # With our own connect_read_pipe / connect_write_pipe the pipe transports are built at
        # once; a loop (or subclass) that replaces them gets them awaited, as asyncio does, and
        # so does a loop in debug mode (connect_*_pipe log each pipe there).
        cls = type(self)
        own_dict = self.__dict__
        direct = (
            not self.get_debug()
            and cls.connect_read_pipe is PipesMixin.connect_read_pipe
            and cls.connect_write_pipe is PipesMixin.connect_write_pipe
            and "connect_read_pipe" not in own_dict
            and "connect_write_pipe" not in own_dict
        )
        waiter = None if direct else self.create_future()
        transport = SubprocessTransport(self, protocol, args, shell, stdin, stdout, stderr,
                                        bufsize, waiter=waiter, extra=extra, **kwargs)
        interrupted = None
        if transport._spawned is not None:
            interrupted = await self._unix_exec_outcome(transport)
            if transport._spawned is not None:
                # The child failed before its exec: let Popen do it (and raise its error).
                transport = SubprocessTransport(
                    self, protocol, args, shell, stdin, stdout, stderr, bufsize, waiter=waiter,
                    extra=extra, _use_popen=True, **kwargs)
        self._unix_watch_child(transport)
        if waiter is not None:
            self.create_task(transport._connect_pipes(waiter))
        try:
            if direct:
                transport._connect_pipes_now()
                if interrupted is not None:
                    raise interrupted
                # Return once the queued connection_made callbacks have run.
                await _one_iteration()
            else:
                if interrupted is not None:
                    raise interrupted
                await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transport.close()
            await transport._wait()
            raise
        return transport

    async def _unix_exec_outcome(self, transport):
        """Wait until a natively started child has exec'd. Returns what interrupted the
        wait (it went on regardless: the child's outcome is needed), to be raised once the
        transport is set up as Popen's would have been; raises the exec's error as Popen does;
        leaves `transport._spawned` set if the child failed before its exec."""
        spawned = transport._spawned
        pending = spawned.pending
        outcome = pending.result()
        interrupted = None
        if outcome is None:
            fd = pending.fd
            while True:
                fut = self.create_future()
                self._add_reader(fd, _set_done, fut)
                try:
                    await fut
                    break
                except (SystemExit, KeyboardInterrupt) as exc:
                    # Leaving now: the wait below is the child's exec (or exit), not the
                    # loop's.
                    interrupted = exc
                    break
                except BaseException as exc:
                    # A cancellation: go on waiting for the outcome on the loop, so a child
                    # that is slow to exec (or stopped before it) never blocks the loop.
                    if interrupted is None:
                        interrupted = exc
                finally:
                    self._remove_reader(fd)
            outcome = pending.result(True)
        if outcome == 0:
            transport._spawned = None
            return interrupted
        # The child failed and was reaped.
        transport._abandon_spawn()
        if isinstance(interrupted, (KeyboardInterrupt, SystemExit)):
            raise interrupted
        stage, err = outcome
        if stage == _STAGE_EXEC:
            # (A cancellation meanwhile is dropped: Popen would have raised this at once.)
            transport._spawned = None
            raise OSError(err, os.strerror(err), spawned.filename)
        if interrupted is not None:
            raise interrupted
        return None

    # ---- the child watcher --------------------------------------------------------------

    def _unix_watch_child(self, transport) -> None:
        pid = transport._pid
        if self._unix_children is None:
            self._unix_children = {}
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            # No pidfd here (kernel < 5.3, seccomp, not Linux): a thread waits for it.
            self._unix_children[pid] = None
            threading.Thread(
                target=self._unix_waitpid_thread, args=(pid, transport),
                name=f"ferroloop-waitpid-{pid}", daemon=True,
            ).start()
            return
        try:
            self._add_reader(pidfd, self._unix_pidfd_ready, pid, pidfd, transport)
        except BaseException:
            os.close(pidfd)
            raise
        self._unix_children[pid] = pidfd

    def _unix_pidfd_ready(self, pid, pidfd, transport) -> None:
        try:
            wpid, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            # Reaped elsewhere (Popen.poll()/wait()/send_signal() reap a dead child).
            returncode = transport._proc.returncode if transport._proc is not None else None
            if returncode is None:
                logger.warning("Unknown child process pid %d, will report returncode 255", pid)
                returncode = 255
        else:
            if wpid == 0:
                return  # not terminated after all: keep watching
            returncode = os.waitstatus_to_exitcode(status)
        self._remove_reader(pidfd)
        os.close(pidfd)
        self._unix_children.pop(pid, None)
        # One iteration later, as asyncio's child watchers report.
        self.call_soon(transport._process_exited, returncode)

    def _unix_waitpid_thread(self, pid, transport) -> None:
        returncode = _reap_blocking(pid)
        try:
            self.call_soon_threadsafe(self._unix_thread_reaped, pid, returncode, transport)
        except RuntimeError:
            if self.is_closed():
                logger.warning("Loop %r that handles pid %r is closed", self, pid)
            else:
                raise

    def _unix_thread_reaped(self, pid, returncode, transport) -> None:
        if self._unix_children is not None:
            self._unix_children.pop(pid, None)
        if returncode is None:
            returncode = transport._proc.returncode if transport._proc is not None else None
            if returncode is None:
                logger.warning("Unknown child process pid %d, will report returncode 255", pid)
                returncode = 255
        transport._process_exited(returncode)

    def _unix_close_children(self, forked: bool = False) -> None:
        """At loop close: stop watching; children still running are reaped by a thread."""
        children, self._unix_children = self._unix_children, None
        if not children:
            return
        for pid, pidfd in children.items():
            if pidfd is None:
                continue  # its waitpid thread reaps it
            if not forked:
                self._remove_reader(pidfd)
            os.close(pidfd)
            if forked:
                continue  # the parent's children, not ours to reap
            threading.Thread(
                target=_reap_blocking, args=(pid,), name=f"ferroloop-reap-{pid}", daemon=True,
            ).start()
