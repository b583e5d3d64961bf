"""Bare aiosmtpd servers: the baselines of ``bench/smtp_bench.py``.

Two handlers, with the same aiosmtpd options as ticketgate's listener (bytes, SMTPUTF8, SIZE):

* ``list``: appends each mail's bytes to a Python list and answers 250 (no durability at all);
* ``fsync``: appends each mail to one file and ``os.fsync``s it before answering 250 (the least
  a durable MX must do), in a worker thread like ticketgate's spool write.

Both answer ``250 2.0.0 Ok: queued inbound N`` so the benchmark client parses every server's
reply the same way.

    python bench/bare_smtp.py --mode fsync --port 2600 --file /tmp/spool.mbox
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import threading
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

DATA_SIZE_LIMIT = 30 * 1024 * 1024


class ListHandler:
    def __init__(self) -> None:
        self.mails: list[bytes] = []
        self.counter = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.mails.append(envelope.original_content or b"")
        return f"250 2.0.0 Ok: queued inbound {next(self.counter)}"


class FsyncHandler:
    """One file, opened for appending; each mail is written and fsync'd before the 250."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.counter = itertools.count(1)
        self.lock = threading.Lock()  # one mail's bytes stay contiguous in the file

    def _write(self, raw: bytes) -> None:
        with self.lock:
            view = memoryview(raw)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        os.fsync(self.fd)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.to_thread(self._write, envelope.original_content or b"")
        return f"250 2.0.0 Ok: queued inbound {next(self.counter)}"


async def serve(mode: str, host: str, port: int, path: Path | None) -> None:
    handler: Any = ListHandler() if mode == "list" else FsyncHandler(path or Path("bare.mbox"))

    def factory() -> SMTP:
        return SMTP(handler, hostname="bare.localdomain", data_size_limit=DATA_SIZE_LIMIT,
                    enable_SMTPUTF8=True, decode_data=False, timeout=300)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    print(f"bare smtp ({mode}) listening on {host}:{port}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["list", "fsync"], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--file", type=Path, help="fsync mode: the file mails are appended to")
    args = parser.parse_args()
    asyncio.run(serve(args.mode, args.host, args.port, args.file))


if __name__ == "__main__":
    main()
