"""ledger exactly once: leased quota reservations; a server-made unique id per log row

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('quota_reservations',
    sa.Column('record_id', sa.String(length=32), nullable=False),
    sa.Column('key_id', sa.Integer(), nullable=False),
    sa.Column('month', sa.String(length=7), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], name=op.f('fk_quota_reservations_key_id_api_keys'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('record_id', name=op.f('pk_quota_reservations'))
    )
    with op.batch_alter_table('quota_reservations', schema=None) as batch_op:
        batch_op.create_index('ix_quota_reservations_expires_at', ['expires_at'], unique=False)
    # Rows written before this revision have none; NULLs never conflict.
    with op.batch_alter_table('request_logs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('record_id', sa.String(length=32), nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_request_logs_record_id'), ['record_id'])


def downgrade() -> None:
    with op.batch_alter_table('request_logs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_request_logs_record_id'), type_='unique')
        batch_op.drop_column('record_id')
    with op.batch_alter_table('quota_reservations', schema=None) as batch_op:
        batch_op.drop_index('ix_quota_reservations_expires_at')
    op.drop_table('quota_reservations')
