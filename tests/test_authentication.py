"""SPF, DKIM and DMARC against a real DNS server on loopback (``tests/dnszone.py``).

Every mail goes through the whole pipeline (``Ingestor.ingest`` on SQLite).  The zone:

=================  =====================  ==========  ============================================
domain             SPF allows             DKIM key    DMARC
=================  =====================  ==========  ============================================
good.test          192.0.2.10             sel         p=reject (subdomains too: no sp)
techcorp.test      192.0.2.20             sel         p=none (the known customer's company)
quar.test          192.0.2.30             -           p=quarantine
nodmarc.test       192.0.2.40             -           none
subpol.test        -                      -           p=reject; sp=none
=================  =====================  ==========  ============================================

The attacker sends from 203.0.113.66, which no SPF record allows.
"""

from __future__ import annotations

import base64
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import message_from_bytes
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select

from ingest.authentication import (
    from_domain,
    organizational_domain,
    parse_authentication_results,
    parse_dmarc,
)
from ingest.config import load_settings
from ingest.models import FINAL_STATES, InboundMail, Message, Ticket
from ingest.pipeline import SpooledResults
from ingest.service import Ingestor
from ingest.spool import Envelope
from ingest.ticketinfo import TicketInfo
from tests.dnszone import HeldZone, LoopbackDns, unused_port
from tests.locks import database_held

ATTACKER = "203.0.113.66"
TRUSTED_ID = "mx.ticketgate.test"


@dataclass
class Key:
    pem: bytes
    public: str  # base64 SubjectPublicKeyInfo, the p= of the DKIM record


def new_key() -> Key:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return Key(pem, base64.b64encode(der).decode())


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {"good.test": new_key(), "techcorp.test": new_key()}


@pytest.fixture(scope="module")
def dns_server(keys: dict[str, Key]) -> Iterator[LoopbackDns]:
    server = LoopbackDns()
    zone = server.zone
    for domain, ip in (("good.test", "192.0.2.10"), ("techcorp.test", "192.0.2.20"),
                       ("quar.test", "192.0.2.30"), ("nodmarc.test", "192.0.2.40")):
        zone.add(domain, "TXT", f"v=spf1 ip4:{ip} -all")
        zone.add(domain, "A", ip)
    for domain, key in keys.items():
        zone.add(f"sel._domainkey.{domain}", "TXT", f"v=DKIM1; k=rsa; p={key.public}")
    zone.add("_dmarc.good.test", "TXT", "v=DMARC1; p=reject; rua=mailto:d@good.test")
    zone.add("_dmarc.techcorp.test", "TXT", "v=DMARC1; p=none")
    zone.add("_dmarc.quar.test", "TXT", "v=DMARC1; p=quarantine")
    zone.add("_dmarc.subpol.test", "TXT", "v=DMARC1; p=reject; sp=none")
    yield server
    server.stop()


CONFIG = """
[service]
base_url = "https://support.example.com"

[authentication]
nameservers = ["127.0.0.1"]
dns_port = {port}
dns_timeout = {timeout}
trusted_authserv_ids = ["{trusted}"]

[[associate]]
name = "sarah"
full_name = "Sarah Johnson"
email = "sarah@example.com"
[[category]]
name = "Technical Support"
[[priority]]
name = "Medium"
[[contact]]
name = "TechCorp"
domains = ["techcorp.test"]
[[person]]
first_name = "Michael"
last_name = "Thompson"
email = "michael@techcorp.test"
contact = "TechCorp"

[[mailbox]]
id = 1
name = "Support"
addresses = ["support@example.com"]
category = "Technical Support"
priority = "Medium"
owner = "sarah"
[[mailbox]]
id = 2
name = "Strict"
addresses = ["strict@example.com"]
authentication = {{ unauthenticated = "unverified" }}
[[mailbox]]
id = 3
name = "Record only"
addresses = ["audit@example.com"]
authentication = {{ enforce = false }}
[[mailbox]]
id = 4
name = "Partners"
addresses = ["partners@example.com"]
unknown_sender = "reject"
"""


@pytest.fixture
def make(tmp_path: Path, dns_server: LoopbackDns) -> Iterator[Callable[..., Ingestor]]:
    made: list[Ingestor] = []

    def build(port: int | None = None, timeout: float = 10.0) -> Ingestor:
        path = tmp_path / f"ticketgate-{len(made)}.toml"
        path.write_text(CONFIG.format(port=port or dns_server.port, timeout=timeout,
                                      trusted=TRUSTED_ID), encoding="utf-8")
        ingestor = Ingestor(load_settings(
            path, database_url=f"sqlite:///{tmp_path / f'tg-{len(made)}.db'}"))
        made.append(ingestor)
        return ingestor

    yield build
    for ingestor in made:
        ingestor.close()


@pytest.fixture
def ing(make: Callable[..., Ingestor]) -> Ingestor:
    return make()


_counter = iter(range(1, 10**6))


def mail(sender: str = "Michael Thompson <michael@techcorp.test>",
         subject: str = "Printer broken", body: str = "The printer on floor 2 is broken.\r\n",
         to: str = "support@example.com", headers: tuple[str, ...] = (),
         message_id: str | None = None) -> bytes:
    message_id = message_id or f"auth-{next(_counter)}@client.test"
    lines = [*headers, f"From: {sender}", f"To: {to}", f"Subject: {subject}",
             "Date: Sun, 22 Nov 2026 10:00:00 +0000", f"Message-ID: <{message_id}>",
             "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8"]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def sign(raw: bytes, domain: str, key: Key) -> bytes:
    signature = dkim.sign(raw, b"sel", domain.encode(), key.pem,
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return bytes(signature) + raw


def via_smtp(ing: Ingestor, raw: bytes, ip: str, mail_from: str, mailbox: int = 1
             ) -> TicketInfo:
    envelope = Envelope(mail_from=mail_from, rcpt_to=["support@example.com"], client_ip=ip,
                        helo=f"mail.{mail_from.rpartition('@')[2] or 'relay.test'}")
    return ing.ingest(raw, mailbox, door="smtp", source=f"smtp:{ip}", envelope=envelope)


def stored(ing: Ingestor, info: TicketInfo) -> tuple[Message | None, Ticket | None,
                                                       InboundMail]:
    with ing.session() as s:
        inbound = s.get(InboundMail, info.InboundId)
        assert inbound is not None
        message = s.get(Message, inbound.ticket_message_id) if inbound.ticket_message_id else None
        ticket = s.get(Ticket, info.TicketId) if info.TicketId else None
        s.expunge_all()
        return message, ticket, inbound


def auth_of(message: Message | None) -> dict[str, Any]:
    assert message is not None and message.authentication is not None
    return message.authentication


# --- our own checks (mail our SMTP listener took from the internet) --------------------------


def test_pass_spf_dkim_dmarc_and_known_person_attributed(ing: Ingestor, keys: dict[str, Key]
                                                         ) -> None:
    raw = sign(mail(), "techcorp.test", keys["techcorp.test"])
    info = via_smtp(ing, raw, "192.0.2.20", "michael@techcorp.test")
    assert info.Action == "created", info
    assert info.PersonName == "Michael Thompson"
    assert info.ContactName == "TechCorp"
    assert "unverified" not in (info.Reason or "")
    message, ticket, inbound = stored(ing, info)
    assert message is not None and ticket is not None
    assert message.auth_verdict == "pass" and not message.unverified and not ticket.unverified
    auth = auth_of(message)
    assert auth["source"] == "smtp"
    assert auth["spf"]["result"] == "pass" and auth["spf"]["aligned"] is True
    assert [d["result"] for d in auth["dkim"]] == ["pass"]
    assert auth["dmarc"]["result"] == "pass"
    assert any(line["step"] == "authenticate" and "pass" in line["note"]
               for line in inbound.trace)


def test_spf_fail_leaves_known_person_unattributed(ing: Ingestor) -> None:
    """A forged From of a known customer: SPF fails, no DKIM, DMARC p=none: a ticket, but no
    person, no company, flagged unverified, and the Reason says why."""
    info = via_smtp(ing, mail(), ATTACKER, "michael@techcorp.test")
    assert info.Action == "created"
    assert info.PersonName is None and info.ContactName is None
    assert "unverified sender" in (info.Reason or "")
    message, ticket, _ = stored(ing, info)
    assert message is not None and ticket is not None
    assert ticket.unverified and message.unverified and ticket.person_id is None
    auth = auth_of(message)
    assert auth["spf"]["result"] == "fail"
    assert auth["dkim"] == []
    assert auth["dmarc"]["result"] == "fail" and auth["policy"] == "none"
    assert message.auth_verdict == "fail"


def test_dkim_fails_on_tampered_body_and_passes_untouched(
        make: Callable[..., Ingestor], keys: dict[str, Key]) -> None:
    """From an IP SPF does not allow, only DKIM can authenticate: the untouched mail passes
    (aligned DKIM), the same mail with one word of its body changed after signing does not
    (two databases: the two mails share their Message-ID)."""
    signed = sign(mail(body="Please refund 10 EUR.\r\n"), "techcorp.test", keys["techcorp.test"])
    tampered = signed.replace(b"10 EUR", b"9000 EUR")
    ing, other = make(), make()
    good = via_smtp(ing, signed, ATTACKER, "michael@techcorp.test")
    bad = via_smtp(other, tampered, ATTACKER, "michael@techcorp.test")
    good_auth = auth_of(stored(ing, good)[0])
    bad_auth = auth_of(stored(other, bad)[0])
    assert good_auth["spf"]["result"] == bad_auth["spf"]["result"] == "fail"
    assert [d["result"] for d in good_auth["dkim"]] == ["pass"]
    assert good_auth["verdict"] == "pass" and good.PersonName == "Michael Thompson"
    assert [d["result"] for d in bad_auth["dkim"]] == ["fail"]
    assert bad_auth["verdict"] == "fail" and bad.PersonName is None


def test_dmarc_reject_quarantines_and_replay_releases_as_unverified(ing: Ingestor) -> None:
    raw = mail(sender="Alice <alice@good.test>", subject="Wire the money")
    info = via_smtp(ing, raw, ATTACKER, "alice@good.test")
    assert info.Action == "quarantined"
    assert info.TicketId == 0
    assert (info.Reason or "").startswith("DMARC policy reject: ")
    _, _, inbound = stored(ing, info)
    assert inbound.state == "quarantined" and inbound.ticket_id is None
    assert inbound.reason == info.Reason  # a clear reason, not "processing failed"
    with ing.session() as s:
        assert s.scalar(select(Ticket.id)) is None
    released = ing.replay_quarantined(info.InboundId or 0)
    assert released.Action == "created"
    assert "unverified sender" in (released.Reason or "")
    _, ticket, inbound = stored(ing, released)
    assert ticket is not None and ticket.unverified
    assert any("released" in line["note"] for line in inbound.trace)


def test_dmarc_quarantine_policy_quarantines(ing: Ingestor) -> None:
    info = via_smtp(ing, mail(sender="bob@quar.test"), ATTACKER, "bob@quar.test")
    assert info.Action == "quarantined"
    assert (info.Reason or "").startswith("DMARC policy quarantine: ")
    ok = via_smtp(ing, mail(sender="bob@quar.test"), "192.0.2.30", "bob@quar.test")
    assert ok.Action == "created" and "unverified" not in (ok.Reason or "")


def test_policy_discovery_uses_organizational_domain_and_sp(ing: Ingestor) -> None:
    """No record at the subdomain: the organizational domain's (public suffix list) applies,
    ``sp=`` when it has one (subpol.test: p=reject, sp=none), else ``p=`` (good.test)."""
    lax = via_smtp(ing, mail(sender="x@news.subpol.test"), ATTACKER, "x@news.subpol.test")
    assert lax.Action == "created"
    assert auth_of(stored(ing, lax)[0])["policy"] == "none"
    strict = via_smtp(ing, mail(sender="x@news.good.test"), ATTACKER, "x@news.good.test")
    assert strict.Action == "quarantined"
    assert "news.good.test" in (strict.Reason or "")


def test_no_dmarc_record_needs_an_aligned_pass(ing: Ingestor) -> None:
    ok = via_smtp(ing, mail(sender="c@nodmarc.test"), "192.0.2.40", "c@nodmarc.test")
    forged = via_smtp(ing, mail(sender="c@nodmarc.test"), ATTACKER, "c@nodmarc.test")
    assert ok.Action == forged.Action == "created"
    assert auth_of(stored(ing, ok)[0])["verdict"] == "pass"
    assert auth_of(stored(ing, forged)[0])["dmarc"]["result"] == "none"
    assert "unverified sender" in (forged.Reason or "")
    assert "unverified" not in (ok.Reason or "")


def test_spoofed_subject_tag_opens_a_new_unverified_ticket(ing: Ingestor, keys: dict[str, Key]
                                                           ) -> None:
    first = via_smtp(ing, sign(mail(), "techcorp.test", keys["techcorp.test"]), "192.0.2.20",
                     "michael@techcorp.test")
    tag = f"[#{first.TicketId}]"
    # The real customer may thread by the tag alone ...
    real = via_smtp(ing, sign(mail(subject=f"Re: {tag} Printer broken"), "techcorp.test",
                              keys["techcorp.test"]), "192.0.2.20", "michael@techcorp.test")
    assert real.Action == "appended" and real.TicketId == first.TicketId
    assert real.ThreadedBy == "subject-tag"
    # ... a forger using the same From and tag may not.
    spoof = via_smtp(ing, mail(subject=f"Re: {tag} Please change my bank account"), ATTACKER,
                     "michael@techcorp.test")
    assert spoof.Action == "created" and spoof.TicketId != first.TicketId
    assert "unverified sender" in (spoof.Reason or "")
    assert f"subject tag for ticket {first.TicketId} not trusted" in (spoof.Reason or "")
    assert spoof.PersonName is None
    _, ticket, _ = stored(ing, spoof)
    assert ticket is not None and ticket.unverified
    with ing.session() as s:
        original = s.get(Ticket, first.TicketId)
        assert original is not None and original.num_messages == 2


def test_header_evidence_still_threads_an_unverified_reply(ing: Ingestor, keys: dict[str, Key]
                                                           ) -> None:
    """In-Reply-To names a Message-ID only the conversation knows: it still threads, but the
    message is marked unverified and not attributed to the person."""
    first = via_smtp(ing, sign(mail(message_id="orig-1@techcorp.test"), "techcorp.test",
                               keys["techcorp.test"]), "192.0.2.20", "michael@techcorp.test")
    reply = via_smtp(ing, mail(subject="Re: Printer broken",
                               headers=("In-Reply-To: <orig-1@techcorp.test>",)),
                     ATTACKER, "michael@techcorp.test")
    assert reply.Action == "appended" and reply.TicketId == first.TicketId
    message, ticket, _ = stored(ing, reply)
    assert message is not None and message.unverified and message.person_id is None
    assert ticket is not None and not ticket.unverified


def test_unverified_known_person_rejected_by_known_persons_only_mailbox(ing: Ingestor) -> None:
    info = via_smtp(ing, mail(to="partners@example.com"), ATTACKER, "michael@techcorp.test",
                    mailbox=4)
    assert info.Action == "rejected"
    assert (info.Reason or "").startswith("unverified sender michael@techcorp.test")


def test_multiple_from_fields_are_never_a_pass(ing: Ingestor, keys: dict[str, Key]) -> None:
    raw = sign(mail(headers=("From: ceo@good.test",)), "techcorp.test", keys["techcorp.test"])
    info = via_smtp(ing, raw, "192.0.2.20", "michael@techcorp.test")
    assert info.Action == "created"
    auth = auth_of(stored(ing, info)[0])
    assert auth["from_domain"] is None and auth["verdict"] == "fail"
    assert "From fields" in auth["reason"]
    assert info.PersonName is None


def test_record_only_mailbox_evaluates_but_does_not_enforce(ing: Ingestor) -> None:
    info = via_smtp(ing, mail(sender="alice@good.test", to="audit@example.com"), ATTACKER,
                    "alice@good.test", mailbox=3)
    assert info.Action == "created"
    message = stored(ing, info)[0]
    assert message is not None and message.auth_verdict == "fail" and not message.unverified
    assert auth_of(message)["policy"] == "reject"


def test_dns_failure_is_temperror_never_quarantine(make: Callable[..., Ingestor]) -> None:
    ing = make(port=unused_port(), timeout=0.3)
    info = via_smtp(ing, mail(sender="alice@good.test"), ATTACKER, "alice@good.test")
    assert info.Action == "created"
    auth = auth_of(stored(ing, info)[0])
    assert auth["verdict"] == "temperror"
    assert auth["spf"]["result"] == "temperror"
    assert "unverified sender" in (info.Reason or "")


def test_trusted_relay_is_judged_by_headers_not_by_its_ip(ing: Ingestor,
                                                          dns_server: LoopbackDns) -> None:
    """Mail from a loopback relay (the default trusted_relays) is not SPF-checked against
    127.0.0.1; without a trusted Authentication-Results there is no evidence, and the default
    ``unauthenticated = "allow"`` keeps the old behaviour."""
    before = len(dns_server.zone.queries)
    info = via_smtp(ing, mail(), "127.0.0.1", "michael@techcorp.test")
    assert info.Action == "created" and info.PersonName == "Michael Thompson"
    message = stored(ing, info)[0]
    assert message is not None and message.auth_verdict == "none"
    assert message.authentication is None
    assert len(dns_server.zone.queries) == before


# --- Authentication-Results from a trusted MTA (IMAP, HTTP, replay) --------------------------


def ar(authserv_id: str, results: str) -> str:
    return f"Authentication-Results: {authserv_id};\r\n {results}"


PASS_RESULTS = ("spf=pass smtp.mailfrom=michael@techcorp.test;\r\n dkim=pass header.d=techcorp.test"
                " header.s=sel;\r\n dmarc=pass (p=none dis=none) header.from=techcorp.test")


def test_trusted_authentication_results_attribute_the_person(ing: Ingestor) -> None:
    raw = mail(to="strict@example.com", headers=(ar(TRUSTED_ID, PASS_RESULTS),))
    info = ing.ingest(raw, 2, door="imap", source="imap-uid-1")
    assert info.Action == "created" and info.PersonName == "Michael Thompson"
    auth = auth_of(stored(ing, info)[0])
    assert auth["source"] == "authentication-results" and auth["authserv_id"] == TRUSTED_ID
    assert auth["verdict"] == "pass"


def test_untrusted_authentication_results_are_ignored(ing: Ingestor) -> None:
    """Anyone can write an Authentication-Results field; one from an authserv-id that is not
    configured proves nothing (mailbox 2 treats mail without evidence as unverified)."""
    raw = mail(to="strict@example.com", headers=(ar("mx.evil.test", PASS_RESULTS),))
    info = ing.ingest(raw, 2, door="imap", source="imap-uid-2")
    assert info.Action == "created"
    assert info.PersonName is None
    assert "unverified sender" in (info.Reason or "")
    assert stored(ing, info)[0].auth_verdict == "none"  # type: ignore[union-attr]


def test_topmost_trusted_header_wins_over_a_forged_one_below(ing: Ingestor) -> None:
    forged = ar(TRUSTED_ID, "dmarc=pass header.from=good.test")
    real = ar(TRUSTED_ID, "spf=fail smtp.mailfrom=alice@good.test;\r\n dkim=none;\r\n"
                          " dmarc=fail (p=REJECT sp=REJECT dis=REJECT) header.from=good.test")
    raw = mail(sender="alice@good.test", headers=(real, "Received: from x by y", forged))
    info = ing.ingest(raw, 1, door="http")
    assert info.Action == "quarantined"
    assert (info.Reason or "").startswith("DMARC policy reject: ")


def test_authentication_results_without_dmarc_are_aligned_here(ing: Ingestor) -> None:
    """An MTA that checks SPF and DKIM but not DMARC: alignment is judged here, and the
    policy comes from DNS (techcorp.test: p=none, so no quarantine)."""
    aligned_dkim = ar(TRUSTED_ID, "spf=pass smtp.mailfrom=bounces@esp.test;\r\n"
                                  " dkim=pass header.d=techcorp.test")
    foreign_dkim = ar(TRUSTED_ID, "spf=pass smtp.mailfrom=bounces@esp.test;\r\n"
                                  " dkim=pass header.d=esp.test")
    ok = ing.ingest(mail(headers=(aligned_dkim,)), 1, door="imap", source="imap-uid-3")
    no = ing.ingest(mail(headers=(foreign_dkim,)), 1, door="imap", source="imap-uid-4")
    assert ok.PersonName == "Michael Thompson"
    assert no.Action == "created" and no.PersonName is None
    auth = auth_of(stored(ing, no)[0])
    assert auth["verdict"] == "fail" and auth["policy"] == "none"


def test_authentication_results_dmarc_for_another_domain_is_not_used(ing: Ingestor) -> None:
    """The MTA's dmarc= result is about header.from; if that is not our From domain, the result
    says nothing about this sender."""
    other = ar(TRUSTED_ID, "dmarc=pass header.from=elsewhere.test")
    info = ing.ingest(mail(headers=(other,)), 1, door="imap", source="imap-uid-5")
    assert info.PersonName is None
    assert auth_of(stored(ing, info)[0])["verdict"] == "fail"


def test_replay_without_trusted_ids_behaves_as_before(ing: Ingestor) -> None:
    info = ing.ingest(mail(headers=(ar("mx.evil.test", "dmarc=fail header.from=techcorp.test"),)),
                      1)
    assert info.Action == "created" and info.PersonName == "Michael Thompson"
    assert "unverified" not in (info.Reason or "")


# --- parsers and helpers ----------------------------------------------------------------------


def test_parse_authentication_results_comments_quotes_versions() -> None:
    header = parse_authentication_results(textwrap.dedent("""\
        mx.example.net 1; (a comment; with a semicolon)
         spf=pass (mx.example.net: "a;b"@x.test is allowed) smtp.mailfrom="a;b"@x.test;
         dkim/1=fail reason="bad sig" header.d=x.test header.s=s1;
         dmarc=fail (p=QUARANTINE sp=NONE dis=NONE) header.from=x.test"""))
    assert header is not None and header.authserv_id == "mx.example.net"
    methods = {r.method: r for r in header.results}
    assert methods["spf"].result == "pass"
    assert methods["spf"].properties["smtp.mailfrom"] == "a;b@x.test"
    assert methods["dkim"].result == "fail" and methods["dkim"].properties["header.d"] == "x.test"
    assert methods["dkim"].properties["reason"] == "bad sig"
    assert "p=QUARANTINE" in methods["dmarc"].comment
    none = parse_authentication_results("mx.example.net; none")
    assert none is not None and none.results == []
    assert parse_authentication_results("   ") is None


def test_organizational_domain_uses_the_public_suffix_list() -> None:
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("mail.example.com") == "example.com"
    assert organizational_domain("x.y.good.test") == "good.test"
    assert organizational_domain("foo.github.io") == "foo.github.io"  # PSL private section


def test_parse_dmarc_records() -> None:
    record = parse_dmarc(b"v=DMARC1; p=Reject; sp=none; adkim=s; pct=20")
    assert record is not None
    assert (record.p, record.sp, record.adkim, record.aspf, record.pct) == (
        "reject", "none", "s", "r", 20)
    assert parse_dmarc(b"p=reject; v=DMARC1") is None  # v= must come first
    assert parse_dmarc(b"v=DMARC1; p=bogus") is None
    bogus_with_rua = parse_dmarc(b"v=DMARC1; p=bogus; rua=mailto:x@y.test")
    assert bogus_with_rua is not None and bogus_with_rua.p == "none"


def test_from_domain_needs_exactly_one_author() -> None:
    assert from_domain(message_from_bytes(b"From: a@X.Test\r\n\r\n")) == ("x.test", "")
    assert from_domain(message_from_bytes(b"From: a@x.test, b@y.test\r\n\r\n"))[0] is None
    assert from_domain(message_from_bytes(b"From: a@x.test\r\nFrom: b@y.test\r\n\r\n"))[0] is None
    assert from_domain(message_from_bytes(b"Subject: none\r\n\r\n"))[0] is None


# --- a slow name server ------------------------------------------------------------------------


@pytest.mark.parametrize("together", [1, 2], ids=["alone", "batch"])
def test_slow_dns_holds_up_only_its_own_mail(make_ingestor: Callable[..., Ingestor],
                                             tmp_path: Path, together: int) -> None:
    """SPF, DKIM and DMARC lookups run before the mail's transaction.  While a worker waits on
    a name server that does not answer, the listener still spools (SQLite's one write lock is
    free) and the worker keeps no PostgreSQL transaction open; once the server answers, the
    mails are processed."""
    held = LoopbackDns(HeldZone())
    try:
        ing = make_ingestor(CONFIG.format(port=held.port, timeout=30.0, trusted=TRUSTED_ID),
                            tmp_path)
        envelope = Envelope(mail_from="michael@good.test", rcpt_to=["support@example.com"],
                            client_ip="192.0.2.10", helo="mail.good.test")
        ids = [ing.receive(mail(sender="Michael <michael@good.test>"), 1, door="smtp",
                           source="smtp:192.0.2.10", envelope=envelope)
               for _ in range(together)]
        results: list[SpooledResults] = []
        worker = threading.Thread(target=lambda: results.append(ing.process_many(ids)))
        worker.start()
        assert held.zone.asked.wait(20), "the worker never asked the name server"
        spooled: list[int] = []
        listener = threading.Thread(target=lambda: spooled.append(ing.receive(mail(), 1, "smtp")))
        listener.start()
        listener.join(10)
        assert spooled, "a spool write waited for another mail's DNS lookups"
        assert not database_held(ing)
        held.zone.released.set()
        worker.join(60)
        assert results and len(results[0].infos) == together
        assert {info.Action for info in results[0].infos.values()} == {"created"}
    finally:
        held.zone.released.set()
        held.stop()


@pytest.fixture
def looked_up(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """The inbound ids whose sender evidence is worked out, once per look-up."""
    import ingest.prepare as prepare
    import ingest.steps.authenticate as step

    ids: list[int | None] = []
    real_evidence = step.sender_evidence

    def counted(settings: Any, mailbox: Any, inbound: InboundMail, *rest: Any) -> Any:
        ids.append(inbound.id)
        return real_evidence(settings, mailbox, inbound, *rest)

    monkeypatch.setattr(prepare, "sender_evidence", counted)
    monkeypatch.setattr(step, "sender_evidence", counted)
    return ids


def spool_from(ing: Ingestor, domains: list[str]) -> list[int]:
    """One mail from a customer of each domain, spooled as the SMTP listener does."""
    return [ing.receive(mail(sender=f"Customer <customer@{domain}>"), 1, door="smtp",
                        source="smtp:192.0.2.10",
                        envelope=Envelope(mail_from=f"customer@{domain}",
                                          rcpt_to=["support@example.com"],
                                          client_ip="192.0.2.10", helo=f"mail.{domain}"))
            for domain in domains]


def test_a_batch_looks_its_senders_up_side_by_side(make: Callable[..., Ingestor]) -> None:
    """A worker batch's own SPF, DKIM and DMARC checks wait on name servers, so they run at
    once: while the server holds its first answer, the other senders' look-ups already reach
    it (one after the other, a batch of 16 new senders took 16 times one sender's time)."""
    held = LoopbackDns(HeldZone())
    try:
        ing = make(port=held.port, timeout=30.0)
        domains = ["first.test", "second.test", "third.test"]
        ids = spool_from(ing, domains)
        results: list[SpooledResults] = []
        worker = threading.Thread(target=lambda: results.append(ing.process_many(ids)))
        worker.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with held.zone.lock:
                asked = set(held.zone.waiting)
            if set(domains) <= asked:
                break
            time.sleep(0.01)
        assert set(domains) <= asked, f"looked up one after the other: {sorted(asked)}"
        held.zone.released.set()
        worker.join(60)
        assert results and {i.Action for i in results[0].infos.values()} == {"created"}
        assert len(results[0].infos) == len(domains)
    finally:
        held.zone.released.set()
        held.stop()


@pytest.fixture
def slow_senders(make: Callable[..., Ingestor], monkeypatch: pytest.MonkeyPatch
                 ) -> Iterator[tuple[Ingestor, HeldZone]]:
    """An ingestor whose name server holds its answers for slow.test and slower.test until the
    test releases them; a batch waits a second for look-ups."""
    import ingest.pipeline as pipeline

    monkeypatch.setattr(pipeline, "BATCH_EVIDENCE_WAIT_SECONDS", 1.0)
    held = LoopbackDns(HeldZone(only=["slow.test", "slower.test"]))
    try:
        held.zone.add("slow.test", "TXT", "v=spf1 ip4:192.0.2.10 -all")
        yield make(port=held.port, timeout=30.0), held.zone
    finally:
        held.zone.released.set()
        held.stop()


def records(ing: Ingestor, ids: list[int]) -> dict[int, tuple[str, int]]:
    """inbound id -> (state, attempts)"""
    with ing.session() as s:
        return {row.id: (row.state, row.attempts) for row in s.execute(
            select(InboundMail.id, InboundMail.state, InboundMail.attempts)
            .where(InboundMail.id.in_(ids)))}


def wait_until_final(ing: Ingestor, ids: list[int], seconds: float = 20.0) -> bool:
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        if all(state in FINAL_STATES for state, _ in records(ing, ids).values()):
            return True
        time.sleep(0.05)
    return False


def test_a_slow_sender_goes_on_after_its_batch(
        slow_senders: tuple[Ingestor, HeldZone], looked_up: list[int | None]) -> None:
    """A batch waits a bounded time for its senders' look-ups: a sender whose name server is
    slower goes on alone after the batch, which commits its other mails meanwhile (they waited
    for the slowest sender, up to the resolver's timeouts).  Its start stays counted while its
    checks run (one that kills the worker must count); its look-ups are not made twice: what
    they find when the server answers is what its mail is judged by."""
    ing, zone = slow_senders
    ids = spool_from(ing, ["slow.test", "quick.test", "other.test"])
    slow, *quick = ids
    results: list[SpooledResults] = []
    worker = threading.Thread(target=lambda: results.append(ing.process_many(ids)))
    worker.start()
    try:
        assert wait_until_final(ing, quick), \
            f"the batch waited for its slowest sender's name server: {records(ing, ids)}"
        assert records(ing, [slow])[slow] == ("received", 1) and zone.waiting
    finally:
        zone.released.set()
        worker.join(60)
    assert results and sorted(results[0].infos) == sorted(ids)
    assert {info.Action for info in results[0].infos.values()} == {"created"}
    assert records(ing, [slow])[slow][1] == 1
    assert sorted(looked_up) == sorted(ids)  # once each: the slow one's look-ups went on
    message, _ticket, _inbound = stored(ing, results[0].infos[slow])
    assert auth_of(message)["spf"]["result"] == "pass"


def test_slow_senders_go_on_in_the_order_their_look_ups_end(
        slow_senders: tuple[Ingestor, HeldZone]) -> None:
    """Of two slow senders, the one whose name server answers first is processed first: it
    does not wait behind the other, which came earlier in the task."""
    ing, zone = slow_senders
    ids = spool_from(ing, ["slower.test", "slow.test", "quick.test"])
    slower, slow, quick = ids
    results: list[SpooledResults] = []
    worker = threading.Thread(target=lambda: results.append(ing.process_many(ids)))
    worker.start()
    try:
        assert wait_until_final(ing, [quick])
        zone.release("slow.test")
        assert wait_until_final(ing, [slow]), "the slow sender waited behind the slower one"
        assert records(ing, [slower])[slower][0] == "received"
    finally:
        zone.released.set()
        worker.join(60)
    assert results and sorted(results[0].infos) == sorted(ids)


def test_a_slow_sender_past_the_deadline_is_handed_back_counted(
        slow_senders: tuple[Ingestor, HeldZone]) -> None:
    """The task does not wait for a slow sender's look-ups past its deadline: the mail is
    handed back to the broker, its start counted (its checks were running), and a later task
    processes it one by one."""
    ing, zone = slow_senders
    ids = spool_from(ing, ["slow.test", "quick.test", "other.test"])
    slow, *quick = ids
    results = ing.process_many(ids, deadline=time.monotonic() + 5.0)
    assert sorted(results.infos) == sorted(quick) and results.left == [slow]
    assert records(ing, [slow])[slow] == ("received", 1)
    zone.released.set()
    again = ing.process_many([slow])
    assert [info.Action for info in again.infos.values()] == ["created"]
    assert records(ing, [slow])[slow][1] == 2


def test_a_failed_batch_hands_its_evidence_to_the_mails_run_alone(
        ing: Ingestor, monkeypatch: pytest.MonkeyPatch, looked_up: list[int | None]) -> None:
    """A batch that fails is redone one by one; its mails' sender evidence is not looked up
    again (a resolver caches answers, not a silent name server's timeouts)."""
    import ingest.pipeline as pipeline

    envelope = Envelope(mail_from="michael@good.test", rcpt_to=["support@example.com"],
                        client_ip="192.0.2.10", helo="mail.good.test")
    ids = [ing.receive(mail(sender="Michael <michael@good.test>"), 1, door="smtp",
                       source="smtp:192.0.2.10", envelope=envelope) for _ in range(2)]

    def failing_write(*_args: Any) -> None:
        raise RuntimeError("a mail the batch cannot write")

    monkeypatch.setattr(pipeline, "_write_batch", failing_write)  # one by one needs none
    results = ing.process_many(ids)
    assert {info.Action for info in results.infos.values()} == {"created"}
    assert sorted(looked_up) == sorted(ids)  # once each, in the batch
    for info in results.infos.values():
        message, _ticket, _inbound = stored(ing, info)
        assert auth_of(message)["verdict"] == "pass"
