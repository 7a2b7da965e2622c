"""What the in-process benches (`proxy_path.py`, `conn_path.py`) run the proxy's real code with:
a journal and publisher that keep nothing, an asyncio transport over memory, nginx's 1 KiB answer.

The proxy itself is imported from the checkout under test (`--root`); this module only from the
bench's own tree, so an older checkout can be measured with today's harness."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

# An nginx answer, as nginx sends it to a proxy's kept upstream connection (1 KiB body).
RESPONSE_KEPT = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 05 Dec 2026 10:47:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
    b"Last-Modified: Sat, 05 Dec 2026 10:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6932b5a0-400"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 1024
)
# The same answer ending its connection.
RESPONSE_CLOSE = RESPONSE_KEPT.replace(b"Connection: keep-alive", b"Connection: close")


def compiled_note() -> str:
    """How the proxy's hot modules ran (greyproxy/compiled.py), for a bench's result line."""
    import sys

    compiled = sys.modules.get("greyproxy.compiled")
    if compiled is None:
        return "pure Python (no greyproxy/compiled.py)"
    state = compiled.status()
    n = sum(s == "compiled" for s in state.values())
    return f"compiled: {n} of {len(compiled.MODULES)} hot modules" if n else "pure Python"


class NullJournal:
    """Encodes what it is given (as the real journal does on append) and keeps nothing."""

    def __init__(self) -> None:
        self.dumps, self.opt, self.n = orjson.dumps, orjson.OPT_NON_STR_KEYS, 0

    def append(self, kind: str, data: Any, record_id: str | None = None) -> str:
        self.dumps(["id", kind, data], option=self.opt)
        self.n += 1
        return str(self.n)


class NullPublisher:
    def publish(self, *_a: Any, **_k: Any) -> None:
        return None


class MemTransport:
    """Enough of an asyncio transport for `Conn`: writes go to `on_write`, closing calls
    connection_lost soon (as a loop's transport does). Made inside the running loop."""

    def __init__(self, proto: Any, on_write: Any) -> None:
        self.proto, self.on_write, self.closing = proto, on_write, False
        self.loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        self.on_write(bytes(data))

    def writelines(self, data: Any) -> None:
        self.on_write(b"".join(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.proto.connection_lost, None)

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in ("peername", "sockname"):
            return ("127.0.0.1", 40000)
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass
