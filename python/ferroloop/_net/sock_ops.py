"""`loop.sock_*`: awaitable operations on non-blocking sockets the caller owns.

Every operation tries the system call first and only registers the fd with the reactor when
it would block; the watcher is removed when the future is done (result, error or
cancellation), so a cancelled operation leaves the socket usable.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import sys
import weakref
from operator import methodcaller

from asyncio import exceptions

try:
    import ssl
except ImportError:  # pragma: no cover
    ssl = None

_HAS_IPV6 = hasattr(socket, "AF_INET6")
_SENDFILE_FALLBACK_BLOCK = 256 * 1024


def check_ssl_socket(sock) -> None:
    if ssl is not None and isinstance(sock, ssl.SSLSocket):
        raise TypeError("Socket cannot be of type SSLSocket")


def fileno_of(fd) -> int:
    if isinstance(fd, int):
        return fd
    try:
        return int(fd.fileno())
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"Invalid file object: {fd!r}") from None


class TransportTable:
    """fd -> transport, held weakly: a transport that is collected unclosed has released its fd
    in __del__.

    A weakref.WeakValueDictionary would do, but each of its entries is a KeyedRef with a
    callback, built by Python code: 88 bytes and half a microsecond per connection. Here an
    entry is a plain weakref.ref (80 bytes, and the one weakref every other callback-free
    reference to the transport shares); transports remove their own entry when their
    connection_lost has run, or in __del__ if they are collected unclosed.
    """

    __slots__ = ("_refs",)

    def __init__(self):
        self._refs = {}

    def __setitem__(self, fd, transport) -> None:
        self._refs[fd] = weakref.ref(transport)

    def __delitem__(self, fd) -> None:
        del self._refs[fd]

    def __len__(self) -> int:
        return len(self._refs)

    def get(self, fd, default=None):
        ref = self._refs.get(fd)
        if ref is None:
            return default
        transport = ref()
        return default if transport is None else transport

    def discard(self, fd, transport) -> None:
        """Forget fd's entry if it is `transport` (or a collected one)."""
        ref = self._refs.get(fd)
        if ref is not None:
            current = ref()
            if current is None or current is transport:
                del self._refs[fd]

    def values(self):
        """The live transports (a list: the table may change while the caller iterates)."""
        return [t for t in [ref() for ref in self._refs.values()] if t is not None]

    def clear(self) -> None:
        self._refs.clear()


class SockOpsMixin:
    """The `sock_*` coroutines and the fd → transport registry they check against."""

    # fd -> transport, for "File descriptor ... is used by transport ..." and for
    # Server.close_clients().
    @property
    def _transports(self):
        try:
            return self.__dict__["_net_transports"]
        except KeyError:
            table = self.__dict__["_net_transports"] = TransportTable()
            return table

    def _ensure_fd_no_transport(self, fd) -> None:
        fileno = fileno_of(fd)
        table = self.__dict__.get("_net_transports")
        if not table:
            return
        transport = table.get(fileno)
        if (
            transport is not None
            and not transport.is_closing()
            # a transport's socket lent to loop.sendfile() (see _sendfile_native)
            and getattr(transport, "_empty_waiter", None) is None
        ):
            raise RuntimeError(f"File descriptor {fd!r} is used by transport {transport!r}")

    def _net_close(self) -> None:
        """Called by Loop.close(): forget the transports (their sockets are theirs to close)."""
        table = self.__dict__.get("_net_transports")
        if table is not None:
            table.clear()

    # ---- helpers ------------------------------------------------------------------------

    def _check_sock(self, sock) -> None:
        check_ssl_socket(sock)
        if self.get_debug() and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    def _wait_readable(self, fut, sock, callback, *args) -> None:
        fd = sock.fileno()
        self._ensure_fd_no_transport(fd)
        handle = self._add_reader(fd, callback, *args)
        fut.add_done_callback(functools.partial(self._sock_read_done, fd, handle=handle))

    def _wait_writable(self, fut, sock, callback, *args) -> None:
        fd = sock.fileno()
        self._ensure_fd_no_transport(fd)
        handle = self._add_writer(fd, callback, *args)
        fut.add_done_callback(functools.partial(self._sock_write_done, fd, handle=handle))

    def _sock_read_done(self, fd, fut, handle=None) -> None:
        if handle is None or not handle.cancelled():
            self._remove_reader(fd)

    def _sock_write_done(self, fd, fut, handle=None) -> None:
        if handle is None or not handle.cancelled():
            self._remove_writer(fd)

    def _sock_retry(self, fut, call, *args) -> None:
        # The reactor says the socket is ready: try call(*args) again and settle `fut` with
        # its result or its exception; a call that would still block waits for the next event.
        if fut.done():
            return
        try:
            result = call(*args)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
        finally:
            fut = None  # break the exception <-> frame cycle

    async def _sock_read_op(self, sock, method, *args):
        self._check_sock(sock)
        try:
            return getattr(sock, method)(*args)
        except (BlockingIOError, InterruptedError):
            pass
        fut = self.create_future()
        # methodcaller looks the method up on every attempt, as asyncio does.
        self._wait_readable(fut, sock, self._sock_retry, fut, methodcaller(method, *args), sock)
        return await fut

    # ---- receiving ----------------------------------------------------------------------

    async def sock_recv(self, sock, n):
        return await self._sock_read_op(sock, "recv", n)

    async def sock_recv_into(self, sock, buf):
        return await self._sock_read_op(sock, "recv_into", buf)

    async def sock_recvfrom(self, sock, bufsize):
        return await self._sock_read_op(sock, "recvfrom", bufsize)

    async def sock_recvfrom_into(self, sock, buf, nbytes=0):
        if not nbytes:
            nbytes = len(buf)
        return await self._sock_read_op(sock, "recvfrom_into", buf, nbytes)

    # ---- sending ------------------------------------------------------------------------

    async def sock_sendall(self, sock, data):
        self._check_sock(sock)
        try:
            n = sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n == len(data):
            return None
        fut = self.create_future()
        view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
        self._wait_writable(fut, sock, self._sock_sendall_ready, fut, sock, view, [n])
        return await fut

    def _sock_sendall_ready(self, fut, sock, view, pos) -> None:
        if fut.done():
            return
        start = pos[0]
        try:
            n = sock.send(view[start:])
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            return
        start += n
        if start == len(view):
            fut.set_result(None)
        else:
            pos[0] = start

    async def sock_sendto(self, sock, data, address):
        self._check_sock(sock)
        try:
            return sock.sendto(data, address)
        except (BlockingIOError, InterruptedError):
            pass
        fut = self.create_future()
        self._wait_writable(
            fut, sock, self._sock_retry, fut, methodcaller("sendto", data, address), sock
        )
        return await fut

    if sys.version_info < (3, 11):  # asyncio's loop has them from 3.11
        del sock_recvfrom, sock_recvfrom_into, sock_sendto

    # ---- connecting and accepting -------------------------------------------------------

    async def sock_connect(self, sock, address):
        self._check_sock(sock)
        if sock.family == socket.AF_INET or (_HAS_IPV6 and sock.family == socket.AF_INET6):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto
            )
            address = resolved[0][4]
        fut = self.create_future()
        try:
            sock.connect(address)
        except (BlockingIOError, InterruptedError):
            self._wait_writable(fut, sock, self._sock_retry, fut, _connect_outcome, sock, address)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            fut.set_exception(exc)
        else:
            fut.set_result(None)
        try:
            return await fut
        finally:
            fut = None  # break the exception <-> frame cycle

    async def sock_accept(self, sock):
        self._check_sock(sock)
        try:
            return self._accept_nonblocking(sock)
        except (BlockingIOError, InterruptedError):
            pass
        fut = self.create_future()
        self._wait_readable(fut, sock, self._sock_retry, fut, self._accept_nonblocking, sock)
        return await fut

    @staticmethod
    def _accept_nonblocking(sock):
        conn, address = sock.accept()
        conn.setblocking(False)
        return conn, address

    # ---- sendfile -----------------------------------------------------------------------

    async def sock_sendfile(self, sock, file, offset=0, count=None, *, fallback=True):
        if self.get_debug() and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")
        check_ssl_socket(sock)
        check_sendfile_params(sock, file, offset, count)
        try:
            return await self._sock_sendfile_native(sock, file, offset, count)
        except exceptions.SendfileNotAvailableError:
            if not fallback:
                raise
        return await self._sock_sendfile_fallback(sock, file, offset, count)

    async def _sock_sendfile_native(self, sock, file, offset, count):
        if not hasattr(os, "sendfile"):
            raise exceptions.SendfileNotAvailableError("os.sendfile() is not available")
        try:
            fileno = file.fileno()
        except (AttributeError, OSError, ValueError) as err:  # incl. io.UnsupportedOperation
            raise exceptions.SendfileNotAvailableError("not a regular file") from err
        try:
            fsize = os.fstat(fileno).st_size
        except OSError:
            raise exceptions.SendfileNotAvailableError("not a regular file")
        blocksize = count if count else fsize
        if not blocksize:
            return 0  # empty file
        fut = self.create_future()
        state = _SendfileState(sock, fileno, offset, count, blocksize)
        self._sendfile_step(fut, state, registered=False)
        return await fut

    def _sendfile_step(self, fut, state, registered) -> None:
        if fut.done():
            return  # cancelled: the done callback removed the watcher and set the position
        fd = state.sock.fileno()
        while True:
            if state.count:
                blocksize = state.count - state.total
                if blocksize <= 0:
                    break
            else:
                blocksize = state.blocksize
            try:
                sent = os.sendfile(fd, state.fileno, state.offset + state.total, blocksize)
            except (BlockingIOError, InterruptedError):
                if not registered:
                    self._wait_writable(fut, state.sock, self._sendfile_step, fut, state, True)
                    fut.add_done_callback(state.update_filepos)
                return
            except OSError as exc:
                if registered and exc.errno == errno.ENOTCONN and type(exc) is not ConnectionError:
                    new_exc = ConnectionError("socket is not connected", errno.ENOTCONN)
                    new_exc.__cause__ = exc
                    exc = new_exc
                if state.total == 0:
                    err = exceptions.SendfileNotAvailableError("os.sendfile call failed")
                    err.__cause__ = exc
                    exc = err
                state.update_filepos()
                fut.set_exception(exc)
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                state.update_filepos()
                fut.set_exception(exc)
                return
            if sent == 0:
                break  # end of file
            state.total += sent
        state.update_filepos()
        fut.set_result(state.total)

    async def _sock_sendfile_fallback(self, sock, file, offset, count):
        if offset:
            file.seek(offset)
        blocksize = min(count, _SENDFILE_FALLBACK_BLOCK) if count else _SENDFILE_FALLBACK_BLOCK
        buf = bytearray(blocksize)
        total_sent = 0
        try:
            while True:
                if count:
                    blocksize = min(count - total_sent, blocksize)
                    if blocksize <= 0:
                        break
                view = memoryview(buf)[:blocksize]
                read = await self.run_in_executor(None, file.readinto, view)
                if not read:
                    break
                await self.sock_sendall(sock, view[:read])
                total_sent += read
            return total_sent
        finally:
            if total_sent > 0 and hasattr(file, "seek"):
                file.seek(offset + total_sent)


class _SendfileState:
    __slots__ = ("sock", "fileno", "offset", "count", "blocksize", "total", "_done")

    def __init__(self, sock, fileno, offset, count, blocksize):
        self.sock = sock
        self.fileno = fileno
        self.offset = offset
        self.count = count
        self.blocksize = blocksize
        self.total = 0
        self._done = False

    def update_filepos(self, _fut=None) -> None:
        if self._done:
            return
        self._done = True
        if self.total > 0:
            os.lseek(self.fileno, self.offset + self.total, os.SEEK_SET)


def _connect_outcome(sock, address) -> None:
    """Raise the error of a non-blocking connect() that has finished (None when it succeeded)."""
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err != 0:
        raise OSError(err, f"Connect call failed {address}")


def check_sendfile_params(sock, file, offset, count) -> None:
    if "b" not in getattr(file, "mode", "b"):
        raise ValueError("file should be opened in binary mode")
    if not sock.type == socket.SOCK_STREAM:
        raise ValueError("only SOCK_STREAM type sockets are supported")
    if count is not None:
        if not isinstance(count, int):
            raise TypeError(f"count must be a positive integer (got {count!r})")
        if count <= 0:
            raise ValueError(f"count must be a positive integer (got {count!r})")
    if not isinstance(offset, int):
        raise TypeError(f"offset must be a non-negative integer (got {offset!r})")
    if offset < 0:
        raise ValueError(f"offset must be a non-negative integer (got {offset!r})")
