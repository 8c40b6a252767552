"""Read-only queries of the archive build: every thread's messages and events at once.

`Tx.messages(thread_id)` and `Tx.events(thread_id)` are one query each; a build of 10,000
threads made 20,000 of them, each built, cache-keyed and run through SQLAlchemy. These read
the same rows, in the same order and the same shapes (`StoredMessage`, the event dicts), in
one query per table, grouped by thread. They use the store's tables directly and never write.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import select

from mailflow.store.repository import StoredMessage, _aware, _message
from mailflow.store.tables import messages, thread_events


def messages_by_thread(tx: Any) -> dict[int, list[StoredMessage]]:
    """Every message that belongs to a thread, by thread id, each list ordered by id (as
    `Tx.messages` orders it)."""
    out: dict[int, list[StoredMessage]] = {}
    q = (select(messages).where(messages.c.thread_id.is_not(None))
         .order_by(messages.c.thread_id, messages.c.id))
    for row in tx.c.execute(q):
        m = _message(row)
        out.setdefault(m.thread_id, []).append(m)  # type: ignore[arg-type]
    return out


def events_by_thread(tx: Any) -> dict[int, list[dict[str, Any]]]:
    """Every thread event, by thread id, each list ordered by id, as `Tx.events` gives them."""
    out: dict[int, list[dict[str, Any]]] = {}
    q = select(thread_events).order_by(thread_events.c.thread_id, thread_events.c.id)
    for r in tx.c.execute(q):
        out.setdefault(r.thread_id, []).append(
            {"at": _aware(r.at), "actor": r.actor, "kind": r.kind, "detail": r.detail})
    return out
