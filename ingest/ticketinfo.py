"""TicketInfo: the answer for every mail (seed 003), plus the outcome fields of design.md §4."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from ingest.models import Ticket
from ingest.reference import Reference
from ingest.tokens import subject_tag


class TicketInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The ten seed fields (SuperOffice CreateTicketFromMailData response).
    TicketId: int = 0
    Title: str | None = None
    OwnerName: str | None = None
    CategoryName: str | None = None
    PriorityName: str | None = None
    TicketUrl: str | None = None
    PersonName: str | None = None
    ContactName: str | None = None
    TableRight: dict[str, Any] | None = None
    FieldProperties: dict[str, Any] = {}
    # ticketgate's additions.
    Action: str
    Reason: str | None = None
    MessageId: str | None = None
    ThreadedBy: str | None = None
    InboundId: int | None = None
    TicketNumber: str | None = None
    SubjectTag: str | None = None


_FIELD_TYPES = {
    "TicketId": ("System.Int32", 4),
    "Title": ("System.String", 255),
    "OwnerName": ("System.String", 200),
    "CategoryName": ("System.String", 200),
    "PriorityName": ("System.String", 200),
    "TicketUrl": ("System.String", 2000),
    "PersonName": ("System.String", 400),
    "ContactName": ("System.String", 200),
}
READ_ONLY_FIELD_PROPERTIES = {
    name: {"FieldRight": {"Mask": "Read", "Reason": ""}, "FieldType": ftype, "FieldLength": length}
    for name, (ftype, length) in _FIELD_TYPES.items()
}
TABLE_RIGHT = {"Mask": "Select", "Reason": ""}


def ticket_info(
    *,
    action: str,
    reason: str | None,
    message_id: str | None,
    inbound_id: int,
    ticket: Ticket | None,
    ref: Reference,
    base_url: str,
    tag_template: str,
    threaded_by: list[str] | None = None,
) -> TicketInfo:
    info = TicketInfo(
        Action=action,
        Reason=reason,
        MessageId=message_id,
        InboundId=inbound_id,
        ThreadedBy=",".join(threaded_by) if threaded_by else None,
    )
    if ticket is None:
        return info
    info.TicketId = ticket.id
    info.Title = ticket.title
    info.OwnerName = ref.associate_names.get(ticket.owned_by_id) if ticket.owned_by_id else None
    info.CategoryName = ref.category_names.get(ticket.category_id) if ticket.category_id else None
    info.PriorityName = ref.priority_names.get(ticket.priority_id) if ticket.priority_id else None
    info.TicketUrl = f"{base_url.rstrip('/')}/ticket/{ticket.id}"
    info.PersonName = ticket.person.full_name if ticket.person else None
    info.ContactName = ticket.contact.name if ticket.contact else None
    info.TableRight = dict(TABLE_RIGHT)
    info.FieldProperties = {k: dict(v) for k, v in READ_ONLY_FIELD_PROPERTIES.items()}
    info.TicketNumber = ticket.ticket_number
    info.SubjectTag = subject_tag(tag_template, ticket.id)
    return info
