"""eval suites: suite runs, and the suite run each eval run belongs to

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('eval_suite_runs',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('results', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_eval_suite_runs'))
    )
    with op.batch_alter_table('eval_suite_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_eval_suite_runs_fingerprint'), ['fingerprint'], unique=False)
        batch_op.create_index(batch_op.f('ix_eval_suite_runs_name'), ['name'], unique=False)

    with op.batch_alter_table('eval_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('suite_run_id', sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f('ix_eval_runs_suite_run_id'), ['suite_run_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_eval_runs_suite_run_id_eval_suite_runs'), 'eval_suite_runs', ['suite_run_id'], ['id'], ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('eval_runs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_eval_runs_suite_run_id_eval_suite_runs'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_eval_runs_suite_run_id'))
        batch_op.drop_column('suite_run_id')

    with op.batch_alter_table('eval_suite_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_eval_suite_runs_name'))
        batch_op.drop_index(batch_op.f('ix_eval_suite_runs_fingerprint'))

    op.drop_table('eval_suite_runs')
