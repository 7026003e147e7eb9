"""ferroloop's TLS protocol: the stdlib's `asyncio.sslproto` state machine with faster hot paths.

TLS itself is Python's `ssl` (an `SSLObject` over two `MemoryBIO`s), so every option of the
user's `SSLContext` is honoured. The state machine (handshake, shutdown, timeouts, flow
control, extra info, errors) is the stdlib's `SSLProtocol`, whose methods this class reuses
as they are; only the per-record paths are ferroloop's own:

* The protocol is a plain `asyncio.Protocol` towards the socket transport, not a
  `BufferedProtocol`: ferroloop's transport then reads natively and calls `data_received`
  once per read, instead of the Python `get_buffer` / `recv_into` / `buffer_updated` round.
* Decrypting stops as soon as neither the incoming BIO nor the SSL object holds anything
  (`MemoryBIO.pending`, `SSLObject.pending()`), instead of reading until `SSLWantReadError`
  (an exception built per record), and each read asks for about what can be there instead
  of 256 KiB.
* The application transport's `write` encrypts and hands the record to the socket transport
  in one step when nothing is queued.

Everything else (and every uncommon state) goes through the stdlib methods, so behaviour
stays asyncio's. This needs the 3.11+ `sslproto` (the memory-BIO state machine); on older
Pythons `SSLProtocol` below is the stdlib class itself.
"""

from __future__ import annotations

from asyncio import protocols, sslproto

try:
    import ssl
except ImportError:  # pragma: no cover
    ssl = None

__all__ = ["SSLProtocol", "FAST"]

# The memory-BIO state machine of 3.11+ (`SSLProtocolState`); 3.9/3.10 have the older
# `_SSLPipe` design, for which the stdlib class is used unchanged.
FAST = ssl is not None and hasattr(sslproto, "SSLProtocolState")

if not FAST:  # pragma: no cover - Python < 3.11 or no ssl module
    SSLProtocol = sslproto.SSLProtocol
else:
    _State = sslproto.SSLProtocolState
    _WRAPPED = _State.WRAPPED
    _FLUSHING = _State.FLUSHING
    _DO_HANDSHAKE = _State.DO_HANDSHAKE
    _SHUTDOWN = _State.SHUTDOWN
    _AGAIN = sslproto.SSLAgainErrors
    _Stdlib = sslproto.SSLProtocol

    class _SSLProtocolTransport(sslproto._SSLProtocolTransport):
        """The transport the application sees; `write` has a direct path when idle."""

        def write(self, data):
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(
                    f"data: expecting a bytes-like instance, got {type(data).__name__}"
                )
            if not data:
                return
            proto = self._ssl_protocol
            if proto._state is not _WRAPPED or proto._write_backlog:
                # Closing, closed, handshaking or already queued: the stdlib path.
                proto._write_appdata((data,))
                return
            try:
                count = proto._ssl_raw.write(data)
            except _AGAIN:
                count = 0
            except Exception as ex:
                # _write_appdata's handling of a failing _do_write.
                proto._write_backlog.append(data)
                proto._write_buffer_size += len(data)
                proto._fatal_error(ex, "Fatal error on SSL protocol")
                return
            size = len(data)
            try:
                if count < size:
                    # The SSL object did not take it all (a renegotiation in progress): queue
                    # the rest and let _do_write carry on as the stdlib path would.
                    proto._write_backlog.append(data[count:] if count else data)
                    proto._write_buffer_size += size - count
                    proto._do_write()
                elif proto._ssl_writing_paused or proto._app_writing_paused:
                    proto._process_outgoing()
                else:
                    # _process_outgoing, inlined for the common case.
                    outgoing = proto._outgoing
                    if outgoing.pending:
                        proto._transport.write(outgoing.read())
                    if outgoing.pending + proto._write_buffer_size >= proto._outgoing_high_water:
                        proto._control_app_writing()
            except Exception as ex:
                proto._fatal_error(ex, "Fatal error on SSL protocol")

    _SSLObject = ssl.SSLObject

    class SSLProtocol(protocols.Protocol):
        """The stdlib's `asyncio.sslproto.SSLProtocol` with ferroloop's hot paths.

        A plain Protocol for the socket transport (`data_received`), so that ferroloop's
        native read path feeds it; the stdlib's `get_buffer`/`buffer_updated` remain for
        transports that prefer them (they are the same code as the stdlib's).
        """

        def __init__(self, *args, **kwargs):
            _Stdlib.__init__(self, *args, **kwargs)
            # The per-record calls go to the C object under `ssl.SSLObject`, whose read/write/
            # pending are one-line forwarders; a context with its own `sslobject_class` keeps
            # its methods.
            sslobj = self._sslobj
            if type(sslobj) is _SSLObject:
                self._ssl_raw = sslobj._sslobj
            else:
                self._ssl_raw = sslobj

        def _get_app_transport(self):
            if self._app_transport is None:
                if self._app_transport_created:
                    raise RuntimeError("Creating _SSLProtocolTransport twice")
                self._app_transport = _SSLProtocolTransport(self._loop, self)
                self._app_transport_created = True
            return self._app_transport

        # ---- incoming -------------------------------------------------------------------

        def data_received(self, data):
            self._incoming.write(data)
            state = self._state
            if state is _WRAPPED:
                self._do_read()
            elif state is _DO_HANDSHAKE:
                self._do_handshake()
            elif state is _FLUSHING:
                self._do_flush()
            elif state is _SHUTDOWN:
                self._do_shutdown()

        def _do_read(self):
            state = self._state
            if state is not _WRAPPED and state is not _FLUSHING:
                return
            try:
                if not self._app_reading_paused:
                    if self._app_protocol_is_buffer:
                        self._do_read__buffered()
                    else:
                        self._do_read__copied()
                    if self._write_backlog:
                        self._do_write()
                    elif (
                        self._outgoing.pending
                        or self._app_writing_paused
                        or self._write_buffer_size >= self._outgoing_high_water
                    ):
                        # Otherwise _process_outgoing would have nothing to send or control.
                        self._process_outgoing()
                pending = self._incoming.pending
                if self._ssl_reading_paused:
                    if pending <= self._incoming_low_water:
                        self._control_ssl_reading()
                elif pending >= self._incoming_high_water:
                    self._control_ssl_reading()
            except Exception as ex:
                self._fatal_error(ex, "Fatal error on SSL protocol")

        def _do_read__copied(self):
            # Decrypt what the incoming BIO holds and deliver it in one data_received call.
            # Once a record has been read, stop when neither the BIO nor the SSL object has
            # anything left: another read could only raise SSLWantReadError (a partial record
            # needs more bytes from the socket, and every new byte comes with a new call).
            sslobj = self._ssl_raw
            incoming = self._incoming
            max_size = self.max_size
            first = None
            rest = None
            eof = False
            try:
                while True:
                    # Plaintext never exceeds the ciphertext it comes from; a record partly
                    # consumed earlier may hold a little more, which the next turn reads.
                    want = incoming.pending + sslobj.pending()
                    if want <= 0 or want > max_size:
                        want = max_size
                    chunk = sslobj.read(want)
                    if not chunk:
                        eof = True
                        break
                    if first is None:
                        first = chunk
                    elif rest is None:
                        rest = [first, chunk]
                    else:
                        rest.append(chunk)
                    if not incoming.pending and not sslobj.pending():
                        break
            except _AGAIN:
                pass
            if rest is not None:
                self._app_protocol.data_received(b"".join(rest))
            elif first is not None:
                self._app_protocol.data_received(first)
            if eof:
                # close_notify
                self._call_eof_received()
                self._start_shutdown()

        # ---- outgoing -------------------------------------------------------------------

        def _process_outgoing(self):
            if not self._ssl_writing_paused:
                outgoing = self._outgoing
                if outgoing.pending:
                    self._transport.write(outgoing.read())
            size = self._outgoing.pending + self._write_buffer_size
            if self._app_writing_paused:
                if size <= self._outgoing_low_water:
                    self._control_app_writing()
            elif size >= self._outgoing_high_water:
                self._control_app_writing()

    # Everything not defined above is the stdlib's, used as is (the methods are plain
    # functions; they only touch attributes both classes share).
    for _name, _value in vars(_Stdlib).items():
        if _name in ("__dict__", "__weakref__", "__module__", "__qualname__", "__doc__"):
            continue
        if _name not in SSLProtocol.__dict__:
            setattr(SSLProtocol, _name, _value)
    del _name, _value
