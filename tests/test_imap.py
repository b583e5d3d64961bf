"""The IMAP poller against a real Dovecot (``tests/services.py``): UIDs, UIDVALIDITY, IDLE,
verified TLS, the spool-then-acknowledge order, crashes at the worst moment, and a big backlog.

Most tests run the poller in a thread of the test process with an ``enqueue`` that runs the
pipeline at once; ``test_cli_imap_and_worker_processes`` runs the real ``ticketgate imap`` and
``ticketgate worker`` processes.  Each test gets its own Dovecot user, so its own empty mailbox.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from ingest.config import Settings, load_settings
from ingest.errors import ConfigError
from ingest.models import ImapFolderState, InboundMail, Message, Ticket
from ingest.service import Ingestor
from tests.services import LEGACY_ADDRESS, NO_TLS_ADDRESS, DovecotServer
from workers.imap import Backoff, ImapPoller, plan_batches, serve_imap, status_lines, uid_set

REPO = Path(__file__).resolve().parents[1]
FAST = {"backoff": Backoff(0.05, 0.5), "auth_backoff": Backoff(0.2, 1.0), "idle_tick": 0.2}


# --- helpers ----------------------------------------------------------------------------------


def mail(tag: str, i: int, body: str = "", sender: str | None = None) -> bytes:
    sender = sender or f"customer{i % 5}@example.org"
    return (f"From: Customer <{sender}>\r\nTo: support@example.com\r\n"
            f"Subject: {tag} problem {i}\r\nMessage-ID: <{tag}.{i}@test.example>\r\n"
            f"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n\r\n"
            f"Hello, problem number {i}.\r\n{body}").encode()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def imap_table(dovecot: DovecotServer, user: str, password: str | None = None,
               **overrides: Any) -> dict[str, Any]:
    table: dict[str, Any] = {"host": "127.0.0.1", "port": dovecot.imaps_port, "tls": "ssl",
                             "ca_file": str(dovecot.ca_file), "user": user,
                             "password": password, "idle": True}
    table.update(overrides)
    return {k: v for k, v in table.items() if v is not None}


def write_config(tmp_path: Path, boxes: list[dict[str, Any]], *, max_bytes: int | None = None,
                 extra: str = "") -> Path:
    lines = ['[service]', 'base_url = "https://support.example.com"', 'data_dir = "var"']
    if max_bytes:
        lines.append(f"max_message_bytes = {max_bytes}")
    for box in boxes:
        lines += ["", "[[mailbox]]"] + [f"{k} = {toml_value(v)}" for k, v in box.items()]
    path = tmp_path / "ticketgate.toml"
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def client_for(dovecot: DovecotServer, user: str, password: str) -> IMAPClient:
    context = ssl.create_default_context(cafile=str(dovecot.ca_file))
    client = IMAPClient("127.0.0.1", dovecot.imaps_port, ssl=True, ssl_context=context,
                        timeout=30)
    client.login(user, password)
    return client


def append_all(dovecot: DovecotServer, user: str, password: str, messages: list[bytes],
               folder: str = "INBOX", chunk: int = 500) -> None:
    """APPEND over one connection (MULTIAPPEND in chunks: a 5,000 backlog in seconds)."""
    with client_for(dovecot, user, password) as client:
        if not client.folder_exists(folder):
            client.create_folder(folder)
        for start in range(0, len(messages), chunk):
            client.multiappend(folder, messages[start:start + chunk])


def folder_flags(dovecot: DovecotServer, user: str, password: str, folder: str = "INBOX"
                 ) -> dict[bytes, tuple[bytes, ...]] | None:
    """Message-ID header -> flags of every message in ``folder`` (None: no such folder)."""
    with client_for(dovecot, user, password) as client:
        if not client.folder_exists(folder):
            return None
        client.select_folder(folder, readonly=True)
        uids = client.search(["ALL"])
        if not uids:
            return {}
        data = client.fetch(uids, ["FLAGS", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
        return {  # \Recent only says which session saw it first
            d[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].split(b":", 1)[1].strip():
                tuple(f for f in d[b"FLAGS"] if f != b"\\Recent")
            for d in data.values()
        }


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.05)


def count_inbound(ingestor: Ingestor, state: str | None = None) -> int:
    with ingestor.session() as session:
        query = select(func.count()).select_from(InboundMail)
        if state:
            query = query.where(InboundMail.state == state)
        return int(session.scalar(query) or 0)


def count_tickets(ingestor: Ingestor) -> int:
    with ingestor.session() as session:
        return int(session.scalar(select(func.count()).select_from(Ticket)) or 0)


def folder_state(ingestor: Ingestor, mailbox_id: int = 1) -> ImapFolderState | None:
    with ingestor.session() as session:
        return session.scalar(select(ImapFolderState)
                              .where(ImapFolderState.mailbox_id == mailbox_id))


def message_ids_by_state(ingestor: Ingestor) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    with ingestor.session() as session:
        for mid, state in session.execute(
                select(InboundMail.header_message_id, InboundMail.state)):
            found.setdefault(state, []).append(mid)
    return found


def processing(ingestor: Ingestor) -> Callable[[list[int]], bool]:
    """An ``enqueue`` that runs the pipeline at once, in the poller's thread."""

    def enqueue(ids: list[int]) -> bool:
        for inbound_id in ids:
            ingestor.process(inbound_id)
        return True

    return enqueue


@contextlib.contextmanager
def running(poller: ImapPoller) -> Iterator[ImapPoller]:
    thread = poller.start()
    try:
        yield poller
    finally:
        poller.stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "poller did not stop"


@pytest.fixture(params=["sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ticketgate.db'}"
    return str(request.getfixturevalue("fresh_postgres_url"))


@pytest.fixture
def setup(tmp_path: Path, database_url: str, dovecot: DovecotServer,
          imap_user: tuple[str, str]) -> Iterator[Callable[..., tuple[Ingestor, ImapPoller]]]:
    """Build (ingestor, poller) for mailbox 1 on the test's Dovecot user."""
    made: list[Ingestor] = []

    def build(*, enqueue: Callable[[list[int]], Any] | None = None,
              max_bytes: int | None = None, poller_class: type[ImapPoller] = ImapPoller,
              idle_renew: float = 300.0, **imap: Any) -> tuple[Ingestor, ImapPoller]:
        user, password = imap_user
        imap.setdefault("password", password)
        box = {"id": 1, "name": "Support", "addresses": ["support@example.com"],
               "imap": imap_table(dovecot, user, **imap)}
        settings = load_settings(write_config(tmp_path, [box], max_bytes=max_bytes),
                                 database_url=database_url)
        ingestor = Ingestor(settings)
        made.append(ingestor)
        poller = poller_class(ingestor, settings.mailbox[0], enqueue or processing(ingestor),
                              threading.Event(), idle_renew=idle_renew, **FAST)
        return ingestor, poller

    yield build
    for ingestor in made:
        ingestor.close()


both_databases = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"],
                                         indirect=True)


# --- configuration (no server) -----------------------------------------------------------------


def _settings(tmp_path: Path, imap: dict[str, Any]) -> Settings:
    box = {"id": 1, "name": "Support", "imap": imap}
    return load_settings(write_config(tmp_path, [box]))


@pytest.mark.parametrize(("imap", "error"), [
    ({"host": "imap.example.com", "tls": "none", "user": "u", "password": "p"},
     "loopback"),
    ({"host": "imap.example.com", "user": "u"}, "exactly one of password"),
    ({"host": "imap.example.com", "user": "u", "password": "p", "password_env": "X"},
     "exactly one of password"),
    ({"host": "imap.example.com", "user": "u", "password": "p", "after": "archive"},
     "move:FOLDER"),
    ({"host": "imap.example.com", "user": "u", "password": "p", "after": "move:INBOX"},
     "into itself"),
    ({"host": "imap.example.com", "user": "u", "password": "p", "oversized": "delete"},
     "never deleted"),
    ({"host": "imap.example.com", "user": "u", "oauth2": {}}, "token_command or token_file"),
    ({"host": "imap.example.com", "user": "u", "password": "p", "pasword": "typo"},
     "pasword"),
])
def test_imap_settings_are_strict(tmp_path: Path, imap: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        _settings(tmp_path, imap)


def test_imap_settings_defaults_and_inline_table(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("pw\n")
    settings = _settings(tmp_path, {"host": "imap.example.com", "user": "u",
                                    "password_file": "secret", "after": "move:Processed"})
    imap = settings.mailbox[0].imap
    assert imap is not None
    assert (imap.port, imap.tls, imap.folder, imap.idle) == (993, "ssl", "INBOX", True)
    assert imap.max_message_bytes == settings.service.max_message_bytes
    assert imap.move_to == "Processed"
    assert imap.password_file == tmp_path / "secret"  # relative to the configuration file
    local = _settings(tmp_path, {"host": "127.0.0.1", "tls": "none", "user": "u",
                                 "oauth2": {"token_command": "print-token --user u"}})
    assert local.mailbox[0].imap is not None and local.mailbox[0].imap.port == 143
    assert "p4ss" not in repr(_settings(tmp_path, {"host": "h", "user": "u",
                                                   "password": "p4ss"}).mailbox[0].imap)


def test_uid_sets_and_batches() -> None:
    assert uid_set([9, 1, 2, 3, 7, 10]) == "1:3,7,9:10"
    assert uid_set([5]) == "5"
    sizes = {1: 10, 2: 10, 3: 100, 4: 10, 5: 10}
    assert list(plan_batches([1, 2, 3, 4, 5], sizes, 2, 50)) == [[1, 2], [3], [4, 5]]
    backoff = Backoff(1.0, 8.0)
    delays = [backoff.next_delay() for _ in range(6)]
    assert all(0.5 <= d <= 8.0 for d in delays) and delays[-1] >= 4.0


def test_serve_starts_imap_role_only_when_configured(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import cli, supervisor

    started: list[list[str]] = []
    monkeypatch.setattr(supervisor, "supervise",
                        lambda children: started.append([c.name for c in children]) or 0)
    monkeypatch.delenv("TICKETGATE_CONFIG", raising=False)
    plain = write_config(tmp_path, [{"id": 1, "name": "Support", "accept_any": True}])
    assert CliRunner().invoke(cli.app, ["serve", "--config", str(plain)]).exit_code == 0
    (tmp_path / "imap").mkdir()
    with_imap = write_config(tmp_path / "imap", [{
        "id": 1, "name": "Support",
        "imap": {"host": "imap.example.com", "user": "u", "password": "p"}}])
    assert CliRunner().invoke(cli.app, ["serve", "--config", str(with_imap)]).exit_code == 0
    assert len(started) == 2
    assert "imap" not in started[0] and started[1] == [*started[0], "imap"]


# --- the poller against Dovecot ------------------------------------------------------------------


@both_databases
def test_new_mail_is_spooled_processed_and_marked_seen(
        setup: Callable[..., tuple[Ingestor, ImapPoller]], dovecot: DovecotServer,
        imap_user: tuple[str, str]) -> None:
    user, password = imap_user
    append_all(dovecot, user, password, [mail("new", i) for i in range(3)])
    ingestor, poller = setup(after="seen")
    with running(poller):
        wait_until(lambda: count_inbound(ingestor, "created") == 3, what="3 tickets")
        state = wait_until(lambda: (s := folder_state(ingestor)) and s.uidvalidity and s)
    flags = folder_flags(dovecot, user, password)
    assert flags is not None and len(flags) == 3
    assert all(b"\\Seen" in f for f in flags.values())
    assert count_tickets(ingestor) == 3
    assert (state.last_uid, state.ingested, state.account) == (
        3, 3, f"{user}@127.0.0.1:{dovecot.imaps_port}")
    with ingestor.session() as session:
        sources = sorted(session.scalars(select(InboundMail.source)))
    assert sources[0] == (f"imap://{user}@127.0.0.1:{dovecot.imaps_port}/INBOX;"
                          f"UIDVALIDITY={state.uidvalidity}/;UID=1")


def test_internaldate_is_kept_as_the_arrival_time(
        setup: Callable[..., tuple[Ingestor, ImapPoller]], dovecot: DovecotServer,
        imap_user: tuple[str, str]) -> None:
    """A mail the server took in last spring keeps that time (the circuit breaker counts it
    there, not at the moment the poller fetched it)."""
    user, password = imap_user
    spring = dt.datetime(2026, 4, 2, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with client_for(dovecot, user, password) as client:
        client.append("INBOX", mail("old", 1), msg_time=spring)
    ingestor, poller = setup(after="seen")
    with running(poller):
        wait_until(lambda: count_inbound(ingestor, "created") == 1, what="1 ticket")
    with ingestor.session() as session:
        inbound = session.scalars(select(InboundMail)).one()
        message = session.scalars(select(Message)).one()
    assert inbound.arrived_at == spring and message.arrived_at == spring
    assert inbound.received_at > spring + dt.timedelta(days=30)


def test_fetching_never_sets_seen_before_the_spool_commit(
        setup: Callable[..., tuple[Ingestor, ImapPoller]], dovecot: DovecotServer,
        imap_user: tuple[str, str]) -> None:
    """BODY.PEEK[]: at the moment of the spool commit the server still shows the mail unread."""
    user, password = imap_user
    append_all(dovecot, user, password, [mail("peek", 0)])
    seen_at_enqueue: list[tuple[bytes, ...]] = []

    def enqueue(ids: list[int]) -> bool:
        assert count_inbound(ingestor, "received") == len(ids)  # committed already
        flags = folder_flags(dovecot, user, password)
        assert flags is not None
        seen_at_enqueue.extend(flags.values())
        for inbound_id in ids:
            ingestor.process(inbound_id)
        return True

    ingestor, poller = setup(enqueue=enqueue)
    with running(poller):
        wait_until(lambda: count_inbound(ingestor, "created") == 1)
    assert seen_at_enqueue == [()]


def test_idle_push_is_ingested_within_seconds(
        setup: Callable[..., tuple[Ingestor, ImapPoller]], dovecot: DovecotServer,
        imap_user: tuple[str, str]) -> None:
    user, password = imap_user
    # poll_interval is an hour: only IDLE can bring the new mail in within seconds.
    ingestor, poller = setup(poll_interval=3600)
    with running(poller):
        wait_until(lambda: (s := folder_state(ingestor)) and s.last_success_at, what="1st pass")
        wait_until(lambda: any("IDLE" in t for t in _titles(dovecot, user)), what="IDLE")
        started = time.monotonic()
        append_all(dovecot, user, password, [mail("idle", 0)])
        wait_until(lambda: count_inbound(ingestor, "created") == 1, timeout=10)
        latency = time.monotonic() - started
    assert latency < 5.0, latency


def _titles(dovecot: DovecotServer, user: str) -> list[str]:
    titles = []
    for pid in dovecot.imap_processes(user):
        with contextlib.suppress(OSError):
            titles.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
    return titles


@pytest.mark.parametrize(("after", "legacy"), [
    ("seen", False), ("move:Processed", False), ("delete", False),
    # a server without MOVE and UIDPLUS: COPY + \Deleted + EXPUNGE
    ("move:Processed", True), ("delete", True),
])
def test_after_modes_act_on_the_server(
        setup: Callable[..., tuple[Ingestor, ImapPoller]], dovecot: DovecotServer,
        imap_user: tuple[str, str], after: str, legacy: bool) -> None:
    user, password = imap_user
    append_all(dovecot, user, password, [mail(f"after-{after[:4]}", i) for i in range(4)])
    where = {"host": LEGACY_ADDRESS, "port": dovecot.legacy_port} if legacy else {}
    capabilities: list[tuple[bool, bool]] = []

    class Recording(ImapPoller):
        def connect(self) -> None:
            super().connect()
            assert self.client is not None
            capabilities.append((self.client.has_capability("MOVE"),
                                 self.client.has_capability("UIDPLUS")))

    ingestor, poller = setup(after=after, poller_class=Recording, **where)
    with running(poller):
        wait_until(lambda: count_inbound(ingestor, "created") == 4)
        wait_until(lambda: (s := folder_state(ingestor)) and s.last_uid == 4)
    inbox = folder_flags(dovecot, user, password)
    processed = folder_flags(dovecot, user, password, "Processed")
    assert inbox is not None
    if after == "seen":
        assert len(inbox) == 4 and all(b"\\Seen" in f for f in inbox.values())
        assert processed is None
    elif after == "move:Processed":
        assert inbox == {}
        assert processed is not None and len(processed) == 4
        assert all(b"\\Seen" not in f for f in processed.values())  # PEEK: moved unread
    else:
        assert inbox == {} and processed is None
    assert capabilities[0] == (not legacy, not legacy)


@both_databases
def test_uidvalidity_change_resyncs_without_duplicate_tickets(
        setup: Callable[..., tuple[Ingestor, ImapPoller]], dovecot: DovecotServer,
        imap_user: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    """The folder is deleted and re-created under the running poller, the old mails come back
    unread with new UIDs and a new mail (already read by someone) takes UID 1: everything is
    looked at again, the new mail makes a ticket, the old ones are recorded as duplicates, no
    ticket is made twice.

    Dovecot says nothing to a session idling in a deleted folder; the poller finds out when it
    renews IDLE (every ``idle_renew`` seconds, 1 s here) and selects the folder again."""
    caplog.set_level(logging.INFO, "ticketgate.imap")
    user, password = imap_user
    old = [mail("uv", i) for i in range(3)]
    append_all(dovecot, user, password, old, folder="Tickets")
    ingestor, poller = setup(folder="Tickets", after="seen", idle_renew=1.0)
    with running(poller):
        wait_until(lambda: count_inbound(ingestor, "created") == 3)
        first = wait_until(lambda: (s := folder_state(ingestor)) and s.uidvalidity and s)
        with client_for(dovecot, user, password) as client:
            client.delete_folder("Tickets")
            client.create_folder("Tickets")
            # UID 1 in the new folder, and a person read it before the poller came back
            client.append("Tickets", mail("uv", 99), flags=[b"\\Seen"])
            client.multiappend("Tickets", old)  # UIDs 2-4, unread again
        wait_until(lambda: count_inbound(ingestor, "duplicate") == 3, what="3 duplicates")
        wait_until(lambda: count_inbound(ingestor, "created") == 4, what="the new mail")
        second = wait_until(lambda: (s := folder_state(ingestor)) and s.last_uid == 4 and s)
    assert second.uidvalidity != first.uidvalidity
    assert count_tickets(ingestor) == 4
    by_state = message_ids_by_state(ingestor)
    assert sorted(by_state["duplicate"]) == [f"uv.{i}@test.example" for i in range(3)]
    assert "UIDVALIDITY is now" in caplog.text


def test_connection_dropped_mid_fetch_and_while_idling_loses_nothing(
        setup: Callable[..., tuple[Ingestor, ImapPoller]], dovecot: DovecotServer,
        imap_user: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "ticketgate.imap")
    user, password = imap_user
    total = 120
    append_all(dovecot, user, password, [mail("drop", i, "x" * 2000) for i in range(total)])
    fetches: list[int] = []

    class DroppingPoller(ImapPoller):
        """Kills the server's imap process just as the 3rd body fetch is sent."""

        def connect(self) -> None:
            super().connect()
            assert self.client is not None
            real = self.client.fetch

            def fetch(messages: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
                if "BODY.PEEK[]" in data:
                    fetches.append(1)
                    if len(fetches) == 3:
                        assert dovecot.kill_sessions(user) >= 1
                return real(messages, data, *args, **kwargs)

            self.client.fetch = fetch  # type: ignore[method-assign]

    ingestor, poller = setup(poller_class=DroppingPoller, batch_size=20)
    with running(poller):
        wait_until(lambda: count_inbound(ingestor, "created") == total, timeout=60)
        wait_until(lambda: any("IDLE" in t for t in _titles(dovecot, user)), what="IDLE")
        assert dovecot.kill_sessions(user) >= 1  # and once more while it idles
        append_all(dovecot, user, password, [mail("drop", total)])
        wait_until(lambda: count_inbound(ingestor, "created") == total + 1, timeout=20)
    assert count_inbound(ingestor) == total + 1  # no duplicate records either
    assert count_tickets(ingestor) == total + 1
    flags = folder_flags(dovecot, user, password)
    assert flags is not None and all(b"\\Seen" in f for f in flags.values())
    reconnects = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(reconnects) >= 2, [r.getMessage() for r in reconnects]


CRASHING_POLLER = textwrap.dedent("""
    import os, signal, sys
    from ingest.config import load_settings
    from ingest.service import Ingestor
    from workers.imap import ImapPoller

    settings = load_settings(sys.argv[1], database_url=sys.argv[2])
    ingestor = Ingestor(settings)

    def enqueue(ids):  # spooled and committed, not yet flagged on the server: die right here
        os.kill(os.getpid(), signal.SIGKILL)

    ImapPoller(ingestor, settings.mailbox[0], enqueue).run()
""")


@both_databases
def test_killed_between_spool_and_flag_no_loss_no_duplicate(
        setup: Callable[..., tuple[Ingestor, ImapPoller]], dovecot: DovecotServer,
        imap_user: tuple[str, str], tmp_path: Path, database_url: str) -> None:
    user, password = imap_user
    total = 25
    append_all(dovecot, user, password, [mail("crash", i) for i in range(total)])
    ingestor, poller = setup(after="move:Processed", batch_size=10)
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_POLLER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ticketgate.toml"),
                           database_url], cwd=REPO, capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert count_inbound(ingestor, "received") == 10  # the first batch: spooled, never flagged
    inbox = folder_flags(dovecot, user, password)
    assert inbox is not None and len(inbox) == total  # nothing moved yet
    with running(poller):
        wait_until(lambda: count_inbound(ingestor, "created") == total, timeout=30)
        wait_until(lambda: (s := folder_state(ingestor)) and s.last_uid == total)
    assert count_inbound(ingestor) == total  # the re-fetched batch was not spooled again
    assert count_tickets(ingestor) == total
    assert folder_flags(dovecot, user, password) == {}
    processed = folder_flags(dovecot, user, password, "Processed")
    assert processed is not None and len(processed) == total


def test_backlog_of_5000_ingested_exactly_once_with_progress(
        setup: Callable[..., tuple[Ingestor, ImapPoller]], dovecot: DovecotServer,
        imap_user: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    """5,000 mails waiting: each is spooled once and handed to the workers once, in batches
    (bounded memory), with progress in the log, and every one is \\Seen afterwards.

    The pipeline's own speed is not this test's business (bench/imap_bench.py measures the
    whole way into tickets): the ids are collected, and a sample is processed at the end."""
    caplog.set_level(logging.INFO, "ticketgate.imap")
    user, password = imap_user
    total = 5000
    started = time.monotonic()
    append_all(dovecot, user, password, [mail("bulk", i) for i in range(total)])
    appended = time.monotonic() - started
    enqueued: list[int] = []
    batches: list[int] = []

    def enqueue(ids: list[int]) -> bool:
        enqueued.extend(ids)
        batches.append(len(ids))
        return True

    ingestor, poller = setup(enqueue=enqueue)
    started = time.monotonic()
    with running(poller):
        wait_until(lambda: (s := folder_state(ingestor)) and s.last_uid == total, timeout=120)
    took = time.monotonic() - started
    assert len(enqueued) == len(set(enqueued)) == total
    assert max(batches) <= 100  # batch_size: never the whole backlog at once
    assert count_inbound(ingestor) == count_inbound(ingestor, "received") == total
    with ingestor.session() as session:
        ids = set(session.scalars(select(InboundMail.header_message_id)))
    assert ids == {f"bulk.{i}@test.example" for i in range(total)}
    state = folder_state(ingestor)
    assert state is not None and state.ingested == total
    flags = folder_flags(dovecot, user, password)
    assert flags is not None and len(flags) == total
    assert all(b"\\Seen" in f for f in flags.values())
    progress = [r.getMessage() for r in caplog.records if "fetched (" in r.getMessage()]
    assert any("/5000 fetched" in p for p in progress), caplog.text[-2000:]
    for inbound_id in enqueued[:: total // 10]:
        assert ingestor.process(inbound_id).Action == "created"
    print(f"\n5000 backlog: APPEND {appended:.1f}s, spooled and flagged in {took:.1f}s "
          f"({total / took:.0f}/s); progress lines: {len(progress)}")


def test_oversized_mail_is_not_downloaded_but_recorded_rejected(
        setup: Callable[..., tuple[Ingestor, ImapPoller]], dovecot: DovecotServer,
        imap_user: tuple[str, str]) -> None:
    user, password = imap_user
    big = mail("size", 1, "y" * 300_000)
    append_all(dovecot, user, password, [mail("size", 0), big, mail("size", 2)])
    ingestor, poller = setup(max_message_bytes=100_000, after="move:Processed")
    with running(poller):
        wait_until(lambda: count_inbound(ingestor, "created") == 2)
        wait_until(lambda: (s := folder_state(ingestor)) and s.last_uid == 3)
    with ingestor.session() as session:
        rejected = session.scalars(select(InboundMail)
                                   .where(InboundMail.state == "rejected")).all()
        assert len(rejected) == 1
        row = rejected[0]
        assert row.size == len(big)
        assert len(row.raw) < 1000 and b"Message-ID: <size.1@test.example>" in row.raw
        assert row.header_message_id == "size.1@test.example"
        assert "RFC822.SIZE" in (row.reason or "") and "not downloaded" in (row.reason or "")
    inbox = folder_flags(dovecot, user, password)
    assert inbox == {b"<size.1@test.example>": ()}  # left where it was, unread, not deleted
    # Dovecot counts the body bytes it sent to each session: the big body never left it.
    sent = sum(int(n) for n in re.findall(rf"imap\({user}\).*body_bytes=(\d+)",
                                          dovecot.log_text()))
    assert sent < 100_000, sent


def test_wrong_password_is_reported_and_retried_and_others_go_on(
        tmp_path: Path, dovecot: DovecotServer, caplog: pytest.LogCaptureFixture) -> None:
    """Mailbox 1 reads a wrong password from its password_file; mailbox 2 is fine and goes on.
    The error is logged and stored, the login retried; once the file holds the right password
    (a rotated secret), the next retry gets the mail."""
    caplog.set_level(logging.INFO, "ticketgate.imap")
    for user, password in (("wrongpw", "the-real-one"), ("fine", "fine-pw")):
        dovecot.add_user(user, password)
        dovecot.wait_for_login(user, password)
        append_all(dovecot, user, password, [mail(user, 0)])
    secret = tmp_path / "imap-password"
    secret.write_text("typo\n")
    boxes = [
        {"id": 1, "name": "Broken", "imap": imap_table(dovecot, "wrongpw", None,
                                                       password_file=str(secret))},
        {"id": 2, "name": "Fine", "imap": imap_table(dovecot, "fine", "fine-pw")},
    ]
    settings = load_settings(write_config(tmp_path, boxes),
                             database_url=f"sqlite:///{tmp_path / 'tg.db'}")
    ingestor = Ingestor(settings)
    stop = threading.Event()
    thread = threading.Thread(target=serve_imap, args=(ingestor, processing(ingestor)),
                              kwargs={"stop": stop, **FAST})
    thread.start()
    try:
        wait_until(lambda: count_inbound(ingestor, "created") == 1, what="the fine mailbox")
        broken = wait_until(lambda: (s := folder_state(ingestor, 1)) and s.last_error and s)
        assert "refused the password for user 'wrongpw'" in broken.last_error
        assert "AUTHENTICATIONFAILED" in broken.last_error
        assert any("FAILING" in line and "Broken" in line for line in status_lines(ingestor))
        wait_until(lambda: caplog.text.count("login failed") >= 2, what="a second attempt")
        assert "typo" not in caplog.text  # the password is never logged
        secret.write_text("the-real-one\n")
        wait_until(lambda: count_inbound(ingestor, "created") == 2, what="retried later")
        wait_until(lambda: not any("FAILING" in line for line in status_lines(ingestor)))
    finally:
        stop.set()
        thread.join(timeout=30)
        ingestor.close()
    assert [r for r in caplog.records
            if "login failed" in r.getMessage() and r.levelno == logging.ERROR]


@pytest.mark.parametrize("tls", ["starttls", "ssl"])
def test_untrusted_certificate_is_refused_never_downgraded(
        setup: Callable[..., tuple[Ingestor, ImapPoller]], dovecot: DovecotServer,
        imap_user: tuple[str, str], caplog: pytest.LogCaptureFixture, tls: str) -> None:
    caplog.set_level(logging.INFO, "ticketgate.imap")
    user, password = imap_user
    append_all(dovecot, user, password, [mail("tls", 0)])
    port = dovecot.imap_port if tls == "starttls" else dovecot.imaps_port
    ingestor, poller = setup(tls=tls, port=port, ca_file=str(dovecot.other_ca_file))
    logins = dovecot.log_text().count(f"Login: user=<{user}>")  # the test's own APPEND
    with running(poller):
        state = wait_until(lambda: (s := folder_state(ingestor)) and s.last_error and s)
        wait_until(lambda: caplog.text.count("TLS refused") >= 2, what="a retry, refused again")
    assert "CERTIFICATE_VERIFY_FAILED" in state.last_error
    assert count_inbound(ingestor) == 0
    assert dovecot.log_text().count(f"user=<{user}>") == logins  # the poller never logged in
    assert folder_flags(dovecot, user, password) == {b"<tls.0@test.example>": ()}


def test_server_without_starttls_is_refused_before_any_login(
        setup: Callable[..., tuple[Ingestor, ImapPoller]], dovecot: DovecotServer,
        imap_user: tuple[str, str]) -> None:
    """tls = "starttls" and the server's capabilities lack STARTTLS (as after a man in the
    middle stripped it): the poller stops there and never sends the password in clear."""
    ingestor, poller = setup(tls="starttls", host=NO_TLS_ADDRESS, port=dovecot.no_tls_port)
    with running(poller):
        state = wait_until(lambda: (s := folder_state(ingestor)) and s.last_error and s)
    assert "does not offer STARTTLS" in state.last_error
    sessions = [line for line in dovecot.log_text().splitlines()
                if f"lip={NO_TLS_ADDRESS}" in line]
    # Dovecot words a session that ended before any AUTHENTICATE/LOGIN two ways, by whether its
    # auth process was ready when the client left (seen under load).
    never_authenticated = ("no auth attempts", "disconnected before auth was ready")
    assert sessions and all(any(phrase in line for phrase in never_authenticated)
                            for line in sessions), sessions
    assert not any("Login:" in line or "auth failed" in line for line in sessions)


def test_plaintext_only_when_asked_for_on_loopback(
        setup: Callable[..., tuple[Ingestor, ImapPoller]], dovecot: DovecotServer,
        imap_user: tuple[str, str]) -> None:
    user, password = imap_user
    append_all(dovecot, user, password, [mail("plain", 0)])
    ingestor, poller = setup(tls="none", port=dovecot.imap_port)
    with running(poller):
        wait_until(lambda: count_inbound(ingestor, "created") == 1)
    logins = [line for line in dovecot.log_text().splitlines()
              if f"Login: user=<{user}>" in line and "lip=127.0.0.1, mpid=" in line]
    assert any(line.rstrip().split(", ")[-2] == "secured" for line in logins), logins


def test_starttls_and_xoauth2_with_a_trusted_certificate(
        setup: Callable[..., tuple[Ingestor, ImapPoller]], dovecot: DovecotServer,
        imap_user: tuple[str, str], tmp_path: Path) -> None:
    """Dovecot's XOAUTH2 here checks the bearer token against the passwd-file password, so the
    "token" is the user's password; the poller reads it from token_file at every connection."""
    user, password = imap_user
    append_all(dovecot, user, password, [mail("oauth", 0)])
    token = tmp_path / "token"
    token.write_text(password + "\n")
    ingestor, poller = setup(tls="starttls", port=dovecot.imap_port, password=None,
                             oauth2={"token_file": str(token)})
    with running(poller):
        wait_until(lambda: count_inbound(ingestor, "created") == 1)
    assert re.search(rf"Login: user=<{user}>, method=XOAUTH2.*TLS", dovecot.log_text())


def test_roles_starting_together_on_a_fresh_postgresql(fresh_postgres_url: str,
                                                       tmp_path: Path) -> None:
    """``ticketgate imap`` and ``worker`` (separate containers) starting at the same moment on
    a just-migrated database both write the reference data; neither may die of the race."""
    toml = "".join(f'[[associate]]\nname = "a{i}"\n[[person]]\nemail = "p{i}@x.example"\n'
                   for i in range(200))
    path = write_config(tmp_path, [{"id": 1, "name": "Support", "accept_any": True}],
                        extra=toml + '[[category]]\nname = "General"\n')
    settings = load_settings(path, database_url=fresh_postgres_url)
    Ingestor(settings).close()  # `ticketgate db upgrade`, then wipe the reference rows
    with Ingestor(settings, upgrade_schema=False).session() as session:
        session.execute(text("DELETE FROM persons"))
        session.execute(text("DELETE FROM associates"))
        session.commit()
    barrier = threading.Barrier(4)
    errors: list[str] = []

    def start() -> None:
        barrier.wait()
        try:
            Ingestor(settings, upgrade_schema=False).close()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300])

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# --- the real processes ---------------------------------------------------------------------------


def test_cli_imap_and_worker_processes(tmp_path: Path, dovecot: DovecotServer,
                                       imap_user: tuple[str, str]) -> None:
    user, password = imap_user
    append_all(dovecot, user, password, [mail("cli", i) for i in range(3)])
    box = {"id": 1, "name": "Support", "addresses": ["support@example.com"],
           "imap": imap_table(dovecot, user, password, after="move:Done")}
    config = write_config(tmp_path, [box])
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKETGATE_")}
    env.update(PYTHONPATH=str(REPO), TICKETGATE_CONFIG=str(config))
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in ("imap", "worker")}
    procs = {
        "imap": subprocess.Popen([sys.executable, "-m", "workers.cli", "imap"], cwd=tmp_path,
                                 env=env, stdout=logs["imap"], stderr=subprocess.STDOUT),
        "worker": subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "--pool",
                                    "solo"], cwd=tmp_path, env=env, stdout=logs["worker"],
                                   stderr=subprocess.STDOUT),
    }
    ingestor = Ingestor(load_settings(config))
    try:
        wait_until(lambda: count_inbound(ingestor, "created") == 3, timeout=60,
                   what="3 tickets through imap -> broker -> worker")
        wait_until(lambda: any("IDLE" in t for t in _titles(dovecot, user)), what="IDLE")
        append_all(dovecot, user, password, [mail("cli", 3)])
        wait_until(lambda: count_inbound(ingestor, "created") == 4, timeout=30)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {name: proc.wait(timeout=30) for name, proc in procs.items()}
        for handle in logs.values():
            handle.close()
        ingestor.close()
    output = (tmp_path / "imap.log").read_text()
    assert codes["imap"] == 0, output[-3000:]
    assert "ticketgate imap polling 1 mailbox(es)" in output
    assert count_tickets(ingestor) == 4
    assert folder_flags(dovecot, user, password) == {}
    done = folder_flags(dovecot, user, password, "Done")
    assert done is not None and len(done) == 4
