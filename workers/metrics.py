"""Prometheus endpoints of the SMTP listener, the IMAP poller and the Celery workers.

The HTTP API serves ``/metrics`` itself (``workers/observability.py``: mail counts read from the
database, so every role's mail shows there).  The other roles have no HTTP server of their own;
with ``[metrics] enabled = true`` each starts ``prometheus_client``'s on its port
(``smtp_port``, ``imap_port``, ``worker_port``) and exposes what only that process knows:

* SMTP and IMAP: ``ticketgate_enqueued_total{door,result}``, mail ids handed to the broker
  (``result="broker_unavailable"``: left for the sweep), plus the process' CPU, memory and fds;
* workers: ``ticketgate_tasks_total{task,state}``, ``ticketgate_task_seconds{task}`` and
  ``ticketgate_task_results_total{action}`` from Celery's task signals.  A prefork worker runs
  tasks in child processes, so the worker uses prometheus_client's multiprocess mode: each
  child writes its samples to a directory the parent's endpoint sums up.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ingest.config import Settings

log = logging.getLogger("ticketgate.metrics")

ROLES = ("smtp", "imap", "worker")
TASK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_metrics: dict[str, Any] = {}
_started: dict[str, float] = {}  # Celery task id -> perf_counter at task_prerun


def _version() -> str:
    try:
        return version("ticketgate")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def _metric(name: str, factory: Callable[[], Any]) -> Any:
    """Create each metric once per process, and only when first used (so a worker can switch to
    multiprocess mode before any exists)."""
    if name not in _metrics:
        _metrics[name] = factory()
    return _metrics[name]


def _enqueued() -> Any:
    from prometheus_client import Counter

    return _metric("enqueued", lambda: Counter(
        "ticketgate_enqueued", "Spooled mail ids handed to the broker, by door and result",
        ["door", "result"]))


def counted(enqueue: Callable[[list[int]], Any], door: str) -> Callable[[list[int]], Any]:
    """``enqueue`` that also counts the ids it hands over (``ok``) or leaves to the sweep."""

    def enqueue_and_count(inbound_ids: list[int]) -> Any:
        result = enqueue(inbound_ids)
        label = "broker_unavailable" if result is False else "ok"
        _enqueued().labels(door, label).inc(len(inbound_ids))
        return result

    return enqueue_and_count


def start_role_server(role: str, settings: Settings, registry: Any = None) -> int | None:
    """Serve ``/metrics`` for ``role`` if ``[metrics]`` enables it; the port, or None.

    A port that is taken is logged and skipped: metrics never stop a role from working.
    """
    from prometheus_client import REGISTRY, Gauge, start_http_server

    config = settings.metrics
    if not config.enabled:
        return None
    port = int(getattr(config, f"{role}_port"))
    info = _metric("role_info", lambda: Gauge(
        "ticketgate_role_info", "The ticketgate role this process runs (always 1)",
        ["role", "version"], multiprocess_mode="max"))
    info.labels(role, _version()).set(1)
    try:
        start_http_server(port, addr=config.host, registry=registry or REGISTRY)
    except OSError as exc:
        log.warning("metrics: cannot listen on %s:%s (%s); %s runs without a metrics endpoint",
                    config.host, port, exc, role)
        return None
    log.info("metrics: %s on http://%s:%s/metrics", role, config.host, port)
    return port


def start_worker_server(settings: Settings) -> int | None:
    """Multiprocess mode, then the endpoint: call in the worker's main process before Celery
    forks its pool (and before any metric exists in this process)."""
    if not settings.metrics.enabled:
        return None
    from prometheus_client import CollectorRegistry, values
    from prometheus_client.multiprocess import MultiProcessCollector

    directory = tempfile.mkdtemp(prefix="ticketgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.get_value_class()  # prometheus_client read the env at import
    _metrics.clear()
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    return start_role_server("worker", settings, registry=registry)


# --- Celery task signals (connected by workers/celery_app.py) ----------------------------------


def _task_metrics() -> tuple[Any, Any, Any]:
    from prometheus_client import Counter, Histogram

    tasks = _metric("tasks", lambda: Counter(
        "ticketgate_tasks", "Celery tasks finished, by task and final state", ["task", "state"]))
    seconds = _metric("task_seconds", lambda: Histogram(
        "ticketgate_task_seconds", "Run time of Celery tasks", ["task"], buckets=TASK_BUCKETS))
    results = _metric("task_results", lambda: Counter(
        "ticketgate_task_results", "Mails processed by the workers, by resulting action",
        ["action"]))
    return tasks, seconds, results


def on_task_prerun(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _started[task_id] = time.perf_counter()


def on_task_postrun(task_id: str | None = None, task: Any = None,
                    state: str | None = None, **_: Any) -> None:
    started = _started.pop(task_id, None) if task_id else None
    name = getattr(task, "name", None) or "unknown"
    try:
        tasks, seconds, _results = _task_metrics()
        tasks.labels(name, (state or "unknown").lower()).inc()
        if started is not None:
            seconds.labels(name).observe(time.perf_counter() - started)
    except Exception as exc:  # metrics must never fail a task
        log.warning("metrics: task %s not counted: %s", name, exc)


def count_processed(action: str) -> None:
    """One mail a worker finished, by its action: counted as it happens, because a task that
    carries several mails may end in a retry for one of them after the others are done."""
    try:
        _task_metrics()[2].labels(action).inc()
    except Exception as exc:  # metrics must never fail a task
        log.warning("metrics: result %s not counted: %s", action, exc)


def connect_task_signals() -> None:
    from celery.signals import task_postrun, task_prerun

    task_prerun.connect(on_task_prerun, weak=False, dispatch_uid="ticketgate-metrics-prerun")
    task_postrun.connect(on_task_postrun, weak=False, dispatch_uid="ticketgate-metrics-postrun")
