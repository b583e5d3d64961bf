"""A worker batch's sender evidence (SPF, DKIM, DMARC) against a name server that takes time.

The end-to-end benchmarks send from 127.0.0.1, a trusted relay, so they make no DNS look-up at
all. Mail from the internet does: SPF on the client IP, DMARC policy discovery, a DKIM key per
signature. This measures, for one batch of mails from distinct new domains (a cold resolver
cache), the wall time of working out their evidence one after the other and side by side
(``ingest.prepare.add_evidence_many``), against a loopback DNS server (``tests/dnszone.py``)
that answers each query after ``--latency-ms``. Rounds alternate the two ways; medians.

    python bench/auth_bench.py                       # 16 mails, 20 ms per query, 7 rounds
    python bench/auth_bench.py --latency-ms 80 --mails 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ingest import authentication, spool  # noqa: E402
from ingest.config import Settings, load_settings  # noqa: E402
from ingest.parse import ParsedMail  # noqa: E402
from ingest.prepare import add_evidence, add_evidence_many, prepare_mail  # noqa: E402
from ingest.spool import Envelope  # noqa: E402
from tests.dnszone import LoopbackDns, Zone  # noqa: E402

CLIENT_IP = "192.0.2.10"
CONFIG = """
[authentication]
nameservers = ["127.0.0.1"]
dns_port = {port}
dns_timeout = 10.0
trusted_relays = []

[[mailbox]]
id = 1
name = "Support"
addresses = ["support@example.com"]
"""


class SlowZone(Zone):
    """A zone whose every answer takes ``latency`` seconds, as a distant name server's."""

    def __init__(self, latency: float) -> None:
        super().__init__()
        self.latency = latency

    def resolve(self, request: Any, handler: Any) -> Any:
        time.sleep(self.latency)
        return super().resolve(request, handler)


def build_zone(zone: Zone, domains: list[str]) -> None:
    for domain in domains:
        zone.add(domain, "TXT", f"v=spf1 ip4:{CLIENT_IP} -all")
        zone.add(f"_dmarc.{domain}", "TXT", "v=DMARC1; p=quarantine")


def deliveries(domains: list[str]) -> list[tuple[ParsedMail, Any, bytes]]:
    made = []
    for n, domain in enumerate(domains):
        raw = (f"From: Customer {n} <customer@{domain}>\r\nTo: support@example.com\r\n"
               f"Subject: Printer {n}\r\nMessage-ID: <auth-bench-{n}@{domain}>\r\n"
               "Date: Mon, 07 Dec 2026 08:00:00 +0000\r\n\r\nThe printer is broken.\r\n"
               ).encode()
        envelope = Envelope(mail_from=f"customer@{domain}", rcpt_to=["support@example.com"],
                            client_ip=CLIENT_IP, helo=f"mail.{domain}")
        inbound = spool.new_inbound(raw, 1, "smtp", f"smtp:{CLIENT_IP}", envelope)
        mail = prepare_mail(raw, 10_000_000)
        assert mail is not None
        made.append((mail, inbound, raw))
    return made


def one_after_another(batch: list[tuple[ParsedMail, Any, bytes]], settings: Settings) -> None:
    for mail, inbound, raw in batch:
        add_evidence(mail, inbound, raw, settings)


def side_by_side(batch: list[tuple[ParsedMail, Any, bytes]], settings: Settings) -> None:
    add_evidence_many(batch, settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mails", type=int, default=16, help="mails per batch (a task's most)")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    server = LoopbackDns(SlowZone(args.latency_ms / 1000))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "ticketgate.toml"
            config.write_text(CONFIG.format(port=server.port), encoding="utf-8")
            settings = load_settings(config, database_url=f"sqlite:///{tmp}/unused.db")
            ways = {"one after another": one_after_another, "side by side": side_by_side}
            seconds: dict[str, list[float]] = {name: [] for name in ways}
            queries: dict[str, list[int]] = {name: [] for name in ways}
            verdicts: dict[str, set[str]] = {name: set() for name in ways}
            for round_ in range(args.rounds):
                for name, way in (ways.items() if round_ % 2 == 0 else reversed(ways.items())):
                    domains = [f"r{round_}-{name[0]}{n}.test" for n in range(args.mails)]
                    build_zone(server.zone, domains)
                    batch = deliveries(domains)
                    authentication._lookup.cache_clear()  # a cold resolver cache: new senders
                    asked = len(server.zone.queries)
                    started = time.perf_counter()
                    way(batch, settings)
                    seconds[name].append(time.perf_counter() - started)
                    queries[name].append(len(server.zone.queries) - asked)
                    verdicts[name].update(str(m.authentication.verdict if m.authentication
                                              else None) for m, _i, _r in batch)
    finally:
        server.stop()
    report = {
        "mails": args.mails, "latency_ms": args.latency_ms, "rounds": args.rounds,
        "ways": {name: {"median_ms": round(statistics.median(values) * 1000, 1),
                        "per_mail_ms": round(statistics.median(values) * 1000 / args.mails, 1),
                        "dns_queries_per_mail": statistics.median(queries[name]) / args.mails,
                        "verdicts": sorted(verdicts[name])}
                 for name, values in seconds.items()},
    }
    one, side = (statistics.median(seconds[n]) for n in ways)
    report["side_by_side_vs_one_after_another"] = round(side / one, 3)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
