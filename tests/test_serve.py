"""``ticketgate serve`` in its default embedded mode, end to end (design.md §4).

No configuration file, an empty working directory, only the two port variables set: one mail
over SMTP must become one ticket in ``./var/ticketgate.db``, and SIGTERM must stop the whole
process group cleanly, within the supervisor's grace time, leaving no process behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from ingest.config import WorkerSection
from ingest.db import make_engine
from ingest.models import InboundMail, Ticket
from workers.supervisor import GRACE_SECONDS, descendants

READY_TIMEOUT_S = 60.0
TICKET_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def group_members(pgid: int) -> dict[int, str]:
    """Live (non-zombie) processes in a process group: pid -> command line."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        # Fields after the ")" that closes the command name: state ppid pgrp ...
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            found[int(entry.name)] = cmdline.strip()
    return found


def wait_smtp(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}\n{log.read_text()[-4000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"SMTP not ready within {READY_TIMEOUT_S}s\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def alive(pids: list[int]) -> list[int]:
    """The ones of ``pids`` still running (zombies count as gone)."""
    left = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.append(pid)
    return left


def start_serve(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """``serve`` with no configuration in ``tmp_path/cwd``, its SMTP port answering; the
    process, that port and its log."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    log = tmp_path / "serve.log"
    smtp_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKETGATE_")}
    env.update(TICKETGATE_SMTP_PORT=str(smtp_port), TICKETGATE_HTTP_PORT=str(http_port),
               PYTHONUNBUFFERED="1")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "serve"], cwd=workdir,
                                env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    wait_smtp(smtp_port, proc, log)
    return proc, smtp_port, log


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_serve_default_mode_end_to_end(tmp_path: Path) -> None:
    proc, smtp_port, log = start_serve(tmp_path)
    workdir = tmp_path / "cwd"
    try:
        msg = (b"From: Jane Doe <jane@customer.example>\r\nTo: anyone@anywhere.example\r\n"
               b"Subject: My printer is on fire\r\nMessage-ID: <serve-1@customer.example>\r\n"
               b"\r\nPlease send help.\r\n")
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
            refused = smtp.sendmail("jane@customer.example", ["anyone@anywhere.example"], msg)
        assert refused == {}

        engine = make_engine(f"sqlite:///{workdir / 'var' / 'ticketgate.db'}")
        try:
            deadline = time.monotonic() + TICKET_TIMEOUT_S
            while True:
                with engine.connect() as conn:
                    tickets = conn.execute(select(Ticket.id, Ticket.title, Ticket.mailbox_id)).all()
                    inbound = conn.execute(select(InboundMail.state, InboundMail.envelope_to,
                                                  InboundMail.ticket_id)).all()
                if tickets or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            engine.dispose()
        assert tickets, f"no ticket within {TICKET_TIMEOUT_S}s\n{log.read_text()[-4000:]}"
        assert [tuple(t) for t in tickets] == [(tickets[0][0], "My printer is on fire", 1)]
        assert [tuple(i) for i in inbound] == [("created", ["anyone@anywhere.example"],
                                                tickets[0][0])]

        members = group_members(proc.pid)
        assert len(members) >= 3, members  # serve, smtp, worker (and the worker's own children)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(GRACE_SECONDS + 15)
        took = time.monotonic() - started
        print(f"serve stopped in {took:.1f}s with exit code {code}")
        assert code == 0, log.read_text()[-4000:]
        assert took < GRACE_SECONDS, f"stopping took {took:.1f}s"
        text = log.read_text()
        assert "did not stop in time" not in text, text[-4000:]
        deadline = time.monotonic() + 5
        while (left := group_members(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"processes left behind: {left}"
        assert (workdir / "var" / "ticketgate.db").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def test_kill_tree_reaches_grandchildren() -> None:
    """What serve does to a role that outlives the grace time: the role's own children (a
    worker's pool processes, its embedded beat) must die with it, not linger as orphans."""
    from workers.supervisor import kill_tree

    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        grandchild = int(proc.stdout.readline())
        kill_tree(proc)
        assert proc.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert grandchild not in group_members(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_killed_serve_takes_its_roles_with_it(tmp_path: Path) -> None:
    """SIGKILL (or the OOM killer) gives ``serve`` no time to stop its roles.  They lived on
    under init, holding the SMTP and HTTP ports, so the next ``serve`` could not bind them;
    now each role is sent SIGTERM when ``serve`` dies, and stops as it does on SIGTERM."""
    proc, smtp_port, log = start_serve(tmp_path)
    try:
        roles = descendants(proc.pid)
        assert len(roles) >= 3, roles  # smtp, worker (and its pool and beat), api
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        left = wait_gone(roles, GRACE_SECONDS + 10)
        assert not left, (left, group_members(proc.pid), log.read_text()[-3000:])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", smtp_port), timeout=2).close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_killed_worker_leaves_no_beat_behind(tmp_path: Path) -> None:
    """The worker role's embedded beat outlived a SIGKILL of the worker, and the worker that
    serve started in its place added a second beat: two sweeps at every interval."""
    proc, _smtp_port, log = start_serve(tmp_path)
    try:
        workers = [pid for pid in descendants(proc.pid)
                   if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                   and int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                   == proc.pid]
        assert len(workers) == 1, workers
        # Its pool (worker.concurrency, 2 by default) and its beat: the beat has no title of
        # its own without setproctitle, so it is known by the count.
        expected = WorkerSection().concurrency + 1
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(below := descendants(workers[0])) < expected:
            assert time.monotonic() < deadline, (below, log.read_text()[-3000:])
            time.sleep(0.2)
        os.kill(workers[0], signal.SIGKILL)
        left = wait_gone(below, 15)
        assert not left, (left, log.read_text()[-3000:])
        assert proc.poll() is None  # serve goes on, and starts the worker again
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
