"""The Celery app and its thin tasks.  All logic lives in ``ingest``; tasks only carry ids.

Reliability settings, and why:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged after the task
  finished, so a worker killed mid-task leaves it to be redelivered;
* ``worker_prefetch_multiplier = 1``: a dying worker holds at most one unacknowledged message;
* JSON only: tasks carry an inbound id, never mail bytes or pickles;
* the sweep re-enqueues spooled records that are still ``received`` after ``worker.sweep_age``
  seconds, which covers what the broker itself can lose (a Redis restart without persistence);
* processing is idempotent (row lock + final-state check), so a task delivered twice is harmless.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals

from ingest.errors import InboundNotFound, TransientError
from workers import metrics, runtime

log = logging.getLogger("ticketgate.tasks")

PROCESS_TASK = "ticketgate.process_inbound"
SWEEP_TASK = "ticketgate.sweep"


def make_celery() -> Celery:
    settings = runtime.settings()
    app = Celery("ticketgate", broker=settings.effective_broker_url)
    broker = settings.effective_broker_url
    transport_options: dict[str, Any] = {}
    if broker.startswith(("redis://", "rediss://")):
        # Unacknowledged messages come back after this long if their worker vanished.
        transport_options["visibility_timeout"] = 300
    if broker.startswith("sqla+"):
        settings.service.data_dir.mkdir(parents=True, exist_ok=True)
        # kombu's SQL transport polls an empty queue once a second, which caps the embedded
        # default at about one mail per second per worker process.  Its transport options go to
        # create_engine(), so the interval can only be set on the transport class.
        from kombu.transport import sqlalchemy as kombu_sqla

        kombu_sqla.Transport.polling_interval = 0.1
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A mail that hangs its worker is cut off; the redelivery counts as an attempt and after
        # worker.max_attempts the mail is quarantined instead of looping.
        task_time_limit=settings.worker.task_time_limit,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        broker_transport_options=transport_options,
        task_default_queue="ticketgate",
        worker_hijack_root_logger=False,
        beat_schedule={
            "sweep": {"task": SWEEP_TASK, "schedule": settings.worker.sweep_interval},
        },
    )
    return app


app = make_celery()
metrics.connect_task_signals()  # count and time every task (exposed with [metrics] enabled)


@signals.worker_init.connect
def _load_pipeline(**_kwargs: Any) -> None:
    """Workers process mail: load the pipeline once in the parent, before the pool forks, so
    its children share those pages (the listener, which only enqueues, never loads it)."""
    import ingest.pipeline  # noqa: F401


@app.task(bind=True, name=PROCESS_TASK, max_retries=None)
def process_inbound(self: Any, inbound_id: int) -> dict[str, Any] | None:
    """Run the pipeline for one spooled mail.  Transient failures retry with backoff; every
    other failure is quarantined by the pipeline itself, so no task retries forever."""
    try:
        info = runtime.ingestor().process(inbound_id)
    except InboundNotFound:
        log.error("inbound %s does not exist; dropping the task", inbound_id,
                  extra={"inbound_id": inbound_id})
        return None
    except TransientError as exc:
        cap = runtime.settings().worker.task_retry_max_delay
        delay = min(cap, 2 ** min(self.request.retries, 8))
        log.warning("inbound %s: %s; retry in %ss", inbound_id, exc, delay,
                    extra={"inbound_id": inbound_id})
        raise self.retry(exc=exc, countdown=delay) from exc
    return {"InboundId": info.InboundId, "Action": info.Action, "TicketId": info.TicketId}


@app.task(name=SWEEP_TASK)
def sweep() -> int:
    """Enqueue again every record stuck in ``received``; returns how many."""
    settings = runtime.settings()
    ids = runtime.ingestor().stuck_inbound_ids(settings.worker.sweep_age)
    for inbound_id in ids:
        process_inbound.delay(inbound_id)
    if ids:
        log.warning("sweep: re-enqueued %d stuck mail(s): %s", len(ids), ids[:20])
    return len(ids)


def enqueue(inbound_ids: list[int]) -> bool:
    """Hand ids to the broker.  False if the broker is unreachable: the mails are already
    spooled, and the sweep will pick them up, so the SMTP answer stays 250."""
    try:
        for inbound_id in inbound_ids:
            process_inbound.apply_async((inbound_id,), retry=False)
    except Exception as exc:  # broker down: kombu raises many types
        log.warning("broker unavailable (%s); %d mail(s) left for the sweep", exc, len(inbound_ids))
        return False
    return True
