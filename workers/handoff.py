"""Hand spooled ids to the broker in groups, not one message per mail.

The SMTP listener spools each mail in its own session and commits it before the 250; what
follows, telling the workers, need not be per mail.  A broker message per mail cost the workers
a Celery task per mail (receive, dispatch, acknowledge, trace: a third of their CPU), so the
ids that concurrent sessions spool within 100 ms go out together, as one task of up
to ``IDS_PER_TASK`` ids (:func:`workers.celery_app.enqueue`).

Nothing depends on this hand-off for safety: the ids are committed in the spool before they get
here, and a record the broker never hears of (the listener stopped within the window, the
broker was down) is enqueued again by the sweep.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ticketgate.handoff")

# How long the first id of a group waits for company.  At half the peak rate a 50 ms window
# gave tasks of about 10 mails, and a worker batch has a fixed cost (its transactions and
# look-ups) that smaller tasks share among fewer mails: with 100 ms, tasks fill up to 16 and
# the workers spent 11-12% less CPU per mail in two paired runs at 190 mails/s.  There the
# machine is short of CPU, and the queue, not this wait, makes the latency.  (First 10 ms.)
WINDOW_SECONDS = 0.1
MAX_GROUP = 16  # ids that are sent at once without waiting (one task's worth)


class GroupedHandoff:
    """A callable with ``enqueue``'s signature that gathers ids for ``window`` seconds (or until
    ``max_group`` are waiting) and hands them to ``enqueue`` in one call.  Thread-safe: the
    listener calls it from its spool threads.  One sender thread, started on first use (a
    timer thread per group cost a third of the listener's CPU)."""

    def __init__(self, enqueue: Callable[[list[int]], Any], window: float = WINDOW_SECONDS,
                 max_group: int = MAX_GROUP) -> None:
        self._enqueue = enqueue
        self._window = window
        self._max_group = max_group
        self._ready = threading.Condition()
        self._waiting: list[int] = []
        self._first_at = 0.0  # when the oldest waiting id came (time.monotonic())
        self._sender: threading.Thread | None = None
        self._sending = threading.Lock()  # one publish at a time (flush waits for the thread's)

    def __call__(self, inbound_ids: list[int]) -> bool:
        """Take the ids; True (the broker's answer comes later, and only counts in metrics)."""
        with self._ready:
            first = not self._waiting
            if first:
                self._first_at = time.monotonic()
            self._waiting.extend(inbound_ids)
            if self._sender is None:
                self._sender = threading.Thread(target=self._run, name="ticketgate-handoff",
                                                daemon=True)
                self._sender.start()
            # The sender needs waking only to start its window or to send a full group early;
            # otherwise it wakes at the window's end anyway (a wake-up per id was a thread
            # switch per mail).
            if first or len(self._waiting) >= self._max_group:
                self._ready.notify()
        return True

    def flush(self) -> None:
        """Send whatever is waiting now, after a publish the sender thread has under way
        (shutdown: the process may exit when this returns)."""
        with self._ready:
            group, self._waiting = self._waiting, []
        self._send(group)  # with nothing to send, still waits for the thread's publish

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._waiting:
                    self._ready.wait()
                while len(self._waiting) < self._max_group:
                    left = self._first_at + self._window - time.monotonic()
                    if left <= 0:
                        break
                    self._ready.wait(left)
                group, self._waiting = self._waiting, []
            if group:
                self._send(group)

    def _send(self, group: list[int]) -> None:
        with self._sending:
            if not group:
                return
            try:
                self._enqueue(group)
            except Exception:  # the sweep enqueues them later; the mails are spooled already
                log.exception("hand-off of %d spooled id(s) failed; left for the sweep",
                              len(group))
