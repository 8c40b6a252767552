"""Read-only queries of the archive build: every thread's messages and events at once.

`Tx.messages(thread_id)` and `Tx.events(thread_id)` are one query each; a build of 10,000
threads made 20,000 of them, each built, cache-keyed and run through SQLAlchemy. These read
the same rows, in the same order and the same shapes (`StoredMessage`, the event dicts), in
one query per table, grouped by thread. They use the store's tables directly and never write.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import select

from mailflow.store.repository import StoredMessage, _aware
from mailflow.store.tables import messages, thread_events

# Rows are read by position: going through each row's `_mapping` (as the repository's
# `_message` does) builds its keys again for every row, most of the time of 50,000 rows.
_FIELDS = tuple(StoredMessage.__dataclass_fields__)


def messages_by_thread(tx: Any) -> dict[int, list[StoredMessage]]:
    """Every message that belongs to a thread, by thread id, each list ordered by id (as
    `Tx.messages` orders it)."""
    out: dict[int, list[StoredMessage]] = {}
    q = (select(*(messages.c[f] for f in _FIELDS)).where(messages.c.thread_id.is_not(None))
         .order_by(messages.c.thread_id, messages.c.id))
    i_date, i_created = _FIELDS.index("date"), _FIELDS.index("created_at")
    for row in tx.c.execute(q):
        values = list(row)
        values[i_date], values[i_created] = _aware(values[i_date]), _aware(values[i_created])
        m = StoredMessage(*values)
        out.setdefault(m.thread_id, []).append(m)  # type: ignore[arg-type]
    return out


def events_by_thread(tx: Any) -> dict[int, list[dict[str, Any]]]:
    """Every thread event, by thread id, each list ordered by id, as `Tx.events` gives them."""
    out: dict[int, list[dict[str, Any]]] = {}
    c = thread_events.c
    q = select(c.thread_id, c.at, c.actor, c.kind, c.detail).order_by(c.thread_id, c.id)
    for thread_id, at, actor, kind, detail in tx.c.execute(q):
        out.setdefault(thread_id, []).append(
            {"at": _aware(at), "actor": actor, "kind": kind, "detail": detail})
    return out
