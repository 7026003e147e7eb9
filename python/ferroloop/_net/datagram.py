"""UDP (and Unix datagram) endpoints: the datagram transport and `create_datagram_endpoint`."""

from __future__ import annotations

import collections
import logging
import os
import socket
import sys
import stat
import warnings
from asyncio import base_events, constants, futures, transports

from .. import _ferroloop as _ferroloop_native
from .._ferroloop import recvfrom_inet as _recvfrom_inet
from .transports import MAX_READ, SocketTransportBase, as_bytes_like, replaces_socket_methods

logger = logging.getLogger("asyncio")

# create_datagram_endpoint's reuse_address when not given (Python 3.9 and 3.10 take it):
# asyncio's own sentinel, so the signatures are the same.
_UNSET = getattr(base_events, "_unset", None) or object()


class DatagramTransport(SocketTransportBase, transports.DatagramTransport):
    """A datagram socket transport: whole datagrams in, whole datagrams out, queued when the
    socket buffer is full."""

    _buffer_factory = collections.deque

    # Slots, so that the native fast paths read them at fixed offsets; `__dict__` keeps
    # instances open to other attributes, as asyncio's transports are.
    __slots__ = ("_address", "_inet", "_sendto_fd", "_send_fd", "_paused", "__dict__")

    def __init__(self, loop, sock, protocol, address=None, waiter=None, extra=None):
        self._paused = False
        super().__init__(loop, sock, protocol, extra)
        self._address = address
        # A socket whose class replaces recvfrom/sendto/send is read and written through those
        # methods, as asyncio does (the Python paths); other AF_INET sockets take the native
        # fast paths (installed at the end of this module).
        native = not replaces_socket_methods(sock, ("recvfrom", "sendto", "send"))
        self._inet = native and sock.family == socket.AF_INET
        # The native sendto sends at once on these fds (-1: the Python path): sendto(data, addr)
        # on an unconnected AF_INET socket, sendto(data) on a connected socket.
        connected = bool(self._extra["peername"])
        self._sendto_fd = self._sock_fd if self._inet and not connected else -1
        self._send_fd = self._sock_fd if connected and native else -1
        loop.call_soon(self._protocol.connection_made, self)
        loop.call_soon(self._add_reader, self._sock_fd, self._read_ready)
        if waiter is not None:
            loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    # asyncio's datagram transport inherits these from its selector transport base.
    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def pause_reading(self) -> None:
        if not self.is_reading():
            return
        self._paused = True
        self._loop._remove_reader(self._sock_fd)
        if self._loop.get_debug():
            logger.debug("%r pauses reading", self)

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        self._add_reader(self._sock_fd, self._read_ready)
        if self._loop.get_debug():
            logger.debug("%r resumes reading", self)

    def _read_ready(self) -> None:
        if self._conn_lost:
            return
        try:
            if self._inet:
                data, addr = _recvfrom_inet(self._sock_fd, MAX_READ)
            else:
                data, addr = self._sock.recvfrom(MAX_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._protocol.error_received(exc)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on datagram transport")
        else:
            self._protocol.datagram_received(data, addr)

    def sendto(self, data, addr=None) -> None:
        data = as_bytes_like(data)
        if not data:
            return
        if self._address:
            if addr not in (None, self._address):
                raise ValueError(f"Invalid address: must be None or {self._address}")
            addr = self._address
        if self._conn_lost and self._address:
            if self._conn_lost >= constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return

        if not self._buffer:
            try:
                if self._extra["peername"]:
                    self._sock.send(data)
                else:
                    self._sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                self._loop._add_writer(self._sock_fd, self._sendto_ready)
            except OSError as exc:
                self._protocol.error_received(exc)
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on datagram transport")
                return

        self._queue().append((bytes(data), addr))
        self._buffer_size += len(data)
        self._maybe_pause_protocol()

    def _sendto_ready(self) -> None:
        while self._buffer:
            data, addr = self._buffer.popleft()
            self._buffer_size -= len(data)
            try:
                if self._extra["peername"]:
                    self._sock.send(data)
                else:
                    self._sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                self._buffer.appendleft((data, addr))
                self._buffer_size += len(data)
                break
            except OSError as exc:
                self._protocol.error_received(exc)
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on datagram transport")
                return

        self._maybe_resume_protocol()
        if not self._buffer:
            self._loop._remove_writer(self._sock_fd)
            if self._closing:
                self._call_connection_lost(None)


class DatagramMixin:
    """`create_datagram_endpoint`."""

    def _make_datagram_transport(self, sock, protocol, address=None, waiter=None, extra=None):
        return DatagramTransport(self, sock, protocol, address, waiter, extra)

    if sys.version_info >= (3, 11):

        async def create_datagram_endpoint(
            self,
            protocol_factory,
            local_addr=None,
            remote_addr=None,
            *,
            family=0,
            proto=0,
            flags=0,
            reuse_port=None,
            allow_broadcast=None,
            sock=None,
        ):
            """Create a datagram connection."""
            return await self._create_datagram_endpoint(
                protocol_factory, local_addr, remote_addr, family, proto, flags,
                _UNSET, reuse_port, allow_broadcast, sock,
            )

    else:

        async def create_datagram_endpoint(
            self,
            protocol_factory,
            local_addr=None,
            remote_addr=None,
            *,
            family=0,
            proto=0,
            flags=0,
            reuse_address=_UNSET,
            reuse_port=None,
            allow_broadcast=None,
            sock=None,
        ):
            """Create a datagram connection."""
            return await self._create_datagram_endpoint(
                protocol_factory, local_addr, remote_addr, family, proto, flags,
                reuse_address, reuse_port, allow_broadcast, sock,
            )

    async def _create_datagram_endpoint(
        self, protocol_factory, local_addr, remote_addr, family, proto, flags,
        reuse_address, reuse_port, allow_broadcast, sock,
    ):
        if sock is not None:
            # 3.13 takes any socket but a stream one (SOCK_SEQPACKET, SOCK_RAW ...).
            if sys.version_info >= (3, 13):
                if sock.type == socket.SOCK_STREAM:
                    raise ValueError(f"A datagram socket was expected, got {sock!r}")
            elif sock.type != socket.SOCK_DGRAM:
                raise ValueError(f"A UDP Socket was expected, got {sock!r}")
            if local_addr or remote_addr or family or proto or flags or reuse_port or allow_broadcast:
                opts = dict(
                    local_addr=local_addr,
                    remote_addr=remote_addr,
                    family=family,
                    proto=proto,
                    flags=flags,
                )
                if reuse_address is not _UNSET:  # (Python 3.9 and 3.10 list it)
                    opts["reuse_address"] = reuse_address
                opts.update(reuse_port=reuse_port, allow_broadcast=allow_broadcast)
                problems = ", ".join(f"{k}={v}" for k, v in opts.items() if v)
                raise ValueError(
                    f"socket modifier keyword arguments can not be used "
                    f"when sock is specified. ({problems})"
                )
            sock.setblocking(False)
            r_addr = None
        else:
            if not (local_addr or remote_addr):
                if family == 0:
                    raise ValueError("unexpected address family")
                addr_pairs_info = (((family, proto), (None, None)),)
            elif hasattr(socket, "AF_UNIX") and family == socket.AF_UNIX:
                for addr in (local_addr, remote_addr):
                    if addr is not None and not isinstance(addr, str):
                        raise TypeError("string is expected")
                if local_addr and local_addr[0] not in (0, "\x00"):
                    try:
                        if stat.S_ISSOCK(os.stat(local_addr).st_mode):
                            os.remove(local_addr)
                    except FileNotFoundError:
                        pass
                    except OSError as err:
                        logger.error(
                            "Unable to check or remove stale UNIX socket %r: %r", local_addr, err
                        )
                addr_pairs_info = (((family, proto), (local_addr, remote_addr)),)
            else:
                # Pair local and remote addresses of the same family and protocol.
                addr_infos = {}
                for idx, addr in ((0, local_addr), (1, remote_addr)):
                    if addr is None:
                        continue
                    if not (isinstance(addr, tuple) and len(addr) == 2):
                        # (an assert in 3.10's asyncio, a TypeError before and since)
                        if sys.version_info[:2] == (3, 10):
                            raise AssertionError("2-tuple is expected")
                        raise TypeError("2-tuple is expected")
                    infos = await self._ensure_resolved(
                        addr, family=family, type=socket.SOCK_DGRAM, proto=proto, flags=flags
                    )
                    if not infos:
                        raise OSError("getaddrinfo() returned empty list")
                    for fam, _, pro, _, address in infos:
                        key = (fam, pro)
                        if key not in addr_infos:
                            addr_infos[key] = [None, None]
                        addr_infos[key][idx] = address
                addr_pairs_info = [
                    (key, addr_pair)
                    for key, addr_pair in addr_infos.items()
                    if not ((local_addr and addr_pair[0] is None) or (remote_addr and addr_pair[1] is None))
                ]
                if not addr_pairs_info:
                    raise ValueError("can not get address information")

            if reuse_address is not _UNSET:  # Python 3.9 and 3.10 (bpo-37228)
                if reuse_address:
                    raise ValueError(
                        "Passing `reuse_address=True` is no longer supported, as the usage of "
                        "SO_REUSEPORT in UDP poses a significant security concern."
                    )
                # stacklevel 3: past this coroutine and create_datagram_endpoint, the caller
                warnings.warn(
                    "The *reuse_address* parameter has been deprecated as of 3.5.10 and is "
                    "scheduled for removal in 3.11.",
                    DeprecationWarning,
                    stacklevel=3,
                )

            exceptions = []
            for (fam, pro), (local_address, remote_address) in addr_pairs_info:
                sock = None
                r_addr = None
                try:
                    sock = socket.socket(family=fam, type=socket.SOCK_DGRAM, proto=pro)
                    if reuse_port:
                        set_reuseport(sock)
                    if allow_broadcast:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                    sock.setblocking(False)
                    if local_addr:
                        sock.bind(local_address)
                    if remote_addr:
                        if not allow_broadcast:
                            await self.sock_connect(sock, remote_address)
                        r_addr = remote_address
                except OSError as exc:
                    if sock is not None:
                        sock.close()
                    exceptions.append(exc)
                except BaseException:
                    if sock is not None:
                        sock.close()
                    raise
                else:
                    break
            else:
                raise exceptions[0]

        protocol = protocol_factory()
        waiter = self.create_future()
        transport = self._make_datagram_transport(sock, protocol, r_addr, waiter)
        if self.get_debug():
            if local_addr:
                logger.info("Datagram endpoint local_addr=%r remote_addr=%r created: (%r, %r)",
                            local_addr, remote_addr, transport, protocol)
            else:
                logger.debug("Datagram endpoint remote_addr=%r created: (%r, %r)",
                             remote_addr, transport, protocol)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        return transport, protocol


def set_reuseport(sock) -> None:
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("reuse_port not supported by socket module")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        raise ValueError(
            "reuse_port not supported by socket module, SO_REUSEPORT defined but not implemented."
        )


# Native `_read_ready` and `sendto` for the common cases (an AF_INET socket, a bytes datagram,
# a numeric IPv4 address or a connected socket, nothing queued); the Python methods stay as
# `_read_ready_py` / `_sendto_py` and handle everything else.
DatagramTransport._read_ready_py = DatagramTransport._read_ready
DatagramTransport._sendto_py = DatagramTransport.sendto
_ferroloop_native.install_datagram_fast_paths(DatagramTransport)
