"""devices, their measurement tasks, device-scoped API keys, a job's phase

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 06:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('devices',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('backend', sa.String(length=32), nullable=True),
    sa.Column('fingerprint', sa.String(length=300), nullable=True),
    sa.Column('info', sa.JSON(), nullable=False),
    sa.Column('registered_by', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('registered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['registered_by'], ['api_keys.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('device_tasks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('fingerprint', sa.String(length=300), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=True),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('payload', sa.LargeBinary(), nullable=True),
    sa.Column('payload_bytes', sa.BigInteger(), nullable=False),
    sa.Column('lease_owner', sa.String(length=128), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('leases', sa.Integer(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('measured_by', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('device_id', 'key', name='uq_device_tasks_device_key')
    )
    with op.batch_alter_table('device_tasks', schema=None) as batch_op:
        batch_op.create_index('ix_device_tasks_device_finished', ['device_id', 'finished_at'], unique=False)

    # plain ADD COLUMNs (no table rebuild on SQLite): existing keys are users' keys
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scope', sa.String(length=16), server_default='user', nullable=False))
        batch_op.add_column(sa.Column('device', sa.String(length=64), nullable=True))

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('phase', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('device_tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_device_tasks_device_finished')

    op.drop_table('device_tasks')
    op.drop_table('devices')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('phase')

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('device')
        batch_op.drop_column('scope')
