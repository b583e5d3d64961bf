"""Shared set-up of the HTTP API tests (``test_api.py``, ``test_api_contract.py``).

Two ways to reach the API: FastAPI's TestClient over an Ingestor built by the ``make_ingestor``
fixture (fast, in-process), and :func:`live_server`, a real ``ticketgate api`` (uvicorn) in a
subprocess on a free port, for the end-to-end and schemathesis runs.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from argon2 import PasswordHasher
from fastapi.testclient import TestClient

from ingest.service import Ingestor
from tests.roles import stop_process
from workers.api import create_app

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO.parent / "shared" / "seeds"
READY_TIMEOUT_S = 60.0

ADMIN = ("admin", "secret")
HASHED = ("ops", "hashed-secret")
TOKEN = "robot-token-0123456789"
# Cheap parameters: verification reads them from the hash, so the tests stay fast.
OPS_HASH = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(HASHED[1])

CONFIG = f"""
[service]
base_url = "https://support.example.com"
data_dir = "var"
default_status = "Open"

[http]
max_body_bytes = 200000

[[api_user]]
name = "admin"
password = "secret"
[[api_user]]
name = "ops"
password_hash = "{OPS_HASH}"
[[api_user]]
name = "robot"
token = "{TOKEN}"
[[api_user]]
name = "sarah"
password = "sarah-pw"

[[associate]]
name = "sarah"
full_name = "Sarah Johnson"
email = "sarah@example.com"
[[associate]]
name = "tom"
full_name = "Tom Baker"
email = "tom@example.com"

[[category]]
name = "Technical Support"
[[category]]
name = "Billing"
[[category]]
name = "Retired Category"
active = false

[[priority]]
name = "Medium"
deadline_hours = 24
[[priority]]
name = "High"
deadline_hours = 4
[[priority]]
name = "Legacy"
active = false

[[status]]
name = "Open"
base_status = "active"
[[status]]
name = "Waiting"
base_status = "postponed"
[[status]]
name = "Closed"
base_status = "closed"
[[status]]
name = "Old Open"
base_status = "active"
active = false

[[contact]]
name = "TechCorp Solutions"
domains = ["techcorp.com"]
[[contact]]
name = "Other Inc"
domains = ["other.example"]
[[person]]
first_name = "Michael"
last_name = "Thompson"
email = "michael@techcorp.com"
contact = "TechCorp Solutions"
[[person]]
first_name = "Olga"
last_name = "Other"
email = "olga@other.example"
contact = "Other Inc"

[[mailbox]]
id = 1
name = "Support"
addresses = ["support@example.com"]
category = "Technical Support"
priority = "Medium"
owner = "sarah"
[[mailbox]]
id = 2
name = "Billing"
addresses = ["billing@example.com"]
category = "Billing"
priority = "High"
owner = "tom"
"""


def mail(subject: str = "Account access problem",
         sender: str = "Michael Thompson <michael@techcorp.com>",
         message_id: str | None = "a1@techcorp.com",
         body: str = "I cannot log in since this morning.\n",
         to: str = "support@example.com", **headers: str) -> str:
    lines = [f"From: {sender}", f"To: {to}", f"Subject: {subject}",
             "Date: Tue, 03 Nov 2026 10:00:00 +0100", "MIME-Version: 1.0",
             "Content-Type: text/plain; charset=utf-8"]
    if message_id:
        lines.append(f"Message-ID: <{message_id}>")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return "\r\n".join(lines) + "\r\n\r\n" + body


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def client_for(ingestor: Ingestor, *, auth: tuple[str, str] | None = ADMIN,
               client: tuple[str, int] = ("203.0.113.9", 50000),
               base_url: str = "http://testserver") -> TestClient:
    """A TestClient that raises server exceptions, so a 500 fails the test loudly."""
    test_client = TestClient(create_app(ingestor), client=client, base_url=base_url)
    if auth is not None:
        test_client.headers.update(basic(*auth))
    return test_client


def build_client(make_ingestor: Callable[..., Ingestor], tmp_path: Path,
                 toml: str = CONFIG) -> tuple[TestClient, Ingestor]:
    ingestor = make_ingestor(toml, tmp_path)
    return client_for(ingestor), ingestor


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def live_server(db_url: str, tmp_path: Path, toml: str = CONFIG) -> Iterator[str]:
    """``ticketgate api`` (uvicorn) in a subprocess on a free port; yields its base URL.

    Stopped with SIGTERM (uvicorn's graceful shutdown) and waited for, so nothing outlives the
    test.  The server log is attached to any start-up failure.
    """
    config = tmp_path / "ticketgate-live.toml"
    config.write_text(toml, encoding="utf-8")
    log = tmp_path / "api-server.log"
    env = {**os.environ, "TICKETGATE_DATABASE_URL": db_url}
    env.pop("TICKETGATE_CONFIG", None)
    for attempt in range(3):
        port = free_port()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "api", "--config", str(config),
                 "--host", "127.0.0.1", "--port", str(port)],
                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        if _wait_ready(base, proc):
            break
        _stop(proc)
        if attempt == 2:
            raise RuntimeError("ticketgate api did not start:\n" + log.read_text()[-4000:])
    try:
        yield base
    finally:
        _stop(proc)


def _wait_ready(base: str, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return True
        time.sleep(0.2)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, signal.SIGTERM, 30)
