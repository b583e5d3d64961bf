"""The ``ticketgate`` command (typer).  Each sub-command builds one Ingestor and drives it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from ingest import schema
from ingest.config import Settings, load_settings
from ingest.db import make_engine
from ingest.errors import ConfigError, TicketgateError
from ingest.models import InboundMail
from ingest.service import Ingestor, RecordedError
from ingest.sources import iter_mails
from ingest.ticketinfo import TicketInfo

app = typer.Typer(help="ticketgate: email-to-ticket ingestion.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
quarantine_app = typer.Typer(help="Mails that failed processing.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(quarantine_app, name="quarantine")

err = Console(stderr=True)


@app.callback()
def _options(
    log_format: Annotated[str | None, typer.Option(
        "--log-format", help="Log lines as 'text' or 'json' (default: $TICKETGATE_LOG_FORMAT, "
        "else text). Roles started by serve inherit it.")] = None,
) -> None:
    if log_format is not None:
        if log_format not in ("text", "json"):
            raise typer.BadParameter("must be 'text' or 'json'", param_hint="--log-format")
        os.environ["TICKETGATE_LOG_FORMAT"] = log_format
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file (default: $TICKETGATE_CONFIG)."),
]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


def _ingestor(config: Path | None) -> Ingestor:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("mailparser").setLevel(logging.ERROR)
    return Ingestor(_settings(config))


def _summary(label: str, info: TicketInfo) -> str:
    ticket = f"ticket {info.TicketId}" if info.TicketId else "no ticket"
    extra = " ".join((info.Reason or info.Title or "").split())  # one line, whatever the error
    threaded = f" by {info.ThreadedBy}" if info.ThreadedBy else ""
    return f"{label}\t{info.Action}\t{ticket}{threaded}\t{extra}"


@app.command()
def replay(
    paths: Annotated[list[Path], typer.Argument(help=".eml files, directories, mbox, Maildir.")],
    mailbox: Annotated[int, typer.Option("--mailbox", help="Mailbox id to deliver to.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON TicketInfo per line.")] = False,
    config: ConfigOption = None,
) -> None:
    """Feed stored mail through the pipeline; prints one TicketInfo per mail.

    Exit status 0 when every mail reached a recorded state, 1 when some input could not be read
    or was not a mail (each is reported on stderr and the run goes on).
    """
    ingestor = _ingestor(config)
    failures = 0
    show_progress = err.is_terminal
    progress = Progress(TextColumn("replay"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, disable=not show_progress,
                        transient=True, redirect_stdout=sys.stdout.isatty(),
                        redirect_stderr=False)
    unreadable = 0

    def readable() -> Iterator[tuple[bytes, str]]:
        nonlocal unreadable
        for item in iter_mails(paths):
            progress.advance(task)
            if item.raw is None:
                unreadable += 1
                err.print(f"[red]error[/red] {item.label}: {item.error}")
            else:
                yield item.raw, item.label

    with progress:
        task = progress.add_task("replay", total=None)
        try:
            for label, result in ingestor.ingest_many(readable(), mailbox, door="replay"):
                if isinstance(result, RecordedError):
                    failures += 1
                    info = result.info
                    err.print(f"[red]error[/red] {label}: {result} (recorded as inbound "
                              f"{result.inbound_id})")
                else:
                    info = result
                line = info.model_dump_json() if as_json else _summary(label, info)
                print(line, flush=True)  # on a terminal, rich prints it above the bar
        except TicketgateError as exc:
            failures += 1
            err.print(f"[red]error[/red] {exc}")
    failures += unreadable
    ingestor.close()
    raise typer.Exit(1 if failures else 0)


def _use_config(config: Path | None) -> Settings:
    """Validate the configuration and export it, so child processes and Celery read the same."""
    if config is not None:
        os.environ["TICKETGATE_CONFIG"] = str(config.resolve())
    return _settings(config)


@app.command()
def smtp(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port.")] = None,
) -> None:
    """The SMTP listener for MX delivery (spools each mail, then hands its id to the workers)."""
    settings = _use_config(config)
    from workers import metrics, runtime
    from workers.celery_app import enqueue
    from workers.handoff import GroupedHandoff
    from workers.smtp import serve_smtp

    runtime.configure_logging(role="smtp")
    metrics.start_role_server("smtp", settings)
    handoff = GroupedHandoff(metrics.counted(enqueue, "smtp"))
    try:
        asyncio.run(serve_smtp(runtime.ingestor(), handoff, host=host, port=port))
    finally:
        handoff.flush()


@app.command()
def api(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port.")] = None,
) -> None:
    """The HTTP API: SuperOffice agents, Autotask Tickets, /healthz, /metrics (uvicorn)."""
    _use_config(config)
    from workers import runtime
    from workers.api import serve_api

    runtime.configure_logging(role="api")
    serve_api(runtime.ingestor(), host=host, port=port)


@app.command()
def imap(
    config: ConfigOption = None,
    mailbox: Annotated[list[int] | None, typer.Option(
        "--mailbox", help="Poll only this mailbox id (repeatable).")] = None,
    status: Annotated[bool, typer.Option(
        "--status", help="Print each folder's stored state (last UID, last error) and exit.")
    ] = False,
) -> None:
    """The IMAP poller: one thread per mailbox with `imap` settings (IDLE, else polling)."""
    settings = _use_config(config)
    from workers import metrics, runtime
    from workers.celery_app import enqueue
    from workers.imap import serve_imap, status_lines

    runtime.configure_logging(role="imap")
    if status:
        print("\n".join(status_lines(runtime.ingestor())))
        raise typer.Exit(0)
    metrics.start_role_server("imap", settings)
    raise typer.Exit(serve_imap(runtime.ingestor(), metrics.counted(enqueue, "imap"),
                                mailbox_ids=mailbox or ()))


@app.command()
def worker(
    config: ConfigOption = None,
    concurrency: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
    beat: Annotated[bool, typer.Option(help="Also run the periodic sweep (one per site).")] = False,
    pool: Annotated[str, typer.Option(help="Celery pool: prefork, threads or solo.")] = "prefork",
    name: Annotated[str | None, typer.Option(
        "--name", help="Celery node name (default celery@HOSTNAME, %h = host name): give each "
        "worker on one host its own.")] = None,
    events: Annotated[bool, typer.Option(
        "--events", help="Send task events, so Flower can show tasks.")] = False,
) -> None:
    """A Celery worker that processes spooled mails (run many for scale-out)."""
    settings = _use_config(config)
    from workers import metrics, runtime
    from workers.celery_app import app as celery

    runtime.configure_logging(role="worker")
    from celery.signals import setup_logging

    # A receiver tells Celery that logging is configured: it adds no handlers of its own (they
    # would print Celery-format lines in between the JSON ones).
    setup_logging.connect(lambda **_: None, weak=False, dispatch_uid="ticketgate-logging")
    try:
        runtime.ingestor()  # schema upgrade and reference data before the first task
    except (OperationalError, InterfaceError) as exc:
        # Down or unreachable: the first task builds it (tasks retry these).  Any other
        # database error, a failed migration say, still ends the worker.
        logging.getLogger("ticketgate.worker").warning(
            "database not reachable at start (%s); the pipeline is built on the first task",
            str(exc).splitlines()[0])
    metrics.start_worker_server(settings)  # before the pool forks
    argv = ["worker", "--loglevel", "INFO", "--pool", pool,
            "--concurrency", str(concurrency or settings.worker.concurrency),
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if name:
        argv += ["--hostname", name]
    if events:
        argv.append("--task-events")
    if os.environ.get("TICKETGATE_LOG_FORMAT") == "json":
        argv.insert(0, "--quiet")  # celery's global option: no banner between the JSON lines
    if beat:
        settings.service.data_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--beat", "--schedule", str(settings.service.data_dir / "beat-schedule")]
    celery.worker_main(argv)


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Everything in one process group: SMTP listener and workers with the sweep.

    With no configuration: SQLite under ./var/, the embedded broker, SMTP on 127.0.0.1:2525,
    one demo mailbox that accepts any recipient.
    """
    settings = _use_config(config)
    from workers import runtime
    from workers.supervisor import Child, role_command, supervise

    runtime.configure_logging(role="serve")
    Ingestor(settings).close()  # migrate once, before the roles start in parallel
    print(f"ticketgate serve: database {settings.effective_database_url}, broker "
          f"{settings.effective_broker_url}, SMTP {settings.smtp_host}:{settings.smtp_port}, "
          f"HTTP {settings.http_host}:{settings.http_port}",
          flush=True)
    children = [
        Child("smtp", role_command("smtp")),
        Child("worker", role_command("worker", "--beat")),
        Child("api", role_command("api")),
    ]
    if settings.imap_mailboxes:
        children.append(Child("imap", role_command("imap")))
    raise typer.Exit(supervise(children))


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Apply the Alembic migrations to the configured database."""
    settings = _settings(config)
    engine = make_engine(settings.effective_database_url)
    schema.upgrade(engine)
    print(f"database at revision {schema.current_revision(engine)}")
    engine.dispose()


@app.command("check-config")
def check_config(
    file: Annotated[Path, typer.Argument(help="The TOML file to check.")],
) -> None:
    """Validate a configuration file: each problem as FILE:LINE: key: message.

    Exit 0 when it is valid, 2 when it is not (the same checks `serve` makes at start, plus the
    API users').  TICKETGATE_* variables are applied as at run time.
    """
    try:
        settings = load_settings(file)
        from workers.http_guard import Authenticator

        Authenticator(settings.api_user)
    except ConfigError as exc:
        message = str(exc)
        if message.startswith("api_user "):  # from the API's own check: give it its line
            message = _api_user_problem(file, settings, message)
        for line in message.splitlines():
            print(line, file=sys.stderr)
        raise typer.Exit(2) from None
    imap = len(settings.imap_mailboxes)
    print(f"{file}: ok: {len(settings.mailbox)} mailbox(es) ({imap} with IMAP), "
          f"{len(settings.rule)} rule(s), {len(settings.api_user)} API user(s)")


def _api_user_problem(file: Path, settings: Settings, message: str) -> str:
    from ingest.config_lines import key_lines

    index = key_lines(file.read_text(encoding="utf-8"))
    for i, user in enumerate(settings.api_user):
        if message.startswith(f"api_user {user.name!r}") and ("api_user", i) in index:
            return f"{file}:{index['api_user', i]}: api_user[{i}]: {message}"
    return f"{file}: {message}"


@app.command("check-health")
def check_health(
    role: Annotated[str | None, typer.Option(
        "--role", envvar="TICKETGATE_ROLE",
        help="Also probe this role's own process: smtp, imap, api, worker or serve.")] = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Container health check: database and broker reachable (and the role answering).

    Exit 0 when healthy, 1 when not.
    """
    from workers.health import ROLES, run_checks

    if role is not None and role not in ROLES:
        raise typer.BadParameter(f"must be one of {', '.join(ROLES)}", param_hint="--role")
    ok, results = run_checks(_settings(config), role)
    if as_json:
        print(json.dumps({"ok": ok, **results}))
    else:
        for name, detail in results.items():
            rest = {k: v for k, v in detail.items() if k not in ("ok", "ms")}
            print(f"{name:<9}{'ok' if detail['ok'] else 'FAILED':<7}{detail['ms']:>8} ms  "
                  + " ".join(f"{k}={v}" for k, v in rest.items()))
    raise typer.Exit(0 if ok else 1)


@quarantine_app.command("list")
def quarantine_list(config: ConfigOption = None) -> None:
    """Quarantined mails, oldest first."""
    ingestor = _ingestor(config)
    table = Table("id", "received (UTC)", "mailbox", "door", "source", "why")
    with ingestor.session() as session:
        rows = session.execute(  # not the raw bytes: the list may be long
            select(InboundMail.id, InboundMail.received_at, InboundMail.mailbox_id,
                   InboundMail.door, InboundMail.source, InboundMail.error, InboundMail.reason)
            .where(InboundMail.state == "quarantined").order_by(InboundMail.id)
        )
        for row in rows:
            # A step that failed has its error; a policy hold (DMARC, circuit breaker) has
            # only its reason.
            why = row.error or row.reason or ""
            table.add_row(str(row.id), row.received_at.strftime("%Y-%m-%d %H:%M:%S"),
                          str(row.mailbox_id), row.door, row.source[:40], why[:80])
    Console().print(table)


@quarantine_app.command("show")
def quarantine_show(inbound_id: int, config: ConfigOption = None) -> None:
    """Everything recorded about one inbound mail: state, error, trace, headers."""
    ingestor = _ingestor(config)
    with ingestor.session() as session:
        row = session.get(InboundMail, inbound_id)
        if row is None:
            err.print(f"[red]no inbound mail {inbound_id}[/red]")
            raise typer.Exit(1)
        head = row.raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0][:4000]
        print(json.dumps({
            "id": row.id, "state": row.state, "reason": row.reason, "error": row.error,
            "mailbox": row.mailbox_id, "door": row.door, "source": row.source,
            "received_at": row.received_at.isoformat(), "size": row.size,
            "message_id": row.header_message_id, "attempts": row.attempts,
            "trace": row.trace,
        }, indent=2, ensure_ascii=False))
        print("--- headers ---")
        print(head.decode("utf-8", "replace"))


@quarantine_app.command("replay")
def quarantine_replay(inbound_id: int, config: ConfigOption = None) -> None:
    """Send a quarantined mail through the pipeline again (after a fix or a config change)."""
    ingestor = _ingestor(config)
    try:
        info = ingestor.replay_quarantined(inbound_id)
    except TicketgateError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    print(info.model_dump_json())


@app.command()
def trace(inbound_id: int, config: ConfigOption = None) -> None:
    """The per-step trace of one inbound mail."""
    ingestor = _ingestor(config)
    with ingestor.session() as session:
        row = session.get(InboundMail, inbound_id)
        if row is None:
            err.print(f"[red]no inbound mail {inbound_id}[/red]")
            raise typer.Exit(1)
        print(f"inbound {row.id}: {row.state}" + (f" ({row.reason})" if row.reason else ""))
        for line in row.trace or []:
            extra = {k: v for k, v in line.items() if k not in ("step", "ms", "note")}
            print(f"  {line.get('ms', 0):>8} ms  {line.get('step', '?'):<10} {line.get('note', '')}"
                  + (f"  {json.dumps(extra, ensure_ascii=False)}" if extra else ""))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":
    sys.exit(app())
