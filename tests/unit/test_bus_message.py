"""Bus wire format: two frames (topic, orjson payload); anything else is BadMessage, never a crash."""

from __future__ import annotations

import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import message, topics
from bus.message import BadMessage
from harness.fuzz import examples

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=20,
)


def test_encode_shape() -> None:
    before = time.time()
    frames = message.encode(topics.LOG_NEW, {"id": 1, "host": "example.com"}, "recorder", 7)
    assert len(frames) == 2 and all(isinstance(f, bytes) for f in frames)
    assert frames[0] == b"log.new"
    payload = orjson.loads(frames[1])
    assert set(payload) == {"type", "data", "ts", "source", "seq"}
    assert payload["type"] == "log.new"
    assert payload["data"] == {"id": 1, "host": "example.com"}
    assert payload["source"] == "recorder" and payload["seq"] == 7
    assert before <= payload["ts"] <= time.time()


def test_round_trip() -> None:
    frames = message.encode(topics.PENDING_CREATED, {"a": [1, 2.5, None, "x"]}, "proxy", 1)
    msg = message.decode(frames)
    assert msg["type"] == topics.PENDING_CREATED
    assert msg["data"] == {"a": [1, 2.5, None, "x"]}
    assert msg["source"] == "proxy" and msg["seq"] == 1


def test_non_string_keys_are_encoded() -> None:
    msg = message.decode(message.encode("t", {1: "one", 2: {3: "x"}}, "s", 1))
    assert msg["data"] == {"1": "one", "2": {"3": "x"}}


def test_topic_prefix_matching_is_by_first_frame() -> None:
    # Subscribers filter on the first frame's prefix: the topic must be exactly its bytes.
    frames = message.encode(topics.SESSION_HEARTBEAT, {}, "s", 1)
    assert frames[0].startswith(b"session.")
    assert not frames[0].startswith(topics.SERVICE_HEARTBEAT.encode())


def test_topics_are_unique_and_partitioned() -> None:
    assert len(set(topics.ALL)) == len(topics.ALL)
    assert not set(topics.PUBLIC) & set(topics.INTERNAL)
    for t in topics.ALL:
        assert t == t.strip() and t.isascii() and "." in t


@pytest.mark.parametrize(
    "frames,why",
    [
        ([], "expected 2 frames"),
        ([b"t"], "expected 2 frames"),
        ([b"t", b"{}", b"extra"], "expected 2 frames"),
        ([b"t", b""], "not JSON"),
        ([b"t", b"{not json"], "not JSON"),
        ([b"t", b"\xff\xfe"], "not JSON"),
        ([b"t", b"[1, 2]"], "type/data"),
        ([b"t", b"null"], "type/data"),
        ([b"t", b'"string"'], "type/data"),
        ([b"t", b'{"type": "t"}'], "type/data"),
        ([b"t", b'{"data": 1}'], "type/data"),
    ],
)
def test_malformed_frames(frames: list[bytes], why: str) -> None:
    with pytest.raises(BadMessage, match=why):
        message.decode(frames)


def test_bad_message_is_a_value_error() -> None:
    assert issubclass(BadMessage, ValueError)


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_decode_arbitrary_frames_only_raises_bad_message(frames: list[bytes]) -> None:
    try:
        msg = message.decode(frames)
    except BadMessage:
        return
    assert isinstance(msg, dict) and "type" in msg and "data" in msg


@settings(max_examples=examples(100), deadline=None)
@given(json_values, st.binary(max_size=16))
def test_decode_arbitrary_json_only_raises_bad_message(value, topic: bytes) -> None:
    for body in (orjson.dumps(value), orjson.dumps({"type": "t", "data": value}), orjson.dumps(value)[:-1]):
        try:
            msg = message.decode([topic, body])
        except BadMessage:
            continue
        assert isinstance(msg, dict)


@settings(max_examples=examples(100), deadline=None)
@given(st.text(min_size=1, max_size=40), json_values, st.text(max_size=20), st.integers(0, 2**53))
def test_round_trip_any_payload(topic: str, data, source: str, seq: int) -> None:
    msg = message.decode(message.encode(topic, data, source, seq))
    assert msg["type"] == topic
    assert msg["data"] == data
    assert msg["source"] == source and msg["seq"] == seq
