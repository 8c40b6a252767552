"""Statements sent straight to the driver (`mailflow.store.direct`): they must write and read
exactly what SQLAlchemy's own `Connection.execute` writes and reads for the same values (the
same bind and result processors), raise SQLAlchemy's errors, and still be seen by the cursor
events. Checked against SQLAlchemy's path on SQLite and PostgreSQL (the `store` fixture)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event, insert, select
from sqlalchemy.exc import IntegrityError

from mailflow.store import repository
from mailflow.store.direct import Direct
from mailflow.store.repository import Store, Tx
from mailflow.store.tables import deliveries, messages, outbox, queue_items, threads

WHEN = datetime(2026, 11, 27, 14, 3, 5, 123456, tzinfo=timezone.utc)


def _thread(tx: Tx, **over: Any) -> int:
    values = dict(state="waiting_response", authority="camden", law="uk-foia", title="T\u00e9",
                  body="b", citizen_email="c@d.example", citizen_name="C", request_token="r1",
                  reply_token="r2")
    values.update(over)
    return tx.create_thread(**values)


MESSAGE_VALUES: list[dict[str, Any]] = [
    # every column given, with what mail brings: non-ASCII, a NUL, nested JSON, an aware date
    dict(direction="in", kind="response", message_id="<a@x>", from_addr="a@x.example",
         from_name="Ana \u00d1", to_addrs=["r@ask.example", "c\u00e9@x"], subject="S\x00ubj",
         date=WHEN, text="caf\u00e9\x00", classification="reply", classification_reason="r",
         match_method="reply_address",
         match_detail={"evidence": [{"thread_id": 1, "strong": True, "detail": "d\x00"}],
                       "n": 1.5, "none": None},
         flags=["held"], authentication="dkim=pass", hidden=True),
    # the least a caller gives: the columns' own defaults fill in the rest
    dict(direction="out", kind="request", message_id=None, date=None, match_detail=None),
]


@pytest.mark.parametrize("values", MESSAGE_VALUES, ids=["full", "least"])
def test_a_message_written_through_the_driver_reads_back_as_sqlalchemy_writes_it(
        store: Store, values: dict[str, Any]) -> None:
    with store.tx() as tx:
        tid = _thread(tx)
        sha = tx.put_raw(b"raw bytes")
        direct_pk = tx.add_message(thread_id=tid, raw_sha256=sha, created_at=WHEN,
                                   **{k: v for k, v in values.items() if k != "authentication"},
                                   authentication=values.get("authentication"))
        # The same through SQLAlchemy, as add_message wrote it before (defaults: the table's).
        sa_values = repository._no_nul_values(
            {"thread_id": tid, "raw_sha256": sha, "created_at": WHEN, "flags": [],
             "hidden": False, **values})
        sa_pk = int(tx.c.execute(insert(messages), sa_values).inserted_primary_key[0])
        assert direct_pk != sa_pk
        rows = {r.id: {k: v for k, v in r._mapping.items() if k != "id"}
                for r in tx.c.execute(select(messages).where(messages.c.id.in_(
                    [direct_pk, sa_pk])))}
        assert rows[direct_pk] == rows[sa_pk]
        # Read through the driver: the same values SQLAlchemy's result gives.
        if values.get("message_id"):
            (got,) = [m for m in tx.thread_messages_with_id(tid, values["message_id"])
                      if m.id == direct_pk]
            assert got == tx.message(direct_pk)


def test_a_thread_read_through_the_driver_is_the_one_sqlalchemy_reads(store: Store) -> None:
    with store.tx() as tx:
        tid = _thread(tx, confirmed_at=WHEN, sent_at=WHEN - timedelta(days=3),
                      due_date=WHEN.date(), awaiting_description=True)
        direct = tx.thread(tid)
        row = tx.c.execute(select(threads).where(threads.c.id == tid)).one()
        assert direct == repository._thread(row)
        assert direct is not None and direct.sent_at is not None and direct.sent_at.tzinfo
        tx.update_thread(tid, state="successful", due_date=(WHEN + timedelta(days=1)).date(),
                         delivery_detail="x\x00y")
        tx.forget()
        again = tx.thread(tid)
        row = tx.c.execute(select(threads).where(threads.c.id == tid)).one()
        assert again == repository._thread(row)
        assert again is not None and again.state == "successful"
        assert again.delivery_detail == "x\ufffdy"
        assert tx.thread(tid + 1000) is None


def test_deliveries_outbox_and_queue_rows_are_written_as_sqlalchemy_writes_them(
        store: Store) -> None:
    with store.tx() as tx:
        tid = _thread(tx)
        sha = tx.put_raw(b"r")
        assert not tx.delivery_seen(sha, "request-1")
        env = {"mail_from": "a@b", "rcpt_tos": ["x@y"], "via": "smtp", "peer": None}
        tx.record_delivery(sha, "request-1", env, "response", None)
        tx.record_delivery(sha, "request-2", env, "queued", {"thread_id": tid, "why": "\u00e9"})
        assert tx.delivery_seen(sha, "request-1") and tx.delivery_seen(sha, "request-2")
        got = [(r.rcpt, r.envelope, r.outcome, r.detail) for r in tx.c.execute(
            select(deliveries).order_by(deliveries.c.id))]
        assert got == [("request-1", env, "response", None),
                       ("request-2", env, "queued", {"thread_id": tid, "why": "\u00e9"})]
        pk = tx.add_message(thread_id=tid, direction="out", kind="request", raw_sha256=sha)
        row_id = tx.enqueue(pk, tid, "b@ask.example", "foi@x.example", compose="forward")
        (row,) = tx.outbox_rows()
        assert (row.id, row.message_pk, row.state, row.attempts, row.compose) == (
            row_id, pk, "queued", 0, "forward")
        assert row.next_attempt_at.tzinfo is not None
        q = tx.add_queue_item("spam", "s\x00", raw_sha256=sha, thread_id=tid,
                              detail={"a": ["b\x00"]})
        (item,) = tx.c.execute(select(queue_items)).all()
        assert (item.id, item.state, item.summary, item.detail) == (
            q, "open", "s\ufffd", {"a": ["b\ufffd"]})
        with pytest.raises(IntegrityError):   # SQLAlchemy's error, as before
            with tx.c.begin_nested():
                tx.record_delivery(sha, "request-1", env, "response", None)
        with pytest.raises(IntegrityError):
            with tx.c.begin_nested():
                tx.add_message(thread_id=tid, direction="in", kind="x", raw_sha256="0" * 64)
        assert len(tx.c.execute(select(outbox)).all()) == 1


def test_a_reminder_says_whether_it_was_new(store: Store) -> None:
    with store.tx() as tx:
        tid = _thread(tx)
        assert tx.add_reminder(tid, "overdue", "e1", WHEN)
        assert not tx.add_reminder(tid, "overdue", "e1", WHEN)   # remembered
    with store.tx() as tx:
        assert not tx.add_reminder(tid, "overdue", "e1", WHEN)   # asked: there already
        assert tx.add_reminder(tid, "overdue", "e2", WHEN)
        assert [r.event for r in tx.reminders(tid)] == ["e1", "e2"]


def test_statements_through_the_driver_are_seen_by_the_cursor_events(store: Store) -> None:
    seen: list[str] = []

    def spy(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append(statement.split()[0].upper())
    event.listen(store.engine, "before_cursor_execute", spy)
    with store.tx() as tx:
        tid = _thread(tx)
        seen.clear()
        tx.forget()
        tx.thread(tid)
        tx.delivery_seen("0" * 64, "x")
    assert seen == ["SELECT", "SELECT"]


def test_our_message_ids_are_remembered_and_forgotten_when_we_send_one(store: Store) -> None:
    with store.tx() as tx:
        tid = _thread(tx)
        sha = tx.put_raw(b"r")
        tx.add_message(thread_id=tid, direction="out", kind="request", message_id="<req@ask>",
                       raw_sha256=sha)
        tx.add_message(thread_id=tid, direction="in", kind="response", message_id="<in@x>",
                       raw_sha256=sha)
    with store.tx() as tx:
        asked = ["<req@ask>", "<in@x>", "<later@ask>", "<req@ask>"]
        assert tx.threads_for_message_ids(asked) == {"<req@ask>": tid}
        # Sent in this transaction after it was asked about: ours from now on.
        tx.add_message(thread_id=tid, direction="out", kind="followup",
                       message_id="<later@ask>", raw_sha256=sha)
        assert tx.threads_for_message_ids(asked) == {"<req@ask>": tid, "<later@ask>": tid}
        with tx.c.begin_nested() as sp:
            tx.add_message(thread_id=tid, direction="out", kind="followup",
                           message_id="<undone@ask>", raw_sha256=sha)
            assert tx.threads_for_message_ids(["<undone@ask>"]) == {"<undone@ask>": tid}
            sp.rollback()
        tx.forget()
        assert tx.threads_for_message_ids(["<undone@ask>"]) == {}
        many = [f"<m{i}@x>" for i in range(300)] + ["<req@ask>"]
        assert tx.threads_for_message_ids(many) == {}   # only the first 200 are asked


def test_a_statement_the_driver_path_cannot_take_goes_through_sqlalchemy(
        store: Store) -> None:
    """An INSERT whose column has a Python-side default the caller did not give is filled in
    as SQLAlchemy fills it; an expanding IN is left to SQLAlchemy."""
    from sqlalchemy import bindparam
    d = Direct(select(threads.c.id).where(threads.c.id.in_(bindparam("ids", expanding=True))))
    with store.tx() as tx:
        tid = _thread(tx)
        assert d.rows(tx.c, {"ids": [tid, tid + 1]}) == [{"id": tid}]
        ins = Direct(insert(queue_items), pk=queue_items.c.id)
        pk = ins.insert(tx.c, {"reason": "r", "created_at": WHEN})   # state, summary defaulted
        row = tx.c.execute(select(queue_items).where(queue_items.c.id == pk)).one()
        assert (row.state, row.summary, row.detail) == ("open", "", None)
