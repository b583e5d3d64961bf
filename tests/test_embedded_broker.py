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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from tests.roles import stop_celery_worker
from tests.tcpgate import TcpGate

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


@contextmanager
def _worker_with_beat(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """``ticketgate worker --beat`` on the embedded broker, sweeping every second."""
    env = _site(tmp_path, "[worker]\nconcurrency = 1\nsweep_interval = 1\n")
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "--beat"], env=env,
                              cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=open(log, "wb"))  # noqa: SIM115
    try:
        yield env, log
    finally:
        stop_celery_worker(worker)


def _sweeps(log: Path) -> int:
    """Sweeps done: each deletes at least its own message."""
    return log.read_text(errors="replace").count("delivered message(s) deleted")


def _first_error(log: Path) -> str:
    text = log.read_text(errors="replace")
    start = max(0, min((i for i in (text.find("ERROR"), text.find("WARNING")) if i >= 0),
                       default=len(text) - 3000))
    return text[start:start + 4000]


@pytest.mark.timeout(180)
def test_sweep_deletes_the_messages_the_embedded_broker_delivered(tmp_path: Path) -> None:
    """kombu's SQL transport keeps every delivered message; the sweep deletes them, so
    ``broker.db`` does not grow with every task for as long as the site runs.  The embedded
    beat, forked by the worker, goes on sending sweeps after its first.  (In one CI run its
    first publish met a closed channel and was sent again at once on a new connection:
    ``ReconnectingScheduler``, tested on its own below.)"""
    mails = 20
    with _worker_with_beat(tmp_path) as (env, log):
        subprocess.run([sys.executable, "-c", _SEND_EACH_ALONE, str(mails)], env=env,
                       cwd=tmp_path, check=True, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            with sqlite3.connect(tmp_path / "data" / "ticketgate.db") as db:
                tickets = db.execute("SELECT count(*) FROM tickets").fetchone()[0]
            with sqlite3.connect(tmp_path / "data" / "broker.db") as db:
                delivered = db.execute(
                    "SELECT count(*) FROM kombu_message WHERE NOT visible").fetchone()[0]
            # at most the sweep running now and one published since the last delete
            if tickets == mails and delivered <= 2 and _sweeps(log) >= 3:
                break
            assert time.monotonic() < deadline, (
                f"{tickets} tickets, {delivered} delivered messages kept\n{_first_error(log)}")
            time.sleep(0.5)


def _wait_for_sweeps(log: Path, count: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while _sweeps(log) < count:
        assert time.monotonic() < deadline, f"{_sweeps(log)} sweeps\n{_first_error(log)}"
        time.sleep(0.2)


@pytest.mark.timeout(180)
def test_beat_sends_sweeps_again_after_the_broker_failed_it(tmp_path: Path) -> None:
    """A publish that fails closes the beat's channel.  Celery's own scheduler keeps that
    channel, and every later sweep failed with "channel disconnected" for as long as the worker
    ran.  Here the broker's file is locked past kombu's wait (as a stuck writer would), then
    released: sweeps start again."""
    with _worker_with_beat(tmp_path) as (_env, log):
        _wait_for_sweeps(log, 2, 90)
        holder = sqlite3.connect(tmp_path / "data" / "broker.db", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        # kombu's SQLite connections wait 5 s, and Celery publishes 4 times
        deadline = time.monotonic() + 60
        while "could not send sweep" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, _first_error(log)
            time.sleep(0.5)
        holder.execute("ROLLBACK")
        holder.close()
        after = _sweeps(log)
        _wait_for_sweeps(log, after + 2, 60)


@pytest.mark.timeout(180)
def test_a_worker_started_before_its_database_is_reachable_waits_for_it(
        tmp_path: Path, fresh_postgres_url: str) -> None:
    """A database that is down when ``ticketgate worker`` starts only delays the pipeline to
    the first task (README).  The worker exited with the OperationalError instead, so one
    started by compose or systemd before its PostgreSQL stayed down."""
    real = make_url(fresh_postgres_url)
    gate = TcpGate(real.host or "127.0.0.1", real.port or 5432)  # refuses until opened
    env = _site(tmp_path, "[worker]\nconcurrency = 1\n")
    env["TICKETGATE_DATABASE_URL"] = real.set(host="127.0.0.1", port=gate.port).render_as_string(
        hide_password=False)
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "--pool", "solo"],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=open(log, "wb"))  # noqa: SIM115
    try:
        deadline = time.monotonic() + 60
        while "ready." not in log.read_text(errors="replace"):
            assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        assert "database not reachable at start" in log.read_text(errors="replace")
        gate.open()
        subprocess.run([sys.executable, "-c", _SEND_EACH_ALONE, "3"], env=env, cwd=tmp_path,
                       check=True, timeout=60)
        engine = create_engine(fresh_postgres_url)
        try:
            deadline = time.monotonic() + 60
            while True:
                with engine.connect() as connection:
                    tickets = connection.execute(text("SELECT count(*) FROM tickets")).scalar()
                if tickets == 3:
                    break
                assert time.monotonic() < deadline, _first_error(log)
                time.sleep(0.3)
        finally:
            engine.dispose()
    finally:
        stop_celery_worker(worker)
        gate.close()
