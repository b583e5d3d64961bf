"""Replay benchmark: the in-process pipeline against mail-parser's bare parse rate.

In one run, for the same list of mails, this measures

* the bare parse rate, ``mailparser.parse_from_bytes(raw)`` over all mails (best of 3 passes);
* the pipeline rate, ``Ingestor.ingest_many`` (what ``ticketgate replay`` runs) into a fresh
  database: spool insert, every step, the store, the final state and the commit of each batch of
  64 mails (one pass per database, fresh each time);

on two data sets (the shared corpus, and ``--n`` generated mails from ``bench/generate.py``) and
two databases (an SQLite file with the fsync settings of ``ingest/db.py``, and PostgreSQL), and
reports mails/s and the ratio pipeline/bare (the target is >= 40%).  A second, instrumented pass
per data set and database times every stage (wrappers around the steps, the flushes and the
commit, plus the time spent inside the database driver), and the generated set is run once more
under cProfile, grouped by pipeline step.

    python bench/replay_bench.py [--n 2000] [--pg-url URL]

Results go to bench/results/<timestamp>.json (and the log of the run beside it).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import email
import functools
import gc
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import generate  # bench/generate.py (this directory is sys.path[0] when run as a script)
import mailparser
from sqlalchemy import event
from sqlalchemy.engine import make_url

from ingest import parse as parse_module
from ingest import pipeline, spool
from ingest.config import load_settings
from ingest.errors import InvalidMail, TicketgateError
from ingest.prepare import default_helpers
from ingest.service import Ingestor, RecordedError
from ingest.sources import iter_mails

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CONFIG = BENCH_DIR / "bench.toml"
RESULTS = BENCH_DIR / "results"
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
TARGET_RATIO = 0.40
BARE_PASSES = 3
WARMUP_MAILS = 40
# Files in the corpus that are data about mails, not mails.
NOT_MAIL_SUFFIXES = {".json", ".md", ".py", ".pl", ".pm", ".rb", ".t", ".html", ".htm", ".yaml",
                     ".yml", ".toml", ".csv", ".sh", ".gpg", ".asc", ".pem", ".key"}  # fmt: skip
NOT_MAIL_NAMES = ("readme", "source.json", "license", "copying", "expectations")

log = logging.getLogger("bench")


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class DataSet:
    name: str
    mails: list[bytes]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(len(m) for m in self.mails)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for raw in self.mails:
            digest.update(hashlib.sha256(raw).digest())
        return digest.hexdigest()


def load_corpus(root: Path) -> DataSet:
    """Every mail under ``root`` that starts with a header line; mbox files are split."""
    mails: list[bytes] = []
    skipped: Counter[str] = Counter()
    per_folder: Counter[str] = Counter()
    for item in iter_mails([root]):
        path = Path(item.label.split("#", 1)[0])
        name = path.name.lower()
        if item.raw is None:
            skipped["unreadable"] += 1
            continue
        if path.suffix.lower() in NOT_MAIL_SUFFIXES or name.startswith(NOT_MAIL_NAMES):
            skipped[f"not mail ({path.suffix.lower() or name})"] += 1
            continue
        try:
            spool.check_rfc822(item.raw)
        except InvalidMail:
            skipped["no header line"] += 1
            continue
        mails.append(item.raw)
        relative = Path(item.label).relative_to(root) if item.label.startswith(str(root)) else path
        per_folder[relative.parts[0]] += 1
    info = {"root": str(root), "skipped": dict(skipped.most_common()),
            "per_folder": dict(per_folder.most_common())}
    return DataSet("corpus", mails, info)


def load_generated(n: int, seed: int) -> DataSet:
    mails = generate.generate(n, seed)
    info = generate.describe(mails)
    info["seed"] = seed
    return DataSet("generated", [m.raw for m in mails], info)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Linux can reset the high-water mark ru_maxrss reports (clear_refs 5, since 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return round(int(fh.read().split()[1]) * resource.getpagesize() / 2**20, 1)
    except (OSError, IndexError, ValueError):
        return 0.0


@contextmanager
def phase_memory(record: dict[str, Any]) -> Iterator[None]:
    """Peak RSS of the phase (``ru_maxrss`` after resetting the high-water mark), and the RSS
    it started from: the process holds every mail of both data sets, so the growth is the
    phase's own."""
    gc.collect()
    resettable = _reset_peak_rss()
    record["rss_start_mb"] = _rss_mb()
    try:
        yield
    finally:
        record["peak_rss_mb"] = _peak_rss_mb()
        growth = max(0.0, record["peak_rss_mb"] - record["rss_start_mb"])
        record["peak_rss_growth_mb"] = round(growth, 1)
        record["peak_rss_scope"] = "phase" if resettable else "process (not resettable)"


def wait_for_quiet(max_load: float | None, max_wait: float, record: dict[str, Any]) -> None:
    """On a shared machine: wait (up to ``max_wait`` s) until the 1-minute load average is
    below ``max_load`` before a timed phase, and record what was waited and found."""
    if max_load is None:
        return
    start = time.monotonic()
    while os.getloadavg()[0] >= max_load and time.monotonic() - start < max_wait:
        time.sleep(5)
    record["waited_for_load_s"] = round(time.monotonic() - start, 1)
    record["load_at_start"] = os.getloadavg()[0]


# --------------------------------------------------------------------------------------------
# Databases
# --------------------------------------------------------------------------------------------


class PostgresServer:
    """A database server to make fresh databases on: ``--pg-url``, or a throwaway local one
    started with the helpers of ``tests/services.py`` (the same way the test fixtures do)."""

    def __init__(self, url: str | None) -> None:
        self.given = url
        self.local: Any = None
        self.admin_url = url or ""
        self.version = ""

    def start(self) -> None:
        import psycopg
        from psycopg import sql

        if self.given is None:
            sys.path.insert(0, str(REPO))
            from tests import services

            bindir = services._find_pg_bindir()
            if bindir is None:
                raise SystemExit("PostgreSQL server binaries not found (/usr/lib/postgresql/*/"
                                 "bin/initdb): apt-get install postgresql, or pass --pg-url")
            self.local = services._LocalPostgres(bindir)
            self.local.prepare()
            self.local.initdb()
            self.local.start()
            with psycopg.connect(self.local.admin_conninfo("postgres"), autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(
                    sql.Identifier(services.PG_DATABASE)))
            self.admin_url = self.local.url(services.PG_DATABASE)
        with psycopg.connect(self._conninfo(self.admin_url)) as conn:
            row = conn.execute("SELECT version(), current_setting('fsync'), "
                               "current_setting('synchronous_commit')").fetchone()
            assert row is not None
            self.version = f"{row[0].split(',')[0]} (fsync={row[1]}, synchronous_commit={row[2]})"

    @staticmethod
    def _conninfo(url: str) -> str:
        return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)

    @contextmanager
    def fresh_database(self) -> Iterator[str]:
        import psycopg
        from psycopg import sql

        name = f"tg_bench_{uuid.uuid4().hex[:12]}"
        admin = self._conninfo(self.admin_url)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))

    def stop(self) -> None:
        if self.local is not None:
            try:
                self.local.stop()
            finally:
                self.local.remove()


@contextmanager
def fresh_sqlite() -> Iterator[str]:
    # On the same disk as the project (not a tmpfs), so fsync costs what it costs in production.
    directory = Path(tempfile.mkdtemp(prefix="ticketgate-bench-", dir=RESULTS))
    try:
        yield f"sqlite:///{directory / 'ticketgate.db'}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def bare_parse(mails: list[bytes], passes: int = BARE_PASSES) -> dict[str, Any]:
    rates, cpu_rates, failures = [], [], 0
    load_before = os.getloadavg()[0]
    for _ in range(passes):
        failures = 0
        cpu = time.process_time()
        start = time.perf_counter()
        for raw in mails:
            try:
                mailparser.parse_from_bytes(raw)
            except Exception:
                failures += 1
        rates.append(len(mails) / (time.perf_counter() - start))
        cpu_rates.append(len(mails) / max(time.process_time() - cpu, 1e-9))
    return {"rate": max(rates), "passes": [round(r, 1) for r in rates],
            "cpu_rate": max(cpu_rates), "failures": failures,
            "loadavg_1m": [load_before, os.getloadavg()[0]]}


def _percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)

    def at(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 2)

    return {"p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99),
            "max_ms": round(ordered[-1] * 1000, 2),
            "mean_ms": round(statistics.mean(ordered) * 1000, 2)}


def make_ingestor(url: str) -> Ingestor:
    return Ingestor(load_settings(CONFIG, database_url=url))


def _bare_chunk(mails: list[bytes], passes: int = BARE_PASSES) -> tuple[float, float]:
    """Best wall and CPU seconds of ``passes`` bare parses of ``mails``."""
    best_wall = best_cpu = float("inf")
    for _ in range(passes):
        cpu, start = time.process_time(), time.perf_counter()
        for raw in mails:
            with suppress(Exception):
                mailparser.parse_from_bytes(raw)
        best_wall = min(best_wall, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the parse helpers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_pipeline(ingestor: Ingestor, mails: list[bytes], interleave: int = 0,
                 helpers: int = 0) -> dict[str, Any]:
    """``Ingestor.ingest_many`` over every mail, as ``ticketgate replay`` runs it; the database is
    set up already (not timed).  A mail's latency runs until its batch is committed.

    ``helpers``: parse helper processes (:mod:`ingest.prepare`); their CPU time is counted in
    ``cpu_s``.  With ``interleave=K`` (only without helpers: they need one long stream), after
    every K mails the same K mails are also bare-parsed (best of 3, outside the pipeline's
    clock), which gives a bare rate measured under the same machine load as the pipeline, chunk
    by chunk: the ``interleaved`` ratio.
    """
    if helpers:
        interleave = 0
    actions: Counter[str] = Counter()
    latencies: list[float] = []
    clock = time.perf_counter
    load_before = os.getloadavg()[0]
    elapsed = cpu = bare_wall = bare_cpu = 0.0
    step = interleave or len(mails) or 1
    for first in range(0, len(mails), step):
        chunk = mails[first : first + step]
        cpu_start, start = _cpu_seconds(), clock()
        handed: list[float] = []

        def stream(chunk: list[bytes] = chunk, handed: list[float] = handed
                   ) -> Iterator[tuple[bytes, str]]:
            for raw in chunk:
                handed.append(clock())
                yield raw, ""

        try:
            for index, (_source, result) in enumerate(
                    ingestor.ingest_many(stream(), 1, parse_helpers=helpers)):
                info = result.info if isinstance(result, RecordedError) else result
                actions[info.Action] += 1
                latencies.append(clock() - handed[index])  # until its batch is committed
        except TicketgateError as exc:
            actions[f"error: {type(exc).__name__}"] += 1
        elapsed += clock() - start
        cpu += _cpu_seconds() - cpu_start
        if interleave:
            wall, cpu_time = _bare_chunk(chunk)
            bare_wall += wall
            bare_cpu += cpu_time
    result: dict[str, Any] = {
        "rate": len(mails) / elapsed, "elapsed_s": round(elapsed, 3),
        "cpu_s": round(cpu, 3), "cpu_rate": len(mails) / cpu if cpu else 0.0,
        "parse_helpers": helpers,
        "loadavg_1m": [load_before, os.getloadavg()[0]],
        "actions": dict(actions.most_common()), "latency": _percentiles(latencies),
    }
    if interleave:
        result["interleaved"] = {
            "chunk": interleave, "bare_rate": len(mails) / bare_wall,
            "ratio": bare_wall / elapsed, "cpu_ratio": bare_cpu / cpu if cpu else 0.0,
        }
    return result


def warm_up(mails: list[bytes]) -> None:
    """Imports, mapper configuration, regex compilation: paid once per process, not per mail."""
    with fresh_sqlite() as url:
        ingestor = make_ingestor(url)
        with suppress(TicketgateError):
            for _result in ingestor.ingest_many(((raw, "") for raw in mails), 1,
                                                parse_helpers=0):
                pass
        ingestor.close()


# --------------------------------------------------------------------------------------------
# Stage clock: where the pipeline's time goes, by wall clock
# --------------------------------------------------------------------------------------------

STEP_NAMES = {
    "drop_duplicate": "dedupe", "enforce_size": "limits", "parse": "parse", "classify": "classify",
    "find_ticket": "thread", "stop_unreferenced_automatic_mail": "automail",
    "identify_sender": "sender", "route": "route",
}  # fmt: skip


def stage_list() -> list[tuple[str, str]]:
    """Top-level stages of ``Ingestor.ingest`` in order; their times add up to the whole call."""
    steps = [STEP_NAMES.get(step.__name__, step.__name__) for step in pipeline.STEPS]
    return [
        ("new_inbound", "spool: sha256 + Message-ID header parse"),
        ("check_rfc822", "spool: header-line check"),
        ("flush", "spool: INSERT inbound (first flush)"),
        *((f"process.{name}", name) for name in steps),
        ("process.visible_reply", "reply (visible text)"), ("process.store", "store"),
        ("process.record_outcome", "outcome (TicketInfo, trace)"),
        ("process.flush", "outcome flush (UPDATE inbound)"),
        ("process.other", "process: rest"),
        ("commit", "commit"),
        ("other", "rest (session, context, logging)"),
    ]  # fmt: skip


class StageClock:
    """Wraps module attributes and session methods with timers for one instrumented pass.

    Times are inclusive; a stage nested in another is recorded under ``outer.inner`` (so
    ``process.sender.flush`` is the part of the sender step spent flushing).  Time inside the
    database driver (cursor.execute) is added to ``<stage>.db`` by engine events.
    """

    def __init__(self) -> None:
        self.totals: defaultdict[str, float] = defaultdict(float)
        self.counts: Counter[str] = Counter()
        self.stack: list[str] = []
        self._undo: list[Callable[[], None]] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        totals, counts, stack, clock = self.totals, self.counts, self.stack, time.perf_counter

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack.append(name)
            key = ".".join(stack)
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key] += clock() - start
                counts[key] += 1
                stack.pop()

        return timed

    def patch(self, owner: Any, attribute: str, name: str) -> None:
        original = vars(owner).get(attribute)
        current = getattr(owner, attribute)
        if isinstance(original, classmethod):
            setattr(owner, attribute, classmethod(self.wrap(name, original.__func__)))
        else:
            setattr(owner, attribute, self.wrap(name, current))
        if original is None:
            self._undo.append(lambda: delattr(owner, attribute))
        else:
            self._undo.append(lambda: setattr(owner, attribute, original))

    def install(self, ingestor: Ingestor) -> None:
        """Wrap what exists; ``ingest/`` is being worked on, so a missing name is skipped (and
        listed in ``missing``) rather than failing the run."""
        self.missing: list[str] = []
        targets = [
            (spool, "new_inbound", "new_inbound"), (spool, "check_rfc822", "check_rfc822"),
            (pipeline, "_process_in", "process"), (pipeline, "visible_reply", "visible_reply"),
            (pipeline, "store_ticket", "store"), (pipeline, "record_outcome", "record_outcome"),
            # Inside parse: the stdlib parser, mail-parser's MIME walk, and ingest's additions.
            (email, "message_from_bytes", "email"), (mailparser.MailParser, "parse", "mailparser"),
            (parse_module, "_walk_attachments", "_walk_attachments"),
            (parse_module, "sanitize_html", "sanitize_html"),
            (parse_module, "html_to_text", "html_to_text"),
            (parse_module, "decode_text", "decode_text"),
        ]  # fmt: skip
        session_class = ingestor.sessions.class_  # sessionmaker's own subclass: only ours
        targets += [(session_class, method, method) for method in ("flush", "commit", "close")]
        for owner, attribute, name in targets:
            if hasattr(owner, attribute):
                self.patch(owner, attribute, name)
            else:
                self.missing.append(f"{getattr(owner, '__name__', owner)}.{attribute}")
        steps = pipeline.STEPS
        pipeline.STEPS = tuple(self.wrap(STEP_NAMES.get(s.__name__, s.__name__), s) for s in steps)
        self._undo.append(lambda: setattr(pipeline, "STEPS", steps))
        self._listen(ingestor)

    def _listen(self, ingestor: Ingestor) -> None:
        totals, counts, stack, clock = self.totals, self.counts, self.stack, time.perf_counter
        engine = ingestor.engine

        def before(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
                   executemany: bool) -> None:
            conn.info["bench_start"] = clock()

        def after(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
                  executemany: bool) -> None:
            key = ".".join([*stack, "db"])
            totals[key] += clock() - conn.info.pop("bench_start", clock())
            counts[key] += 1

        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        self._undo.append(lambda: event.remove(engine, "before_cursor_execute", before))
        self._undo.append(lambda: event.remove(engine, "after_cursor_execute", after))

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def breakdown(self, mails: int, total: float) -> dict[str, Any]:
        """ms per mail for every recorded key, plus the derived top-level stages."""
        per_mail = {k: round(v * 1000 / mails, 3) for k, v in sorted(self.totals.items())}
        calls = {k: round(v / mails, 2) for k, v in sorted(self.counts.items())}
        t = self.totals
        process_children = sum(v for k, v in t.items() if k.count(".") == 1
                                and k.startswith("process.") and not k.endswith(".db"))
        stages = {
            key: t.get(key, 0.0) for key, _label in stage_list()
            if key not in ("process.other", "other")
        }
        stages["process.other"] = t.get("process", 0.0) - process_children
        stages["other"] = total - sum(t.get(k, 0.0) for k in
                                      ("new_inbound", "check_rfc822", "flush", "process", "commit"))
        return {
            "stages_ms_per_mail": {k: round(v * 1000 / mails, 3) for k, v in stages.items()},
            "db_ms_per_mail": round(sum(v for k, v in t.items() if k.endswith(".db")) * 1000
                                    / mails, 3),
            "statements_per_mail": round(sum(v for k, v in self.counts.items()
                                             if k.endswith(".db")) / mails, 2),
            "all_ms_per_mail": per_mail,
            "calls_per_mail": calls,
        }


def instrumented_pass(url: str, mails: list[bytes]) -> dict[str, Any]:
    ingestor = make_ingestor(url)
    clock = StageClock()
    clock.install(ingestor)
    try:
        result = run_pipeline(ingestor, mails)
    finally:
        clock.uninstall()
        ingestor.close()
    result["breakdown"] = clock.breakdown(len(mails), result["elapsed_s"])
    result["breakdown"]["not_instrumented"] = clock.missing
    return result


# --------------------------------------------------------------------------------------------
# cProfile, grouped by pipeline step
# --------------------------------------------------------------------------------------------

# (group, file suffix, function, only when called from (file suffix, function))
PROFILE_GROUPS = [
    ("spool", "ingest/spool.py", "new_inbound", None),
    ("spool", "ingest/spool.py", "check_rfc822", None),
    ("spool", "sqlalchemy/orm/session.py", "flush", ("ingest/pipeline.py", "process_new")),
    ("spool", "sqlalchemy/orm/session.py", "flush",
     ("ingest/pipeline.py", "process_new_batch")),
    ("dedupe", "ingest/steps/dedupe.py", "drop_duplicate", None),
    ("limits", "ingest/steps/limits.py", "enforce_size", None),
    ("parse", "ingest/steps/parsing.py", "parse", None),
    ("classify", "ingest/steps/classify.py", "classify", None),
    ("thread", "ingest/steps/threading.py", "find_ticket", None),
    ("automail", "ingest/steps/automail.py", "stop_unreferenced_automatic_mail", None),
    ("sender", "ingest/steps/sender.py", "identify_sender", None),
    ("route", "ingest/steps/routing.py", "route", None),
    ("reply", "ingest/reply.py", "visible_reply", None),
    ("store", "ingest/steps/store.py", "store_ticket", None),
    ("outcome", "ingest/pipeline.py", "record_outcome", None),
    ("outcome", "sqlalchemy/orm/session.py", "flush", ("ingest/pipeline.py", "_process_in")),
    ("commit", "sqlalchemy/orm/session.py", "commit", ("ingest/pipeline.py", "process_new")),
    ("commit", "sqlalchemy/orm/session.py", "commit",
     ("ingest/pipeline.py", "process_new_batch")),
]
PROFILE_TOTAL = ("ingest/service.py", "ingest_many")

Func = tuple[str, int, str]


def _matches(func: Func, suffix: str, name: str) -> bool:
    return func[2] == name and func[0].replace(os.sep, "/").endswith(suffix)


def _short(func: Func) -> str:
    path = func[0].replace(os.sep, "/")
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif path.startswith(str(REPO) + "/"):
        path = path[len(str(REPO)) + 1 :]
    else:
        path = re.sub(r"^.*/lib/python3\.\d+/", "", path)
    return f"{path}:{func[1]}({func[2]})" if func[1] else func[2]


def _package(func: Func) -> str:
    """Who owns the code: a site-packages distribution, the stdlib module, ingest, a builtin."""
    path = func[0].replace(os.sep, "/")
    if path == "~":  # a builtin: "<method 'execute' of 'sqlite3.Cursor' objects>"
        for marker in ("sqlite3", "psycopg", "re.Pattern", "nh3", "hashlib", "zlib"):
            if marker in func[2]:
                return f"{marker.split('.')[0]} (C)"
        return "builtins"
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if path.startswith(str(REPO) + "/"):
        return path[len(str(REPO)) + 1 :].split("/", 1)[0]
    match = re.search(r"/lib/python3\.\d+/([^/]+)", path)
    return f"stdlib {match.group(1).removesuffix('.py')}" if match else "other"


def grouped_profile(prof: cProfile.Profile, mails: int, per_group: int = 6,
                    top: int = 20) -> dict[str, Any]:
    """cProfile's table, grouped by pipeline step.

    A group's time is the cumulative time of its root function (the step, or a session flush or
    commit when called from a given place).  Functions below the roots (SQLAlchemy, the driver,
    the email package...) are shared out among the groups in proportion to the time their
    callers spent calling them (gprof's assumption), so each group lists what it spends on.
    """
    table: dict[Func, tuple[int, int, float, float, dict[Func, Any]]] = (
        pstats.Stats(prof).stats  # type: ignore[attr-defined]
    )
    total = next((v[3] for f, v in table.items() if _matches(f, *PROFILE_TOTAL)), 0.0)
    root_of: dict[Func, str] = {}
    edge_of: dict[tuple[Func, Func], str] = {}
    groups: defaultdict[str, float] = defaultdict(float)
    for group, suffix, name, caller in PROFILE_GROUPS:
        for func, (_cc, _nc, _tt, ct, callers) in table.items():
            if not _matches(func, suffix, name):
                continue
            if caller is None:
                root_of[func] = group
                groups[group] += ct
                continue
            for caller_func, caller_stats in callers.items():
                if _matches(caller_func, *caller):
                    edge_of[(func, caller_func)] = group
                    groups[group] += caller_stats[3]
    groups["other"] = total - sum(groups.values())

    # Fixed point of share[f] = sum over callers c of (time f spent when called by c) / (all
    # time of f) * share[c]; iterated, because the call graph has cycles (SQLAlchemy's wrappers).
    shares: dict[Func, dict[str, float]] = {f: {} for f in table}
    for func, group in root_of.items():
        shares[func] = {group: 1.0}
    inner = [f for f in table if f not in root_of and table[f][3] > 0]
    for _round in range(100):
        changed = 0.0
        for func in inner:
            cumulative = table[func][3]
            found: defaultdict[str, float] = defaultdict(float)
            for caller_func, caller_stats in table[func][4].items():
                weight = caller_stats[3] / cumulative
                if (func, caller_func) in edge_of:
                    found[edge_of[(func, caller_func)]] += weight
                elif caller_func != func:
                    for group, part in shares[caller_func].items():
                        found[group] += weight * part
            scale = sum(found.values())
            if scale > 1.0:  # recursion counts a call twice; a function is at most all of itself
                found = defaultdict(float, {g: v / scale for g, v in found.items()})
            old = shares[func]
            changed = max(changed, *(abs(found.get(g, 0.0) - old.get(g, 0.0))
                                     for g in {*found, *old}), 0.0)
            shares[func] = dict(found)
        if changed < 1e-4:
            break

    def ms(seconds: float) -> float:
        return round(seconds * 1000 / mails, 3)

    by_group: dict[str, Any] = {}
    for group in sorted(groups, key=lambda g: -groups[g]):
        if group == "other":
            continue
        rows, packages = [], defaultdict(float)
        for func, (_cc, nc, tt, ct, _callers) in table.items():
            part = shares[func].get(group, 0.0)
            if part <= 0:
                continue
            packages[_package(func)] += tt * part
            rows.append((ct * part, tt * part, nc * part, func))
        rows.sort(key=lambda r: r[0], reverse=True)
        by_group[group] = {
            "ms_per_mail": ms(groups[group]),
            "own_time_by_package": {k: ms(v) for k, v in
                                    sorted(packages.items(), key=lambda kv: -kv[1])[:6]},
            "top_cumulative": [
                {"function": _short(func), "cum_ms_per_mail": ms(ct), "own_ms_per_mail": ms(tt),
                 "calls_per_mail": round(nc / mails, 2)}
                for ct, tt, nc, func in rows[:per_group]
            ],
        }
    own = sorted(table.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return {
        "total_ms_per_mail": ms(total),
        "groups_ms_per_mail": {g: ms(v) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "groups": by_group,
        "top_own_time": [
            {"function": _short(func), "package": _package(func),
             "group": max(shares[func].items(), key=lambda kv: kv[1], default=("-", 0))[0],
             "own_ms_per_mail": ms(tt), "cum_ms_per_mail": ms(ct),
             "calls_per_mail": round(nc / mails, 2)}
            for func, (_cc, nc, tt, ct, _callers) in own
        ],
    }


def profile_pass(url: str, mails: list[bytes]) -> dict[str, Any]:
    ingestor = make_ingestor(url)
    prof = cProfile.Profile()
    try:
        prof.enable()
        result = run_pipeline(ingestor, mails)
        prof.disable()
    finally:
        ingestor.close()
    result["profile"] = grouped_profile(prof, len(mails))
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _source_state() -> dict[str, Any]:
    """Which code was measured: the commit, and a hash of ingest/ as it is on disk (it may be
    ahead of the commit)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "ingest").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    state: dict[str, Any] = {"ingest_sha256": digest.hexdigest()[:16]}
    try:
        state["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "ingest"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
        state["ingest_uncommitted_files"] = len(dirty)
    except (OSError, subprocess.CalledProcessError):
        pass
    return state


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform(),
           "cpus": str(os.cpu_count())}
    for dist in ("ticketgate", "mail-parser", "SQLAlchemy", "psycopg", "mail-parser-reply", "nh3",
                 "inscriptis", "pydantic"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def print_table(results: dict[str, Any]) -> None:
    print("\nratio = pipeline mails/s / bare parse mails/s (best of 3 whole passes); interleaved ="
          " the same with\nthe bare parse re-run on each chunk right after the pipeline "
          "(matched load); cpu = process CPU time")
    print(f"{'data set':<10} {'database':<11} {'mails':>6} {'bare/s':>8} {'pipeline/s':>10} "
          f"{'ratio':>7} {'≥40%':>5} {'interl.':>8} {'cpu':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'RSS MB (+phase)':>16}")
    for name, data in results["datasets"].items():
        bare = data["bare"]
        for db, run in data["pipeline"].items():
            ok = "yes" if run["ratio"] >= TARGET_RATIO else "NO"
            latency = run["latency"]
            interleaved = run.get("interleaved", {}).get("ratio")
            shown = f"{interleaved:>8.1%}" if interleaved is not None else f"{'-':>8}"
            print(f"{name:<10} {db:<11} {data['mails']:>6} {bare['rate']:>8.1f} "
                  f"{run['rate']:>10.1f} {run['ratio']:>7.1%} {ok:>5} {shown} "
                  f"{run['cpu_ratio']:>7.1%} {latency['p50_ms']:>7.2f} {latency['p99_ms']:>7.2f} "
                  f"{_rss(run):>16}")
        print(f"{name:<10} {'bare parse':<11} {data['mails']:>6} {bare['rate']:>8.1f} "
              f"{'':>10} {'':>7} {'':>5} {'':>8} {'':>7} {'':>7} {'':>7} {_rss(bare):>16}")


def _rss(record: dict[str, Any]) -> str:
    return f"{record['peak_rss_mb']:.0f} (+{record['peak_rss_growth_mb']:.0f})"


def print_breakdown(results: dict[str, Any]) -> None:
    columns = [(name, db, run["instrumented"]["breakdown"])
               for name, data in results["datasets"].items()
               for db, run in data["pipeline"].items() if "instrumented" in run]
    if not columns:
        return
    print("\nWhere the time goes (instrumented pass, ms per mail, wall clock):")
    header = f"{'stage':<40}" + "".join(f"{(n[:4] + '/' + d[:6]):>14}" for n, d, _ in columns)
    print(header)
    for key, label in stage_list():
        row = f"{label:<40}"
        for _n, _d, b in columns:
            row += f"{b['stages_ms_per_mail'].get(key, 0.0):>14.3f}"
        print(row)
    total_row = f"{'= total per mail':<40}"
    bare_row = f"{'  bare parse per mail (same mails)':<40}"
    db_row = f"{'  of which in the DB driver':<40}"
    stmt_row = f"{'  SQL statements per mail':<40}"
    for name, _d, b in columns:
        total_row += f"{sum(b['stages_ms_per_mail'].values()):>14.3f}"
        bare_row += f"{1000 / results['datasets'][name]['bare']['rate']:>14.3f}"
        db_row += f"{b['db_ms_per_mail']:>14.3f}"
        stmt_row += f"{b['statements_per_mail']:>14.2f}"
    for row in (total_row, bare_row, db_row, stmt_row):
        print(row)
    for name, db, b in columns:
        if b.get("not_instrumented"):
            print(f"  ({name}/{db}: not found, so not timed: {', '.join(b['not_instrumented'])})")
    print("\nInside parse and the steps (ms per mail):")
    keys = ["process.parse.email", "process.parse.mailparser",
            "process.parse.mailparser.decode_text",
            "process.parse._walk_attachments", "process.parse.sanitize_html",
            "process.parse.html_to_text", "process.dedupe.db", "process.thread.db",
            "process.sender.db", "process.sender.flush", "process.store.db", "process.store.flush",
            "flush.db", "process.flush.db", "commit.db", "commit"]
    for key in keys:
        row = f"{key:<40}"
        for _n, _d, b in columns:
            row += f"{b['all_ms_per_mail'].get(key, 0.0):>14.3f}"
        print(row)


def print_profile(name: str, db: str, prof: dict[str, Any]) -> None:
    total = prof["total_ms_per_mail"] or 1.0
    print(f"\ncProfile, {name} set on {db}: {prof['total_ms_per_mail']:.2f} ms per mail under the "
          "profiler (the profiler inflates pure-Python code more than C and I/O); by group:")
    for group, ms in prof["groups_ms_per_mail"].items():
        print(f"  {group:<10} {ms:>9.3f} ms/mail  {ms / total:>6.1%}")
    for group, entry in prof["groups"].items():
        packages = ", ".join(f"{k} {v:.2f}" for k, v in entry["own_time_by_package"].items())
        print(f"\n  [{group}] {entry['ms_per_mail']:.3f} ms/mail; own time by package: {packages}")
        print(f"    {'cum ms':>8} {'own ms':>8} {'calls':>7}  function")
        for row in entry["top_cumulative"]:
            print(f"    {row['cum_ms_per_mail']:>8.3f} {row['own_ms_per_mail']:>8.3f} "
                  f"{row['calls_per_mail']:>7.2f}  {row['function']}")
    print(f"\n  top own time ({name}/{db}), ms per mail:")
    print(f"    {'own ms':>8} {'cum ms':>8} {'calls':>7}  {'group':<9} function")
    for row in prof["top_own_time"]:
        print(f"    {row['own_ms_per_mail']:>8.3f} {row['cum_ms_per_mail']:>8.3f} "
              f"{row['calls_per_mail']:>7.2f}  {row['group']:<9} {row['function']}")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def best_pipeline_run(args: argparse.Namespace, fresh: Callable[[str], Any], db: str,
                      data: DataSet, bare: dict[str, Any], helpers: int) -> dict[str, Any]:
    """The fastest of ``--passes`` pipeline passes, each on a fresh database."""
    runs = []
    for _ in range(max(1, args.passes)):
        one: dict[str, Any] = {}
        wait_for_quiet(args.max_load, args.max_wait, one)
        with fresh(db) as url, phase_memory(one):
            ingestor = make_ingestor(url)
            try:
                one.update(run_pipeline(ingestor, data.mails, args.interleave, helpers))
            finally:
                ingestor.close()
        runs.append(one)
    run = max(runs, key=lambda r: r["rate"])
    run["passes"] = [round(r["rate"], 1) for r in runs]
    run["ratio"] = run["rate"] / bare["rate"]
    run["cpu_ratio"] = run["cpu_rate"] / bare["cpu_rate"]
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="generated mails (default 2000)")
    parser.add_argument("--seed", type=int, default=generate.DEFAULT_SEED)
    parser.add_argument("--pg-url", help="PostgreSQL server to create fresh databases on "
                        "(SQLAlchemy URL; default: start a throwaway local server)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--sets", default="corpus,generated", help="corpus,generated")
    parser.add_argument("--databases", default="sqlite,postgresql", help="sqlite,postgresql")
    parser.add_argument("--passes", type=int, default=1,
                        help="pipeline passes per data set and database, each on a fresh "
                        "database; the best is reported (default 1)")
    parser.add_argument("--interleave", type=int, default=100,
                        help="bare-parse every K mails again right after the pipeline has "
                        "processed them, for a ratio under matched load (0: off; default 100)")
    parser.add_argument("--max-load", type=float, default=None,
                        help="before each timed phase wait until the 1-minute load average is "
                        "below this (shared machines); off by default")
    parser.add_argument("--max-wait", type=float, default=900,
                        help="longest wait for --max-load, seconds (default 900)")
    parser.add_argument("--helpers", type=int, default=default_helpers(),
                        help="parse helper processes of the second pipeline pass per data set "
                        "and database, as `ticketgate replay` starts them (default: "
                        f"{default_helpers()} on this machine; 0: no such pass)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the instrumented passes")
    parser.add_argument("--profile", default="sqlite,postgresql",
                        help="databases to profile the generated set on ('' for none)")
    args = parser.parse_args(argv)
    if args.pg_url is not None and not args.pg_url.strip():
        parser.error("--pg-url is empty")
    sets = [s for s in args.sets.split(",") if s]
    databases = [d for d in args.databases.split(",") if d]
    profiled = [d for d in args.profile.split(",") if d and d in databases]

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    logging.basicConfig(level=logging.WARNING, filename=RESULTS / f"{stamp}.log",
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True)
    if CONFIG.read_text(encoding="utf-8") != generate.render_config():
        print(f"warning: {CONFIG} differs from generate.render_config(); "
              "run python bench/generate.py --write-config", file=sys.stderr)

    results: dict[str, Any] = {"started": stamp, "args": vars(args) | {"corpus": str(args.corpus)},
                               "versions": _versions(), "source": _source_state(),
                               "target_ratio": TARGET_RATIO,
                               "datasets": {}}
    data_sets: list[DataSet] = []
    if "corpus" in sets:
        data_sets.append(load_corpus(args.corpus))
    if "generated" in sets:
        data_sets.append(load_generated(args.n, args.seed))
    for data in data_sets:
        print(f"{data.name}: {len(data.mails)} mails, {data.bytes / 1e6:.1f} MB")

    server = PostgresServer(args.pg_url) if "postgresql" in databases else None
    try:
        if server is not None:
            server.start()
            results["versions"]["postgresql"] = server.version
            print(f"postgresql: {server.version}")

        def fresh(db: str) -> Any:
            return fresh_sqlite() if db == "sqlite" else server.fresh_database()  # type: ignore[union-attr]

        warm_up([raw for data in data_sets for raw in data.mails[: WARMUP_MAILS // 2]])
        for data in data_sets:
            entry: dict[str, Any] = {"mails": len(data.mails), "bytes": data.bytes,
                                     "sha256": data.sha256(), "info": data.info, "pipeline": {}}
            results["datasets"][data.name] = entry
            bare: dict[str, Any] = {}
            wait_for_quiet(args.max_load, args.max_wait, bare)
            with phase_memory(bare):
                bare.update(bare_parse(data.mails))
            entry["bare"] = bare
            print(f"{data.name}: bare parse {bare['rate']:.1f} mails/s (passes {bare['passes']})",
                  flush=True)
            for db in databases:
                for helpers in dict.fromkeys((0, args.helpers)):
                    run = best_pipeline_run(args, fresh, db, data, bare, helpers)
                    label = f"{db}+{helpers}h" if helpers else db
                    entry["pipeline"][label] = run
                    matched = run.get("interleaved", {}).get("ratio")
                    print(f"{data.name}/{label}: pipeline {run['rate']:.1f} mails/s, "
                          f"ratio {run['ratio']:.1%}"
                          + (f" (interleaved {matched:.1%})" if matched is not None else "")
                          + f", load {run['loadavg_1m'][0]:.1f}, {run['actions']}", flush=True)
                run = entry["pipeline"][db]  # the breakdown and profile: one process
                if not args.no_breakdown:
                    quiet: dict[str, Any] = {}
                    wait_for_quiet(args.max_load, args.max_wait, quiet)
                    with fresh(db) as url:
                        run["instrumented"] = instrumented_pass(url, data.mails) | quiet
                    print(f"{data.name}/{db}: instrumented pass "
                          f"{run['instrumented']['rate']:.1f} mails/s", flush=True)
                if data.name == "generated" and db in profiled:
                    quiet = {}
                    wait_for_quiet(args.max_load, args.max_wait, quiet)
                    with fresh(db) as url:
                        run["profiled"] = profile_pass(url, data.mails) | quiet
                    print(f"{data.name}/{db}: profiled pass {run['profiled']['rate']:.1f} mails/s",
                          flush=True)
    finally:
        if server is not None:
            server.stop()

    results["finished"] = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    print_table(results)
    if not args.no_breakdown:
        print_breakdown(results)
    for name, data in results["datasets"].items():
        for db, run in data["pipeline"].items():
            if "profiled" in run:
                print_profile(name, db, run["profiled"]["profile"])
    print(f"\nresults: {out}")
    below = [f"{n}/{d}" for n, data in results["datasets"].items()
             for d, run in data["pipeline"].items() if run["ratio"] < TARGET_RATIO]
    if below:
        print(f"below the {TARGET_RATIO:.0%} target: {', '.join(below)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
