"""`connect_read_pipe` / `connect_write_pipe`: transports over pipes, FIFOs, character devices
(ptys) and sockets, on the loop's raw fd watchers.

Behaviour is asyncio's Unix pipe transports': the fd is made non-blocking, connection_made is
scheduled with call_soon (reading starts after it), EOF calls eof_received then connection_lost,
EIO from a pty whose other side closed is routine; the write transport writes at once, buffers
the rest, pauses/resumes the protocol at the water marks (64 KiB / 16 KiB) and watches a pipe or
socket for readability to learn that the reader went away. connection_lost is called once, the
pipe object is closed once, right after it. Regular files are refused with ValueError.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import warnings
from asyncio import constants, futures, protocols, transports

from .._ferroloop import read_bytes as _read_bytes
from .._net.flow_control import DEFAULT_HIGH_WATER, DEFAULT_LOW_WATER, WriteFlowControl
from .._net.transports import as_bytes_like, report_fatal_error

logger = logging.getLogger("asyncio")

_PROTOCOL_EOF_RECEIVED = protocols.Protocol.eof_received


def _file_type(fileno: int):
    mode = os.fstat(fileno).st_mode
    return stat.S_ISFIFO(mode), stat.S_ISSOCK(mode), stat.S_ISCHR(mode)


class _PipeTransportBase:
    """What both pipe transports share: ownership of the pipe object and the close epilogue."""

    _pipe = None
    _fileno = None
    _loop = None

    def _register(self, loop, pipe, protocol, nonblocking=False) -> None:
        self._loop = loop
        self._pipe = pipe
        self._protocol = protocol
        self._closing = False
        self._lost_scheduled = False
        if not nonblocking:
            os.set_blocking(self._fileno, False)
        table = loop.__dict__.get("_net_transports")
        if table is None:
            table = loop._transports
        table[self._fileno] = self

    def _adopt(self, pipe, extra, check_file: bool, refusal: str):
        """Record the pipe (in `extra` too) and its fd; with `check_file`, refuse anything but
        a FIFO, socket or character device with ValueError(refusal). Returns the fd and, when
        checked, whether it is a FIFO or a socket."""
        # (transports.BaseTransport.__init__, without the call)
        if extra is None:
            extra = {}
        self._extra = extra
        extra["pipe"] = pipe
        self._fileno = fileno = pipe.fileno()
        if not check_file:
            return fileno, False, False
        is_fifo, is_socket, is_char = _file_type(fileno)
        if not (is_fifo or is_socket or is_char):
            raise ValueError(refusal)
        return fileno, is_fifo, is_socket

    def set_protocol(self, protocol) -> None:
        self._protocol = protocol

    def get_protocol(self):
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def __repr__(self) -> str:
        info = [type(self).__name__]
        if self._pipe is None:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        info.append(f"fd={self._fileno}")
        if self._pipe is not None:
            self._repr_state(info)
        return "<{}>".format(" ".join(info))

    def _state_for_repr(self, watching: bool) -> str:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            return "polling" if watching else "idle"
        return "open"

    def _schedule_connection_lost(self, exc) -> None:
        if self._lost_scheduled:
            return
        self._lost_scheduled = True
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc) -> None:
        self._lost_scheduled = True
        loop = self._loop
        try:
            self._protocol.connection_lost(exc)
        finally:
            if loop is not None:
                table = loop.__dict__.get("_net_transports")
                if table is not None:
                    table.discard(self._fileno, self)
            self._pipe.close()
            self._pipe = None
            self._protocol = None
            self._loop = None

    def __del__(self, _warn=warnings.warn) -> None:
        pipe = self._pipe
        if pipe is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._pipe = None
            pipe.close()


class ReadPipeTransport(_PipeTransportBase, transports.ReadTransport):
    """The read end of a pipe, FIFO, pty or socket."""

    max_size = 256 * 1024  # bytes per read

    def __init__(self, loop, pipe, protocol, waiter=None, extra=None, *, _subprocess=False,
                 _nonblocking=False):
        # _subprocess: a subprocess transport's own pipe (a pipe, so no fstat) and pipe
        # protocol, whose connection_made only records the transport: called at once, and
        # reading starts at once (the subprocess transport orders its protocol's callbacks).
        # _nonblocking: the pipe was made non-blocking already (_ferroloop.spawn's pipes).
        fileno, _, _ = self._adopt(
            pipe, extra, not _subprocess, "Pipe transport is for pipes/sockets only."
        )
        self._paused = False
        self._watching = False
        self._register(loop, pipe, protocol, _nonblocking)
        if _subprocess:
            loop._add_reader(fileno, self._read_ready)
            self._watching = True
            protocol.connection_made(self)
            return
        loop.call_soon(protocol.connection_made, self)
        # Read only once connection_made() has run.
        loop.call_soon(self._start_reading)
        if waiter is not None:
            loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    def _repr_state(self, info) -> None:
        info.append(self._state_for_repr(self._watching))

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def _start_reading(self) -> None:
        if self.is_reading() and not self._watching:
            self._loop._add_reader(self._fileno, self._read_ready)
            self._watching = True

    def _stop_reading(self) -> None:
        if self._watching:
            self._watching = False
            self._loop._remove_reader(self._fileno)

    def pause_reading(self) -> None:
        if not self.is_reading():
            return
        self._paused = True
        self._stop_reading()
        if self._loop.get_debug():
            logger.debug("%r pauses reading", self)

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        self._start_reading()
        if self._loop.get_debug():
            logger.debug("%r resumes reading", self)

    def _read_ready(self) -> None:
        try:
            data = _read_bytes(self._fileno, self.max_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal_error(exc, "Fatal read error on pipe transport")
            return
        if data:
            self._protocol.data_received(data)
            return
        if self._loop.get_debug():
            logger.info("%r was closed by peer", self)
        self._closing = True
        self._stop_reading()
        eof_received = self._protocol.eof_received
        if getattr(eof_received, "__func__", None) is not _PROTOCOL_EOF_RECEIVED:
            # (asyncio.Protocol's own eof_received does nothing: no callback needed for it.)
            self._loop.call_soon(eof_received)
        self._schedule_connection_lost(None)

    def close(self) -> None:
        if not self._closing:
            self._close(None)

    def _fatal_error(self, exc, message="Fatal error on pipe transport") -> None:
        # EIO: a pty whose other side closed, routine.
        routine = isinstance(exc, OSError) and exc.errno == errno.EIO
        report_fatal_error(self, exc, message, routine)
        self._close(exc)

    def _close(self, exc) -> None:
        self._closing = True
        self._stop_reading()
        self._schedule_connection_lost(exc)


class WritePipeTransport(_PipeTransportBase, WriteFlowControl, transports.Transport):
    """The write end of a pipe, FIFO, pty or socket, with asyncio's write flow control.

    A `Transport`, not only a `WriteTransport`, as asyncio's is: its read methods are
    ReadTransport's, which raise NotImplementedError."""

    def __init__(self, loop, pipe, protocol, waiter=None, extra=None, *, _subprocess=False,
                 _nonblocking=False):
        # _subprocess, _nonblocking: as for ReadPipeTransport; the reader is watched at once.
        fileno, is_fifo, is_socket = self._adopt(
            pipe,
            extra,
            not _subprocess,
            "Pipe transport is only for pipes, sockets and character devices",
        )
        self._buffer = bytearray()
        self._conn_lost = 0
        self._writing = False
        self._watching_peer = False
        self._protocol_paused = False
        self._high_water = DEFAULT_HIGH_WATER  # as _set_write_buffer_limits() sets them
        self._low_water = DEFAULT_LOW_WATER
        self._register(loop, pipe, protocol, _nonblocking)
        if _subprocess:
            loop._add_reader(fileno, self._read_ready)
            self._watching_peer = True
            protocol.connection_made(self)
            return
        loop.call_soon(protocol.connection_made, self)
        if is_fifo or is_socket:
            # The write end of a pipe (or a socket) reports readable/error when the reader
            # goes away: watch it, once connection_made() has run.
            loop.call_soon(self._watch_peer)
        if waiter is not None:
            loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    def _repr_state(self, info) -> None:
        state = self._state_for_repr(self._writing)
        info.append(state)
        if state != "open":
            info.append(f"bufsize={self.get_write_buffer_size()}")

    # ---- peer watching ------------------------------------------------------------------

    def _watch_peer(self) -> None:
        if self._closing or self._watching_peer:
            return
        self._watching_peer = True
        self._loop._add_reader(self._fileno, self._read_ready)

    def _unwatch_peer(self) -> None:
        if self._watching_peer:
            self._watching_peer = False
            self._loop._remove_reader(self._fileno)

    def _read_ready(self) -> None:
        # The reading side closed.
        if self._loop.get_debug():
            logger.info("%r was closed by peer", self)
        if self._buffer:
            self._close(BrokenPipeError())
        else:
            self._close()

    # ---- writing ------------------------------------------------------------------------

    def write(self, data) -> None:
        data = as_bytes_like(data)
        if not data:
            return
        if self._conn_lost or self._closing:
            if self._conn_lost >= constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("pipe closed by peer or os.write(pipe, data) raised exception.")
            self._conn_lost += 1
            return
        if not self._buffer:
            try:
                n = os.write(self._fileno, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._conn_lost += 1
                self._fatal_error(exc, "Fatal write error on pipe transport")
                return
            if n == len(data):
                return
            if n:
                data = memoryview(data)[n:]
            self._loop._add_writer(self._fileno, self._write_ready)
            self._writing = True
        self._buffer += data
        self._maybe_pause_protocol()

    def _write_ready(self) -> None:
        if not self._buffer:
            return
        try:
            n = os.write(self._fileno, self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._buffer.clear()
            self._conn_lost += 1
            self._stop_writing()
            self._fatal_error(exc, "Fatal write error on pipe transport")
            return
        if n == len(self._buffer):
            self._buffer.clear()
            self._stop_writing()
            self._maybe_resume_protocol()  # may write more
            if self._closing and not self._buffer:
                self._unwatch_peer()
                self._call_connection_lost(None)
            return
        if n:
            del self._buffer[:n]
        self._maybe_resume_protocol()

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self._loop._remove_writer(self._fileno)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closing or self._pipe is None:
            return
        self._closing = True
        if not self._buffer:
            self._unwatch_peer()
            self._schedule_connection_lost(None)

    def close(self) -> None:
        if self._pipe is not None and not self._closing:
            # For a write pipe, closing is write_eof: flush, then close.
            self.write_eof()

    def abort(self) -> None:
        if self._pipe is not None:
            self._close(None)

    def _fatal_error(self, exc, message="Fatal error on pipe transport") -> None:
        # Broken pipes are routine.
        report_fatal_error(self, exc, message, routine=isinstance(exc, OSError))
        self._close(exc)

    def _close(self, exc=None) -> None:
        self._closing = True
        self._stop_writing()
        self._buffer.clear()
        self._unwatch_peer()
        self._schedule_connection_lost(exc)

    # ---- flow control (the rest is WriteFlowControl's) ----------------------------------

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)


class PipesMixin:
    """connect_read_pipe / connect_write_pipe."""

    async def connect_read_pipe(self, protocol_factory, pipe):
        """Wrap the read end of a pipe (FIFO, pty, socket) in a transport; return (transport, protocol)."""
        return await self._unix_connect_pipe(ReadPipeTransport, "Read", protocol_factory, pipe)

    async def connect_write_pipe(self, protocol_factory, pipe):
        """Wrap the write end of a pipe (FIFO, pty, socket) in a transport; return (transport, protocol)."""
        return await self._unix_connect_pipe(WritePipeTransport, "Write", protocol_factory, pipe)

    async def _unix_connect_pipe(self, transport_class, what, protocol_factory, pipe):
        protocol = protocol_factory()
        waiter = self.create_future()
        transport = transport_class(self, pipe, protocol, waiter)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        if self.get_debug():
            logger.debug("%s pipe %r connected: (%r, %r)", what, pipe.fileno(), transport, protocol)
        return transport, protocol
