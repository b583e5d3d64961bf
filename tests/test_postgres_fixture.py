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
