"""The PostgreSQL fixtures hand out a real, durable, writable server."""

import psycopg


def test_fresh_postgres_url_is_a_real_durable_database(fresh_postgres_url: str) -> None:
    conninfo = fresh_postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(conninfo) as conn:
        conn.execute("CREATE TABLE probe (id integer PRIMARY KEY, subject text NOT NULL)")
        conn.execute("INSERT INTO probe (id, subject) VALUES (%s, %s)", (1, "Re: printer on fire"))
        conn.commit()
        assert conn.execute("SELECT id, subject FROM probe").fetchall() == [
            (1, "Re: printer on fire")
        ]
        assert conn.execute("SHOW fsync").fetchone() == ("on",)


def test_schema_compresses_the_large_columns_with_lz4(fresh_postgres_url: str) -> None:
    """Migration 0006: the mail bytes and bodies are TOAST-compressed with lz4 (pglz cost
    about 0.45 ms of server CPU per mail in bench/), on a server built with lz4."""
    from sqlalchemy import create_engine

    from ingest.schema import upgrade

    engine = create_engine(fresh_postgres_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    conninfo = fresh_postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(conninfo) as conn:
        has_lz4 = conn.execute("SELECT 'lz4' = ANY(enumvals) FROM pg_settings"
                               " WHERE name = 'default_toast_compression'").fetchone()
        assert has_lz4 == (True,), "the test server (Debian's PostgreSQL) is built with lz4"
        rows = conn.execute(
            "SELECT attrelid::regclass::text || '.' || attname, attcompression"
            " FROM pg_attribute WHERE attrelid::regclass::text IN"
            " ('inbound_mails', 'messages', 'attachments', 'tickets')"
            " AND attname IN ('raw', 'body_text', 'body_html', 'headers', 'data', 'description')"
        ).fetchall()
    assert dict(rows) == {
        "inbound_mails.raw": "l", "messages.body_text": "l", "messages.body_html": "l",
        "messages.headers": "l", "attachments.data": "l", "tickets.description": "l"}
