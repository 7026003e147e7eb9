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
import logging
import os
import subprocess
import threading
import types
import warnings
from asyncio import protocols, transports

from .pipes import PipesMixin, ReadPipeTransport, WritePipeTransport

logger = logging.getLogger("asyncio")

_PIPE = subprocess.PIPE
_STDOUT = subprocess.STDOUT


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
                 waiter=None, extra=None, **kwargs):
        self._extra = {} if extra is None else extra  # (transports.BaseTransport.__init__)
        self._closed = False
        self._protocol = protocol
        self._loop = loop
        self._proc = None
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
            self._proc = subprocess.Popen(
                args, shell=shell, stdin=stdin, stdout=stdout, stderr=stderr,
                universal_newlines=False, bufsize=bufsize, **kwargs,
            )
        except BaseException:
            self.close()
            raise
        self._pid = self._proc.pid
        self._extra["subprocess"] = self._proc
        if loop.get_debug():
            program = args if isinstance(args, (bytes, str)) else args[0]
            logger.debug("process %r created: pid %s", program, self._pid)
        if waiter is not None:
            loop.create_task(self._connect_pipes(waiter))

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
        if self._proc is not None and self._returncode is None and not self._child_finished():
            if self._loop is not None and self._loop.get_debug():
                logger.warning("Close running child process: kill %r", self)
            try:
                self._proc.kill()
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

    def get_pipe_transport(self, fd):
        proto = self._pipes.get(fd)
        return proto.pipe if proto is not None else None

    def send_signal(self, signal) -> None:
        self._check_proc()
        self._proc.send_signal(signal)

    def terminate(self) -> None:
        self._check_proc()
        self._proc.terminate()

    def kill(self) -> None:
        self._check_proc()
        self._proc.kill()

    async def _wait(self):
        """Wait for the child to exit (and every pipe to close); return its return code."""
        if self._returncode is not None:
            return self._returncode
        waiter = self._loop.create_future()
        self._exit_waiters.append(waiter)
        return await waiter

    # ---- internals ----------------------------------------------------------------------

    def _check_proc(self) -> None:
        if self._proc is None:
            raise ProcessLookupError()

    def _child_finished(self) -> bool:
        """Has the child terminated (even if nobody reaped it yet)? Does not reap it."""
        proc = self._proc
        if proc.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True  # reaped by someone else
        except (AttributeError, OSError):
            return proc.poll() is not None

    async def _connect_pipes(self, waiter) -> None:
        loop = self._loop
        proc = self._proc
        try:
            if proc.stdin is not None:
                _, proto = await loop.connect_write_pipe(lambda: _PipeProto(self, 0), proc.stdin)
                self._pipes[0] = proto
            if proc.stdout is not None:
                _, proto = await loop.connect_read_pipe(lambda: _ReadPipeProto(self, 1), proc.stdout)
                self._pipes[1] = proto
            if proc.stderr is not None:
                _, proto = await loop.connect_read_pipe(lambda: _ReadPipeProto(self, 2), proc.stderr)
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
        proc = self._proc
        try:
            if proc.stdin is not None:
                proto = _PipeProto(self, 0)
                WritePipeTransport(loop, proc.stdin, proto, _subprocess=True)
                self._pipes[0] = proto
            if proc.stdout is not None:
                proto = _ReadPipeProto(self, 1)
                ReadPipeTransport(loop, proc.stdout, proto, _subprocess=True)
                self._pipes[1] = proto
            if proc.stderr is not None:
                proto = _ReadPipeProto(self, 2)
                ReadPipeTransport(loop, proc.stderr, proto, _subprocess=True)
                self._pipes[2] = proto
        except BaseException:
            self._abandon_unconnected_pipes()
            raise
        loop.call_soon(self._protocol.connection_made, self)
        for callback, data in self._pending_calls:
            loop.call_soon(callback, *data)
        self._pending_calls = None

    def _abandon_unconnected_pipes(self) -> None:
        # Close the Popen pipe files no transport took, so they do not leak and the
        # transport can still finish once the child exits.
        files = {0: self._proc.stdin, 1: self._proc.stdout, 2: self._proc.stderr}
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
        if self._proc.returncode is None:
            # We reaped the child: tell the Popen object (it would warn otherwise).
            self._proc.returncode = returncode
        self._call(self._protocol.process_exited)
        self._try_finish()

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
            for waiter in self._exit_waiters:
                if not waiter.cancelled():
                    waiter.set_result(self._returncode)
            self._exit_waiters = None
            self._loop = None
            self._proc = None
            self._protocol = None


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
        self._unix_watch_child(transport)
        try:
            if direct:
                transport._connect_pipes_now()
                # Return once the queued connection_made callbacks have run.
                await _one_iteration()
            else:
                await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transport.close()
            await transport._wait()
            raise
        return transport

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
