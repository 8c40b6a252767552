"""threads: one covering index over the running clocks' inputs, for the reminder sweep

The reminder sweep's check of every running clock (`Clock.stale`, at a process's first sweep
and the first of each day) groups the running clocks by their inputs and stored dates. With
only `ix_threads_state` the database read each thread's row and sorted them for the GROUP BY:
0.12 s of CPU at 100,000 threads. This index holds every column the query reads, in an order
that hands the groups over already sorted: 0.018 s. Its first column is the state, so it also
serves every lookup `ix_threads_state` served, which it replaces (one index fewer to keep up
at every write to a thread).

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-27
"""
from alembic import op


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

COLUMNS = ["state", "law", "clock_start", "extension", "due_date", "very_late_date", "kind"]


def upgrade() -> None:
    op.create_index("ix_threads_clock", "threads", COLUMNS)
    op.drop_index("ix_threads_state", table_name="threads")


def downgrade() -> None:
    op.create_index("ix_threads_state", "threads", ["state"])
    op.drop_index("ix_threads_clock", table_name="threads")
