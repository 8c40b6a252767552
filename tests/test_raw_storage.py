"""Raw messages in the store: stored once, byte for byte, on SQLite and PostgreSQL.

On SQLite a big message is written as a zeroblob filled a piece at a time (`Tx.put_raw`), into
`raw_messages.data`, which migration 0008 makes the table's last column. These check that
both ways of writing give back the same bytes, that pieces are the message they join to, that
a rolled-back savepoint keeps nothing, and that the migration keeps what an old site stored.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from alembic import command
from sqlalchemy import select, text

from conftest import Site
from mailflow.store import db
from mailflow.store.repository import BLOB_PIECEWISE, Store
from mailflow.store.tables import raw_messages
from test_store_backends import _pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, site: Site) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{site.dir}/var/raw.db"
    else:
        gen = _pg_database()
        yield next(gen)
        next(gen, None)


SMALL = b"From: a@b.example\r\nSubject: hi\r\n\r\nhello\r\n"
BIG = b"From: a@b.example\r\nSubject: big\r\n\r\n" + os.urandom(BLOB_PIECEWISE + 12345)


def test_small_and_big_messages_come_back_byte_for_byte(url: str) -> None:
    store = Store(url).migrate()
    with store.tx() as tx:
        small, big = tx.put_raw(SMALL), tx.put_raw(BIG)
        assert small == hashlib.sha256(SMALL).hexdigest()
        assert big == hashlib.sha256(BIG).hexdigest()
        assert tx.put_raw(BIG) == big   # again: nothing new
    with store.read() as tx:
        assert tx.get_raw(small) == SMALL and tx.get_raw(big) == BIG
        rows = tx.c.execute(select(raw_messages.c.sha256, raw_messages.c.size,
                                   raw_messages.c.created_at)).all()
    assert sorted((r.sha256, r.size) for r in rows) == sorted(
        [(small, len(SMALL)), (big, len(BIG))])
    for r in rows:   # the column reads back as a datetime, as one SQLAlchemy wrote would
        assert isinstance(r.created_at, datetime)
        assert abs((r.created_at.replace(tzinfo=timezone.utc)
                    - datetime.now(timezone.utc)).total_seconds()) < 600
    store.close()


@pytest.mark.parametrize("message", [SMALL, BIG], ids=["small", "big"])
def test_pieces_are_stored_as_the_message_they_join_to(url: str, message: bytes) -> None:
    store = Store(url).migrate()
    cut = len(message) // 3
    with store.tx() as tx:
        sha = tx.put_raw((b"DKIM-Signature: x\r\n", message[:cut], message[cut:]))
        assert sha == hashlib.sha256(b"DKIM-Signature: x\r\n" + message).hexdigest()
        assert tx.put_raw(b"DKIM-Signature: x\r\n" + message) == sha
    with store.read() as tx:
        assert tx.get_raw(sha) == b"DKIM-Signature: x\r\n" + message
        (n,) = tx.c.execute(text("SELECT count(*) FROM raw_messages")).one()
    assert n == 1
    store.close()


def test_a_rolled_back_savepoint_keeps_no_raw_message(url: str) -> None:
    store = Store(url).migrate()
    with store.tx() as tx:
        kept = tx.put_raw(SMALL)
        with pytest.raises(RuntimeError):
            with tx.c.begin_nested():
                tx.put_raw(BIG)
                raise RuntimeError("this message's bug")
    with store.read() as tx:
        assert tx.get_raw(kept) == SMALL
        shas = tx.c.execute(select(raw_messages.c.sha256)).scalars().all()
    assert shas == [kept]
    store.close()


def test_migration_0008_keeps_the_raw_messages_and_puts_data_last(site: Site) -> None:
    """An old SQLite site's raw messages survive the table's copy, still referred to by
    its messages (foreign keys checked), and new big ones go in the piecewise way."""
    path = site.dir / "var" / "old-raw.db"
    engine = db.make_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        with conn.begin():
            command.upgrade(db._alembic_config(conn), "0007")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO raw_messages (sha256, size, data, created_at) "
                          "VALUES ('abc', 3, :d, CURRENT_TIMESTAMP)"), {"d": b"\x00\xffx"})
        conn.execute(text(
            "INSERT INTO messages (direction, kind, from_addr, from_name, to_addrs, subject, "
            "text, raw_sha256, flags, hidden, created_at) VALUES ('in', 'response', '', '', "
            "'[]', '', '', 'abc', '[]', 0, CURRENT_TIMESTAMP)"))
    engine.dispose()
    store = Store(f"sqlite:///{path}").migrate()
    with store.tx() as tx:
        assert tx.get_raw("abc") == b"\x00\xffx"
        big = tx.put_raw(BIG)
    with store.read() as tx:
        assert tx.get_raw(big) == BIG
        (m,) = tx.c.execute(text("SELECT raw_sha256 FROM messages")).scalars().all()
        assert m == "abc"
    store.close()
    con = sqlite3.connect(path)
    columns = [r[1] for r in con.execute("PRAGMA table_info(raw_messages)")]
    assert columns == ["sha256", "size", "created_at", "data"]
    assert con.execute("PRAGMA foreign_key_check").fetchall() == []
    con.close()


def test_migration_0008_goes_back_down(site: Site) -> None:
    path = site.dir / "var" / "down.db"
    store = Store(f"sqlite:///{path}").migrate()
    with store.tx() as tx:
        sha = tx.put_raw(BIG)
    store.close()
    engine = db.make_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        with conn.begin():
            command.downgrade(db._alembic_config(conn), "0007")
    engine.dispose()
    con = sqlite3.connect(path)
    assert [r[1] for r in con.execute("PRAGMA table_info(raw_messages)")] == [
        "sha256", "size", "data", "created_at"]
    (data,) = con.execute("SELECT data FROM raw_messages WHERE sha256 = ?", (sha,)).fetchone()
    assert data == BIG
    con.close()
