"""request logs: request_id indexed, no longer unique (clients may send X-Request-ID)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 03:30:00
"""

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('request_logs', schema=None) as batch_op:
        batch_op.drop_constraint('uq_request_logs_request_id', type_='unique')
        batch_op.create_index('ix_request_logs_request_id', ['request_id'], unique=False)


def downgrade() -> None:
    # Fails if two rows share a request id, as a unique constraint must.
    with op.batch_alter_table('request_logs', schema=None) as batch_op:
        batch_op.drop_index('ix_request_logs_request_id')
        batch_op.create_unique_constraint('uq_request_logs_request_id', ['request_id'])
