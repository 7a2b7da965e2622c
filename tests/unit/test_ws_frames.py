"""The recording-only WebSocket frame reader (services/proxy/wsframes.py), fuzzed with hypothesis."""

from __future__ import annotations

import os
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.proxy.wsframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    FrameParser,
    MessageAssembler,
    WsProtocolError,
    deflate_negotiated,
)
from harness.fuzz import examples

FUZZ = settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None, rsv1: bool = False) -> bytes:
    """Encode one frame (the reference encoder the parser is checked against)."""
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes([b0, mbit | n])
    elif n < 65536:
        head = bytes([b0, mbit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, mbit | 127]) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def deflate(data: bytes, c: "zlib._Compress") -> bytes:  # noqa: F821 - zlib's private type name
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def split_feed(parser: FrameParser, data: bytes, cuts: list[int]) -> list:
    frames, pos = [], 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        frames.extend(parser.feed(data[pos:cut]))
        pos = cut
    return frames


def test_basic_frames_masked_and_not() -> None:
    p = FrameParser()
    data = frame(OP_TEXT, b"hello", mask=b"\x01\x02\x03\x04") + frame(OP_BINARY, b"\x00\xff") + frame(OP_PING, b"")
    frames = p.feed(data)
    assert [(f.opcode, f.payload, f.fin) for f in frames] == [
        (OP_TEXT, b"hello", True),
        (OP_BINARY, b"\x00\xff", True),
        (OP_PING, b"", True),
    ]


@pytest.mark.parametrize("size", [125, 126, 65535, 65536, 70000])
def test_length_encodings(size: int) -> None:
    payload = os.urandom(size)
    frames = FrameParser().feed(frame(OP_BINARY, payload, mask=b"abcd"))
    assert len(frames) == 1 and frames[0].payload == payload and frames[0].length == size


def test_payload_capped_but_length_true() -> None:
    p = FrameParser(limit=10)
    frames = p.feed(frame(OP_TEXT, b"x" * 100, mask=b"wxyz") + frame(OP_TEXT, b"next"))
    assert frames[0].payload == b"x" * 10 and frames[0].length == 100
    assert frames[1].payload == b"next"  # the stream stays in sync past a capped frame


@given(
    messages=st.lists(
        st.tuples(st.sampled_from([OP_TEXT, OP_BINARY]), st.binary(max_size=300), st.booleans()), min_size=1, max_size=8
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
@FUZZ
def test_any_split_gives_the_same_frames(messages, cuts) -> None:  # noqa: ANN001
    data = b"".join(frame(op, pl, mask=os.urandom(4) if masked else None) for op, pl, masked in messages)
    frames = split_feed(FrameParser(), data, cuts)
    assert [(f.opcode, f.payload) for f in frames] == [(op, pl) for op, pl, _ in messages]


@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0, max_value=3000), max_size=8))
@FUZZ
def test_garbage_never_crashes(data: bytes, cuts: list[int]) -> None:
    p = FrameParser(limit=256)
    try:
        for f in split_feed(p, data, cuts):
            assert len(f.payload) <= 256
    except WsProtocolError:
        pass


def test_protocol_errors() -> None:
    with pytest.raises(WsProtocolError):
        FrameParser().feed(bytes([0x83, 0x00]))  # reserved opcode
    with pytest.raises(WsProtocolError):
        FrameParser().feed(bytes([0x89, 126, 0, 200]))  # long ping
    with pytest.raises(WsProtocolError):
        FrameParser().feed(bytes([0x09, 0x00]))  # fragmented control frame
    with pytest.raises(WsProtocolError):
        FrameParser().feed(bytes([0xA1, 0x00]))  # RSV2
    with pytest.raises(WsProtocolError):
        MessageAssembler(False).feed(FrameParser().feed(frame(OP_CONT, b"x"))[0])


def test_fragmented_message_with_interleaved_control() -> None:
    p, asm = FrameParser(), MessageAssembler(deflate=False)
    data = (
        frame(OP_TEXT, b"hel", fin=False, mask=b"1234")
        + frame(OP_PING, b"p", mask=b"5678")
        + frame(OP_CONT, b"lo", mask=b"9abc")
    )
    msgs = [m for f in p.feed(data) if (m := asm.feed(f)) is not None]
    assert len(msgs) == 1 and msgs[0].opcode == OP_TEXT and msgs[0].payload == b"hello" and msgs[0].size == 5


def test_permessage_deflate_with_context_takeover() -> None:
    c = zlib.compressobj(wbits=-15)
    p, asm = FrameParser(), MessageAssembler(deflate=True)
    texts = [b'{"type":"response.create","n":1}', b'{"type":"response.create","n":2}', b"plain"]
    data = frame(OP_TEXT, deflate(texts[0], c), rsv1=True, mask=b"abcd")
    second = deflate(texts[1], c)  # refers back into the first message's window
    data += frame(OP_TEXT, second[:5], fin=False, rsv1=True, mask=b"efgh") + frame(OP_CONT, second[5:], mask=b"ijkl")
    data += frame(OP_TEXT, texts[2], mask=b"mnop")  # an uncompressed message in between is allowed
    msgs = [m for f in p.feed(data) if (m := asm.feed(f)) is not None]
    assert [m.payload for m in msgs] == texts
    assert [m.compressed for m in msgs] == [True, True, False]
    assert msgs[1].size == len(second)


def test_deflate_is_only_undone_when_negotiated() -> None:
    payload = deflate(b"abc", zlib.compressobj(wbits=-15))
    msg = MessageAssembler(deflate=False).feed(FrameParser().feed(frame(OP_BINARY, payload, rsv1=True))[0])
    assert msg is not None and msg.payload == payload and not msg.compressed


def test_close_frame_is_not_a_message() -> None:
    assert MessageAssembler(False).feed(FrameParser().feed(frame(OP_CLOSE, b"\x03\xe8"))[0]) is None


def test_deflate_negotiated() -> None:
    assert deflate_negotiated("permessage-deflate; server_no_context_takeover")
    assert deflate_negotiated("x-foo, permessage-deflate")
    assert not deflate_negotiated(None) and not deflate_negotiated("x-webkit-deflate-frame")
