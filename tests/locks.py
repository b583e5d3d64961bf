"""Whether a worker holds anything of the database at this moment, seen from outside it."""

from __future__ import annotations

import sqlite3

import psycopg

from ingest.service import Ingestor
from tests.services import _conninfo


def database_held(ing: Ingestor) -> bool:
    """True while another session keeps a transaction open: on SQLite, whether a writer of its
    own cannot take the one write lock at once; on PostgreSQL, whether any other session of the
    database sits idle in an open transaction (its locks and connection held while it waits on
    something outside the database)."""
    url = ing.engine.url
    if url.get_backend_name() == "sqlite":
        other = sqlite3.connect(str(url.database), timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            other.close()
    with psycopg.connect(_conninfo(url.render_as_string(hide_password=False))) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'").fetchone()
    return bool(row and row[0])
