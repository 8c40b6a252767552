"""Read-only queries of the archive build: every thread's messages and events at once.

`Tx.messages(thread_id)` and `Tx.events(thread_id)` are one query each; a build of 10,000
threads made 20,000 of them, each built, cache-keyed and run through SQLAlchemy. These read
the same rows, in the same order (the event dicts in `Tx.events`' shape; of messages, the
summary a fingerprint needs), in one query per table, grouped by thread, by position (going
through each row's `_mapping` builds its keys again for every row). They use the store's
tables directly and never write.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import select

from mailflow.store.repository import _aware
from mailflow.store.tables import messages, thread_events


# Thread ids per `IN (...)` list (well under SQLite's and PostgreSQL's limits).
_CHUNK = 500


def _chunks(ids: Iterable[int] | None) -> list[list[int] | None]:
    if ids is None:
        return [None]
    ids = sorted(set(ids))
    return [ids[i:i + _CHUNK] for i in range(0, len(ids), _CHUNK)]


def events_by_thread(tx: Any, ids: Iterable[int] | None = None) -> dict[int, list[dict[str, Any]]]:
    """Every thread event (of the threads `ids`, or all), by thread id, each list ordered by
    id, as `Tx.events` gives them."""
    out: dict[int, list[dict[str, Any]]] = {}
    c = thread_events.c
    for chunk in _chunks(ids):
        q = select(c.thread_id, c.at, c.actor, c.kind, c.detail).order_by(c.thread_id, c.id)
        if chunk is not None:
            q = q.where(c.thread_id.in_(chunk))
        _events_into(tx, q, out)
    return out


def _events_into(tx: Any, q: Any, out: dict[int, list[dict[str, Any]]]) -> None:
    for thread_id, at, actor, kind, detail in tx.c.execute(q):
        out.setdefault(thread_id, []).append(
            {"at": _aware(at), "actor": actor, "kind": kind, "detail": detail})
    return out


@dataclass(frozen=True)
class MessageSummary:
    """What a thread's fingerprint reads of a message (build.ThreadCache.fingerprint): a
    build reads this for every thread, and whole messages only for threads whose view must
    be made again. Leaving out the JSON columns and the Date header saves decoding three
    JSON values and a date per message."""
    id: int
    thread_id: int
    kind: str
    direction: str
    hidden: bool
    raw_sha256: str
    created_at: datetime
    subject: str
    from_name: str
    text: str


_SUMMARY = tuple(MessageSummary.__dataclass_fields__)


def message_summaries_by_thread(tx: Any, ids: Iterable[int] | None = None
                                ) -> dict[int, list[MessageSummary]]:
    """`MessageSummary` of every message that belongs to a thread (of the threads `ids`, or
    any), by thread id, in id order (as `Tx.messages` orders them)."""
    out: dict[int, list[MessageSummary]] = {}
    i_created = _SUMMARY.index("created_at")
    for chunk in _chunks(ids):
        q = (select(*(messages.c[f] for f in _SUMMARY)).where(messages.c.thread_id.is_not(None))
             .order_by(messages.c.thread_id, messages.c.id))
        if chunk is not None:
            q = q.where(messages.c.thread_id.in_(chunk))
        for row in tx.c.execute(q):
            values = list(row)
            values[i_created] = _aware(values[i_created])
            m = MessageSummary(*values)
            out.setdefault(m.thread_id, []).append(m)
    return out


# -- what changed since the last build -------------------------------------------------------
# The columns of `threads` read by every build, raw (as the database driver returns them: no
# type conversion), for the probe. `body` is left out: no part of a public view comes from it
# (the request's text is its message), and it is most of the row's bytes.
_THREAD_COLUMNS = ("id", "kind", "state", "authority", "law", "title", "citizen_email",
                   "citizen_name", "request_token", "reply_token", "confirm_token",
                   "created_at", "confirmed_at", "sent_at", "due_date", "delivery_status",
                   "delivery_detail", "allow", "clock_start", "extension", "very_late_date",
                   "awaiting_description", "hidden")
_I = {name: i for i, name in enumerate(_THREAD_COLUMNS)}


def _day(v: Any) -> date | None:
    if v is None or isinstance(v, date):
        return v
    return date.fromisoformat(str(v)[:10])


class ThreadRow:
    """One row of `threads`, cheaply: what the builder decides with before it knows whether
    the thread changed (is it public, its list state today, its private values), and the raw
    values for its probe. The whole `Thread` is read only for threads that changed."""
    __slots__ = ("raw", "id", "kind", "state", "authority", "law", "citizen_email",
                 "request_token", "reply_token", "confirm_token", "sent_at", "hidden",
                 "_due", "_very_late", "_parsed")

    def __init__(self, raw: tuple[Any, ...]):
        self.raw = raw
        (self.id, self.kind, self.state, self.authority, self.law, self.citizen_email,
         self.request_token, self.reply_token, self.confirm_token, self.sent_at,
         hidden) = (raw[_I["id"]], raw[_I["kind"]], raw[_I["state"]], raw[_I["authority"]],
                    raw[_I["law"]], raw[_I["citizen_email"]], raw[_I["request_token"]],
                    raw[_I["reply_token"]], raw[_I["confirm_token"]], raw[_I["sent_at"]],
                    raw[_I["hidden"]])
        self.hidden = bool(hidden)
        self._parsed = False

    def _parse(self) -> None:
        self._due = _day(self.raw[_I["due_date"]])
        self._very_late = _day(self.raw[_I["very_late_date"]])
        self._parsed = True

    @property
    def due_date(self) -> date | None:
        if not self._parsed:
            self._parse()
        return self._due

    @property
    def very_late_date(self) -> date | None:
        if not self._parsed:
            self._parse()
        return self._very_late


def _fetch(tx: Any, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a query without parameters, straight from the database driver, in the
    transaction of `tx` (SQLAlchemy's result objects cost more than the query, per row)."""
    tx.c.exec_driver_sql("SELECT 1")    # the transaction has begun: one snapshot for all
    cur = tx.c.connection.dbapi_connection.cursor()
    try:
        cur.execute(sql)
        return [tuple(r) for r in cur.fetchall()]
    finally:
        cur.close()


def _where_ids(column: str, ids: Iterable[int] | None) -> str:
    """" AND column IN (...)" for the ids (integers, written out: no parameters to bind), or
    "" for every row."""
    if ids is None:
        return ""
    return f" AND {column} IN ({', '.join(str(int(i)) for i in ids) or 'NULL'})"


def thread_rows(tx: Any, ids: Iterable[int] | None = None) -> list[ThreadRow]:
    """Every thread (or those of `ids`), as `ThreadRow`, in id order."""
    sql = (f"SELECT {', '.join(_THREAD_COLUMNS)} FROM threads WHERE 1 = 1"
           f"{_where_ids('id', ids)} ORDER BY id")
    return [ThreadRow(r) for r in _fetch(tx, sql)]


# -- which threads changed (store migration 0011) ---------------------------------------------
def watermark(tx: Any) -> int:
    """The change mark from which changes may be missing from what this transaction reads
    (see migration 0011): the next build asks for the threads marked at or above it. Read
    first, before anything it stands for (on PostgreSQL each statement of a read may see a
    newer state, never an older one)."""
    if tx.c.dialect.name == "postgresql":
        sql = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
    else:
        sql = "SELECT coalesce(max(changed), 0) + 1 FROM thread_changes"
    return int(_fetch(tx, sql)[0][0])


def changed_threads(tx: Any, since: int) -> set[int]:
    """The threads whose row, messages, events or report were written at or after the
    change mark `since`, or may have been (a superset: a thread read twice costs a thread)."""
    return {r[0] for r in _fetch(tx, "SELECT thread_id FROM thread_changes WHERE changed >= "
                                     f"{int(since)}")}


def thread_probes(tx: Any, ids: Iterable[int] | None = None) -> Any:
    """What the store holds for each thread besides its row, for its probe: which messages it
    has (their number, the sum and the largest of their ids: messages are only ever added,
    and their content never changes), which of them are hidden (the one thing about a
    message that changes), and its events (only ever added). With the thread's row, the
    rules and the code, it says whether anything a thread's view is made from changed, in a
    few scans of narrow indexes, without reading a message (see build.ThreadCache).
    Returns a function of the thread id (of `ids`, when given: the others are not read)."""
    if ids is not None:
        ids = sorted(set(ids))
        if not ids:
            return lambda tid: (None, (), None)
    where = _where_ids("thread_id", ids)
    msgs = {r[0]: r[1:] for r in _fetch(
        tx, "SELECT thread_id, count(*), sum(id), max(id) FROM messages "
            f"WHERE thread_id IS NOT NULL{where} GROUP BY thread_id")}
    hidden: dict[int, list[int]] = {}
    for tid, pk in _fetch(tx, "SELECT thread_id, id FROM messages WHERE hidden AND "
                              f"thread_id IS NOT NULL{where} ORDER BY id"):
        hidden.setdefault(tid, []).append(pk)
    events = {r[0]: r[1:] for r in _fetch(
        tx, f"SELECT thread_id, count(*), max(id) FROM thread_events WHERE 1 = 1{where} "
            "GROUP BY thread_id")}
    hidden_parts = {tid: tuple(ids) for tid, ids in hidden.items()}

    def part(tid: int) -> tuple[Any, ...]:
        return (msgs.get(tid), hidden_parts.get(tid, ()), events.get(tid))

    return part


# Probes computed by this process, by thread id: (inputs, probe). Comparing the inputs with
# the last build's is cheaper than hashing them again (the daemon builds after every message).
_PROBES: dict[int, tuple[tuple[Any, ...], str]] = {}


def probe(salt: bytes, row: ThreadRow, store_part: tuple[Any, ...], rules: bytes) -> str:
    """A digest of everything of a thread's inputs that can change, besides the code and
    the rules: its row and `thread_probes`' part."""
    inputs = (salt, rules, row.raw, store_part)
    hit = _PROBES.get(row.id)
    if hit is not None and hit[0] == inputs:
        return hit[1]
    h = hashlib.sha256(salt)
    h.update(rules)
    h.update(repr(row.raw).encode("utf-8", "surrogatepass"))
    h.update(repr(store_part).encode())
    found = h.hexdigest()
    if len(_PROBES) > 1_000_000:
        _PROBES.clear()
    _PROBES[row.id] = (inputs, found)
    return found


def raw_reader(tx: Any) -> Any:
    """`tx.get_raw`, without building a SQLAlchemy statement for every message (a full
    build reads every message's raw bytes): one prepared query through the driver."""
    from mailflow.errors import NotFound
    tx.c.exec_driver_sql("SELECT 1")    # in the transaction's snapshot
    dbapi = tx.c.connection.dbapi_connection
    mark = "?" if tx.c.dialect.paramstyle == "qmark" else "%s"
    sql = f"SELECT data FROM raw_messages WHERE sha256 = {mark}"

    def get_raw(sha: str) -> bytes:
        cur = dbapi.cursor()
        try:
            cur.execute(sql, (sha,))
            row = cur.fetchone()
        finally:
            cur.close()
        if row is None:
            raise NotFound(f"no raw message {sha}")
        return bytes(row[0])

    return get_raw
