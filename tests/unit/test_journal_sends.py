"""When JournalWriter sends: one batch per BATCH_WAIT however many records are appended, a pending
sighting at the end of the loop turn it was appended in (together with that turn's other records),
a full socket (EAGAIN) keeps everything queued and in order; and with real sockets the acks are read
from the socket's FD (no zmq.asyncio futures)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest
import uvloop
import zmq
import zmq.asyncio

from bus.journal import JournalConsumer, JournalWriter


class _Socket:
    """A plain socket's send: accepts (keeping the bodies) unless told to answer EAGAIN."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.full = False
        self.refused = 0

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        assert flags & zmq.NOBLOCK
        if self.full:
            self.refused += 1
            raise zmq.Again()
        self.bodies.append(frames[-1])

    def close(self, linger: int | None = None) -> None:
        pass


def _ids(body: bytes) -> list[int | str]:  # the records as sent: their sequence numbers
    return [r[0] for r in orjson.loads(body)["s"]]


class Writer(JournalWriter):
    """A JournalWriter whose methods a test may replace on the instance (the class itself is an
    extension type when compiled, bus/journal.pxd)."""


async def _started(w: JournalWriter, sock: _Socket) -> asyncio.Task:
    def fake_open() -> None:
        w._sock = sock  # type: ignore[assignment]

    w._open = fake_open  # type: ignore[method-assign]
    task = asyncio.create_task(w.run())
    await asyncio.sleep(0)
    return task


async def _stop(task: asyncio.Task) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def test_many_appends_make_one_send_after_the_batch_wait() -> None:
    async def scenario() -> None:
        w = Writer("ipc:///nonexistent")
        sock = _Socket()
        task = await _started(w, sock)
        ids = []
        for _ in range(5):  # five loop turns of appends within one BATCH_WAIT
            ids += [w.append("log", {"i": i}) for i in range(40)]
            await asyncio.sleep(0)
        assert sock.bodies == []  # waiting for company
        await asyncio.sleep(w.BATCH_WAIT * 2)
        assert [_ids(b) for b in sock.bodies] == [ids]  # one send, everything, in order
        await _stop(task)

    asyncio.run(scenario())


def test_a_pending_record_goes_at_the_end_of_its_loop_turn_with_the_turns_other_records() -> None:
    async def scenario() -> None:
        w = Writer("ipc:///nonexistent")
        sock = _Socket()
        task = await _started(w, sock)
        before = [w.append("log", {"i": i}) for i in range(3)]
        p1 = w.append("pending", {"container_name": "c"})
        p2 = w.append("pending", {"container_name": "d"})
        after = w.append("log", {"i": 99})
        assert sock.bodies == []  # not sent from inside append
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert [_ids(b) for b in sock.bodies] == [before + [p1, p2, after]]
        # The batch wait that was pending for the log records was cancelled: nothing more follows.
        await asyncio.sleep(w.BATCH_WAIT * 2)
        assert len(sock.bodies) == 1
        await _stop(task)

    asyncio.run(scenario())


def test_a_full_socket_keeps_every_record_and_sends_them_later_in_order() -> None:
    async def scenario() -> None:
        w = Writer("ipc:///nonexistent", batch_size=50)
        w.TICK = 0.01
        sock = _Socket()
        sock.full = True
        task = await _started(w, sock)
        ids = [w.append("log", {"i": i}) for i in range(120)]
        ids.append(w.append("pending", {"container_name": "c"}))
        await asyncio.sleep(w.BATCH_WAIT * 2)
        assert sock.refused >= 1 and sock.bodies == []
        st = w.stats()
        assert st["queued"] == len(ids) and st["inflight"] == 0 and st["dropped"] == 0
        sock.full = False
        await asyncio.sleep(w.TICK * 3)  # the writer's tick tries again
        sent = [rid for b in sock.bodies for rid in _ids(b)]
        assert sent == ids
        assert [len(_ids(b)) for b in sock.bodies] == [50, 50, 21]
        await _stop(task)

    asyncio.run(scenario())


def test_real_sockets_acks_read_from_the_fd_and_few_sends_under_a_burst() -> None:
    d = tempfile.mkdtemp(prefix="gp-js-", dir="/tmp")
    applied: list[Any] = []

    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        ep = f"ipc://{d}/j.sock"
        with ThreadPoolExecutor(1) as ex:
            cons = JournalConsumer(ep, applied.extend, ex, ctx=ctx)
            serving = asyncio.ensure_future(cons.serve())
            w = JournalWriter(ep, ctx=ctx)
            task = asyncio.create_task(w.run())
            ids = []
            for turn in range(20):  # 2 000 records over ~20 ms of loop turns
                ids += [w.append("log", {"turn": turn, "i": i}) for i in range(100)]
                await asyncio.sleep(0.001)
            assert await w.flush(10), w.stats()
            assert w.acked == len(ids) and w.stats()["inflight"] == 0
            # Batches of up to 500, one per BATCH_WAIT: far fewer sends than records or turns.
            assert 4 <= w.sends <= 10, w.sends
            # A pending sighting still goes at once and its ack is read without a timer's help.
            t0 = asyncio.get_running_loop().time()
            ids.append(w.append("pending", {"container_name": "c"}))
            assert not w._idle.is_set()  # busy again after an idle moment: flush waits for its ack
            assert await w.flush(5)
            assert w.acked == len(ids) and w.stats()["inflight"] == 0
            assert asyncio.get_running_loop().time() - t0 < w.BATCH_WAIT
            await _stop(task)
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            cons.close()
        ctx.destroy(linger=0)
        assert [r[0] for r in applied] == [
            (w.writer, seq) for seq in ids
        ]  # (writer, sequence): the batch names the writer

    try:
        uvloop.run(scenario())
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_records_that_find_no_recorder_for_long_open_a_new_socket() -> None:
    """SPEC §15 (a proxy on another host): ZeroMQ reconnects after a lost connection, but not after
    a refused CURVE handshake (the central host restarted without this host's key). With records
    queued and no recorder connected for REOPEN_UNSENT seconds, the writer opens a new socket, again
    each REOPEN_UNSENT while it lasts; once one connects, everything goes out in order. Before, the
    outbox stayed unsent after the key was allowed again, until the proxy stopped."""

    async def scenario() -> None:
        w = Writer("ipc:///nonexistent", batch_size=50)
        w.TICK = 0.01
        w.REOPEN_UNSENT = 0.1
        sock = _Socket()
        sock.full = True
        opened: list[_Socket] = []

        def fake_open() -> None:
            w._sock = sock  # type: ignore[assignment]
            opened.append(sock)

        w._open = fake_open  # type: ignore[method-assign]
        task = asyncio.create_task(w.run())
        await asyncio.sleep(0.05)
        assert len(opened) == 1  # nothing to send: no reason to open again
        ids = [w.append("log", {"i": i}) for i in range(60)]
        await asyncio.sleep(0.05)
        assert len(opened) == 1 and sock.refused >= 1  # not yet
        await asyncio.sleep(0.3)
        assert 3 <= len(opened) <= 5, len(opened)  # again every REOPEN_UNSENT
        sock.full = False
        await asyncio.sleep(0.05)
        assert [rid for b in sock.bodies for rid in _ids(b)] == ids
        n = len(opened)
        await asyncio.sleep(0.3)
        assert len(opened) == n  # sent: no more reopening
        await _stop(task)

    asyncio.run(scenario())


@pytest.mark.parametrize("key", [1, 2.5])
def test_non_string_keys_still_encode(key: object) -> None:
    w = JournalWriter("ipc:///nonexistent")
    w.append("log", {key: "v"})
    assert orjson.loads(w._queue[0])[2] == {str(key): "v"}


def test_a_second_run_takes_over_from_one_still_being_cancelled() -> None:
    """The proxy's shutdown starts run() again for a last flush while the first run's cancellation
    may not have been processed yet: the first one's cleanup must not close the second's socket."""

    async def scenario() -> None:
        w = Writer("ipc:///nonexistent")
        socks: list[_Socket] = []

        def fake_open() -> None:
            socks.append(_Socket())
            w._sock = socks[-1]  # type: ignore[assignment]

        w._open = fake_open  # type: ignore[method-assign]
        first = asyncio.create_task(w.run())
        await asyncio.sleep(0)
        second = asyncio.create_task(w.run())  # starts before the first sees its cancellation
        first.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert first.cancelled()
        rid = w.append("pending", {"container_name": "c"})
        await asyncio.sleep(0)
        assert len(socks) == 2 and w._sock is socks[1]
        assert [_ids(b) for b in socks[1].bodies] == [[rid]]
        await _stop(second)
        assert w._sock is None

    asyncio.run(scenario())


def test_a_stopping_recorder_takes_the_records_sent_while_the_proxies_stop() -> None:
    """A stop reaches every process at once (supervisord.conf's one group): the recorder's serving
    is cancelled while the proxies still send their last records. `last_records` serves on until
    the journal has been quiet STOP_QUIET seconds. Before, the records of exchanges completed while
    a proxy stopped were lost (an outside run: ~40 per stop under load)."""
    from services.recorder.service import last_records

    d = tempfile.mkdtemp(prefix="gp-js-", dir="/tmp")
    applied: list[Any] = []

    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        ep = f"ipc://{d}/j.sock"
        with ThreadPoolExecutor(1) as ex:
            cons = JournalConsumer(ep, applied.extend, ex, ctx=ctx)
            serving = asyncio.ensure_future(cons.serve())
            w = JournalWriter(ep, ctx=ctx)
            task = asyncio.create_task(w.run())
            ids = [w.append("log", {"i": i}) for i in range(10)]
            assert await w.flush(5)
            serving.cancel()  # the stop's signal reaches the recorder first
            await asyncio.gather(serving, return_exceptions=True)

            async def proxy_stopping() -> None:  # then the proxies' last records, in two bursts
                for burst in range(2):
                    await asyncio.sleep(0.2)
                    ids.extend(w.append("log", {"burst": burst, "i": i}) for i in range(50))

            t0 = asyncio.get_running_loop().time()
            sender = asyncio.ensure_future(proxy_stopping())
            await last_records(cons, quiet=0.3, most=3.0)
            took = asyncio.get_running_loop().time() - t0
            await sender
            assert w.acked == len(ids) == 110, (w.acked, len(ids))
            assert 0.7 <= took < 2.0, took  # the second burst at 0.4 s, then 0.3 s of quiet
            await _stop(task)
            cons.close()
        ctx.destroy(linger=0)
        assert len(applied) == 110

    try:
        uvloop.run(scenario())
    finally:
        shutil.rmtree(d, ignore_errors=True)
