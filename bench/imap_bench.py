"""IMAP poller (issue 4): a 5,000-message Dovecot backlog into tickets, and peak RSS.

Everything runs on this machine with private servers from ``tests/services.py`` (a Dovecot and
a Redis on free loopback ports, and with ``--db postgresql`` a throw-away PostgreSQL); the
machine's own 143/993/5432/6379 are never touched.  The mails are ``bench/generate.py``'s
realistic stream (1-80 KB, attachments, replies that thread, auto-replies, duplicates), APPENDed
to the folder before the poller starts, so the poller sees one big backlog.

Three runs, each with the real ``ticketgate imap`` / ``ticketgate worker`` processes:

* ``spool``: ``ticketgate imap`` alone; mails/s from the IMAP folder into the durable spool
  (fetched, committed, enqueued, flagged), and the poller's peak RSS (VmHWM);
* ``process``: then ``ticketgate worker`` alone on that spool; results/s (the pipeline);
* ``together``: a second mailbox with the same backlog, poller and worker at once: mails/s from
  the IMAP backlog all the way into tickets (every mail in a final state), peak RSS of both.

    python bench/imap_bench.py                 # 5,000 mails, SQLite, a private Redis broker
    python bench/imap_bench.py --n 500 --db postgresql --broker embedded

Results: ``bench/results/imap_bench-<time>.json`` and a Markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from imapclient import IMAPClient  # noqa: E402
from sqlalchemy import create_engine, func, select  # noqa: E402

from bench.generate import generate_mails, render_config  # noqa: E402
from ingest.models import InboundMail  # noqa: E402
from tests.services import (  # noqa: E402
    DovecotServer,
    RedisServer,
    _find_pg_bindir,
    _LocalPostgres,
)

RESULTS = REPO / "bench" / "results"
APPEND_CHUNK_BYTES = 4 * 1024 * 1024


def log(message: str) -> None:
    print(f"[imap_bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def append_backlog(server: DovecotServer, user: str, password: str, mails: list[bytes]) -> float:
    """MULTIAPPEND the backlog over one connection; returns seconds taken."""
    started = time.monotonic()
    context = ssl.create_default_context(cafile=str(server.ca_file))
    with IMAPClient("127.0.0.1", server.imaps_port, ssl_context=context, timeout=120) as client:
        client.login(user, password)
        chunk: list[bytes] = []
        size = 0
        for raw in mails:
            chunk.append(raw)
            size += len(raw)
            if size >= APPEND_CHUNK_BYTES:
                client.multiappend("INBOX", chunk)
                chunk, size = [], 0
        if chunk:
            client.multiappend("INBOX", chunk)
    return time.monotonic() - started


def write_config(directory: Path, server: DovecotServer, user: str, password: str) -> Path:
    imap = (f'imap = {{ host = "127.0.0.1", port = {server.imaps_port}, tls = "ssl", '
            f'ca_file = "{server.ca_file}", user = "{user}", password = "{password}", '
            f'after = "seen" }}\n')
    text = render_config()
    assert "[[mailbox]]\nid = 1\n" in text and "[service]\n" in text
    text = text.replace("[[mailbox]]\nid = 1\n", "[[mailbox]]\nid = 1\n" + imap, 1)
    text = text.replace("[service]\n", '[service]\ndata_dir = "var"\n', 1)
    path = directory / "ticketgate.toml"
    path.write_text(text, encoding="utf-8")
    return path


def peak_rss(pid: int) -> int:
    """VmHWM of a live process and its children (a prefork worker), in bytes: the largest."""
    best = 0
    for candidate in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{candidate}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]) * 1024)
        except OSError:
            continue
    return best


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class Role:
    """One ``ticketgate ROLE`` process, its log in the run's directory, peak RSS sampled."""

    def __init__(self, name: str, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.name = name
        self.logfile = (cwd / f"{name}.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "workers.cli", *argv], cwd=cwd,
                                     env=env, stdout=self.logfile, stderr=subprocess.STDOUT)
        self.rss = 0

    def sample(self) -> None:
        if self.proc.poll() is None:
            self.rss = max(self.rss, peak_rss(self.proc.pid))

    def stop(self) -> int:
        self.sample()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.logfile.close()
        return code


def counts(engine: Any) -> tuple[int, int]:
    """(spooled, final): inbound records, and those no longer ``received``."""
    with engine.connect() as conn:
        spooled = conn.scalar(select(func.count()).select_from(InboundMail)) or 0
        final = conn.scalar(select(func.count()).select_from(InboundMail)
                            .where(InboundMail.state != "received")) or 0
    return int(spooled), int(final)


def outcome(engine: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Final states, and the quarantined mails' errors (first line, counted)."""
    with engine.connect() as conn:
        states = {state: int(n) for state, n in conn.execute(
            select(InboundMail.state, func.count()).group_by(InboundMail.state)).all()}
        errors: dict[str, int] = {}
        for (error,) in conn.execute(select(InboundMail.error)
                                     .where(InboundMail.state == "quarantined")):
            key = (error or "").splitlines()[0][:200] if error else ""
            errors[key] = errors.get(key, 0) + 1
    return states, errors


def wait_for(engine: Any, roles: list[Role], n: int, what: str, timeout: float) -> float:
    """Seconds until ``what`` ("spooled" or "final") reaches n; samples RSS on the way."""
    started = time.monotonic()
    last_report = started
    while True:
        for role in roles:
            role.sample()
            if role.proc.poll() is not None:
                raise RuntimeError(f"{role.name} exited with {role.proc.returncode}; "
                                   f"see {role.logfile.name}")
        spooled, final = counts(engine)
        value = spooled if what == "spooled" else final
        now = time.monotonic()
        if value >= n:
            return now - started
        if now - last_report >= 15:
            log(f"  {what}: {value}/{n} after {now - started:.0f}s")
            last_report = now
        if now - started > timeout:
            raise RuntimeError(f"timed out: {what} {value}/{n}")
        time.sleep(0.2)


@contextmanager
def backing_services(db: str, broker: str) -> Iterator[dict[str, str]]:
    """Environment for the roles: the database (SQLite files, or a private PostgreSQL) and the
    broker (a private Redis, or the embedded SQLite broker)."""
    env: dict[str, str] = {}
    pg: _LocalPostgres | None = None
    redis: RedisServer | None = None
    try:
        if db == "postgresql":
            bindir = _find_pg_bindir()
            if bindir is None:
                raise SystemExit("PostgreSQL binaries not found (apt-get install postgresql)")
            pg = _LocalPostgres(bindir)
            pg.prepare()
            pg.initdb()
            pg.start()
            import psycopg

            with psycopg.connect(pg.admin_conninfo("postgres"), autocommit=True) as conn:
                for name in ("tg_spool", "tg_together"):
                    conn.execute(f"CREATE DATABASE {name}")
            env["pg_base"] = pg.url("")
        if broker == "redis":
            redis = RedisServer(shutil.which("redis-server") or "/usr/bin/redis-server")
            redis.start()
            env["TICKETGATE_BROKER_URL"] = redis.url
        yield env
    finally:
        if redis is not None:
            redis.stop()
            redis.remove()
        if pg is not None:
            pg.stop()
            pg.remove()


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="ticketgate-imap-bench-"))
    server = DovecotServer()
    server.start()
    result: dict[str, Any] = {"n": args.n, "db": args.db, "broker": args.broker,
                              "concurrency": args.concurrency,
                              "machine": {"cpus": os.cpu_count()}}
    try:
        mails = generate_mails(args.n, seed=args.seed)
        result["backlog_bytes"] = sum(len(m) for m in mails)
        with backing_services(args.db, args.broker) as services:
            pg_base = services.pop("pg_base", None)
            runs: dict[str, Any] = {}
            for run_name in ("spool", "together"):
                user, password = f"bench-{run_name}", f"pw-{run_name}"
                server.add_user(user, password)
                server.wait_for_login(user, password)
                took = append_backlog(server, user, password, mails)
                log(f"{run_name}: APPENDed {args.n} mails "
                    f"({result['backlog_bytes'] / 1e6:.0f} MB) in {took:.1f}s")
                workdir = base / run_name
                workdir.mkdir()
                config = write_config(workdir, server, user, password)
                url = (pg_base.rsplit("/", 1)[0] + f"/tg_{run_name}" if pg_base
                       else f"sqlite:///{workdir / 'var' / 'ticketgate.db'}")
                env = {k: v for k, v in os.environ.items() if not k.startswith("TICKETGATE_")}
                env.update(services, PYTHONPATH=str(REPO), TICKETGATE_CONFIG=str(config),
                           TICKETGATE_DATABASE_URL=url)
                subprocess.run([sys.executable, "-m", "workers.cli", "db", "upgrade"], cwd=workdir,
                               env=env, check=True, capture_output=True)
                engine = create_engine(url)
                worker_argv = ["worker", "--concurrency", str(args.concurrency)]
                if run_name == "spool":
                    runs["spool"] = spool_then_process(workdir, env, engine, args, worker_argv)
                else:
                    runs["together"] = together(workdir, env, engine, args, worker_argv)
                engine.dispose()
            result["runs"] = runs
    finally:
        server.stop()
        server.remove()
        if args.keep:
            log(f"kept the runs' directories (config, logs, SQLite) under {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return result


def spool_then_process(workdir: Path, env: dict[str, str], engine: Any,
                       args: argparse.Namespace, worker_argv: list[str]) -> dict[str, Any]:
    imap = Role("imap", ["imap"], workdir, env)
    try:
        spooled_s = wait_for(engine, [imap], args.n, "spooled", args.timeout)
        time.sleep(1.0)  # the last batch's flags and state
    finally:
        imap_code = imap.stop()
    # The poller's own figure, without the process start (imports, migrations, login).
    found = re.findall(r"(\d+) message\(s\) spooled in ([\d.]+)s",
                       (workdir / "imap.log").read_text(errors="replace"))
    poller_s = sum(float(seconds) for _count, seconds in found) or spooled_s
    log(f"spool: {args.n} mails spooled {spooled_s:.1f}s after the process start "
        f"({args.n / spooled_s:.0f}/s), in {poller_s:.1f}s of fetching ({args.n / poller_s:.0f}/s);"
        f" poller peak RSS {imap.rss / 2**20:.0f} MiB")
    worker = Role("worker", worker_argv, workdir, env)
    try:
        process_s = wait_for(engine, [worker], args.n, "final", args.timeout)
    finally:
        worker.stop()
    states, errors = outcome(engine)
    log(f"process: {args.n} results in {process_s:.1f}s ({args.n / process_s:.1f}/s), "
        f"worker peak RSS {worker.rss / 2**20:.0f} MiB; states {states}")
    return {"spool_seconds": spooled_s, "spool_per_s": args.n / spooled_s,
            "poller_seconds": poller_s, "poller_per_s": args.n / poller_s,
            "imap_peak_rss": imap.rss, "imap_exit": imap_code,
            "process_seconds": process_s, "process_per_s": args.n / process_s,
            "worker_peak_rss": worker.rss, "states": states, "errors": errors}


def together(workdir: Path, env: dict[str, str], engine: Any, args: argparse.Namespace,
             worker_argv: list[str]) -> dict[str, Any]:
    worker = Role("worker", worker_argv, workdir, env)
    imap = Role("imap", ["imap"], workdir, env)
    try:
        spooled_s = wait_for(engine, [imap, worker], args.n, "spooled", args.timeout)
        final_s = spooled_s + wait_for(engine, [imap, worker], args.n, "final", args.timeout)
    finally:
        imap_code = imap.stop()
        worker.stop()
    states, errors = outcome(engine)
    log(f"together: all {args.n} in a final state after {final_s:.1f}s "
        f"({args.n / final_s:.1f}/s; spooled after {spooled_s:.1f}s); states {states}; "
        f"peak RSS imap {imap.rss / 2**20:.0f} MiB, worker {worker.rss / 2**20:.0f} MiB")
    return {"spooled_seconds": spooled_s, "final_seconds": final_s,
            "end_to_end_per_s": args.n / final_s, "states": states, "errors": errors,
            "imap_peak_rss": imap.rss, "imap_exit": imap_code, "worker_peak_rss": worker.rss}


def summary(result: dict[str, Any]) -> str:
    spool, both = result["runs"]["spool"], result["runs"]["together"]
    mib = 2**20
    imap_rss = max(spool["imap_peak_rss"], both["imap_peak_rss"]) / mib
    worker_rss = max(spool["worker_peak_rss"], both["worker_peak_rss"]) / mib
    return "\n".join([
        f"| {result['n']} mails, {result['backlog_bytes'] / 1e6:.0f} MB, {result['db']}, "
        f"{result['broker']} broker, worker concurrency {result['concurrency']} | figure |",
        "|---|---|",
        f"| IMAP -> spool (`ticketgate imap` alone), from the process start | "
        f"{spool['spool_per_s']:.0f} mails/s ({spool['spool_seconds']:.1f} s) |",
        f"| IMAP -> spool, the poller's fetching alone (from its log) | "
        f"{spool['poller_per_s']:.0f} mails/s ({spool['poller_seconds']:.1f} s) |",
        f"| spool -> results (`ticketgate worker` alone) | {spool['process_per_s']:.1f} mails/s "
        f"({spool['process_seconds']:.1f} s) |",
        f"| IMAP backlog -> tickets, both running | {both['end_to_end_per_s']:.1f} mails/s "
        f"({both['final_seconds']:.1f} s) |",
        f"| peak RSS `ticketgate imap` | {imap_rss:.0f} MiB |",
        f"| peak RSS `ticketgate worker` (largest process) | {worker_rss:.0f} MiB |",
        f"| final states (both running) | {both['states']} |",
        f"| final states (worker alone) | {spool['states']} |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="mails in the backlog")
    parser.add_argument("--seed", type=int, default=20240305)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--broker", choices=["redis", "embedded"], default="redis",
                        help="embedded: kombu's SQLite transport (polls once a second)")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--keep", action="store_true", help="keep logs and databases")
    args = parser.parse_args(argv)
    result = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"imap_bench-{stamp}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(summary(result))
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
