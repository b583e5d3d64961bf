"""The HTTP API (``ticketgate api``): SuperOffice-style agents, an Autotask-style Tickets resource,
``/healthz`` and ``/metrics``.

This layer stays thin on purpose: it parses requests, calls :mod:`ingest.entities` or the
:class:`~ingest.service.Ingestor`, and maps the error tree onto HTTP.  All mapping and validation
rules live in ``ingest`` so they hold for every door and are tested without a server.

Error answers always have one shape, ``{"Error": {"Code", "Message", "Field", "Status"}}``
(Autotask routes add ``errors: [message]``): 400 for bad input (including bad JSON and wrong
types, never FastAPI's 422), 401, 404, 413, and 503 when the database is unavailable.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, cast
from urllib.parse import urlencode

from fastapi import Body, Depends, FastAPI, Header, Query, Request, Response
from fastapi import Path as FPath
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, create_model
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from ingest import entities
from ingest.entities import AutotaskQuery, Int32, TicketEntityIn
from ingest.errors import (
    ConfigError,
    EntityError,
    SpoolError,
    TicketNotFound,
    TransientError,
    UnknownMailbox,
)
from ingest.service import Ingestor, RecordedError
from ingest.ticketinfo import TicketInfo
from workers.http_guard import (
    Authenticator,
    AuthMiddleware,
    BodyLimitMiddleware,
    BodyTooLarge,
    JsonMediaTypes,
    Principal,
    error_payload,
    guarded_h11_protocol,
)
from workers.observability import ApiMetrics, health

log = logging.getLogger("ticketgate.api")

SO = "/api/v1/Agents"
AT = "/atservicesrest/v1.0/Tickets"


# --- request and response models (OpenAPI) ------------------------------------------------


_EXAMPLE_MAIL = ("From: Michael Thompson <michael@techcorp.com>\r\nTo: support@example.com\r\n"
                 "Subject: Account access problem\r\nMessage-ID: <example-1@techcorp.com>\r\n"
                 "\r\nI cannot log in since this morning.\r\n")


class MailDataRequest(BaseModel):
    """CreateTicketFromMailData (seed 003)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "examples": [{"MailboxId": 1, "Data": _EXAMPLE_MAIL}]})
    MailboxId: Int32
    Data: str = Field(description="The mail as RFC822 text (headers, blank line, body).")


class GetTicketsRequest(BaseModel):
    """GetTickets (seed 002)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "examples": [{"TicketIds": [1, 2]}]})
    TicketIds: list[int] = Field(max_length=entities.MAX_GET_TICKETS)


class ErrorDetail(BaseModel):
    Code: str
    Message: str
    Field: str | None = None
    Status: int
    InboundId: int | None = None


class ErrorResponse(BaseModel):
    Error: ErrorDetail
    errors: list[str] | None = None


def _open_model(name: str, fields: tuple[str, ...], doc: str) -> type[BaseModel]:
    model = create_model(name, __config__=ConfigDict(extra="allow"),
                         **{f: (Any, None) for f in fields})  # type: ignore[call-overload]
    model.__doc__ = doc
    return model  # type: ignore[no-any-return]


TicketEntityOut = _open_model("TicketEntity", entities.TICKET_ENTITY_FIELDS,
                              "SuperOffice TicketEntity (seeds 000 and 001).")
TicketRow = _open_model("TicketRow", entities.GET_TICKETS_FIELDS,
                        "One GetTickets row (seed 002).")
_AT_TYPES: dict[str, Any] = {"integer": Int32, "long": int, "string": str, "datetime": str,
                             "boolean": bool, "decimal": float}
class _AutotaskBody(entities.ValidText):
    model_config = ConfigDict(extra="allow", json_schema_extra={
        "examples": [{"title": "Printer broken", "description": "Floor 2", "queueID": 1}]})


AutotaskTicket = create_model(  # type: ignore[call-overload]
    "AutotaskTicket", __base__=_AutotaskBody,
    **{f.name: (_AT_TYPES[f.type] | None, None) for f in entities.AUTOTASK_FIELDS})
AutotaskTicket.__doc__ = "Autotask Tickets entity (seed 004): picklists as integer ids, UTC."


class AutotaskItem(BaseModel):
    item: AutotaskTicket | None  # type: ignore[valid-type]


class PageDetails(BaseModel):
    count: int
    requestCount: int
    prevPageUrl: str | None
    nextPageUrl: str | None


class AutotaskItems(BaseModel):
    items: list[AutotaskTicket]  # type: ignore[valid-type]
    pageDetails: PageDetails


class AutotaskSaved(BaseModel):
    itemId: int
    item: AutotaskTicket | None = None  # type: ignore[valid-type]


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request; Error.Field names the field"},
    401: {"model": ErrorResponse, "description": "Missing or invalid credentials"},
    413: {"model": ErrorResponse, "description": "Body larger than [http] max_body_bytes"},
    503: {"model": ErrorResponse, "description": "Database unavailable; retry later"},
}


# --- per-request context --------------------------------------------------------------------


class ApiError(Exception):
    """An answer other than 200, raised from endpoints and rendered by one handler."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.field, self.extra = status, code, field, extra


def output_timezone(
    so_timezone: Annotated[str | None, Header(
        alias="SO-TimeZone",
        description="Time zone for dates in the response: IANA name, UTC or +HH:MM.")] = None,
) -> dt.tzinfo:
    try:
        return entities.parse_timezone(so_timezone)
    except EntityError as exc:
        raise ApiError(400, "InvalidTimeZone", str(exc), "SO-TimeZone") from None


def content_language(
    request: Request,
    accept_language: Annotated[str | None, Header(alias="Accept-Language")] = None,
    so_language: Annotated[str | None, Header(alias="SO-Language")] = None,
) -> str | None:
    """ticketgate has one language (names are shown as configured); the language asked for is
    acknowledged in ``Content-Language`` (set by the app's middleware) so clients see it was
    read.  SO-Language wins over Accept-Language, as in SuperOffice."""
    chosen = so_language or accept_language
    if not chosen:
        return None
    tag = chosen.split(",", 1)[0].split(";", 1)[0].strip()
    if tag and tag != "*" and len(tag) <= 35 and tag.replace("-", "").isalnum():
        request.state.language = tag  # written into the answer by ResponseMiddleware
        return tag
    return None


def principal_of(request: Request) -> Principal:
    principal = request.scope.get("state", {}).get("principal")
    return principal if principal is not None else Principal("anonymous", "loopback-demo")


TimeZone = Annotated[dt.tzinfo, Depends(output_timezone)]
Language = Annotated[str | None, Depends(content_language)]
Caller = Annotated[Principal, Depends(principal_of)]
SelectParam = Annotated[str | None, Query(
    alias="$select", max_length=2000,
    description="Comma-separated properties to keep; the others are nulled out.")]


def _caused_by_body_limit(exc: BaseException) -> bool:
    """FastAPI turns errors raised while reading the body into a 400; find a 413 inside."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BodyTooLarge):
            return True
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


def _json(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def _mail_bytes(data: str) -> bytes:
    try:
        return data.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # lone surrogates from a JSON \\ud800 escape
        return data.encode("utf-8", "replace")


# --- the app --------------------------------------------------------------------------------


def create_app(ingestor: Ingestor) -> FastAPI:
    """The ASGI app over one Ingestor (its settings, engine and reference data)."""
    settings = ingestor.settings
    authenticator = Authenticator(settings.api_user)
    metrics = ApiMetrics.create(lambda: ingestor.sessions())  # looked up at each scrape
    app = FastAPI(
        title="ticketgate",
        version="1",
        description="SuperOffice-compatible ticket agents and an Autotask-style Tickets "
                    "resource over the tickets ticketgate makes from mail.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.ingestor = ingestor
    app.state.metrics = metrics
    app.state.authenticator = authenticator

    @contextmanager
    def session() -> Iterator[Session]:
        with ingestor.sessions() as s:
            yield s

    # -- errors --

    def render(request: Request, status: int, code: str, message: str,
               field: str | None = None, **extra: Any) -> JSONResponse:
        headers = {"Retry-After": "30"} if status == 503 else None
        return JSONResponse(error_payload(status, code, message, field, request.url.path,
                                          **extra), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return render(request, exc.status, exc.code, str(exc), exc.field, **exc.extra)

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeoutError)
    async def _database_down(request: Request, exc: Exception) -> JSONResponse:
        # Connection refused, lock timeout, pool exhausted: the client should come back later.
        log.warning("database unavailable on %s: %s", request.url.path, exc)
        return render(request, 503, "DatabaseUnavailable",
                      f"database unavailable, retry later ({type(exc).__name__})")

    @app.exception_handler(EntityError)
    async def _entity_error(request: Request, exc: EntityError) -> JSONResponse:
        status = 404 if isinstance(exc, TicketNotFound) else 400
        return render(request, status, exc.code, str(exc), exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "header")]
        if first.get("type") == "json_invalid":
            return render(request, 400, "InvalidJson",
                          f"request body is not valid JSON: "
                          f"{first.get('ctx', {}).get('error', 'decode error')}", None)
        field = ".".join(loc) or None
        details = [{"Field": ".".join(str(p) for p in e.get("loc", ())
                                      if p not in ("body", "query", "header")) or None,
                    "Message": e.get("msg", "")} for e in errors[:20]]
        message = f"{field}: {first.get('msg', 'invalid')}" if field else str(
            first.get("msg", "invalid request"))
        return render(request, 400, "InvalidRequest", message, field, Details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if _caused_by_body_limit(exc):
            exc = BodyTooLarge()
        codes = {404: "NotFound", 405: "MethodNotAllowed", 413: "RequestTooLarge"}
        code = codes.get(exc.status_code, "InvalidRequest" if exc.status_code < 500
                         else "ServerError")
        response = render(request, exc.status_code, code, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return render(request, 500, "InternalError",
                      "internal error; the details are in the server log")

    # -- observability --

    @app.get("/healthz", tags=["operations"], responses={503: {"description": "Unhealthy"}})
    def healthz() -> JSONResponse:
        """Database and broker reachable: 200, else 503 with what failed.  Anonymous."""
        ok, detail = health(ingestor.engine, settings.effective_broker_url)
        return _json({"status": "ok" if ok else "unavailable", **detail}, 200 if ok else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **ERRORS})
    def prometheus_metrics() -> Response:
        """Prometheus exposition: mails per door and state (from the database), queue depth,
        API pipeline latency, HTTP requests."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- SuperOffice agents --

    @app.post(f"{SO}/CustomerService/CreateTicketFromMailData", tags=["SuperOffice"],
              response_model=TicketInfo, responses=ERRORS)
    def create_ticket_from_mail_data(
        body: MailDataRequest, request: Request, caller: Caller, _lang: Language,
        select_: SelectParam = None,
    ) -> JSONResponse:
        """Store the mail durably, then run the pipeline; answer its TicketInfo.

        The 200 comes only after the spool record and the result are committed together.  Every
        recorded outcome answers 200 (``Action`` says which: created, appended, duplicate,
        ignored, rejected, quarantined); unknown mailboxes and data that is not RFC822 answer
        400, and are recorded too (``Error.InboundId``).
        """
        client = request.client.host if request.client else "?"
        started = time.perf_counter()
        try:
            info = ingestor.ingest(_mail_bytes(body.Data), body.MailboxId, door="http",
                                   source=f"http {client} user {caller.name}")
        except RecordedError as exc:
            unknown_box = isinstance(exc.__cause__, UnknownMailbox)
            raise ApiError(400, "UnknownMailbox" if unknown_box else "InvalidMail", str(exc),
                           "MailboxId" if unknown_box else "Data",
                           InboundId=exc.inbound_id) from None
        except (TransientError, SpoolError) as exc:
            raise ApiError(503, "StoreUnavailable",
                           f"the mail was not stored, retry later: {exc}") from None
        metrics.ingest_seconds.labels(info.Action).observe(time.perf_counter() - started)
        return _json(entities.apply_select(info.model_dump(), select_))

    @app.post(f"{SO}/Ticket/GetTickets", tags=["SuperOffice"],
              response_model=list[TicketRow], responses=ERRORS)  # type: ignore[valid-type]
    def get_tickets(body: GetTicketsRequest, tz: TimeZone, _lang: Language,
                    select_: SelectParam = None) -> JSONResponse:
        """Rows for the ids asked, in that order; unknown ids are left out."""
        with session() as s:
            rows = [entities.ticket_row(t, tz) for t in entities.load_tickets(s, body.TicketIds)]
        return _json([entities.apply_select(r, select_) for r in rows])

    @app.post(f"{SO}/Ticket/CreateDefaultTicketEntity", tags=["SuperOffice"],
              response_model=TicketEntityOut, responses=ERRORS)
    def create_default_ticket_entity(tz: TimeZone, _lang: Language) -> JSONResponse:
        """A new TicketEntity with the configuration's defaults; nothing is saved."""
        with session() as s:
            return _json(entities.default_ticket_entity(s, settings, tz))

    @app.post(f"{SO}/Ticket/SaveTicketEntity", tags=["SuperOffice"],
              response_model=TicketEntityOut,
              responses={**ERRORS, 404: {"model": ErrorResponse,
                                         "description": "No ticket with that TicketId"}})
    def save_ticket_entity(entity: Annotated[TicketEntityIn, Body()], tz: TimeZone,
                           caller: Caller, _lang: Language) -> JSONResponse:
        """Create (TicketId 0 or missing) or update a ticket; answers the saved entity."""
        with session() as s:
            ticket = entities.save_ticket_entity(s, settings, entity, user_name=caller.name,
                                                 tz=tz)
            s.commit()
            ticket_id = ticket.id
        with session() as s:
            saved = entities.get_ticket(s, ticket_id, with_messages=True)
            extras = entities.MessageExtras.load(s, [saved])
            return _json(entities.ticket_entity(saved, extras, tz,
                                                settings.service.default_status))

    # -- Autotask Tickets --

    def page_url(request: Request, query: AutotaskQuery, **cursor: int) -> str:
        search = query.model_dump(exclude_none=True, by_alias=True)
        params = {"search": json.dumps(search, separators=(",", ":")), **cursor}
        return f"{str(request.base_url).rstrip('/')}{AT}/query?{urlencode(params)}"

    def run_query(request: Request, query: AutotaskQuery, after: int | None,
                  before: int | None) -> JSONResponse:
        with session() as s:
            page = entities.query_tickets(s, query, after=after, before=before)
            items = [entities.autotask_item(t, query.IncludeFields) for t in page.tickets]
        tickets = page.tickets
        return _json({
            "items": items,
            "pageDetails": {
                "count": len(items),
                "requestCount": query.max_records(),
                "prevPageUrl": page_url(request, query, before=tickets[0].id)
                if page.has_prev and tickets else None,
                "nextPageUrl": page_url(request, query, after=tickets[-1].id)
                if page.has_next and tickets else None,
            },
        })

    @app.get(f"{AT}/entityInformation/fields", tags=["Autotask"], responses=ERRORS)
    def autotask_fields() -> JSONResponse:
        """Every field of seed 004 with its picklist values (status, priority, queue...)."""
        with session() as s:
            return _json({"fields": entities.autotask_field_info(settings, s)})

    @app.post(f"{AT}/query", tags=["Autotask"], response_model=AutotaskItems, responses=ERRORS)
    def autotask_query(request: Request, query: AutotaskQuery) -> JSONResponse:
        """Autotask filter grammar; ``MaxRecords`` (1-500) per page, ``nextPageUrl`` to go on."""
        return run_query(request, query, None, None)

    @app.get(f"{AT}/query", tags=["Autotask"], response_model=AutotaskItems, responses=ERRORS)
    def autotask_query_get(
        request: Request,
        search: Annotated[str, Query(max_length=100_000,
                                     description="The query body as JSON")] = "{}",
        after: Annotated[int | None, Query(ge=0, le=entities.INT32_MAX)] = None,
        before: Annotated[int | None, Query(ge=0, le=entities.INT32_MAX)] = None,
    ) -> JSONResponse:
        """The GET form of the query; ``prevPageUrl``/``nextPageUrl`` point here."""
        try:
            parsed = json.loads(search)
        except (ValueError, RecursionError):
            raise ApiError(400, "InvalidFilter", "search is not valid JSON", "search") from None
        if not isinstance(parsed, dict):
            raise ApiError(400, "InvalidFilter", "search must be a JSON object", "search")
        try:
            query = AutotaskQuery.model_validate(parsed)
        except ValueError as exc:
            raise ApiError(400, "InvalidFilter", f"search: {exc}"[:500], "search") from None
        return run_query(request, query, after, before)

    @app.post(f"{AT}/query/count", tags=["Autotask"], responses=ERRORS)
    def autotask_count(query: AutotaskQuery) -> JSONResponse:
        with session() as s:
            return _json({"queryCount": entities.count_tickets(s, query)})

    @app.get(AT + "/{ticket_id}", tags=["Autotask"], response_model=AutotaskItem,
             responses={**ERRORS, 404: {"model": ErrorResponse}})
    def autotask_get(
        ticket_id: Annotated[int, FPath(ge=0, le=entities.INT64_MAX)],
    ) -> JSONResponse:
        with session() as s:
            ticket = entities.get_ticket(s, ticket_id) if ticket_id > 0 else None
            if ticket is None:
                raise TicketNotFound(f"no ticket with id {ticket_id}", "id")
            return _json({"item": entities.autotask_item(ticket)})

    def autotask_save(body: dict[str, Any], caller: Principal, creating: bool) -> JSONResponse:
        with session() as s:
            ticket = entities.save_autotask_ticket(s, settings, body, creating=creating,
                                                   user_name=caller.name)
            s.commit()
            ticket_id = ticket.id
        with session() as s:
            item = entities.autotask_item(entities.get_ticket(s, ticket_id))
        return _json({"itemId": ticket_id, "item": item})

    @app.post(AT, tags=["Autotask"], response_model=AutotaskSaved, responses=ERRORS)
    def autotask_create(body: AutotaskTicket, caller: Caller) -> JSONResponse:  # type: ignore
        """Create a ticket; read-only fields are ignored, unknown ones refused."""
        return autotask_save(cast(BaseModel, body).model_dump(exclude_unset=True), caller,
                             creating=True)

    @app.patch(AT, tags=["Autotask"], response_model=AutotaskSaved,
               responses={**ERRORS, 404: {"model": ErrorResponse}})
    def autotask_update(body: AutotaskTicket, caller: Caller) -> JSONResponse:  # type: ignore
        """Update the fields sent (the body carries ``id``); the others keep their values."""
        return autotask_save(cast(BaseModel, body).model_dump(exclude_unset=True), caller,
                             creating=False)

    app.add_middleware(ResponseMiddleware, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.http.max_body_bytes)
    app.add_middleware(JsonMediaTypes)
    app.add_middleware(AuthMiddleware, authenticator=authenticator)  # outermost: 401 first
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


class ResponseMiddleware:
    """Counts every answer by route and status, and adds ``Content-Language`` when the request
    named one.  Plain ASGI: Starlette's BaseHTTPMiddleware would wrap errors raised while the
    body streams in (the 413 of BodyLimitMiddleware) in an ExceptionGroup."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def finishing_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                language = (scope.get("state") or {}).get("language")
                if language:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"content-language", language.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, finishing_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope.get("method", "?"), route, str(status)).inc()


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the security schemes, and 400 (our shape) instead of 422."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    components = schema.setdefault("components", {})
    components["securitySchemes"] = {
        "basicAuth": {"type": "http", "scheme": "basic"},
        "bearerAuth": {"type": "http", "scheme": "bearer"},
    }
    schema["security"] = [{"basicAuth": []}, {"bearerAuth": []}]
    error_ref = {"content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", {"description": "Invalid request", **error_ref})
            if path == "/healthz":
                operation["security"] = []
            else:
                responses.setdefault("401", {"description": "Unauthorized", **error_ref})
                responses.setdefault("413", {"description": "Body too large", **error_ref})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    app.openapi_schema = schema
    return schema


def serve_api(ingestor: Ingestor, host: str | None = None, port: int | None = None) -> None:
    """Run uvicorn in this process until SIGTERM/SIGINT (uvicorn finishes in-flight requests)."""
    import uvicorn

    settings = ingestor.settings
    try:
        app = create_app(ingestor)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        raise SystemExit(2) from None
    host = host or settings.http_host
    port = port or settings.http_port
    if not settings.api_user:
        log.warning("no [[api_user]] configured: demo mode, the API answers anonymous requests "
                    "from the loopback interface only (http://%s:%s)", host, port)
    config = uvicorn.Config(app, host=host, port=port, proxy_headers=False, server_header=False,
                            access_log=False, log_config=None, timeout_graceful_shutdown=20,
                            http=guarded_h11_protocol(settings.http.head_timeout,
                                                      settings.http.max_head_bytes),
                            h11_max_incomplete_event_size=settings.http.max_head_bytes)
    uvicorn.Server(config).run()
