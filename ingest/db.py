"""Engine and session set-up, the same for SQLite (default) and PostgreSQL."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InvalidatePoolError, OperationalError
from sqlalchemy.orm import sessionmaker


def make_engine(url: str) -> Engine:
    """Create the engine; for SQLite, switch on WAL and foreign keys.

    WAL lets the API read while a worker writes.  ``synchronous=FULL`` keeps a committed spool
    record on disk across a power cut, which is the promise behind every acknowledgement.
    """
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": SQLITE_LOCK_WAIT_SECONDS}
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # The driver's own transaction handling is replaced by explicit BEGIN (IMMEDIATE)
            # below, so writers queue on the lock instead of failing on upgrade deadlocks.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            _switch_to_wal(cur)
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            _begin_immediate(conn.connection.dbapi_connection)

        return engine
    engine = create_engine(url, **kwargs)
    _ping_when_idle(engine)
    return engine


# How long a transaction waits for SQLite's write lock, and how often it tries to take it.
SQLITE_LOCK_WAIT_SECONDS = 30.0
SQLITE_LOCK_RETRY_SECONDS = 0.001  # for the first SQLITE_LOCK_BRISK_SECONDS of a wait
SQLITE_LOCK_BRISK_SECONDS = 0.02  # a turn of another writer usually ends within this
SQLITE_LOCK_SLOW_RETRY_SECONDS = 0.005  # then: a long wait does not spin
SQLITE_BUSY_TIMEOUT_MS = int(SQLITE_LOCK_WAIT_SECONDS * 1000)  # other statements: SQLite's wait


def _execute_while_locked(execute: Callable[[str], Any], statement: str) -> None:
    """Run ``statement``; while SQLite answers "database is locked", try again every
    millisecond (every five after the first 20 ms) for up to :data:`SQLITE_LOCK_WAIT_SECONDS`.

    SQLite's own busy handler sleeps 1, 2, 5, ... then 50 and 100 ms between tries: with the
    listener and two workers taking turns on the lock, the waiters were asleep most of the time
    it was free (the embedded default used 43% of the machine's two cores during a burst)."""
    started = time.monotonic()
    deadline = started + SQLITE_LOCK_WAIT_SECONDS
    brisk_until = started + SQLITE_LOCK_BRISK_SECONDS
    while True:
        try:
            execute(statement)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(SQLITE_LOCK_RETRY_SECONDS if time.monotonic() < brisk_until
                   else SQLITE_LOCK_SLOW_RETRY_SECONDS)


def _switch_to_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL``, again while the database is locked.  A worker's pool
    process opening a fresh database while another process set it up once failed here with
    "database is locked" (in CI, not reproduced since), and its tasks with it; changing the
    journal mode needs the database to itself for a moment."""
    _execute_while_locked(cursor.execute, "PRAGMA journal_mode=WAL")


def _begin_immediate(dbapi_conn: Any) -> None:
    """``BEGIN IMMEDIATE`` with :func:`_execute_while_locked`'s wait instead of SQLite's."""
    dbapi_conn.execute("PRAGMA busy_timeout=0")
    try:
        _execute_while_locked(dbapi_conn.execute, "BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        # as SQLAlchemy raises it, for the callers that tell a database that cannot be used
        # now (retry later) from a mail that cannot be processed
        raise OperationalError("BEGIN IMMEDIATE", None, exc) from exc
    finally:
        dbapi_conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


# A pooled connection idle for longer than this is pinged before use.
PING_AFTER_IDLE_SECONDS = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """``pool_pre_ping``, for connections that have been idle a while only.

    Pinging at every checkout cost a round trip per transaction: in the SMTP listener, which
    runs a short transaction per group of mails, it was 7% of its CPU at 190 mails/s, and
    PostgreSQL's work besides.  A connection given back less than a second ago has almost
    surely not been cut since (a server restart takes longer); if it was, the statement fails
    as the database being down does (a spool write is tried once more, a worker retries), and
    the pool drops every connection of the old server.  A failed ping makes the pool drop all
    its connections and take a fresh one (SQLAlchemy's checkout-event protocol), as
    ``pool_pre_ping`` does."""

    @event.listens_for(engine, "checkin")
    def _given_back(_dbapi_conn: Any, record: Any) -> None:
        record.info["given_back_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _taken(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        given_back = record.info.get("given_back_at")
        if given_back is None or time.monotonic() - given_back < PING_AFTER_IDLE_SECONDS:
            return  # a new connection, or one in use a moment ago
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            raise InvalidatePoolError("pooled connection is gone") from exc
        if not alive:
            raise InvalidatePoolError("pooled connection is gone")


def make_session_factory(engine: Engine) -> sessionmaker[Any]:
    return sessionmaker(engine, expire_on_commit=False)
