"""A real authoritative DNS server on loopback for the SPF/DKIM/DMARC tests.

dnslib's ``DNSServer`` answers UDP and TCP on one free port from a zone the test writes
(``zone.add("good.test", "TXT", "v=spf1 ip4:192.0.2.10 -all")``); ticketgate's resolver is
pointed at it with ``[authentication] nameservers = ["127.0.0.1"]`` and ``dns_port``.  Names
that have no record of any type answer NXDOMAIN, the others NODATA, as a real server would.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import closing
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, TXT, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class Zone(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[Any]] = defaultdict(list)
        self.queries: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def add(self, name: str, qtype: str, value: str) -> None:
        name = name.lower().rstrip(".")
        if qtype == "TXT":
            data = value.encode()
            rdata: Any = TXT([data[i:i + 255] for i in range(0, len(data), 255)])
        elif qtype == "A":
            rdata = A(value)
        elif qtype == "AAAA":
            rdata = AAAA(value)
        else:
            raise ValueError(qtype)
        with self.lock:
            self.records[(name, qtype)].append(rdata)

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname).lower().rstrip(".")
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((name, qtype))
            found = list(self.records.get((name, qtype), []))
            exists = any(n == name or n.endswith("." + name) for n, _t in self.records)
        for rdata in found:
            reply.add_answer(RR(request.q.qname, getattr(QTYPE, qtype), rdata=rdata, ttl=60))
        if not found and not exists:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class HeldZone(Zone):
    """A name server that is slow to answer: every query waits until the test releases it, or,
    with ``only``, every query for a name in those domains waits until the test releases its
    domain (``release``) or all (``released.set()``).  ``asked`` is set when the first held
    query arrives; ``waiting`` names every query that has."""

    def __init__(self, only: Sequence[str] = ()) -> None:
        super().__init__()
        self.only = tuple(only)
        self.asked = threading.Event()
        self.released = threading.Event()
        self._released_domains: set[str] = set()
        self.waiting: list[str] = []

    def release(self, domain: str) -> None:
        with self.lock:
            self._released_domains.add(domain)

    def resolve(self, request: Any, handler: Any) -> Any:
        name = str(request.q.qname).lower().rstrip(".")
        domain = next((d for d in self.only if name == d or name.endswith("." + d)), None)
        if not self.only or domain is not None:
            with self.lock:
                self.waiting.append(name)
            self.asked.set()
            give_up = time.monotonic() + 60
            while not self.released.wait(0.02) and time.monotonic() < give_up:
                with self.lock:
                    if domain in self._released_domains:
                        break
        return super().resolve(request, handler)


class LoopbackDns:
    """UDP and TCP servers for one :class:`Zone` on the same free loopback port."""

    def __init__(self, zone: Zone | None = None) -> None:
        self.zone = zone or Zone()
        logger = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data",
                           prefix=False)
        for _attempt in range(20):  # a port free for UDP may be taken for TCP, or taken meanwhile
            udp = None
            try:
                port = _free_udp_and_tcp_port()
                udp = DNSServer(self.zone, address="127.0.0.1", port=port, logger=logger)
                self.tcp = DNSServer(self.zone, address="127.0.0.1", port=port, tcp=True,
                                     logger=logger)
            except OSError:
                if udp is not None:
                    udp.server.server_close()
                continue
            self.udp = udp
            self.port = port
            break
        else:  # pragma: no cover
            raise RuntimeError("no free port for the test DNS server")
        self.udp.start_thread()
        self.tcp.start_thread()

    def stop(self) -> None:
        self.udp.stop()
        self.tcp.stop()
        self.udp.server.server_close()
        self.tcp.server.server_close()


def _free_udp_and_tcp_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as udp:
        udp.bind(("127.0.0.1", 0))
        port = int(udp.getsockname()[1])
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as tcp:
            tcp.bind(("127.0.0.1", port))
    return port


def unused_port() -> int:
    """A loopback UDP port with nothing listening: queries to it time out."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as udp:
        udp.bind(("127.0.0.1", 0))
        return int(udp.getsockname()[1])
