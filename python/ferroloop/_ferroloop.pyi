"""Type stubs for the native half of ferroloop."""

import sys
from contextvars import Context
from typing import Any, Callable, Optional

from typing_extensions import disjoint_base, final

__all__ = [
    "LoopCore",
    "Handle",
    "TimerHandle",
    "read_bytes",
    "recvfrom_inet",
    "accept_inet",
    "install_stream_fast_paths",
    "spawn",
    "spawn_features",
    "Spawn",
    "install_stream_lifecycle",
    "accept_socket",
    "accept_connections",
    "install_server_class",
    "accept_plain_connection",
    "accept_ready",
    "install_datagram_fast_paths",
    "__version__",
    "_HANDLES_OUTSIDE_GC_COUNT",
]

__version__: str
# Whether Handle/TimerHandle allocations are kept out of the collector's generation count.
_HANDLES_OUTSIDE_GC_COUNT: bool

def read_bytes(fd: int, max_size: int = ...) -> bytes: ...
def recvfrom_inet(fd: int, max_size: int = ...) -> tuple[bytes, Any]: ...
def accept_inet(fd: int) -> tuple[int, Any] | None: ...
def install_stream_fast_paths(cls: type) -> None: ...
def spawn_features() -> tuple[bool, bool]: ...
def spawn(
    paths: list[bytes],
    argv: list[bytes],
    envp: Optional[list[bytes]],
    cwd: Optional[bytes],
    stdio: tuple[int, int, int],
    close_fds: bool,
    restore_signals: bool,
    setsid: bool,
    ignore_internal: bool,
) -> tuple[Spawn, int, int, int, int]: ...
@final
class Spawn:
    @property
    def fd(self) -> int: ...
    def result(self, block: bool = False) -> int | tuple[int, int] | None: ...

def install_stream_lifecycle(
    cls: type,
    socket_type: type,
    buffered_protocol: Any,
    no_queue: Any,
    high_water: Any,
    low_water: Any,
    raw_close: Any,
    closed_extra: Any,
) -> None: ...
def accept_socket(
    fd: int, socket_type: type, family: int, stype: int, proto: int
) -> tuple[Any, Any] | None: ...
def accept_connections(
    lp: Any,
    fd: int,
    socket_type: type,
    family: int,
    stype: int,
    proto: int,
    backlog: int,
    setup: Any,
    protocol_factory: Any,
    server: Any,
) -> None: ...
def install_server_class(cls: type, make_socket_transport: Any, accept_plain: Any) -> None: ...
def accept_ready(
    lp: Any,
    protocol_factory: Any,
    sock: Any,
    sslcontext: Any,
    server: Any,
    backlog: Any,
    ssl_handshake_timeout: Any,
    ssl_shutdown_timeout: Any,
) -> None: ...
def accept_plain_connection(
    lp: Any, protocol_factory: Any, conn: Any, addr: Any, server: Any
) -> None: ...
def install_datagram_fast_paths(cls: type) -> None: ...
@disjoint_base
class Handle:
    def cancel(self) -> None: ...
    def cancelled(self) -> bool: ...
    if sys.version_info >= (3, 12):
        def get_context(self) -> Context: ...

@final
class TimerHandle(Handle):
    def when(self) -> float: ...

@disjoint_base
class LoopCore:
    def __new__(cls, *args: Any, **kwargs: Any) -> LoopCore: ...
    def time(self) -> float: ...
    def _use_python_time(self, enabled: bool) -> None: ...
    def get_debug(self) -> bool: ...
    def set_debug(self, enabled: bool) -> None: ...
    def is_running(self) -> bool: ...
    def is_closed(self) -> bool: ...
    def stop(self) -> None: ...
    def _write_to_self(self) -> None: ...
    def call_soon(self, callback: Callable[..., object], *args: Any, context: Optional[Context] = None) -> Handle: ...
    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any, context: Optional[Context] = None) -> Handle: ...
    def call_later(self, delay: float, callback: Callable[..., object], *args: Any, context: Optional[Context] = None) -> TimerHandle: ...
    def call_at(self, when: float, callback: Callable[..., object], *args: Any, context: Optional[Context] = None) -> TimerHandle: ...
    def create_future(self) -> Any: ...
    def create_task(self, coro: Any, *, name: Optional[str] = None, context: Optional[Context] = None) -> Any: ...
    def set_task_factory(self, factory: Optional[Callable[..., Any]]) -> None: ...
    def get_task_factory(self) -> Optional[Callable[..., Any]]: ...
