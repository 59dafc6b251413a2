"""Migrations configured in code (no alembic.ini needed): upgrade, downgrade, current, check."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from .engine import StoreError, get_engine, normalize_url

VERSION_TABLE = "prunepilot_alembic_version"


def _optuna_tables() -> set[str]:
    try:
        from optuna.storages._rdb import models as optuna_models
    except ImportError:  # pragma: no cover - optuna is a dependency, but stay importable without it
        return {"alembic_version"}
    return set(optuna_models.BaseModel.metadata.tables) | {"alembic_version"}


OPTUNA_TABLES = _optuna_tables()


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    """Autogenerate must neither create nor drop Optuna's tables (they share the database)."""
    if type_ == "table":
        return name not in OPTUNA_TABLES and name != VERSION_TABLE
    table = getattr(obj, "table", None)
    return not (table is not None and table.name in OPTUNA_TABLES)


def script_location() -> Path:
    """alembic/, installed as ``prunepilot/migrations``: in a wheel a copy, in a source checkout
    (editable install) the symlink src/prunepilot/migrations -> ../../alembic."""
    import prunepilot

    return Path(prunepilot.__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def head_revision(url: str) -> str:
    heads = ScriptDirectory.from_config(alembic_config(url)).get_heads()
    return heads[0]


def current_revision(url: str) -> str | None:
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def ensure_current(url: str) -> None:
    """Refuse to serve a database that is not migrated to this code's head."""
    current = current_revision(url)
    head = head_revision(url)
    if current != head:
        state = "not migrated" if current is None else f"at revision {current}"
        raise StoreError(f"the database is {state}, this prunepilot needs {head}: run `prunepilot db upgrade`")
