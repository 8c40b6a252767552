"""Read-only queries of the archive build: every thread's messages and events at once.

`Tx.messages(thread_id)` and `Tx.events(thread_id)` are one query each; a build of 10,000
threads made 20,000 of them, each built, cache-keyed and run through SQLAlchemy. These read
the same rows, in the same order (the event dicts in `Tx.events`' shape; of messages, the
summary a fingerprint needs), in one query per table, grouped by thread, by position (going
through each row's `_mapping` builds its keys again for every row). They use the store's
tables directly and never write.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from mailflow.store.repository import _aware
from mailflow.store.tables import messages, thread_events


def events_by_thread(tx: Any) -> dict[int, list[dict[str, Any]]]:
    """Every thread event, by thread id, each list ordered by id, as `Tx.events` gives them."""
    out: dict[int, list[dict[str, Any]]] = {}
    c = thread_events.c
    q = select(c.thread_id, c.at, c.actor, c.kind, c.detail).order_by(c.thread_id, c.id)
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


def message_summaries_by_thread(tx: Any) -> dict[int, list[MessageSummary]]:
    """`MessageSummary` of every message that belongs to a thread, by thread id, in id
    order (as `Tx.messages` orders them)."""
    out: dict[int, list[MessageSummary]] = {}
    q = (select(*(messages.c[f] for f in _SUMMARY)).where(messages.c.thread_id.is_not(None))
         .order_by(messages.c.thread_id, messages.c.id))
    i_created = _SUMMARY.index("created_at")
    for row in tx.c.execute(q):
        values = list(row)
        values[i_created] = _aware(values[i_created])
        m = MessageSummary(*values)
        out.setdefault(m.thread_id, []).append(m)
    return out
