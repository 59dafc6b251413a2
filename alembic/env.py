"""Alembic environment, configured in code by prunepilot.service.db.migrate.

Optuna keeps its own tables and its own Alembic revision in the default ``alembic_version``
table of the same database. We therefore track ours in ``prunepilot_alembic_version`` and never
look at Optuna's tables, so neither migration history confuses the other.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from prunepilot.service.db.engine import get_engine
from prunepilot.service.db.migrate import VERSION_TABLE, include_object
from prunepilot.service.db.models import Base

config = context.config
_configured = config.get_main_option("sqlalchemy.url")
assert _configured is not None, "set by prunepilot.service.db.migrate.alembic_config"
url: str = _configured


def run_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, version_table=VERSION_TABLE,
                      include_object=include_object, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        connectable = get_engine(url)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                          include_object=include_object, render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


del pool
if context.is_offline_mode():
    run_offline()
else:
    run_online()
