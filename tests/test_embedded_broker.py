"""The embedded broker (kombu's SQL transport on ``broker.db``) when the roles start together.

``ticketgate serve`` starts the listener and the workers at the same moment on a fresh data
directory.  kombu creates its tables and the queue's row on first use with a lock that holds
within one process only, so these tests start several processes at one instant against an
empty ``broker.db``, each doing what a worker (poll) and a listener (publish) do first."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROCESSES = 8

def _site(tmp_path: Path, extra: str = "") -> dict[str, str]:
    config = tmp_path / "ticketgate.toml"
    config.write_text('[service]\ndata_dir = "data"\n' + extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKETGATE_")}
    env.update(TICKETGATE_CONFIG=str(config), PYTHONPATH=str(REPO))
    return env


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
    env = _site(tmp_path)
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


_SEND_EACH_ALONE = textwrap.dedent("""\
    from workers import runtime
    from workers.celery_app import enqueue
    ingestor = runtime.ingestor()
    for n in range(int(__import__("sys").argv[1])):
        raw = (f"From: c{n}@example.org\\r\\nSubject: printer {n}\\r\\n"
               f"Message-ID: <purge-{n}@example.org>\\r\\n\\r\\nbody\\r\\n").encode()
        assert enqueue([ingestor.receive(raw, 1, "smtp")])
    """)


@pytest.mark.timeout(180)
def test_sweep_deletes_the_messages_the_embedded_broker_delivered(tmp_path: Path) -> None:
    """kombu's SQL transport keeps every delivered message; the sweep deletes them, so
    ``broker.db`` does not grow with every task for as long as the site runs.  The embedded
    beat, forked by the worker, goes on sending sweeps after its first."""
    env = _site(tmp_path, "[worker]\nconcurrency = 1\nsweep_interval = 1\n")
    worker = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "--beat"], env=env,
                              cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "worker.log", "wb"))  # noqa: SIM115
    mails = 20
    try:
        subprocess.run([sys.executable, "-c", _SEND_EACH_ALONE, str(mails)], env=env,
                       cwd=tmp_path, check=True, timeout=60)
        broker = tmp_path / "data" / "broker.db"
        deadline = time.monotonic() + 120
        while True:
            with sqlite3.connect(tmp_path / "data" / "ticketgate.db") as db:
                tickets = db.execute("SELECT count(*) FROM tickets").fetchone()[0]
            with sqlite3.connect(broker) as db:
                delivered = db.execute(
                    "SELECT count(*) FROM kombu_message WHERE NOT visible").fetchone()[0]
            log = (tmp_path / "worker.log").read_text(errors="replace")
            sweeps = log.count("delivered message(s) deleted")  # each deletes its own message
            # at most the sweep running now and one published since the last delete
            if tickets == mails and delivered <= 2 and sweeps >= 3:
                break
            assert time.monotonic() < deadline, (
                f"{tickets} tickets, {delivered} delivered messages kept\n"
                + (tmp_path / "worker.log").read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        assert "Couldn't apply scheduled task" not in log  # the beat keeps publishing
    finally:
        worker.send_signal(signal.SIGQUIT)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
