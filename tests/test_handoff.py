"""The listener's grouped hand-off of spooled ids to the broker (``workers/handoff.py``)."""

from __future__ import annotations

import threading
import time

import pytest

from workers.handoff import GroupedHandoff


class Recorder:
    """Stands in for ``celery_app.enqueue``: records the groups it is handed."""

    def __init__(self, fail: bool = False) -> None:
        self.groups: list[list[int]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, ids: list[int]) -> bool:
        if self.fail:
            raise ConnectionError("broker down")
        with self.lock:
            self.groups.append(list(ids))
        return True

    def ids(self) -> list[int]:
        return sorted(i for group in self.groups for i in group)


def wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.005)


def test_ids_from_concurrent_sessions_go_out_together_each_once() -> None:
    sent = Recorder()
    handoff = GroupedHandoff(sent, window=0.05, max_group=16)
    threads = [threading.Thread(target=lambda n=n: [handoff([n * 100 + k]) for k in range(10)])
               for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: len(sent.ids()) == 80)
    assert sent.ids() == sorted(n * 100 + k for n in range(8) for k in range(10))
    assert len(sent.groups) <= 20, sent.groups  # grouped, not one call per id


def test_a_lone_id_waits_no_longer_than_the_window() -> None:
    sent = Recorder()
    handoff = GroupedHandoff(sent, window=0.02)
    started = time.monotonic()
    handoff([7])
    assert sent.groups == []  # not yet: company may come
    wait_for(lambda: sent.groups)
    assert sent.groups == [[7]]
    assert time.monotonic() - started < 1.0


def test_flush_sends_what_waits_at_once() -> None:
    sent = Recorder()
    handoff = GroupedHandoff(sent, window=60)
    handoff([1, 2])
    handoff([3])
    assert sent.groups == []  # the window is a minute
    handoff.flush()
    assert sent.groups == [[1, 2, 3]]
    handoff.flush()
    assert sent.groups == [[1, 2, 3]]  # nothing twice


def test_a_broker_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """The ids are spooled already; the sweep enqueues them again.  The SMTP session that
    happened to fill the group must not see the broker's error."""
    handoff = GroupedHandoff(Recorder(fail=True), window=60, max_group=2)
    assert handoff([1]) is True
    assert handoff([2]) is True  # a full group: the sender thread sends it, and fails
    wait_for(lambda: "left for the sweep" in caplog.text)
    assert "hand-off of 2 spooled id(s) failed; left for the sweep" in caplog.text


def test_a_full_group_goes_without_waiting_for_the_window() -> None:
    sent = Recorder()
    handoff = GroupedHandoff(sent, window=60, max_group=4)
    for inbound_id in range(4):
        handoff([inbound_id])
    wait_for(lambda: sent.groups)
    assert sent.ids() == [0, 1, 2, 3]
