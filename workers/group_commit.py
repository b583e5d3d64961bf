"""Group commit: the SMTP sessions of one listener share their spool transactions.

Every DATA must be committed before its ``250`` (design.md, invariant 1), but nothing says each
mail needs a commit of its own.  With one transaction per mail the listener spent most of its
CPU handing each mail to a thread and committing it, and the database made one WAL flush per
mail.  Here a session hands its mail to :meth:`GroupCommit.submit` and waits; one writer writes
everything waiting in one call (one thread hop, one transaction) and answers each session with
its own result.  While that write runs, the next sessions' mails gather, so the group grows with
the load by itself: a lone client waits for no window, a busy listener commits many mails at
once.  Databases do the same with their WAL (PostgreSQL's ``commit_delay``, InnoDB's group
commit); this does it one level up, where the per-transaction cost is Python's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(slots=True)
class _Waiting(Generic[Item, Result]):
    item: Item
    size: int
    answer: asyncio.Future[Result]


class GroupCommit(Generic[Item, Result]):
    """Write submitted items in groups, one group at a time, each in a worker thread.

    ``write`` takes a group and returns one result per item, in order: a value, or the
    exception that item's submitter should see (so one bad item does not fail the others).
    A group holds at most ``max_items`` items and ``max_bytes`` of their sizes (one item is
    always taken, however large).
    """

    def __init__(self, write: Callable[[list[Item]], Sequence[Result | Exception]], *,
                 max_items: int = 32, max_bytes: int = 4 * 1024 * 1024) -> None:
        self._write = write
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._waiting: list[_Waiting[Item, Result]] = []
        self._writer: asyncio.Task[None] | None = None
        self.groups = 0  # groups written so far (for the benchmark and the tests)
        self.items = 0

    async def submit(self, item: Item, size: int) -> Result:
        """Wait until ``item`` is written with its group; its result, or raise its exception.

        A submitter cancelled before its group is taken (the client went away) is left out of
        the group; once taken, the write goes on regardless, as a thread cannot be stopped.
        """
        answer: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(item, size, answer))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting(), name="group-commit")
        return await answer

    async def _write_waiting(self) -> None:
        while self._waiting:
            group = self._take_group()
            if not group:
                continue
            try:
                results = await asyncio.to_thread(self._write, [w.item for w in group])
                if len(results) != len(group):
                    raise RuntimeError(f"group write returned {len(results)} results "
                                       f"for {len(group)} items")
            except Exception as exc:  # each submitter gets it (its session answers 451)
                for waiting in group:
                    if not waiting.answer.done():
                        waiting.answer.set_exception(exc)
                continue
            self.groups += 1
            self.items += len(group)
            for waiting, result in zip(group, results, strict=True):
                if waiting.answer.done():  # its session was cancelled meanwhile
                    continue
                if isinstance(result, Exception):
                    waiting.answer.set_exception(result)
                else:
                    waiting.answer.set_result(result)

    def _take_group(self) -> list[_Waiting[Item, Result]]:
        group: list[_Waiting[Item, Result]] = []
        size = 0
        while self._waiting and len(group) < self._max_items:
            waiting = self._waiting[0]
            if group and size + waiting.size > self._max_bytes:
                break
            self._waiting.pop(0)
            if waiting.answer.done():  # cancelled before it was taken: not written
                continue
            group.append(waiting)
            size += waiting.size
        return group
