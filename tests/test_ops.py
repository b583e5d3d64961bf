"""Operations: check-config with line numbers, JSON logs with mail ids, metrics, check-health."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ingest.config import load_settings
from ingest.config_lines import cross_reference_locations, dotted, key_lines, line_for
from ingest.errors import ConfigError
from ingest.service import Ingestor
from tests.roles import stop_celery_worker
from workers import cli, metrics, runtime

REPO = Path(__file__).resolve().parents[1]

BAD = textwrap.dedent('''\
    # [[mailbox]] in a comment is not a table
    [service]
    base_url = "https://support.example.com"
    unknown_sender = "maybe"

    [[category]]
    name = "Technical Support"

    [[mailbox]]
    id = 1
    name = "Support"
    addresses = ["support@example.com"]

    [[mailbox]]
    id = 2
    name = "Sales"
    addresses = [
      "sales@example.com",
      42,
    ]
    notes = """
    [[mailbox]]
    id = 3
    """
    imap = { host = "imap.example.com", user = "u", password = "p", after = "archive" }

    [mailbox.authentication]
    enforce = "perhaps"

    [[rule]]
    name = "billing"
    match = { subject = "(?i)invoice", "header.X-Foo" = "(" }
    ''')

BAD_REFERENCES = textwrap.dedent('''\
    [service]
    default_status = "Nope"

    [[category]]
    name = "Technical Support"

    [[mailbox]]
    id = 1
    name = "Support (EU)"
    category = "Technical Support"
    owner = "bob"

    [[mailbox]]
    id = 1
    name = "Copy"

    [[rule]]
    name = "billing"
    set = { category = "Billing" }
    ''')


def _write(tmp_path: Path, text: str, name: str = "ticketgate.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _no_ticketgate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TICKETGATE_") and not name.startswith(("TICKETGATE_TEST_",
                                                                   "TICKETGATE_REQUIRE_")):
            monkeypatch.delenv(name)


# --- the line index ------------------------------------------------------------------------------


def test_key_lines_follow_tables_arrays_inline_tables_and_strings() -> None:
    index = key_lines(BAD)
    assert index["service", "unknown_sender"] == 4
    assert index["mailbox", 0] == 9
    assert index["mailbox", 1, "addresses", 1] == 19
    assert index["mailbox", 1, "notes"] == 21  # the multi-line string holds no [[mailbox]]
    assert ("mailbox", 2) not in index
    assert index["mailbox", 1, "imap", "after"] == 25
    assert index["mailbox", 1, "authentication", "enforce"] == 28  # [a.b] after [[a]]
    assert index["rule", 0, "match", "header.X-Foo"] == 32
    assert line_for(index, ("mailbox", 1, "imap", "port")) == 25  # longest known prefix
    assert line_for(index, ("nowhere",)) is None


def test_key_lines_dotted_and_quoted_keys() -> None:
    text = 'a.b = 1\n"quoted key".c = \'x # not a comment\'\n[t]  # comment\nd.e.f = [\n  1,\n]\n'
    index = key_lines(text)
    assert index["a", "b"] == 1 and index["quoted key", "c"] == 2
    assert index["t", "d", "e", "f"] == 4 and index["t", "d", "e", "f", 0] == 5


def test_dotted_and_cross_references() -> None:
    assert dotted(("mailbox", 0, "imap", "after")) == "mailbox[0].imap.after"
    assert dotted(("rule", 1, "match", "header", "X-Foo")) == "rule[1].match.header.X-Foo"
    assert dotted(("a", "b c")) == 'a."b c"'
    assert cross_reference_locations(
        "mailbox[0] (Support (EU)): unknown owner 'bob'; rule[2] (x).set: unknown status 'Y'; "
        "service.default_status: unknown status 'Nope'; mailbox[1]: duplicate id 1") == [
        (("mailbox", 0, "owner"), "unknown owner 'bob'"),
        (("rule", 2, "set", "status"), "unknown status 'Y'"),
        (("service", "default_status"), "unknown status 'Nope'"),
        (("mailbox", 1, "id"), "duplicate id 1"),
    ]


# --- check-config and load_settings --------------------------------------------------------------


def test_check_config_reports_each_problem_with_line_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, BAD)
    result = CliRunner().invoke(cli.app, ["check-config", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines == [
        f"{path}:4: service.unknown_sender: Input should be 'create' or 'reject'",
        f"{path}:19: mailbox[1].addresses[1]: Input should be a valid string",
        f"{path}:21: mailbox[1].notes: unknown key (misspelt, or not valid in this table)",
        f'{path}:25: mailbox[1].imap.after: after must be "seen", "delete" or "move:FOLDER"',
        f"{path}:28: mailbox[1].authentication.enforce: Input should be a valid boolean, "
        "unable to interpret input",
        f"{path}:32: rule[0].match: header.X-Foo: invalid regular expression: missing ), "
        "unterminated subpattern at position 0",
    ]


def test_check_config_places_reference_errors(tmp_path: Path) -> None:
    path = _write(tmp_path, BAD_REFERENCES)
    result = CliRunner().invoke(cli.app, ["check-config", str(path)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{path}:2: service.default_status: unknown status 'Nope'",
        f"{path}:11: mailbox[0].owner: unknown owner 'bob'",
        f"{path}:14: mailbox[1].id: duplicate id 1",
        f"{path}:19: rule[0].set.category: unknown category 'Billing'",
    ]


def test_check_config_ok_syntax_env_and_api_users(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    good = runner.invoke(cli.app, ["check-config", str(REPO / "fixtures" / "ticketgate.toml")])
    assert good.exit_code == 0 and ": ok: 1 mailbox(es)" in good.stdout
    syntax = _write(tmp_path, "[service]\nbase_url = \n", "syntax.toml")
    result = runner.invoke(cli.app, ["check-config", str(syntax)])
    assert result.exit_code == 2 and "line 2" in result.stderr
    missing = runner.invoke(cli.app, ["check-config", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "not found" in missing.stderr
    users = _write(tmp_path, '[[api_user]]\nname = "ok"\ntoken = "t"\n\n[[api_user]]\n'
                   'name = "nobody"\n', "users.toml")
    result = runner.invoke(cli.app, ["check-config", str(users)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{users}:5: api_user[1]: api_user 'nobody': give password")
    monkeypatch.setenv("TICKETGATE_SMTP_PORT", "twenty-five")
    result = runner.invoke(cli.app, ["check-config", str(REPO / "fixtures" / "ticketgate.toml")])
    assert result.exit_code == 2
    assert result.stderr.startswith("$TICKETGATE_SMTP_PORT: smtp_port: Input should be a valid")


def test_load_settings_and_serve_share_the_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path, BAD)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert f"{path}:4: service.unknown_sender:" in str(caught.value)
    result = CliRunner().invoke(cli.app, ["serve", "--config", str(path)])
    assert result.exit_code == 2
    assert "configuration error" in result.stderr
    assert f"{path}:25: mailbox[1].imap.after" in " ".join(result.stderr.split())


# --- JSON logs --------------------------------------------------------------------------------


def _capture(fmt: str, role: str | None = None) -> tuple[logging.Handler, io.StringIO]:
    handler = runtime.log_handler(fmt, role)
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    return handler, stream


def test_json_log_lines_carry_inbound_and_ticket_ids(tmp_path: Path) -> None:
    handler, stream = _capture("json", role="worker")
    pipeline_log = logging.getLogger("ticketgate.pipeline")
    old_level = pipeline_log.level
    pipeline_log.addHandler(handler)
    pipeline_log.setLevel(logging.INFO)
    ingestor = Ingestor(load_settings(None, database_url=f"sqlite:///{tmp_path / 'tg.db'}"))
    try:
        info = ingestor.ingest(b"From: a@example.org\r\nTo: help@example.com\r\nSubject: hi\r\n"
                               b"Message-ID: <log-1@example.org>\r\n\r\nbody\r\n", 1,
                               door="replay")
    finally:
        pipeline_log.removeHandler(handler)
        pipeline_log.setLevel(old_level)
        ingestor.close()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    mine = [r for r in records if r.get("inbound_id") == info.InboundId]
    assert mine, records
    assert mine[-1]["ticket_id"] == info.TicketId and mine[-1]["action"] == "created"
    assert mine[-1]["level"] == "INFO" and mine[-1]["logger"] == "ticketgate.pipeline"
    assert mine[-1]["role"] == "worker" and "time" in mine[-1]


def test_json_logs_find_the_inbound_id_in_other_lines() -> None:
    handler, stream = _capture("json")
    logger = logging.getLogger("ticketgate.test_ops")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("accepted %s from %s as inbound %s (%d bytes)", "Q1", "127.0.0.1", [42], 9)
        logger.warning("nothing about a mail")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["inbound_id"] == 42 and "inbound_id" not in second


def test_text_format_is_unchanged_and_unknown_formats_refused() -> None:
    handler, stream = _capture("text")
    record = logging.LogRecord("ticketgate.x", logging.INFO, __file__, 1, "inbound %s ok", (7,),
                               None)
    handler.handle(record)
    assert stream.getvalue().rstrip().endswith("INFO ticketgate.x inbound 7 ok")
    with pytest.raises(ValueError, match="text, json"):
        runtime.log_handler("xml")


def test_log_format_option_reaches_the_roles(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.delenv("TICKETGATE_LOG_FORMAT", raising=False)
    path = REPO / "fixtures" / "ticketgate.toml"
    result = CliRunner().invoke(cli.app, ["--log-format", "json", "check-config", str(path)])
    assert result.exit_code == 0
    assert os.environ["TICKETGATE_LOG_FORMAT"] == "json"  # inherited by serve's children
    monkeypatch.delenv("TICKETGATE_LOG_FORMAT")
    bad = CliRunner().invoke(cli.app, ["--log-format", "xml", "check-config", str(path)])
    assert bad.exit_code == 2


# --- metrics and health ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_role_metrics_endpoint_counts_enqueued_mail(tmp_path: Path) -> None:
    port = _free_port()
    settings = load_settings(None, metrics={"enabled": True, "smtp_port": port})
    assert metrics.start_role_server("smtp", settings) == port
    enqueue = metrics.counted(lambda ids: True, "smtp")
    broker_down = metrics.counted(lambda ids: False, "smtp")
    enqueue([1, 2])
    broker_down([3])
    text = _get(f"http://127.0.0.1:{port}/metrics")
    assert 'ticketgate_role_info{role="smtp"' in text
    assert 'ticketgate_enqueued_total{door="smtp",result="ok"} 2.0' in text
    assert 'ticketgate_enqueued_total{door="smtp",result="broker_unavailable"} 1.0' in text
    # a taken port is logged, never fatal; disabled means no server
    assert metrics.start_role_server("smtp", settings) is None
    assert metrics.start_role_server("smtp", load_settings(None)) is None


def test_check_health_database_broker_and_role(tmp_path: Path) -> None:
    from workers.health import run_checks

    url = f"sqlite:///{tmp_path / 'tg.db'}"
    settings = load_settings(None, database_url=url, smtp_port=_free_port(),
                             service={"data_dir": str(tmp_path)})
    ok, results = run_checks(settings)
    assert not ok and "no SQLite database" in results["database"]["error"]
    assert not (tmp_path / "tg.db").exists()  # the check did not create it
    Ingestor(settings).close()
    ok, results = run_checks(settings)
    assert ok and set(results) == {"database", "broker"}
    ok, results = run_checks(settings, "smtp")
    assert not ok and not results["smtp"]["ok"]  # nothing listens


@pytest.fixture
def worker_site(tmp_path: Path) -> Iterator[tuple[Path, int, dict[str, str]]]:
    port = _free_port()
    config = _write(tmp_path, textwrap.dedent(f'''\
        [service]
        data_dir = "data"
        [worker]
        concurrency = 1
        sweep_interval = 3600
        parent_wait_in_task = 1.0
        [metrics]
        enabled = true
        worker_port = {port}
        '''))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKETGATE_")}
    env.update(TICKETGATE_CONFIG=str(config), PYTHONPATH=str(REPO), TICKETGATE_LOG_FORMAT="json")
    worker = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker"], env=env,
                              cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "worker.log", "wb"))  # noqa: SIM115
    try:
        yield config, port, env
    finally:
        stop_celery_worker(worker)


_BATCH_MAILS = """\
    from workers import runtime
    from workers.celery_app import enqueue
    def mail(n, extra=""):
        return (f"From: a@example.org\\r\\nSubject: m{n}\\r\\n"
                f"Message-ID: <batch-{n}@example.org>\\r\\n{extra}\\r\\nbody\\r\\n").encode()
    ingestor = runtime.ingestor()
    parent = ingestor.receive(mail(1), 1, "smtp")
    reply = ingestor.receive(mail(2, "In-Reply-To: <batch-1@example.org>\\r\\n"), 1, "smtp")
    other = ingestor.receive(mail(3), 1, "smtp")
    """


def _wait_for_metrics(port: int, wanted: tuple[str, ...], log_path: Path) -> str:
    deadline = time.monotonic() + 90
    text = ""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            text = _get(f"http://127.0.0.1:{port}/metrics")
        if all(line in text for line in wanted):
            return text
        time.sleep(0.5)
    raise AssertionError(log_path.read_text(errors="replace")[-3000:])


@pytest.mark.timeout(150)
def test_one_task_carries_several_mails_and_a_reply_waits_for_its_parent_in_it(
        worker_site: tuple[Path, int, dict[str, str]], tmp_path: Path) -> None:
    """``enqueue`` puts up to 16 ids in one task, which runs them as one batch in spool order:
    the reply, named first in the task, is processed after its parent (spooled before it) and
    appended to its ticket in the same transaction: no broker retry.  (A reply whose parent is
    in another task is deferred and waited for: tests/test_worker_batch.py and the test
    below.)"""
    _config, port, env = worker_site
    send = textwrap.dedent(_BATCH_MAILS) + "assert enqueue([reply, parent, other])\n"
    subprocess.run([sys.executable, "-c", send], env=env, cwd=tmp_path, check=True, timeout=30)
    text = _wait_for_metrics(port, (
        'ticketgate_task_results_total{action="created"} 2.0',
        'ticketgate_task_results_total{action="appended"} 1.0',
        'ticketgate_tasks_total{state="success",task="ticketgate.process_inbound"} 1.0'),
        tmp_path / "worker.log")
    assert 'state="retry"' not in text


@pytest.mark.timeout(150)
def test_a_reply_whose_parent_is_not_in_progress_goes_back_to_the_broker(
        worker_site: tuple[Path, int, dict[str, str]], tmp_path: Path) -> None:
    """The parent is spooled but in no task (its hand-off was lost): the reply's task waits
    ``parent_wait_in_task`` for it, then retries it through the broker, and the reply is
    appended once the parent has been processed."""
    _config, port, env = worker_site
    send = textwrap.dedent(_BATCH_MAILS) + textwrap.dedent("""\
        import time
        assert enqueue([reply])
        time.sleep(4)  # past the worker's in-task wait (1 s here): the reply is retried
        assert enqueue([parent, other])
        """)
    subprocess.run([sys.executable, "-c", send], env=env, cwd=tmp_path, check=True, timeout=30)
    text = _wait_for_metrics(port, (
        'ticketgate_task_results_total{action="created"} 2.0',
        'ticketgate_task_results_total{action="appended"} 1.0'), tmp_path / "worker.log")
    assert 'ticketgate_tasks_total{state="retry",task="ticketgate.process_inbound"}' in text


@pytest.mark.timeout(150)
def test_prefork_worker_exposes_task_metrics(worker_site: tuple[Path, int, dict[str, str]],
                                             tmp_path: Path) -> None:
    _config, port, env = worker_site
    send = ("from workers import runtime; from workers.celery_app import enqueue; "
            "i = runtime.ingestor().receive(b'From: a@example.org\\r\\nSubject: m\\r\\n"
            "Message-ID: <metrics-1@example.org>\\r\\n\\r\\nbody\\r\\n', 1, 'smtp'); "
            "assert enqueue([i])")
    subprocess.run([sys.executable, "-c", send], env=env, cwd=tmp_path, check=True, timeout=30)
    deadline = time.monotonic() + 90  # a loaded CI machine starts Celery slowly
    text = ""
    while time.monotonic() < deadline:
        try:
            text = _get(f"http://127.0.0.1:{port}/metrics")
        except OSError:
            text = ""
        if 'ticketgate_task_results_total{action="created"} 1.0' in text:
            break
        time.sleep(0.5)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert 'ticketgate_task_results_total{action="created"} 1.0' in text, log[-3000:]
    assert ('ticketgate_tasks_total{state="success",task="ticketgate.process_inbound"} 1.0'
            in text)
    assert 'ticketgate_task_seconds_count{task="ticketgate.process_inbound"} 1.0' in text
    # the worker's JSON log names the mail
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line.get("inbound_id") == 1 and line.get("ticket_id") == 1 for line in lines)
    health = subprocess.run([sys.executable, "-m", "workers.cli", "check-health", "--role",
                             "worker", "--json"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=30, check=False)
    assert health.returncode == 0, health.stdout + health.stderr
    assert json.loads(health.stdout)["worker"]["ok"] is True


def test_concurrent_migrations_on_postgresql_are_serialised(fresh_postgres_url: str) -> None:
    """Every container runs `db upgrade` at start; on an empty database they must not collide
    (without the advisory lock two of four fail with a duplicate pg_type row)."""
    from concurrent.futures import ThreadPoolExecutor

    from ingest import schema
    from ingest.db import make_engine

    def upgrade(_: int) -> str | None:
        engine = make_engine(fresh_postgres_url)
        try:
            schema.upgrade(engine)
            return schema.current_revision(engine)
        finally:
            engine.dispose()

    with ThreadPoolExecutor(4) as pool:
        revisions = list(pool.map(upgrade, range(4)))
    assert len(set(revisions)) == 1 and revisions[0] is not None


def test_a_forked_pool_process_keeps_the_ingestor_with_connections_of_its_own(
        fresh_postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's main process builds the Ingestor (schema check, reference data) before it
    forks its pool; a pool process takes it over (``runtime.adopt_after_fork``) instead of
    building its own on its first task, and talks to the database on its own connection."""
    from sqlalchemy import text

    monkeypatch.setattr(runtime, "_settings", load_settings(
        _write(tmp_path, "[worker]\nconcurrency = 1\n"), database_url=fresh_postgres_url))
    monkeypatch.setattr(runtime, "_ingestor", None)
    monkeypatch.setattr(runtime, "_pid", None)
    parent = runtime.ingestor()
    with parent.session() as session:  # the parent's pool holds a connection at the fork
        parent_backend = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - reported through the pipe
        code = 1
        try:
            runtime.adopt_after_fork()
            adopted = runtime.ingestor()
            with adopted.session() as session:
                backend = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            os.write(write, json.dumps({"same": adopted is parent, "backend": backend}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = json.loads(pipe.read() or "{}")
    assert os.waitpid(child, 0)[1] == 0
    assert report["same"] and report["backend"] != parent_backend
    with parent.session() as session:  # the parent's connection is untouched by the child
        assert session.execute(text("SELECT pg_backend_pid()")).scalar_one() == parent_backend
    parent.close()


def test_task_retries_when_the_database_cannot_be_opened(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that cannot build its pipeline (database unreachable at its first task) retries
    the task with backoff; a failed task would be acknowledged, its mails left to the sweep."""
    from ingest.errors import TransientError
    from workers.celery_app import process_inbound

    unopenable = tmp_path / "ticketgate.db"
    unopenable.mkdir()  # SQLite cannot open a directory: "unable to open database file"
    settings = load_settings(None, database_url=f"sqlite:///{unopenable}")
    monkeypatch.setattr(runtime, "_settings", settings)
    monkeypatch.setattr(runtime, "_ingestor", None)
    # Called directly, Task.retry raises the reason it was given instead of scheduling the retry.
    with pytest.raises(TransientError, match="database unavailable: unable to open"):
        process_inbound([1, 2])
