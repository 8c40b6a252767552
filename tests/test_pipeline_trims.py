"""Speed changes on the pipeline's path that must change no result: a thread update that would
write what the row already holds sends no statement; thread addresses found in short texts are
remembered. Each is checked against doing the work every time."""
from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from sqlalchemy import event, select

from conftest import Site
from mailflow.core import matching
from mailflow.core.addresses import find_thread_addresses
from mailflow.store.repository import Store
from mailflow.store.tables import threads
from test_tx_memo import _thread   # the `store` fixture (SQLite and PostgreSQL) is conftest's


def _updates(s: Store) -> list[str]:
    seen: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("UPDATE THREADS"):
            seen.append(statement)
    event.listen(s.engine, "before_cursor_execute", count)
    return seen


def test_an_update_that_changes_nothing_sends_no_statement(store: Store) -> None:  # noqa: F811
    updates = _updates(store)
    with store.tx() as tx:
        tid = _thread(tx)
        tx.thread(tid)                                  # read: now remembered
        tx.update_thread(tid, awaiting_description=True)
        assert len(updates) == 1
        tx.update_thread(tid, awaiting_description=True)   # the same again: nothing to write
        tx.update_thread(tid, state="waiting_response")    # what it already is
        assert len(updates) == 1
        tx.update_thread(tid, awaiting_description=False)  # a change is written
        assert len(updates) == 2
        assert tx.thread(tid).awaiting_description is False  # type: ignore[union-attr]
    with store.read() as tx:
        row = tx.c.execute(select(threads.c.awaiting_description, threads.c.state)
                           .where(threads.c.id == tid)).one()
    assert (bool(row[0]), row[1]) == (False, "waiting_response")


def test_an_update_of_a_thread_not_read_is_always_written(store: Store) -> None:  # noqa: F811
    updates = _updates(store)
    with store.tx() as tx:
        tid = _thread(tx)
    with store.tx() as tx:
        tx.update_thread(tid, state="waiting_response")    # not remembered: written
    assert len(updates) == 1


def test_remembered_thread_addresses_are_what_a_fresh_search_finds() -> None:
    rnd = random.Random(10)
    domain = "ask.example"
    parts = ["request-12-abcdefghjkmn@ask.example", "reply-7-pqrstvwxyzab@ask.example",
             "REQUEST-0012-ABCDEFGHJKMN@ASK.EXAMPLE", "request12abcdefghjkmn@other.example",
             "Jane <reply-7-pqrstvwxyzab@ask.example>", "nobody@ask.example", "", " ",
             "foi-request-3-abcdefghjkmn@ask.example", "request-l2-abcdefghjkmn@ask.example"]
    for _ in range(500):
        text = ", ".join(rnd.sample(parts, rnd.randint(1, 3)))
        for d in (domain, "other.example"):
            assert list(matching._addresses_in(text, d)) == find_thread_addresses(text, d)
            assert list(matching._addresses_in(text, d)) == find_thread_addresses(text, d)
    long = "x" * 2000 + " request-12-abcdefghjkmn@ask.example"
    assert list(matching._addresses_in(long, domain)) == find_thread_addresses(long, domain)
