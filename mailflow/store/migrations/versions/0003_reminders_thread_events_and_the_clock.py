"""reminders, thread events and the clock

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('reminders',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('thread_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('event', sa.String(length=64), nullable=False),
    sa.Column('due_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('done_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('note', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['thread_id'], ['threads.id'], name=op.f('fk_reminders_thread_id_threads')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reminders')),
    sa.UniqueConstraint('thread_id', 'kind', 'event', name='uq_reminders_thread_kind_event')
    )
    with op.batch_alter_table('reminders', schema=None) as batch_op:
        batch_op.create_index('ix_reminders_due', ['state', 'due_at'], unique=False)

    op.create_table('thread_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('thread_id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['thread_id'], ['threads.id'], name=op.f('fk_thread_events_thread_id_threads')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_thread_events'))
    )
    with op.batch_alter_table('thread_events', schema=None) as batch_op:
        batch_op.create_index('ix_thread_events_thread', ['thread_id'], unique=False)

    with op.batch_alter_table('threads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('clock_start', sa.Date(), nullable=True))
        batch_op.add_column(sa.Column('extension', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('very_late_date', sa.Date(), nullable=True))
        batch_op.add_column(sa.Column('awaiting_description', sa.Boolean(), server_default=sa.false(), nullable=False))



    # Threads sent before the clock was kept: it ran from the day they were sent.
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT id, sent_at FROM threads WHERE sent_at IS NOT NULL "
                                "AND clock_start IS NULL")).fetchall()
    for thread_id, sent_at in rows:
        if isinstance(sent_at, str):  # SQLite hands back text
            import datetime as _dt
            sent_at = _dt.datetime.fromisoformat(sent_at)
        bind.execute(sa.text("UPDATE threads SET clock_start = :d WHERE id = :i"),
                     {"d": sent_at.date(), "i": thread_id})


def downgrade() -> None:
    with op.batch_alter_table('threads', schema=None) as batch_op:
        batch_op.drop_column('awaiting_description')
        batch_op.drop_column('very_late_date')
        batch_op.drop_column('extension')
        batch_op.drop_column('clock_start')

    with op.batch_alter_table('thread_events', schema=None) as batch_op:
        batch_op.drop_index('ix_thread_events_thread')

    op.drop_table('thread_events')
    with op.batch_alter_table('reminders', schema=None) as batch_op:
        batch_op.drop_index('ix_reminders_due')

    op.drop_table('reminders')
