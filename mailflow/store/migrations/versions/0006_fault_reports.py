"""fault reports

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('reports',
    sa.Column('thread_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('category', sa.String(length=64), nullable=True),
    sa.Column('lat', sa.Float(), nullable=True),
    sa.Column('lon', sa.Float(), nullable=True),
    sa.Column('location_source', sa.String(length=16), nullable=True),
    sa.Column('location_text', sa.Text(), nullable=True),
    sa.Column('area', sa.String(length=64), nullable=True),
    sa.Column('fixed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['thread_id'], ['threads.id'], name=op.f('fk_reports_thread_id_threads')),
    sa.PrimaryKeyConstraint('thread_id', name=op.f('pk_reports'))
    )
    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.create_index('ix_reports_category', ['category'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.drop_index('ix_reports_category')

    op.drop_table('reports')
