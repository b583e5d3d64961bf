"""Run ticketgate's long-running roles (``python -m workers.cli ...``) as real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO


class Role:
    """One ``python -m workers.cli ...`` role in its own process group (so a SIGKILL reaches
    the prefork children and the embedded beat too), with its output in a log file."""

    START_MARK = "===== test harness: start"

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.logfile = logdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self._log = self.logfile.open("ab")
        self._log.write(f"\n{self.START_MARK} #{self.starts + 1} at {time.time():.3f}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *self.args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.starts += 1

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, needle: str, timeout: float) -> None:
        """Wait until the current run (since the last start) has logged ``needle``."""
        deadline = time.monotonic() + timeout
        while needle not in self.log_text().rpartition(self.START_MARK)[2]:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n"
                                     + self.log_text()[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {needle!r} within {timeout}s:\n"
                                     + self.log_text()[-4000:])
            time.sleep(0.1)

    def restart_if_exited(self) -> int | None:
        """Start the role again if it has exited, as ``ticketgate serve``'s supervisor and the
        containers' restart policy do; the exit code, or None while it runs."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        self.start()
        return code

    def kill_group(self, sig: signal.Signals = signal.SIGKILL) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if sig != signal.SIGKILL:  # stragglers of a graceful stop
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None


def stop_process(proc: subprocess.Popen[bytes], signum: int, patience: float) -> None:
    """Send ``signum`` to a process the test started; killed if it is not gone in
    ``patience`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signum)
    try:
        proc.wait(patience)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_celery_worker(worker: subprocess.Popen[bytes]) -> None:
    """Celery's cold shutdown (SIGQUIT): the test is done with the worker; killed if it hangs."""
    stop_process(worker, signal.SIGQUIT, 20)
