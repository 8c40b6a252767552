"""known senders and thread gatekeeping

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('authority_senders',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('authority', sa.String(length=64), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('reply_to', sa.Boolean(), nullable=False),
    sa.Column('thread_id', sa.Integer(), nullable=True),
    sa.Column('first_seen', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['thread_id'], ['threads.id'], name=op.f('fk_authority_senders_thread_id_threads')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_authority_senders')),
    sa.UniqueConstraint('authority', 'address', name='uq_authority_senders_authority_address')
    )
    with op.batch_alter_table('threads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('allow', sa.String(length=16), server_default='anybody', nullable=False))



def downgrade() -> None:
    with op.batch_alter_table('threads', schema=None) as batch_op:
        batch_op.drop_column('allow')

    op.drop_table('authority_senders')
