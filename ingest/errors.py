"""The error tree.  Every failure ticketgate reports has its own type, so each door can map it to
the right answer: SMTP 4xx/5xx, HTTP 400/503, a CLI message, or a quarantined record."""

from __future__ import annotations


class TicketgateError(Exception):
    """Base of every error ticketgate raises on purpose."""


class ConfigError(TicketgateError):
    """The configuration file or environment is invalid; the message names the key."""


class UnknownMailbox(TicketgateError):
    """A mail was addressed to a mailbox id that is not configured."""


class InvalidMail(TicketgateError):
    """The bytes given are not an RFC822 message (empty, binary, no header block)."""


class MailTooLarge(InvalidMail):
    """The mail is larger than ``service.max_message_bytes``."""


class SpoolError(TicketgateError):
    """The raw mail could not be stored durably; the caller must not acknowledge it."""


class TransientError(TicketgateError):
    """Worth retrying later: database unreachable, lock timeout, serialization failure."""


class PermanentError(TicketgateError):
    """Retrying cannot help; the mail is quarantined with this error."""


class ParseError(PermanentError):
    """mail-parser could not make sense of the message at all."""


class InboundNotFound(TicketgateError):
    """No inbound record with that id."""


class NotQuarantined(TicketgateError):
    """Only quarantined mails can be replayed from the quarantine."""


class EntityError(TicketgateError):
    """A ticket entity (SuperOffice or Autotask shape) cannot be read or saved as asked.

    ``field`` names the property at fault (``Title``, ``OwnedBy``, ``filter[0].value``...) so
    the HTTP layer can answer a structured error a client can act on; ``code`` is stable.
    """

    code = "EntityError"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class EntityValidationError(EntityError):
    """The entity is well-formed JSON but breaks a rule (title too long, inactive priority)."""

    code = "ValidationFailed"


class TicketNotFound(EntityError):
    """No ticket with that id: updates never turn into silent creates."""

    code = "TicketNotFound"


class InvalidFilter(EntityValidationError):
    """An Autotask query filter uses an unknown field, operator or a value of the wrong type."""

    code = "InvalidFilter"


class ParentPending(TransientError):
    """A reply arrived while the mail it answers is still waiting in the spool; processing it
    now would open a second ticket, so it is retried shortly.  ``parent_id``: that mail's
    inbound id, so the retry can wait for exactly it."""

    def __init__(self, message: str, parent_id: int | None = None) -> None:
        super().__init__(message)
        self.parent_id = parent_id


class AttemptsExhausted(PermanentError):
    """Processing was started too many times without finishing (the worker died or hung)."""
