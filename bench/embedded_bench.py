"""The embedded default end to end: ``ticketgate serve`` on SQLite and kombu's SQL broker.

The README's first command runs this set-up, with no server besides ticketgate.  Each round
starts ``serve`` on a fresh data directory, sends N generated mails with C concurrent SMTP
clients as fast as they are accepted, and waits until the backlog has drained.  With several
``--code-dir`` trees (e.g. a worktree of the commit before a change), the rounds alternate
between them, so the before/after ratio is measured in one run on the same machine.

Reported per tree: accepted mails/s, committed mails/s (until the last one committed),
250->committed p50/p99, CPU ms per mail of the whole process group.  ``--rate`` paces the
stream (mail i not before i/rate s), for the latency below saturation.

    python bench/embedded_bench.py --n 1000 --rounds 3
    python bench/embedded_bench.py --code-dir /tmp/before --code-dir .   # paired A/B
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smtp_bench import (  # the SMTP benchmark's mails, clients and processes
    CODE_DIR,
    PYTHON,
    RESULTS,
    Proc,
    bench_config,
    free_port,
    load_mails,
    log,
    send_stream,
)

DRAIN_TIMEOUT_S = 600


def _cpu_seconds(proc: Proc) -> float:
    total = 0.0
    for process in proc.processes():
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except Exception:  # exited in between
            continue
    return total


def _utc(text: str) -> float:
    stamp = dt.datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


def one_round(code_dir: Path, mails: list[Any], clients: int, rate: float | None
              ) -> dict[str, Any]:
    """``serve`` from ``code_dir`` on a fresh data directory; the stream; the drain."""
    CODE_DIR["path"] = code_dir
    workdir = Path(tempfile.mkdtemp(prefix="embedded-bench-"))
    config = workdir / "ticketgate.toml"
    config.write_text(bench_config().replace(
        "[service]\n", f'[service]\ndata_dir = "{workdir / "var"}"\n', 1), encoding="utf-8")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKETGATE_")}
    env.update(TICKETGATE_SMTP_PORT=str(port), TICKETGATE_HTTP_PORT=str(free_port()),
               PYTHONUNBUFFERED="1")
    serve = Proc("serve", [PYTHON, "-m", "workers.cli", "serve", "--config", str(config)],
                 workdir / "serve.log", r"ready\.", env, code_dir).start()
    try:
        ready_by = time.monotonic() + 120
        while "listening on" not in serve.tail(1_000_000):
            if time.monotonic() > ready_by:
                raise RuntimeError(f"the listener did not start:\n{serve.tail()}")
            time.sleep(0.1)
        time.sleep(1.0)  # the worker's pool and beat settle
        cpu_before = _cpu_seconds(serve)
        sent = send_stream(port, mails, clients, rate)
        accepted = [s for s in sent if s.code == 250]
        database = workdir / "var" / "ticketgate.db"
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            with sqlite3.connect(database) as db:
                waiting = db.execute(
                    "SELECT count(*) FROM inbound_mails WHERE state = 'received'").fetchone()[0]
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        cpu = _cpu_seconds(serve) - cpu_before
        with sqlite3.connect(database) as db:
            processed = dict(db.execute(
                "SELECT id, processed_at FROM inbound_mails WHERE processed_at IS NOT NULL"))
    finally:
        serve.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if not accepted or not processed:
        raise RuntimeError(f"{len(accepted)} mails accepted, {len(processed)} committed")
    t0 = min(s.t_start for s in sent)
    last_reply = max(s.t_reply for s in accepted)
    committed_at = {i: _utc(t) for i, t in processed.items()}
    latencies = sorted(committed_at[i] - s.t_reply for s in accepted for i in s.inbound
                       if i in committed_at)
    last_commit = max(committed_at.values())
    return {
        "accepted": len(accepted), "refused": len(sent) - len(accepted),
        "committed": len(committed_at), "left_waiting": waiting,
        "accepted_per_s": len(accepted) / (last_reply - t0),
        "committed_per_s": len(committed_at) / (last_commit - t0),
        "p50_s": latencies[len(latencies) // 2],
        "p99_s": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "cpu_ms_per_mail": 1000 * cpu / max(1, len(accepted)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float,
                        help="mails/s, paced (default: as fast as they are accepted)")
    parser.add_argument("--code-dir", type=Path, action="append",
                        help="a tree to run ticketgate from (repeat for A/B); default: this one")
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"))
    args = parser.parse_args(argv)
    trees = [d.resolve() for d in (args.code_dir or [Path(__file__).resolve().parents[1]])]
    mails = load_mails(args.n)
    runs: dict[str, list[dict[str, Any]]] = {str(t): [] for t in trees}
    for round_no in range(args.rounds):
        for tree in trees if round_no % 2 == 0 else reversed(trees):
            result = one_round(tree, mails, args.clients, args.rate)
            runs[str(tree)].append(result)
            log(f"round {round_no + 1} {tree}: " + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    summary = {tree: {key: statistics.median(r[key] for r in results)
                      for key in ("accepted_per_s", "committed_per_s", "p50_s", "p99_s",
                                  "cpu_ms_per_mail")}
               for tree, results in runs.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"embedded_bench-{args.tag}.json"
    out.write_text(json.dumps({"n": args.n, "clients": args.clients, "rate": args.rate,
                               "runs": runs,
                               "medians": summary}, indent=1), encoding="utf-8")
    for tree, medians in summary.items():
        log(f"median {tree}: " + ", ".join(f"{k} {v:.3g}" for k, v in medians.items()))
    if len(trees) > 1:
        first, last = (summary[str(t)] for t in (trees[0], trees[-1]))
        log("ratios last/first: " + ", ".join(
            f"{k} {last[k] / first[k]:.2f}" for k in first if first[k]))
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
