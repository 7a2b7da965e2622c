"""The journal: records that must not be lost travel proxy -> recorder with acks.

Writer: keeps records in a bounded outbox, sends them in batches (a window of batches in
flight), forgets a batch only when the recorder acknowledges it after its commit, and
resends everything in flight after an ack timeout on a fresh socket.
The outbox is bounded in records and in bytes, counting what is in flight: past either bound
the oldest unsent record is dropped (or, when everything is in flight, the new one), counted in
`dropped` and logged. Records are serialized once, when appended, so their size is known and a
batch stays under `batch_bytes` (a record bigger than that travels alone). A record carries its
sequence number, the batch its writer's name once (docs/events.md, "The journal"): a record's id is
`(writer, sequence)`, spelt `<writer>-<sequence in hex>` where it is text (`id_text`).
Consumer: applies batches (the caller's function, expected to be idempotent on record id),
then acknowledges them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, cast

import orjson
import zmq
import zmq.asyncio

from . import curve
from .records import PENDING, PENDING_NAMED

log = logging.getLogger("greyproxy.journal")

# (record id, kind, data): the id is (writer, sequence) for a record of a batch naming its writer, the
# id's text for one of a batch without (a proxy of before; a record appended with its own id).
RecordId = tuple[str, int] | str
Record = tuple[RecordId, str, Any]
Encoded = bytes  # one record as it travels: the JSON array [sequence number (or id text), kind, data]

# A batch naming its writer lists its records under "s" (not "r"): a recorder from before it finds no
# "r" and refuses the batch (unacknowledged, resent) rather than taking the numbers for ids.
_BATCH_HEAD = b'{"b":%d,"w":"%s","s":['
_BATCH_TAIL = b"]}"
# ZMQ_EVENTS is a plain int; `& zmq.POLLIN` (an IntFlag) would go through enum.Flag.__and__ (~3 µs).
_POLLIN = int(zmq.POLLIN)


_dumps = orjson.dumps  # (a module global: no attribute lookup on `orjson` per record)
_loads = orjson.loads


def id_text(rid: RecordId) -> str:
    """A record id as text, `<writer>-<sequence in lower-case hex>` (as batches without a writer spell it)."""
    if type(rid) is tuple:
        return f"{rid[0]}-{rid[1]:x}"
    return str(rid)


def batch_body(bid: int, writer: str, records: list[Encoded]) -> bytes:
    """A batch as it travels: `{"b": bid, "w": writer, "s": [records...]}` (`writer` is hex: no escaping)."""
    return b"".join((_BATCH_HEAD % (bid, writer.encode()), b",".join(records), _BATCH_TAIL))


class MalformedBatch(ValueError):
    """A journal batch the recorder cannot read: refused (not acknowledged), the reason logged."""


def decode_batch(body: bytes) -> tuple[int, list[Record]]:
    """(batch id, records) of a batch as it travels: one naming its writer (`"w"`, its records in
    `"s"`, each one's first element its sequence number, or the id text of a record appended with its
    own id), or one of before (records in `"r"`, each one's first element its id text). MalformedBatch
    says what is wrong."""
    try:
        batch = _loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBatch(f"not JSON ({exc})") from None
    if type(batch) is not dict:
        raise MalformedBatch("not a JSON object")
    bid = batch.get("b")
    if type(bid) is not int:
        raise MalformedBatch('no integer batch id "b"')
    writer = batch.get("w")
    if writer is None:
        recs = batch.get("r")
        if type(recs) is not list:
            raise MalformedBatch('no record array "r" (nor a writer "w")')
    else:
        if type(writer) is not str or not writer:
            raise MalformedBatch('writer "w" is not a non-empty string')
        recs = batch.get("s")
        if type(recs) is not list:
            raise MalformedBatch('a writer "w" but no record array "s"')
    out: list[Record] = []
    i = 0
    for r in recs:
        if type(r) is not list:
            raise MalformedBatch(f"record {i} is not [id, kind, data]")
        rec = r  # (a list: indexed directly when compiled, journal.pxd)
        if len(rec) != 3 or type(rec[1]) is not str:
            raise MalformedBatch(f"record {i} is not [id, kind, data]")
        rid = rec[0]
        if type(rid) is int and writer is not None and rid > 0:
            out.append(((writer, rid), rec[1], rec[2]))
        elif type(rid) is str:
            out.append((rid, rec[1], rec[2]))
        else:
            raise MalformedBatch(f"record {i}: bad id {rid!r}")
        i += 1
    return bid, out


class JournalWriter:
    """The proxy's end of the journal (see the module doc). An extension type when compiled
    (journal.pxd): `append` runs for every record the proxy makes (two a proxied request)."""

    __slots__ = (
        "endpoint",
        "outbox_limit",
        "outbox_bytes",
        "batch_size",
        "batch_bytes",
        "window",
        "ack_timeout",
        "_ctx",
        "_prefix",
        "_seq",
        "_batch_ids",
        "_queue",
        "_queued_bytes",
        "_inflight",
        "_inflight_count",
        "_inflight_bytes",
        "_idle",
        "_idle_set",
        "_sock",
        "_owner",
        "_fd",
        "_loop",
        "_timer",
        "_soon",
        "_urgent",
        "_ack_wait",
        "_unsent_since",
        "_runs",
        "dropped",
        "acked",
        "resent",
        "sends",
    )

    # Seconds a record may wait for company before its batch is sent. Each batch costs the recorder a
    # commit (every page it touched written again to the WAL), a thread hop and an ack, and the proxy a
    # send and an ack: under load, 20 ms batches cost the recorder ~20 µs less per request than 3 ms
    # ones (bench/results.md, record-cost). A record of an urgent kind (a pending sighting: someone
    # waits for the approval prompt; its withdrawal, which takes the prompt away) does not wait: it
    # goes out at the end of the current loop turn, with whatever else was appended in that turn.
    BATCH_WAIT = 0.02
    URGENT = frozenset({PENDING, PENDING_NAMED})
    # Seconds between looks at the acks' age (resend after ack_timeout) and retries of a send that
    # found no recorder connected.
    TICK = 0.25
    # Seconds records may wait with no recorder connected before the socket is opened again.
    # ZeroMQ reconnects by itself after a lost connection, but not after a refused handshake: a
    # central host that restarted without this host's CURVE key refuses it, and once the key is
    # allowed again only a new socket connects (SPEC §15, several hosts).
    REOPEN_UNSENT = 10.0

    def __init__(
        self,
        endpoint: str,
        outbox_limit: int = 200_000,
        batch_size: int = 500,
        window: int = 8,
        ack_timeout: float = 3.0,
        ctx: zmq.asyncio.Context | None = None,
        outbox_bytes: int = 256 * 1024 * 1024,
        batch_bytes: int = 1024 * 1024,
    ) -> None:
        self.endpoint = endpoint
        self.outbox_limit = outbox_limit
        self.outbox_bytes = outbox_bytes
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.window = window
        self.ack_timeout = ack_timeout
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._prefix = uuid.uuid4().hex[:12] + "-"
        self._seq = 0  # the last record id's sequence number
        self._batch_ids = itertools.count(1)
        self._queue: deque[Encoded] = deque()
        self._queued_bytes = 0
        self._inflight: dict[int, tuple[float, list[Encoded], int]] = {}  # bid -> (sent at, records, bytes)
        self._inflight_count = 0
        self._inflight_bytes = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._idle_set = True  # what `_idle.is_set()` says, read per append without a Python call
        # The socket is driven without zmq.asyncio's futures: sends are plain NOBLOCK sends (EAGAIN:
        # no recorder connected, the batch stays queued), acks are read when the socket's FD says
        # so. `_owner` is the zmq.asyncio socket the context tracks (closed by ctx.destroy too).
        self._sock: zmq.Socket | None = None
        self._owner: zmq.asyncio.Socket | None = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set while run() runs
        self._timer: asyncio.TimerHandle | None = None  # a flush waiting BATCH_WAIT for company
        self._soon: asyncio.Handle | None = None  # a flush at the end of this loop turn
        self._urgent = False  # an urgent record is queued: send without waiting for company
        self._ack_wait = ack_timeout  # grows after each timeout, back to ack_timeout on an ack
        self._unsent_since: float | None = (
            None  # loop time of the first send that found no recorder since the last one sent
        )
        self._runs = 0  # run() calls so far: only the latest one owns the socket
        self.dropped = 0
        self.acked = 0
        self.resent = 0
        self.sends = 0  # batches sent (resends included)

    # -- producer side (event loop thread) --
    @property
    def writer(self) -> str:
        """This writer's name in its records' ids (`(writer, sequence)`, see `id_text`)."""
        return self._prefix[:-1]

    def append(self, kind: str, data: Any, record_id: str | None = None) -> int | str:
        """Queue a record; its sequence number comes back (its id is `(self.writer, sequence)`), or
        `record_id` when given (the record then travels with that id as text)."""
        if record_id:
            rid: Any = record_id
        else:
            self._seq += 1
            rid = self._seq  # (an int travels without being spelt in hex: the batch names the writer)
        try:
            enc = _dumps([rid, kind, data])
        except orjson.JSONEncodeError:  # a dict with non-str keys (the option costs ~0.2 µs a record)
            enc = _dumps([rid, kind, data], option=orjson.OPT_NON_STR_KEYS)
        size = len(enc)
        queue = self._queue
        if (
            len(queue) + self._inflight_count >= self.outbox_limit
            or self._queued_bytes + self._inflight_bytes + size > self.outbox_bytes
        ):
            # Bounded memory, in flight included: the oldest unsent records go first; when every
            # record is in flight (nothing unsent to give up), the new one is the one dropped.
            while queue and self._over(size):
                self._queued_bytes -= len(queue.popleft())
                self._note_drop()
            if self._over(size):
                self._note_drop()
                return rid
        queue.append(enc)
        self._queued_bytes += size
        if self._idle_set:
            self._idle_set = False
            self._idle.clear()
        if kind in self.URGENT:
            self._urgent = True
        if self._soon is None and (self._timer is None or self._urgent or len(queue) >= self.batch_size):
            self._schedule()
        return rid

    def _schedule(self) -> None:
        """Arrange the next send: at the end of this loop turn when urgent or a batch is full, else
        after BATCH_WAIT (at most one send per wait, however many records are appended meanwhile)."""
        loop = self._loop
        if loop is None or self._soon is not None or not self._queue:
            return  # run() sends what is queued when it starts
        if self._urgent or len(self._queue) >= self.batch_size:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._soon = loop.call_soon(self._flush)
        elif self._timer is None:
            self._timer = loop.call_later(self.BATCH_WAIT, self._flush)

    def _flush(self) -> None:
        self._timer = self._soon = None
        self._urgent = False
        if self._sock is not None and self._loop is not None:
            self._fill(self._loop.time())

    def _over(self, extra: int) -> bool:
        count = len(self._queue) + self._inflight_count + 1
        size = self._queued_bytes + self._inflight_bytes + extra
        return count > self.outbox_limit or size > self.outbox_bytes

    def _note_drop(self) -> None:
        self.dropped += 1
        if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
            log.warning(
                "journal outbox full (%d records / %d bytes, recorder away?): %d records dropped so far",
                self.outbox_limit,
                self.outbox_bytes,
                self.dropped,
            )

    def stats(self) -> dict[str, int]:
        return {
            "queued": len(self._queue),
            "inflight": self._inflight_count,
            "acked": self.acked,
            "dropped": self.dropped,
            "resent": self.resent,
            "outbox_bytes": self._queued_bytes + self._inflight_bytes,
        }

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every appended record is acknowledged (tests and shutdown)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # -- sender --
    def _open(self) -> None:
        owner = self._ctx.socket(zmq.DEALER)
        owner.setsockopt(zmq.LINGER, 0)
        owner.setsockopt(zmq.IMMEDIATE, 1)  # only queue to a connected recorder
        owner.setsockopt(zmq.SNDHWM, self.window * 2)
        curve.secure(owner, self.endpoint, server=False)
        owner.connect(self.endpoint)
        self._owner = owner
        self._sock = zmq.Socket.shadow(owner.underlying)
        self._fd = cast(int, self._sock.getsockopt(zmq.FD))
        assert self._loop is not None
        self._loop.add_reader(self._fd, self._read_acks)

    def _reset(self) -> None:
        # Everything in flight goes back to the front of the queue, in order.
        for _bid, (_t, records, size) in sorted(self._inflight.items(), reverse=True):
            self._queue.extendleft(reversed(records))
            self._queued_bytes += size
            self.resent += len(records)
        self._inflight.clear()
        self._inflight_count = 0
        self._inflight_bytes = 0
        if self._fd is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
            self._fd = None
        if self._owner is not None:
            self._owner.close(linger=0)
        elif self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._owner = None

    def _read_acks(self) -> None:
        """Take every ack waiting on the socket (its FD is readable, or a send just happened: a zmq
        FD only signals a change, so after any operation on the socket what is waiting is taken)."""
        sock = self._sock
        if sock is None or self._fd is None:
            return
        got = False
        while cast(int, sock.getsockopt(zmq.EVENTS)) & _POLLIN:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                ack = orjson.loads(frames[-1])
                bid = int(ack["a"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            entry = self._inflight.pop(bid, None)
            if entry:
                self._inflight_count -= len(entry[1])
                self._inflight_bytes -= entry[2]
                self.acked += len(entry[1])
                self._ack_wait = self.ack_timeout
                got = True
        if got:
            if not self._queue and not self._inflight:
                self._idle.set()
                self._idle_set = True
            elif self._queue and self._timer is None:
                self._schedule()  # the window has room again

    async def run(self) -> None:
        # A second run() (the proxy's last flush at shutdown) takes over from one whose cancellation
        # has not been processed yet; the earlier one then leaves the socket alone.
        self._runs += 1
        mine = self._runs
        self._reset()
        loop = self._loop = asyncio.get_running_loop()
        self._open()
        try:
            while True:
                self._fill(loop.time())  # what was appended before run(), or found no recorder
                await asyncio.sleep(self.TICK)
                if self._inflight:
                    oldest = min(entry[0] for entry in self._inflight.values())
                    if loop.time() - oldest > self._ack_wait:
                        log.info(
                            "journal: no ack for %.1fs, resending %d records", self._ack_wait, self._inflight_count
                        )
                        # A recorder that is alive but slow must not be buried under resends of
                        # what it is already writing: wait longer each time until an ack comes.
                        self._ack_wait = min(self._ack_wait * 2, max(self.ack_timeout, 30.0))
                        self._reset()
                        self._open()
                elif self._queue and self._unsent_since is not None:
                    if loop.time() - self._unsent_since > self.REOPEN_UNSENT:
                        log.info(
                            "journal: no recorder connected for %.0fs with %d records to send; opening the"
                            " socket again",
                            loop.time() - self._unsent_since,
                            len(self._queue),
                        )
                        self._unsent_since = loop.time()
                        self._reset()
                        self._open()
        finally:
            if self._runs == mine:
                for handle in (self._timer, self._soon):
                    if handle is not None:
                        handle.cancel()
                self._timer = self._soon = None
                self._reset()
                self._loop = None

    def _take_batch(self) -> tuple[list[Encoded], int]:
        """Up to batch_size records and batch_bytes bytes from the front (at least one record)."""
        records: list[Encoded] = []
        nbytes = 0
        while self._queue and len(records) < self.batch_size:
            n = len(self._queue[0])
            if records and nbytes + n + len(records) > self.batch_bytes:
                break
            records.append(self._queue.popleft())
            nbytes += n
        self._queued_bytes -= nbytes
        return records, nbytes

    def _fill(self, now: float) -> None:
        assert self._sock is not None
        sent = False
        while self._queue and len(self._inflight) < self.window:
            records, nbytes = self._take_batch()
            bid = next(self._batch_ids)
            body = batch_body(bid, self._prefix[:-1], records)
            try:
                self._sock.send_multipart([b"", body], zmq.NOBLOCK)
            except zmq.ZMQError:  # EAGAIN: no recorder connected (IMMEDIATE) or the window's HWM
                self._queue.extendleft(reversed(records))
                self._queued_bytes += nbytes
                if not self._inflight and self._unsent_since is None:
                    self._unsent_since = now
                break
            sent = True
            self._unsent_since = None
            self.sends += 1
            self._inflight[bid] = (now, records, nbytes)
            self._inflight_count += len(records)
            self._inflight_bytes += nbytes
        if sent:
            self._read_acks()


ApplyFn = Callable[[list[Record]], Any]


class JournalConsumer:
    """Receives batches, applies them in one call (one transaction), acks after it returns."""

    def __init__(
        self,
        endpoint: str,
        apply: ApplyFn,
        executor: Executor,
        after_commit: Callable[[Any], None] | None = None,
        max_coalesce: int = 20,
        ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 10_000)
        curve.secure(self._sock, endpoint, server=True)
        self._sock.bind(endpoint)
        if endpoint.startswith("ipc://"):
            try:
                os.chmod(endpoint[len("ipc://") :], 0o600)
            except OSError:
                pass
        self._apply = apply
        self._executor = executor
        self._after_commit = after_commit
        self._max_coalesce = max_coalesce
        self.applied_batches = 0
        self.records = 0

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self._sock.recv_multipart()]
            # Coalesce whatever else is already waiting into the same transaction.
            while len(pending) < self._max_coalesce:
                try:
                    pending.append(await self._sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
            acks: list[tuple[bytes, int]] = []
            records: list[Record] = []
            for frames in pending:
                try:
                    bid, batch = decode_batch(frames[-1])
                except MalformedBatch as exc:
                    # Not acknowledged: nothing of it is applied (a writer resends it after its ack timeout).
                    log.warning("journal: refusing a malformed batch of %d bytes: %s", len(frames[-1]), exc)
                    continue
                acks.append((frames[0], bid))
                records.extend(batch)
            if not acks:
                continue
            while True:
                try:
                    result = await loop.run_in_executor(self._executor, self._apply, records)
                    break
                except Exception:
                    # Not acked: the writer resends; retry here too in case it was a passing lock.
                    log.exception("journal: applying %d records failed; retrying", len(records))
                    await asyncio.sleep(0.5)
            self.applied_batches += len(acks)
            self.records += len(records)
            for ident, bid in acks:
                try:
                    await self._sock.send_multipart([ident, b"", orjson.dumps({"a": bid})], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            if self._after_commit is not None:
                self._after_commit(result)

    def close(self) -> None:
        self._sock.close()
