"""Reference data (associates, categories, priorities, statuses, companies, persons, mailboxes)
lives in the configuration file; this module mirrors it into the database at start-up so tickets
can point at rows, and keeps name -> id maps so the pipeline never queries them per mail."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ingest import models
from ingest.config import Settings


@dataclass(slots=True)
class Reference:
    associates: dict[str, int] = field(default_factory=dict)
    associate_names: dict[int, str] = field(default_factory=dict)
    categories: dict[str, int] = field(default_factory=dict)
    category_names: dict[int, str] = field(default_factory=dict)
    priorities: dict[str, int] = field(default_factory=dict)
    priority_names: dict[int, str] = field(default_factory=dict)
    priority_deadline_hours: dict[int, float | None] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    status_base: dict[int, str] = field(default_factory=dict)
    # Companies come from the configuration only, so their domains are looked up here, not
    # queried for every sender.
    contact_domains: dict[str, int] = field(default_factory=dict)


def _upsert(session: Session, model: type, key: str, value: object, **fields: object) -> Any:
    row = session.scalar(select(model).where(getattr(model, key) == value))
    if row is None:
        row = model(**{key: value}, **fields)
        session.add(row)
    else:
        for name, val in fields.items():
            setattr(row, name, val)
    return row


def sync_reference(session: Session, settings: Settings) -> Reference:
    """Insert or update every configured item; never deletes (tickets may still point at it)."""
    for a in settings.associate:
        _upsert(session, models.Associate, "name", a.name,
                full_name=a.full_name or a.name, email=(a.email or "").lower() or None)
    for c in settings.category:
        _upsert(session, models.Category, "name", c.name, active=c.active)
    for p in settings.priority:
        _upsert(session, models.Priority, "name", p.name, active=p.active,
                deadline_hours=p.deadline_hours)
    for s in settings.status:
        _upsert(session, models.Status, "name", s.name, base_status=s.base_status, active=s.active)
    for c in settings.contact:
        contact = _upsert(session, models.Contact, "name", c.name)
        session.flush()
        for domain in c.domains:
            _upsert(session, models.ContactDomain, "domain", domain, contact_id=contact.id)
    session.flush()
    contacts = {c.name: c.id for c in session.scalars(select(models.Contact))}
    for p in settings.person:
        _upsert(session, models.Person, "email", p.email.strip().lower(),
                first_name=p.first_name, last_name=p.last_name,
                contact_id=contacts.get(p.contact) if p.contact else None, origin="config")
    for box in settings.mailbox:
        _upsert(session, models.MailboxRow, "id", box.id, name=box.name, addresses=box.addresses)
    session.flush()
    return load_reference(session)


def load_reference(session: Session) -> Reference:
    ref = Reference()
    for a in session.scalars(select(models.Associate)):
        ref.associates[a.name] = a.id
        ref.associate_names[a.id] = a.full_name or a.name
    for c in session.scalars(select(models.Category)):
        ref.categories[c.name] = c.id
        ref.category_names[c.id] = c.name
    for p in session.scalars(select(models.Priority)):
        ref.priorities[p.name] = p.id
        ref.priority_names[p.id] = p.name
        ref.priority_deadline_hours[p.id] = p.deadline_hours
    for s in session.scalars(select(models.Status)):
        ref.statuses[s.name] = s.id
        ref.status_base[s.id] = s.base_status
    for domain, contact_id in session.execute(
            select(models.ContactDomain.domain, models.ContactDomain.contact_id)):
        ref.contact_domains[domain.lower()] = contact_id
    return ref
