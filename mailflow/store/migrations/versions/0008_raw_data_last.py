"""raw_messages.data as the table's last column (SQLite)

On SQLite a BLOB that is the row's last column can be written a piece at a time: `Tx.put_raw`
inserts a zeroblob of the message's size and fills it with incremental blob I/O, so a 34 MB
message is not copied into a bound parameter and a record in memory first. SQLite cannot
reorder columns, so the table is copied (foreign keys are off during migrations, see
store.db.migrate; messages, deliveries and queue_items keep referring to it by name). The
copy reads every stored message once: on a big site this migration takes a while.

PostgreSQL is left as it is: it binds the blob the plain way whatever the column order.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def _rebuild(columns: list[str]) -> None:
    op.execute(
        "CREATE TABLE _raw_messages_new ("
        + ", ".join({
            "sha256": "sha256 VARCHAR(64) NOT NULL",
            "size": "size INTEGER NOT NULL",
            "created_at": "created_at DATETIME NOT NULL",
            "data": "data BLOB NOT NULL",
        }[c] for c in columns)
        + ", CONSTRAINT pk_raw_messages PRIMARY KEY (sha256))")
    op.execute(f"INSERT INTO _raw_messages_new ({', '.join(columns)}) "
               f"SELECT {', '.join(columns)} FROM raw_messages")
    op.execute("DROP TABLE raw_messages")
    op.execute("ALTER TABLE _raw_messages_new RENAME TO raw_messages")


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    _rebuild(["sha256", "size", "created_at", "data"])


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    _rebuild(["sha256", "size", "data", "created_at"])
