"""A worker batch's sender evidence (SPF, DKIM, DMARC) against a name server that takes time.

The end-to-end benchmarks send from 127.0.0.1, a trusted relay, so they make no DNS look-up at
all. Mail from the internet does: SPF on the client IP, DMARC policy discovery, a DKIM key per
signature. This measures, for one batch of mails from distinct new domains (a cold resolver
cache), the wall time of working out their evidence one after the other and side by side
(``ingest.prepare.add_evidence_many``), against a loopback DNS server (``tests/dnszone.py``)
that answers each query after ``--latency-ms``. Rounds alternate the two ways; medians.

    python bench/auth_bench.py                       # 16 DKIM-signed mails, 20 ms per query
    python bench/auth_bench.py --no-dkim --latency-ms 80
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

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


class Signer:
    """One RSA-2048 DKIM key (selector ``sel``) for every domain, as most senders sign."""

    def __init__(self) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.pem = key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption())
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        self.record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"

    def sign(self, raw: bytes, domain: str) -> bytes:
        return bytes(dkim.sign(raw, b"sel", domain.encode(), self.pem,
                               include_headers=[b"from", b"to", b"subject", b"date",
                                                b"message-id"])) + raw


def build_zone(zone: Zone, domains: list[str], signer: Signer | None) -> None:
    for domain in domains:
        zone.add(domain, "TXT", f"v=spf1 ip4:{CLIENT_IP} -all")
        zone.add(f"_dmarc.{domain}", "TXT", "v=DMARC1; p=quarantine")
        if signer is not None:
            zone.add(f"sel._domainkey.{domain}", "TXT", signer.record)


def deliveries(domains: list[str], signer: Signer | None) -> list[tuple[ParsedMail, Any, bytes]]:
    made = []
    for n, domain in enumerate(domains):
        raw = (f"From: Customer {n} <customer@{domain}>\r\nTo: support@example.com\r\n"
               f"Subject: Printer {n}\r\nMessage-ID: <auth-bench-{n}@{domain}>\r\n"
               "Date: Mon, 07 Dec 2026 08:00:00 +0000\r\n\r\n"
               + "The printer on floor 2 is broken again; the error says E-42.\r\n" * 40
               ).encode()
        if signer is not None:
            raw = signer.sign(raw, domain)
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


def warm_cache_cpu_ms(mails: int, latency_ms: float, signer: Signer | None,
                      rounds: int = 20) -> float:
    """CPU per mail of the evidence once the resolver has every answer cached: what a busy
    inbox pays for known senders (SPF and DMARC evaluated, no network)."""
    server = LoopbackDns(SlowZone(latency_ms / 1000))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "ticketgate.toml"
            config.write_text(CONFIG.format(port=server.port), encoding="utf-8")
            settings = load_settings(config, database_url=f"sqlite:///{tmp}/unused.db")
            domains = [f"warm{n}.test" for n in range(mails)]
            build_zone(server.zone, domains, signer)
            authentication._lookup.cache_clear()
            one_after_another(deliveries(domains, signer), settings)  # fills the cache
            batches = [deliveries(domains, signer) for _ in range(rounds)]
            started = time.process_time()
            for batch in batches:
                one_after_another(batch, settings)
            return round((time.process_time() - started) * 1000 / (rounds * mails), 3)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mails", type=int, default=16, help="mails per batch (a task's most)")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-dkim", action="store_true", help="unsigned mail (SPF, DMARC only)")
    args = parser.parse_args(argv)
    signer = None if args.no_dkim else Signer()

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
                    build_zone(server.zone, domains, signer)
                    batch = deliveries(domains, signer)
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
        "dkim_signed": signer is not None,
        "ways": {name: {"median_ms": round(statistics.median(values) * 1000, 1),
                        "per_mail_ms": round(statistics.median(values) * 1000 / args.mails, 1),
                        "dns_queries_per_mail": statistics.median(queries[name]) / args.mails,
                        "verdicts": sorted(verdicts[name])}
                 for name, values in seconds.items()},
    }
    one, side = (statistics.median(seconds[n]) for n in ways)
    report["side_by_side_vs_one_after_another"] = round(side / one, 3)
    report["warm_cache_cpu_ms_per_mail"] = warm_cache_cpu_ms(args.mails, args.latency_ms,
                                                             signer)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
