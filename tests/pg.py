"""PostgreSQL for tests: the project's own throwaway server, or a clear skip/failure when absent."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from prunepilot.service.pgserver import PostgresUnavailable, create_database
from prunepilot.service.pgserver import postgres_server as _server

__all__ = ["create_database", "postgres_server", "require_or_skip"]


def require_or_skip(what: str, hint: str) -> None:
    if os.environ.get("PRUNEPILOT_TEST_REQUIRE_SYSTEM") == "1":
        pytest.fail(f"{what} is required here but missing ({hint})")
    pytest.skip(f"{what} not installed ({hint}); CI installs it")


@contextmanager
def postgres_server() -> Iterator[str]:
    try:
        cm = _server()
        url = cm.__enter__()
    except PostgresUnavailable as exc:
        require_or_skip("PostgreSQL server", str(exc))
    try:
        yield url
    finally:
        cm.__exit__(None, None, None)
