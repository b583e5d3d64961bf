"""Tickets as the HTTP API shows them: SuperOffice ``TicketEntity`` and ticket rows (seeds 000-002),
and the Autotask ``Tickets`` entity (seed 004), mapped to and from the ORM.

Why a module of its own, with no HTTP in it: the same mapping and the same validation must hold
whichever door a ticket is written through, and it has to be testable without a server.  The
FastAPI layer (``workers/api.py``) only parses requests, calls these functions and turns the
:class:`~ingest.errors.EntityError` family into structured 4xx answers; every error here names
the field at fault, because a client can only fix what it is told about.

Conventions, decided here once:

* Every timestamp is stored in UTC.  Input accepts any UTC offset (``+02:00``, ``Z``); a value
  without an offset is read in the caller's time zone (``SO-TimeZone``), else as UTC.  SuperOffice
  output is ISO-8601 in the caller's time zone; Autotask output is always UTC with ``Z`` (seed 004:
  "the REST API stores and returns all time data in UTC").
* What ticketgate has no data for is ``null``, never a missing key: clients written against the
  seeds index fields blindly.
* Picklist values (Autotask ``status``, ``priority``, ``ticketCategory``, ``queueID``...) are the
  database ids of the configured items, so they stay stable across restarts and match the
  SuperOffice ids (``Status.TicketStatusId``...).  ``source`` uses :data:`ORIGINS`.
* Only ACTIVE statuses, priorities and categories may be newly assigned; keeping an inactive value
  that a ticket already has is allowed (seed 004, "Updates are allowed on a Ticket with an inactive
  attribute value if that value is not being changed").
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.parser import HeaderParser
from email.policy import compat32
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    false,
    func,
    literal,
    or_,
    select,
    true,
)
from sqlalchemy.orm import Session, selectinload

from ingest import models
from ingest.config import Settings
from ingest.errors import EntityValidationError, InvalidFilter, TicketNotFound
from ingest.models import Associate, Attachment, Category, Message, Person, Priority, Status, Ticket
from ingest.steps.store import allocate_ticket_number

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
AUTO_ASSIGN = INT32_MAX  # SuperOffice: OwnedBy id MaxInt = assign by the category's rules
MAX_TITLE = 255
MAX_GET_TICKETS = 1000
MAX_TAGS = 50
MAX_TAG_LENGTH = 100
MAX_HEADERS_SHOWN = 200

Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]

# --- time ---------------------------------------------------------------------------------

_OFFSET_RE = re.compile(r"^(?:UTC|GMT)?\s*([+-])(\d{1,2})(?::?(\d{2}))?$", re.IGNORECASE)


def parse_timezone(code: str | None) -> dt.tzinfo:
    """The zone a caller asked for with ``SO-TimeZone``: an IANA name (``Europe/Oslo``, ``CET``),
    ``UTC``, or a fixed offset (``+02:00``, ``UTC+2``).  Absent means UTC."""
    if code is None or not code.strip():
        return dt.UTC
    code = code.strip()
    if code.upper() in ("UTC", "GMT", "Z"):
        return dt.UTC
    match = _OFFSET_RE.match(code)
    if match:
        sign, hours, minutes = match.group(1), int(match.group(2)), int(match.group(3) or 0)
        if hours > 14 or minutes > 59:
            raise EntityValidationError(f"time zone offset out of range: {code!r}", "SO-TimeZone")
        delta = dt.timedelta(hours=hours, minutes=minutes)
        return dt.timezone(-delta if sign == "-" else delta)
    try:
        if len(code) > 64 or "\x00" in code:
            raise ValueError(code)
        return ZoneInfo(code)
    except Exception:  # ZoneInfoNotFoundError, ValueError for paths, OSError for odd names
        raise EntityValidationError(
            f"unknown time zone {code!r}: use an IANA name (Europe/Oslo), UTC or an offset "
            "(+02:00)", "SO-TimeZone") from None


def parse_datetime(value: Any, field_name: str, default_tz: dt.tzinfo = dt.UTC
                   ) -> dt.datetime | None:
    """ISO-8601 with any offset (7 fractional digits, as in the seeds, are accepted) -> aware UTC.

    ``None`` and ``""`` mean "no value".  A value without an offset is read in ``default_tz``.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, dt.datetime):
        parsed = value
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > 64:
            raise EntityValidationError(f"{field_name}: not a date-time", field_name)
        # Python 3.11 reads up to 6 fractional digits reliably; .NET writes 7.
        text = re.sub(r"(\.\d{6})\d+", r"\1", text)
        try:
            parsed = dt.datetime.fromisoformat(text)
        except ValueError:
            raise EntityValidationError(
                f"{field_name}: {value!r} is not an ISO-8601 date-time", field_name) from None
    else:
        raise EntityValidationError(f"{field_name}: expected an ISO-8601 string", field_name)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=default_tz)
    try:
        return parsed.astimezone(dt.UTC)
    except OverflowError:
        raise EntityValidationError(f"{field_name}: date-time out of range", field_name) from None


def format_datetime(value: dt.datetime | None, tz: dt.tzinfo = dt.UTC) -> str | None:
    """ISO-8601 with the offset of ``tz`` (SuperOffice shape: ``2024-11-15T09:30:00+01:00``)."""
    if value is None:
        return None
    try:
        return value.astimezone(tz).isoformat()
    except OverflowError:  # year 1 or 9999 shifted past the edge of the calendar
        return value.astimezone(dt.UTC).isoformat()


def format_utc_z(value: dt.datetime | None) -> str | None:
    """Autotask shape: UTC with ``Z`` (``2024-11-15T08:30:00Z``), microseconds kept if any."""
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


# --- strings --------------------------------------------------------------------------------


def clean_text(value: Any, field_name: str, max_length: int, *, required: bool = False
               ) -> str:
    """A string the database takes on SQLite and PostgreSQL alike: no NUL, within its column."""
    if value is None:
        if required:
            raise EntityValidationError(f"{field_name} is required", field_name)
        return ""
    if not isinstance(value, str):
        raise EntityValidationError(f"{field_name} must be a string", field_name)
    if "\x00" in value:
        raise EntityValidationError(f"{field_name} must not contain NUL characters", field_name)
    if required and not value.strip():
        raise EntityValidationError(f"{field_name} is required and must not be empty", field_name)
    if len(value) > max_length:
        raise EntityValidationError(
            f"{field_name} is {len(value)} characters long; at most {max_length} are allowed",
            field_name)
    return value


# --- vocabularies ---------------------------------------------------------------------------

BASE_STATUS_NAMES = {"active": "Active", "closed": "Closed", "postponed": "Postponed",
                     "deleted": "Deleted"}
SLEVELS = {"external": "External", "internal": "Internal"}
# Ticket origins and their Autotask ``source`` picklist ids.  The pipeline stores "Mail", which
# SuperOffice calls "Email".
ORIGINS: dict[int, str] = {
    0: "Unknown",
    1: "Email",
    2: "Internal",
    3: "Phone",
    4: "Web",
    5: "Chat",
    6: "AutoGenerated",
    7: "Sms",
    8: "Api",
}
_STORED_ORIGIN = {"Email": "Mail"}
_SHOWN_ORIGIN = {"Mail": "Email"}
DEFAULT_API_ORIGIN = "Internal"


def origin_shown(stored: str | None) -> str | None:
    return _SHOWN_ORIGIN.get(stored, stored) if stored is not None else None


def origin_stored(shown: str, field_name: str) -> str:
    for name in ORIGINS.values():
        if name.lower() == shown.strip().lower():
            return _STORED_ORIGIN.get(name, name)
    if shown.strip().lower() == "mail":
        return "Mail"
    raise EntityValidationError(
        f"{field_name}: unknown origin {shown!r}; one of {', '.join(ORIGINS.values())}",
        field_name)


def origin_id(stored: str | None) -> int | None:
    shown = origin_shown(stored)
    for key, name in ORIGINS.items():
        if name == shown:
            return key
    return None


# --- reference data -------------------------------------------------------------------------


@dataclass(slots=True)
class RefData:
    """The reference rows (a few dozen at most), loaded once per request with active flags."""

    associates: dict[int, Associate]
    categories: dict[int, Category]
    priorities: dict[int, Priority]
    statuses: dict[int, Status]

    @classmethod
    def load(cls, session: Session) -> RefData:
        return cls(
            associates={a.id: a for a in session.scalars(select(Associate))},
            categories={c.id: c for c in session.scalars(select(Category))},
            priorities={p.id: p for p in session.scalars(select(Priority))},
            statuses={s.id: s for s in session.scalars(select(Status).order_by(Status.id))},
        )

    @staticmethod
    def by_name(rows: Mapping[int, Any], name: str | None) -> Any | None:
        if name is None:
            return None
        return next((r for r in rows.values() if r.name == name), None)


@dataclass(slots=True)
class Defaults:
    """What a new ticket gets when nobody says otherwise: the service's default status and the
    first configured mailbox's category, priority and owner (the demo's when unconfigured)."""

    status: Status | None
    category: Category | None
    priority: Priority | None
    owner: Associate | None
    mailbox_id: int | None

    @classmethod
    def of(cls, settings: Settings, ref: RefData) -> Defaults:
        box = settings.mailbox[0] if settings.mailbox else None
        return cls(
            status=RefData.by_name(ref.statuses, settings.service.default_status),
            category=RefData.by_name(ref.categories, box.category if box else None),
            priority=RefData.by_name(ref.priorities, box.priority if box else None),
            owner=RefData.by_name(ref.associates, box.owner if box else None),
            mailbox_id=box.id if box else None,
        )

    def deadline(self, created: dt.datetime, priority: Priority | None) -> dt.datetime | None:
        hours = priority.deadline_hours if priority is not None else None
        return created + dt.timedelta(hours=hours) if hours else None


# --- SuperOffice output ---------------------------------------------------------------------

ENTITY_TABLE_RIGHT = {"Mask": "Select, Insert, Update", "Reason": ""}
READ_TABLE_RIGHT = {"Mask": "Select", "Reason": ""}

# TicketEntity properties ticketgate stores and accepts on SaveTicketEntity (with their type and
# length), published as FieldProperties so a client can see what is writable.
_ENTITY_WRITABLE: dict[str, tuple[str, int]] = {
    "Title": ("System.String", MAX_TITLE),
    "CreatedAt": ("System.DateTime", 8),
    "ClosedAt": ("System.DateTime", 8),
    "RepliedAt": ("System.DateTime", 8),
    "Deadline": ("System.DateTime", 8),
    "CreatedBy": ("SuperOffice.CRM.Services.Associate", 4),
    "Author": ("System.String", 400),
    "OwnedBy": ("SuperOffice.CRM.Services.Associate", 4),
    "Category": ("SuperOffice.CRM.Services.TicketCategoryEntity", 4),
    "Slevel": ("System.String", 20),
    "Priority": ("SuperOffice.CRM.Services.TicketPriorityEntity", 4),
    "BaseStatus": ("System.String", 20),
    "Status": ("SuperOffice.CRM.Services.TicketStatusEntity", 4),
    "Origin": ("System.String", 30),
    "Person": ("SuperOffice.CRM.Services.Person", 4),
    "SecondaryPersons": ("SuperOffice.CRM.Services.Person[]", 0),
    "ConnectId": ("System.Int32", 4),
    "FromAddress": ("System.String", 320),
    "Tags": ("SuperOffice.CRM.Services.TagEntity[]", 0),
    "Language": ("System.String", 10),
}
_ENTITY_READ_ONLY: dict[str, tuple[str, int]] = {
    "TicketId": ("System.Int32", 4),
    "LastChanged": ("System.DateTime", 8),
    "HasAttachment": ("System.Boolean", 1),
    "NumReplies": ("System.Int32", 4),
    "NumMessages": ("System.Int32", 4),
    "Messages": ("SuperOffice.CRM.Services.TicketMessageEntity[]", 0),
    "RealTimeToReply": ("System.Int32", 4),
    "RealTimeToClose": ("System.Int32", 4),
}
ENTITY_FIELD_PROPERTIES: dict[str, dict[str, Any]] = {
    **{name: {"FieldRight": {"Mask": "Read, Update", "Reason": ""}, "FieldType": ftype,
              "FieldLength": length} for name, (ftype, length) in _ENTITY_WRITABLE.items()},
    **{name: {"FieldRight": {"Mask": "Read", "Reason": ""}, "FieldType": ftype,
              "FieldLength": length} for name, (ftype, length) in _ENTITY_READ_ONLY.items()},
}


def associate_entity(row: Associate | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "AssociateId": row.id,
        "Name": row.name,
        "PersonId": None,
        "Rank": None,
        "Tooltip": row.full_name or row.name,
        "Type": "Employee",
        "GroupIdx": None,
        "FullName": row.full_name or row.name,
        "FormalName": row.full_name or row.name,
        "Deleted": False,
        "EjUserId": None,
        "UserName": row.name,
        "Email": row.email,
        "TableRight": dict(READ_TABLE_RIGHT),
        "FieldProperties": {},
    }


def category_entity(row: Category | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "TicketCategoryId": row.id,
        "ParentId": 0,
        "Name": row.name,
        "Fullname": row.name,
        "Active": row.active,
        "TableRight": dict(READ_TABLE_RIGHT),
        "FieldProperties": {},
    }


def priority_entity(row: Priority | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "TicketPriorityId": row.id,
        "Name": row.name,
        "Status": "InUse" if row.active else "NotInUse",
        "Active": row.active,
        "DeadlineHours": row.deadline_hours,
        "TableRight": dict(READ_TABLE_RIGHT),
        "FieldProperties": {},
    }


def status_entity(row: Status | None, default_status: str | None = None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "TicketStatusId": row.id,
        "Name": row.name,
        "Status": BASE_STATUS_NAMES.get(row.base_status, row.base_status),
        "TimeCounter": None,
        "NoEmailReopen": None,
        "IsDefault": row.name == default_status,
        "UsedInQueue": None,
        "Active": row.active,
        "TableRight": dict(READ_TABLE_RIGHT),
        "FieldProperties": {},
    }


PERSON_FIELDS = (
    "Position", "PersonId", "Mrmrs", "Firstname", "Lastname", "MiddleName", "Title",
    "Description", "Email", "FullName", "DirectPhone", "FormalName", "CountryId", "ContactId",
    "ContactName", "Retired", "Rank", "ActiveInterests", "ContactDepartment", "ContactCountryId",
    "ContactOrgNr", "FaxPhone", "MobilePhone", "ContactPhone", "AssociateName", "AssociateId",
    "UsePersonAddress", "ContactFax", "Kanafname", "Kanalname", "Post1", "Post2", "Post3",
    "EmailName", "ContactFullName", "ActiveErpLinks", "TicketPriorityId", "SupportLanguageId",
    "SupportAssociateId", "CategoryName", "PersonNumber", "TableRight", "FieldProperties",
)


def person_entity(row: Person | None) -> dict[str, Any] | None:
    """The seeds' Person carrier (keys of the SecondaryPersons samples), filled where known."""
    if row is None:
        return None
    out: dict[str, Any] = dict.fromkeys(PERSON_FIELDS)
    contact = row.contact
    out.update(
        PersonId=row.id,
        Firstname=row.first_name,
        Lastname=row.last_name,
        MiddleName="",
        FullName=row.full_name,
        Email=row.email,
        EmailName=row.email,
        ContactId=contact.id if contact else None,
        ContactName=contact.name if contact else None,
        ContactFullName=contact.name if contact else None,
        TableRight=dict(READ_TABLE_RIGHT),
        FieldProperties={},
    )
    return out


def tag_entity(name: str) -> dict[str, Any]:
    return {"Id": None, "Name": name, "ToolTip": name, "TableRight": None, "FieldProperties": {}}


def _headers_list(block: str) -> list[dict[str, str]]:
    if not block:
        return []
    try:
        parsed = HeaderParser(policy=compat32).parsestr(block, headersonly=True)
        items = parsed.items()
    except Exception:  # hostile header block: show nothing rather than fail the request
        return []
    return [{"Name": str(k), "Value": str(v)} for k, v in items[:MAX_HEADERS_SHOWN]]


def _minutes_between(start: dt.datetime | None, end: dt.datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return max(0, int((end - start).total_seconds() // 60))


@dataclass(slots=True)
class MessageExtras:
    """Per-message data not on the Message row: attachment counts and authors' persons."""

    attachments: dict[int, int] = field(default_factory=dict)
    persons: dict[int, Person] = field(default_factory=dict)

    @classmethod
    def load(cls, session: Session, tickets: Sequence[Ticket]) -> MessageExtras:
        message_ids = [m.id for t in tickets for m in t.messages]
        person_ids = {m.person_id for t in tickets for m in t.messages if m.person_id}
        extras = cls()
        if message_ids:
            for message_id, count in session.execute(
                select(Attachment.message_id, func.count())
                .where(Attachment.message_id.in_(message_ids))
                .group_by(Attachment.message_id)
            ):
                extras.attachments[int(message_id)] = int(count)
        if person_ids:
            for person in session.scalars(
                select(Person).where(Person.id.in_(person_ids))
                .options(selectinload(Person.contact))
            ):
                extras.persons[person.id] = person
        return extras


def message_entity(message: Message, extras: MessageExtras, tz: dt.tzinfo) -> dict[str, Any]:
    person = extras.persons.get(message.person_id) if message.person_id else None
    contact = person.contact if person else None
    return {
        "TicketMessageId": message.id,
        "CreatedAt": format_datetime(message.created_at, tz),
        "Slevel": SLEVELS.get(message.slevel, message.slevel),
        "Important": message.important,
        "Author": message.author,
        "PersonId": person.id if person else None,
        "PersonFullName": person.full_name if person else None,
        "ContactId": contact.id if contact else None,
        "ContactName": contact.name if contact else None,
        "ContactDepartment": None,
        "NumAttachments": extras.attachments.get(message.id, 0),
        "EmailHeader": message.from_address,
        "MessageHeaders": _headers_list(message.headers),
        "Language": message.language,
        "Sentiment": None,
        "SentimentConfidence": None,
        "CreatedBy": None,
        "ChangedAt": format_datetime(message.created_at, tz),
        "Badge": None,
        "TableRight": dict(READ_TABLE_RIGHT),
        "FieldProperties": {},
    }


TICKET_ENTITY_FIELDS = (
    "TicketId", "Title", "CreatedAt", "LastChanged", "ReadByOwner", "ReadByCustomer",
    "FirstReadByOwner", "FirstReadByUser", "Activate", "ClosedAt", "RepliedAt", "AlertTimeout",
    "Deadline", "CreatedBy", "Author", "OwnedBy", "Category", "Slevel", "Priority", "BaseStatus",
    "Status", "Origin", "Person", "SecondaryPersons", "AlertLevel", "ConnectId", "ReadStatus",
    "TimeToReply", "RealTimeToReply", "TimeToClose", "RealTimeToClose", "TimeSpentInternally",
    "TimeSpentExternally", "TimeSpentQueue", "RealTimeSpentInternally", "RealTimeSpentExternally",
    "RealTimeSpentQueue", "TimeSpent", "HasAttachment", "NumReplies", "NumMessages",
    "FromAddress", "Messages", "Tags", "Language", "Sentiment", "SentimentConfidence",
    "SuggestedCategoryId", "SuggestedCategoryName", "OrigHumanCategoryId", "IconHint", "Sale",
    "Project", "FormSubmission", "TicketType", "ActiveStatusMonitorId", "ExtraFields",
    "CustomFields", "TableRight", "FieldProperties",
)


def ticket_entity(ticket: Ticket, extras: MessageExtras, tz: dt.tzinfo,
                  default_status: str | None = None) -> dict[str, Any]:
    """A ticket as SuperOffice's TicketEntity (seeds 000 and 001), every property present."""
    out: dict[str, Any] = dict.fromkeys(TICKET_ENTITY_FIELDS)
    messages = list(ticket.messages)
    out.update(
        TicketId=ticket.id or 0,
        Title=ticket.title,
        CreatedAt=format_datetime(ticket.created_at, tz),
        LastChanged=format_datetime(ticket.last_changed, tz),
        ClosedAt=format_datetime(ticket.closed_at, tz),
        RepliedAt=format_datetime(ticket.replied_at, tz),
        Deadline=format_datetime(ticket.deadline, tz),
        CreatedBy=associate_entity(ticket.created_by),
        Author=ticket.author,
        OwnedBy=associate_entity(ticket.owner),
        Category=category_entity(ticket.category),
        Slevel=SLEVELS.get(ticket.slevel, ticket.slevel),
        Priority=priority_entity(ticket.priority),
        BaseStatus=BASE_STATUS_NAMES.get(ticket.base_status, ticket.base_status),
        Status=status_entity(ticket.status, default_status),
        Origin=origin_shown(ticket.origin),
        Person=person_entity(ticket.person),
        SecondaryPersons=[person_entity(p) for p in ticket.secondary_persons],
        ConnectId=ticket.connect_id,
        RealTimeToReply=_minutes_between(ticket.created_at, ticket.replied_at),
        RealTimeToClose=_minutes_between(ticket.created_at, ticket.closed_at),
        HasAttachment=bool(ticket.has_attachment),
        NumReplies=ticket.num_replies or 0,
        NumMessages=ticket.num_messages or 0,
        FromAddress=ticket.from_address,
        Messages=[message_entity(m, extras, tz) for m in messages],
        Tags=[tag_entity(str(t)) for t in (ticket.tags or [])],
        Language=ticket.language,
        ExtraFields={},
        CustomFields={},
        TableRight=dict(ENTITY_TABLE_RIGHT),
        FieldProperties={k: {**v, "FieldRight": dict(v["FieldRight"])}
                         for k, v in ENTITY_FIELD_PROPERTIES.items()},
    )
    return out


GET_TICKETS_FIELDS = (
    "TicketId", "Title", "CreatedAt", "LastChanged", "ReadByOwner", "ReadByCustomer",
    "FirstReadByUser", "Activate", "ClosedAt", "RepliedAt", "AlertTimeout", "Deadline",
    "CreatedBy", "CreatedByName", "Author", "OwnedBy", "OwnedByName", "Category", "CategoryName",
    "CategoryFullname", "Slevel", "Priority", "PriorityName", "BaseStatus", "TicketStatus",
    "TicketStatusDisplayValue", "Origin", "CustId", "PersonFirstname", "PersonMiddleName",
    "PersonLastname", "PersonFullname", "AlertLevel", "ConnectId", "ReadStatus", "TimeToReply",
    "RealTimeToReply", "TimeToClose", "RealTimeToClose", "TimeSpentInternally",
    "TimeSpentExternally", "TimeSpentQueue", "RealTimeSpentInternally", "RealTimeSpentExternally",
    "RealTimeSpentQueue", "TimeSpent", "HasAttachment", "NumReplies", "NumMessages",
    "FromAddress", "ContactId", "ContactName", "OwnedByAssociateId", "Language", "Sentiment",
    "SentimentConfidence", "SaleId", "ProjectId", "SaleHeading", "ProjectName",
    "FormSubmissionId", "TicketTypeId", "TicketTypeName", "TableRight", "FieldProperties",
)


def ticket_row(ticket: Ticket, tz: dt.tzinfo) -> dict[str, Any]:
    """A ticket as a GetTickets row (seed 002): flat, every property of the seed's table."""
    out: dict[str, Any] = dict.fromkeys(GET_TICKETS_FIELDS)
    person, contact = ticket.person, ticket.contact
    owner, creator = ticket.owner, ticket.created_by
    out.update(
        TicketId=ticket.id,
        Title=ticket.title,
        CreatedAt=format_datetime(ticket.created_at, tz),
        LastChanged=format_datetime(ticket.last_changed, tz),
        ClosedAt=format_datetime(ticket.closed_at, tz),
        RepliedAt=format_datetime(ticket.replied_at, tz),
        Deadline=format_datetime(ticket.deadline, tz),
        CreatedBy=ticket.created_by_id,
        CreatedByName=(creator.full_name or creator.name) if creator else None,
        Author=ticket.author,
        OwnedBy=ticket.owned_by_id,
        OwnedByName=(owner.full_name or owner.name) if owner else None,
        Category=ticket.category_id,
        CategoryName=ticket.category.name if ticket.category else None,
        CategoryFullname=ticket.category.name if ticket.category else None,
        Slevel=SLEVELS.get(ticket.slevel, ticket.slevel),
        Priority=ticket.priority_id,
        PriorityName=ticket.priority.name if ticket.priority else None,
        BaseStatus=BASE_STATUS_NAMES.get(ticket.base_status, ticket.base_status),
        TicketStatus=ticket.status_id,
        TicketStatusDisplayValue=ticket.status.name if ticket.status else None,
        Origin=origin_shown(ticket.origin),
        CustId=ticket.person_id,
        PersonFirstname=person.first_name if person else None,
        PersonMiddleName="" if person else None,
        PersonLastname=person.last_name if person else None,
        PersonFullname=person.full_name if person else None,
        ConnectId=ticket.connect_id,
        RealTimeToReply=_minutes_between(ticket.created_at, ticket.replied_at),
        RealTimeToClose=_minutes_between(ticket.created_at, ticket.closed_at),
        HasAttachment=bool(ticket.has_attachment),
        NumReplies=ticket.num_replies or 0,
        NumMessages=ticket.num_messages or 0,
        FromAddress=ticket.from_address,
        ContactId=ticket.contact_id,
        ContactName=contact.name if contact else None,
        OwnedByAssociateId=ticket.owned_by_id,
        Language=ticket.language,
        TableRight=dict(READ_TABLE_RIGHT),
        FieldProperties={},
    )
    return out


def apply_select(row: dict[str, Any], select_param: str | None) -> dict[str, Any]:
    """SuperOffice ``$select``: keep the named properties, null out the others (keys stay).

    Names are matched case-insensitively; ``category/id`` selects the ``Category`` property as a
    whole; names that match nothing are ignored, as the seed's own example
    (``name,department,category/id``) requires.
    """
    if select_param is None or not select_param.strip():
        return row
    wanted = {part.strip().split("/", 1)[0].strip().lower()
              for part in select_param.split(",") if part.strip()}
    return {key: (value if key.lower() in wanted else None) for key, value in row.items()}


def _ticket_load_options() -> list[Any]:
    return [
        selectinload(Ticket.owner),
        selectinload(Ticket.created_by),
        selectinload(Ticket.category),
        selectinload(Ticket.priority),
        selectinload(Ticket.status),
        selectinload(Ticket.person).selectinload(Person.contact),
        selectinload(Ticket.contact),
        selectinload(Ticket.secondary_persons).selectinload(Person.contact),
    ]


def valid_ticket_ids(ids: Iterable[int]) -> list[int]:
    """Ids that can exist (int32, positive), in order, without repeats."""
    seen: dict[int, None] = {}
    for value in ids:
        if 0 < value <= INT32_MAX:
            seen.setdefault(value, None)
    return list(seen)


def load_tickets(session: Session, ids: Sequence[int], *, with_messages: bool = False
                 ) -> list[Ticket]:
    """Tickets by id, in the order asked; unknown ids are left out (GetTickets semantics)."""
    wanted = valid_ticket_ids(ids)
    if not wanted:
        return []
    options = _ticket_load_options()
    if with_messages:
        options.append(selectinload(Ticket.messages))
    rows = {t.id: t for t in session.scalars(
        select(Ticket).where(Ticket.id.in_(wanted)).options(*options))}
    return [rows[i] for i in wanted if i in rows]


def get_ticket(session: Session, ticket_id: int, *, with_messages: bool = False) -> Ticket:
    found = load_tickets(session, [ticket_id], with_messages=with_messages)
    if not found:
        raise TicketNotFound(f"no ticket with id {ticket_id}", "TicketId")
    return found[0]


def default_ticket(settings: Settings, ref: RefData, now: dt.datetime) -> Ticket:
    """A transient (never added) ticket carrying the configuration's defaults."""
    defaults = Defaults.of(settings, ref)
    ticket = Ticket(
        title="",
        created_at=now,
        last_changed=now,
        deadline=defaults.deadline(now, defaults.priority),
        author="",
        slevel="external",
        origin=DEFAULT_API_ORIGIN,
        from_address="",
        num_messages=0,
        num_replies=0,
        has_attachment=False,
        tags=[],
        base_status=defaults.status.base_status if defaults.status else "active",
    )
    ticket.status = defaults.status
    ticket.category = defaults.category
    ticket.priority = defaults.priority
    ticket.owner = defaults.owner
    return ticket


def default_ticket_entity(session: Session, settings: Settings, tz: dt.tzinfo,
                          now: dt.datetime | None = None) -> dict[str, Any]:
    """CreateDefaultTicketEntity (seed 000): the defaults a new ticket would get; not saved."""
    ref = RefData.load(session)
    ticket = default_ticket(settings, ref, now or models.utcnow())
    entity = ticket_entity(ticket, MessageExtras(), tz, settings.service.default_status)
    session.expunge_all()  # the transient ticket must never be flushed by accident
    return entity


# --- SuperOffice input ----------------------------------------------------------------------


def text_problem(value: Any) -> str | None:
    """What makes ``value`` (a string, or lists and dicts of them) text no database stores: a
    lone UTF-16 surrogate, which a JSON escape such as ``\\ud800`` produces.  It reached the
    driver and the caller got a 500; None when all is well."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"not valid Unicode: a lone surrogate ({value[exc.start]!r}) at character "
                    f"{exc.start}")
        return None
    if isinstance(value, dict):
        items: Iterable[Any] = [*value.keys(), *value.values()]
    elif isinstance(value, list | tuple):
        items = value
    else:
        return None
    return next((problem for item in items if (problem := text_problem(item))), None)


class ValidText(BaseModel):
    """A request body whose text can be stored: each field, and each undeclared one a model
    keeps, is checked with :func:`text_problem` (a 400 naming the field)."""

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        if problem := text_problem(value):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _storable_extra(self) -> ValidText:
        for name, value in (self.model_extra or {}).items():
            if problem := text_problem(value):
                raise ValueError(f"{name}: {problem}")
        return self


class _In(ValidText):
    # Unknown properties are ignored, as SuperOffice does; read-only ones are declared below so
    # they are type-checked and documented, and then ignored on save.
    model_config = ConfigDict(extra="ignore")


class AssociateRef(_In):
    AssociateId: Int32 | None = None
    Name: str | None = None


class CategoryRef(_In):
    TicketCategoryId: Int32 | None = None
    Name: str | None = None


class PriorityRef(_In):
    TicketPriorityId: Int32 | None = None
    Name: str | None = None


class StatusRef(_In):
    TicketStatusId: Int32 | None = None
    Name: str | None = None


class PersonRef(_In):
    PersonId: Int32 | None = None
    Email: str | None = None


class TagRef(_In):
    Id: Int32 | None = None
    Name: str | None = None


class TicketEntityIn(_In):
    """The SaveTicketEntity request body (seed 001's request table).

    Dates are strings on purpose: any ISO-8601 offset is accepted and stored in UTC.
    """

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"TicketId": 0, "Title": "Printer broken", "Priority": {"Name": "Medium"},
         "Deadline": "2030-01-01T12:00:00+01:00"}]})

    TicketId: Int32 | None = None
    Title: str | None = None
    CreatedAt: str | None = None
    LastChanged: str | None = None
    ReadByOwner: str | None = None
    ReadByCustomer: str | None = None
    FirstReadByOwner: str | None = None
    FirstReadByUser: str | None = None
    Activate: str | None = None
    ClosedAt: str | None = None
    RepliedAt: str | None = None
    AlertTimeout: str | None = None
    Deadline: str | None = None
    CreatedBy: AssociateRef | None = None
    Author: str | None = None
    OwnedBy: AssociateRef | None = None
    Category: CategoryRef | None = None
    Slevel: str | None = None
    Priority: PriorityRef | None = None
    BaseStatus: str | None = None
    Status: StatusRef | None = None
    Origin: str | None = None
    Person: PersonRef | None = None
    SecondaryPersons: list[PersonRef] | None = None
    AlertLevel: Int32 | None = None
    ConnectId: Int32 | None = None
    ReadStatus: str | None = None
    TimeToReply: Int32 | None = None
    RealTimeToReply: Int32 | None = None
    TimeToClose: Int32 | None = None
    RealTimeToClose: Int32 | None = None
    TimeSpentInternally: Int32 | None = None
    TimeSpentExternally: Int32 | None = None
    TimeSpentQueue: Int32 | None = None
    RealTimeSpentInternally: Int32 | None = None
    RealTimeSpentExternally: Int32 | None = None
    RealTimeSpentQueue: Int32 | None = None
    TimeSpent: Int32 | None = None
    HasAttachment: bool | None = None
    NumReplies: Int32 | None = None
    NumMessages: Int32 | None = None
    FromAddress: str | None = None
    Messages: list[dict[str, Any]] | None = None
    Tags: list[TagRef | str] | None = None
    Language: str | None = None
    Sentiment: Int32 | None = None
    SentimentConfidence: Int32 | None = None
    SuggestedCategoryId: Int32 | None = None
    SuggestedCategoryName: str | None = None
    OrigHumanCategoryId: Int32 | None = None
    IconHint: str | None = None
    Sale: dict[str, Any] | None = None
    Project: dict[str, Any] | None = None
    FormSubmission: dict[str, Any] | None = None
    TicketType: dict[str, Any] | None = None
    ActiveStatusMonitorId: Int32 | None = None
    ExtraFields: dict[str, Any] | None = None
    CustomFields: dict[str, Any] | None = None


def _resolve(rows: Mapping[int, Any], ident: int | None, name: str | None, field_name: str,
             kind: str) -> Any:
    row = rows.get(ident) if ident else None
    if row is None and not ident and name is not None:
        row = RefData.by_name(rows, name)
    if row is None:
        what = f"id {ident}" if ident else f"name {name!r}"
        raise EntityValidationError(f"{field_name}: no {kind} with {what}", field_name)
    return row


def _assign_active(row: Any, current_id: int | None, field_name: str, kind: str) -> int:
    """Seed 004's rule: an inactive value may be kept, never newly assigned."""
    if row.id != current_id and not row.active:
        raise EntityValidationError(
            f"{field_name}: {kind} {row.name!r} is inactive and cannot be newly assigned",
            field_name)
    return int(row.id)


@dataclass(slots=True)
class _Writer:
    """Applies validated values to a Ticket; shared by the SuperOffice and Autotask savers."""

    session: Session
    settings: Settings
    ref: RefData
    ticket: Ticket
    creating: bool
    now: dt.datetime

    def title(self, value: Any, field_name: str) -> None:
        self.ticket.title = clean_text(value, field_name, MAX_TITLE, required=True).strip()

    def status(self, row: Status, field_name: str) -> None:
        ticket = self.ticket
        ticket.status_id = _assign_active(row, ticket.status_id, field_name, "status")
        ticket.status = row
        was_closed = ticket.base_status == "closed"
        ticket.base_status = row.base_status
        if row.base_status == "closed" and ticket.closed_at is None:
            ticket.closed_at = self.now
        elif row.base_status != "closed" and was_closed:
            ticket.closed_at = None

    def status_for_base(self, base: str, field_name: str) -> None:
        key = base.strip().lower()
        if key not in BASE_STATUS_NAMES:
            raise EntityValidationError(
                f"{field_name}: unknown base status {base!r}; one of "
                f"{', '.join(BASE_STATUS_NAMES.values())}", field_name)
        if not self.creating and self.ticket.base_status == key:
            return
        row = next((s for s in self.ref.statuses.values()
                    if s.base_status == key and s.active), None)
        if row is None:
            raise EntityValidationError(
                f"{field_name}: no active status with base status {base!r} is configured",
                field_name)
        self.status(row, field_name)

    def category(self, row: Category | None, field_name: str) -> None:
        if row is None:
            self.ticket.category_id, self.ticket.category = None, None
            return
        self.ticket.category_id = _assign_active(row, self.ticket.category_id, field_name,
                                                 "category")
        self.ticket.category = row

    def priority(self, row: Priority | None, field_name: str) -> None:
        if row is None:
            self.ticket.priority_id, self.ticket.priority = None, None
            return
        self.ticket.priority_id = _assign_active(row, self.ticket.priority_id, field_name,
                                                 "priority")
        self.ticket.priority = row

    def owner(self, ident: int | None, name: str | None, field_name: str) -> None:
        if ident == AUTO_ASSIGN:
            # ticketgate has no per-category assignment rules: the mailbox's owner is the rule.
            box_id = self.ticket.mailbox_id
            box = self.settings.mailboxes_by_id.get(box_id) if box_id is not None else None
            box = box or (self.settings.mailbox[0] if self.settings.mailbox else None)
            row = RefData.by_name(self.ref.associates, box.owner if box else None)
        elif ident == 0 or (ident is None and not name):
            row = None
        else:
            row = _resolve(self.ref.associates, ident, name, field_name, "associate")
        self.ticket.owned_by_id = row.id if row else None
        self.ticket.owner = row

    def person(self, ident: int | None, email: str | None, field_name: str) -> None:
        if ident == 0 or (ident is None and not email):
            self.ticket.person_id, self.ticket.person = None, None
            return
        row = self._person(ident, email, field_name)
        self.ticket.person_id, self.ticket.person = row.id, row
        if row.contact_id is not None:
            self.ticket.contact_id = row.contact_id

    def _person(self, ident: int | None, email: str | None, field_name: str) -> Person:
        row: Person | None = None
        if ident:
            row = self.session.get(Person, ident)
        elif email:
            row = self.session.scalar(select(Person).where(
                Person.email == email.strip().lower()[:320]))
        if row is None:
            what = f"id {ident}" if ident else f"e-mail {email!r}"
            raise EntityValidationError(f"{field_name}: no person with {what}", field_name)
        return row

    def secondary_persons(self, refs: Sequence[PersonRef]) -> None:
        limit = self.settings.service.max_secondary_persons
        if len(refs) > limit:
            raise EntityValidationError(
                f"SecondaryPersons: at most {limit} are allowed", "SecondaryPersons")
        chosen: dict[int, Person] = {}
        for i, ref in enumerate(refs):
            row = self._person(ref.PersonId, ref.Email, f"SecondaryPersons[{i}]")
            if row.id != self.ticket.person_id:
                chosen.setdefault(row.id, row)
        self.ticket.secondary_persons = list(chosen.values())

    def connect_id(self, value: int | None, field_name: str) -> None:
        if not value:
            self.ticket.connect_id = None
            return
        if value == self.ticket.id or self.session.get(Ticket, value) is None:
            raise EntityValidationError(f"{field_name}: no other ticket with id {value}",
                                        field_name)
        self.ticket.connect_id = value

    def tags(self, values: Sequence[TagRef | str]) -> None:
        names: list[str] = []
        if len(values) > MAX_TAGS:
            raise EntityValidationError(f"Tags: at most {MAX_TAGS} tags are allowed", "Tags")
        for i, value in enumerate(values):
            raw = value if isinstance(value, str) else value.Name
            name = clean_text(raw, f"Tags[{i}].Name", MAX_TAG_LENGTH, required=True).strip()
            if name not in names:
                names.append(name)
        self.ticket.tags = names

    def finish(self, created_by: Associate | None = None) -> Ticket:
        ticket = self.ticket
        ticket.last_changed = self.now
        if self.creating:
            if ticket.created_at is None:
                ticket.created_at = self.now
            if created_by is not None:
                ticket.created_by_id, ticket.created_by = created_by.id, created_by
            ticket.ticket_number = allocate_ticket_number(self.session, self.now)
            self.session.add(ticket)
        self.session.flush()
        return ticket


def _new_ticket(settings: Settings, ref: RefData, now: dt.datetime) -> Ticket:
    ticket = default_ticket(settings, ref, now)
    ticket.created_at = None  # type: ignore[assignment]  # set by the caller or by finish()
    ticket.deadline = None
    return ticket


def api_user_associate(ref: RefData, user_name: str | None) -> Associate | None:
    """The associate an API user stands for: the one with the same name, if any."""
    return RefData.by_name(ref.associates, user_name) if user_name else None


def save_ticket_entity(session: Session, settings: Settings, entity: TicketEntityIn, *,
                       user_name: str | None = None, tz: dt.tzinfo = dt.UTC,
                       now: dt.datetime | None = None) -> Ticket:
    """SaveTicketEntity (seed 001): create when ``TicketId`` is 0 or missing, else update.

    Only properties present in the body are applied on update; on create, absent ones take the
    defaults CreateDefaultTicketEntity shows.  Read-only properties (counters, Messages,
    LastChanged...) are ignored.  Raises EntityValidationError / TicketNotFound naming the field.
    The caller commits.
    """
    now = now or models.utcnow()
    given = entity.model_fields_set
    ref = RefData.load(session)
    ticket_id = entity.TicketId or 0
    if ticket_id < 0:
        raise EntityValidationError("TicketId must be 0 (new ticket) or an existing id",
                                    "TicketId")
    creating = ticket_id == 0
    if creating:
        ticket = _new_ticket(settings, ref, now)
    else:
        found = session.get(Ticket, ticket_id, with_for_update=True,
                            options=_ticket_load_options())
        if found is None:
            raise TicketNotFound(f"no ticket with id {ticket_id}", "TicketId")
        ticket = found
    w = _Writer(session, settings, ref, ticket, creating, now)
    defaults = Defaults.of(settings, ref)

    if creating or "Title" in given:
        w.title(entity.Title, "Title")
    # Status decides BaseStatus; a BaseStatus alone picks the first active status of that kind.
    if entity.Status is not None and (entity.Status.TicketStatusId or entity.Status.Name):
        w.status(_resolve(ref.statuses, entity.Status.TicketStatusId, entity.Status.Name,
                          "Status", "status"), "Status")
    elif entity.BaseStatus is not None and "BaseStatus" in given:
        w.status_for_base(entity.BaseStatus, "BaseStatus")
    elif creating:
        if defaults.status is None:
            raise EntityValidationError("no default status is configured", "Status")
        w.status(defaults.status, "Status")
    # A nested reference with neither id nor name counts as absent; id 0 clears it.
    c = entity.Category
    if c is not None and (c.TicketCategoryId is not None or c.Name):
        w.category(None if c.TicketCategoryId == 0 else _resolve(
            ref.categories, c.TicketCategoryId, c.Name, "Category", "category"), "Category")
    elif creating and defaults.category is not None:
        w.category(defaults.category, "Category")
    p = entity.Priority
    if p is not None and (p.TicketPriorityId is not None or p.Name):
        w.priority(None if p.TicketPriorityId == 0 else _resolve(
            ref.priorities, p.TicketPriorityId, p.Name, "Priority", "priority"), "Priority")
    elif creating and defaults.priority is not None:
        w.priority(defaults.priority, "Priority")
    o = entity.OwnedBy
    if o is not None and (o.AssociateId is not None or o.Name):
        w.owner(o.AssociateId, o.Name, "OwnedBy")
    elif creating and defaults.owner is not None:
        w.owner(defaults.owner.id, None, "OwnedBy")
    if entity.Person is not None and (entity.Person.PersonId is not None or
                                      entity.Person.Email):
        w.person(entity.Person.PersonId, entity.Person.Email, "Person")
    if entity.SecondaryPersons is not None:
        w.secondary_persons(entity.SecondaryPersons)
    if "Author" in given:
        ticket.author = clean_text(entity.Author, "Author", 400)
    if "FromAddress" in given:
        ticket.from_address = clean_text(entity.FromAddress, "FromAddress", 320)
    if entity.Slevel is not None:
        key = entity.Slevel.strip().lower()
        if key not in SLEVELS:
            raise EntityValidationError("Slevel must be External or Internal", "Slevel")
        ticket.slevel = key
    if entity.Origin is not None:
        ticket.origin = origin_stored(entity.Origin, "Origin")
    if "Language" in given:
        ticket.language = clean_text(entity.Language, "Language", 10) or None
    if "ConnectId" in given:
        w.connect_id(entity.ConnectId, "ConnectId")
    if entity.Tags is not None:
        w.tags(entity.Tags)
    if creating and entity.CreatedAt:
        ticket.created_at = parse_datetime(entity.CreatedAt, "CreatedAt", tz)  # type: ignore
    for name, attr in (("ClosedAt", "closed_at"), ("RepliedAt", "replied_at"),
                       ("Deadline", "deadline")):
        if name in given:
            setattr(ticket, attr, parse_datetime(getattr(entity, name), name, tz))
    if creating and "Deadline" not in given:
        ticket.deadline = defaults.deadline(ticket.created_at or now, ticket.priority)
    created_by = None
    if creating:
        if entity.CreatedBy is not None and (entity.CreatedBy.AssociateId or
                                             entity.CreatedBy.Name):
            created_by = _resolve(ref.associates, entity.CreatedBy.AssociateId,
                                  entity.CreatedBy.Name, "CreatedBy", "associate")
        else:
            created_by = api_user_associate(ref, user_name)
    return w.finish(created_by)


# --- Autotask -------------------------------------------------------------------------------

AtType = Literal["integer", "long", "string", "datetime", "boolean", "decimal"]


@dataclass(frozen=True, slots=True)
class AutotaskField:
    """One row of seed 004's field table, and how ticketgate maps it."""

    name: str
    type: AtType
    max_length: int | None = None
    read_only: bool = False
    queryable: bool = True
    picklist: bool = False
    reference: str | None = None
    # The ORM attribute it reads and writes; None = ticketgate has no data (always null).
    column: str | None = None
    writable: bool = False


def _f(name: str, type_: AtType, **kw: Any) -> AutotaskField:
    return AutotaskField(name, type_, **kw)


AUTOTASK_FIELDS: tuple[AutotaskField, ...] = (
    _f("apiVendorID", "integer", read_only=True, picklist=True),
    _f("assignedResourceID", "integer", reference="Resources", column="owned_by_id",
       writable=True),
    _f("assignedResourceroleID", "integer", reference="Roles"),
    _f("billingCodeID", "integer", reference="BillingCodes"),
    _f("changeApprovalBoard", "integer", picklist=True),
    _f("changeApprovalStatus", "integer", picklist=True),
    _f("changeApprovalType", "integer", picklist=True),
    _f("changeInfoField1", "string", max_length=8000),
    _f("changeInfoField2", "string", max_length=8000),
    _f("changeInfoField3", "string", max_length=8000),
    _f("changeInfoField4", "string", max_length=8000),
    _f("changeInfoField5", "string", max_length=8000),
    _f("companyID", "integer", reference="Companies", column="contact_id", writable=True),
    _f("companylocationID", "integer", reference="CompanyLocations"),
    _f("completedByResourceID", "integer", read_only=True, reference="Resources"),
    _f("completedDate", "datetime", read_only=True, column="closed_at"),
    _f("configurationItemID", "integer", reference="ConfigurationItems"),
    _f("contactID", "integer", reference="Contacts", column="person_id", writable=True),
    _f("contractID", "integer", reference="Contracts"),
    _f("contractServiceBundleID", "long", reference="ContractServiceBundles"),
    _f("contractServiceID", "long", reference="ContractServices"),
    _f("createDate", "datetime", read_only=True, column="created_at"),
    _f("createdByContactID", "integer", read_only=True, reference="Contacts"),
    _f("creatorResourceID", "integer", read_only=True, reference="Resources",
       column="created_by_id"),
    _f("creatorType", "integer", read_only=True, queryable=False, picklist=True),
    _f("currentServiceThermometerRating", "integer", read_only=True, picklist=True),
    _f("description", "string", max_length=8000, column="description", writable=True),
    _f("dueDateTime", "datetime", column="deadline", writable=True),
    _f("estimatedHours", "decimal"),
    _f("externalID", "string", max_length=50),
    _f("firstResponseAssignedResourceID", "integer", read_only=True, reference="Resources"),
    _f("firstResponseDateTime", "datetime", read_only=True, column="replied_at"),
    _f("firstResponseDueDateTime", "datetime", read_only=True),
    _f("firstResponseInitiatingResourceID", "integer", read_only=True, reference="Resources"),
    _f("hoursToBeScheduled", "decimal", read_only=True),
    _f("id", "long", read_only=True, column="id"),
    _f("impersonatorCreatorResourceID", "integer", read_only=True, reference="Resources"),
    _f("isAssignedToComanaged", "boolean", read_only=True),
    _f("issueType", "integer", picklist=True),
    _f("isVisibleToComanaged", "boolean"),
    _f("lastActivityDate", "datetime", read_only=True, column="last_changed"),
    _f("lastActivityPersonType", "integer", read_only=True, queryable=False, picklist=True),
    _f("lastActivityResourceID", "integer", read_only=True, reference="Resources"),
    _f("lastCustomerNotificationDateTime", "datetime", read_only=True),
    _f("lastCustomerVisibleActivityDateTime", "datetime", read_only=True),
    _f("lastTrackedModificationDateTime", "datetime", read_only=True, column="last_changed"),
    _f("monitorID", "long", read_only=True),
    _f("monitorTypeID", "integer", read_only=True, picklist=True),
    _f("opportunityID", "integer", reference="Opportunities"),
    _f("previousServiceThermometerRating", "integer", read_only=True, picklist=True),
    _f("priority", "integer", picklist=True, column="priority_id", writable=True),
    _f("problemTicketId", "integer", reference="Tickets"),
    _f("projectID", "integer", reference="Projects"),
    _f("purchaseOrderNumber", "string", max_length=50),
    _f("queueID", "integer", picklist=True, column="mailbox_id", writable=True),
    _f("resolution", "string", max_length=32000),
    _f("resolutionPlanDateTime", "datetime"),
    _f("resolutionPlanDueDateTime", "datetime", read_only=True),
    _f("resolvedDateTime", "datetime"),
    _f("resolvedDueDateTime", "datetime", read_only=True),
    _f("rmaStatus", "integer", picklist=True),
    _f("rmaType", "integer", picklist=True),
    _f("rMMAlertID", "string", max_length=50, read_only=True),
    _f("serviceLevelAgreementHasBeenMet", "boolean", read_only=True),
    _f("serviceLevelAgreementID", "integer", picklist=True),
    _f("serviceLevelAgreementPausedNextEventHours", "decimal", read_only=True),
    _f("serviceThermometerTemperature", "integer", read_only=True),
    _f("source", "integer", picklist=True, column="origin", writable=True),
    _f("status", "integer", picklist=True, column="status_id", writable=True),
    _f("subIssueType", "integer", picklist=True),
    _f("ticketCategory", "integer", picklist=True, column="category_id", writable=True),
    _f("ticketNumber", "string", max_length=50, read_only=True, column="ticket_number"),
    _f("ticketType", "integer", picklist=True),
    _f("title", "string", max_length=255, column="title", writable=True),
)
AUTOTASK_BY_NAME: dict[str, AutotaskField] = {f.name: f for f in AUTOTASK_FIELDS}
_AUTOTASK_BY_LOWER: dict[str, AutotaskField] = {f.name.lower(): f for f in AUTOTASK_FIELDS}
AUTOTASK_MAX_RECORDS = 500


def autotask_field(name: Any, where: str) -> AutotaskField:
    """Field names are matched case-insensitively, as Autotask's (.NET) API does."""
    if not isinstance(name, str) or name.lower() not in _AUTOTASK_BY_LOWER:
        raise InvalidFilter(f"{where}: unknown Tickets field {name!r}", where)
    return _AUTOTASK_BY_LOWER[name.lower()]


def autotask_item(ticket: Ticket, include: Sequence[str] | None = None) -> dict[str, Any]:
    """A ticket as an Autotask ``Tickets`` item: every seed 004 field, picklists as ids, UTC."""
    item: dict[str, Any] = dict.fromkeys(AUTOTASK_BY_NAME)
    item.update(
        id=ticket.id,
        ticketNumber=ticket.ticket_number,
        title=ticket.title,
        description=ticket.description,
        status=ticket.status_id,
        priority=ticket.priority_id,
        queueID=ticket.mailbox_id,
        companyID=ticket.contact_id,
        contactID=ticket.person_id,
        createDate=format_utc_z(ticket.created_at),
        dueDateTime=format_utc_z(ticket.deadline),
        lastActivityDate=format_utc_z(ticket.last_changed),
        lastTrackedModificationDateTime=format_utc_z(ticket.last_changed),
        completedDate=format_utc_z(ticket.closed_at),
        firstResponseDateTime=format_utc_z(ticket.replied_at),
        source=origin_id(ticket.origin),
        assignedResourceID=ticket.owned_by_id,
        creatorResourceID=ticket.created_by_id,
        creatorType=1 if ticket.created_by_id else (2 if ticket.person_id else None),
        createdByContactID=ticket.person_id if not ticket.created_by_id else None,
        ticketCategory=ticket.category_id,
    )
    if include:
        keep = {"id"} | {autotask_field(n, "IncludeFields").name for n in include}
        item = {k: v for k, v in item.items() if k in keep}
    return item


def _coerce(value: Any, fld: AutotaskField, where: str,
            error: type[EntityValidationError] = InvalidFilter) -> Any:
    """A filter or body value in the Python type of the field; ``error`` names ``where``."""
    if fld.type in ("integer", "long"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,20}\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{where}: {fld.name} takes an integer, not {value!r}", where)
        lo, hi = (INT64_MIN, INT64_MAX) if fld.type == "long" else (INT32_MIN, INT32_MAX)
        if not lo <= value <= hi:
            raise error(f"{where}: {value} is out of range for {fld.name}", where)
        return value
    if fld.type == "datetime":
        try:
            parsed = parse_datetime(value, where)
        except EntityValidationError as exc:
            raise error(str(exc), where) from None
        if parsed is None:
            raise error(f"{where}: {fld.name} takes an ISO-8601 date-time", where)
        return parsed
    if fld.type == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise error(f"{where}: {fld.name} takes true or false", where)
    if fld.type == "decimal":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise error(f"{where}: {fld.name} takes a number", where)
        return float(value)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise error(f"{where}: {fld.name} takes a string", where)
    text = str(value)
    if "\x00" in text:
        raise error(f"{where}: strings must not contain NUL characters", where)
    return text


_ORIGIN_ID_CASE = case(
    *((Ticket.origin == _STORED_ORIGIN.get(name, name), literal(key))
      for key, name in ORIGINS.items()),
    else_=None,
)


def _sql_expr(fld: AutotaskField) -> ColumnElement[Any] | None:
    if fld.name == "source":
        return _ORIGIN_ID_CASE
    if fld.name == "creatorType":
        return None
    if fld.name == "createdByContactID":
        return case((Ticket.created_by_id.is_(None), Ticket.person_id), else_=None)
    if fld.column is None:
        return None
    return getattr(Ticket, fld.column)  # type: ignore[no-any-return]


_COMPARISONS: dict[str, Callable[[Any, Any], ColumnElement[bool]]] = {
    "eq": lambda c, v: c == v,
    "gt": lambda c, v: c > v,
    "gte": lambda c, v: c >= v,
    "lt": lambda c, v: c < v,
    "lte": lambda c, v: c <= v,
}
FILTER_OPS = ("eq", "noteq", "gt", "gte", "lt", "lte", "beginswith", "endswith", "contains",
              "exist", "notexist", "in", "notin")
MAX_FILTER_NODES = 200
MAX_FILTER_DEPTH = 8
MAX_IN_VALUES = 500


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(slots=True)
class _FilterCompiler:
    nodes: int = 0

    def group(self, items: Any, where: str, depth: int, conjunction: str) -> ColumnElement[bool]:
        if not isinstance(items, list):
            raise InvalidFilter(f"{where} must be an array of conditions", where)
        if depth > MAX_FILTER_DEPTH:
            raise InvalidFilter(f"{where}: groups nest deeper than {MAX_FILTER_DEPTH}", where)
        parts = [self.node(item, f"{where}[{i}]", depth) for i, item in enumerate(items)]
        if not parts:
            return true() if conjunction == "and" else false()
        return and_(*parts) if conjunction == "and" else or_(*parts)

    def node(self, node: Any, where: str, depth: int) -> ColumnElement[bool]:
        self.nodes += 1
        if self.nodes > MAX_FILTER_NODES:
            raise InvalidFilter(f"filter has more than {MAX_FILTER_NODES} conditions", where)
        if not isinstance(node, dict):
            raise InvalidFilter(f"{where} must be an object with op, field, value", where)
        op = node.get("op")
        if not isinstance(op, str) or op.lower() not in (*FILTER_OPS, "and", "or"):
            raise InvalidFilter(
                f"{where}.op: unknown operator {op!r}; one of eq, noteq, gt, gte, lt, lte, "
                "beginsWith, endsWith, contains, exist, notExist, in, notIn, and, or",
                f"{where}.op")
        op = op.lower()
        if op in ("and", "or"):
            return self.group(node.get("items"), f"{where}.items", depth + 1, op)
        if node.get("udf"):
            raise InvalidFilter(f"{where}: ticketgate has no user-defined fields", f"{where}.udf")
        fld = autotask_field(node.get("field"), f"{where}.field")
        if not fld.queryable:
            raise InvalidFilter(f"{where}.field: {fld.name} is not queryable (seed 004)",
                                f"{where}.field")
        expr = _sql_expr(fld)
        vwhere = f"{where}.value"
        if op in ("exist", "notexist"):
            if expr is None:
                return false() if op == "exist" else true()
            return expr.is_not(None) if op == "exist" else expr.is_(None)
        if "value" not in node or node["value"] is None:
            raise InvalidFilter(f"{vwhere}: {op} needs a value (use exist/notExist for null)",
                                vwhere)
        value = node["value"]
        if op in ("in", "notin"):
            if not isinstance(value, list) or not value or len(value) > MAX_IN_VALUES:
                raise InvalidFilter(f"{vwhere}: {op} takes an array of 1 to {MAX_IN_VALUES} "
                                    "values", vwhere)
            values = [_coerce(v, fld, f"{vwhere}[{i}]") for i, v in enumerate(value)]
            if expr is None:
                return false() if op == "in" else true()
            if fld.type == "string":
                low = func.lower(expr)
                values = [str(v).lower() for v in values]
                return low.in_(values) if op == "in" else or_(low.not_in(values), expr.is_(None))
            return expr.in_(values) if op == "in" else or_(expr.not_in(values), expr.is_(None))
        if op in ("beginswith", "endswith", "contains"):
            if fld.type != "string":
                raise InvalidFilter(f"{where}.op: {op} applies to string fields only; "
                                    f"{fld.name} is {fld.type}", f"{where}.op")
            text = _like_escape(str(_coerce(value, fld, vwhere)).lower())
            pattern = {"beginswith": f"{text}%", "endswith": f"%{text}",
                       "contains": f"%{text}%"}[op]
            if expr is None:
                return false()
            return func.lower(expr).like(pattern, escape="\\")
        if fld.type == "boolean" and op not in ("eq", "noteq"):
            raise InvalidFilter(f"{where}.op: {fld.name} is boolean; use eq or noteq",
                                f"{where}.op")
        coerced = _coerce(value, fld, vwhere)
        if expr is None:
            return true() if op == "noteq" else false()
        if fld.type == "string":
            expr, coerced = func.lower(expr), str(coerced).lower()
        if op == "noteq":
            # A ticket without a value is "not equal" to any value.
            return or_(expr != coerced, expr.is_(None))
        return _COMPARISONS[op](expr, coerced)


def compile_filter(filters: Any) -> ColumnElement[bool]:
    """Autotask query filter (a list ANDed together, groups with ``op`` and/or + ``items``) to a
    SQLAlchemy condition on :class:`Ticket`.

    Strings compare case-insensitively (as Autotask's SQL Server collation does); ``noteq`` and
    ``notIn`` include tickets without a value; fields ticketgate has no data for are null, so
    ``exist`` is false and ``notExist`` true for them.  Raises :class:`InvalidFilter` naming the
    offending path (``filter[1].items[0].value``).
    """
    if filters is None:
        return true()
    return _FilterCompiler().group(filters, "filter", 1, "and")


class AutotaskQuery(ValidText):
    """The body of ``POST Tickets/query`` (and the ``search`` parameter of its GET form)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    filter: list[Any] | None = Field(default=None, alias="filter")
    MaxRecords: int | None = None
    IncludeFields: list[str] | None = None

    def max_records(self) -> int:
        if self.MaxRecords is None:
            return AUTOTASK_MAX_RECORDS
        if not 1 <= self.MaxRecords <= AUTOTASK_MAX_RECORDS:
            raise InvalidFilter(f"MaxRecords must be between 1 and {AUTOTASK_MAX_RECORDS}",
                                "MaxRecords")
        return self.MaxRecords


@dataclass(slots=True)
class TicketPage:
    tickets: list[Ticket]
    has_next: bool
    has_prev: bool


def query_tickets(session: Session, query: AutotaskQuery, *, after: int | None = None,
                  before: int | None = None) -> TicketPage:
    """One page of matching tickets in id order (keyset paging, so pages stay stable while
    tickets are created).  ``after``: the page after that id; ``before``: the page before it."""
    condition = compile_filter(query.filter)
    if query.IncludeFields:
        for i, name in enumerate(query.IncludeFields):
            autotask_field(name, f"IncludeFields[{i}]")
    limit = query.max_records()
    stmt = select(Ticket).where(condition).options(*_ticket_load_options())
    if before is not None:
        rows = list(session.scalars(stmt.where(Ticket.id < before)
                                    .order_by(Ticket.id.desc()).limit(limit + 1)))
        has_prev = len(rows) > limit
        tickets = list(reversed(rows[:limit]))
        has_next = True
    else:
        if after is not None:
            stmt = stmt.where(Ticket.id > after)
        rows = list(session.scalars(stmt.order_by(Ticket.id).limit(limit + 1)))
        has_next = len(rows) > limit
        tickets = rows[:limit]
        has_prev = after is not None and bool(tickets) and session.scalar(
            select(Ticket.id).where(condition, Ticket.id < tickets[0].id).limit(1)) is not None
    return TicketPage(tickets, has_next, has_prev)


def count_tickets(session: Session, query: AutotaskQuery) -> int:
    condition = compile_filter(query.filter)
    return int(session.scalar(select(func.count()).select_from(Ticket).where(condition)) or 0)


def _body_fields(body: Mapping[str, Any]) -> dict[str, tuple[AutotaskField, Any]]:
    """Known fields of an Autotask create/update body; unknown names are refused, read-only
    ones ignored, and a value for a field ticketgate cannot store is refused rather than lost."""
    fields: dict[str, tuple[AutotaskField, Any]] = {}
    for key, value in body.items():
        if not isinstance(key, str) or key.lower() not in _AUTOTASK_BY_LOWER:
            raise EntityValidationError(f"{key}: not a field of the Tickets entity", str(key))
        fld = _AUTOTASK_BY_LOWER[key.lower()]
        if fld.read_only:
            continue
        if not fld.writable:
            if value is None:
                continue
            raise EntityValidationError(
                f"{fld.name}: ticketgate does not store this field; send null or leave it out",
                fld.name)
        fields[fld.name] = (fld, value)
    return fields


def _picklist_row(rows: Mapping[int, Any], value: Any, fld: AutotaskField) -> Any:
    ident = _coerce(value, fld, fld.name, EntityValidationError)
    row = rows.get(ident)
    if row is None:
        raise EntityValidationError(f"{fld.name}: {ident} is not a value of its picklist",
                                    fld.name)
    return row


def save_autotask_ticket(session: Session, settings: Settings, body: Mapping[str, Any], *,
                         creating: bool, user_name: str | None = None,
                         now: dt.datetime | None = None) -> Ticket:
    """Autotask create (``POST Tickets``) and update (``PATCH Tickets``, body carries ``id``).

    Validation follows seed 004: title required (<= 255); status, priority and ticketCategory
    must be active when newly assigned; contactID must belong to companyID; queueID must be a
    configured mailbox.  The caller commits.
    """
    now = now or models.utcnow()
    if not isinstance(body, Mapping):
        raise EntityValidationError("the body must be a JSON object", None)
    ref = RefData.load(session)
    lowered = {str(k).lower(): v for k, v in body.items()}
    if creating:
        ticket = _new_ticket(settings, ref, now)
        ticket.origin = "Api"
    else:
        if lowered.get("id") is None:
            raise EntityValidationError("id is required to update a ticket", "id")
        ident = _coerce(lowered["id"], AUTOTASK_BY_NAME["id"], "id", EntityValidationError)
        found = session.get(Ticket, ident, with_for_update=True,
                            options=_ticket_load_options()) if 0 < ident <= INT32_MAX else None
        if found is None:
            raise TicketNotFound(f"no ticket with id {ident}", "id")
        ticket = found
    w = _Writer(session, settings, ref, ticket, creating, now)
    defaults = Defaults.of(settings, ref)
    fields = _body_fields(body)

    def given(name: str) -> Any:
        return fields[name][1] if name in fields else None

    if creating or "title" in fields:
        w.title(given("title"), "title")
    if "description" in fields:
        ticket.description = clean_text(given("description"), "description", 8000)
    picklists: tuple[tuple[str, Mapping[int, Any], Callable[[Any, str], None], Any], ...] = (
        ("status", ref.statuses, w.status, defaults.status),
        ("priority", ref.priorities, w.priority, defaults.priority),
        ("ticketCategory", ref.categories, w.category, defaults.category),
    )
    for name, rows, setter, default in picklists:
        if given(name) is not None:
            setter(_picklist_row(rows, given(name), AUTOTASK_BY_NAME[name]), name)
        elif name in fields and name != "status":
            setter(None, name)
        elif creating and default is not None:
            setter(default, name)
    if creating and ticket.status_id is None:
        raise EntityValidationError("status is required: no default status is configured",
                                    "status")
    if given("queueID") is not None:
        box_id = _coerce(given("queueID"), AUTOTASK_BY_NAME["queueID"], "queueID",
                         EntityValidationError)
        if box_id not in settings.mailboxes_by_id:
            raise EntityValidationError(f"queueID: {box_id} is not a configured mailbox",
                                        "queueID")
        ticket.mailbox_id = box_id
    elif "queueID" in fields or creating:
        ticket.mailbox_id = defaults.mailbox_id if creating else None
    if "assignedResourceID" in fields:
        value = given("assignedResourceID")
        ident = 0 if value is None else _coerce(value, AUTOTASK_BY_NAME["assignedResourceID"],
                                                "assignedResourceID", EntityValidationError)
        w.owner(ident, None, "assignedResourceID")
    elif creating and defaults.owner is not None:
        w.owner(defaults.owner.id, None, "assignedResourceID")
    if "companyID" in fields:
        value = given("companyID")
        if value is None:
            ticket.contact_id, ticket.contact = None, None
        else:
            cid = _coerce(value, AUTOTASK_BY_NAME["companyID"], "companyID",
                          EntityValidationError)
            company = session.get(models.Contact, cid) if 0 < cid <= INT32_MAX else None
            if company is None:
                raise EntityValidationError(f"companyID: no company with id {cid}", "companyID")
            ticket.contact_id, ticket.contact = company.id, company
    if "contactID" in fields:
        value = given("contactID")
        if value is None:
            ticket.person_id, ticket.person = None, None
        else:
            pid = _coerce(value, AUTOTASK_BY_NAME["contactID"], "contactID",
                          EntityValidationError)
            person = session.get(Person, pid) if 0 < pid <= INT32_MAX else None
            if person is None:
                raise EntityValidationError(f"contactID: no contact with id {pid}", "contactID")
            if ticket.contact_id is None:
                ticket.contact_id = person.contact_id
            ticket.person_id, ticket.person = person.id, person
    if ("companyID" in fields or "contactID" in fields) and ticket.person_id is not None:
        person = ticket.person or session.get(Person, ticket.person_id)
        if person is not None and person.contact_id not in (None, ticket.contact_id):
            raise EntityValidationError(
                "contactID: the contact must belong to the ticket's companyID (seed 004)",
                "contactID")
    if "source" in fields:
        value = given("source")
        if value is None:
            ticket.origin = "Unknown"
        else:
            sid = _coerce(value, AUTOTASK_BY_NAME["source"], "source", EntityValidationError)
            if sid not in ORIGINS:
                raise EntityValidationError(f"source: {sid} is not a value of its picklist",
                                            "source")
            ticket.origin = _STORED_ORIGIN.get(ORIGINS[sid], ORIGINS[sid])
    if "dueDateTime" in fields:
        ticket.deadline = parse_datetime(given("dueDateTime"), "dueDateTime")
    elif creating:
        ticket.deadline = defaults.deadline(now, ticket.priority)
    created_by = api_user_associate(ref, user_name) if creating else None
    return w.finish(created_by)


def autotask_field_info(settings: Settings, session: Session) -> list[dict[str, Any]]:
    """``Tickets/entityInformation/fields``: each field with its picklist, so clients can
    discover which integer means which status, priority, queue or source."""
    ref = RefData.load(session)
    picklists: dict[str, list[dict[str, Any]]] = {
        "status": [{"value": str(s.id), "label": s.name, "isActive": s.active,
                    "isDefaultValue": s.name == settings.service.default_status,
                    "sortOrder": i} for i, s in enumerate(ref.statuses.values())],
        "priority": [{"value": str(p.id), "label": p.name, "isActive": p.active,
                      "isDefaultValue": False, "sortOrder": i}
                     for i, p in enumerate(ref.priorities.values())],
        "ticketCategory": [{"value": str(c.id), "label": c.name, "isActive": c.active,
                            "isDefaultValue": False, "sortOrder": i}
                           for i, c in enumerate(ref.categories.values())],
        "queueID": [{"value": str(m.id), "label": m.name, "isActive": True,
                     "isDefaultValue": i == 0, "sortOrder": i}
                    for i, m in enumerate(settings.mailbox)],
        "source": [{"value": str(k), "label": v, "isActive": True,
                    "isDefaultValue": False, "sortOrder": k} for k, v in ORIGINS.items()],
        "creatorType": [{"value": "1", "label": "Resource", "isActive": True,
                         "isDefaultValue": False, "sortOrder": 0},
                        {"value": "2", "label": "Contact", "isActive": True,
                         "isDefaultValue": False, "sortOrder": 1}],
    }
    out = []
    for fld in AUTOTASK_FIELDS:
        values = picklists.get(fld.name)
        out.append({
            "name": fld.name,
            "dataType": fld.type,
            "length": fld.max_length or 0,
            "isRequired": fld.name == "title",
            "isReadOnly": fld.read_only or not fld.writable,
            "isQueryable": fld.queryable,
            "isReference": fld.reference is not None,
            "referenceEntityType": fld.reference or "",
            "isPickList": fld.picklist,
            "picklistValues": values if fld.picklist else None,
            "isSupportedWebhookField": False,
            "isStoredByTicketgate": fld.column is not None or fld.name in (
                "creatorType", "createdByContactID"),
        })
    return out

