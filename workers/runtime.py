"""Process-wide state for the long-running roles: settings and one Ingestor per process.

Celery forks worker processes after import, so the Ingestor (and its database engine) is built
lazily in the process that uses it, never inherited across a fork.
"""

from __future__ import annotations

import logging
import os
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


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    noisy_loggers = ("mail.log", "alembic", "celery.app.trace", "celery.worker.strategy")
    for noisy in noisy_loggers:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("mailparser").setLevel(logging.ERROR)
