"""Socket transports over the loop's raw fd watchers: the shared base and the stream transport.

Behaviour is asyncio's selector transports': connection_made is scheduled with call_soon,
connection_lost always runs in a later iteration, errors go through `_fatal_error`, writes go
out at once and the rest is queued (64 KiB / 16 KiB water marks), `write_eof` half-closes.
The queued chunks are sent together with sendmsg (writev) when the socket is writable.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import _socket
import warnings
from _weakref import ref as _weakref
from asyncio import constants, futures, protocols, transports, trsock

logger = logging.getLogger("asyncio")

MAX_READ = 256 * 1024  # bytes per recv()

# recv into a reusable buffer, returning exact-size bytes (socket.recv(MAX_READ) would
# mmap/mremap/munmap a 256 KiB object per read).
from .._ferroloop import read_bytes as _read_bytes  # noqa: E402
from .. import _ferroloop as _ferroloop_native  # noqa: E402
from .flow_control import DEFAULT_HIGH_WATER, DEFAULT_LOW_WATER, WriteFlowControl  # noqa: E402
try:
    _IOV_MAX = os.sysconf("SC_IOV_MAX")
except (AttributeError, OSError, ValueError):  # pragma: no cover
    _IOV_MAX = 16
if _IOV_MAX <= 0:  # pragma: no cover
    _IOV_MAX = 16


_TCP_FAMILIES = (int(socket.AF_INET), int(getattr(socket, "AF_INET6", socket.AF_INET)))
# The C socket's own fields, as ints: `socket.socket`'s family and type properties build an
# enum member per call, and a transport asks for them on every connection.
_raw_family = _socket.socket.family.__get__
_raw_type = _socket.socket.type.__get__
_raw_proto = _socket.socket.proto.__get__


_IPPROTO_TCP = socket.IPPROTO_TCP
_TCP_NODELAY = getattr(socket, "TCP_NODELAY", None)


def sock_family(sock) -> int:
    """`sock.family` as an int, without the enum conversion for a real socket."""
    if isinstance(sock, _socket.socket):
        return _raw_family(sock)
    return sock.family


def set_nodelay(sock) -> None:
    if not hasattr(socket, "TCP_NODELAY"):
        return
    if isinstance(sock, _socket.socket):
        family, stype, proto = _raw_family(sock), _raw_type(sock), _raw_proto(sock)
    else:
        family, stype, proto = sock.family, sock.type, sock.proto
    if family in _TCP_FAMILIES and stype == socket.SOCK_STREAM and proto == socket.IPPROTO_TCP:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def as_bytes_like(data):
    """Check `data` is bytes-like; return it as something whose len() is its byte count."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"data argument must be a bytes-like object, not {type(data).__name__!r}"
        )
    if isinstance(data, memoryview) and (data.ndim != 1 or data.itemsize != 1 or not data.c_contiguous):
        data = data.tobytes()
    return data


def report_fatal_error(transport, exc, message, routine: bool) -> None:
    """Report a transport's fatal error as asyncio does: a routine one (a connection reset, a
    broken pipe...) is only logged, in debug mode; any other goes to the exception handler."""
    if routine:
        if transport._loop.get_debug():
            logger.debug("%r: %s", transport, message, exc_info=True)
    else:
        transport._loop.call_exception_handler(
            {
                "message": message,
                "exception": exc,
                "transport": transport,
                "protocol": transport._protocol,
            }
        )


# The keys of a lazily built extra-info dict (see _complete_extra).
_LAZY_EXTRA_KEYS = frozenset(("peername", "socket", "sockname"))

# The first item of the tuple `_extra` holds once a connection closed natively (a peer
# address is never a tuple starting with it).
_CLOSED_EXTRA = object()

_NO_QUEUE = ()  # empty, falsy, iterable: what `_buffer` is until a write has to wait

_EDGE_FAMILIES = _TCP_FAMILIES


class SocketTransportBase(WriteFlowControl, transports.Transport):
    """What every socket transport has: the socket, the protocol, closing, fatal errors,
    write-side flow control and the connection_lost epilogue."""

    _buffer_factory = collections.deque

    # No per-instance __dict__: a server holding 10k idle connections pays for every byte.
    __slots__ = (
        "__weakref__",
        "_loop",
        "_sock",
        "_sock_fd",
        "_protocol",
        "_server",
        "_buffer",
        "_buffer_size",
        "_conn_lost",
        "_closing",
        "_protocol_paused",
        "_high_water",
        "_low_water",
    )

    # asyncio's flag, set by set_protocol(), which __init__ always calls: a class attribute
    # rather than a slot nobody ever sets to anything else.
    _protocol_connected = True

    # True: `_extra` holds only the peer address until get_extra_info() is first called (see
    # there). False: the dict is built at once, as asyncio does (the datagram transport reads
    # it on every send).
    _lazy_extra = False

    def __init__(self, loop, sock, protocol, extra=None, server=None, peername=None):
        if extra is None and self._lazy_extra:
            # Only the peer address is taken now: once the peer has gone, getpeername() fails,
            # and asyncio reports the address the connection had. An accepted connection
            # passes the address accept() returned; a connected one asks the socket.
            if peername is None:
                try:
                    peername = sock.getpeername()
                except OSError:
                    pass
            self._extra = peername  # a tuple, str, bytes or None: never a dict
        else:
            self._extra = extra or {}
            if peername is not None and "peername" not in self._extra:
                self._extra["peername"] = peername
            self._build_extra(sock, self._extra)
        self._loop = loop
        self._sock = sock
        self._sock_fd = fd = sock.fileno()
        self._protocol = None
        self.set_protocol(protocol)
        self._server = server
        # No write queue until something has to wait: an idle connection does not pay for a
        # deque (about 600 bytes). `_queue()` creates it on first use.
        self._buffer = _NO_QUEUE
        self._buffer_size = 0
        self._conn_lost = 0
        self._closing = False
        self._protocol_paused = False
        # What _set_write_buffer_limits() sets (one call less per connection).
        self._high_water = DEFAULT_HIGH_WATER
        self._low_water = DEFAULT_LOW_WATER
        if server is not None:
            server._attach(self)
        # loop._transports[fd] = self, without the property and the table's __setitem__ frames.
        table = loop.__dict__.get("_net_transports")
        if table is None:
            table = loop._transports
        table._refs[fd] = _weakref(self)

    def __repr__(self) -> str:
        info = [self.__class__.__name__]
        if self._sock is None:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        info.append(f"fd={self._sock_fd}")
        if self._loop is not None and not self._loop.is_closed() and self._sock is not None:
            info.append("read=" + ("polling" if self.is_reading() else "idle"))
            state = "polling" if self._buffer else "idle"
            info.append(f"write=<{state}, bufsize={self.get_write_buffer_size()}>")
        return "<{}>".format(" ".join(info))

    # ---- extra info -----------------------------------------------------------------------

    @staticmethod
    def _build_extra(sock, extra) -> None:
        """What asyncio's socket transports put in `_extra` (peername from the socket unless
        `extra` has it)."""
        extra["socket"] = trsock.TransportSocket(sock)
        try:
            extra["sockname"] = sock.getsockname()
        except OSError:
            extra["sockname"] = None
        if "peername" not in extra:
            try:
                extra["peername"] = sock.getpeername()
            except OSError:
                extra["peername"] = None

    def get_extra_info(self, name, default=None):
        extra = self._extra
        if not isinstance(extra, dict):
            # Until completed, `_extra` is the peer address, and the dict it becomes has only
            # the keys _build_extra sets: any other name (StreamReaderProtocol asks for
            # "sslcontext" in every connection_made) is answered without building it.
            if type(name) is str and name not in _LAZY_EXTRA_KEYS:
                return default
            if name == "peername":
                if type(extra) is tuple and extra and extra[0] is _CLOSED_EXTRA:
                    return extra[1]
                return extra
            extra = self._complete_extra()
        return extra.get(name, default)

    def _complete_extra(self):
        # A server holding many idle connections should not pay for a dict, a TransportSocket
        # and a sockname tuple per connection that nobody asks for: they are made here, on the
        # first get_extra_info(), or by _call_connection_lost() just before the socket closes
        # (the sockname of an open socket does not change, so the values are the ones asyncio
        # would have taken at creation). Until then `_extra` holds the peer address (the slot
        # that asyncio's dict lives in, rather than one more slot). The native connection_lost
        # (`stream_life.rs`) leaves `(_CLOSED_EXTRA, peername, sockname, socket)` there
        # instead of building the dict nobody may ask for: the socket's name read while it
        # could still tell it.
        held = self._extra
        if type(held) is tuple and held and held[0] is _CLOSED_EXTRA:
            _, peername, sockname, sock = held
            extra = {"peername": peername, "socket": trsock.TransportSocket(sock), "sockname": sockname}
        else:
            extra = {"peername": held}
            sock = self._sock
            if sock is not None:
                self._build_extra(sock, extra)
        self._extra = extra
        return extra

    # ---- protocol -----------------------------------------------------------------------

    def set_protocol(self, protocol) -> None:
        self._protocol = protocol

    def get_protocol(self):
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return not self._closing

    # ---- closing ------------------------------------------------------------------------

    def abort(self) -> None:
        self._force_close(None)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop._remove_reader(self._sock_fd)
        if not self._buffer:
            self._conn_lost += 1
            self._loop._remove_writer(self._sock_fd)
            self._loop.call_soon(self._call_connection_lost, None)

    def __del__(self, _warn=warnings.warn) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            self._forget_fd(self._loop)
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            sock.close()

    def _forget_fd(self, loop) -> None:
        """Take this transport out of the loop's fd -> transport table (see TransportTable)."""
        table = getattr(loop, "__dict__", {}).get("_net_transports")
        if table is not None:
            table.discard(self._sock_fd, self)

    def _fatal_error(self, exc, message="Fatal error on transport") -> None:
        # Connection resets, broken pipes...: routine.
        report_fatal_error(self, exc, message, routine=isinstance(exc, OSError))
        self._force_close(exc)

    def _force_close(self, exc) -> None:
        if self._conn_lost:
            return
        if self._buffer:
            self._buffer.clear()
            self._buffer_size = 0
            self._loop._remove_writer(self._sock_fd)
        if not self._closing:
            self._closing = True
            self._loop._remove_reader(self._sock_fd)
        self._conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc) -> None:
        try:
            if self._protocol_connected:
                self._protocol.connection_lost(exc)
        finally:
            if not isinstance(self._extra, dict):
                self._complete_extra()  # while the socket can still tell its name
            self._forget_fd(self._loop)
            self._sock.close()
            self._sock = None
            self._protocol = None
            self._loop = None
            server = self._server
            if server is not None:
                server._detach(self)
                self._server = None

    # ---- write-side flow control (the rest is WriteFlowControl's) -----------------------

    def get_write_buffer_size(self) -> int:
        return self._buffer_size

    def _queue(self):
        """The write queue, created on first use."""
        if self._buffer is _NO_QUEUE:
            self._buffer = self._buffer_factory()
        return self._buffer

    def _add_reader(self, fd, callback, *args) -> None:
        if not self.is_reading():
            return
        self._loop._add_reader(fd, callback, *args)


class StreamTransport(SocketTransportBase):
    """A TCP or Unix stream socket transport."""

    _start_tls_compatible = True
    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE

    __slots__ = ("_buffered", "_eof", "_paused", "_empty_waiter")

    _lazy_extra = True

    def __init__(self, loop, sock, protocol, waiter=None, extra=None, server=None, peername=None):
        # Set first: if the base's constructor fails (Server._attach on a closed server), the
        # half-made transport's __del__ and repr still find them.
        self._eof = False
        self._paused = False
        self._empty_waiter = None
        SocketTransportBase.__init__(self, loop, sock, protocol, extra, server, peername)
        if type(sock) is socket.socket:
            # set_nodelay() in this frame (it runs for every accepted connection).
            if (
                _raw_family(sock) in _TCP_FAMILIES
                and _raw_type(sock) == socket.SOCK_STREAM
                and _raw_proto(sock) == _IPPROTO_TCP
                and _TCP_NODELAY is not None
            ):
                sock.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
        else:
            set_nodelay(sock)
        loop.call_soon(self._protocol.connection_made, self)
        # Only start reading once connection_made() has been called. The watcher calls the
        # class's _read_ready with the transport as its argument: no bound method per connection.
        loop.call_soon(self._add_reader, self._sock_fd, type(self)._read_ready, self)
        if waiter is not None:
            loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    def set_protocol(self, protocol) -> None:
        # A flag, not a bound method per connection. (The base class's set_protocol only
        # stores the protocol: done here, without a super() call per connection.)
        self._buffered = isinstance(protocol, protocols.BufferedProtocol)
        self._protocol = protocol

    # ---- reading ------------------------------------------------------------------------

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def _add_reader(self, fd, callback, *args) -> None:
        # A TCP socket's reader is watched edge-triggered: every read path below either drains
        # the socket or, when a read filled all the room it had, calls _rearm_reader. (Unix
        # sockets stay level-triggered: a read stops short at a message that carries fds.)
        # (is_reading() and sock_family() in this frame: it runs once per connection.)
        if self._paused or self._closing:
            return
        sock = self._sock
        family = _raw_family(sock) if type(sock) is socket.socket else sock_family(sock)
        if family in _EDGE_FAMILIES:
            self._loop._add_reader_edge(fd, callback, *args)
        else:
            self._loop._add_reader(fd, callback, *args)

    def _start_reading(self) -> None:
        # What __init__ schedules after connection_made (the native __init__ schedules the
        # native twin of this method).
        self._add_reader(self._sock_fd, type(self)._read_ready, self)

    def pause_reading(self) -> None:
        if self._closing or self._paused:
            return
        self._paused = True
        self._loop._remove_reader(self._sock_fd)
        if self._loop.get_debug():
            logger.debug("%r pauses reading", self)

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        self._add_reader(self._sock_fd, type(self)._read_ready, self)
        if self._loop.get_debug():
            logger.debug("%r resumes reading", self)

    def _read_ready(self) -> None:
        # Replaced below by the native `_read_ready`, which does both paths itself
        # (data_received, and get_buffer / recv_into / buffer_updated for buffered protocols).
        if self._buffered:
            self._read_ready__get_buffer()
        else:
            self._read_ready__data_received()

    def _read_ready__data_received(self) -> None:
        if self._conn_lost:
            return
        try:
            data = self._recv_bytes()
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on socket transport")
            return
        if not data:
            self._read_ready__on_eof()
            return
        if len(data) == MAX_READ:
            self._loop._rearm_reader(self._sock_fd)
        try:
            self._protocol.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    def _recv_bytes(self):
        return _read_bytes(self._sock_fd, MAX_READ)

    def _read_ready__get_buffer(self) -> None:
        if self._conn_lost:
            return
        try:
            buf = self._protocol.get_buffer(-1)
            if not len(buf):
                raise RuntimeError("get_buffer() returned an empty buffer")
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.")
            return
        try:
            nbytes = self._sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on socket transport")
            return
        if not nbytes:
            self._read_ready__on_eof()
            return
        if nbytes == memoryview(buf).nbytes:
            self._loop._rearm_reader(self._sock_fd)
        try:
            self._protocol.buffer_updated(nbytes)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")

    def _read_ready__on_eof(self) -> None:
        if self._loop.get_debug():
            logger.debug("%r received EOF", self)
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if keep_open:
            # Half-closed: stop reading, the protocol may still write.
            self._loop._remove_reader(self._sock_fd)
        else:
            self.close()

    # ---- writing ------------------------------------------------------------------------

    def write(self, data) -> None:
        # The native fast path (installed below as `write`) handles a non-empty bytes object
        # written to an idle, open transport and falls back to this for everything else.
        data = as_bytes_like(data)
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._empty_waiter is not None:
            raise RuntimeError("unable to write; sendfile is in progress")
        if not data:
            return
        if self._conn_lost:
            if self._conn_lost >= constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return

        if not self._buffer:
            # Try to send at once; queue only what the kernel did not take.
            try:
                n = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on socket transport")
                return
            if n == len(data):
                return
            self._write_queue(data, n, True)
        else:
            self._write_queue(data, 0, False)

    def _write_queue(self, data, n: int, start_writer: bool) -> None:
        # The part of write() after the first send attempt (also the native fast path's
        # continuation): watch for writability, queue the unsent tail, maybe pause the protocol.
        if start_writer:
            self._loop._add_writer(self._sock_fd, self._write_ready)
        # bytes are immutable: keep a reference (or a view of the unsent tail). Mutable
        # buffers are copied, since the caller may reuse them once write() returns.
        if isinstance(data, bytes):
            chunk = memoryview(data)[n:] if n else data
        else:
            chunk = bytes(memoryview(data)[n:])
        self._queue().append(chunk)
        self._buffer_size += len(chunk)
        self._maybe_pause_protocol()

    def _write_ready(self) -> None:
        if self._conn_lost or not self._buffer:
            return
        try:
            if len(self._buffer) == 1:
                n = self._sock.send(self._buffer[0])
            else:
                n = self._sock.sendmsg(itertools.islice(self._buffer, _IOV_MAX))
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop._remove_writer(self._sock_fd)
            self._buffer.clear()
            self._buffer_size = 0
            self._fatal_error(exc, "Fatal write error on socket transport")
            if self._empty_waiter is not None:
                self._empty_waiter.set_exception(exc)
            return
        self._consume(n)
        self._maybe_resume_protocol()
        if not self._buffer:
            self._loop._remove_writer(self._sock_fd)
            if self._empty_waiter is not None:
                self._empty_waiter.set_result(None)
            if self._closing:
                self._call_connection_lost(None)
            elif self._eof:
                self._sock.shutdown(socket.SHUT_WR)

    def _consume(self, n: int) -> None:
        self._buffer_size -= n
        buffer = self._buffer
        while n:
            chunk = buffer[0]
            size = len(chunk)
            if size <= n:
                buffer.popleft()
                n -= size
            else:
                buffer[0] = memoryview(chunk)[n:]
                break

    def write_eof(self) -> None:
        if self._closing or self._eof:
            return
        self._eof = True
        if not self._buffer:
            self._sock.shutdown(socket.SHUT_WR)

    def can_write_eof(self) -> bool:
        return True

    def _call_connection_lost(self, exc) -> None:
        try:
            super()._call_connection_lost(exc)
        finally:
            if self._empty_waiter is not None:
                self._empty_waiter.set_exception(ConnectionError("Connection is closed by peer"))

    # ---- sendfile support ---------------------------------------------------------------

    def _make_empty_waiter(self):
        if self._empty_waiter is not None:
            raise RuntimeError("Empty waiter is already set")
        self._empty_waiter = self._loop.create_future()
        if not self._buffer:
            self._empty_waiter.set_result(None)
        return self._empty_waiter

    def _reset_empty_waiter(self) -> None:
        self._empty_waiter = None


# The hot paths in Rust: `write` for the common case and `_read_ready`. The Python versions
# above stay as `_write_py` / `_read_ready_py` and remain the reference behaviour.
StreamTransport._write_py = StreamTransport.write
StreamTransport._writelines_py = StreamTransport.writelines  # asyncio's: join, then write()
StreamTransport._read_ready_py = StreamTransport._read_ready
_ferroloop_native.install_stream_fast_paths(StreamTransport)

# The transport's life in Rust too (`stream_life.rs`): construction, the start of reading,
# EOF, close() and connection_lost, for an exact StreamTransport over an exact socket.socket.
# Anything else (a subclass, a keyword call, a waiter) runs these Python methods, kept here.
StreamTransport._init_py = StreamTransport.__init__
StreamTransport._start_reading_py = StreamTransport._start_reading
StreamTransport._close_py = SocketTransportBase.close
StreamTransport._call_connection_lost_py = StreamTransport._call_connection_lost
StreamTransport._del_py = SocketTransportBase.__del__
_ferroloop_native.install_stream_lifecycle(
    StreamTransport,
    socket.socket,
    protocols.BufferedProtocol,
    _NO_QUEUE,
    DEFAULT_HIGH_WATER,
    DEFAULT_LOW_WATER,
    _socket.socket.close,
    _CLOSED_EXTRA,
)


class SocketMethodsStreamTransport(StreamTransport):
    """A stream transport over a socket whose class replaces `recv`, `recv_into` or `send`
    (instrumentation, a test's tracking socket): asyncio's transport reads and writes through
    those methods, so this one does too. It takes the Python paths throughout (the native
    `_read_ready` and `write` work on the fd)."""

    __slots__ = ()

    write = StreamTransport._write_py
    writelines = StreamTransport._writelines_py
    _read_ready = StreamTransport._read_ready_py

    def _recv_bytes(self):
        return self._sock.recv(MAX_READ)


def replaces_socket_methods(sock, names) -> bool:
    """Whether `sock`'s class replaces one of the `socket.socket` methods `names`."""
    cls = type(sock)
    if cls is socket.socket:
        return False
    return any(getattr(cls, name, None) is not getattr(socket.socket, name, None) for name in names)


def stream_transport_class(sock):
    """StreamTransport, or SocketMethodsStreamTransport when `sock`'s class replaces one of
    the socket methods asyncio's transport calls."""
    if replaces_socket_methods(sock, ("recv", "recv_into", "send", "sendmsg")):
        return SocketMethodsStreamTransport
    return StreamTransport
