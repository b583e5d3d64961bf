"""Process-wide state for the long-running roles: settings and one Ingestor per process.

Celery forks worker processes after import.  A process that finds an Ingestor built before the
fork builds its own, unless it was told to take over the parent's (:func:`adopt_after_fork`):
then it keeps the parent's settings and reference data and only opens connections of its own.
"""

from __future__ import annotations

import logging
import os
import re
import threading

from ingest.config import Settings, load_settings
from ingest.service import Ingestor

_lock = threading.Lock()
_settings: Settings | None = None
_ingestor: Ingestor | None = None
_pid: int | None = None


def settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = load_settings()
    return _settings


def ingestor() -> Ingestor:
    global _ingestor, _pid
    with _lock:
        if _ingestor is None or _pid != os.getpid():
            _ingestor = Ingestor(settings())
            _pid = os.getpid()
        return _ingestor


def adopt_after_fork() -> None:
    """Keep the Ingestor built before this process was forked, with a connection pool of its
    own (``dispose(close=False)`` leaves the parent's connections, if any, to the parent).

    A Celery pool process built its Ingestor on its first task: the schema check and the
    reference data's sync took 0.6 s of CPU per process, paid by the first mail's latency.
    The worker's main process builds it once, before it forks."""
    global _pid
    with _lock:
        if _ingestor is not None and _pid != os.getpid():
            _ingestor.engine.dispose(close=False)
            _pid = os.getpid()


LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_INBOUND_IN_TEXT = re.compile(r"\binbound (?:mail )?\[?(\d+)")


class MailIds(logging.Filter):
    """Every line about a mail carries ``inbound_id`` (and ``ticket_id`` once known).

    The pipeline and the tasks pass them with ``extra=``; for other lines that name a mail the
    usual way ("... as inbound 12", "inbound 12 quarantined") the id is taken from the text, so a
    log search on ``inbound_id`` finds the SMTP, worker and quarantine lines of one mail.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "inbound_id", None) is None:
            found = _INBOUND_IN_TEXT.search(record.getMessage())
            if found:
                record.inbound_id = int(found.group(1))
        return True


def log_handler(fmt: str = "text", role: str | None = None) -> logging.Handler:
    """A stderr handler: ``text`` (the classic line) or ``json`` (one object per line)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(levelname)s %(name)s %(process)d %(message)s", timestamp="time",
            rename_fields={"levelname": "level", "name": "logger"},
            static_fields={"role": role} if role else None, json_ensure_ascii=False))
    elif fmt == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    handler.addFilter(MailIds())
    return handler


def configure_logging(level: str = "INFO", fmt: str | None = None, role: str | None = None
                      ) -> None:
    """Root logging for a role: ``fmt`` or ``$TICKETGATE_LOG_FORMAT`` (``text`` | ``json``)."""
    fmt = (fmt or os.environ.get("TICKETGATE_LOG_FORMAT") or "text").strip().lower()
    logging.basicConfig(level=level, handlers=[log_handler(fmt, role)])
    noisy_loggers = ("mail.log", "alembic", "celery.app.trace", "celery.worker.strategy")
    for noisy in noisy_loggers:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("mailparser").setLevel(logging.ERROR)
