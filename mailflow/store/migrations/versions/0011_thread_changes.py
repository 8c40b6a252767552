"""thread_changes: which threads changed, kept by triggers, for the archive's incremental builds

An incremental archive build after one new message used to read every thread's row and the
ids of every message and event, to find the one thread that changed (about 75 µs per thread
and build). Now every write that can change what a thread shows — its row, a message or an
event inserted, updated or deleted, its fault report — records the thread in
`thread_changes` with a *change mark*, by trigger (so no write path can forget it and the
pipeline runs no extra statement). The builder asks for the threads marked at or after the
mark it saw last (`archive.reading.changed_threads`), through an index.

The mark is ordered so that a change the build's snapshot could not see always gets a mark
at or above the snapshot's *watermark*:

- SQLite: one writer at a time, so the mark is the table's largest plus one, taken inside
  the writing transaction; the watermark is the largest visible plus one.
- PostgreSQL: writers run side by side, so a counter would not be in commit order. The mark
  is the writing transaction's id (`pg_current_xact_id()`, PostgreSQL 13+, 64 bits: no
  wraparound); the watermark is the snapshot's xmin, below which every transaction has ended
  (and is seen).
  A transaction at or above it that the snapshot did see is read again: harmless.

The table is not in `tables.metadata`: it is derived, not data (`db copy` leaves it out; its
marks mean nothing in another database). A later migration that rebuilds one of these tables
on SQLite (batch mode copies the table and drops its triggers) must call `create_triggers()`
again.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-27
"""
from alembic import op


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

# Each table whose rows a thread's public view is made from, and its column naming the thread.
_WATCHED = (("threads", "id"), ("messages", "thread_id"), ("thread_events", "thread_id"),
            ("reports", "thread_id"))

_SQLITE_MARK = "(SELECT coalesce(max(changed), 0) + 1 FROM thread_changes)"


def _sqlite_touch(tid: str) -> str:
    """The statement marking thread `tid` (an expression) as changed: an upsert, whose DO
    UPDATE holds whatever conflict clause the outer statement has (INSERT OR IGNORE...),
    unlike a trigger's own INSERT OR REPLACE. (An UPDATE then an INSERT of what is missing
    cost five times as much: 100 µs more per message-shaped write, against 20.)"""
    return (f"INSERT INTO thread_changes (thread_id, changed) VALUES ({tid}, {_SQLITE_MARK}) "
            f"ON CONFLICT (thread_id) DO UPDATE SET changed = excluded.changed;")


def create_triggers() -> None:
    """The triggers that keep `thread_changes` (idempotent: each is dropped first)."""
    if op.get_bind().dialect.name == "sqlite":
        for table, col in _WATCHED:
            for name, event, when, body in (
                    ("insert", "INSERT", f"NEW.{col} IS NOT NULL", _sqlite_touch(f"NEW.{col}")),
                    ("update", "UPDATE", f"NEW.{col} IS NOT NULL", _sqlite_touch(f"NEW.{col}")),
                    # A message moved between threads changes the one it left too.
                    ("move", "UPDATE", f"OLD.{col} IS NOT NULL AND OLD.{col} IS NOT NEW.{col}",
                     _sqlite_touch(f"OLD.{col}")),
                    ("delete", "DELETE", f"OLD.{col} IS NOT NULL", _sqlite_touch(f"OLD.{col}"))):
                trigger = f"mailflow_changed_{table}_{name}"
                op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
                op.execute(f"CREATE TRIGGER {trigger} AFTER {event} ON {table} FOR EACH ROW "
                           f"WHEN {when} BEGIN {body} END")
        return
    for table, col in _WATCHED:
        op.execute(f"""
CREATE OR REPLACE FUNCTION mailflow_changed_{table}() RETURNS trigger AS $$
BEGIN
  IF TG_OP <> 'DELETE' AND NEW.{col} IS NOT NULL THEN
    INSERT INTO thread_changes (thread_id, changed)
    VALUES (NEW.{col}, pg_current_xact_id()::text::bigint)
    ON CONFLICT (thread_id) DO UPDATE SET changed = EXCLUDED.changed;
  END IF;
  IF TG_OP <> 'INSERT' AND OLD.{col} IS NOT NULL
     AND (TG_OP = 'DELETE' OR OLD.{col} IS DISTINCT FROM NEW.{col}) THEN
    INSERT INTO thread_changes (thread_id, changed)
    VALUES (OLD.{col}, pg_current_xact_id()::text::bigint)
    ON CONFLICT (thread_id) DO UPDATE SET changed = EXCLUDED.changed;
  END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql""")
        op.execute(f"DROP TRIGGER IF EXISTS mailflow_changed ON {table}")
        op.execute(f"CREATE TRIGGER mailflow_changed AFTER INSERT OR UPDATE OR DELETE ON "
                   f"{table} FOR EACH ROW EXECUTE FUNCTION mailflow_changed_{table}()")


def upgrade() -> None:
    op.execute("CREATE TABLE thread_changes (thread_id INTEGER NOT NULL, changed BIGINT NOT NULL, "
               "CONSTRAINT pk_thread_changes PRIMARY KEY (thread_id))")
    op.execute("CREATE INDEX ix_thread_changes_changed ON thread_changes (changed)")
    create_triggers()


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table, _ in _WATCHED:
            for name in ("insert", "update", "move", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS mailflow_changed_{table}_{name}")
    else:
        for table, _ in _WATCHED:
            op.execute(f"DROP TRIGGER IF EXISTS mailflow_changed ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS mailflow_changed_{table}()")
    op.execute("DROP TABLE thread_changes")
