"""ferroloop's TLS protocol: the stdlib's `asyncio.sslproto` state machine with faster hot paths.

TLS itself is Python's `ssl` (an `SSLObject` over two `MemoryBIO`s), so every option of the
user's `SSLContext` is honoured. The state machine (handshake, shutdown, timeouts, flow
control, extra info, errors) is the stdlib's `SSLProtocol`, whose methods this class reuses
as they are; only the per-record paths are ferroloop's own:

* The protocol is a plain `asyncio.Protocol` towards the socket transport, not a
  `BufferedProtocol`: ferroloop's transport then reads natively and calls `data_received`
  once per read, instead of the Python `get_buffer` / `recv_into` / `buffer_updated` round.
* `data_received` does `_do_read`'s work in one frame. Decrypting stops as soon as neither
  the incoming BIO nor the SSL object holds anything, instead of reading until
  `SSLWantReadError` (an exception built per record); each read asks for about what can be
  there (at most one record) instead of 256 KiB, and `SSLObject.pending()` (which releases
  the GIL) is asked only after a read that filled what it asked for.
* The application transport's `write` encrypts and hands the record to the socket transport
  in one step when nothing is queued; `data_received` then skips its own flush.

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
    # The most one read asks for: a TLS record carries at most 16 KiB of plaintext, and one
    # byte more makes a read of a full record return less than it asked for.
    _READ_MAX = min(16385, _Stdlib.max_size)

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
                    proto._flushed = False
                    proto._write_backlog.append(data[count:] if count else data)
                    proto._write_buffer_size += size - count
                    proto._do_write()
                elif proto._ssl_writing_paused or proto._app_writing_paused:
                    proto._flushed = False
                    proto._process_outgoing()
                else:
                    # _process_outgoing, inlined for the common case. `read()` of an empty
                    # BIO is as cheap as asking `pending`, and afterwards the BIO is empty
                    # and the backlog too, so the write buffer size is _write_buffer_size.
                    outgoing = proto._outgoing.read()
                    if outgoing:
                        proto._transport.write(outgoing)
                    proto._flushed = True
                    if proto._write_buffer_size >= proto._outgoing_high_water:
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
            # Set by the application transport's direct write once it has emptied the
            # outgoing BIO (data_received then needs no flush of its own).
            self._flushed = False
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
            incoming = self._incoming
            incoming.write(data)
            state = self._state
            if state is _WRAPPED:
                if self._app_reading_paused or self._app_protocol_is_buffer:
                    self._do_read()
                    return
                # _do_read and _do_read__copied for the common case, in one frame; what
                # they do, in the same order (see _read_records for the reading).
                try:
                    # Everything but data that arrived while app reading was paused was
                    # read before, so the BIO holds what just arrived (a guess is enough).
                    # _read_records, inlined (a frame and a tuple less per read).
                    sslobj = self._ssl_raw
                    want = len(data)
                    first = None
                    rest = None
                    eof = False
                    left = None
                    try:
                        while True:
                            if want <= 0 or want > _READ_MAX:
                                want = _READ_MAX
                            chunk = sslobj.read(want)
                            if not chunk:
                                eof = True
                                left = None
                                break
                            if first is None:
                                first = chunk
                            elif rest is None:
                                rest = [first, chunk]
                            else:
                                rest.append(chunk)
                            left = incoming.pending
                            if len(chunk) < want:
                                if not left:
                                    break
                                want = left
                            else:
                                want = left + sslobj.pending()
                                if not want:
                                    break
                    except _AGAIN:
                        left = None
                    self._flushed = False
                    if rest is not None:
                        self._app_protocol.data_received(b"".join(rest))
                    elif first is not None:
                        self._app_protocol.data_received(first)
                    if eof:
                        # close_notify
                        self._call_eof_received()
                        self._start_shutdown()
                    # _do_write or _process_outgoing (and _control_app_writing)
                    if self._write_backlog:
                        self._do_write()
                    elif self._ssl_writing_paused:
                        self._process_outgoing()
                    else:
                        # The application's write emptied the outgoing BIO, and since then
                        # nothing wrote to the SSL object unless the state changed.
                        if not self._flushed or self._state is not _WRAPPED:
                            outgoing = self._outgoing.read()
                            if outgoing:
                                self._transport.write(outgoing)
                        size = self._write_buffer_size
                        if self._app_writing_paused:
                            if size <= self._outgoing_low_water:
                                self._control_app_writing()
                        elif size >= self._outgoing_high_water:
                            self._control_app_writing()
                    # _control_ssl_reading. While the state stays WRAPPED nothing but this
                    # method reads the incoming BIO, so what the read left is still there.
                    if left is None or self._state is not _WRAPPED:
                        left = incoming.pending
                    if self._ssl_reading_paused:
                        if left <= self._incoming_low_water:
                            self._control_ssl_reading()
                    elif left >= self._incoming_high_water:
                        self._control_ssl_reading()
                except Exception as ex:
                    self._fatal_error(ex, "Fatal error on SSL protocol")
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
            incoming = self._incoming
            first, rest, eof, _ = self._read_records(incoming, incoming.pending)
            if rest is not None:
                self._app_protocol.data_received(b"".join(rest))
            elif first is not None:
                self._app_protocol.data_received(first)
            if eof:
                # close_notify
                self._call_eof_received()
                self._start_shutdown()

        def _read_records(self, incoming, want):
            """Decrypt what the incoming BIO holds: (first chunk, [all chunks] if more than
            one, close_notify seen, bytes left in the BIO or None if not known).

            The stdlib reads until `SSLWantReadError` (an exception built per record); this
            stops as soon as neither the BIO nor the SSL object holds anything, since another
            read could only raise it (a partial record needs more bytes from the socket, and
            every new byte comes with a new data_received).

            Each read asks for about what can be there (`want`: what just arrived, then what
            the BIO holds), at most one record's worth, instead of max_size (256 KiB, which
            malloc serves with mmap/munmap). The size only decides how much one read returns,
            never whether the loop goes on: a read that returns less than it asked for has
            emptied its record, and one record is all an SSL_read decrypts (Python's ssl has
            no read-ahead), so then the SSL object holds nothing more; only after a full read
            is `pending()` (a call that releases the GIL) asked.
            """
            sslobj = self._ssl_raw
            first = None
            rest = None
            eof = False
            left = None
            try:
                while True:
                    if want <= 0 or want > _READ_MAX:
                        want = _READ_MAX
                    chunk = sslobj.read(want)
                    if not chunk:
                        eof = True
                        left = None
                        break
                    if first is None:
                        first = chunk
                    elif rest is None:
                        rest = [first, chunk]
                    else:
                        rest.append(chunk)
                    left = incoming.pending
                    if len(chunk) < want:
                        if not left:
                            break
                        want = left
                    else:
                        want = left + sslobj.pending()
                        if not want:
                            break
            except _AGAIN:
                left = None
            return first, rest, eof, left

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
