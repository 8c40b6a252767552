"""All reads and writes of the store, as plain values: nothing outside this module sees a row.

A `Store` hands out transactions (`with store.tx() as tx:`); everything one pipeline step
does happens in one of them, so a crash leaves either all of it or none of it.
"""
from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, func, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql as pg_dialect, sqlite as sqlite_dialect
from sqlalchemy.exc import IntegrityError, OperationalError

from mailflow import logs
from mailflow.errors import NotFound, StoreError
from mailflow.store import db
from mailflow.store.direct import Direct
from mailflow.store.tables import (audit_log, authority_senders, blocked_senders, deliveries, messages, outbox, queue_items,
                                   raw_messages, reminders, reports, thread_events, threads)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; everything we store is UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


@dataclass(frozen=True)
class Thread:
    id: int
    kind: str
    state: str
    authority: str
    law: str
    title: str
    body: str
    citizen_email: str
    citizen_name: str
    request_token: str
    reply_token: str
    confirm_token: str | None
    created_at: datetime
    confirmed_at: datetime | None
    sent_at: datetime | None
    due_date: date | None
    delivery_status: str
    delivery_detail: str | None
    allow: str = "anybody"
    clock_start: date | None = None
    extension: str | None = None
    very_late_date: date | None = None
    awaiting_description: bool = False
    hidden: bool = False


@dataclass(frozen=True)
class StoredMessage:
    id: int
    thread_id: int | None
    direction: str
    kind: str
    message_id: str | None
    from_addr: str
    from_name: str
    to_addrs: list[str]
    subject: str
    date: datetime | None
    text: str
    raw_sha256: str
    classification: str | None
    classification_reason: str | None
    match_method: str | None
    match_detail: dict[str, Any] | None
    flags: list[str]
    hidden: bool
    created_at: datetime
    authentication: str | None = None   # our Authentication-Results for mail received


@dataclass(frozen=True)
class OutboxRow:
    id: int
    message_pk: int
    thread_id: int | None
    mail_from: str
    rcpt: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    # "forward": still to be composed by the sender; `message_pk` is then the message it
    # forwards (see `mailflow.outbound.outbox.queue_forward`).
    compose: str | None = None


@dataclass(frozen=True)
class Reminder:
    id: int
    thread_id: int
    kind: str
    event: str
    due_at: datetime
    state: str
    done_at: datetime | None
    note: str | None


@dataclass(frozen=True)
class QueueItem:
    id: int
    reason: str
    state: str
    thread_id: int | None
    raw_sha256: str | None
    summary: str
    detail: dict[str, Any] | None
    created_at: datetime
    decided_at: datetime | None
    decision: str | None
    decided_by: str | None = None


@dataclass(frozen=True)
class Report:
    """What a fault report adds to its thread (see tables.reports)."""
    thread_id: int
    category: str | None
    lat: float | None
    lon: float | None
    location_source: str | None
    location_text: str | None
    area: str | None
    fixed_at: datetime | None
    updated_at: datetime


# The report columns a caller may set; the key and updated_at are the store's.
_REPORT_FIELDS = frozenset({"category", "lat", "lon", "location_source", "location_text", "area",
                            "fixed_at"})


def _report(row: Any) -> Report:
    m = dict(row._mapping)
    return Report(**{k: m[k] for k in Report.__dataclass_fields__
                     if k not in ("fixed_at", "updated_at")},
                  fixed_at=_aware(m["fixed_at"]),
                  updated_at=_aware(m["updated_at"]))  # type: ignore[arg-type]


def _thread(row: Any) -> Thread:
    return _thread_of(dict(row._mapping))


def _thread_of(m: dict[str, Any]) -> Thread:
    for k in ("created_at", "confirmed_at", "sent_at"):
        m[k] = _aware(m[k])
    return Thread(**m)


def _message(row: Any) -> StoredMessage:
    return _message_of(dict(row._mapping))


def _message_of(m: dict[str, Any]) -> StoredMessage:
    m["date"], m["created_at"] = _aware(m["date"]), _aware(m["created_at"])
    return StoredMessage(**m)


def _outbox(row: Any) -> OutboxRow:
    m = row._mapping
    return OutboxRow(id=m["id"], message_pk=m["message_pk"], thread_id=m["thread_id"],
                     mail_from=m["mail_from"], rcpt=m["rcpt"], state=m["state"],
                     attempts=m["attempts"], next_attempt_at=_aware(m["next_attempt_at"]),
                     last_error=m["last_error"], compose=m["compose"])


def _queue(row: Any) -> QueueItem:
    m = dict(row._mapping)
    m["created_at"], m["decided_at"] = _aware(m["created_at"]), _aware(m["decided_at"])
    return QueueItem(**m)


def _reminder(row: Any) -> Reminder:
    m = row._mapping
    return Reminder(id=m["id"], thread_id=m["thread_id"], kind=m["kind"], event=m["event"],
                    due_at=_aware(m["due_at"]), state=m["state"],  # type: ignore[arg-type]
                    done_at=_aware(m["done_at"]), note=m["note"])


# Statements the pipeline runs for every message, built once with bound parameters: building
# a statement and computing its cache key costs SQLAlchemy ~40 µs a call, more than SQLite
# takes to run most of them, and a message runs about twenty (issue #10). The hottest are
# also compiled once and sent through the driver (`Direct`, store/direct.py): ~40 µs more.
_THREAD_BY_ID = select(threads).where(threads.c.id == bindparam("id"))
_THREAD_COLUMNS = frozenset(threads.c.keys())
_UPDATE_THREAD = update(threads).where(threads.c.id == bindparam("_thread_id"))
_DELIVERY_SEEN = select(deliveries.c.id).where(deliveries.c.raw_sha256 == bindparam("sha"),
                                               deliveries.c.rcpt == bindparam("rcpt"))
_INSERT_DELIVERY = insert(deliveries)
_INSERT_MESSAGE = insert(messages)
_INSERT_OUTBOX = insert(outbox)
_INSERT_QUEUE_ITEM = insert(queue_items)
_INSERT_EVENT = insert(thread_events)
_SETTLE_REMINDER = update(reminders).where(reminders.c.id == bindparam("_id"),
                                           reminders.c.state == "pending")
BLOCKED_KEPT = 1000
"""At most this many blocked patterns are read whole and kept by a transaction."""
_BLOCKED_ALL = select(blocked_senders.c.pattern).limit(BLOCKED_KEPT + 1)
_BLOCKED = select(blocked_senders.c.id).where(
    blocked_senders.c.pattern.in_(bindparam("patterns", expanding=True))).limit(1)
# By Message-ID alone, the thread checked in Python: with both in the WHERE clause SQLite
# (no ANALYZE statistics) chose the thread's index and read every message of the thread,
# 50 µs at 50 messages and more for every message a long thread gains; the Message-ID's
# own index finds the one or two rows in 3 µs (bench/README.md, seventh round).
_MESSAGES_WITH_ID = select(messages).where(messages.c.message_id == bindparam("mid"))
MESSAGE_IDS_ASKED = 200
"""At most this many Message-IDs of one message are looked up (`threads_for_message_ids`)."""


@lru_cache(maxsize=MESSAGE_IDS_ASKED)
def _our_message_ids(n: int) -> Direct:
    """Which of n Message-IDs are ones mailflow sent on a thread (n bound parameters: the
    driver takes no expanding IN)."""
    return Direct(select(messages.c.message_id, messages.c.thread_id).where(
        messages.c.direction == "out", messages.c.thread_id.is_not(None),
        messages.c.message_id.in_([bindparam(f"mid{i}") for i in range(n)])))


_LEARNED_ALL = select(authority_senders.c.authority, authority_senders.c.address,
                      authority_senders.c.reply_to)
_SENDER_ID = select(authority_senders.c.id).where(
    authority_senders.c.authority == bindparam("authority"),
    authority_senders.c.address == bindparam("address"))
_SENDER_SEEN = update(authority_senders).where(
    authority_senders.c.id == bindparam("sender_id")).values(last_seen=bindparam("now"))
_INSERT_SENDER = insert(authority_senders)
# What the outbox sender runs for every row (composing a forward, sending, marking it sent).
_MESSAGE_BY_ID = select(messages).where(messages.c.id == bindparam("pk"))
_RAW_BY_SHA = select(raw_messages.c.data).where(raw_messages.c.sha256 == bindparam("sha"))
_OUTBOX_COMPOSED = update(outbox).where(outbox.c.id == bindparam("row_id"),
                                        outbox.c.compose.is_not(None)).values(
    message_pk=bindparam("composed_pk"), compose=None)
_OUTBOX_SENT = update(outbox).where(outbox.c.id == bindparam("row_id")).values(
    state="sent", sent_at=bindparam("sent_now"), result=bindparam("sent_result"),
    claimed_until=None,
    attempts=outbox.c.attempts + 1)
# Raw messages on SQLite, through the driver (Tx._put_raw_sqlite).
BLOB_PIECEWISE = 256 * 1024
_SQLITE_INSERT_RAW = ("INSERT INTO raw_messages (sha256, size, created_at, data) "
                      "VALUES (?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING")
_SQLITE_INSERT_RAW_ZERO = ("INSERT INTO raw_messages (sha256, size, created_at, data) "
                           "VALUES (?, ?, ?, zeroblob(?)) ON CONFLICT (sha256) DO NOTHING")

# Through the driver (see store/direct.py): what every message runs.
_D_THREAD_BY_ID = Direct(_THREAD_BY_ID)
_D_UPDATE_THREAD = Direct(_UPDATE_THREAD)
_D_DELIVERY_SEEN = Direct(_DELIVERY_SEEN)
_D_INSERT_DELIVERY = Direct(_INSERT_DELIVERY)
_D_INSERT_MESSAGE = Direct(_INSERT_MESSAGE, pk=messages.c.id)
_D_INSERT_OUTBOX = Direct(_INSERT_OUTBOX, pk=outbox.c.id)
_D_INSERT_QUEUE_ITEM = Direct(_INSERT_QUEUE_ITEM, pk=queue_items.c.id)
_D_MESSAGES_WITH_ID = Direct(_MESSAGES_WITH_ID)
# thread_changes is not in tables.metadata (derived, migration 0011): plain SQL. The rows are
# locked in the order the ORDER BY gives them (LockRows sits above the Sort).
_LOCK_THREAD_CHANGES = text("SELECT thread_id FROM thread_changes WHERE thread_id = ANY(:ids) "
                            "ORDER BY thread_id FOR UPDATE")
_D_SENDER_ID = Direct(_SENDER_ID)
_D_SENDER_SEEN = Direct(_SENDER_SEEN)
_D_INSERT_SENDER = Direct(_INSERT_SENDER)
_D_INSERT_EVENT = Direct(_INSERT_EVENT)
# The reminder's key when it was new, None when (thread, kind, event) was there already
# (RETURNING on PostgreSQL, not rowcount: with the implicit RETURNING SQLAlchemy added there,
# rowcount was -1, and add_reminder said "not new" for every reminder it planned).
_D_INSERT_REMINDER = {
    "sqlite": Direct(sqlite_dialect.insert(reminders).on_conflict_do_nothing(
        index_elements=["thread_id", "kind", "event"]), pk=reminders.c.id),
    "postgresql": Direct(pg_dialect.insert(reminders).on_conflict_do_nothing(
        index_elements=["thread_id", "kind", "event"]), pk=reminders.c.id),
}


@lru_cache(maxsize=4)
def _sqlite_datetime(dialect: Any) -> Any:
    """How SQLAlchemy writes raw_messages.created_at on SQLite (its own bind processor, so
    rows written through the driver read back exactly as the others)."""
    return raw_messages.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)


_INSERT_RAW: dict[str, Any] = {
    "sqlite": sqlite_dialect.insert(raw_messages).on_conflict_do_nothing(
        index_elements=["sha256"]),
    "postgresql": pg_dialect.insert(raw_messages).on_conflict_do_nothing(
        index_elements=["sha256"]),
}


def _no_nul(value: Any) -> Any:
    """`value` with every NUL in its strings (in dicts and lists too) replaced by U+FFFD.

    PostgreSQL's text and jsonb cannot hold NUL, which mail's subjects, bodies and names
    sometimes have; SQLite could, and the two stores must keep the same values. The raw bytes
    (raw_messages) are never changed."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {k: _no_nul(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_no_nul(v) for v in value)
    return value


def _same_read_back(old: Any, new: Any) -> bool:
    """Whether `new`, written over a column holding `old`, reads back as `new` itself."""
    return new is None or (type(new) in (bool, int, str, date)
                           and (old is None or type(old) is type(new)))


def _unchanged(old: Any, new: Any) -> bool:
    """Whether writing `new` over `old` (as read) would leave the column as it is."""
    return type(old) is type(new) and type(new) in (bool, int, str, date) and old == new or (
        old is None and new is None)


def _no_nul_values(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _no_nul(v) for k, v in values.items()}


class Tx:
    """One database transaction and the operations mailflow performs in it.

    Thread rows, the learned senders and the blocked list (when it is short) are remembered
    for the life of the transaction (a message asks for its thread three or four times, and
    a batch of messages asks for the same few): every write to them goes through this
    class, which forgets what it changed, and `forget` drops the lot (after rolling back a
    savepoint, whose writes the remembered rows may include). So are the senders already
    seen and the reminders already planned in this transaction, whose statements would
    change nothing more the second time.
    """

    def __init__(self, conn: Connection):
        self.c = conn
        self._threads: dict[int, Thread | None] = {}
        self._learned: list[tuple[str, str, bool]] | None = None
        self._blocked: frozenset[str] | None = None   # None: not read (or too many to keep)
        self._blocked_read = False
        self._seen_senders: set[tuple[str, str]] = set()
        self._planned: set[tuple[int, str, str]] = set()
        # Message-ID -> the thread mailflow sent it on, or None: not one of ours (yet).
        self._our_mids: dict[str, int | None] = {}

    def forget(self) -> None:
        """Drop the rows remembered in this transaction: after a savepoint rolls back."""
        self._threads.clear()
        self._learned = None
        self._blocked, self._blocked_read = None, False
        self._seen_senders.clear()
        self._planned.clear()
        self._our_mids.clear()

    # -- raw bytes ----------------------------------------------------------------------
    def put_raw(self, raw: bytes | Sequence[bytes]) -> str:
        """Store the bytes once, keyed by their sha256: one statement whether or not they
        were already there (INSERT … ON CONFLICT DO NOTHING on SQLite and PostgreSQL).

        `raw` may be given as pieces (a signature header and the message it signs) so that
        a big message is not joined in memory first. On SQLite the row is written through
        the driver (the statement is the same every time; SQLAlchemy's per-statement work
        cost more than SQLite's), and a message of BLOB_PIECEWISE bytes or more as a
        zeroblob filled with incremental blob I/O (`data` is the table's last column, so
        SQLite never holds the whole record in memory)."""
        pieces = (raw,) if isinstance(raw, (bytes, bytearray, memoryview)) else tuple(raw)
        h = hashlib.sha256()
        size = 0
        for piece in pieces:
            h.update(piece)
            size += len(piece)
        sha = h.hexdigest()
        now = utcnow()
        if self.c.dialect.name == "sqlite":
            self._put_raw_sqlite(sha, size, now, pieces)
            return sha
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        row = {"sha256": sha, "size": size, "data": data, "created_at": now}
        stmt = _INSERT_RAW.get(self.c.dialect.name)
        if stmt is not None:
            self.c.execute(stmt, row)
            return sha
        if not self.c.execute(select(raw_messages.c.sha256)
                              .where(raw_messages.c.sha256 == sha)).first():
            self.c.execute(insert(raw_messages), row)
        return sha

    def _put_raw_sqlite(self, sha: str, size: int, now: datetime,
                        pieces: Sequence[bytes]) -> None:
        created = _sqlite_datetime(self.c.dialect)(now)
        driver = self.c.connection.driver_connection
        try:
            if size < BLOB_PIECEWISE:
                data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                driver.execute(_SQLITE_INSERT_RAW, (sha, size, created, data))
                return
            cur = driver.execute(_SQLITE_INSERT_RAW_ZERO, (sha, size, created, size))
            if cur.rowcount != 1:
                return   # already stored
            with driver.blobopen("raw_messages", "data", cur.lastrowid) as blob:
                for piece in pieces:
                    blob.write(piece)
        except sqlite3.OperationalError as e:   # locked, I/O error, disk full: not this message's
            raise StoreError(f"database error: {e}") from e

    def get_raw(self, sha: str) -> bytes:
        row = self.c.execute(_RAW_BY_SHA, {"sha": sha}).first()
        if row is None:
            raise NotFound(f"no raw message {sha}")
        return bytes(row[0])

    # -- idempotency --------------------------------------------------------------------
    def delivery_seen(self, sha: str, rcpt: str) -> bool:
        return _D_DELIVERY_SEEN.first(self.c, {"sha": sha, "rcpt": rcpt}) is not None

    def record_delivery(self, sha: str, rcpt: str, envelope: dict[str, Any], outcome: str,
                        detail: dict[str, Any] | None = None) -> None:
        _D_INSERT_DELIVERY.insert(self.c, {"raw_sha256": sha, "rcpt": rcpt,
                                           "envelope": envelope, "outcome": outcome,
                                           "detail": detail, "processed_at": utcnow()})

    # -- threads ------------------------------------------------------------------------
    def create_thread(self, **values: Any) -> int:
        values.setdefault("created_at", utcnow())
        values.setdefault("kind", "foi")
        values.setdefault("delivery_status", "pending")
        return int(self.c.execute(insert(threads).values(**_no_nul_values(values)))
                   .inserted_primary_key[0])

    def thread(self, thread_id: int) -> Thread | None:
        if thread_id in self._threads:
            return self._threads[thread_id]
        row = _D_THREAD_BY_ID.first(self.c, {"id": thread_id})
        found = self._threads[thread_id] = _thread_of(row) if row else None
        return found

    def lock_threads(self, thread_ids: Iterable[int]) -> None:
        """On PostgreSQL, take these threads' `thread_changes` rows, in id order, before the
        transaction writes anything.

        Every write to a thread's messages, events or row marks it in `thread_changes` (the
        triggers of migration 0011), which locks that row until the commit. Two daemons'
        batches naming the same two threads in opposite orders each held one and waited for
        the other: a deadlock, and one batch done again (about two in 1,200 messages with
        three daemons). Taken in one order up front, the second batch waits for the first
        instead. Only the threads the envelope names are known before matching; a thread
        found by In-Reply-To alone is still locked when first written. SQLite has one writer
        at a time: nothing to do. A thread with no row yet (never changed) is not waited
        for; a thread that does not exist locks nothing."""
        if self.c.dialect.name != "postgresql":
            return
        ids = sorted(set(thread_ids))
        if len(ids) > 1:   # one thread's row is taken when first written, as before
            self.c.execute(_LOCK_THREAD_CHANGES, {"ids": ids})

    def thread_by_confirm_token(self, token: str) -> Thread | None:
        row = self.c.execute(select(threads).where(threads.c.confirm_token == token)).first()
        return _thread(row) if row else None

    def no_thread(self, thread_id: int) -> NotFound:
        """The error for a thread that does not exist, naming the ids that do, nearby."""
        ids = [r[0] for r in self.c.execute(select(threads.c.id).order_by(
            func.abs(threads.c.id - thread_id)).limit(5))]
        if not ids:
            return NotFound(f"no thread {thread_id}: there are no threads yet")
        return NotFound(f"no thread {thread_id}; nearby threads: {', '.join(map(str, sorted(ids)))}")

    def block(self, pattern: str, actor: str, reason: str | None) -> bool:
        self._blocked, self._blocked_read = None, False
        if self.c.execute(select(blocked_senders.c.id).where(
                blocked_senders.c.pattern == pattern)).first():
            return False
        self.c.execute(insert(blocked_senders).values(pattern=pattern, created_at=utcnow(),
                                                      actor=actor, reason=reason))
        return True

    def is_blocked(self, *senders: str) -> bool:
        """Whether any of these addresses (or its domain, blocked as "@domain") was blocked
        by an admin: one query for all of them."""
        patterns: list[str] = []
        for sender in senders:
            sender = (sender or "").strip().lower()
            if sender and "@" in sender:
                patterns += [sender, "@" + sender.rpartition("@")[2]]
        if not patterns:
            return False
        if not self._blocked_read:
            # The whole list, once per transaction, when it is short (it usually is: a few
            # addresses an admin blocked); else one query per call.
            self._blocked_read = True
            rows = self.c.execute(_BLOCKED_ALL).scalars().all()
            self._blocked = frozenset(rows) if len(rows) <= BLOCKED_KEPT else None
        if self._blocked is not None:
            return not self._blocked.isdisjoint(patterns)
        return self.c.execute(_BLOCKED, {"patterns": patterns}).first() is not None

    def threads_of_citizen(self, email: str) -> list[Thread]:
        q = select(threads).where(threads.c.citizen_email == email).order_by(threads.c.id)
        return [_thread(r) for r in self.c.execute(q)]

    def update_thread(self, thread_id: int, **values: Any) -> None:
        """Set columns of one thread (plain values: the SET clause follows their names).

        A remembered row is changed the same way when every value is one the database
        gives back unchanged (None, bool, int, str, a date: not a datetime, which SQLite
        stores without its zone), so the next message of a batch does not read it again."""
        cached = self._threads.pop(thread_id, None)
        values = _no_nul_values(values)
        if cached is not None and values and all(
                k in _THREAD_COLUMNS and _unchanged(getattr(cached, k), v)
                for k, v in values.items()):
            # Nothing would change (a reply to a thread already awaiting its description):
            # no statement. The row was read in this transaction (see the class's note).
            self._threads[thread_id] = cached
            return
        if not values or not values.keys() <= _THREAD_COLUMNS:   # the error it always gave
            self.c.execute(update(threads).where(threads.c.id == thread_id).values(**values))
            return
        _D_UPDATE_THREAD.execute(self.c, {**values, "_thread_id": thread_id}, keyed=True)
        if cached is not None and all(_same_read_back(getattr(cached, k), v)
                                      for k, v in values.items()):
            self._threads[thread_id] = replace(cached, **values)

    def threads(self, state: str | None = None, authority: str | None = None) -> list[Thread]:
        q = select(threads).order_by(threads.c.id)
        if state:
            q = q.where(threads.c.state == state)
        if authority:
            q = q.where(threads.c.authority == authority)
        return [_thread(r) for r in self.c.execute(q)]

    # -- messages -----------------------------------------------------------------------
    def add_message(self, *, authentication: str | None = None, **values: Any) -> int:
        """Store one message. `authentication`: our own Authentication-Results value (RFC
        8601) for mail received, as `mailflow.core.authentication` writes it."""
        if authentication is not None:
            values["authentication"] = authentication[:4000]
        values.setdefault("created_at", utcnow())
        values.setdefault("flags", [])
        values.setdefault("hidden", False)
        if values.get("direction") == "out" and values.get("message_id"):
            self._our_mids.pop(values["message_id"], None)   # ours from now on
        # PostgreSQL's text cannot hold NUL, which decoded mail sometimes has (the raw bytes,
        # kept whole in raw_messages, are untouched): U+FFFD marks where one was.
        pk = _D_INSERT_MESSAGE.insert(self.c, _no_nul_values(values))
        assert pk is not None
        return pk

    def messages(self, thread_id: int) -> list[StoredMessage]:
        q = select(messages).where(messages.c.thread_id == thread_id).order_by(messages.c.id)
        return [_message(r) for r in self.c.execute(q)]

    def message(self, pk: int) -> StoredMessage | None:
        row = self.c.execute(_MESSAGE_BY_ID, {"pk": pk}).first()
        return _message(row) if row else None

    def thread_messages_with_id(self, thread_id: int, message_id: str) -> list[StoredMessage]:
        return [_message_of(r) for r in _D_MESSAGES_WITH_ID.rows(self.c, {"mid": message_id})
                if r["thread_id"] == thread_id]

    def outgoing_by_message_id(self, message_ids: list[str]) -> list[StoredMessage]:
        if not message_ids:
            return []
        q = select(messages).where(messages.c.direction == "out",
                                   messages.c.message_id.in_(message_ids))
        return [_message(r) for r in self.c.execute(q)]

    def last_incoming(self, thread_id: int, kind: str = "response") -> StoredMessage | None:
        q = (select(messages).where(messages.c.thread_id == thread_id,
                                    messages.c.direction == "in", messages.c.kind == kind)
             .order_by(messages.c.id.desc()).limit(1))
        row = self.c.execute(q).first()
        return _message(row) if row else None

    def threads_for_message_ids(self, message_ids: list[str]) -> dict[str, int]:
        """Our own sent Message-IDs among these, and the thread each belongs to.

        The answer for each Message-ID is remembered for the transaction (replies in a batch
        name the same few requests); `add_message` forgets one when mailflow sends it."""
        if not message_ids:
            return {}
        mids = message_ids[:MESSAGE_IDS_ASKED]
        known = self._our_mids
        ask = [m for m in dict.fromkeys(mids) if m not in known]
        if ask:
            found = {r["message_id"]: r["thread_id"] for r in _our_message_ids(len(ask)).rows(
                self.c, {f"mid{i}": m for i, m in enumerate(ask)})}
            for m in ask:
                known[m] = found.get(m)
        return {m: t for m in mids if (t := known[m]) is not None}

    def open_threads(self, authorities: set[str] | None = None) -> list[Thread]:
        """Threads that were sent and that someone may still write to."""
        q = select(threads).where(threads.c.sent_at.is_not(None), threads.c.allow != "nobody")
        if authorities is not None:
            q = q.where(threads.c.authority.in_(sorted(authorities)))
        return [_thread(r) for r in self.c.execute(q.order_by(threads.c.id))]

    # -- the directory of authority senders ----------------------------------------------
    def learned_senders(self, authority: str | None = None) -> list[tuple[str, str, bool]]:
        """(authority, address, learned from Reply-To) for every learned sender.

        The whole directory is read once per transaction (it is small: a few addresses per
        authority) and filtered here; `learn_sender` forgets it."""
        if self._learned is None:
            self._learned = [(a, addr, bool(rt)) for a, addr, rt in self.c.execute(_LEARNED_ALL)]
        if authority is None:
            return list(self._learned)
        return [s for s in self._learned if s[0] == authority]

    def learn_sender(self, authority: str, address: str, *, reply_to: bool,
                     thread_id: int | None) -> bool:
        """Record an address as a known sender for the authority; True if it is new.

        Once per transaction for each (authority, address): a second message from the same
        sender in a batch would only move its last_seen by a fraction of a second."""
        if (authority, address) in self._seen_senders:
            return False
        self._seen_senders.add((authority, address))
        now = utcnow()
        found = _D_SENDER_ID.first(self.c, {"authority": authority, "address": address})
        if found:
            _D_SENDER_SEEN.execute(self.c, {"sender_id": found["id"], "now": now})
            return False
        self._learned = None
        _D_INSERT_SENDER.insert(self.c, {
            "authority": authority, "address": address, "reply_to": reply_to,
            "thread_id": thread_id, "first_seen": now, "last_seen": now})
        return True

    # -- outbox -------------------------------------------------------------------------
    def enqueue(self, message_pk: int, thread_id: int | None, mail_from: str, rcpt: str, *,
                compose: str | None = None) -> int:
        now = utcnow()
        pk = _D_INSERT_OUTBOX.insert(self.c, {
            "message_pk": message_pk, "thread_id": thread_id, "mail_from": mail_from,
            "rcpt": rcpt, "state": "queued", "attempts": 0, "next_attempt_at": now,
            "created_at": now, "compose": compose})
        assert pk is not None
        return pk

    def outbox_composed(self, row_id: int, message_pk: int) -> bool:
        """A row's message has been composed and stored: it now names that message. False if
        the row was composed already (by another sender): the caller must roll back."""
        return self.c.execute(_OUTBOX_COMPOSED, {"row_id": row_id,
                                                 "composed_pk": message_pk}).rowcount == 1

    def claim_outbox(self, now: datetime, lease: timedelta, ids: list[int] | None = None,
                     limit: int = 50, owner: str | None = None) -> list[OutboxRow]:
        """Take due rows for delivery; a lease that runs out (a crashed sender) frees them.

        The lease names its holder (this process, host:pid) so that a holder known to be
        dead has its rows released at once (`mailflow.instances`)."""
        due = or_(and_(outbox.c.state == "queued", outbox.c.next_attempt_at <= now),
                  and_(outbox.c.state == "sending", outbox.c.claimed_until < now))
        q = select(outbox).where(due).order_by(outbox.c.next_attempt_at, outbox.c.id).limit(limit)
        if ids is not None:
            q = q.where(outbox.c.id.in_(ids))
        if self.c.dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        rows = [_outbox(r) for r in self.c.execute(q)]
        if rows:
            self.c.execute(update(outbox).where(outbox.c.id.in_([r.id for r in rows]))
                           .values(state="sending", claimed_until=now + lease,
                                   claimed_by=owner or logs.INSTANCE))
        return rows

    def outbox_sent(self, row_id: int, result: str) -> None:
        self.c.execute(_OUTBOX_SENT, {"row_id": row_id, "sent_now": utcnow(),
                                      "sent_result": result})

    def outbox_requeue(self, row_id: int, note: str, at: datetime) -> None:
        """Give a claimed row back for another try at `at`, not counted as an attempt (the
        try never got as far as the row's own work: a database conflict)."""
        self.c.execute(update(outbox).where(outbox.c.id == row_id).values(
            state="queued", last_error=note, next_attempt_at=at, claimed_until=None,
            claimed_by=None))

    def outbox_retry(self, row_id: int, error: str, at: datetime) -> None:
        self.c.execute(update(outbox).where(outbox.c.id == row_id).values(
            state="queued", last_error=error, next_attempt_at=at, claimed_until=None,
            attempts=outbox.c.attempts + 1))

    def outbox_failed(self, row_id: int, error: str) -> None:
        self.c.execute(update(outbox).where(outbox.c.id == row_id).values(
            state="failed", last_error=error, claimed_until=None,
            attempts=outbox.c.attempts + 1))

    def outbox_rows(self, state: str | None = None) -> list[OutboxRow]:
        q = select(outbox).order_by(outbox.c.id)
        if state:
            q = q.where(outbox.c.state == state)
        return [_outbox(r) for r in self.c.execute(q)]

    def next_outbox_due(self) -> datetime | None:
        q = select(func.min(outbox.c.next_attempt_at)).where(outbox.c.state == "queued")
        return _aware(self.c.execute(q).scalar())

    # -- reminders and thread events -------------------------------------------------------
    def add_reminder(self, thread_id: int, kind: str, event: str, due_at: datetime) -> bool:
        """Plan a reminder unless one for the same (thread, kind, event) exists; True if new.

        One INSERT … ON CONFLICT DO NOTHING on the unique (thread, kind, event), which also
        settles a race with another daemon without a savepoint. A (thread, kind, event)
        already planned or found in this transaction is not asked for again."""
        key = (thread_id, kind, event)
        if key in self._planned:
            return False
        self._planned.add(key)
        direct = _D_INSERT_REMINDER.get(self.c.dialect.name)
        if direct is not None:
            return direct.insert(self.c, {
                "thread_id": thread_id, "kind": kind, "event": event, "due_at": due_at,
                "state": "pending", "created_at": utcnow()}) is not None
        q = select(reminders.c.id).where(reminders.c.thread_id == thread_id,
                                         reminders.c.kind == kind, reminders.c.event == event)
        if self.c.execute(q).first() is not None:
            return False
        try:
            with self.c.begin_nested():
                self.c.execute(insert(reminders).values(
                    thread_id=thread_id, kind=kind, event=event, due_at=due_at,
                    state="pending", created_at=utcnow()))
        except IntegrityError:  # another daemon planned it at the same moment
            return False
        return True

    def due_reminders(self, now: datetime, limit: int = 500) -> list[Reminder]:
        q = (select(reminders).where(reminders.c.state == "pending", reminders.c.due_at <= now)
             .order_by(reminders.c.due_at, reminders.c.id).limit(limit))
        if self.c.dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        return [_reminder(r) for r in self.c.execute(q)]

    def settle_reminder(self, reminder_id: int, state: str, note: str) -> bool:
        """Move a pending reminder to sent/skipped; False if someone else already did."""
        res = self.c.execute(_SETTLE_REMINDER, {"_id": reminder_id, "state": state,
                                                "done_at": utcnow(), "note": note})
        return res.rowcount == 1

    def reminders(self, thread_id: int | None = None, state: str | None = None) -> list[Reminder]:
        q = select(reminders).order_by(reminders.c.due_at, reminders.c.id)
        if thread_id is not None:
            q = q.where(reminders.c.thread_id == thread_id)
        if state is not None:
            q = q.where(reminders.c.state == state)
        return [_reminder(r) for r in self.c.execute(q)]

    def add_event(self, thread_id: int, actor: str, kind: str,
                  detail: dict[str, Any] | None = None) -> None:
        _D_INSERT_EVENT.insert(self.c, {"thread_id": thread_id, "at": utcnow(), "actor": actor,
                                        "kind": kind, "detail": _no_nul(detail)})

    def events(self, thread_id: int) -> list[dict[str, Any]]:
        q = (select(thread_events).where(thread_events.c.thread_id == thread_id)
             .order_by(thread_events.c.id))
        return [{"at": _aware(r.at), "actor": r.actor, "kind": r.kind, "detail": r.detail}
                for r in self.c.execute(q)]

    def clock_threads(self) -> list[Thread]:
        """Threads whose clock runs (for recomputing due dates when the calendar changes)."""
        q = select(threads).where(threads.c.clock_start.is_not(None),
                                  threads.c.state.in_(["waiting_response", "internal_review"]))
        return [_thread(r) for r in self.c.execute(q.order_by(threads.c.id))]

    # -- fault reports ----------------------------------------------------------------------
    def create_report(self, thread_id: int, **values: Any) -> None:
        """The report row of a new thread of kind "report"; any field may still be unknown."""
        unknown = set(values) - _REPORT_FIELDS
        if unknown:
            raise ValueError(f"not report fields: {', '.join(sorted(unknown))}")
        self.c.execute(insert(reports).values(thread_id=thread_id, updated_at=utcnow(),
                                              **_no_nul_values(values)))

    def report(self, thread_id: int) -> Report | None:
        row = self.c.execute(select(reports).where(reports.c.thread_id == thread_id)).first()
        return _report(row) if row else None

    def update_report(self, thread_id: int, **values: Any) -> None:
        unknown = set(values) - _REPORT_FIELDS
        if unknown:
            raise ValueError(f"not report fields: {', '.join(sorted(unknown))}")
        self.c.execute(update(reports).where(reports.c.thread_id == thread_id)
                       .values(updated_at=utcnow(), **_no_nul_values(values)))

    def reports(self, states: list[str] | tuple[str, ...] | set[str] | None = None,
                category: str | None = None, area: str | None = None) -> list[Report]:
        """Reports, oldest first, filtered by their thread's state, category and area."""
        q = (select(reports).join(threads, threads.c.id == reports.c.thread_id)
             .order_by(reports.c.thread_id))
        if states is not None:
            q = q.where(threads.c.state.in_(sorted(states)))
        if category is not None:
            q = q.where(reports.c.category == category)
        if area is not None:
            q = q.where(reports.c.area == area)
        return [_report(r) for r in self.c.execute(q)]

    def open_reports_near(self, category: str, point: Any, distance_m: float,
                          exclude: int | None = None) -> list[tuple[Report, float]]:
        """Open reports (sent, not fixed) of a category within `distance_m` of `point`
        (anything with .lat and .lon), nearest first, with their distance in metres.

        A bounding box narrows the rows in SQL (plain columns, so SQLite and PostgreSQL alike);
        the exact great-circle distance decides.
        """
        import math

        from mailflow.core.geo import Point, distance_m as dist
        lat_pad = distance_m / 111_000 + 1e-6
        lon_pad = distance_m / (111_000 * max(math.cos(math.radians(point.lat)), 0.01)) + 1e-6
        q = (select(reports).join(threads, threads.c.id == reports.c.thread_id)
             .where(threads.c.state == "open", reports.c.category == category,
                    reports.c.lat.between(point.lat - lat_pad, point.lat + lat_pad),
                    reports.c.lon.between(point.lon - lon_pad, point.lon + lon_pad))
             .order_by(reports.c.thread_id))
        if exclude is not None:
            q = q.where(reports.c.thread_id != exclude)
        here = Point(point.lat, point.lon)
        out = []
        for row in self.c.execute(q):
            r = _report(row)
            assert r.lat is not None and r.lon is not None
            d = dist(here, Point(r.lat, r.lon))
            if d <= distance_m:
                out.append((r, d))
        return sorted(out, key=lambda rd: (rd[1], rd[0].thread_id))

    # -- the admin queue ------------------------------------------------------------------
    def add_queue_item(self, reason: str, summary: str, *, raw_sha256: str | None = None,
                       thread_id: int | None = None, detail: dict[str, Any] | None = None) -> int:
        pk = _D_INSERT_QUEUE_ITEM.insert(self.c, {
            "reason": reason, "state": "open", "summary": _no_nul(summary),
            "raw_sha256": raw_sha256, "thread_id": thread_id, "detail": _no_nul(detail),
            "created_at": utcnow(),
        })
        assert pk is not None
        return pk

    def queue(self, include_decided: bool = False, reason: str | None = None) -> list[QueueItem]:
        q = select(queue_items).order_by(queue_items.c.id)
        if not include_decided:
            q = q.where(queue_items.c.state == "open")
        if reason:
            q = q.where(queue_items.c.reason == reason)
        return [_queue(r) for r in self.c.execute(q)]

    def queue_item(self, item_id: int) -> QueueItem | None:
        row = self.c.execute(select(queue_items).where(queue_items.c.id == item_id)).first()
        return _queue(row) if row else None

    def decide(self, item_id: int, decision: str, actor: str) -> bool:
        """Close an open item; False if it was already decided (by someone else, perhaps)."""
        res = self.c.execute(update(queue_items).where(queue_items.c.id == item_id,
                                                       queue_items.c.state == "open")
                             .values(state="decided", decision=decision, decided_by=actor,
                                     decided_at=utcnow()))
        return res.rowcount == 1

    def audit(self, actor: str, action: str, *, thread_id: int | None = None,
              target: str | None = None, reason: str | None = None,
              detail: dict[str, Any] | None = None) -> None:
        self.c.execute(insert(audit_log).values(at=utcnow(), actor=actor, action=action,
                                                thread_id=thread_id, target=_no_nul(target),
                                                reason=_no_nul(reason), detail=_no_nul(detail)))

    def audit_entries(self, thread_id: int | None = None) -> list[dict[str, Any]]:
        q = select(audit_log).order_by(audit_log.c.id)
        if thread_id is not None:
            q = q.where(audit_log.c.thread_id == thread_id)
        return [{"id": r.id, "at": _aware(r.at), "actor": r.actor, "action": r.action,
                 "thread_id": r.thread_id, "target": r.target, "reason": r.reason,
                 "detail": r.detail} for r in self.c.execute(q)]

    def set_message_hidden(self, pk: int, hidden: bool) -> None:
        self.c.execute(update(messages).where(messages.c.id == pk).values(hidden=hidden))

    def counts(self) -> dict[str, int]:
        def n(table: Any, *where: Any) -> int:
            return int(self.c.execute(select(func.count()).select_from(table).where(*where)).scalar() or 0)
        return {
            "threads": n(threads),
            "messages": n(messages),
            "outbox_queued": n(outbox, outbox.c.state.in_(["queued", "sending"])),
            "outbox_failed": n(outbox, outbox.c.state == "failed"),
            "queue_open": n(queue_items, queue_items.c.state == "open"),
        }


# PostgreSQL's deadlock_detected, serialization_failure, lock_not_available.
_CONFLICT_STATES = frozenset({"40P01", "40001", "55P03"})


def is_conflict(e: BaseException) -> bool:
    """Whether `e` is a clash between concurrent transactions, not a problem with what was
    being written: PostgreSQL chose this one to abort (a deadlock, a serialization failure,
    a lock wait over `lock_timeout`), or SQLite's write lock stayed busy. Trying the same
    work again shortly is the cure."""
    if isinstance(e, StoreError) and isinstance(e.__cause__, BaseException):
        e = e.__cause__
    if not isinstance(e, (OperationalError, sqlite3.OperationalError)):
        return False
    orig = getattr(e, "orig", e)
    return (getattr(orig, "sqlstate", None) in _CONFLICT_STATES
            or "database is locked" in str(orig))


class Store:
    def __init__(self, url: str):
        self.engine: Engine = db.make_engine(url)

    def migrate(self) -> "Store":
        db.migrate(self.engine)
        return self

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        try:
            with self.engine.begin() as conn:
                yield Tx(conn)
        except OperationalError as e:
            raise StoreError(f"database error: {e.orig}") from e

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A transaction that only reads: on SQLite it does not take the write lock, so
        readers (RCPT checks, admin commands) never wait behind the pipeline."""
        try:
            with self.engine.connect().execution_options(mailflow_readonly=True) as conn:
                with conn.begin():
                    yield Tx(conn)
        except OperationalError as e:
            raise StoreError(f"database error: {e.orig}") from e

    def close(self) -> None:
        self.engine.dispose()


__all__ = ["Store", "Tx", "Thread", "StoredMessage", "OutboxRow", "QueueItem", "Report",
           "IntegrityError", "utcnow"]
