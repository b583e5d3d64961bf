"""The embedded broker (kombu's SQL transport on ``broker.db``) when the roles start together.

``ticketgate serve`` starts the listener and the workers at the same moment on a fresh data
directory.  kombu creates its tables and the queue's row on first use with a lock that holds
within one process only, so these tests start several processes at one instant against an
empty ``broker.db``, each doing what a worker (poll) and a listener (publish) do first."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROCESSES = 8

_ROLE = textwrap.dedent("""\
    import sys, time
    import celery, kombu.transport.sqlalchemy, ingest.service  # the slow imports, before the start
    time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
    from workers.celery_app import app, enqueue
    with app.connection_for_read() as connection:  # a worker's first poll: no retry of its own
        connection.default_channel.basic_get("ticketgate")
    assert enqueue([int(sys.argv[2])])
    """)


def test_roles_starting_together_on_a_fresh_broker_all_work(tmp_path: Path) -> None:
    config = tmp_path / "ticketgate.toml"
    config.write_text('[service]\ndata_dir = "data"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKETGATE_")}
    env.update(TICKETGATE_CONFIG=str(config), PYTHONPATH=str(REPO))
    start_at = time.time() + 4.0  # every process has done its slow imports by then
    roles = [subprocess.Popen([sys.executable, "-c", _ROLE, str(start_at), str(n)], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for n in range(PROCESSES)]
    outputs = [role.communicate(timeout=60)[0] for role in roles]
    failed = [out for role, out in zip(roles, outputs, strict=True) if role.returncode != 0]
    assert not failed, failed[0][-3000:]
    with sqlite3.connect(tmp_path / "data" / "broker.db") as db:
        assert db.execute("SELECT name FROM kombu_queue").fetchall() == [("ticketgate",)]
    # every publish is in the queue (a message a poll took without acknowledging is put back)
    from kombu import Connection

    published: set[int] = set()
    with Connection(f"sqla+sqlite:///{tmp_path / 'data' / 'broker.db'}") as connection:
        channel = connection.default_channel
        while (message := channel.basic_get("ticketgate", no_ack=True)) is not None:
            args, _kwargs, _embed = message.decode()
            published.update(args[0])
    assert published == set(range(PROCESSES))
