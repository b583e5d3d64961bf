"""Connections (``ingest/db.py``).

PostgreSQL: pooled connections are pinged before use only after being idle.  The server side is
real: the connections are cut with ``pg_terminate_backend``, which is what a server restart or
a proxy's idle timeout does to them.

SQLite: a transaction waits for the write lock, which another process holds, in short steps,
and past the wait fails as a database that cannot be used now."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from ingest import db
from ingest.config import load_settings
from ingest.errors import SpoolError
from ingest.service import Ingestor, SpoolRequest
from ingest.spool import Envelope

IDLE = 0.3  # PING_AFTER_IDLE_SECONDS in these tests, to keep them short


@pytest.fixture
def engine(fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", IDLE)
    engine = db.make_engine(fresh_postgres_url)
    yield engine
    engine.dispose()


def backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def cut(engine: Engine, pid: int) -> None:
    url = make_url(engine.url.render_as_string(hide_password=False))
    with psycopg.connect(host=url.host, port=url.port, user=url.username,
                         password=url.password, dbname=url.database, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


@pytest.fixture
def pings(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When the dialect's ping ran (the real ping, observed)."""
    seen: list[float] = []
    real = engine.dialect.do_ping

    def observed(dbapi_conn: object) -> bool:
        seen.append(time.monotonic())
        return real(dbapi_conn)

    monkeypatch.setattr(engine.dialect, "do_ping", observed)
    return seen


def test_a_connection_in_use_a_moment_ago_is_not_pinged(engine: Engine,
                                                        pings: list[float]) -> None:
    first = backend_pid(engine)
    assert [backend_pid(engine) for _ in range(5)] == [first] * 5
    assert pings == []
    time.sleep(IDLE + 0.1)
    assert backend_pid(engine) == first and len(pings) == 1


def test_a_connection_cut_while_idle_is_replaced_before_use(engine: Engine,
                                                            pings: list[float]) -> None:
    first = backend_pid(engine)
    cut(engine, first)
    time.sleep(IDLE + 0.1)
    second = backend_pid(engine)  # no error: the ping found it gone, the pool reconnected
    assert second != first and len(pings) == 1


def test_a_connection_cut_just_after_use_fails_once_then_the_pool_recovers(
        engine: Engine, pings: list[float]) -> None:
    """The price of not pinging every time: the first statement on a connection cut less
    than PING_AFTER_IDLE_SECONDS after its last use fails as the database being down does
    (callers retry that); the pool then drops it and the next one works."""
    first = backend_pid(engine)
    cut(engine, first)
    with pytest.raises(OperationalError):
        backend_pid(engine)
    assert backend_pid(engine) != first
    assert pings == []


def test_a_spool_write_on_a_connection_cut_just_after_use_is_written_on_a_fresh_one(
        fresh_postgres_url: str, tmp_path: Path) -> None:
    """The SMTP listener must not answer 451 for a database that is up: a spool write that met
    a dead pooled connection is tried once more (``spool.store_all``)."""
    config = tmp_path / "ticketgate.toml"
    config.write_text("", encoding="utf-8")
    ing = Ingestor(load_settings(config, database_url=fresh_postgres_url))
    try:
        raw = (b"From: a@example.org\r\nSubject: one\r\nMessage-ID: <one@example.org>\r\n"
               b"\r\nbody\r\n")
        ing.receive(raw, 1, "smtp")
        cut(ing.engine, backend_pid(ing.engine))
        second = ing.receive(raw.replace(b"one@", b"two@"), 1, "smtp")
        with ing.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM inbound_mails")).scalar_one() == 2
            assert conn.execute(text("SELECT id FROM inbound_mails WHERE id = :id"),
                                {"id": second}).scalar_one() == second
    finally:
        ing.close()


def test_a_spool_write_on_postgresql_is_one_statement_that_commits_itself(
        fresh_postgres_url: str, tmp_path: Path) -> None:
    """A spool write is one INSERT on an autocommit connection: one round trip to the server,
    not three (BEGIN, INSERT, COMMIT).  It is committed when the write returns (another
    connection reads it), and it is all or nothing: a group with one record the server refuses
    stores none of its rows, and is then written request by request."""
    config = tmp_path / "ticketgate.toml"
    config.write_text("", encoding="utf-8")
    ing = Ingestor(load_settings(config, database_url=fresh_postgres_url))
    try:
        def mail(name: str) -> bytes:
            return (f"From: a@example.org\r\nSubject: {name}\r\n"
                    f"Message-ID: <{name}@example.org>\r\n\r\nbody\r\n").encode()

        ing.receive(mail("warm-up"), 1, "smtp")  # the pool's first connection is set up
        sent: list[tuple[str, bool]] = []

        @event.listens_for(ing.engine, "before_cursor_execute")
        def observe(conn: Connection, _cursor: object, statement: str, *_rest: object) -> None:
            sent.append((statement.split()[0], conn.connection.dbapi_connection.autocommit))

        refused = Envelope(client_ip="x" * 100)  # longer than the column: the server says no
        results = ing.receive_group([SpoolRequest(mail("one"), [1], "smtp a"),
                                     SpoolRequest(mail("two"), [1], "smtp b", refused),
                                     SpoolRequest(mail("three"), [1], "smtp c")], "smtp")
        assert isinstance(results[1], SpoolError)
        assert isinstance(results[0], list) and isinstance(results[2], list)
        assert sent == [("INSERT", True)] * 4  # the group's, then one per request
        url = make_url(fresh_postgres_url)
        with psycopg.connect(host=url.host, port=url.port, user=url.username,
                             password=url.password, dbname=url.database) as other:
            stored = [row[0] for row in other.execute(
                "SELECT header_message_id FROM inbound_mails ORDER BY id")]
        assert stored == ["warm-up@example.org", "one@example.org", "three@example.org"]
        with ing.engine.connect() as conn:  # the pooled connection is back in transactions
            assert conn.connection.dbapi_connection.autocommit is False
    finally:
        ing.close()


def _hold_write_lock(path: Path, seconds: float, taken: threading.Event) -> None:
    """Another writer (its own connection, as another process has) holds the lock a while."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (7)")
    taken.set()
    time.sleep(seconds)
    other.execute("COMMIT")
    other.close()


def _engine_while_another_writer_holds_the_lock(tmp_path: Path, seconds: float
                                                ) -> tuple[Engine, threading.Thread]:
    """An engine on a fresh database with table ``t``, and the thread holding its write lock
    for ``seconds`` (started, the lock taken)."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'lock.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (n INTEGER)"))
    taken = threading.Event()
    holder = threading.Thread(target=_hold_write_lock,
                              args=(tmp_path / "lock.db", seconds, taken))
    holder.start()
    assert taken.wait(5)
    return engine, holder


def test_sqlite_transaction_waits_for_the_write_lock(tmp_path: Path) -> None:
    engine, holder = _engine_while_another_writer_holds_the_lock(tmp_path, 0.3)
    with engine.begin() as conn:  # waits for the holder's commit, so it sees the holder's row
        assert conn.execute(text("SELECT n FROM t")).scalars().all() == [7]
        conn.execute(text("INSERT INTO t VALUES (1)"))
        # the statements inside the transaction keep SQLite's own wait
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == db.SQLITE_BUSY_TIMEOUT_MS
    holder.join()
    engine.dispose()


def test_sqlite_write_lock_held_too_long_is_an_operational_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As SQLAlchemy raises it: callers retry a database they cannot use now, and only a mail
    that fails by itself is quarantined."""
    monkeypatch.setattr(db, "SQLITE_LOCK_WAIT_SECONDS", 0.1)
    engine, holder = _engine_while_another_writer_holds_the_lock(tmp_path, 1.0)
    with pytest.raises(OperationalError, match="locked"), engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
    holder.join()
    with engine.begin() as conn:  # the connection is usable again once the lock is free
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == db.SQLITE_BUSY_TIMEOUT_MS
        conn.execute(text("INSERT INTO t VALUES (2)"))
        assert conn.execute(text("SELECT n FROM t ORDER BY n")).scalars().all() == [2, 7]
    engine.dispose()
