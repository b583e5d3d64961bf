"""The Celery app and its thin tasks.  All logic lives in ``ingest``; tasks only carry ids.

Reliability settings, and why:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged after the task
  finished, so a worker killed mid-task leaves it to be redelivered;
* ``worker_prefetch_multiplier = 1``: a dying worker holds at most one unacknowledged message;
* JSON only: tasks carry inbound ids (up to 16), never mail bytes or pickles;
* the sweep re-enqueues spooled records that are still ``received`` after ``worker.sweep_age``
  seconds, which covers what the broker itself can lose (a Redis restart without persistence);
* processing is idempotent (row lock + final-state check), so a task delivered twice is harmless;
* the beat (:class:`ReconnectingScheduler`) outlives a failed publish, so the sweep never stops;
* the embedded broker (kombu's SQL transport) is prepared before use and purged by the sweep.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, NoReturn

from celery import Celery, signals
from celery.beat import PersistentScheduler, ScheduleEntry
from kombu import Connection
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.pool import NullPool

from ingest.errors import ParentPending, TransientError
from workers import metrics, runtime
from workers.supervisor import die_with_parent

log = logging.getLogger("ticketgate.tasks")

PROCESS_TASK = "ticketgate.process_inbound"
# Ids per task: enough to spread Celery's per-task cost, few enough that both worker processes
# of a small machine get work and a redelivered task repeats little.
IDS_PER_TASK = 16
PUBLISH_RETRY_SECONDS = 0.2
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
        os.register_at_fork(after_in_child=_drop_inherited_broker_engines)
        prepare_embedded_broker(broker, "ticketgate")
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
        beat_scheduler=f"{__name__}:ReconnectingScheduler",
    )
    return app


def prepare_embedded_broker(url: str, queue: str, attempts: int = 5) -> None:
    """Create the SQL broker's tables and queue row before this process uses them.

    kombu creates both on first use, guarded by a lock that only holds within one process: when
    the listener's first publish and a worker's first poll meet on a fresh ``broker.db``, one of
    them fails with "table already exists" or a unique-constraint error on the queue name, and a
    worker that fails there never consumes.  Each such failure means another process got there
    first, so trying again on a fresh connection finds what it created."""
    for attempt in range(1, attempts + 1):
        try:
            with Connection(url) as connection:
                connection.default_channel.queue_declare(queue=queue)
            return
        except (IntegrityError, OperationalError) as exc:
            if attempt == attempts:
                # Not fatal: a listener still spools (the sweep enqueues later), and a worker's
                # consumer reconnects until the broker can be used.
                log.warning("embedded broker not prepared: %s", exc)
                return
            log.info("broker tables created concurrently (%s), again", type(exc).__name__)
            time.sleep(0.05 * attempt)


def _drop_inherited_broker_engines() -> None:
    """In a forked child, let go of the engines kombu's SQL transport caches per URL for the
    life of a process (``dispose(close=False)``: the parent's connections stay the parent's).

    The worker forks its pool and its embedded beat, sometimes after its consumer connected;
    the beat then closes the file descriptors it inherited, and publishing on the parent's
    pooled SQLite connection closed its channel for good: the beat sent no sweep.  Without the
    cached engines each child opens its own on first use."""
    from kombu.transport import sqlalchemy as kombu_sqla

    engines: dict[str, Any] = getattr(kombu_sqla.Channel, "_engines", {})
    for engine, _sessions in engines.values():
        engine.dispose(close=False)
        # Kept, never collected here: collecting would close the parent's SQLite connections
        # on file descriptor numbers the beat has closed and may have given to other files.
        _INHERITED_BROKER_ENGINES.append(engine)
    engines.clear()


_INHERITED_BROKER_ENGINES: list[Any] = []


class ReconnectingScheduler(PersistentScheduler):
    """Celery's persistent beat scheduler, which builds a new broker connection after a failed
    publish.

    Celery keeps the producer it made first for the life of the process: once its channel is
    closed (a broker restart, a connection error on the embedded broker's file) every later
    publish fails with "channel disconnected" (celery#8845), and the sweep, the safety net for
    mail the broker lost, stopped for good.  A due task is sent again at once on the new
    connection; if that fails too, at its next time."""

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        for attempt in (1, 2):
            log.info("beat: sending due task %s (%s)", entry.name, entry.task)
            try:
                self.apply_async(entry, producer=self.producer, advance=False)
                return
            except Exception as exc:  # the broker's errors come in many types
                log.warning("beat: could not send %s; new broker connection. %s", entry.name, exc,
                            exc_info=True)
                self._drop_connection()
                if attempt == 2:
                    return

    def _drop_connection(self) -> None:
        """Forget the producer and connection (cached properties), so the next publish makes
        new ones; the old connection's resources are released without talking to the broker."""
        self.__dict__.pop("producer", None)
        connection = self.__dict__.pop("connection", None)
        if connection is not None:
            try:
                connection.collect()
            except Exception as exc:  # a dead connection may fail to clean up: nothing is lost
                log.debug("beat: old broker connection: %s", exc)


app = make_celery()
metrics.connect_task_signals()  # count and time every task (exposed with [metrics] enabled)


@signals.worker_init.connect
def _load_pipeline(**_kwargs: Any) -> None:
    """Workers process mail: load the pipeline and build the Ingestor once in the parent,
    before the pool forks, so its children share those pages and start warm (the listener,
    which only enqueues, never loads it).  The parent's connections are closed before the fork;
    each child opens its own (:func:`_adopt_ingestor`).  A database that cannot be reached now
    is not fatal: each child then builds its Ingestor on its first task, as tasks retry."""
    import ingest.pipeline  # noqa: F401
    from ingest.prepare import warm_up

    warm_up()
    try:
        runtime.ingestor().engine.dispose()
    except Exception as exc:  # any failure here only costs the head start
        log.warning("pipeline not prepared before the pool starts: %s", exc)


@signals.worker_process_init.connect
def _adopt_ingestor(**_kwargs: Any) -> None:
    runtime.adopt_after_fork()


@signals.beat_embedded_init.connect
def _beat_dies_with_its_worker(**_kwargs: Any) -> None:
    """The embedded beat (``worker --beat``) is a child of the worker's main process; when that
    was killed, the beat lived on under init, and the worker started again in its place added a
    second beat: two sweeps at every interval."""
    die_with_parent()


@app.task(bind=True, name=PROCESS_TASK, max_retries=None)
def process_inbound(self: Any, inbound_ids: int | list[int]) -> dict[str, Any] | None:
    """Run the pipeline for spooled mails (:meth:`~ingest.service.Ingestor.process_many`: the
    ones never started before in one transaction, the others one by one).

    A task carries up to :data:`IDS_PER_TASK` ids (one int from older publishers): Celery's own
    work per task (receive, dispatch, acknowledge, trace) was a third of a worker's CPU when
    every mail had its task, and a commit per mail most of the database's.  Transient failures
    retry with backoff, for the ids they concern (a reply waiting for its parent) or for the
    whole task (database down); every other failure is quarantined by the pipeline itself, so
    no task retries forever.  Acknowledged late as a whole: a worker killed midway leaves the
    task to be delivered again, and the ids it had finished are then no-ops.
    """
    ids = [inbound_ids] if isinstance(inbound_ids, int) else list(inbound_ids)
    # task_time_limit is per task: past half of it the mails not begun go back to the queue as
    # a new task, so every mail keeps at least half the limit (a slow mail late in a task is
    # not cut off and counted as a failed attempt for its position).
    worker = runtime.settings().worker
    deadline = time.monotonic() + worker.task_time_limit / 2
    try:
        results = runtime.ingestor().process_many(ids, deadline, worker.parent_wait_in_task)
    except TransientError as exc:  # database down: the whole task again (done ids are no-ops)
        _retry(self, ids, exc)
    except OperationalError as exc:  # the Ingestor could not be built (database): again
        _retry(self, ids, TransientError(f"database unavailable: {exc.orig}"))
    for inbound_id in results.missing:
        log.error("inbound %s does not exist; dropping it", inbound_id,
                  extra={"inbound_id": inbound_id})
    for info in results.infos.values():
        metrics.count_processed(info.Action)
    if results.left:
        log.info("task past half its time limit: %d mail(s) handed back", len(results.left))
        enqueue(results.left)  # broker down: the sweep finds them
    if results.deferred:
        parents = sorted(set(results.parents.values()))
        _retry(self, results.deferred, ParentPending(
            f"inbound {results.deferred} wait for their parents, inbound {parents}"))
    return {"processed": [{"InboundId": info.InboundId, "Action": info.Action,
                           "TicketId": info.TicketId} for info in results.infos.values()]}


def _retry(task: Any, ids: list[int], exc: TransientError) -> NoReturn:
    cap = runtime.settings().worker.task_retry_max_delay
    delay = min(cap, 2 ** min(task.request.retries, 8))
    log.warning("inbound %s: %s; retry in %ss", ids, exc, delay)
    raise task.retry(args=(ids,), exc=exc, countdown=delay) from exc


@app.task(name=SWEEP_TASK)
def sweep() -> int:
    """Enqueue again every record stuck in ``received``; returns how many.  With the embedded
    broker, also drop the messages it has delivered."""
    settings = runtime.settings()
    ids = runtime.ingestor().stuck_inbound_ids(settings.worker.sweep_age)
    enqueue(ids)
    if ids:
        log.warning("sweep: re-enqueued %d stuck mail(s): %s", len(ids), ids[:20])
    if settings.effective_broker_url.startswith("sqla+"):
        try:
            purge_delivered_messages(settings.effective_broker_url)
        except OperationalError as exc:  # broker.db busy or unreadable: the next sweep tries
            log.warning("sweep: delivered broker messages not deleted: %s", exc.orig)
    return len(ids)


PURGE_BATCH_ROWS = 5000
_DELETE_DELIVERED = text(
    "DELETE FROM kombu_message WHERE id IN "
    "(SELECT id FROM kombu_message WHERE visible = :delivered LIMIT :rows)")


def purge_delivered_messages(url: str) -> int:
    """Delete the embedded broker's delivered messages; returns how many.

    kombu's SQL transport marks a message it hands out invisible and never deletes it, not even
    when it is acknowledged, so ``broker.db`` would grow by a row per task forever, and every
    poll (ten a second per worker process) scans past them.  An invisible row is never read
    again: a message handed back unacknowledged is stored anew, and one lost with its worker is
    found by the sweep through its spooled record.  So every invisible row can go."""
    engine = create_engine(url.removeprefix("sqla+"), poolclass=NullPool)
    deleted = 0
    try:
        while True:  # in short transactions: publishers wait for each
            with engine.begin() as connection:
                batch = connection.execute(_DELETE_DELIVERED, {"delivered": False,
                                                               "rows": PURGE_BATCH_ROWS}).rowcount
            deleted += batch
            if batch < PURGE_BATCH_ROWS:
                break
    finally:
        engine.dispose()
    if deleted:
        log.info("embedded broker: %d delivered message(s) deleted", deleted)
    return deleted


def enqueue(inbound_ids: list[int]) -> bool:
    """Hand ids to the broker, up to :data:`IDS_PER_TASK` per task.  False if the broker is
    unreachable: the mails are already spooled, and the sweep will pick them up, so the SMTP
    answer stays 250.  One failed publish is tried again after a moment, which rides out a
    broker connection that was cut while idle."""
    chunks = [list(inbound_ids[start:start + IDS_PER_TASK])
              for start in range(0, len(inbound_ids), IDS_PER_TASK)]
    for attempt in range(2):
        try:
            while chunks:
                process_inbound.apply_async((chunks[0],), retry=False)
                chunks.pop(0)
            return True
        except Exception as exc:  # broker down: kombu raises many types
            if attempt == 0:
                time.sleep(PUBLISH_RETRY_SECONDS)
                continue
            log.warning("broker unavailable (%s); %d mail(s) left for the sweep", exc,
                        sum(len(chunk) for chunk in chunks))
    return False
