"""Moving a site from one database to another: SQLite to PostgreSQL when one machine is no
longer enough (or back, or PostgreSQL to PostgreSQL).

The target is brought to the same schema by the same Alembic migrations, then every table is
copied in dependency order (so foreign keys hold at every step), in batches, inside one
transaction on the target: a copy that fails leaves the target as it was. PostgreSQL's id
sequences are then moved past the copied ids, so new rows do not collide with old ones.
The copy refuses to write into a database that already holds mail, because merging two sites'
rows would mix their ids and threads.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from mailflow.errors import StoreError
from mailflow.store import db
from mailflow.store.tables import metadata

BATCH = 1000


@dataclass
class CopyReport:
    tables: dict[str, int] = field(default_factory=dict)   # table -> rows copied

    @property
    def rows(self) -> int:
        return sum(self.tables.values())


def copy_database(source_url: str, target_url: str, *,
                  progress: Callable[[str, int, int], None] | None = None) -> CopyReport:
    """Copy every row of the site's tables from `source_url` into `target_url`."""
    if db.sync_url(source_url) == db.sync_url(target_url):
        raise StoreError("the source and the target are the same database")
    source, target = db.make_engine(source_url), db.make_engine(target_url)
    try:
        db.migrate(source)
        db.migrate(target)
        _check_empty(target)
        return _copy(source, target, progress)
    finally:
        source.dispose()
        target.dispose()


def _check_empty(target: Engine) -> None:
    with target.connect() as conn:
        for table in metadata.sorted_tables:
            if conn.execute(select(func.count()).select_from(table)).scalar():
                raise StoreError(f"the target database already has rows in {table.name}; "
                                 f"`db copy` only fills an empty database")


def _copy(source: Engine, target: Engine,
          progress: Callable[[str, int, int], None] | None) -> CopyReport:
    report = CopyReport()
    try:
        with source.connect().execution_options(mailflow_readonly=True) as src, \
                target.begin() as dst:
            for table in metadata.sorted_tables:   # parents before children
                total = src.execute(select(func.count()).select_from(table)).scalar() or 0
                done = 0
                key = list(table.primary_key.columns)
                rows = src.execute(select(table).order_by(*key)).mappings()
                while True:
                    batch = rows.fetchmany(BATCH)
                    if not batch:
                        break
                    dst.execute(table.insert(), [_aware(r) for r in batch])
                    done += len(batch)
                    if progress:
                        progress(table.name, done, total)
                report.tables[table.name] = done
                if progress and total == 0:
                    progress(table.name, 0, 0)
            if target.dialect.name == "postgresql":
                _advance_sequences(dst)
    except SQLAlchemyError as e:
        raise StoreError(f"copy failed, the target is unchanged: {e}") from None
    return report


def _aware(row: Any) -> dict[str, Any]:
    """SQLite hands back times without a zone (mailflow writes them in UTC): say so, or
    PostgreSQL would read them in its server's own zone."""
    return {k: v.replace(tzinfo=timezone.utc) if isinstance(v, datetime) and v.tzinfo is None
            else v for k, v in row.items()}


def _advance_sequences(conn) -> None:  # type: ignore[no-untyped-def]
    """Rows were inserted with their ids: move each serial's sequence past the largest."""
    for table in metadata.sorted_tables:
        for col in table.primary_key.columns:
            if not col.autoincrement or col.type.python_type is not int:
                continue
            seq = conn.execute(text("SELECT pg_get_serial_sequence(:t, :c)"),
                               {"t": table.name, "c": col.name}).scalar()
            if seq:
                conn.execute(text(f"SELECT setval(:s, COALESCE((SELECT MAX({col.name}) "
                                  f"FROM {table.name}), 0) + 1, false)"), {"s": seq})
