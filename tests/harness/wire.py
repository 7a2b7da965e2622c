"""An asyncio transport over memory, for tests that drive a `Conn` (the proxy's protocol objects)
without sockets: ``from harness.wire import Wire``."""

from __future__ import annotations

import asyncio
from typing import Any


class Wire:
    """Enough of an asyncio transport for a `Conn`: what is written is kept (and passed to `on_write`)."""

    def __init__(self, proto: Any, on_write: Any = None) -> None:
        self.proto, self.on_write = proto, on_write
        self.out = bytearray()
        self.closing = False
        self.paused = False

    def write(self, data: bytes) -> None:
        if self.closing:
            return
        self.out += data
        if self.on_write is not None:
            self.on_write(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.proto.connection_lost, None)

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass
