"""`thread_changes` (migration 0011): every write that can change what a thread shows marks
the thread, by trigger, at or above the watermark of any read that could not see the write —
what lets the archive's incremental build visit only the changed threads. On SQLite and
PostgreSQL."""
from __future__ import annotations


import pytest
from sqlalchemy import text, update

from conftest import Site
from mailflow.archive import reading
from mailflow.store.repository import Store
from mailflow.store.tables import messages


def _thread(tx, n: int = 1) -> int:  # type: ignore[no-untyped-def]
    return tx.create_thread(state="waiting_response", authority="camden", law="uk-foia",
                            title="t", body="b", citizen_email="c@d.example", citizen_name="C",
                            request_token=f"tok1tok1tok{n}", reply_token=f"tok2tok2tok{n}")


def _changed_since(store: Store, mark: int) -> set[int]:
    with store.read() as tx:
        return reading.changed_threads(tx, mark)


def _mark(store: Store) -> int:
    with store.read() as tx:
        return reading.watermark(tx)


def test_every_write_path_marks_its_thread(store: Store) -> None:
    # On PostgreSQL the watermark is the oldest transaction still open on the whole server
    # (another test's, say): what it answers is a superset, exact only on SQLite.
    exact = store.engine.dialect.name == "sqlite"
    with store.tx() as tx:
        a, b = _thread(tx, 1), _thread(tx, 2)
        sha = tx.put_raw(b"Subject: x\r\n\r\nbody\r\n")
    steps = {
        "a new thread": lambda tx: _thread(tx, 3),
        "its row": lambda tx: tx.update_thread(a, state="successful"),
        "a message": lambda tx: tx.add_message(thread_id=a, direction="in", kind="response",
                                               raw_sha256=sha),
        "an event": lambda tx: tx.add_event(a, "mailflow", "clock", {"x": 1}),
        "a hidden message": lambda tx: tx.set_message_hidden(first, True),
        "a report": lambda tx: tx.create_report(a, category="pothole"),
        "its report": lambda tx: tx.update_report(a, area="wessex"),
        "straight SQL": lambda tx: tx.c.execute(update(messages).where(messages.c.id == first)
                                                .values(hidden=False)),
    }
    if exact:   # an outer conflict clause does not turn the trigger's upsert into it
        steps["INSERT OR IGNORE"] = lambda tx: tx.c.exec_driver_sql(
            "INSERT OR IGNORE INTO thread_events (thread_id, at, actor, kind) "
            "VALUES (?, '2026-01-01', 'x', 'y')", (a,))
    with store.tx() as tx:
        first = tx.add_message(thread_id=a, direction="in", kind="response", raw_sha256=sha)
    for what, write in steps.items():
        mark = _mark(store)
        with store.tx() as tx:
            made = write(tx)
        changed = _changed_since(store, mark)
        assert (made if what == "a new thread" else a) in changed, what
        if exact:
            assert b not in changed, what
            assert _changed_since(store, _mark(store)) == set(), what
    # A message moved to another thread changes both; a message with no thread, none.
    mark = _mark(store)
    with store.tx() as tx:
        tx.c.execute(update(messages).where(messages.c.id == first).values(thread_id=b))
    assert {a, b} <= _changed_since(store, mark)
    mark = _mark(store)
    with store.tx() as tx:
        tx.add_message(thread_id=None, direction="in", kind="response", raw_sha256=sha)
    if exact:
        assert _changed_since(store, mark) == set()


def test_a_write_not_yet_committed_is_seen_by_the_next_read(store: Store) -> None:
    """A build reads while a write is under way: the write's mark is at or above the
    watermark of that read, so the build after it sees the thread."""
    with store.tx() as tx:
        a = _thread(tx)
    if store.engine.dialect.name == "sqlite":
        # One writer at a time: the read's snapshot is taken while the writer holds its lock.
        conn = store.engine.raw_connection()
        try:
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            cur.execute("UPDATE threads SET state = 'successful' WHERE id = ?", (a,))
            mark = _mark(store)
            assert a not in _changed_since(store, mark)
            cur.execute("COMMIT")
        finally:
            conn.close()
    else:
        with store.engine.connect() as writer:
            writer.execute(text("UPDATE threads SET state = 'successful' WHERE id = :a"),
                           {"a": a})
            mark = _mark(store)      # the writer is still open: its xid is not below
            writer.commit()
    assert a in _changed_since(store, mark)
