"""The contract says ``amqp://`` brokers work: SMTP listener and Celery worker on a real RabbitMQ
(a private node, see ``tests/services.py``) with the default SQLite database."""

from __future__ import annotations

import os
import signal
import smtplib
import time
import uuid
from email.utils import formatdate
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from ingest.models import InboundMail, Ticket
from tests.roles import Role
from tests.services import RabbitMQServer, _free_port

MAILS = 10
READY_TIMEOUT_S = 60.0
DONE_TIMEOUT_S = 60.0

CONFIG = """
[service]
data_dir = "{data_dir}"

[worker]
sweep_interval = 30.0
sweep_age = 600.0  # the sweep must not be what delivers these: the broker must

[[mailbox]]
id = 1
name = "Support"
addresses = ["support@example.com"]
"""


def _mail(n: int, run: str) -> bytes:
    return (
        f"From: Customer {n} <customer{n}@client.example>\r\n"
        "To: support@example.com\r\n"
        f"Subject: Question {n} over AMQP\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        f"Message-ID: <amqp-{n}-{run}@client.example>\r\n"
        "\r\n"
        f"Hello, this is question {n}.\r\n"
    ).encode()


@pytest.mark.timeout(180)
def test_smtp_and_worker_over_amqp(tmp_path: Path, rabbitmq_server: RabbitMQServer) -> None:
    config = tmp_path / "ticketgate.toml"
    config.write_text(CONFIG.format(data_dir=(tmp_path / "data").as_posix()), encoding="utf-8")
    db_url = f"sqlite:///{(tmp_path / 'data' / 'ticketgate.db').as_posix()}"
    env = {
        **os.environ,
        "TICKETGATE_DATABASE_URL": db_url,
        "TICKETGATE_BROKER_URL": rabbitmq_server.url,
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("TICKETGATE_CONFIG", None)
    port = _free_port()
    smtp = Role("smtp", ["smtp", "--config", str(config), "--port", str(port)], env, tmp_path)
    worker = Role("worker", ["worker", "--config", str(config), "--beat", "--concurrency", "2"],
                  env, tmp_path)
    engine = create_engine(db_url)
    try:
        smtp.start()
        smtp.wait_for_log("ticketgate smtp listening", READY_TIMEOUT_S)
        worker.start()
        worker.wait_for_log(" ready.", READY_TIMEOUT_S)
        assert f"amqp://guest:**@127.0.0.1:{rabbitmq_server.port}//" in worker.log_text()

        run = uuid.uuid4().hex[:10]
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            for n in range(MAILS):
                client.sendmail("mta@relay.example", ["support@example.com"], _mail(n, run))

        deadline = time.monotonic() + DONE_TIMEOUT_S
        while True:
            with engine.connect() as conn:
                states = dict(conn.execute(
                    select(InboundMail.state, func.count()).group_by(InboundMail.state)
                ).all())
            if states.get("created", 0) >= MAILS or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        with engine.connect() as conn:
            tickets = conn.scalar(select(func.count()).select_from(Ticket))
        queues = rabbitmq_server.ctl("list_queues", "name", "messages").stdout
    finally:
        worker.kill_group(signal.SIGTERM)
        smtp.kill_group(signal.SIGTERM)
        engine.dispose()

    print(f"\nAMQP: inbound states {states}, tickets {tickets}; queues:\n{queues}")
    assert states == {"created": MAILS}, worker.log_text()[-4000:]
    assert tickets == MAILS
    # Delivered through RabbitMQ, not by the sweep or any fallback.
    assert "ticketgate" in queues.split()
    assert "broker unavailable" not in smtp.log_text()
    assert "sweep: re-enqueued" not in worker.log_text()
