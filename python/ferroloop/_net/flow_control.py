"""Write-side flow control, shared by the socket transports and the write pipe transport.

asyncio's contract: once the write buffer grows above the high-water mark the protocol's
pause_writing() is called, once it drains to the low-water mark or below resume_writing() is
called, each exactly once per crossing. A failing callback goes to the loop's exception handler
with asyncio's context; the transport carries on.

A class using `WriteFlowControl` defines `get_write_buffer_size()` (what it counts as buffered:
bytes queued by a stream, datagram bytes, the length of a pipe's bytearray) and initialises
`_protocol_paused = False`, `_high_water = DEFAULT_HIGH_WATER` and
`_low_water = DEFAULT_LOW_WATER` itself (in its own slots where it has them), in its `__init__`.
"""

from __future__ import annotations

DEFAULT_HIGH_WATER = 64 * 1024
DEFAULT_LOW_WATER = DEFAULT_HIGH_WATER // 4


class WriteFlowControl:
    """The water marks and pause_writing()/resume_writing() calls of a write transport."""

    # No layout of its own: the transports using it keep their `__slots__` (or `__dict__`).
    __slots__ = ()

    def get_write_buffer_limits(self):
        return (self._low_water, self._high_water)

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self._set_write_buffer_limits(high=high, low=low)
        self._maybe_pause_protocol()

    def _set_write_buffer_limits(self, high=None, low=None) -> None:
        if high is None and low is None:
            # The shared default ints: 16384 is no cached small int, and each transport
            # computing its own would hold 32 bytes more.
            self._high_water = DEFAULT_HIGH_WATER
            self._low_water = DEFAULT_LOW_WATER
            return
        if high is None:
            high = 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water = high
        self._low_water = low

    def _maybe_pause_protocol(self) -> None:
        if self.get_write_buffer_size() <= self._high_water or self._protocol_paused:
            return
        self._protocol_paused = True
        self._call_protocol_writing("pause_writing")

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self.get_write_buffer_size() <= self._low_water:
            self._protocol_paused = False
            self._call_protocol_writing("resume_writing")

    def _call_protocol_writing(self, name: str) -> None:
        # The method is looked up inside the try, as asyncio does: a protocol without it is
        # reported to the exception handler too.
        try:
            getattr(self._protocol, name)()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler(
                {
                    "message": f"protocol.{name}() failed",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
