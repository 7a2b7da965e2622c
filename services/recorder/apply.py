"""Applying journal records to SQLite: one transaction per batch, idempotent on record id.

Returns the events to publish after the commit (so a subscriber that reads the database on
an event finds the change). With `lazy=True` the per-request events (`log.new`,
`transaction.new`) come back as `Deferred` payloads (a run of rows inserted together: one `Rows`
entry), built only if someone subscribes to the topic when they are published (see
services/recorder/service.py).

Applied record ids are kept as ranges per writer (`journal_ranges`, migration 10), the log rows'
`log_counts` added here per batch; docs/architecture.md ("journal.py") says why.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from bus import records as kinds
from bus import topics
from bus.journal import Record, id_text
from greyproxy.shapes import log_json, pending_json, rule_json
from greyproxy.store import dns_cache, identities, journal_applied, logs, pending, rules

log = logging.getLogger("greyproxy.recorder")

Event = tuple[str, Any]

LOG_COLUMNS = logs.FIELDS
_L_TS, _L_CID = LOG_COLUMNS.index("timestamp"), LOG_COLUMNS.index("container_id")
_L_NAME, _L_RESULT = LOG_COLUMNS.index("container_name"), LOG_COLUMNS.index("result")


class Row:
    """A row just inserted: its columns' names, the values bound (as stored) and its id. Event
    payloads read it; `as_dict()` is only called when one is built."""

    __slots__ = ("cols", "params", "id")

    def __init__(self, cols: tuple[str, ...], params: tuple | list, id: int | None = None) -> None:
        self.cols, self.params, self.id = cols, params, id

    def get(self, key: str, default: Any = None) -> Any:
        if key == "id":
            return self.id
        try:
            return self.params[self.cols.index(key)]
        except ValueError:
            return default

    def as_dict(self) -> dict[str, Any]:
        row = dict(zip(self.cols, self.params))
        row["id"] = self.id
        return row


class Deferred:
    """An event payload not built yet: `fn(row, data)`, called by `build()` once someone wants it."""

    __slots__ = ("fn", "row", "data")

    def __init__(self, fn: Callable[[Any, Any], Any], row: Any, data: Any) -> None:
        self.fn, self.row, self.data = fn, row, data

    def build(self) -> Any:
        return self.fn(self.row, self.data)


class Rows:
    """The events of a run of rows inserted together, one per row, none built yet: `fn(row, data)`
    for each, called by `build()` once someone wants them (usually nobody: then they cost this)."""

    __slots__ = ("fn", "cols", "params", "ids", "datas")

    def __init__(
        self, fn: Callable[[Any, Any], Any], cols: tuple[str, ...], params: list, ids: Sequence[int], datas: list
    ) -> None:
        self.fn, self.cols, self.params, self.ids, self.datas = fn, cols, params, ids, datas

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self) -> list[Row]:
        return [Row(self.cols, p, i) for p, i in zip(self.params, self.ids)]

    def build(self) -> list[Any]:
        fn = self.fn
        return [fn(row, data) for row, data in zip(self.rows(), self.datas)]


def materialize(events: list[Event]) -> list[Event]:
    """The events with every Deferred payload built (a Rows entry: one event per row)."""
    out: list[Event] = []
    for t, d in events:
        if type(d) is Rows:
            out.extend((t, payload) for payload in d.build())
        else:
            out.append((t, d.build() if type(d) is Deferred else d))
    return out


_N_LOG = len(LOG_COLUMNS)
assert kinds.LOG_FIELDS[:_N_LOG] == LOG_COLUMNS  # shape 2 starts with the columns, in their order
_L_SUMMARY = kinds.LOG_FIELDS.index("rule_summary")


def _log_params(data: list[Any] | dict[str, Any], now: float) -> tuple | list:
    """A `log` record's values in LOG_COLUMNS order, as stored: from an array (shape 2, bus/records.py
    LOG_FIELDS; a shorter one leaves the rest null, a longer one is refused) or an object (shape 1).
    A whole array is its own values (the `rule_summary` after the columns is not stored: insert_run
    is told how many columns a row has), not copied."""
    if type(data) is list:
        n = len(data)
        if n > len(kinds.LOG_FIELDS):
            raise ValueError(f"a log record of {n} fields (at most {len(kinds.LOG_FIELDS)})")
        params = data if n >= _N_LOG else (*data, *(None,) * (_N_LOG - n))
    else:
        params = tuple(map(data.get, LOG_COLUMNS))  # type: ignore[union-attr]
    if params[_L_TS] is None or params[_L_CID] is None:
        fixed = list(params[:_N_LOG])
        fixed[_L_TS] = now if fixed[_L_TS] is None else fixed[_L_TS]
        fixed[_L_CID] = fixed[_L_CID] or ""
        params = tuple(fixed)
    return params


def _log_payload(row: Row, data: list[Any] | dict[str, Any]) -> dict[str, Any]:
    if type(data) is list:
        return log_json(row.as_dict(), data[_L_SUMMARY] if len(data) > _L_SUMMARY else None)
    return log_json(row.as_dict(), data.get("rule_summary"))  # type: ignore[union-attr]


def _add_log_counts(cur: sqlite3.Cursor, params: list[tuple | list]) -> None:
    """log_counts for inserted log rows (migration 10: kept here, one upsert per container and result)."""
    if not params:
        return
    if len(params) == 1:
        p = params[0]
        cur.execute(logs.ADD_COUNT, (p[_L_NAME], p[_L_RESULT], 1))
        return
    counts: dict[tuple[Any, Any], int] = {}
    name = result = None
    run = 0
    for p in params:  # runs of one (container, result): a compare each, not a tuple hashed per row
        if run and p[_L_NAME] == name and p[_L_RESULT] == result:
            run += 1
            continue
        if run:
            counts[name, result] = counts.get((name, result), 0) + run
        name, result, run = p[_L_NAME], p[_L_RESULT], 1
    counts[name, result] = counts.get((name, result), 0) + run
    cur.executemany(logs.ADD_COUNT, [(name, result, n) for (name, result), n in counts.items()])


def _apply_log(cur: sqlite3.Cursor, data: list[Any] | dict[str, Any], events: list[Event]) -> None:
    params = _log_params(data, time.time())
    if len(params) > _N_LOG:
        params = params[:_N_LOG]
    cur.execute(logs.INSERT, params)
    _add_log_counts(cur, [params])
    events.append((topics.LOG_NEW, Deferred(_log_payload, Row(LOG_COLUMNS, params, cur.lastrowid), data)))


def _apply_log_run(cur: sqlite3.Cursor, run: list[Record], events: list[Event]) -> None:
    apply_run(
        cur,
        run,
        events,
        "logs",
        logs.INSERT,
        LOG_COLUMNS,
        _log_params,
        topics.LOG_NEW,
        _log_payload,
        _add_log_counts,
    )


def _apply_pending(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    """A sighting of an unknown destination: bump the entry (or its sibling), or create it."""
    ts = float(data.get("ts") or time.time())
    container, host, port = data["container_name"], data["destination_host"], int(data["destination_port"])
    resolved = data.get("resolved_hostname")
    row = cur.execute(pending.FIND, (container, host, port)).fetchone()
    if row is None and resolved:
        # Another IP of the same named host: merge into the existing entry.
        row = cur.execute(pending.FIND_SIBLING, (container, resolved, port)).fetchone()
    if row is None:
        cur.execute(pending.INSERT, (container, data.get("container_id") or "", host, port, resolved, ts, ts))
        pid, topic = cur.lastrowid, topics.PENDING_CREATED
    else:
        pid, topic = row[0], topics.PENDING_UPDATED
        cur.execute(pending.BUMP, (ts, resolved, pid))
    full = cur.execute(pending.GET, (pid,)).fetchone()
    events.append((topic, pending_json(dict(zip(pending.COLUMNS, full)), int(data.get("waiting") or 0))))


def _apply_pending_named(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    """A raw IP sighted with no name known for it, named since. Decided by a rule with that name:
    the entry is withdrawn, and announced as a person's decision by that rule would be
    (`pending_request.allowed`, or `.dismissed` for a deny, with the rule). Decided by none: the
    entry gets the name, if it has none yet (`pending_request.updated`). An entry another worker's
    sighting gave another name is left as it is."""
    container, host, port = data["container_name"], data["destination_host"], int(data["destination_port"])
    name = str(data["resolved_hostname"])
    row = cur.execute(pending.FIND, (container, host, port)).fetchone()
    if row is None:  # decided by a person meanwhile, or never stored
        return
    if row[1] is not None and row[1] != name:
        return  # another worker's sighting named it otherwise: a person decides that one
    if data.get("rule_id") is None:
        if row[1] is None:
            cur.execute(pending.NAME, (name, row[0]))
            full = cur.execute(pending.GET, (row[0],)).fetchone()
            waiting = int(data.get("waiting") or 0)
            events.append((topics.PENDING_UPDATED, pending_json(dict(zip(pending.COLUMNS, full)), waiting)))
        return
    cur.execute(pending.DELETE, (row[0],))
    found = cur.execute(rules.GET, (int(data["rule_id"]),)).fetchone()
    if found is None:  # the rule went meanwhile
        events.append((topics.PENDING_DISMISSED, {"pending_id": row[0]}))
        return
    rule = rule_json(dict(zip(rules.COLUMNS, found)))
    topic = topics.PENDING_ALLOWED if rule["action"] == "allow" else topics.PENDING_DISMISSED
    events.append((topic, {"pending_id": row[0], "rule": rule}))


def _apply_rule_hit(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    cur.execute(
        rules.ADD_HITS,
        (int(data.get("count") or 1), float(data.get("last_used_at") or time.time()), int(data["rule_id"])),
    )


def _apply_identity_used(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    cur.execute(identities.TOUCH, (float(data.get("last_used_at") or time.time()), str(data["name"])))


def _apply_dns(cur: sqlite3.Cursor, data: dict[str, Any], events: list[Event]) -> None:
    cur.execute(dns_cache.UPSERT, (data["ip"], data["hostname"], float(data.get("ts") or time.time())))


APPLIERS = {
    kinds.LOG: _apply_log,
    kinds.PENDING: _apply_pending,
    kinds.RULE_HIT: _apply_rule_hit,
    kinds.DNS: _apply_dns,
    kinds.IDENTITY_USED: _apply_identity_used,
    kinds.PENDING_NAMED: _apply_pending_named,
}


# Kinds that may also be applied a run at a time (one executemany): kind -> fn(cur, run, events).
# Such a function falls back to one record at a time itself (`apply_run` does) when one is bad.
RUN_APPLIERS: dict[str, Any] = {}


def register(kind: str, fn, run_fn=None) -> None:
    """Later capabilities (transactions, conversations) add their record kinds here."""
    APPLIERS[kind] = fn
    if run_fn is not None:
        RUN_APPLIERS[kind] = run_fn


# (ProgrammingError: a value sqlite3 cannot bind, say an object where a log record has text)
_RUN_ERRORS = (
    TypeError,
    ValueError,
    OverflowError,
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
)
_RECORD_ERRORS = (AttributeError, KeyError, *_RUN_ERRORS)  # a record applied alone


def apply_run(
    cur: sqlite3.Cursor,
    run: list[Record],
    events: list[Event],
    table: str,
    sql: str,
    cols: tuple[str, ...],
    build: Callable[[Any, float], tuple | list],
    topic: str,
    payload: Callable[[Row, Any], Any],
    after: Callable[[sqlite3.Cursor, list], None] | None = None,
) -> None:
    """A run of records of one kind as one executemany of `sql` into `table` (there is one record
    per proxied request, so runs are long). `build(data, now)` gives the row's values in `cols` order
    (any past them not stored); `after(cur, values)` runs with the rows (derived tables). Each row's
    event on `topic` is published after the commit with the payload `payload(row, data)`, deferred
    (built only if someone wants it: the run's events are one `Rows` entry). A record that cannot be
    built is applied alone (dropped if bad) before any row of the run is written. A row SQLite refuses:
    at first (`apply_records`' fast pass) the batch's whole transaction is undone (`_Redo`), then in the
    careful pass the run is written in a savepoint, undone and applied one record at a time, so only
    the bad one is dropped."""
    try:
        now = time.time()
        params = [build(data, now) for _rid, _kind, data in run]
    except (AttributeError, KeyError, TypeError, ValueError):  # orjson's encode error is a TypeError
        _apply_each(cur, run, events)
        return
    if not _pass.careful:
        try:
            ids = insert_run(cur, table, sql, params, len(cols), fast=True)
            if after is not None:
                after(cur, params)
        except _RUN_ERRORS as exc:
            raise _Redo() from exc
    else:
        cur.execute("SAVEPOINT run")
        try:
            ids = insert_run(cur, table, sql, params, len(cols))
            if after is not None:
                after(cur, params)
            cur.execute("RELEASE run")
        except _RUN_ERRORS:
            cur.execute("ROLLBACK TO run")
            cur.execute("RELEASE run")
            _apply_each(cur, run, events)
            return
    events.append((topic, Rows(payload, cols, params, ids, [rec[2] for rec in run])))


class _Redo(Exception):
    """The fast pass met a row SQLite refused (or could not bind): the batch's transaction is undone
    (by SQLite itself for a refused row: INSERT OR ROLLBACK) and the batch applied again, carefully."""


class _Pass:
    """Which pass `apply_records` is in (it runs on the recorder's one writer thread)."""

    __slots__ = ("careful",)

    def __init__(self) -> None:
        self.careful = False


_pass = _Pass()


# Rows per INSERT statement: one statement of many rows costs SQLite much less per row than as many
# executions of a one-row statement (a third less for a log row; bench/results.md, record-cost), and
# each statement has its fixed cost (its cursors opened, the AUTOINCREMENT sequence read and written
# back). Sizes in powers of two: any number of rows in few statements (18, a batch at ~6 000 requests/s:
# 16 + 2), of few distinct sizes (each compiled once and cached by sqlite3). Up to 128 rows: ~2 100
# instructions less per recorded request than up to 32 (a log row and a transaction row; bench/results.md,
# s12-a; 256 no better, 512 worse); what a statement costs to compile grows with its rows, so per row it
# does not. A size whose parameters SQLite would refuse (SQLITE_LIMIT_VARIABLE_NUMBER: 32 766 since
# 3.32, 999 before) is skipped.
MULTI_ROWS = (128, 64, 32, 16, 8, 4, 2, 1)


def _shared(rows: list, ncols: int = 0) -> tuple[int, ...]:
    """The columns (of the first `ncols`: all when 0) whose value is the same in every one of `rows`
    (value lists): equal and of one type (1, 1.0 and True are equal in Python, not as stored in
    every column), a float only when not zero (0.0 == -0.0). A column is looked at down the rows
    only when its first and last values agree (most varying columns fail that)."""
    n = len(rows)
    out = []
    if not ncols:
        ncols = len(rows[0])
    first = rows[0]
    last = rows[n - 1]
    for c in range(ncols):
        v = first[c]
        w = last[c]
        if not (w is v or w == v):
            continue
        t = type(v)
        if not (t is str or t is bytes or v is None or t is int or (t is float and v != 0.0)):
            continue
        for row in rows:
            x = row[c]
            if x is not v and (type(x) is not t or x != v):
                break
        else:
            out.append(c)
    return tuple(out)


class Shape:
    """A multi-row INSERT for `size` rows of a table's columns where the columns `shared` hold one
    value in every row: each such column is bound once (`?N` named in every row) or, when that value
    is None, written NULL; the other columns are bound per row. What a row stores is the same as
    with every value bound (the same value, bound once). Binding a value costs Python's sqlite3 and
    SQLite ~600 instructions (a text one is copied: malloc, memcpy, free, their mutexes); a busy
    agent's requests repeat most columns (container, host, method, result, rule...)."""

    __slots__ = ("sql", "bound", "varying", "one")

    def __init__(self, head: str, ncols: int, size: int, shared: tuple[int, ...], nulls: tuple[int, ...]) -> None:
        slot: dict[int, str] = {c: "NULL" for c in nulls}
        bound = [c for c in shared if c not in slot]
        for i, c in enumerate(bound):
            slot[c] = f"?{i + 1}"
        varying = [c for c in range(ncols) if c not in slot]
        rows = []
        num = len(bound)
        for _ in range(size):
            cells = []
            for c in range(ncols):
                if c in slot:
                    cells.append(slot[c])
                else:
                    num += 1
                    cells.append(f"?{num}")
            rows.append(f"({', '.join(cells)})")
        self.sql = f"{head} VALUES {', '.join(rows)}"
        self.bound = tuple(bound)
        self.varying = tuple(varying)
        # the varying columns' values of a row as a tuple (itemgetter of one index gives the value)
        self.one = len(varying) == 1

    def values(self, rows: list) -> list:
        """The statement's parameters: the shared values once, then each row's varying ones."""
        first = rows[0]
        out = [first[c] for c in self.bound]
        varying = self.varying
        if self.one:
            c = varying[0]
            for row in rows:
                out.append(row[c])
        elif varying:
            get = itemgetter(*varying)
            for row in rows:
                out.extend(get(row))  # a tuple's items copied at once, not one iterator step each
        return out


_SHAPES: dict[tuple, Shape] = {}
MAX_SHAPES = 64  # statements kept (sqlite3 keeps its 128 most recent compiled)


def shape_of(sql: str, rows: list, ncols: int = 0, fast: bool = False) -> Shape:
    """The Shape for `rows` under `sql` (a one-row `INSERT INTO t (cols) VALUES (?, ...)`) of `ncols`
    columns (0: as many as the first row has values; a row may hold more, not stored); `fast`: as an
    INSERT OR ROLLBACK (insert_run)."""
    if not ncols:
        ncols = len(rows[0])
    shared = _shared(rows, ncols) if len(rows) > 1 else tuple(range(ncols))
    first = rows[0]
    nulls = tuple([c for c in shared if first[c] is None])
    key = (sql, len(rows), shared, nulls, fast)
    shape = _SHAPES.get(key)
    if shape is None:
        if len(_SHAPES) >= MAX_SHAPES:
            _SHAPES.clear()  # traffic that keeps changing shape: start over (statements recompiled)
        head = sql.partition(" VALUES ")[0]
        if fast:
            head = head.replace("INSERT INTO ", "INSERT OR ROLLBACK INTO ", 1)
        shape = _SHAPES[key] = Shape(head, ncols, len(rows), shared, nulls)
    return shape


def insert_run(
    cur: sqlite3.Cursor, table: str, sql: str, params: list, ncols: int = 0, fast: bool = False
) -> Sequence[int]:
    """Insert rows (`sql` is the one-row INSERT) into an AUTOINCREMENT `table`; the new rows' ids
    in order (`ncols`: the columns of `sql`, when a row holds values past them, not stored). This
    is the only writer inside its IMMEDIATE transaction, so they are the sequence's next ones. A row SQLite refuses raises, the rows before it of the same statement not inserted.
    Rows go in statements of MULTI_ROWS rows, each a Shape: the columns equal in all its rows bound
    once. `fast`: the statements are INSERT OR ROLLBACK (a refused row undoes the whole transaction,
    so SQLite keeps no statement journal: every page a statement changes copied aside first)."""
    row = cur.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    base = int(row[0]) if row else 0
    i, total = 0, len(params)
    most = cur.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // (ncols or len(params[0])) if total else 0
    for size in MULTI_ROWS:
        if size > most and size > 1:
            continue  # more parameters than SQLite takes in one statement (all of them bound, at worst)
        while total - i >= size:
            rows = params[i : i + size]
            shape = shape_of(sql, rows, ncols, fast)
            cur.execute(shape.sql, shape.values(rows))
            i += size
    if total and cur.lastrowid == base + total:  # the last row's id: the sequence's base + total
        return range(base + 1, base + total + 1)  # (not a list: no int object per row until one is read)
    return [r[0] for r in cur.execute(f"SELECT id FROM {table} WHERE id > ? ORDER BY id", (base,))]  # pragma: no cover


def _apply_others(cur: sqlite3.Cursor, records: list[Record], events: list[Event]) -> None:
    """Kinds with a run applier go in a run per kind (each in its own order), the rest one by one."""
    singles: list[Record] = []
    runs: dict[str, list[Record]] = {}
    for rec in records:
        kind = rec[1]
        run = runs.get(kind)
        if run is not None:
            run.append(rec)
        elif kind in RUN_APPLIERS:
            runs[kind] = [rec]
        else:
            singles.append(rec)
    if singles:
        _apply_each(cur, singles, events)
    for kind, run in runs.items():
        if len(run) > 1:
            RUN_APPLIERS[kind](cur, run, events)
        else:
            _apply_each(cur, run, events)


def _apply_each(cur: sqlite3.Cursor, records: list[Record], events: list[Event]) -> None:
    """One record at a time, each in a savepoint: a bad one is dropped, the others applied."""
    for rid, kind, data in records:
        fn = APPLIERS.get(kind)
        if fn is None:
            log.warning("journal: unknown record kind %r (id %s) skipped", kind, id_text(rid))
            continue
        try:
            cur.execute("SAVEPOINT rec")
            fn(cur, data, events)
            cur.execute("RELEASE rec")
        except _RECORD_ERRORS as exc:
            # A malformed record must not block the ones behind it: drop it, keep it marked applied.
            cur.execute("ROLLBACK TO rec")
            cur.execute("RELEASE rec")
            log.warning("journal: bad %s record %s dropped: %s", kind, id_text(rid), exc)


_ID_CHUNK = 500  # bound parameters per "already applied?" query


def _fresh(cur: sqlite3.Cursor, records: list[Record], now: float) -> list[Record]:
    """The records not applied before (nor earlier in this batch), now marked applied: per writer,
    one look-up of the ranges overlapping the batch's and one range per run of consecutive
    sequence numbers (extending the writer's last row when it continues it: journal_applied.mark_ranges)."""
    ids = [rec[0] for rec in records]
    run = journal_applied.consecutive(ids)
    if run is not None:  # one writer's ids in order, each once (the usual batch): no per-id keys
        writer, lo = run
        hi = lo + len(ids) - 1
        near = cur.execute(journal_applied.RANGES_OVERLAPPING, {"writer": writer, "lo": lo, "hi": hi})
        if all(b < lo for _a, b in near) and cur.execute(journal_applied.ANY_LEGACY).fetchone() is None:
            journal_applied.mark_ranges(cur, [(writer, lo, hi, now)])
            return records
    keys = journal_applied.writer_seqs(ids)
    writers = list(dict.fromkeys(map(itemgetter(0), keys)))  # in order of appearance
    if len(writers) == 1:  # one proxy (or worker) per batch: no grouping
        by_writer = {writers[0]: list(map(itemgetter(1), keys))}
    else:  # a few writers (proxy workers) coalesced: a pass each
        by_writer = {w: [s for x, s in keys if x == w] for w in writers}
    applied: set[tuple[str, int]] = set()
    for writer, seqs in by_writer.items():
        lo, hi = min(seqs), max(seqs)
        for a, b in cur.execute(journal_applied.RANGES_OVERLAPPING, {"writer": writer, "lo": lo, "hi": hi}):
            applied.update((writer, s) for s in seqs if a <= s <= b)
    if cur.execute(journal_applied.ANY_LEGACY).fetchone() is not None:
        # Ids applied by a recorder from before migration 10 (a resend across the upgrade).
        for i in range(0, len(records), _ID_CHUNK):
            ids = [id_text(r[0]) for r in records[i : i + _ID_CHUNK]]
            old = {row[0] for row in cur.execute(journal_applied.select_applied(len(ids)), ids)}
            applied.update(key for text, key in zip(ids, keys[i : i + _ID_CHUNK]) if text in old)
    fresh: list[Record] = []
    if not applied and sum(map(len, by_writer.values())) == sum(len(set(s)) for s in by_writer.values()):
        fresh = records  # the usual batch: all new, no id twice
        new_seqs = by_writer
    else:
        new_seqs = {}
        for rec, key in zip(records, keys):
            if key in applied:
                continue  # already applied: a resend after a lost ack (or twice in this batch)
            applied.add(key)
            fresh.append(rec)
            new_seqs.setdefault(key[0], []).append(key[1])
    marks = []
    for writer, seqs in new_seqs.items():
        seqs = sorted(seqs)
        if seqs[-1] - seqs[0] + 1 == len(seqs):  # consecutive (no id twice here): one range
            marks.append((writer, seqs[0], seqs[-1], now))
            continue
        start = prev = seqs[0]
        for s in seqs[1:]:
            if s != prev + 1:
                marks.append((writer, start, prev, now))
                start = s
            prev = s
        marks.append((writer, start, prev, now))
    journal_applied.mark_ranges(cur, marks)
    return fresh


def apply_records(conn: sqlite3.Connection, records: list[Record], lazy: bool = False) -> list[Event]:
    """Apply a batch in one transaction; a record id already applied is skipped (an id is a
    (writer, sequence) pair or its text, bus/journal.py: either names the same record). The log records
    (the bulk of the journal) go in together with one executemany, after the other kinds, each
    kind in its own order (log rows depend on no other record, and no other record on them).
    The events to publish come back with their payloads built, or with `lazy` some of them as
    `Deferred` ones, for the publisher to build only if someone subscribes to their topic.
    A run's rows go in without a savepoint first; a row SQLite refuses there undoes the whole
    transaction and the batch is applied again with one per run (apply_run), dropping only the bad
    record: SQLite copies every page a savepoint's statements change aside (a tenth of a logged
    request's cost), for the rare batch that needs it."""
    now = time.time()
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        try:
            events = _apply_fresh(cur, records, now)
        except _Redo as exc:
            # A row refused in the fast pass: everything again, each run in a savepoint (apply_run).
            log.info("journal: a batch of %d records applied again, carefully: %s", len(records), exc.__cause__)
            if conn.in_transaction:
                cur.execute("ROLLBACK")
            cur.execute("BEGIN IMMEDIATE")
            _pass.careful = True
            try:
                events = _apply_fresh(cur, records, now)
            finally:
                _pass.careful = False
        cur.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            cur.execute("ROLLBACK")
        raise
    return events if lazy else materialize(events)


def _apply_fresh(cur: sqlite3.Cursor, records: list[Record], now: float) -> list[Event]:
    """`apply_records`' work inside its transaction: the records not applied before, applied."""
    events: list[Event] = []
    fresh = _fresh(cur, records, now)
    log_kind = kinds.LOG  # (a module attribute looked up once, not per record)
    log_recs = [rec for rec in fresh if rec[1] == log_kind]
    if len(log_recs) < len(fresh):
        _apply_others(cur, [rec for rec in fresh if rec[1] != log_kind], events)
    if len(log_recs) > 1:
        _apply_log_run(cur, log_recs, events)
    else:
        _apply_each(cur, log_recs, events)
    return events
