"""Who wrote the mail: the person (found or created), their company, and the people in Cc."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from email.utils import parseaddr

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from ingest.context import MailContext, Outcome
from ingest.models import Contact, ContactDomain, Person
from ingest.parse import ParsedMail

_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_PERSON_BY_EMAIL = (  # built once: see ingest.steps.dedupe
    select(Person).options(joinedload(Person.contact)).where(Person.email == bindparam("email")))
_PERSONS_BY_EMAIL = select(Person).options(joinedload(Person.contact)).where(
    Person.email.in_(bindparam("emails", expanding=True)))


# The longest address a mail can be sent to: RFC 5321's path limit of 256 octets, less its
# angle brackets (section 4.5.3.1.3).
MAX_ADDRESS_LENGTH = 254


def could_be_a_mailbox(address: str) -> bool:
    """Whether ``address`` can be a person's: it has a domain and is no longer than any address
    mail can reach.  A hostile From of 400 characters made the person's insert fail on
    PostgreSQL (``varchar(320)``), so the mail was quarantined, again at every replay, while
    SQLite stored it; now it is a mail from an unknown sender, as one with no address."""
    return "@" in address and len(address) <= MAX_ADDRESS_LENGTH


def normalize_address(address: str) -> str:
    """Lower-cased bare address; the display name and angle brackets removed.

    A plain ``local@domain.tld`` (what the parser hands over nearly always) is only lowered:
    ``parseaddr`` returns it unchanged and cost more than the rest of the sender step.
    """
    stripped = address.strip()
    if _PLAIN_ADDRESS.fullmatch(stripped):
        return stripped.lower()
    _name, bare = parseaddr(address)
    return (bare or address).strip().strip("<>").lower()


def contact_for_domain(session: Session, domain: str,
                       known_domains: Mapping[str, int] | None = None) -> Contact | None:
    """The company owning ``domain`` or a parent of it (mail.techcorp.com -> techcorp.com).

    ``known_domains`` (domain -> contact id, from :class:`~ingest.reference.Reference`) saves
    the query; the contact row itself usually comes from the session's identity map.
    """
    labels = domain.lower().strip(".").split(".")
    candidates = [".".join(labels[i:]) for i in range(len(labels) - 1)]
    if not candidates:
        return None
    if known_domains is not None:
        contact_id = next((known_domains[c] for c in candidates if c in known_domains), None)
        return session.get(Contact, contact_id) if contact_id is not None else None
    rows = session.execute(
        select(ContactDomain.domain, Contact)
        .join(Contact, Contact.id == ContactDomain.contact_id)
        .where(ContactDomain.domain.in_(candidates))
    ).all()
    by_domain = {d: c for d, c in rows}
    return next((by_domain[c] for c in candidates if c in by_domain), None)


def split_name(display: str, address: str) -> tuple[str, str]:
    display = re.sub(r"\([^)]*\)", " ", display)  # "Michael Thompson (TechCorp)"
    display = " ".join(display.strip().strip('"').split())
    if not display or "@" in display:
        return address.split("@", 1)[0], ""
    if "," in display:  # "Thompson, Michael"
        last, _, first = display.partition(",")
        return first.strip(), last.strip()
    first, _, last = display.rpartition(" ")
    return (first, last) if first else (last, "")


def _persons_seen(session: Session) -> dict[str, Person | None]:
    """Persons found or created in the session's current transaction, by address; None for an
    address read and not found (:func:`read_persons`).

    A replay batch is one transaction: a sender or colleague who writes twice in it is looked
    up once.  Tied to the transaction, so a rolled-back creation is never handed out again.
    """
    transaction = session.get_transaction()
    cached = session.info.get("persons_seen")
    if cached is None or cached[0] is not transaction:
        cached = session.info["persons_seen"] = (transaction, {})
    return cached[1]


def read_persons(session: Session, mails: Iterable[ParsedMail]) -> None:
    """Read the persons a batch's mails name (From, Reply-To, To, Cc) with one query,
    into the transaction's person cache, absent ones included."""
    seen = _persons_seen(session)
    wanted = list(dict.fromkeys(
        address for mail in mails
        for address in (normalize_address(raw) for _name, raw in
                        [("", mail.from_address), *mail.reply_to, *mail.to, *mail.cc])
        if "@" in address and address not in seen))
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        found = {person.email: person
                 for person in session.scalars(_PERSONS_BY_EMAIL, {"emails": chunk})}
        for address in chunk:
            seen[address] = found.get(address)


def find_or_create_person(
    session: Session, address: str, display: str, create: bool,
    known_domains: Mapping[str, int] | None = None,
) -> tuple[Person | None, bool]:
    seen = _persons_seen(session)
    if address in seen:
        person = seen[address]
    else:
        person = session.scalar(_PERSON_BY_EMAIL, {"email": address})
        if person is not None:
            seen[address] = person
    if person is not None or not create or not could_be_a_mailbox(address):
        return person, False
    first, last = split_name(display, address)
    contact = contact_for_domain(session, address.rpartition("@")[2], known_domains)
    person = Person(
        email=address,
        first_name=first[:200],
        last_name=last[:200],
        contact_id=contact.id if contact else None,
        origin="mail",
    )
    person.contact = contact
    try:
        with session.begin_nested():
            session.add(person)
            session.flush()
    except IntegrityError:
        # Another worker created this person first: its transaction has committed by now
        # (PostgreSQL made this insert wait for it), so take its row.  Without the savepoint
        # a worker batch was rolled back whole and redone mail by mail.
        person = session.scalar(_PERSON_BY_EMAIL, {"email": address})
        if person is None:
            raise
        seen[address] = person
        return person, False
    seen[address] = person
    return person, True


def identify_sender(ctx: MailContext) -> Outcome | None:
    if ctx.classification.is_automatic:
        ctx.trace.add("sender", f"{ctx.classification.kind}: sender not recorded as a person")
        return None
    policy = ctx.mailbox.unknown_sender or ctx.settings.service.unknown_sender
    creating_ticket = ctx.ticket is None
    address = normalize_address(ctx.sender_email) if ctx.sender_email else ""
    person, created = find_or_create_person(
        ctx.session, address, ctx.sender_name,
        create=(policy == "create" or not creating_ticket) and not ctx.unverified,
        known_domains=ctx.known_domains,
    )
    if person is not None and ctx.unverified:  # a forged From must not speak for a customer
        ctx.trace.add("sender", f"known person {address} not attributed: unverified sender")
        person = None
    if person is None and creating_ticket and policy == "reject":
        reason = (f"unverified sender {address}: {ctx.unverified}" if ctx.unverified else
                  f"unknown sender {address or '(no address)'}: mailbox accepts known persons only")
        ctx.trace.add("sender", reason)
        return Outcome("rejected", reason[:2000])
    ctx.person = person
    if person is not None:
        ctx.contact = person.contact or contact_for_domain(
            ctx.session, address.rpartition("@")[2], ctx.known_domains)
    ctx.secondary_persons = _secondary_persons(ctx, address, create=policy == "create")
    ctx.trace.add(
        "sender",
        f"{'created' if created else 'found' if person else 'no'} person {address or '-'}",
        contact=ctx.contact.name if ctx.contact else None,
        secondary=[p.email for p in ctx.secondary_persons],
    )
    return None


def _secondary_persons(ctx: MailContext, sender: str, create: bool) -> list[Person]:
    own = ctx.settings.own_addresses
    # The envelope recipients are our own addresses too, even for a catch-all mailbox.
    delivered_to = {normalize_address(a) for a in ctx.inbound.envelope_to or []}
    seen = {sender, *own, *delivered_to}
    result: list[Person] = []
    for display, raw in ctx.mail.to + ctx.mail.cc:
        address = normalize_address(raw)
        if address in seen or "@" not in address:
            continue
        seen.add(address)
        if len(result) >= ctx.settings.service.max_secondary_persons:
            ctx.trace.add("sender", "secondary persons capped",
                          limit=ctx.settings.service.max_secondary_persons)
            break
        person, _ = find_or_create_person(
            ctx.session, address, display, create,
            ctx.known_domains)
        if person is not None:
            result.append(person)
    return result
