"""Configuration: one TOML file plus ``TICKETGATE_*`` environment variables.

The TOML names are a public contract (``shared/design.md`` §4): other tools write these files,
so the models below mirror them exactly and refuse unknown keys instead of silently ignoring a
typo that would route mail to the wrong place.  Environment variables win over the file, so a
container can keep one file and change only the URLs.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ingest.errors import ConfigError

DEFAULT_DATA_DIR = Path("var")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ServiceSection(_Strict):
    base_url: str = "http://127.0.0.1:8080"
    unknown_sender: Literal["create", "reject"] = "create"
    reopen_closed: Literal["reopen", "new"] = "reopen"
    # Which header names the customer.  "from" is what users expect; "reply-to" suits web forms
    # that send as a no-reply robot with the real customer in Reply-To.
    sender_address: Literal["from", "reply-to"] = "from"
    # Subject tag written into replies and recognised on the way back.  "{id}" is the ticket id.
    subject_tag: str = "[#{id}]"
    # Domain and secret for the Message-IDs ticketgate would put on its own outgoing mail;
    # a reply quoting one is evidence that cannot be forged without the secret.
    message_id_domain: str = "ticketgate.invalid"
    secret: str = "ticketgate-development-secret"
    max_message_bytes: int = 30 * 1024 * 1024
    max_secondary_persons: int = 40
    default_status: str = "Open"
    # Replies that quote the ticket's history are stored whole; the visible part is also kept.
    data_dir: Path = DEFAULT_DATA_DIR

    @field_validator("subject_tag")
    @classmethod
    def _tag_has_id(cls, value: str) -> str:
        if "{id}" not in value:
            raise ValueError("subject_tag must contain {id}")
        return value


class ApiUser(_Strict):
    name: str
    password: str | None = None
    password_hash: str | None = None
    token: str | None = None


class Associate(_Strict):
    name: str
    full_name: str | None = None
    email: str | None = None


class Category(_Strict):
    name: str
    active: bool = True


class Priority(_Strict):
    name: str
    active: bool = True
    # Autotask-style due date: Deadline = creation time + this many hours (UTC).
    deadline_hours: float | None = None


class Status(_Strict):
    name: str
    base_status: Literal["active", "closed", "postponed", "deleted"] = "active"
    active: bool = True


class Contact(_Strict):
    name: str
    domains: list[str] = Field(default_factory=list)

    @field_validator("domains")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [d.strip().lower() for d in value]


class PersonEntry(_Strict):
    first_name: str = ""
    last_name: str = ""
    email: str
    contact: str | None = None


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the usual names of this machine's loopback."""
    if host.strip().lower().rstrip(".") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class OAuth2Token(_Strict):
    """Where an XOAUTH2 access token comes from (Microsoft 365, Gmail).  It is read again at
    every connection, so whatever refreshes it (a cron job, a sidecar, ``oauth2l``) just keeps
    the file or the command's answer current."""

    token_command: list[str] | str | None = None  # argv (a string is split like a shell would)
    token_file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> OAuth2Token:
        if (self.token_command is None) == (self.token_file is None):
            raise ValueError("oauth2 needs exactly one of token_command or token_file")
        if isinstance(self.token_command, list) and not self.token_command:
            raise ValueError("oauth2.token_command is empty")
        return self


class ImapSettings(_Strict):
    """``[[mailbox]] imap = {...}``: the IMAP folder this mailbox polls (``ticketgate imap``).

    TLS is verified against the system's CAs, or only against ``ca_file`` when one is given.
    ``tls = "none"`` is accepted only for a loopback host (a local Dovecot or a TLS-terminating
    sidecar); there is no setting that falls back to plaintext after a failed handshake.
    """

    host: str
    port: int | None = Field(default=None, ge=1, le=65535)  # default: 993 (ssl) or 143
    tls: Literal["ssl", "starttls", "none"] = "ssl"
    ca_file: Path | None = None
    user: str
    password: SecretStr | None = None
    password_env: str | None = None
    password_file: Path | None = None
    oauth2: OAuth2Token | None = None
    folder: str = "INBOX"
    after: str = "seen"  # seen | move:FOLDER | delete
    idle: bool = True
    poll_interval: float = Field(default=60.0, gt=0)
    max_message_bytes: int | None = Field(default=None, gt=0)  # default: service's
    # Not downloaded, recorded as rejected, and then left where it is or moved.
    oversized: str = "leave"  # leave | move:FOLDER
    batch_size: int = Field(default=100, ge=1, le=500)  # messages per UID FETCH
    batch_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)  # bytes per UID FETCH
    timeout: float = Field(default=60.0, gt=0)  # socket timeout of every command

    @field_validator("after")
    @classmethod
    def _after(cls, value: str) -> str:
        if value in ("seen", "delete") or (value.startswith("move:") and value[5:].strip()):
            return value
        raise ValueError('after must be "seen", "delete" or "move:FOLDER"')

    @field_validator("oversized")
    @classmethod
    def _oversized(cls, value: str) -> str:
        if value == "leave" or (value.startswith("move:") and value[5:].strip()):
            return value
        raise ValueError('oversized must be "leave" or "move:FOLDER" (never deleted unread)')

    @model_validator(mode="after")
    def _credentials_and_tls(self) -> ImapSettings:
        given = [name for name in ("password", "password_env", "password_file", "oauth2")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of password, password_env, password_file or "
                             f"oauth2 (got {', '.join(given) or 'none'})")
        if self.tls == "none" and not is_loopback(self.host):
            raise ValueError(f'tls = "none" is allowed only for a loopback host, not '
                             f'{self.host!r}; use "ssl" or "starttls"')
        if self.port is None:
            self.port = 993 if self.tls == "ssl" else 143
        if self.folder in (self.move_to, self.oversized_move_to):
            raise ValueError(f"cannot move mail from {self.folder!r} into itself")
        return self

    @property
    def move_to(self) -> str | None:
        return self.after[5:].strip() if self.after.startswith("move:") else None

    @property
    def oversized_move_to(self) -> str | None:
        return self.oversized[5:].strip() if self.oversized.startswith("move:") else None

    @property
    def account(self) -> str:
        """``user@host:port``: which server account the stored UID state belongs to."""
        return f"{self.user}@{self.host}:{self.port}"


class MailboxAuthentication(_Strict):
    """``[[mailbox]] authentication = {...}``: this mailbox's overrides of ``[authentication]``."""

    enforce: bool | None = None
    trusted_authserv_ids: list[str] | None = None
    unauthenticated: Literal["allow", "unverified"] | None = None


class AuthenticationPolicy(_Strict):
    """The policy in force for one mailbox: ``[authentication]`` with the mailbox's overrides."""

    enforce: bool
    trusted_authserv_ids: list[str]
    unauthenticated: Literal["allow", "unverified"]


class AuthenticationSection(_Strict):
    """``[authentication]``: SPF, DKIM and DMARC (``ingest/authentication.py``, SECURITY.md).

    Evidence comes from ticketgate's own checks for mail its SMTP listener took from the
    internet, and otherwise from the topmost ``Authentication-Results`` header written by a
    trusted MTA (``trusted_authserv_ids``).  Mail with no evidence (the demo, ``replay`` of
    files, IMAP or HTTP without a trusted authserv-id) is treated as before unless
    ``unauthenticated = "unverified"``.
    """

    # Act on the results: quarantine DMARC failures whose domain asks for quarantine or reject,
    # and let only authenticated senders thread by subject tag or be attributed to a known
    # person.  false: evaluate and record only.
    enforce: bool = True
    # Check SPF, DKIM and DMARC ourselves for mail our SMTP listener receives.
    check_smtp: bool = True
    # SMTP clients that are our own MTAs (a Postfix with OpenDMARC in front, a local relay):
    # their mail is judged by its Authentication-Results, not by their IP address.
    trusted_relays: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # authserv-ids (RFC 8601) whose Authentication-Results are believed; empty: none.
    trusted_authserv_ids: list[str] = Field(default_factory=list)
    # Mail without any evidence: "allow" (threads and attributes as before) or "unverified".
    unauthenticated: Literal["allow", "unverified"] = "allow"
    # The DNS resolver: empty means the system's (/etc/resolv.conf).
    nameservers: list[str] = Field(default_factory=list)
    dns_port: int = Field(default=53, ge=1, le=65535)
    dns_timeout: float = Field(default=5.0, gt=0, le=60)  # seconds per lookup, retries included
    max_dkim_signatures: int = Field(default=5, ge=1, le=50)  # verified per mail, top first

    @field_validator("trusted_relays")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"trusted_relays: {exc}") from None
        return value

    @field_validator("trusted_authserv_ids")
    @classmethod
    def _lower_ids(cls, value: list[str]) -> list[str]:
        return [v.strip().lower() for v in value if v.strip()]

    @field_validator("nameservers")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for server in value:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise ValueError(f"nameservers: {server!r} is not an IP address") from None
        return value

    def policy_for(self, box: Mailbox) -> AuthenticationPolicy:
        override = box.authentication or MailboxAuthentication()
        ids = override.trusted_authserv_ids
        return AuthenticationPolicy(
            enforce=self.enforce if override.enforce is None else override.enforce,
            trusted_authserv_ids=[i.strip().lower() for i in ids] if ids is not None
            else list(self.trusted_authserv_ids),
            unauthenticated=override.unauthenticated or self.unauthenticated,
        )


class LimitsSection(_Strict):
    """``[limits]``: the circuit breaker on incoming rate (``ingest/steps/circuit_breaker.py``).

    Counted from the database over the last ``window_seconds``, so every worker sees the same
    numbers.  Mail past a limit is quarantined with the reason ``circuit breaker: ...`` (kept,
    replayable; ``quarantine replay`` lets it through).  0 turns a limit off.
    """

    window_seconds: int = Field(default=3600, ge=1)
    # Mails from one address on one subject that would open a new ticket: the signature of two
    # autoresponders answering each other (Re: Re: Re: ...) without RFC 3834 headers.
    per_sender_subject_max: int = Field(default=10, ge=0)
    # Mails stored from one address, whatever the subject: a flood ceiling.
    per_sender_max: int = Field(default=2000, ge=0)
    # Mails appended to one ticket: a loop that does keep In-Reply-To.
    per_ticket_max: int = Field(default=100, ge=0)
    # Times one ticket may be reopened by mail, ever; then replies are appended and it stays closed.
    max_reopens_per_ticket: int = Field(default=20, ge=0)
    # Doors the breaker watches; "replay" (files an operator feeds in) is a bulk import.
    doors: list[Literal["smtp", "imap", "http", "replay"]] = Field(
        default_factory=lambda: ["smtp", "imap", "http"])


class Mailbox(_Strict):
    id: int
    name: str
    addresses: list[str] = Field(default_factory=list)
    accept_any: bool = False
    category: str | None = None
    priority: str | None = None
    owner: str | None = None
    # Overrides service.unknown_sender for this mailbox (e.g. a partners-only address).
    unknown_sender: Literal["create", "reject"] | None = None
    imap: ImapSettings | None = None
    authentication: MailboxAuthentication | None = None

    @field_validator("addresses")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [a.strip().lower() for a in value]


class RuleMatch(_Strict):
    """Conditions of a rule: every one given must match (regular expressions, ``re.search``)."""

    subject: str | None = None
    from_: str | None = Field(default=None, alias="from")
    from_domain: str | None = None
    to: str | None = None
    body: str | None = None
    mailbox: int | list[int] | None = None
    header: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _dotted_headers(cls, data: Any) -> Any:
        # Accept both `header.X-Foo = "..."` (TOML nests it) and `"header.X-Foo" = "..."`.
        if isinstance(data, dict):
            data = dict(data)
            headers = dict(data.pop("header", {}) or {})
            for key in [k for k in data if k.startswith("header.")]:
                headers[key[len("header.") :]] = data.pop(key)
            data["header"] = headers
        return data

    @model_validator(mode="after")
    def _regexes_compile(self) -> RuleMatch:
        for name, pattern in self.patterns():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{name}: invalid regular expression: {exc}") from exc
        return self

    def patterns(self) -> list[tuple[str, str]]:
        found = [
            (name, value)
            for name, value in (
                ("subject", self.subject),
                ("from", self.from_),
                ("from_domain", self.from_domain),
                ("to", self.to),
                ("body", self.body),
            )
            if value is not None
        ]
        found += [(f"header.{k}", v) for k, v in self.header.items()]
        return found


class RuleSet(_Strict):
    category: str | None = None
    priority: str | None = None
    owner: str | None = None
    status: str | None = None
    tags: list[str] = Field(default_factory=list)


class Rule(_Strict):
    name: str
    match: RuleMatch = Field(default_factory=RuleMatch)
    unless: RuleMatch | None = None
    set: RuleSet = Field(default_factory=RuleSet)
    action: Literal["ignore", "reject"] | None = None
    continue_: bool = Field(default=False, alias="continue")


class SmtpSection(_Strict):
    """The MX listener (``ticketgate smtp``).  Host and port come from the top-level settings."""

    hostname: str = "ticketgate.localdomain"  # banner, Received header
    max_sessions: int = 200  # concurrent connections; 421 past this
    max_recipients: int = 100  # RCPT per transaction; 452 past this
    timeout: float = 300.0  # idle seconds per command (RFC 5321 suggests 5 minutes)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_starttls: bool = False
    backlog_limit: int = 20_000  # spooled but unprocessed mails; new mail gets 451 past this
    # Per client address (IPv4 address, IPv6 /64), counted in memory by each listener process:
    # with several MX listeners a client gets up to that many times these.  0 = no limit.
    max_connections_per_ip: int = Field(default=20, ge=0)  # concurrent; 421 4.7.0 at connect
    max_connections_per_ip_per_minute: int = Field(default=120, ge=0)  # 421 4.7.0 at connect
    max_messages_per_ip_per_minute: int = Field(default=300, ge=0)  # MAIL FROM; 451 4.7.1
    ip_limits_exempt_loopback: bool = False  # 127.0.0.0/8 and ::1 skip the three limits above
    max_bad_recipients: int = Field(default=10, ge=0)  # RCPTs answered 550/553; then 421, close
    # Seconds the 220 greeting waits; a client that sends anything before it gets 554 and is
    # disconnected (spam bots do not wait).  0 sends the greeting at once.
    greeting_delay: float = Field(default=1.0, ge=0, le=60)
    # The mailbox (its id) that takes mail for postmaster: RCPT TO:<postmaster> and
    # postmaster@ any domain of the mailboxes' addresses, which RFC 5321 section 4.5.1 says an
    # MX must accept.  None: the first mailbox.  A mailbox that lists a postmaster address
    # itself takes that address.
    postmaster_mailbox: int | None = None

    @model_validator(mode="after")
    def _tls_is_whole(self) -> SmtpSection:
        """A certificate without its key (or the other way round), or STARTTLS required with
        neither, used to start the listener without TLS and without a word: an operator who
        asked for encrypted delivery got plaintext."""
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = (("tls_cert", "tls_key") if self.tls_key is None
                              else ("tls_key", "tls_cert"))
            raise ValueError(f"{given} is set but {missing} is not: STARTTLS needs both")
        if self.require_starttls and self.tls_cert is None:
            raise ValueError("require_starttls needs tls_cert and tls_key")
        return self


class HttpSection(_Strict):
    """The HTTP API (``ticketgate api``).  Host and port come from the top-level settings."""

    # Whole request body, checked before it is read (Content-Length) and while it streams.  A
    # JSON-escaped mail is larger than the mail, hence the margin over max_message_bytes.
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # The request line and headers: their size, and the seconds a client has to send them
    # (408 past that; slowly sent heads had held connections for good).
    max_head_bytes: int = Field(default=64 * 1024, ge=4096)
    head_timeout: float = Field(default=20.0, gt=0)


class WorkerSection(_Strict):
    concurrency: int = 2
    sweep_interval: float = 30.0  # seconds between sweeps for records stuck in "received"
    sweep_age: float = 60.0  # a record this old and still "received" is enqueued again
    task_retry_max_delay: float = 300.0
    # A reply whose parent mail is still spooled waits at most this long for it (then threads
    # on whatever evidence there is).
    parent_wait_seconds: float = 300.0
    # ... of which a task first waits this long itself (its parent is usually in another
    # worker's batch); the rest through the broker's retry, behind whatever is queued.
    parent_wait_in_task: float = Field(default=2.0, ge=0)
    max_attempts: int = 5  # processing starts before a mail is quarantined as poison
    task_time_limit: float = 300.0  # seconds one mail may take before its worker is recycled


class ReplaySection(_Strict):
    """``[replay]``: ``ticketgate replay`` of stored mail (files, mbox, Maildir)."""

    # Helper processes that parse ahead of the one that writes tickets (ingest.prepare).
    # None: one per CPU core but one (at most 4); 0: parse in the writing process only.
    parse_helpers: int | None = Field(default=None, ge=0, le=64)
    batch_size: int = Field(default=64, ge=1, le=10_000)  # mails per transaction


class MetricsSection(_Strict):
    """``[metrics]``: a Prometheus endpoint per long-running role (the API serves ``/metrics`` on
    its own port).  Off by default so roles started side by side never fight over a port."""

    enabled: bool = False
    host: str = "127.0.0.1"  # "0.0.0.0" in a container, so Prometheus can scrape it
    smtp_port: int = Field(default=9101, ge=1, le=65535)
    imap_port: int = Field(default=9102, ge=1, le=65535)
    worker_port: int = Field(default=9103, ge=1, le=65535)


DEMO_MAILBOX = Mailbox(id=1, name="Support", accept_any=True, category="General",
                       priority="Medium", owner="support")
DEMO_CATEGORY = Category(name="General")
DEMO_PRIORITY = Priority(name="Medium", deadline_hours=24)
DEMO_ASSOCIATE = Associate(name="support", full_name="Support Team")
DEFAULT_STATUSES = [
    Status(name="Open", base_status="active"),
    Status(name="Postponed", base_status="postponed"),
    Status(name="Closed", base_status="closed"),
]


class Settings(BaseSettings):
    """Everything ticketgate is configured with; build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="TICKETGATE_", extra="forbid", populate_by_name=True
    )

    database_url: str | None = None
    broker_url: str | None = None
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 2525
    http_host: str = "127.0.0.1"
    http_port: int = 8080

    service: ServiceSection = Field(default_factory=ServiceSection)
    smtp: SmtpSection = Field(default_factory=SmtpSection)
    http: HttpSection = Field(default_factory=HttpSection)
    worker: WorkerSection = Field(default_factory=WorkerSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    replay: ReplaySection = Field(default_factory=ReplaySection)
    authentication: AuthenticationSection = Field(default_factory=AuthenticationSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    api_user: list[ApiUser] = Field(default_factory=list)
    associate: list[Associate] = Field(default_factory=list)
    category: list[Category] = Field(default_factory=list)
    priority: list[Priority] = Field(default_factory=list)
    status: list[Status] = Field(default_factory=list)
    contact: list[Contact] = Field(default_factory=list)
    person: list[PersonEntry] = Field(default_factory=list)
    mailbox: list[Mailbox] = Field(default_factory=list)
    rule: list[Rule] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first, then the TOML values passed in by load_settings().
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _fill_demo_and_check_references(self) -> Settings:
        if not self.mailbox:
            self.mailbox = [DEMO_MAILBOX]
            self.category = self.category or [DEMO_CATEGORY]
            self.priority = self.priority or [DEMO_PRIORITY]
            self.associate = self.associate or [DEMO_ASSOCIATE]
        if not self.status:
            self.status = list(DEFAULT_STATUSES)
        problems: list[str] = []
        names = {
            "category": {c.name for c in self.category},
            "priority": {p.name for p in self.priority},
            "owner": {a.name for a in self.associate},
            "status": {s.name for s in self.status},
            "contact": {c.name for c in self.contact},
        }

        def check(where: str, kind: str, value: str | None) -> None:
            if value is not None and value not in names[kind]:
                problems.append(f"{where}: unknown {kind} {value!r}")

        seen_ids: set[int] = set()
        for i, box in enumerate(self.mailbox):
            if box.id in seen_ids:
                problems.append(f"mailbox[{i}]: duplicate id {box.id}")
            seen_ids.add(box.id)
            check(f"mailbox[{i}] ({box.name})", "category", box.category)
            check(f"mailbox[{i}] ({box.name})", "priority", box.priority)
            check(f"mailbox[{i}] ({box.name})", "owner", box.owner)
            if box.imap is not None and box.imap.max_message_bytes is None:
                box.imap.max_message_bytes = self.service.max_message_bytes
        for i, rule in enumerate(self.rule):
            for kind in ("category", "priority", "owner", "status"):
                check(f"rule[{i}] ({rule.name}).set", kind, getattr(rule.set, kind))
        for i, person in enumerate(self.person):
            check(f"person[{i}] ({person.email})", "contact", person.contact)
        check("service.default_status", "status", self.service.default_status)
        postmaster = self.smtp.postmaster_mailbox
        if postmaster is not None and postmaster not in seen_ids:
            problems.append(f"smtp.postmaster_mailbox: no mailbox has id {postmaster}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.service.data_dir / 'ticketgate.db').resolve().as_posix()}"

    @property
    def effective_broker_url(self) -> str:
        """The Celery broker: ``broker_url``, else kombu's SQLAlchemy transport on a SQLite file
        next to the database, so the default set-up needs no server."""
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.service.data_dir / 'broker.db').resolve().as_posix()}"

    @cached_property
    def mailboxes_by_id(self) -> dict[int, Mailbox]:
        return {m.id: m for m in self.mailbox}

    def mailbox_for(self, mailbox_id: int) -> Mailbox:
        try:
            return self.mailboxes_by_id[mailbox_id]
        except KeyError:
            from ingest.errors import UnknownMailbox

            raise UnknownMailbox(f"no mailbox with id {mailbox_id} is configured") from None

    def mailbox_for_address(self, address: str) -> Mailbox | None:
        """The mailbox that accepts ``address`` (used by the SMTP door for RCPT TO)."""
        wanted = address.strip().lower()
        for box in self.mailbox:
            if wanted in box.addresses:
                return box
        for box in self.mailbox:
            if box.accept_any:
                return box
        if self._is_postmaster(wanted):
            chosen = self.smtp.postmaster_mailbox
            return self.mailbox[0] if chosen is None else self.mailboxes_by_id[chosen]
        return None

    def _is_postmaster(self, address: str) -> bool:
        """``postmaster`` alone, or at a domain this service takes mail for (not at an address
        literal or a foreign domain: that would make it a relay)."""
        local, at, domain = address.rpartition("@")
        if not at:
            return address == "postmaster"
        return local == "postmaster" and domain in self.mail_domains

    @cached_property
    def mail_domains(self) -> frozenset[str]:
        """The domains of the mailboxes' addresses."""
        return frozenset(a.rpartition("@")[2] for box in self.mailbox for a in box.addresses
                         if "@" in a)

    @property
    def imap_mailboxes(self) -> list[Mailbox]:
        """Mailboxes with an ``imap`` table: what ``ticketgate imap`` polls."""
        return [box for box in self.mailbox if box.imap is not None]

    @property
    def own_addresses(self) -> set[str]:
        return {a for box in self.mailbox for a in box.addresses}


def _imap_paths_relative_to(base: Path, data: dict[str, Any]) -> None:
    """ca_file, password_file and oauth2.token_file are relative to the configuration file."""
    boxes = data.get("mailbox")
    for box in boxes if isinstance(boxes, list) else []:
        imap = box.get("imap") if isinstance(box, dict) else None
        if not isinstance(imap, dict):
            continue
        tables = [imap, imap.get("oauth2")]
        for table, key in ((tables[0], "ca_file"), (tables[0], "password_file"),
                           (tables[1], "token_file")):
            if isinstance(table, dict) and isinstance(table.get(key), str):
                table[key] = (base / table[key]).as_posix()


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (``path`` or ``$TICKETGATE_CONFIG``), apply env, validate.

    Raises :class:`ConfigError` with the offending key, so ``serve`` can refuse to start with a
    message a person can act on.
    """
    path = path or os.environ.get("TICKETGATE_CONFIG")
    data: dict[str, Any] = {}
    text = ""
    if path:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
            data = tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"{file}: configuration file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: {exc}") from None
        if "service" in data and "data_dir" in data["service"]:
            data["service"]["data_dir"] = (file.parent / data["service"]["data_dir"]).as_posix()
        _imap_paths_relative_to(file.parent, data)
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        from ingest.config_lines import describe_errors  # each error with its file and line

        raise ConfigError(describe_errors(exc, str(path or "configuration"), text)) from None
