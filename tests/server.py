"""A real prunepilot server in a subprocess (uvicorn + embedded Ray + SQLite), tuned for fast tests."""

from __future__ import annotations

from pathlib import Path

from prunepilot.service.process import ServiceProcess


def migrate_with_keys(db_url: str, *names: str) -> dict[str, str]:
    """Migrate the service's database and create API keys, in this process: what `prunepilot db
    upgrade` and `prunepilot keys create` do (tests/test_cli.py runs those commands), without
    paying a CLI start-up per call."""
    from prunepilot.service.auth import create_key
    from prunepilot.service.db.migrate import upgrade

    upgrade(db_url)
    return {name: create_key(db_url, name)[1] for name in names}


class Server(ServiceProcess):
    def __init__(self, data_dir: Path, env_extra: dict[str, str] | None = None) -> None:
        super().__init__(data_dir, {"PRUNEPILOT_DISPATCH_INTERVAL_S": "0.3", "PRUNEPILOT_JOB_CPUS": "1", **(env_extra or {})})

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'prunepilot.db'}"

    def prepare(self, *names: str) -> dict[str, str]:
        """The migrated database with one key per name (before ``start``)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return migrate_with_keys(self.db_url, *names)
