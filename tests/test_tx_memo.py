"""What a transaction (`Tx`) remembers so that a batch of messages asks the store less: the
blocked list, the senders already seen, the reminders already planned. Each must give the
same answers as asking the database every time, also after a write in the same transaction
and after a savepoint rolls back. On SQLite and PostgreSQL."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import select, text

from conftest import Site
from mailflow.store import repository
from mailflow.store.repository import Store
from mailflow.store.tables import authority_senders, reminders


def _thread(tx: repository.Tx) -> int:
    return tx.create_thread(state="waiting_response", authority="camden", law="uk-foia",
                            title="t", body="b", citizen_email="c@d.example", citizen_name="C",
                            request_token="tok1tok1tok1", reply_token="tok2tok2tok2")


@pytest.mark.parametrize("kept", [1000, 1], ids=["list-kept", "list-too-long"])
def test_blocked_senders_answer_as_the_table_does(store: Store, kept: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repository, "BLOCKED_KEPT", kept)
    monkeypatch.setattr(repository, "_BLOCKED_ALL", repository._BLOCKED_ALL.limit(kept + 1))
    with store.tx() as tx:
        tx.block("spam@bad.example", "admin", None)
        tx.block("@worse.example", "admin", None)
    with store.tx() as tx:
        assert tx.is_blocked("Spam@Bad.example") and tx.is_blocked("x@worse.example")
        assert not tx.is_blocked("ok@bad.example", "") and not tx.is_blocked("")
        assert not tx.is_blocked("new@other.example")
        tx.block("new@other.example", "admin", None)          # written in this transaction
        assert tx.is_blocked("new@other.example")
    with store.tx() as tx:
        assert not tx.is_blocked("later@x.example")
        with tx.c.begin_nested() as sp:
            tx.block("later@x.example", "admin", None)
            assert tx.is_blocked("later@x.example")
            sp.rollback()
        tx.forget()
        assert not tx.is_blocked("later@x.example")


def test_a_sender_seen_twice_in_a_transaction_is_one_row(store: Store) -> None:
    with store.tx() as tx:
        tid = _thread(tx)
        assert tx.learn_sender("camden", "a@camden.example", reply_to=False, thread_id=tid)
        assert not tx.learn_sender("camden", "a@camden.example", reply_to=False, thread_id=tid)
        assert tx.learn_sender("wessex", "a@camden.example", reply_to=False, thread_id=tid)
    with store.tx() as tx:
        assert not tx.learn_sender("camden", "a@camden.example", reply_to=False, thread_id=tid)
        with tx.c.begin_nested() as sp:
            assert tx.learn_sender("camden", "b@camden.example", reply_to=True, thread_id=tid)
            sp.rollback()
        tx.forget()
        assert tx.learn_sender("camden", "b@camden.example", reply_to=True, thread_id=tid)
    with store.read() as tx:
        rows = tx.c.execute(select(authority_senders.c.authority, authority_senders.c.address)
                            .order_by(authority_senders.c.id)).all()
    assert [tuple(r) for r in rows] == [("camden", "a@camden.example"),
                                        ("wessex", "a@camden.example"),
                                        ("camden", "b@camden.example")]


def test_a_reminder_planned_twice_in_a_transaction_is_one_row(store: Store) -> None:
    due = datetime(2027, 1, 4, 9, tzinfo=timezone.utc)
    with store.tx() as tx:
        tid = _thread(tx)
        assert tx.add_reminder(tid, "due", "2027-01-04", due)
        assert not tx.add_reminder(tid, "due", "2027-01-04", due)
        assert tx.add_reminder(tid, "late", "2027-01-04", due)
    with store.tx() as tx:
        assert not tx.add_reminder(tid, "due", "2027-01-04", due)   # there already
        with tx.c.begin_nested() as sp:
            assert tx.add_reminder(tid, "due", "2027-02-01", due)
            sp.rollback()
        tx.forget()
        assert tx.add_reminder(tid, "due", "2027-02-01", due)
    with store.read() as tx:
        (n,) = tx.c.execute(text("SELECT count(*) FROM reminders")).one()
        events = sorted(tx.c.execute(select(reminders.c.kind, reminders.c.event)).all())
    assert n == 3 and [tuple(e) for e in events] == [
        ("due", "2027-01-04"), ("due", "2027-02-01"), ("late", "2027-01-04")]


def test_a_thread_row_changed_in_the_transaction_is_what_the_database_reads_back(
        store: Store) -> None:
    from datetime import date
    with store.tx() as tx:
        tid = _thread(tx)
        tx.thread(tid)
        for values in ({"awaiting_description": True}, {"state": "successful"},
                       {"due_date": date(2027, 2, 1), "extension": "x"},
                       {"extension": None, "allow": "authority", "hidden": True},
                       {"sent_at": datetime(2027, 1, 4, 9, tzinfo=timezone.utc),
                        "state": "waiting_response"},
                       {"title": "nul \x00 here"}, {"confirm_token": None}):
            tx.update_thread(tid, **values)
            remembered = tx.thread(tid)
            tx.forget()
            assert remembered == tx.thread(tid), values
