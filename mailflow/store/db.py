"""Connecting to the database and keeping its schema current.

SQLite gets the settings that make it safe with several processes (a daemon and admin
commands at once): WAL, NORMAL sync, a busy timeout, foreign keys, and `BEGIN IMMEDIATE` for
every transaction, because WAL plus a busy timeout alone still fails read-then-write
transactions under contention ("database is locked").

The engine is synchronous: the daemon runs store work in a worker thread. The async driver
names that a config may carry (`sqlite+aiosqlite`, `postgresql+asyncpg`) are mapped to their
synchronous twins so one URL works everywhere.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

from mailflow.errors import StoreError

MIGRATIONS = Path(__file__).parent / "migrations"
_SYNC_DRIVERS = {
    "sqlite+aiosqlite": "sqlite",
    "postgresql+asyncpg": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
}


def sync_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return _SYNC_DRIVERS.get(scheme, scheme) + sep + rest


def make_engine(url: str) -> Engine:
    url = sync_url(url)
    if url.startswith("sqlite:///") and ":memory:" not in url:
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
    except (SQLAlchemyError, ImportError) as e:
        raise StoreError(f"cannot use database {redact_url(url)}: {e}") from None
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_settings(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn) -> None:  # type: ignore[no-untyped-def]
            readonly = conn.get_execution_options().get("mailflow_readonly")
            conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")
    return engine


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return scheme + sep + creds + at + host


def _alembic_config(engine_conn) -> "AlembicConfig":  # type: ignore[no-untyped-def]
    from alembic.config import Config as AlembicConfig
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = engine_conn
    return cfg


def head_revision() -> str | None:
    """Alembic's own answer: what `db upgrade` prints (see `known_head` for the fast one)."""
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg).get_current_head()


_REVISION = re.compile(r"^(down_revision|revision)\s*=\s*['\"]?([\w]+|None)['\"]?\s*$", re.M)


@lru_cache(maxsize=1)
def known_head() -> str | None:
    """The newest migration, read from the revision files' two assignment lines without
    importing Alembic (which with Mako costs a quarter of a second, at every command and
    every `mailflow ingest` from an MTA's pipe). None when the files are not as expected:
    the caller then asks Alembic. tests/test_migrations.py checks it against Alembic."""
    revisions, downs = set(), set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        found = dict((k, v) for k, v in _REVISION.findall(path.read_text(encoding="utf-8")))
        if "revision" not in found or "down_revision" not in found:
            return None
        revisions.add(found["revision"])
        downs.add(found["down_revision"])
    heads = revisions - downs
    return heads.pop() if len(heads) == 1 else None


def _current_revision(conn) -> str | None:  # type: ignore[no-untyped-def]
    """The database's revision, or None when it has no alembic_version table (new)."""
    from sqlalchemy import inspect
    if not inspect(conn).has_table("alembic_version"):
        return None
    rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return rows[0] if len(rows) == 1 else None


def _pragma(conn, sql: str) -> None:  # type: ignore[no-untyped-def]
    """Run a PRAGMA on the driver's connection, outside any transaction (where SQLite
    ignores foreign_keys changes), without SQLAlchemy starting one."""
    conn.connection.driver_connection.execute(sql)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration; cheap when it already is."""
    try:
        with engine.connect() as conn:
            current = _current_revision(conn)
            conn.rollback()
        if current is not None and current == (known_head() or head_revision()):
            return
        from alembic import command
        sqlite = engine.dialect.name == "sqlite"
        with engine.connect() as conn:
            if sqlite:
                # SQLite alters a table by copying it; with foreign keys enforced, dropping the
                # old copy of a table others refer to fails. Switch them off for the
                # migration (it must happen outside a transaction), and check them after.
                _pragma(conn, "PRAGMA foreign_keys=OFF")
            with conn.begin():
                command.upgrade(_alembic_config(conn), "head")
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise StoreError(f"migration left broken references: {broken[:5]}")
            if sqlite:
                _pragma(conn, "PRAGMA foreign_keys=ON")
    except SQLAlchemyError as e:
        raise StoreError(f"cannot migrate database {redact_url(str(engine.url))}: {e}") from None
