"""Sans-I/O WebSocket (RFC 6455) frame reading, for recording only: the relay forwards the bytes
untouched; this sees a copy and yields frames, then whole data messages (permessage-deflate
inflated, RFC 7692). Payload copies are capped; sizes are always the true ones.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

__all__ = ["Frame", "FrameParser", "Message", "MessageAssembler", "WsProtocolError", "deflate_negotiated"]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPS = (OP_CONT, OP_TEXT, OP_BINARY)
_CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)
_DEFLATE_TAIL = b"\x00\x00\xff\xff"
DEFAULT_LIMIT = 2 * 1024 * 1024


class WsProtocolError(Exception):
    """The byte stream is not valid RFC 6455 framing (recording stops; relaying goes on)."""


@dataclass(slots=True)
class Frame:
    fin: bool
    rsv1: bool
    opcode: int
    length: int  # true payload length
    payload: bytes  # unmasked, at most the parser's limit


@dataclass(slots=True)
class Message:
    opcode: int  # OP_TEXT or OP_BINARY
    size: int  # true size on the wire (compressed size when deflated)
    payload: bytes  # inflated when compressed, capped
    compressed: bool
    truncated: bool


def _unmask(data: bytes, mask: bytes, offset: int) -> bytes:
    """XOR with the 4-byte key starting at key position `offset` (one big-int XOR, C speed)."""
    n = len(data)
    if not n:
        return b""
    k = offset & 3
    key = (mask[k:] + mask[:k]) * (n // 4 + 1)
    return (int.from_bytes(data, "big") ^ int.from_bytes(key[:n], "big")).to_bytes(n, "big")


class FrameParser:
    """Bytes in (any split), frames out. Memory is bounded by `limit` per frame."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._head = bytearray()
        self._frame: Frame | None = None
        self._mask: bytes | None = None
        self._remaining = 0
        self._seen = 0
        self._payload = bytearray()

    def _parse_head(self) -> int | None:
        """Header length when complete (and the frame is set up), else None."""
        h = self._head
        if len(h) < 2:
            return None
        b0, b1 = h[0], h[1]
        need = 2 + (2 if (b1 & 0x7F) == 126 else 8 if (b1 & 0x7F) == 127 else 0) + (4 if b1 & 0x80 else 0)
        if len(h) < need:
            return None
        opcode = b0 & 0x0F
        fin = bool(b0 & 0x80)
        if opcode not in _DATA_OPS and opcode not in _CONTROL_OPS:
            raise WsProtocolError(f"reserved opcode {opcode:#x}")
        if b0 & 0x30:
            raise WsProtocolError("RSV2/RSV3 set without an extension that defines them")
        length = b1 & 0x7F
        pos = 2
        if length == 126:
            length = int.from_bytes(h[2:4], "big")
            pos = 4
        elif length == 127:
            length = int.from_bytes(h[2:10], "big")
            if length >> 63:
                raise WsProtocolError("64-bit length with the high bit set")
            pos = 10
        if opcode in _CONTROL_OPS and (length > 125 or not fin):
            raise WsProtocolError("control frames must be short and unfragmented")
        self._mask = bytes(h[pos : pos + 4]) if b1 & 0x80 else None
        self._frame = Frame(fin, bool(b0 & 0x40), opcode, length, b"")
        self._remaining = length
        self._seen = 0
        self._payload = bytearray()
        return need

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        out: list[Frame] = []
        view = memoryview(data)
        pos, n = 0, len(view)
        while True:
            if self._frame is None:
                # Header bytes arrive in any split: take at most the 14 a header can need.
                take = min(14 - len(self._head), n - pos)
                self._head += view[pos : pos + take]
                used = self._parse_head()
                if used is None:
                    return out
                pos += used - (len(self._head) - take)
                self._head.clear()
            frame = self._frame
            assert frame is not None
            take = min(self._remaining, n - pos)
            room = self.limit - len(self._payload)
            if room > 0 and take:
                piece = bytes(view[pos : pos + min(take, room)])
                self._payload += _unmask(piece, self._mask, self._seen) if self._mask else piece
            self._seen += take
            self._remaining -= take
            pos += take
            if self._remaining:
                return out
            frame.payload = bytes(self._payload)
            out.append(frame)
            self._frame = None
            if pos >= n:
                return out


def deflate_negotiated(extensions_header: str | None) -> bool:
    """Whether the server's Sec-WebSocket-Extensions answer accepted permessage-deflate."""
    if not extensions_header:
        return False
    return any(ext.split(";", 1)[0].strip().lower() == "permessage-deflate" for ext in extensions_header.split(","))


class MessageAssembler:
    """Frames of one direction → whole data messages; control frames are skipped.

    The inflater lives as long as the direction: with context takeover a message may refer to
    earlier ones, and without it a persistent inflater is still correct.
    """

    def __init__(self, deflate: bool, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if deflate else None
        self._broken = False  # an inflate failure or a lost compressed byte: sizes only from then on
        self._opcode: int | None = None
        self._compressed = False
        self._size = 0
        self._parts = bytearray()
        self._lost = False

    def feed(self, frame: Frame) -> Message | None:
        if frame.opcode in _CONTROL_OPS:
            return None
        if frame.opcode == OP_CONT:
            if self._opcode is None:
                raise WsProtocolError("continuation frame without a message")
        else:
            if self._opcode is not None:
                raise WsProtocolError("new data frame inside a fragmented message")
            self._opcode, self._compressed = frame.opcode, frame.rsv1 and self._inflater is not None
            self._size, self._parts, self._lost = 0, bytearray(), False
        self._size += frame.length
        room = self.limit - len(self._parts)
        self._parts += frame.payload[: max(room, 0)]
        self._lost = self._lost or frame.length > len(frame.payload) or len(frame.payload) > max(room, 0)
        if not frame.fin:
            return None
        opcode, self._opcode = self._opcode, None
        payload, truncated = bytes(self._parts), self._lost
        if self._compressed:
            payload, truncated = self._inflate(payload, truncated)
        return Message(opcode, self._size, payload, self._compressed, truncated)

    def _inflate(self, data: bytes, lost: bool) -> tuple[bytes, bool]:
        if self._broken or lost or self._inflater is None:
            self._broken = True  # the shared window is incomplete now: later messages cannot be inflated
            return b"", True
        out = bytearray()
        d = self._inflater
        try:
            buf = data + _DEFLATE_TAIL
            while buf:
                chunk = d.decompress(buf, 256 * 1024)
                if len(out) < self.limit:
                    out += chunk[: self.limit - len(out)]
                buf = d.unconsumed_tail  # keep inflating past the cap: the window must stay whole
        except zlib.error:
            self._broken = True
            return b"", True
        return bytes(out), len(out) >= self.limit
