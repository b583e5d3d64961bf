"""``ticketgate check-health``: can this role do its job?  For container health checks.

Always: the database answers ``SELECT 1`` and the broker accepts a connection (the same checks
as the API's ``/healthz``).  With a role, also that role's own process answers:

* ``smtp``: the listener sends its 220 greeting;
* ``api``: ``GET /healthz`` returns 200;
* ``worker``: a Celery worker on this host answers a ping (Redis or RabbitMQ broker), else its
  metrics endpoint answers when ``[metrics]`` is enabled;
* ``imap``: its metrics endpoint answers when ``[metrics]`` is enabled;
* ``serve``: smtp and api.
"""

from __future__ import annotations

import json
import smtplib
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ingest.config import Settings

ROLES = ("smtp", "imap", "api", "worker", "serve")
TIMEOUT_S = 5.0


def _local(host: str) -> str:
    """Where to connect to reach a listener bound to ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "*") else host


def _timed(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        detail = check()
        detail.setdefault("ok", True)
    except Exception as exc:
        detail = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    detail["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return detail


def check_smtp(settings: Settings) -> dict[str, Any]:
    with smtplib.SMTP(_local(settings.smtp_host), settings.smtp_port, timeout=TIMEOUT_S) as smtp:
        code, _banner = smtp.noop()
        return {"ok": code == 250, "noop": code}


def check_api(settings: Settings) -> dict[str, Any]:
    host = _local(settings.http_host)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{settings.http_port}/healthz"
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        body = json.loads(response.read() or b"{}")
        return {"ok": response.status == 200, "status": response.status,
                "healthz": body.get("status", body.get("ok"))}


def check_metrics(settings: Settings, role: str) -> dict[str, Any]:
    port = getattr(settings.metrics, f"{role}_port")
    url = f"http://{_local(settings.metrics.host)}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return {"ok": response.status == 200, "url": url}


def check_worker(settings: Settings) -> dict[str, Any]:
    broker = settings.effective_broker_url
    if broker.startswith(("redis", "amqp", "pyamqp", "rediss")):
        from workers.celery_app import app

        host = socket.gethostname()
        replies = app.control.ping(timeout=TIMEOUT_S / 2)  # every node answers; keep this host's
        nodes = sorted(n for reply in replies for n in reply if n.endswith(f"@{host}"))
        return {"ok": bool(nodes), "nodes": ",".join(nodes) or f"none on {host}"}
    if settings.metrics.enabled:
        return check_metrics(settings, "worker")
    return {"ok": True, "skipped": "no remote control on the embedded broker"}


def check_imap(settings: Settings) -> dict[str, Any]:
    if settings.metrics.enabled:
        return check_metrics(settings, "imap")
    return {"ok": True, "skipped": "enable [metrics] to probe the poller process"}


def run_checks(settings: Settings, role: str | None = None) -> tuple[bool, dict[str, Any]]:
    from sqlalchemy import create_engine, make_url

    from workers.observability import check_broker, check_database

    url = make_url(settings.effective_database_url)
    engine = create_engine(url, pool_pre_ping=False)

    def database() -> dict[str, Any]:
        file = url.database if url.get_backend_name() == "sqlite" else None
        if file and file != ":memory:" and not Path(file).is_file():
            # connecting would create an empty database file
            raise FileNotFoundError(f"no SQLite database at {file} (yet)")
        return check_database(engine)

    try:
        results = {
            "database": _timed(database),
            "broker": _timed(lambda: check_broker(settings.effective_broker_url)),
        }
    finally:
        engine.dispose()
    probes: dict[str, Callable[[], dict[str, Any]]] = {
        "smtp": lambda: check_smtp(settings),
        "api": lambda: check_api(settings),
        "worker": lambda: check_worker(settings),
        "imap": lambda: check_imap(settings),
    }
    for name in (("smtp", "api") if role == "serve" else (role,) if role else ()):
        results[name] = _timed(probes[name])
    return all(part["ok"] for part in results.values()), results
