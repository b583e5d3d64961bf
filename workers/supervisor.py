"""``ticketgate serve``: every role as a child process in one process group.

Each role stays the same program it is when run alone (``ticketgate smtp``, ``worker``...), so
what is tested alone is what runs together.  A child that dies is restarted with backoff; SIGTERM
or SIGINT is passed on to every child, which stop accepting and finish in-flight work.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("ticketgate.serve")

GRACE_SECONDS = 20.0
MAX_BACKOFF = 30.0


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = field(default=0.0)

    def start(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            self.argv, env=env, preexec_fn=functools.partial(_role_dies_with, os.getpid()))
        log.info("started %s (pid %s)", self.name, self.process.pid)


_PR_SET_PDEATHSIG = 1
try:  # looked up here, not in a forked child
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Have Linux send this process ``signum`` when its parent dies (``PR_SET_PDEATHSIG``);
    False where that cannot be asked.

    A ``serve`` killed with SIGKILL (or by the OOM killer) left its roles running under init,
    still holding the SMTP and HTTP ports, so the next ``serve`` could not bind them; a worker
    killed so left its embedded beat, and the restarted worker added a second one.  SIGTERM is
    the signal each role already stops cleanly on."""
    return _prctl is not None and _prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0


def _role_dies_with(parent: int) -> None:
    """In a role's process between fork and exec: the supervisor's own SIGTERM handler (it
    only sets a flag) is inherited until the exec, so it is reset first, or a signal sent
    meanwhile would be lost.  A supervisor already gone by then: the role is not started."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if die_with_parent() and os.getppid() != parent:
        os._exit(1)


def role_command(role: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "workers.cli", role, *args]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first), read from /proc; [] without /proc.

    Needed when a child has to be killed: SIGKILL reaches only the worker's main process, and
    its prefork pool processes and embedded beat were left running as orphans (the beat kept
    scheduling sweeps) after ``serve`` had exited.
    """
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        current = todo.pop(0)
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child and everything it started, then reap the child."""
    below = descendants(process.pid)
    process.kill()
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # already gone
            continue
    process.wait()


def supervise(children: list[Child], env: dict[str, str] | None = None) -> int:
    env = dict(env or os.environ)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for child in children:
        child.start(env)
    while not stopping:
        time.sleep(0.2)
        now = time.monotonic()
        for child in children:
            assert child.process is not None
            code = child.process.poll()
            if code is None:
                continue
            if child.next_start == 0.0:
                delay = min(MAX_BACKOFF, 2.0 ** child.restarts)
                child.next_start = now + delay
                log.error("%s exited with %s; restarting in %.0fs", child.name, code, delay)
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                child.start(env)
    log.info("stopping: passing SIGTERM to %d children", len(children))
    for child in children:
        if child.process and child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", child.name)
            kill_tree(child.process)
    return 0
