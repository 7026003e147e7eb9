"""ferroloop's interim network layer, in Python: asyncio's socket API over the native fd watchers.

One module per concern, so the hot parts can move to native transports one at a time:

- `dns`        getaddrinfo / getnameinfo, numeric addresses resolved inline
- `sock_ops`   loop.sock_* and sock_sendfile; the fd → transport registry
- `transports` the stream (TCP/Unix) transport and the shared socket-transport base
- `datagram`   the datagram transport and create_datagram_endpoint
- `server`     Server, the accept loop, create_server / create_unix_server
- `connect`    create_connection (Happy Eyeballs), unix connections, connect_accepted_socket,
               TLS (ssl= and start_tls) and loop.sendfile
- `tls`        the TLS protocol: asyncio.sslproto's state machine with ferroloop's per-record
               paths

`NetworkMixin` gathers them; `ferroloop.Loop` lists it right after the native core.
"""

from __future__ import annotations

from .connect import ConnectMixin
from .datagram import DatagramMixin, DatagramTransport
from .dns import DnsMixin
from .server import Server, ServingMixin
from .sock_ops import SockOpsMixin
from .transports import StreamTransport

__all__ = ["NetworkMixin", "Server", "StreamTransport", "DatagramTransport"]


class NetworkMixin(ConnectMixin, ServingMixin, DatagramMixin, SockOpsMixin, DnsMixin):
    """The network half of the event loop API."""
