"""``/healthz`` and ``/metrics``: is this process able to do its job, and what has it done.

Mail counts are read from the database at scrape time (a custom collector) instead of being
counted in memory: the SMTP listener, the IMAP poller, the workers and the API are separate
processes, and only the ``inbound_mails`` table sees all of them, survives restarts, and can never
disagree with what ``ticketgate quarantine list`` shows.  The one in-memory series is the latency
of mails the API processed itself, which only this process can time.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from ingest.models import FINAL_STATES, InboundMail

log = logging.getLogger("ticketgate.api")

DOORS = ("smtp", "imap", "http", "replay")
STATES = ("received", *FINAL_STATES)
CHECK_TIMEOUT_S = 5.0
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class InboundCollector(Collector):
    """``ticketgate_mails_*`` from one GROUP BY over the spool, at scrape time."""

    def __init__(self, sessions: Callable[[], Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("ticketgate_database_up",
                               "1 if the last scrape could read the spool table")
        try:
            with self.sessions() as session:
                rows = session.execute(
                    select(InboundMail.door, InboundMail.state, func.count())
                    .group_by(InboundMail.door, InboundMail.state)).all()
        except Exception as exc:  # a scrape must answer even when the database does not
            log.warning("metrics: cannot read inbound_mails: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        counts: dict[tuple[str, str], int] = {(str(d), str(s)): int(n) for d, s, n in rows}
        doors = sorted(set(DOORS) | {d for d, _ in counts})
        received = CounterMetricFamily(
            "ticketgate_mails_received", "Mails spooled, per door (SMTP, IMAP, HTTP, replay)",
            labels=["door"])
        for door in doors:
            received.add_metric([door], sum(n for (d, _), n in counts.items() if d == door))
        yield received
        by_state = GaugeMetricFamily(
            "ticketgate_mails", "Spooled mails by current state and door", labels=["state", "door"])
        states = sorted(set(STATES) | {s for _, s in counts})
        for state in states:
            for door in doors:
                by_state.add_metric([state, door], counts.get((door, state), 0))
        yield by_state
        depth = GaugeMetricFamily(
            "ticketgate_queue_depth", "Mails spooled and not yet processed (state received)")
        depth.add_metric([], sum(n for (_, s), n in counts.items() if s == "received"))
        yield depth


@dataclass
class ApiMetrics:
    """The registry ``/metrics`` exposes; one per app, so tests can build many apps."""

    registry: CollectorRegistry
    ingest_seconds: Histogram
    requests: Counter

    @classmethod
    def create(cls, sessions: Callable[[], Session]) -> ApiMetrics:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(InboundCollector(sessions))
        return cls(
            registry=registry,
            ingest_seconds=Histogram(
                "ticketgate_api_pipeline_seconds",
                "Store-and-process time of mails posted to CreateTicketFromMailData",
                ["action"], buckets=LATENCY_BUCKETS, registry=registry),
            requests=Counter(
                "ticketgate_http_requests", "HTTP requests answered, by route and status",
                ["method", "route", "status"], registry=registry),
        )


def check_database(engine: Engine) -> dict[str, Any]:
    """``SELECT 1`` on a raw DBAPI connection: on SQLite this takes no write lock (the engine's
    ``BEGIN IMMEDIATE`` hook only fires for ORM/Core transactions)."""
    started = time.perf_counter()
    conn = engine.raw_connection()
    try:
        cursor = conn.cursor()
        cursor.execute("SELECT 1")
        cursor.fetchall()
        cursor.close()
    finally:
        conn.close()
    return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 1),
            "backend": engine.dialect.name}


def check_broker(url: str) -> dict[str, Any]:
    from kombu import Connection  # kombu comes with Celery; imported only when checked

    started = time.perf_counter()
    with Connection(url, connect_timeout=CHECK_TIMEOUT_S) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                               timeout=CHECK_TIMEOUT_S)
    return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 1),
            "transport": url.split(":", 1)[0]}


_checks = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="healthz")


def health(engine: Engine, broker_url: str) -> tuple[bool, dict[str, Any]]:
    """Both checks in parallel, each bounded in time, errors reported by type and message."""
    futures = {
        "database": _checks.submit(check_database, engine),
        "broker": _checks.submit(check_broker, broker_url),
    }
    detail: dict[str, Any] = {}
    for name, future in futures.items():
        try:
            detail[name] = future.result(timeout=CHECK_TIMEOUT_S * 2)
        except concurrent.futures.TimeoutError:
            detail[name] = {"ok": False, "error": f"no answer within {CHECK_TIMEOUT_S * 2:.0f}s"}
        except Exception as exc:
            detail[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    ok = all(part["ok"] for part in detail.values())
    return ok, detail
