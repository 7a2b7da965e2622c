"""Which journal records the recorder has applied: `journal_ranges` (migration 10), id ranges per
writer (a range continuing its writer's last one extends it); and `journal_applied` (migration 1), one row per record id, written by
recorders before migration 10 and still read while it holds rows (both kept a day)."""

from __future__ import annotations

import re
from itertools import repeat
from operator import itemgetter
from typing import Any

# A record id is `<writer>-<sequence in lower-case hex>` (bus/journal.py); the ranges of one writer
# never overlap, so those overlapping [lo, hi] are the last one starting at or before lo and any
# starting inside it.
RANGES_OVERLAPPING = (
    "SELECT lo, hi FROM journal_ranges WHERE writer = :writer AND lo <= :hi AND lo >= COALESCE("
    "(SELECT lo FROM journal_ranges WHERE writer = :writer AND lo <= :lo ORDER BY lo DESC LIMIT 1), :lo)"
)
MARK_RANGE = "INSERT INTO journal_ranges (writer, lo, hi, applied_at) VALUES (?, ?, ?, ?)"
LAST_RANGE = "SELECT rowid, hi FROM journal_ranges WHERE writer = ? ORDER BY lo DESC LIMIT 1"
EXTEND_RANGE = "UPDATE journal_ranges SET hi = ?, applied_at = ? WHERE rowid = ?"


def mark_ranges(cur: Any, marks: list[tuple[str, int, int, float]]) -> None:
    """Remember applied ranges (writer, lo, hi, now), each writer's in ascending order. A range that
    continues its writer's last one extends that row: while a writer's records arrive in order (the
    normal case) it has one row, not one per batch (a batch per 20 ms would add ~350 MB a day
    before the daily prune, counted against retention.maxDatabaseMiB)."""
    for writer, lo, hi, now in marks:
        last = cur.execute(LAST_RANGE, (writer,)).fetchone()
        if last is not None and last[1] == lo - 1:
            cur.execute(EXTEND_RANGE, (hi, now, last[0]))
        else:
            cur.execute(MARK_RANGE, (writer, lo, hi, now))


ANY_LEGACY = "SELECT 1 FROM journal_applied LIMIT 1"
MARK = "INSERT INTO journal_applied (record_id, applied_at) VALUES (?, ?)"


def select_applied(n: int) -> str:
    """Which of n record ids are applied already (n bound parameters)."""
    return f"SELECT record_id FROM journal_applied WHERE record_id IN ({','.join('?' * n)})"


_ID = re.compile(r"(.*)-([1-9a-f][0-9a-f]*|0)", re.S)  # canonical hex only: '0a' and 'a' must not be one record


def writer_seq(record_id: str) -> tuple[str, int]:
    """(writer, sequence) of a record id; an id of another form is a writer of its own (sequence 0)."""
    m = _ID.fullmatch(record_id)
    return (m[1], int(m[2], 16)) if m is not None else (record_id, 0)


_sep, _hex, _writer = itemgetter(1), itemgetter(2), itemgetter(0)


def _pair(record_id: Any) -> tuple[str, int]:
    """(writer, sequence) of an id of either form."""
    return record_id if type(record_id) is tuple else writer_seq(record_id)


def consecutive(record_ids: list[Any]) -> tuple[str, int] | None:
    """(writer, first sequence) when the ids are one writer's consecutive sequence numbers in order
    (a writer's batch, or its batches coalesced: the usual case); else None (`writer_seqs` then tells
    each id). An id is a (writer, sequence) pair (a batch naming its writer, bus/journal.py) or its
    text `<writer>-<s:x>`: of text ids one is parsed, the others compared with the ids that sequence
    spells, which costs a third of parsing each."""
    if not record_ids:
        return None
    first = record_ids[0]
    if type(first) is tuple:
        return _consecutive_pairs(record_ids)
    if type(first) is not str:
        return None
    writer, seq = writer_seq(first)
    if not seq:  # no sequence: not a writer's id (or sequence 0, never written by bus/journal.py)
        return None
    prefix = writer + "-"
    if [f"{prefix}{s:x}" for s in range(seq, seq + len(record_ids))] != record_ids:
        return None
    return writer, seq


def _consecutive_pairs(record_ids: list[Any]) -> tuple[str, int] | None:
    """`consecutive` of (writer, sequence) pairs: one loop, the sequence numbers C integers when
    compiled (journal_applied.pxd); a number past them (not one a writer makes) is no run."""
    writer, first = record_ids[0]
    if type(first) is not int:
        return None
    try:
        expect = first
        for rid in record_ids:
            if type(rid) is not tuple or len(rid) != 2:
                return None
            w, seq = rid
            if type(seq) is not int:
                return None
            s = seq
            # (one batch's ids share its writer object: identity first)
            if s != expect or (w is not writer and w != writer):
                return None
            expect += 1
    except OverflowError:
        return None
    return writer, first


def writer_seqs(record_ids: list[Any]) -> list[tuple[str, int]]:
    """(writer, sequence) of each id: a pair as it is, a text id `writer_seq`'d, its loops in C (a
    batch's ids are split, parsed and checked canonical as lists): the usual batch of text ids, every
    id `<writer>-<canonical hex>`, costs a fraction of a call per id; a batch with any other id, one
    call each."""
    if not all(map(str.__instancecheck__, record_ids)):
        return list(map(_pair, record_ids))
    parts = list(map(str.rpartition, record_ids, repeat("-")))
    hexes = list(map(_hex, parts))
    try:
        seqs = list(map(int, hexes, repeat(16)))
    except ValueError:
        return list(map(writer_seq, record_ids))
    # int() also takes "0a", "A", "1_0", " 1", "0x1", other scripts' digits: only its own spelling is
    # canonical; an id without "-" has no writer
    if list(map("%x".__mod__, seqs)) != hexes or not all(map(_sep, parts)):
        return list(map(writer_seq, record_ids))
    return list(zip(map(_writer, parts), seqs))
