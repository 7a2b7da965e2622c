"""JournalWriter's outbox without sockets: bounds (records and bytes, in flight included),
what is dropped, and batches bounded by bytes as well as by count."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest

from bus.journal import JournalWriter


class _FakeSocket:
    """Accepts every send (as a connected recorder that never acks); keeps the bodies."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.bodies: list[bytes] = []

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> asyncio.Future:
        self.bodies.append(frames[-1])
        fut: asyncio.Future = self.loop.create_future()
        fut.set_result(None)
        return fut

    def close(self, linger: int | None = None) -> None:
        pass


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


class _Writer(JournalWriter):
    """A JournalWriter whose methods a test may replace on the instance (the class itself is an
    extension type when compiled, bus/journal.pxd)."""


def _writer(**kw) -> JournalWriter:
    return _Writer("ipc:///nonexistent", **kw)


def _ids(body: bytes) -> list[int | str]:  # the records as sent: their sequence numbers
    return [r[0] for r in orjson.loads(body)["s"]]


def test_oldest_unsent_records_are_dropped_past_the_record_bound(caplog) -> None:
    w = _writer(outbox_limit=10)
    with caplog.at_level(logging.WARNING, "greyproxy.journal"):
        ids = [w.append("log", {"i": i}) for i in range(15)]
    st = w.stats()
    assert st["queued"] == 10 and st["dropped"] == 5
    assert [orjson.loads(r)[0] for r in w._queue] == ids[5:]  # the newest ten are kept
    assert any("dropped" in r.getMessage() for r in caplog.records)


def test_bound_holds_when_every_record_is_in_flight(loop) -> None:
    w = _writer(outbox_limit=10, batch_size=5, window=2)
    w._sock = _FakeSocket(loop)  # type: ignore[assignment]
    for i in range(10):
        w.append("log", {"i": i})
    w._fill(0.0)
    assert w.stats()["queued"] == 0 and w.stats()["inflight"] == 10
    # Nothing unsent to give up: the new record is the one dropped, memory stays bounded.
    for i in range(1000):
        w.append("log", {"i": 100 + i})
    st = w.stats()
    assert st["queued"] + st["inflight"] <= 10
    assert st["dropped"] == 1000
    # After a resend (ack timeout) everything goes back to the queue: still within the bound.
    w._reset()
    st = w.stats()
    assert st["queued"] == 10 and st["inflight"] == 0 and st["resent"] == 10


def test_byte_bound_counts_in_flight_records(loop) -> None:
    w = _writer(outbox_bytes=10_000, batch_size=500, window=8)
    w._sock = _FakeSocket(loop)  # type: ignore[assignment]
    blob = "x" * 900
    for i in range(50):
        w.append("transaction", {"i": i, "body": blob})
        w._fill(0.0)
        assert w.stats()["outbox_bytes"] <= 10_000
    assert w.dropped > 0
    assert w.stats()["queued"] + w.stats()["inflight"] <= 11


def test_batches_are_bounded_by_bytes_and_a_huge_record_travels_alone(loop) -> None:
    w = _writer(batch_size=500, batch_bytes=10_000, window=100)
    sock = _FakeSocket(loop)
    w._sock = sock  # type: ignore[assignment]
    small = [w.append("log", {"i": i, "pad": "p" * 1000}) for i in range(30)]
    huge = w.append("transaction", {"body": "h" * 50_000})
    tail = [w.append("log", {"i": i}) for i in range(3)]
    w._fill(0.0)
    assert w.stats()["queued"] == 0
    sent: list[str] = []
    for body in sock.bodies:
        ids = _ids(body)
        sent.extend(ids)
        if huge in ids:
            assert ids == [huge]  # bigger than a batch: on its own
        else:
            assert len(body) <= 10_000 + 64, len(body)
    assert sent == small + [huge] + tail  # order kept, nothing lost
    assert len(sock.bodies) >= 5
    # The wire format the consumer reads: {"b": id, "w": writer, "s": [[sequence, kind, data], ...]}.
    first = orjson.loads(sock.bodies[0])
    assert isinstance(first["b"], int) and first["w"] == w.writer
    assert first["s"][0] == [small[0], "log", {"i": 0, "pad": "p" * 1000}]


def test_count_bound_still_batches_by_count(loop) -> None:
    w = _writer(batch_size=7, window=100)
    sock = _FakeSocket(loop)
    w._sock = sock  # type: ignore[assignment]
    for i in range(20):
        w.append("log", {"i": i})
    w._fill(0.0)
    assert [len(_ids(b)) for b in sock.bodies] == [7, 7, 6]


def test_records_wait_for_company_but_a_pending_sighting_goes_at_once(loop) -> None:
    """A log record waits up to BATCH_WAIT for others to share its batch (one recorder commit for
    many requests); a pending sighting (someone waits for the approval prompt) cuts the wait short."""

    async def scenario() -> tuple[list[list[str]], list[list[str]], float]:
        w = _writer()
        sock = _FakeSocket(asyncio.get_running_loop())

        def fake_open() -> None:
            w._sock = sock  # type: ignore[assignment]

        w._open = fake_open  # type: ignore[method-assign]
        task = asyncio.create_task(w.run())
        await asyncio.sleep(0.01)
        first = w.append("log", {"i": 1})
        await asyncio.sleep(w.BATCH_WAIT / 4)
        early = [_ids(b) for b in sock.bodies]  # still waiting for company
        t0 = asyncio.get_running_loop().time()
        second = w.append("pending", {"container_name": "c"})
        while not sock.bodies and asyncio.get_running_loop().time() - t0 < 1:
            await asyncio.sleep(0.001)
        took = asyncio.get_running_loop().time() - t0
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        assert [_ids(b) for b in sock.bodies] == [[first, second]]
        return early, [_ids(b) for b in sock.bodies], took

    early, sent, took = loop.run_until_complete(scenario())
    assert early == []
    assert took < JournalWriter.BATCH_WAIT / 2, took
