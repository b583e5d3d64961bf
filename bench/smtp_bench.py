"""SMTP end to end (issue 3): ticketgate's listener and workers against bare aiosmtpd handlers.

Everything runs on 127.0.0.1 with private servers started here (a throw-away PostgreSQL and
Redis from ``tests/services.py`` on free ports; never the machine's own 5432/6379):

* ``peak``: N realistic mails (``bench/generate.py``) sent by C concurrent SMTP clients as fast
  as they are accepted, to ``ticketgate smtp`` + ``ticketgate worker`` and to the two bare
  servers of ``bench/bare_smtp.py`` (list-only, fsync-per-mail).  Measures accepted mails/s,
  results committed/s (``inbound_mails.processed_at``, set in the ticket's own transaction),
  the backlog (``state = 'received'``) sampled during the run, 250->committed latency, peak RSS
  and CPU seconds per component;
* ``accept``: bare fsync'd handler and the listener alone (no worker) back to back, a few
  rounds (``--compare-code-dir`` adds the listener of another tree: before/after a change);
* ``half``: the same stream paced at half of ticketgate's peak accepted rate (p99 target);
* ``sustain``: paced below the rate the workers committed at peak (latency when not saturated);
* ``stages``: spool, publish and process in this process, per-stage thread CPU time (robust
  against other load on the machine);
* ``profile``: the peak run again under ``py-spy record`` (listener and worker processes;
  ``--profile-rate`` paces it instead);
* ``big``: M concurrent mails of S MB each, listener RSS high-water mark (VmHWM).

After ``peak``, mail-parser alone parses the same mails in this process, and the summary sets
the run's CPU per mail against the budget that keeping pace at 60% of the bare fsync'd rate
leaves on this machine's cores (``budget``).

The machine is shared, so each run first waits (``--quiet-wait``) for the CPUs to be mostly
idle and records how busy they were, and CPU seconds per component are reported beside rates.

    python bench/smtp_bench.py                        # everything, results in bench/results/
    python bench/smtp_bench.py --phases peak --n 500  # a quick look

Results: ``bench/results/smtp_bench-<time>.json`` and a Markdown summary next to it.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import email.utils
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.generate import SUPPORT, generate, render_config  # noqa: E402
from tests.services import RedisServer, _find_pg_bindir, _LocalPostgres  # noqa: E402

RESULTS = REPO / "bench" / "results"
PYTHON = sys.executable
CODE_DIR = {"path": REPO}  # --code-dir: the tree ticketgate's processes run from
PYSPY = str(Path(sys.executable).with_name("py-spy"))
READY_TIMEOUT_S = 90.0
DRAIN_TIMEOUT_S = 600.0
OPTIONS: dict[str, float] = {"quiet_wait": 60.0}  # --quiet-wait
INBOUND_RE = re.compile(r"inbound ([\d,]+)")
LF_RE = re.compile(rb"(?<!\r)\n")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- mails --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Mail:
    raw: bytes  # CRLF line ends, as on the wire
    mail_from: str
    kind: str


def load_mails(n: int, seed: int | None = None) -> list[Mail]:
    mails = []
    for generated in generate(n, seed) if seed is not None else generate(n):
        raw = LF_RE.sub(b"\r\n", generated.raw)
        head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        match = re.search(r"^From:(.*(?:\r\n[ \t].*)*)", head, re.MULTILINE | re.IGNORECASE)
        sender = email.utils.parseaddr(match.group(1))[1] if match else ""
        if generated.kind.startswith("bounce"):
            sender = ""  # null reverse-path, as an MTA sends a DSN
        mails.append(Mail(raw, sender, generated.kind))
    return mails


def big_mail(size: int, index: int, seed: int = 3) -> tuple[bytes, bytes]:
    """A realistic large mail (text + base64 attachment), as (head, body) with CRLF ends.

    The body is shared by all copies (it is the big part); the head differs per copy."""
    rng = random.Random(seed)
    text = ("Hello,\r\n\r\nplease find the full export of last quarter attached; the import "
            "fails on line 18223.\r\n\r\nBest regards,\r\nJames Smith\r\n")
    boundary = "----=_Part_bench_big"
    lines = []
    budget = size - 2000
    payload_bytes = budget * 3 // 4
    blob = rng.randbytes(payload_bytes)
    encoded = base64.encodebytes(blob).replace(b"\n", b"\r\n")
    lines.append(f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 f"Content-Transfer-Encoding: 7bit\r\n\r\n{text}\r\n".encode())
    lines.append(f"--{boundary}\r\nContent-Type: application/octet-stream; name=export.bin\r\n"
                 "Content-Transfer-Encoding: base64\r\n"
                 "Content-Disposition: attachment; filename=export.bin\r\n\r\n".encode())
    body = b"".join(lines) + encoded + f"\r\n--{boundary}--\r\n".encode()
    head = (
        "From: James Smith <james@globex.example>\r\n"
        f"To: {SUPPORT}\r\n"
        f"Subject: Quarterly export {index} (large attachment)\r\n"
        f"Date: {email.utils.formatdate()}\r\n"
        f"Message-ID: <big-{index}-{time.time_ns()}@globex.example>\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
    ).encode()
    return head, body


# --- processes ----------------------------------------------------------------------------------


class Proc:
    """A subprocess whose output goes to a log file; ready when a pattern appears in it."""

    def __init__(self, name: str, argv: list[str], log_path: Path, ready: str,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.ready = re.compile(ready)
        self.env = env
        self.cwd = cwd or CODE_DIR["path"]
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = self.log_path.open("ab")
        self.popen = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=out,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        out.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.popen.returncode}:\n{self.tail()}")
            if self.ready.search(self.log_path.read_text(errors="replace")):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {READY_TIMEOUT_S}s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def processes(self) -> list[psutil.Process]:
        try:
            main = psutil.Process(self.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 60.0) -> None:
        popen, self.popen = self.popen, None
        if popen is None or popen.poll() is not None:
            return
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)  # our own session: the worker's children
            popen.wait()


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a live process, in bytes (/proc/PID/status VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_cpu(pid: int) -> float:
    """CPU seconds used by a process and all its descendants, dead ones included."""
    try:
        main = psutil.Process(pid)
        times = main.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in main.children(recursive=True):
            with suppress(psutil.NoSuchProcess):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
        return total
    except psutil.NoSuchProcess:
        return 0.0


def self_cpu() -> float:
    times = os.times()
    return times.user + times.system


def machine_busy() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def wait_quiet(max_wait: float, threshold: float = 25.0) -> dict[str, Any]:
    """Wait (up to ``max_wait`` s) until other processes leave the CPUs mostly idle.

    This machine has 2 cores and is shared; a run measured while something else is busy says
    more about that than about us.  Returns what was seen, to be stored with the run."""
    start = time.time()
    busy = psutil.cpu_percent(interval=2.0)
    while busy > threshold and time.time() - start < max_wait:
        busy = psutil.cpu_percent(interval=2.0)
    waited = time.time() - start
    if busy > threshold:
        log(f"machine still {busy:.0f}% busy after {waited:.0f}s; measuring anyway")
    return {"busy_pct_before": busy, "waited_s": round(waited, 1),
            "loadavg_before": os.getloadavg()}


# --- services -----------------------------------------------------------------------------------


class Services:
    """The private PostgreSQL and Redis (tests/services.py) for the whole benchmark."""

    def __init__(self) -> None:
        bindir = _find_pg_bindir()
        if bindir is None:
            raise SystemExit("PostgreSQL server binaries not found: apt-get install postgresql")
        self.pg = _LocalPostgres(bindir)
        self.pg.prepare()
        self.pg.initdb()
        self.pg.start()
        self.redis = RedisServer("/usr/bin/redis-server")
        self.redis.start()
        self.pg_version = bindir.parent.name
        log(f"private PostgreSQL {self.pg_version} on 127.0.0.1:{self.pg.port}, "
            f"Redis on 127.0.0.1:{self.redis.port}")

    def new_database(self, name: str) -> str:
        with psycopg.connect(self.pg.admin_conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        self.flush_redis()
        return self.pg.url(name)

    def flush_redis(self) -> None:
        with socket.create_connection(("127.0.0.1", self.redis.port), timeout=5) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            sock.recv(64)

    def postmaster_pid(self) -> int:
        return int((self.pg.datadir / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        try:
            self.redis.stop()
            self.redis.remove()
        finally:
            self.pg.stop()
            self.pg.remove()


# --- systems under test -------------------------------------------------------------------------


class System:
    """What receives the mail: ticketgate (listener + worker) or a bare aiosmtpd handler."""

    name: str
    port: int
    procs: dict[str, Proc]
    db_conninfo: str | None = None

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()


class Ticketgate(System):
    def __init__(self, services: Services, workdir: Path, database: str, concurrency: int,
                 pool: str = "prefork", worker: bool = True, code_dir: Path | None = None
                 ) -> None:
        self.name = "ticketgate" if worker else "ticketgate-listener-only"
        self.port = free_port()
        url = services.new_database(database)
        self.db_conninfo = services.pg.admin_conninfo(database)
        config = workdir / "ticketgate.toml"
        if not config.exists():
            # One mailbox, the bench world; every client is on 127.0.0.1, so the per-IP limits
            # of [smtp] would measure themselves instead of the listener.
            config.write_text(render_config() + "\n[smtp]\nip_limits_exempt_loopback = true\n",
                              encoding="utf-8")
        env = {**os.environ, "TICKETGATE_DATABASE_URL": url,
               "TICKETGATE_BROKER_URL": services.redis.url, "PYTHONUNBUFFERED": "1"}
        env.pop("TICKETGATE_CONFIG", None)
        cli = [PYTHON, "-m", "workers.cli"]
        logs = workdir / "logs"
        self.procs = {}
        # The listener first: it migrates the fresh database before the worker connects.
        self.procs["listener"] = Proc(
            "listener", [*cli, "smtp", "--config", str(config), "--port", str(self.port)],
            logs / f"{database}-smtp.log", r"ticketgate smtp listening", env, code_dir).start()
        if not worker:
            return
        self.procs["worker"] = Proc(
            "worker", [*cli, "worker", "--config", str(config), "--concurrency",
                       str(concurrency), "--pool", pool],
            logs / f"{database}-worker.log", r"ready\.", env, code_dir).start()


# All clients of the benchmark share 127.0.0.1, where a real MX sees many addresses: the
# per-client limits ([smtp] max_connections_per_ip, max_messages_per_ip_per_minute) would
# defer most of the stream, so loopback is exempt from them here.
SMTP_SETTINGS = {"ip_limits_exempt_loopback": "true"}


def bench_config() -> str:
    """bench.toml's world (one mailbox, the generator's companies and persons) + SMTP_SETTINGS."""
    text = render_config()
    lines = [f"{key} = {value}" for key, value in SMTP_SETTINGS.items()]
    if re.search(r"^\[smtp\]\s*$", text, re.MULTILINE):
        return re.sub(r"^\[smtp\]\s*$", "[smtp]\n" + "\n".join(lines), text, count=1,
                      flags=re.MULTILINE)
    return text.rstrip("\n") + "\n\n[smtp]\n" + "\n".join(lines) + "\n"


class Bare(System):
    def __init__(self, mode: str, workdir: Path, tag: str) -> None:
        self.name = f"bare-{mode}"
        self.port = free_port()
        spool = workdir / f"bare-{mode}-{tag}.mbox"
        spool.unlink(missing_ok=True)
        argv = [PYTHON, str(REPO / "bench" / "bare_smtp.py"), "--mode", mode,
                "--port", str(self.port), "--file", str(spool)]
        self.procs = {"listener": Proc(self.name, argv, workdir / "logs" / f"bare-{mode}-{tag}.log",
                                       r"listening").start()}


# --- the client ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Sent:
    index: int
    t_start: float  # MAIL FROM sent (epoch seconds)
    t_data: float  # DATA sent
    t_reply: float  # final reply to DATA received (the 250)
    code: int
    reply: str
    inbound: list[int] = field(default_factory=list)


def send_stream(port: int, mails: list[Mail], clients: int, rate: float | None = None,
                on_sent: Callable[[Sent], None] | None = None) -> list[Sent]:
    """``clients`` threads, one SMTP connection each (reused, as an MTA's connection cache
    does), take the next mail from a shared counter.  With ``rate``, mail i is not started
    before t0 + i/rate (an open-loop schedule); otherwise as fast as the server answers.

    The schedule starts once every client has its connection: the listener holds its greeting
    back (``[smtp] greeting_delay``, 1 s), and a schedule that started before the greetings made
    the first second's mails one burst, a backlog the paced run then carried to its end."""
    counter = itertools.count()
    lock = threading.Lock()
    results: list[Sent] = []
    start = {"t0": 0.0}
    connected = threading.Barrier(clients, action=lambda: start.update(t0=time.time() + 0.05))
    errors: list[str] = []

    def connect() -> smtplib.SMTP:
        conn = smtplib.SMTP("127.0.0.1", port, local_hostname="bench-client.example",
                            timeout=300)
        conn.ehlo()
        return conn

    def client() -> None:
        conn = connect()
        connected.wait(timeout=120)
        t0 = start["t0"]
        while True:
            with lock:
                index = next(counter)
            if index >= len(mails):
                break
            mail = mails[index]
            if rate:
                delay = t0 + index / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
            for attempt in range(3):
                t_start = time.time()
                try:
                    code, reply = conn.mail(mail.mail_from, [f"SIZE={len(mail.raw)}"])
                    if code == 250:
                        code, reply = conn.rcpt(SUPPORT)
                    t_data = time.time()
                    if code == 250:
                        code, reply = conn.data(mail.raw)
                    else:
                        conn.rset()
                    t_reply = time.time()
                except (smtplib.SMTPException, OSError) as exc:
                    errors.append(f"{index}: {exc!r}")
                    with suppress(Exception):
                        conn.close()
                    conn = connect()
                    continue
                text = reply.decode("utf-8", "replace")
                match = INBOUND_RE.search(text)
                sent = Sent(index, t_start, t_data, t_reply, code, text,
                            [int(x) for x in match.group(1).split(",")] if match else [])
                with lock:
                    results.append(sent)
                if on_sent:
                    on_sent(sent)
                if code < 400 or attempt == 2:
                    break
                time.sleep(0.5)  # temporary failure: retry, as an MTA would (sooner)
        with suppress(Exception):
            conn.quit()

    threads = [threading.Thread(target=client, name=f"smtp-client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        log(f"{len(errors)} client errors, first: {errors[:3]}")
    return sorted(results, key=lambda s: s.index)


# --- sampling -----------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Every ``interval`` s: backlog and processed counts (ticketgate) and RSS per process."""

    def __init__(self, system: System, interval: float = 0.25) -> None:
        super().__init__(name="sampler", daemon=True)
        self.system = system
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = (psycopg.connect(self.system.db_conninfo, autocommit=True)
                if self.system.db_conninfo else None)
        try:
            while not self.stopping.is_set():
                sample: dict[str, Any] = {"t": time.time()}
                if conn is not None:
                    row = conn.execute(
                        "SELECT count(*) FILTER (WHERE state = 'received'),"
                        " count(*) FILTER (WHERE processed_at IS NOT NULL), count(*)"
                        " FROM inbound_mails").fetchone()
                    assert row is not None
                    sample.update(backlog=row[0], processed=row[1], spooled=row[2])
                for name, proc in self.system.procs.items():
                    rss = []
                    for process in proc.processes():
                        with suppress(psutil.NoSuchProcess):
                            rss.append(process.memory_info().rss)
                    sample[f"rss_{name}"] = max(rss, default=0)
                    sample[f"rss_{name}_total"] = sum(rss)
                self.samples.append(sample)
                self.stopping.wait(self.interval)
        finally:
            if conn is not None:
                conn.close()

    def stop(self) -> list[dict[str, Any]]:
        self.stopping.set()
        self.join()
        return self.samples


class CpuMeter:
    """CPU seconds per component between ``start`` and ``stop``."""

    def __init__(self, system: System, services: Services | None) -> None:
        self.parts: dict[str, Callable[[], float]] = {}
        for name, proc in system.procs.items():
            self.parts[name] = lambda pid=proc.pid: tree_cpu(pid)
        if services is not None and isinstance(system, Ticketgate):
            postmaster = services.postmaster_pid()
            redis_pid = services.redis._proc.pid if services.redis._proc else 0
            self.parts["postgres"] = lambda: tree_cpu(postmaster)
            self.parts["redis"] = lambda: tree_cpu(redis_pid)
        self.parts["client"] = self_cpu
        self.parts["machine"] = machine_busy
        self.begin: dict[str, float] = {}
        self.t0 = 0.0

    def start(self) -> None:
        self.t0 = time.time()
        self.begin = {name: read() for name, read in self.parts.items()}

    def stop(self) -> dict[str, float]:
        wall = time.time() - self.t0
        used = {name: round(read() - self.begin[name], 2) for name, read in self.parts.items()}
        ours = sum(v for k, v in used.items() if k != "machine")
        used["other_processes"] = round(max(0.0, used["machine"] - ours), 2)
        used["wall"] = round(wall, 2)
        return used


# --- statistics ---------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[rank]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def processed_times(conninfo: str) -> dict[int, tuple[str, float | None, float]]:
    """inbound id -> (state, processed_at, received_at) as epoch seconds."""
    return {k: (v["state"], v["processed"], v["received"]) for k, v in records(conninfo).items()}


def records(conninfo: str) -> dict[int, dict[str, Any]]:
    """inbound id -> state, times (epoch seconds), attempts and trace steps of every record."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute("SELECT id, state, processed_at, received_at, attempts, trace"
                            " FROM inbound_mails").fetchall()

    def epoch(value: dt.datetime | None) -> float | None:
        return None if value is None else value.replace(tzinfo=dt.UTC).timestamp()

    return {inbound_id: {"state": state, "processed": epoch(processed),
                         "received": epoch(received) or 0.0, "attempts": attempts,
                         "trace": trace}
            for inbound_id, state, processed, received, attempts, trace in rows}


def pg_counters(conninfo: str) -> dict[str, float]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        commits = conn.execute("SELECT xact_commit FROM pg_stat_database"
                               " WHERE datname = current_database()").fetchone()
        wal = conn.execute("SELECT wal_records, wal_bytes, wal_write, wal_sync"
                           " FROM pg_stat_wal").fetchone()
    assert commits is not None and wal is not None
    return {"xact_commit": commits[0], "wal_records": wal[0], "wal_bytes": float(wal[1]),
            "wal_write": wal[2], "wal_sync": wal[3]}


def wait_drained(conninfo: str, expected: int, timeout: float = DRAIN_TIMEOUT_S) -> bool:
    deadline = time.time() + timeout
    with psycopg.connect(conninfo, autocommit=True) as conn:
        while time.time() < deadline:
            row = conn.execute("SELECT count(*) FILTER (WHERE processed_at IS NOT NULL),"
                               " count(*) FILTER (WHERE state = 'received')"
                               " FROM inbound_mails").fetchone()
            assert row is not None
            if row[0] >= expected and row[1] == 0:
                return True
            time.sleep(0.25)
    return False


def timeline(sent: list[Sent], done: dict[int, float], samples: list[dict[str, Any]],
             t0: float, step: float = 1.0) -> list[dict[str, Any]]:
    """Per ``step`` s: mails accepted, results committed, backlog (last sample in the bin)."""
    accepted: Counter[int] = Counter(int((s.t_reply - t0) // step) for s in sent if s.code == 250)
    committed: Counter[int] = Counter(int((t - t0) // step) for t in done.values())
    backlog: dict[int, int] = {}
    for sample in samples:
        if "backlog" in sample:
            backlog[int((sample["t"] - t0) // step)] = sample["backlog"]
    last = max([*accepted, *committed, *backlog, 0])
    return [{"t": round(i * step, 1), "accepted": accepted.get(i, 0),
             "committed": committed.get(i, 0), "backlog": backlog.get(i)}
            for i in range(last + 1)]


def summarize(system: System, sent: list[Sent], samples: list[dict[str, Any]],
              cpu: dict[str, float], hwm: dict[str, int], extra: dict[str, Any],
              kinds: dict[int, str] | None = None) -> dict[str, Any]:
    ok = [s for s in sent if s.code == 250]
    if not ok:
        raise RuntimeError(f"{system.name}: no mail accepted")
    t0 = min(s.t_start for s in sent)
    t_last = max(s.t_reply for s in ok)
    window = t_last - t0
    result: dict[str, Any] = {
        "system": system.name,
        "mails": len(sent),
        "accepted": len(ok),
        "refused": dict(Counter(f"{s.code} {s.reply[:40]}" for s in sent if s.code != 250)),
        "send_seconds": round(window, 2),
        "accepted_per_s": round(len(ok) / window, 1),
        "smtp_data_to_250_ms": {"p50": ms(pct([s.t_reply - s.t_data for s in ok], 50)),
                                "p99": ms(pct([s.t_reply - s.t_data for s in ok], 99))},
        "smtp_transaction_ms": {"p50": ms(pct([s.t_reply - s.t_start for s in ok], 50)),
                                "p99": ms(pct([s.t_reply - s.t_start for s in ok], 99))},
        "peak_rss_mb": {name: round(value / 2**20, 1) for name, value in hwm.items()},
        "sampled_rss_mb": {
            key[4:]: round(max(s.get(key, 0) for s in samples) / 2**20, 1)
            for key in (samples[0] if samples else {}) if key.startswith("rss_")},
        "cpu_seconds": cpu,
        "cpu_ms_per_mail": {k: round(v * 1000 / max(1, len(ok)), 2)
                            for k, v in cpu.items() if k not in ("wall",)},
        **extra,
    }
    if system.db_conninfo:
        times = processed_times(system.db_conninfo)
        done: dict[int, float] = {}
        latencies = []
        for s in ok:
            for inbound_id in s.inbound:
                _state, processed, _received = times.get(inbound_id, ("missing", None, 0.0))
                if processed is not None:
                    done[inbound_id] = processed
                    latencies.append(processed - s.t_reply)
        t_done = max(done.values(), default=t_last)
        slow = sorted(((processed - s.t_reply, s, inbound_id) for s in ok
                       for inbound_id in s.inbound
                       if (processed := done.get(inbound_id)) is not None),
                      key=lambda x: x[0], reverse=True)[:15]
        details = records(system.db_conninfo) if slow else {}
        result["slowest"] = [
            {"latency_ms": ms(lat), "index": s.index, "inbound": inbound_id,
             "kind": kinds.get(s.index, "?") if kinds else "?",
             "state": details[inbound_id]["state"], "attempts": details[inbound_id]["attempts"],
             "steps": [f"{t.get('step')}:{t.get('ms')}:{str(t.get('note', ''))[:60]}"
                       for t in (details[inbound_id]["trace"] or [])][:12]}
            for lat, s, inbound_id in slow]
        result["attempts"] = dict(Counter(d["attempts"] for d in details.values()))
        in_window = sum(1 for t in done.values() if t <= t_last)
        backlogs = [s["backlog"] for s in samples if "backlog" in s and t0 <= s["t"] <= t_last]
        result.update({
            "states": dict(Counter(state for state, _p, _r in times.values())),
            "committed": len(done),
            "committed_per_s_overall": round(len(done) / (t_done - t0), 1),
            "committed_per_s_while_sending": round(in_window / window, 1),
            "committed_while_sending_pct": round(100 * in_window / max(1, len(ok)), 1),
            "backlog_max": max(backlogs, default=None),
            "backlog_at_last_250": len(ok) - in_window,
            "drain_after_last_250_s": round(max(0.0, t_done - t_last), 2),
            "latency_250_to_committed_ms": {
                "p50": ms(pct(latencies, 50)), "p90": ms(pct(latencies, 90)),
                "p99": ms(pct(latencies, 99)), "max": ms(max(latencies, default=None)),
                "min": ms(min(latencies, default=None))},
            "timeline": timeline(ok, done, samples, t0),
        })
    return result


# --- phases -------------------------------------------------------------------------------------


@contextmanager
def profiled(system: System, outdir: Path, tag: str) -> Iterator[dict[str, Path]]:
    """py-spy record (raw collapsed stacks, on-CPU samples only) on listener and worker pids."""
    spies: list[subprocess.Popen[bytes]] = []
    files: dict[str, Path] = {}
    for name, proc in system.procs.items():
        out = outdir / f"{tag}-{name}.pyspy.txt"
        files[name] = out
        # --nonblocking: sampling without pausing the process (blocking at 200 Hz slowed the
        # listener several fold).
        argv = [PYSPY, "record", "--pid", str(proc.pid), "--rate", "100", "--format", "raw",
                "--nonblocking", "--idle", "--output", str(out)]
        if name == "worker":
            argv.append("--subprocesses")
        spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                      stderr=(outdir / f"{tag}-{name}.pyspy.log").open("wb")))
    time.sleep(2.0)  # let py-spy attach
    try:
        yield files
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()


def run_stream(system: System, services: Services, mails: list[Mail], clients: int,
               rate: float | None, label: str, profile_dir: Path | None = None
               ) -> dict[str, Any]:
    log(f"{label}: {len(mails)} mails, {clients} clients, "
        + (f"paced at {rate:.1f}/s" if rate else "unpaced") + f" -> {system.name}")
    pg_before = pg_counters(system.db_conninfo) if system.db_conninfo else None
    sampler = Sampler(system)
    meter = CpuMeter(system, services)
    quiet = wait_quiet(OPTIONS["quiet_wait"])
    with profiled(system, profile_dir, label) if profile_dir else nullcontext() as files:
        sampler.start()
        meter.start()
        sent = send_stream(system.port, mails, clients, rate)
        drained = True
        if system.db_conninfo:
            expected = sum(len(s.inbound) for s in sent if s.code == 250)
            drained = "worker" not in system.procs or wait_drained(system.db_conninfo, expected)
        cpu = meter.stop()
        time.sleep(0.3)
        samples = sampler.stop()
    hwm = {}
    for name, proc in system.procs.items():
        pids = [p.pid for p in proc.processes()]
        hwm[name] = max((vm_hwm(pid) for pid in pids), default=0)
    extra: dict[str, Any] = {"label": label, "clients": clients, "rate_target": rate,
                             "drained": drained, "machine_before": quiet}
    if pg_before is not None and system.db_conninfo:
        after = pg_counters(system.db_conninfo)
        extra["postgres"] = {k: after[k] - pg_before[k] for k in after}
    if files:
        extra["profile_files"] = {k: str(v) for k, v in files.items()}
    result = summarize(system, sent, samples, cpu, hwm, extra,
                       {i: m.kind for i, m in enumerate(mails)})
    log(f"{label}: accepted {result['accepted_per_s']}/s"
        + (f", committed {result['committed_per_s_while_sending']}/s while sending, "
           f"p50/p99 250->commit {result['latency_250_to_committed_ms']['p50']}/"
           f"{result['latency_250_to_committed_ms']['p99']} ms, backlog max "
           f"{result['backlog_max']}, drain {result['drain_after_last_250_s']} s"
           if system.db_conninfo else "")
        + f", peak RSS {result['peak_rss_mb']}")
    return result


def run_big(system: System, services: Services, count: int, size: int, label: str
            ) -> dict[str, Any]:
    """``count`` clients each send one ``size``-byte mail at the same moment."""
    log(f"{label}: {count} concurrent mails of {size / 2**20:.0f} MiB -> {system.name}")
    head0, body = big_mail(size, 0)
    sampler = Sampler(system, interval=0.05)
    meter = CpuMeter(system, services)
    quiet = wait_quiet(OPTIONS["quiet_wait"])
    barrier = threading.Barrier(count)
    results: list[Sent] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        head = head0 if index == 0 else big_mail_head(head0, index)
        conn: smtplib.SMTP | None = None
        try:
            conn = smtplib.SMTP("127.0.0.1", system.port, local_hostname="bench-big.example",
                                timeout=600)
            conn.ehlo()
            barrier.wait(timeout=120)
            t_start = time.time()
            code, reply = conn.mail("james@globex.example", [f"SIZE={len(head) + len(body)}"])
            if code == 250:
                code, reply = conn.rcpt(SUPPORT)
            t_data = time.time()
            if code == 250:
                conn.putcmd("data")
                code, reply = conn.getreply()
                if code == 354:
                    conn.sock.sendall(head)  # the body has no line starting with "."
                    conn.sock.sendall(body)
                    conn.sock.sendall(b".\r\n")
                    code, reply = conn.getreply()
            text = reply.decode("utf-8", "replace")
            match = INBOUND_RE.search(text)
            with lock:
                results.append(Sent(index, t_start, t_data, time.time(), code, text,
                                    [int(x) for x in match.group(1).split(",")]
                                    if match else []))
            conn.quit()
        except (smtplib.SMTPException, OSError, threading.BrokenBarrierError) as exc:
            barrier.abort()  # the others must not wait for this one
            with lock:
                results.append(Sent(index, 0.0, 0.0, time.time(), 0, repr(exc)))
            if conn is not None:
                with suppress(Exception):
                    conn.close()

    sampler.start()
    meter.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    t_sent = time.time()
    drained = True
    if system.db_conninfo:
        expected = sum(len(s.inbound) for s in results if s.code == 250)
        drained = wait_drained(system.db_conninfo, expected)
    cpu = meter.stop()
    samples = sampler.stop()
    hwm = {name: max((vm_hwm(p.pid) for p in proc.processes()), default=0)
           for name, proc in system.procs.items()}
    ok = [s for s in results if s.code == 250]
    out: dict[str, Any] = {
        "system": system.name, "label": label, "mails": count, "mail_bytes": len(head0) + len(body),
        "accepted": len(ok),
        "refused": dict(Counter(f"{s.code} {s.reply[:60]}" for s in results if s.code != 250)),
        "all_accepted_after_s": round(t_sent - min((s.t_start for s in ok), default=t_sent), 2),
        "smtp_transaction_s": {"p50": round(pct([s.t_reply - s.t_start for s in ok], 50) or 0, 2),
                               "max": round(max((s.t_reply - s.t_start for s in ok),
                                                default=0), 2)},
        "peak_rss_mb": {name: round(v / 2**20, 1) for name, v in hwm.items()},
        "sampled_rss_mb": {
            key[4:]: round(max(s.get(key, 0) for s in samples) / 2**20, 1)
            for key in (samples[0] if samples else {}) if key.startswith("rss_")},
        "cpu_seconds": cpu, "drained": drained, "machine_before": quiet,
        "rss_over_time_mb": [
            {"t": round(s["t"] - samples[0]["t"], 2),
             "listener": round(s.get("rss_listener", 0) / 2**20, 1)}
            for s in samples[:: max(1, len(samples) // 60)]],
    }
    if system.db_conninfo:
        out["states"] = dict(Counter(st for st, _p, _r in
                                     processed_times(system.db_conninfo).values()))
    log(f"{label}: accepted {len(ok)}/{count}, listener peak RSS "
        f"{out['peak_rss_mb'].get('listener')} MB, refused {out['refused']}")
    return out


def big_mail_head(head0: bytes, index: int) -> bytes:
    return re.sub(rb"Message-ID: <big-0-", f"Message-ID: <big-{index}-".encode(), head0).replace(
        b"Quarterly export 0 ", f"Quarterly export {index} ".encode())


# --- profile summary ----------------------------------------------------------------------------

# (bucket, regex on one frame "Func (path/file.py)").  A sample goes to the first bucket in
# this order that matches any frame of its stack, so specific buckets come before general ones.
BUCKETS: list[tuple[str, str]] = [
    ("startup: Ingestor per process (migrate, reference sync)", r"^Ingestor\.__init__ "),
    ("listener: backlog COUNT (handle_MAIL)", r"^Ingestor\.backlog "),
    ("listener: spool record build (sha256, header parse)", r"^new_inbound \(ingest/spool"),
    ("listener: spool INSERT + COMMIT", r"^store_all \(ingest/spool"),
    ("listener: Celery publish (apply_async -> Redis)", r"^enqueue \(workers/celery_app"),
    ("logging", r"^(Logger\._log|Logger\.handle|Handler\.handle|StreamHandler\.emit) "),
    ("listener: Received header, envelope", r"^SpoolingHandler\.(handle_DATA|_received_header) "),
    ("listener: aiosmtpd DATA (line reading)", r"^SMTP\.smtp_DATA \(aiosmtpd"),
    ("listener: aiosmtpd other commands and replies", r"^SMTP\._handle_client \(aiosmtpd"),
    ("listener: asyncio loop / thread hand-offs", r"^(BaseEventLoop\._run_once|_worker) "),
    ("pipeline: dedupe", r"^drop_duplicate "),
    ("pipeline: size limit", r"^enforce_size "),
    ("pipeline: parse (mail-parser, charsets, HTML)", r"^parse \(ingest/steps/parsing"),
    ("pipeline: classify (loops, auto-replies, bulk)", r"^classify \(ingest/steps/classify"),
    ("pipeline: threading", r"^find_ticket "),
    ("pipeline: automail", r"^stop_unreferenced_automatic_mail "),
    ("pipeline: routing", r"^route \(ingest/steps/routing"),
    ("pipeline: sender / person / company", r"^identify_sender "),
    ("pipeline: visible_reply (quote stripping)", r"^visible_reply "),
    ("pipeline: store ticket rows (ORM)", r"^store_ticket "),
    ("pipeline: record outcome", r"^record_outcome "),
    ("pipeline: final flush + COMMIT", r"^(Session\.commit|Session\.flush) "),
    ("pipeline: load row FOR UPDATE", r"^Session\.get "),
    ("pipeline: other", r"^process_inbound \(ingest/pipeline"),
    ("worker: Celery/kombu (receive, ack, trace)", r"\((celery|kombu|billiard)/"),
]


# Leaf frames where a thread waits rather than runs.  py-spy's own idle detection misses
# most of them (C-level waits), so samples are classified here by their innermost frame.
IDLE_LEAVES = re.compile(
    r"^(_worker \(concurrent/futures/thread|EpollSelector\.select |_epoll\.poll |"
    r"Connection\._recv \(billiard|Condition\.wait |Event\.wait |Thread\.join |sleep )")
WAIT_LEAVES = {
    "waiting for PostgreSQL (round trips, COMMIT fsync, row locks)":
        re.compile(r"^Connection\.wait \(psycopg"),
    "waiting for Redis": re.compile(r"^SocketBuffer\._read_from_socket \(redis"),
}


def summarize_profile(path: Path) -> dict[str, Any]:
    """py-spy raw output (collapsed stacks) -> where the busy time goes.

    ``cpu_pct``: samples running Python or C code, per bucket.  ``busy_pct``: the same plus
    samples waiting for PostgreSQL or Redis, i.e. the wall time of work in progress (for a
    worker process, which handles one mail at a time, the latency of a task).  Samples of idle
    threads (event loop in select, pool threads waiting for work) are counted apart."""
    if not path.exists():
        return {"error": f"{path} missing"}
    compiled = [(name, re.compile(pattern)) for name, pattern in BUCKETS]
    cpu: Counter[str] = Counter()
    busy: Counter[str] = Counter()
    waits: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    idle = total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")
                  if not f.startswith(("thread (", "process "))]
        leaf = frames[-1] if frames else "?"
        total += count
        if IDLE_LEAVES.match(leaf):
            idle += count
            continue
        bucket = next((name for name, rx in compiled if any(rx.search(f) for f in frames)),
                      "other")
        busy[bucket] += count
        wait = next((name for name, rx in WAIT_LEAVES.items() if rx.match(leaf)), None)
        if wait:
            waits[wait] += count
        else:
            cpu[bucket] += count
            leaves[leaf] += count

    def shares(counter: Counter[str], limit: int | None = None) -> dict[str, float]:
        whole = max(1, sum(counter.values()))
        return {k: round(100 * v / whole, 1) for k, v in counter.most_common(limit)}

    return {"samples": total, "idle_samples": idle, "cpu_samples": sum(cpu.values()),
            "cpu_pct": shares(cpu), "busy_pct": shares(busy),
            "busy_waiting_pct": {k: round(100 * v / max(1, sum(busy.values())), 1)
                                 for k, v in waits.items()},
            "top_cpu_leaf_functions_pct": shares(leaves, 15)}


def _short(frame: str) -> str:
    """'Func (/long/path/site-packages/pkg/mod.py:123)' -> 'Func (pkg/mod.py)'."""
    name, _, where = frame.rpartition(" (")
    if not name:
        return frame
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})"


# --- per-stage costs, in-process ------------------------------------------------------------------


class StageClock:
    """Thread CPU time and wall time per stage, nested stages subtracted from their parent."""

    def __init__(self) -> None:
        self.cpu: Counter[str] = Counter()
        self.wall: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._stack: list[list[float]] = []  # [cpu_start, wall_start, child_cpu, child_wall]
        self._names: list[str] = []

    def wrap(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        """A timed ``func``.  A name starting with "/" is recorded under the enclosing stage
        (e.g. "/ COMMIT" inside "spool: INSERT + COMMIT")."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            label = name
            if name.startswith("/") and self._stack:
                label = f"{self._names[-1]} {name}"
            frame = [time.thread_time(), time.perf_counter(), 0.0, 0.0]
            self._stack.append(frame)
            self._names.append(label)
            try:
                return func(*args, **kwargs)
            finally:
                self._stack.pop()
                self._names.pop()
                cpu = time.thread_time() - frame[0]
                wall = time.perf_counter() - frame[1]
                self.cpu[label] += cpu - frame[2]
                self.wall[label] += wall - frame[3]
                self.calls[label] += 1
                if self._stack:
                    self._stack[-1][2] += cpu
                    self._stack[-1][3] += wall

        timed.__name__ = getattr(func, "__name__", name)
        return timed

    def table(self, mails: int) -> dict[str, dict[str, float]]:
        return {name: {"cpu_ms": round(self.cpu[name] * 1000 / mails, 3),
                       "wall_ms": round(self.wall[name] * 1000 / mails, 3),
                       "calls_per_mail": round(self.calls[name] / mails, 2)}
                for name, _ in self.wall.most_common()}


WARMUP_MAILS = 30


def run_stages(services: Services, workdir: Path, mails: list[Mail]) -> dict[str, Any]:
    """Spool, publish and process ``mails`` one by one in this process, timing each stage in
    thread CPU time (not inflated by other processes' load) and wall time (which is)."""
    url = services.new_database("tg_stages")
    config = workdir / "stages.toml"
    config.write_text(bench_config(), encoding="utf-8")
    os.environ.update(TICKETGATE_CONFIG=str(config), TICKETGATE_DATABASE_URL=url,
                      TICKETGATE_BROKER_URL=services.redis.url)
    from sqlalchemy.orm import Session

    from ingest import pipeline, spool
    from ingest.service import Ingestor
    from workers import celery_app, runtime

    ingestor = runtime.ingestor()
    assert isinstance(ingestor, Ingestor)
    warm, mails = mails[:WARMUP_MAILS], mails[WARMUP_MAILS:]
    for mail in warm:  # first calls: imports, connections, statement caches
        ingestor.backlog()
        celery_app.enqueue(ingestor.receive_many(mail.raw, [1], "smtp", "bench", None))
    for inbound_id in range(1, len(warm) + 1):
        with suppress(Exception):
            ingestor.process(inbound_id)
    clock = StageClock()
    originals: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)
        originals.append((owner, attribute, original))
        setattr(owner, attribute, clock.wrap(name, original))

    # spool side (what the listener does besides SMTP itself)
    patch(spool, "new_inbound", "spool: build record (sha256, Message-ID)")
    patch(ingestor, "receive_many", "spool: INSERT + COMMIT")
    patch(ingestor, "backlog", "listener: backlog COUNT")
    # worker side
    originals.append((pipeline, "STEPS", pipeline.STEPS))
    pipeline.STEPS = tuple(clock.wrap(f"step: {getattr(step, '__name__', step)}", step)
                           for step in pipeline.STEPS)
    for attribute in ("store_ticket", "visible_reply", "record_outcome", "_start_attempt",
                      "quarantine"):
        if hasattr(pipeline, attribute):
            patch(pipeline, attribute, f"step: {attribute}")
    patch(Session, "commit", "/ flush + COMMIT")
    patch(ingestor, "process", "worker: process() (row lock, flush, result)")
    try:
        ids: list[int] = []
        publish = clock.wrap("listener: Celery publish (apply_async)", celery_app.enqueue)
        for mail in mails:
            ingestor.backlog()
            new_ids = ingestor.receive_many(mail.raw, [1], "smtp", "bench", None)
            publish(new_ids)
            ids.extend(new_ids)
        for inbound_id in ids:
            try:
                ingestor.process(inbound_id)
            except Exception as exc:  # ParentPending cannot happen in order; report others
                log(f"stages: inbound {inbound_id}: {exc!r}")
    finally:
        for owner, attribute, original in reversed(originals):
            setattr(owner, attribute, original)
        services.flush_redis()  # the published tasks are not for anyone
    table = clock.table(len(mails))
    listener = sum(v["cpu_ms"] for k, v in table.items() if k.startswith(("spool", "listener")))
    worker = sum(v["cpu_ms"] for k, v in table.items()
                 if not k.startswith(("spool", "listener")))

    log(f"stages: listener-side {listener:.2f} ms CPU/mail, worker-side {worker:.2f} ms CPU/mail")
    return {"mails": len(mails), "stages": table,
            "listener_side_cpu_ms": round(listener, 2), "worker_side_cpu_ms": round(worker, 2)}


# --- markdown -----------------------------------------------------------------------------------


def parser_alone(mails: list[Mail]) -> dict[str, float]:
    """CPU per mail of mail-parser alone (``parse_from_bytes``) on the run's own mails, in this
    process: the least any worker built on it spends, against which ``budget`` sets the rest."""
    import mailparser

    for mail in mails[:WARMUP_MAILS]:
        mailparser.parse_from_bytes(mail.raw)
    best = math.inf
    for _ in range(3):  # the least of three: other processes only ever add to it
        started = time.process_time()
        for mail in mails:
            mailparser.parse_from_bytes(mail.raw)
        best = min(best, time.process_time() - started)
    return {"mailparser_cpu_ms_per_mail": round(1000 * best / len(mails), 3)}


def budget(report: dict[str, Any]) -> dict[str, Any] | None:
    """The machine's CPU per mail that accepting at 60% of the bare fsync'd rate leaves, if the
    workers are to keep pace with it, beside what this run measured.

    At a steady state the machine spends (CPU per mail) x (mails per second) of its cores'
    time, so keeping pace at ``rate`` needs at most ``cores / rate`` per mail for everything:
    the benchmark's own client, the listener, the workers and the database.  The floor of any
    design is the bare handler's own cost (client and listener) plus mail-parser's parse."""
    runs = report.get("runs", {})
    ours, fsync = runs.get("peak_ticketgate"), runs.get("peak_bare-fsync")
    parse = report.get("parser_alone", {}).get("mailparser_cpu_ms_per_mail")
    if not ours or not fsync or parse is None:
        return None
    cores = report["cpus"]
    rate = 0.6 * fsync["accepted_per_s"]
    allowed = 1000 * cores / rate
    bare = fsync["cpu_ms_per_mail"]
    bare_cost = bare["listener"] + bare.get("client", 0.0)
    spent = ours["cpu_ms_per_mail"]
    return {
        "cores": cores, "rate_60pct_of_bare_fsync": round(rate, 1),
        "machine_cpu_ms_per_mail_allowed": round(allowed, 2),
        "bare_fsync_listener_and_client_ms": round(bare_cost, 2),
        "mailparser_alone_ms": parse,
        "left_for_spool_worker_and_database_ms": round(allowed - bare_cost - parse, 2),
        "ticketgate_machine_ms": spent["machine"],
        "ticketgate_ms": {k: v for k, v in spent.items() if k != "machine"},
        "ticketgate_beyond_bare_and_parse_ms": round(spent["machine"] - bare_cost - parse, 2),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = ["| run | accepted/s | committed/s while sending | backlog max / at last 250 | "
             "drain after last 250 | 250->committed p50 / p99 | DATA->250 p50 / p99 | "
             "peak RSS listener / worker |", "|---|---|---|---|---|---|---|---|"]
    for key in ("peak_bare-list", "peak_bare-fsync", "peak_ticketgate-listener-only",
                "peak_ticketgate", "half_ticketgate", "sustain_ticketgate"):
        r = report.get("runs", {}).get(key)
        if not r:
            continue
        lat = r.get("latency_250_to_committed_ms", {})
        rss = r["peak_rss_mb"]
        lines.append(
            f"| {key} | {r['accepted_per_s']} | {r.get('committed_per_s_while_sending', '-')} | "
            f"{r.get('backlog_max', '-')} / {r.get('backlog_at_last_250', '-')} | "
            f"{r.get('drain_after_last_250_s', '-')} s | {lat.get('p50', '-')} / "
            f"{lat.get('p99', '-')} ms | {r['smtp_data_to_250_ms']['p50']} / "
            f"{r['smtp_data_to_250_ms']['p99']} ms | {rss.get('listener')} / "
            f"{rss.get('worker', '-')} MB |")
    ratios = report.get("ratios", {})
    if ratios:
        lines += ["", "Ratios ours/bare: " + ", ".join(f"{k} {v}" for k, v in ratios.items())]
    for key, r in report.get("big", {}).items():
        lines.append(f"\n{key}: {r['accepted']}/{r['mails']} accepted in "
                     f"{r['all_accepted_after_s']} s, listener peak RSS "
                     f"{r['peak_rss_mb'].get('listener')} MB")
    accept = report.get("accept", {})
    if accept.get("rounds"):
        lines += ["", "| round | bare-fsync accepted/s | listener alone accepted/s | ratio |"
                  + (" listener (compare tree) | ratio |" if accept.get("compare_code_dir")
                     else ""),
                  "|---|---|---|---|" + ("---|---|" if accept.get("compare_code_dir") else "")]
        for i, r in enumerate(accept["rounds"]):
            extra = (f" {r['listener-compare']['accepted_per_s']} | {r['ratio_compare']} |"
                     if "listener-compare" in r else "")
            lines.append(f"| {i} | {r['bare-fsync']['accepted_per_s']} | "
                         f"{r['listener']['accepted_per_s']} | {r['ratio']} |{extra}")
    cpu = budget(report)
    if cpu:
        lines += ["", f"CPU budget: keeping pace at 60% of the bare fsync'd rate "
                  f"({cpu['rate_60pct_of_bare_fsync']}/s) on {cpu['cores']} cores allows "
                  f"{cpu['machine_cpu_ms_per_mail_allowed']} ms of machine CPU per mail; the bare "
                  f"handler and its client take {cpu['bare_fsync_listener_and_client_ms']} ms, "
                  f"mail-parser alone {cpu['mailparser_alone_ms']} ms, leaving "
                  f"{cpu['left_for_spool_worker_and_database_ms']} ms for the spool, the worker's "
                  f"other work and the database. ticketgate spent "
                  f"{cpu['ticketgate_machine_ms']} ms at its peak "
                  f"({cpu['ticketgate_beyond_bare_and_parse_ms']} ms beyond the bare handler and "
                  f"the parse)."]
    targets = report.get("targets", {})
    if targets:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {k} | {v['value']} | {'yes' if v['met'] else 'NO'} |"
                  for k, v in targets.items()]
    return "\n".join(lines) + "\n"


def targets(report: dict[str, Any]) -> dict[str, Any]:
    runs, big = report.get("runs", {}), report.get("big", {})
    out: dict[str, Any] = {}
    ours, fsync = runs.get("peak_ticketgate"), runs.get("peak_bare-fsync")
    if ours and fsync:
        ratio = ours["accepted_per_s"] / fsync["accepted_per_s"]
        out["accepted rate >= 60% of fsync'd bare"] = {"value": f"{100 * ratio:.0f}%",
                                                        "met": ratio >= 0.6}
    accept = report.get("accept", {})
    if accept.get("median_ratio"):
        out["(listener alone, paired rounds) accepted rate >= 60% of fsync'd bare"] = {
            "value": f"median {100 * accept['median_ratio']:.0f}% of "
                     f"{len(accept['rounds'])} rounds "
                     f"({', '.join(str(round(100 * r['ratio'])) + '%' for r in accept['rounds'])})",
            "met": accept["median_ratio"] >= 0.6}
    alone = runs.get("peak_ticketgate-listener-only")
    if alone and fsync:
        ratio = alone["accepted_per_s"] / fsync["accepted_per_s"]
        out["(listener alone, no worker) accepted rate >= 60% of fsync'd bare"] = {
            "value": f"{100 * ratio:.0f}%", "met": ratio >= 0.6}
    if ours:
        keeps = (ours["committed_while_sending_pct"] >= 90
                 and ours["drain_after_last_250_s"] <= max(2.0, 0.05 * ours["send_seconds"]))
        out["committed keeps pace (>=90% committed while sending, drain <= 5% of run)"] = {
            "value": f"{ours['committed_while_sending_pct']}% while sending, drain "
                     f"{ours['drain_after_last_250_s']} s of {ours['send_seconds']} s",
            "met": keeps}
    half = runs.get("half_ticketgate")
    if half:
        p99 = half["latency_250_to_committed_ms"]["p99"] or 1e9
        out["p99 250->committed < 1 s at half peak rate"] = {"value": f"{p99} ms",
                                                               "met": p99 < 1000}
    big_ours = big.get("big_ticketgate")
    if big_ours:
        rss = big_ours["peak_rss_mb"]["listener"]
        out["listener RSS < 150 MB, 50 x 20 MB concurrent"] = {
            "value": f"{rss} MB ({big_ours['accepted']}/{big_ours['mails']} accepted)",
            "met": rss < 150 and big_ours["accepted"] == big_ours["mails"]}
    return out


# --- main ---------------------------------------------------------------------------------------


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="mails per stream run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes")
    parser.add_argument("--pool", default="prefork")
    parser.add_argument("--phases", default="peak,accept,half,sustain,stages,profile,big",
                        help="comma list of: peak, accept, half, sustain, stages, profile, big")
    parser.add_argument("--systems",
                        default="bare-list,bare-fsync,ticketgate-listener-only,ticketgate")
    parser.add_argument("--half-rate", type=float, help="mails/s for 'half' (default: half of "
                        "ticketgate's peak accepted rate, measured in 'peak')")
    parser.add_argument("--accept-rounds", type=int, default=3)
    parser.add_argument("--accept-n", type=int, default=1000)
    parser.add_argument("--compare-code-dir", type=Path,
                        help="'accept' also runs the listener from this tree (before/after)")
    parser.add_argument("--profile-rate", type=float, help="mails/s for 'profile' (default: "
                        "as fast as the server answers)")
    parser.add_argument("--sustain-rate", type=float, help="mails/s for 'sustain' (default: "
                        "80%% of the committed/s measured in 'peak')")
    parser.add_argument("--sustain-n", type=int, default=800)
    parser.add_argument("--stages-n", type=int, default=500)
    parser.add_argument("--big-count", type=int, default=50)
    parser.add_argument("--big-mb", type=float, default=20.0)
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--code-dir", type=Path, default=REPO,
                        help="run ticketgate from this tree (e.g. a copy with a change undone)")
    parser.add_argument("--quiet-wait", type=float, default=OPTIONS["quiet_wait"],
                        help="seconds to wait for an idle machine before each run")
    args = parser.parse_args(argv)
    OPTIONS["quiet_wait"] = args.quiet_wait
    CODE_DIR["path"] = args.code_dir.resolve()
    phases = set(args.phases.split(","))
    systems = args.systems.split(",")

    # Stop cleanly (servers stopped, partial results saved) on SIGTERM and on SIGINT, which a
    # shell leaves ignored for background jobs.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="smtp-bench-"))
    stream_phases = phases & {"peak", "accept", "half", "sustain", "stages", "profile"}
    log(f"work dir {workdir}" + (f"; generating {args.n} mails" if stream_phases else ""))
    mails = load_mails(args.n) if stream_phases else []
    report: dict[str, Any] = {
        "tag": args.tag, "n": args.n, "clients": args.clients, "code_dir": str(args.code_dir),
        "worker_concurrency": args.concurrency, "worker_pool": args.pool,
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "mail_bytes_total": sum(len(m.raw) for m in mails),
        "phases": sorted(phases),
        "mail_kinds": dict(Counter(m.kind for m in mails)),
        "runs": {}, "big": {}, "profiles": {},
    }
    out_json = RESULTS / f"smtp_bench-{args.tag}.json"

    def save() -> None:
        report["targets"] = targets(report)
        report["cpu_budget"] = budget(report)
        out_json.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
        (RESULTS / f"smtp_bench-{args.tag}.md").write_text(markdown(report), encoding="utf-8")

    services = Services()
    report["postgres"] = services.pg_version
    system: System | None = None
    try:
        def tg(db: str) -> Ticketgate:
            return Ticketgate(services, workdir, db, args.concurrency, args.pool)

        def make(name: str, tag: str) -> System:
            if name == "ticketgate":
                return tg(f"tg_{tag}")
            if name == "ticketgate-listener-only":
                return Ticketgate(services, workdir, f"tgl_{tag}", args.concurrency, worker=False)
            return Bare(name.removeprefix("bare-"), workdir, tag)

        if "peak" in phases:
            for name in systems:
                system = make(name, "peak")
                report["runs"][f"peak_{name}"] = run_stream(
                    system, services, mails, args.clients, None, f"peak_{name}")
                system.stop()
                system = None
                save()
            report["parser_alone"] = parser_alone(mails)
            save()
            peak = report["runs"]
            for ours_name, bare in itertools.product(("ticketgate", "ticketgate-listener-only"),
                                                     ("bare-list", "bare-fsync")):
                ours, base = peak.get(f"peak_{ours_name}"), peak.get(f"peak_{bare}")
                if not ours or not base:
                    continue
                ratios = report.setdefault("ratios", {})
                ratios[f"{ours_name} accepted/s vs {bare}"] = round(
                    ours["accepted_per_s"] / base["accepted_per_s"], 3)
                ratios[f"{ours_name} DATA->250 p50 vs {bare}"] = round(
                    ours["smtp_data_to_250_ms"]["p50"]
                    / max(0.01, base["smtp_data_to_250_ms"]["p50"]), 2)
                ratios[f"{ours_name} listener CPU/mail vs {bare}"] = round(
                    ours["cpu_ms_per_mail"]["listener"]
                    / max(0.01, base["cpu_ms_per_mail"]["listener"]), 2)
                ratios[f"{ours_name} listener RSS vs {bare}"] = round(
                    ours["peak_rss_mb"]["listener"] / base["peak_rss_mb"]["listener"], 2)
        if "accept" in phases:
            # Acceptance alone, bare fsync'd handler and listener (no worker) back to back, a
            # few times: on a shared machine only runs close in time compare.
            rounds: list[dict[str, Any]] = []
            accept_mails = mails[: args.accept_n]
            for round_no in range(args.accept_rounds):
                entry: dict[str, Any] = {}
                contenders: list[tuple[str, Callable[[], System]]] = [
                    ("bare-fsync", lambda r=round_no: Bare("fsync", workdir, f"acc{r}")),
                    ("listener", lambda r=round_no: Ticketgate(
                        services, workdir, f"acc{r}", args.concurrency, worker=False))]
                if args.compare_code_dir:
                    contenders.append(("listener-compare", lambda r=round_no: Ticketgate(
                        services, workdir, f"accc{r}", args.concurrency, worker=False,
                        code_dir=args.compare_code_dir.resolve())))
                for key, build in contenders:
                    system = build()
                    run = run_stream(system, services, accept_mails, args.clients, None,
                                     f"accept{round_no}_{key}")
                    system.stop()
                    system = None
                    entry[key] = {k: run[k] for k in (
                        "accepted_per_s", "smtp_data_to_250_ms", "cpu_ms_per_mail",
                        "peak_rss_mb", "machine_before", "postgres") if k in run}
                entry["ratio"] = round(entry["listener"]["accepted_per_s"]
                                       / entry["bare-fsync"]["accepted_per_s"], 3)
                if "listener-compare" in entry:
                    entry["ratio_compare"] = round(
                        entry["listener-compare"]["accepted_per_s"]
                        / entry["bare-fsync"]["accepted_per_s"], 3)
                rounds.append(entry)
                report["accept"] = {"rounds": rounds, "mails": len(accept_mails),
                                    "compare_code_dir": str(args.compare_code_dir or "")}
                save()
            ratios = sorted(r["ratio"] for r in rounds)
            report["accept"]["median_ratio"] = ratios[len(ratios) // 2]
            if args.compare_code_dir:
                compare = sorted(r["ratio_compare"] for r in rounds)
                report["accept"]["median_ratio_compare"] = compare[len(compare) // 2]
            save()
        if "half" in phases:
            rate = args.half_rate or (
                report["runs"]["peak_ticketgate"]["accepted_per_s"] / 2
                if "peak_ticketgate" in report["runs"] else None)
            if not rate:
                raise SystemExit("--half-rate is needed without the ticketgate peak run")
            system = tg("tg_half")
            report["runs"]["half_ticketgate"] = run_stream(
                system, services, load_mails(args.n, seed=99), args.clients, rate,
                "half_ticketgate")
            system.stop()
            system = None
            save()
        if "sustain" in phases:
            # Paced below what the workers committed per second at peak: the latency of a
            # system that is not saturated (the half-peak rate may still be above that).
            peak_run = report["runs"].get("peak_ticketgate")
            rate = args.sustain_rate or (0.8 * peak_run["committed_per_s_overall"]
                                         if peak_run else None)
            if not rate:
                raise SystemExit("--sustain-rate is needed without the ticketgate peak run")
            system = tg("tg_sustain")
            report["runs"]["sustain_ticketgate"] = run_stream(
                system, services, load_mails(min(args.n, args.sustain_n), seed=7),
                args.clients, rate, "sustain_ticketgate")
            system.stop()
            system = None
            save()
        if "stages" in phases:
            report["stages"] = run_stages(services, workdir, mails[: args.stages_n])
            save()
        if "profile" in phases:
            system = tg("tg_profile")
            profile_dir = RESULTS / f"profile-{args.tag}"
            profile_dir.mkdir(exist_ok=True)
            run = run_stream(system, services, mails, args.clients, args.profile_rate,
                             "profile_ticketgate",
                             profile_dir=profile_dir)
            report["runs"]["profile_ticketgate"] = {k: v for k, v in run.items()
                                                    if k != "timeline"}
            system.stop()
            system = None
            for name, path in run.get("profile_files", {}).items():
                report["profiles"][name] = summarize_profile(Path(path))
            save()
        if "big" in phases:
            size = int(args.big_mb * 2**20)
            for name in systems:
                if name == "ticketgate-listener-only":
                    continue  # the memory test needs the listener once, with its worker
                system = make(name, "big")
                report["big"][f"big_{name}"] = run_big(system, services, args.big_count, size,
                                                       f"big_{name}")
                system.stop()
                system = None
                save()
    finally:
        if system is not None:
            system.stop()
        services.stop()
        save()
        with suppress(OSError):
            shutil.copytree(workdir / "logs", RESULTS / f"logs-{args.tag}", dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"results: {out_json}")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
