"""Listening sockets: the `Server` object, the accept loop, `create_server`, `create_unix_server`."""

from __future__ import annotations

import collections.abc
import errno
import itertools
import logging
import os
import socket
import _socket
import stat
import sys
from asyncio import constants, events, exceptions, tasks, trsock

from .._ferroloop import accept_connections as _accept_connections
from .._ferroloop import accept_plain_connection as _accept_plain_native
from .._ferroloop import accept_ready as _accept_ready
from .._ferroloop import accept_socket as _accept_socket
from .._ferroloop import install_server_class as _install_server_class
from .._signatures import since
from .connect import ConnectMixin, ssl_shutdown_kwargs
from .datagram import set_reuseport
from .sock_ops import check_ssl_socket

logger = logging.getLogger("asyncio")

_HAS_IPV6 = hasattr(socket, "AF_INET6")
_INET_FAMILIES = (int(socket.AF_INET), int(getattr(socket, "AF_INET6", socket.AF_INET)))
_SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
# The C socket's own fields, as ints: `socket.socket`'s family and type properties build an
# enum member per call.
_sock_family = _socket.socket.family.__get__
_sock_type = _socket.socket.type.__get__
_sock_proto = _socket.socket.proto.__get__
# Python 3.12.1 made wait_closed() wait even when called after close().
_WAIT_CLOSED_AFTER_CLOSE = sys.version_info >= (3, 12, 1)
# A loop (subclass) that makes its own socket transports gets its accepted connections set up
# by the Python `_accept_plain_connection`, which calls it.
_DEFAULT_MAKE_SOCKET_TRANSPORT = ConnectMixin._make_socket_transport


class Server(events.AbstractServer):
    """A listening server: its sockets, the connections it accepted, serve_forever()."""

    # Read and written natively for each accepted connection (stream_life.rs); the other
    # attributes live in the instance's __dict__ (AbstractServer has one).
    __slots__ = ("_sockets", "_active_count", "_local_name")

    def __init__(
        self,
        loop,
        sockets,
        protocol_factory,
        ssl_context,
        backlog,
        ssl_handshake_timeout,
        ssl_shutdown_timeout=None,
    ):
        self._loop = loop
        self._sockets = sockets
        self._active_count = 0
        self._waiters = []
        self._protocol_factory = protocol_factory
        self._backlog = backlog
        self._ssl_context = ssl_context
        self._ssl_handshake_timeout = ssl_handshake_timeout
        self._ssl_shutdown_timeout = ssl_shutdown_timeout
        self._serving = False
        self._serving_forever_fut = None
        self._unix_cleanup = None  # (path, st_ino) to unlink on close (3.13's cleanup_socket)
        # The local address of every connection this server accepts, when it has one listening
        # socket bound to one IPv4 address: what getsockname() would return for each (the
        # native connection_lost uses it instead of asking each socket).
        self._local_name = _one_local_name(sockets)

    def __repr__(self) -> str:
        return f"<{self.__class__.__name__} sockets={self.sockets!r}>"

    # The transports of accepted connections report in and out. They are not collected in a
    # set here: the loop's fd -> transport table already holds each one (weakly) and a
    # transport knows its server, so close_clients() finds them there. A WeakSet would cost
    # every idle connection a weakref and a set slot (about 150 bytes) for that one scan.
    def _attach(self, transport=None) -> None:
        assert self._sockets is not None
        self._active_count += 1

    def _detach(self, transport=None) -> None:
        self._active_count -= 1
        if self._active_count == 0 and self._sockets is None:
            self._wakeup()

    def _clients(self):
        """The open transports of the connections this server accepted (asyncio's WeakSet);
        a transport forgets its server when its connection_lost has run."""
        table = self._loop.__dict__.get("_net_transports")
        if not table:
            return []
        return [t for t in table.values() if getattr(t, "_server", None) is self]

    def _wakeup(self) -> None:
        waiters = self._waiters
        self._waiters = None
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _start_serving(self) -> None:
        if self._serving:
            return
        self._serving = True
        for sock in self._sockets:
            sock.listen(self._backlog)
            self._loop._start_serving(
                self._protocol_factory,
                sock,
                self._ssl_context,
                self,
                self._backlog,
                self._ssl_handshake_timeout,
                self._ssl_shutdown_timeout,
            )

    def get_loop(self):
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    @property
    def sockets(self):
        if self._sockets is None:
            return ()
        return tuple(trsock.TransportSocket(s) for s in self._sockets)

    def close(self) -> None:
        sockets = self._sockets
        if sockets is None:
            return
        self._sockets = None
        for sock in sockets:
            self._loop._stop_serving(sock)
        self._serving = False
        if self._unix_cleanup is not None:
            path, ino = self._unix_cleanup
            self._unix_cleanup = None
            try:
                if os.stat(path).st_ino == ino:
                    os.unlink(path)
            except OSError:
                pass
        if self._serving_forever_fut is not None and not self._serving_forever_fut.done():
            self._serving_forever_fut.cancel()
            self._serving_forever_fut = None
        if self._active_count == 0:
            self._wakeup()

    def close_clients(self) -> None:
        for transport in self._clients():
            transport.close()

    def abort_clients(self) -> None:
        for transport in self._clients():
            transport.abort()

    if sys.version_info < (3, 13):  # asyncio's Server has them from 3.13
        del close_clients, abort_clients

    async def start_serving(self) -> None:
        self._start_serving()
        # Let the accept watchers be registered before returning.
        await tasks.sleep(0)

    async def serve_forever(self) -> None:
        if self._serving_forever_fut is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._sockets is None:
            raise RuntimeError(f"server {self!r} is closed")
        self._start_serving()
        self._serving_forever_fut = self._loop.create_future()
        try:
            await self._serving_forever_fut
        except exceptions.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._serving_forever_fut = None

    async def wait_closed(self) -> None:
        if self._waiters is None:
            return
        if not _WAIT_CLOSED_AFTER_CLOSE and self._sockets is None:
            return
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
        await self.wait_closed()


_IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)  # (Linux's value; 3.11 names it)


def _one_local_name(sockets):
    if len(sockets) != 1 or type(sockets[0]) is not socket.socket:
        return None
    sock = sockets[0]
    if _sock_family(sock) != socket.AF_INET or _sock_type(sock) != socket.SOCK_STREAM:
        return None
    try:
        name = sock.getsockname()
        if sock.getsockopt(socket.SOL_IP, _IP_TRANSPARENT):
            # A transparent proxy's listener (TPROXY) accepts connections addressed to other
            # hosts: each has its own local address.
            return None
    except OSError:
        return None
    if name[0] == "0.0.0.0" or not name[1]:
        return None  # the wildcard (each connection has its own local address), or unbound
    return name


# Its _attach/_detach run natively for the transports of accepted connections (stream_life.rs),
# as long as neither is replaced on the class or an instance.
_install_server_class(Server, _DEFAULT_MAKE_SOCKET_TRANSPORT, _accept_plain_native)


def _share_host(addr):
    """The peer address with its host string interned: connections from one host (a proxy, a
    load balancer, a benchmark client) then share one string instead of holding 64 bytes each
    for as long as they live. The value is equal; only the object is shared."""
    if type(addr) is tuple and addr and type(addr[0]) is str:
        return (sys.intern(addr[0]), *addr[1:])
    return addr


class ServingMixin:
    """The accept loop and the server factories."""

    def _start_serving(
        self,
        protocol_factory,
        sock,
        sslcontext=None,
        server=None,
        backlog=100,
        ssl_handshake_timeout=constants.SSL_HANDSHAKE_TIMEOUT,
        ssl_shutdown_timeout=getattr(constants, "SSL_SHUTDOWN_TIMEOUT", None),
    ) -> None:
        args = (
            protocol_factory, sock, sslcontext, server, backlog,
            ssl_handshake_timeout, ssl_shutdown_timeout,
        )
        if (
            not sslcontext
            and type(sock) is socket.socket
            and _sock_family(sock) in _INET_FAMILIES
            and getattr(self._accept_connection, "__func__", None) is _ACCEPT_CONNECTION
        ):
            # A plain TCP listener's readiness goes to the native `accept_ready`: this loop's
            # `_accept_connection` without its frame (it calls the method where it does not
            # apply: debug mode...).
            self._add_reader(sock.fileno(), _accept_ready, self, *args)
        else:
            self._add_reader(sock.fileno(), self._accept_connection, *args)

    def _stop_serving(self, sock) -> None:
        self._remove_reader(sock.fileno())
        sock.close()

    def _accept_connection(
        self,
        protocol_factory,
        sock,
        sslcontext=None,
        server=None,
        backlog=100,
        ssl_handshake_timeout=constants.SSL_HANDSHAKE_TIMEOUT,
        ssl_shutdown_timeout=getattr(constants, "SSL_SHUTDOWN_TIMEOUT", None),
    ) -> None:
        # Accept up to `backlog` pending connections per readiness event. A plain TCP listener
        # is served natively: one accept4() makes the socket non-blocking and close-on-exec,
        # the socket object is built with its family, type and proto given (no syscall to
        # ask for them, none to change its blocking mode), and an empty backlog ends the batch
        # without an exception. A socket subclass keeps its own accept().
        native = type(sock) is socket.socket and _sock_family(sock) in _INET_FAMILIES
        if native:
            listen_fd = sock.fileno()
            family = _sock_family(sock)
            stype = _sock_type(sock) | _SOCK_NONBLOCK
            proto = _sock_proto(sock)
        # A plain connection is set up natively unless this loop makes its transports itself.
        if getattr(self._make_socket_transport, "__func__", None) is _DEFAULT_MAKE_SOCKET_TRANSPORT:
            setup = _accept_plain_native
        else:
            setup = type(self)._accept_plain_connection
        if native and not sslcontext and not self.get_debug():
            # The whole batch natively: accept4, the socket object, the set-up callback.
            try:
                _accept_connections(
                    self, listen_fd, socket.socket, family, stype, proto, backlog,
                    setup, protocol_factory, server,
                )
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise  # the loop reports it through the exception handler
                self._accept_out_of_resources(
                    exc, protocol_factory, sock, sslcontext, server, backlog,
                    ssl_handshake_timeout, ssl_shutdown_timeout,
                )
                return
        for _ in range(backlog):
            try:
                if native:
                    # The socket object is made natively too (socket.socket.__init__'s steps).
                    accepted = _accept_socket(listen_fd, socket.socket, family, stype, proto)
                    if accepted is None:
                        return  # nothing more to accept (or the peer gave up first)
                    conn, addr = accepted
                else:
                    conn, addr = sock.accept()
                    conn.setblocking(False)
                    addr = _share_host(addr)
                if self.get_debug():
                    logger.debug("%r got a new connection from %r: %r", server, addr, conn)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # nothing more to accept (or the peer gave up first)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._accept_out_of_resources(
                        exc, protocol_factory, sock, sslcontext, server, backlog,
                        ssl_handshake_timeout, ssl_shutdown_timeout,
                    )
                else:
                    raise  # the loop reports it through the exception handler
            else:
                if not sslcontext:
                    # A plain connection is set up by one callback in the next iteration,
                    # where asyncio's accept task takes its first step: the protocol factory
                    # and the transport's constructor run then, in a copy of this context
                    # (as the task's), and connection_made one iteration later, as there.
                    # No task, coroutine and waiter future per connection (uvloop has none
                    # either); what the task did with an error is done by the callback.
                    self.call_soon(setup, self, protocol_factory, conn, addr, server)
                    continue
                self.create_task(
                    self._accept_connection2(
                        protocol_factory,
                        conn,
                        addr,
                        sslcontext,
                        server,
                        ssl_handshake_timeout,
                        ssl_shutdown_timeout,
                    )
                )

    def _accept_out_of_resources(
        self, exc, protocol_factory, sock, sslcontext, server, backlog,
        ssl_handshake_timeout, ssl_shutdown_timeout,
    ) -> None:
        # Out of fds or memory: stop accepting for a while.
        self.call_exception_handler(
            {
                "message": "socket.accept() out of system resource",
                "exception": exc,
                "socket": trsock.TransportSocket(sock),
            }
        )
        self._remove_reader(sock.fileno())
        self.call_later(
            constants.ACCEPT_RETRY_DELAY,
            self._start_serving,
            protocol_factory,
            sock,
            sslcontext,
            server,
            backlog,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
        )

    def _accepted_setup_failed(self, exc, conn, protocol, transport) -> None:
        # What asyncio's accept task does when an accepted connection cannot be set up:
        # report it in debug mode only, and close the socket if no transport owns it yet.
        if self.get_debug():
            context = {
                "message": "Error on transport creation for incoming connection",
                "exception": exc,
            }
            if protocol is not None:
                context["protocol"] = protocol
            if transport is not None:
                context["transport"] = transport
            self.call_exception_handler(context)
        if transport is None:
            conn.close()  # nobody else owns the socket

    def _accept_plain_connection(self, protocol_factory, conn, addr, server) -> None:
        """_accept_connection2 for a connection without TLS, as a plain callback (the native
        `accept_plain_connection` does the same when `_make_socket_transport` is ours)."""
        protocol = None
        transport = None
        try:
            protocol = protocol_factory()
            # The peer address goes in as it is: the transport makes its extra-info dict only
            # if someone asks for it.
            transport = self._make_socket_transport(conn, protocol, server=server, peername=addr)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._accepted_setup_failed(exc, conn, protocol, transport)

    async def _accept_connection2(
        self,
        protocol_factory,
        conn,
        addr,
        sslcontext=None,
        server=None,
        ssl_handshake_timeout=constants.SSL_HANDSHAKE_TIMEOUT,
        ssl_shutdown_timeout=getattr(constants, "SSL_SHUTDOWN_TIMEOUT", None),
    ) -> None:
        protocol = None
        transport = None
        try:
            protocol = protocol_factory()
            waiter = self.create_future()
            if sslcontext:
                transport = self._make_ssl_transport(
                    conn,
                    protocol,
                    sslcontext,
                    waiter=waiter,
                    server_side=True,
                    extra={"peername": addr},
                    server=server,
                    ssl_handshake_timeout=ssl_handshake_timeout,
                    **ssl_shutdown_kwargs(ssl_shutdown_timeout),
                )
            else:
                # The peer address goes in as it is: the transport makes its extra-info
                # dict only if someone asks for it.
                transport = self._make_socket_transport(
                    conn, protocol, waiter=waiter, server=server, peername=addr
                )
            try:
                await waiter
            except BaseException:
                transport.close()
                raise
            finally:
                waiter = None
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._accepted_setup_failed(exc, conn, protocol, transport)

    # ---- factories ----------------------------------------------------------------------

    async def _create_server_getaddrinfo(self, host, port, family, flags):
        infos = await self._ensure_resolved(
            (host, port), family=family, type=socket.SOCK_STREAM, flags=flags
        )
        if not infos:
            raise OSError(f"getaddrinfo({host!r}) returned empty list")
        return infos

    @since(ssl_shutdown_timeout=(3, 11), keep_alive=(3, 13))
    async def create_server(
        self,
        protocol_factory,
        host=None,
        port=None,
        *,
        family=socket.AF_UNSPEC,
        flags=socket.AI_PASSIVE,
        sock=None,
        backlog=100,
        ssl=None,
        reuse_address=None,
        reuse_port=None,
        keep_alive=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
        start_serving=True,
    ):
        """Create a TCP server listening on host:port (every address host resolves to)."""
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        if ssl_handshake_timeout is not None and ssl is None:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and ssl is None:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        if sock is not None:
            check_ssl_socket(sock)

        if host is not None or port is not None:
            if sock is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            if reuse_address is None:
                reuse_address = os.name == "posix" and sys.platform != "cygwin"
            sockets = []
            if host == "":
                hosts = [None]
            elif isinstance(host, str) or not isinstance(host, collections.abc.Iterable):
                hosts = [host]
            else:
                hosts = host

            fs = [self._create_server_getaddrinfo(h, port, family, flags) for h in hosts]
            infos = await tasks.gather(*fs)
            infos = set(itertools.chain.from_iterable(infos))

            completed = False
            try:
                for af, socktype, proto, _canonname, sa in infos:
                    try:
                        sock = socket.socket(af, socktype, proto)
                    except OSError:
                        if self.get_debug():
                            logger.warning(
                                "create_server() failed to create socket.socket(%r, %r, %r)",
                                af, socktype, proto, exc_info=True,
                            )
                        continue
                    sockets.append(sock)
                    if reuse_address:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, True)
                    if reuse_port:
                        set_reuseport(sock)
                    if keep_alive:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, True)
                    # Bind IPv6 sockets to IPv6 only: the IPv4 address gets its own socket.
                    if _HAS_IPV6 and af == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, True)
                    try:
                        sock.bind(sa)
                    except OSError as err:
                        msg = "error while attempting to bind on address %r: %s" % (
                            sa,
                            (err.strerror or str(err)).lower(),
                        )
                        if err.errno == errno.EADDRNOTAVAIL:
                            # e.g. no IPv6 in this container: skip that address.
                            sockets.pop()
                            sock.close()
                            if self.get_debug():
                                logger.warning(msg)
                            continue
                        raise OSError(err.errno, msg) from None
                if not sockets:
                    raise OSError(
                        "could not bind on any address out of %r" % ([info[4] for info in infos],)
                    )
                completed = True
            finally:
                if not completed:
                    for s in sockets:
                        s.close()
        else:
            if sock is None:
                raise ValueError("Neither host/port nor sock were specified")
            if sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A Stream Socket was expected, got {sock!r}")
            sockets = [sock]

        for s in sockets:
            s.setblocking(False)

        server = Server(
            self, sockets, protocol_factory, ssl, backlog, ssl_handshake_timeout, ssl_shutdown_timeout
        )
        if start_serving:
            server._start_serving()
            await tasks.sleep(0)
        if self.get_debug():
            logger.info("%r is serving", server)
        return server

    @since(ssl_shutdown_timeout=(3, 11), cleanup_socket=(3, 13))
    async def create_unix_server(
        self,
        protocol_factory,
        path=None,
        *,
        sock=None,
        backlog=100,
        ssl=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
        start_serving=True,
        cleanup_socket=sys.version_info >= (3, 13),
    ):
        """Create a Unix domain stream server listening on path (or on sock)."""
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")

        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # Remove a stale socket file left by an earlier server (not an abstract name).
            if path[0] not in (0, "\x00"):
                try:
                    if stat.S_ISSOCK(os.stat(path).st_mode):
                        os.remove(path)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    logger.error("Unable to check or remove stale UNIX socket %r: %r", path, err)
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(errno.EADDRINUSE, f"Address {path!r} is already in use") from None
                raise
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("path was not specified, and no sock specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")

        unix_cleanup = None
        if cleanup_socket:
            name = sock.getsockname()
            if isinstance(name, (str, bytes)) and name and name[0] not in (0, "\x00"):
                try:
                    unix_cleanup = (name, os.stat(name).st_ino)
                except OSError:
                    pass

        sock.setblocking(False)
        server = Server(
            self, [sock], protocol_factory, ssl, backlog, ssl_handshake_timeout, ssl_shutdown_timeout
        )
        server._unix_cleanup = unix_cleanup
        if start_serving:
            server._start_serving()
            await tasks.sleep(0)
        return server


# What `_start_serving` checks before it registers the native `accept_ready`.
_ACCEPT_CONNECTION = ServingMixin._accept_connection
