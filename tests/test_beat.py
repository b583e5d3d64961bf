"""The sweep keeps running across a Redis restart.

The sweep is the safety net for mail whose task the broker lost, so the beat that sends it
must outlive the broker's restarts.  Mails here are only spooled, never enqueued: each becomes
a ticket only if a sweep finds it.  (With Redis, kombu reconnects the beat's channel by itself;
on the embedded broker Celery's own scheduler did not, see ``test_embedded_broker.py``.)"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.roles import stop_celery_worker
from tests.services import RedisServer

REPO = Path(__file__).resolve().parent.parent

_SPOOL_ONLY = """\
import sys
from workers import runtime
raw = (f"From: c@example.org\\r\\nSubject: spooled {sys.argv[1]}\\r\\n"
       f"Message-ID: <spooled-{sys.argv[1]}@example.org>\\r\\n\\r\\nbody\\r\\n").encode()
runtime.ingestor().receive(raw, 1, "smtp")
"""


def _spool_and_wait_for_ticket(env: dict[str, str], tmp_path: Path, n: int, log: Path) -> None:
    subprocess.run([sys.executable, "-c", _SPOOL_ONLY, str(n)], env=env, cwd=tmp_path,
                   check=True, timeout=60)
    deadline = time.monotonic() + 90
    while True:
        with sqlite3.connect(tmp_path / "data" / "ticketgate.db") as db:
            tickets = db.execute("SELECT count(*) FROM tickets").fetchone()[0]
        if tickets >= n:
            return
        assert time.monotonic() < deadline, (
            f"spooled mail {n} not swept into a ticket\n"
            + log.read_text(errors="replace")[-4000:])
        time.sleep(0.3)


@pytest.mark.timeout(300)
def test_sweeps_go_on_after_a_redis_restart(tmp_path: Path, redis_server: RedisServer,
                                            redis_url: str) -> None:
    config = tmp_path / "ticketgate.toml"
    config.write_text('[service]\ndata_dir = "data"\n'
                      "[worker]\nconcurrency = 1\nsweep_interval = 1\nsweep_age = 1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKETGATE_")}
    env.update(TICKETGATE_CONFIG=str(config), TICKETGATE_BROKER_URL=redis_url,
               PYTHONPATH=str(REPO))
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "--beat"], env=env,
                              cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=open(log, "wb"))  # noqa: SIM115
    try:
        _spool_and_wait_for_ticket(env, tmp_path, 1, log)
        redis_server.stop()
        time.sleep(3)  # a few sweeps fail while Redis is down
        redis_server.restart()
        _spool_and_wait_for_ticket(env, tmp_path, 2, log)
        assert "sweep: re-enqueued 1 stuck mail(s)" in log.read_text(errors="replace")
    finally:
        stop_celery_worker(worker)
        redis_server.ensure_running()
