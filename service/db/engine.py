"""Database engines and sessions: SQLite by default (WAL, busy timeout), PostgreSQL by URL."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import overload

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from prunepilot.compression import PrunePilotError


class StoreError(PrunePilotError):
    """A database problem, phrased for the user."""


class Conflict(StoreError):
    """A write collided with an existing row (e.g. the same trial step twice)."""


def normalize_url(url: str) -> str:
    # psycopg 3 is the PostgreSQL driver; accept the short forms users paste.
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets the API read while workers write; busy_timeout makes writers queue instead of failing.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


_ENGINES: dict[str, Engine] = {}


def get_engine(url: str) -> Engine:
    """One engine (connection pool) per URL and process."""
    url = normalize_url(url)
    if url in _ENGINES:
        return _ENGINES[url]
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # A pool large enough for the API's worker threads: connections beyond pool_size are closed
        # on return, and reopening one (with its PRAGMAs) under a burst of polls costs more than the query.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=32, max_overflow=32)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    _ENGINES[url] = engine
    return engine


def dispose_engines() -> None:
    """Close every pool (tests, and before a URL's database is dropped)."""
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextlib.contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """Commit on success, roll back on error, and turn database errors into domain errors."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"conflicting write: {str(exc.orig).splitlines()[0]}") from exc
    except OperationalError as exc:
        session.rollback()
        raise StoreError(f"database unavailable or busy: {str(exc.orig).splitlines()[0]}") from exc
    except SQLAlchemyError as exc:
        session.rollback()
        raise StoreError(f"database error: {exc}") from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@overload
def as_utc(dt: datetime) -> datetime: ...
@overload
def as_utc(dt: None) -> None: ...
def as_utc(dt: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything we store is UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


_SQLITE_READS: dict[str, threading.RLock] = {}
_READS_GUARD = threading.Lock()


@contextlib.contextmanager
def read_scope(url: str) -> Iterator[Session]:
    """A session for reads on the API's hot paths (job status, trials, key lookups).

    On SQLite, one such session at a time per process: measured here, one thread reads a job row
    in p99 0.9 ms, while 2-16 threads reading the same file at once stretch p99 to 13-600 ms
    (contention between the threads, not database locks: no read ever got SQLITE_BUSY). Queueing
    behind a sub-millisecond read is cheaper. Writes do not take this lock, so a write waiting on
    another process never holds up reads. PostgreSQL sessions are not serialized.
    """
    norm = normalize_url(url)
    if not norm.startswith("sqlite"):
        with session_scope(url) as session:
            yield session
        return
    with _READS_GUARD:
        lock = _SQLITE_READS.setdefault(norm, threading.RLock())  # re-entrant: a nested read cannot deadlock
    with lock, session_scope(url) as session:
        yield session
