"""What stands in front of every HTTP endpoint: authentication and the request-size limit.

Both are plain ASGI middlewares rather than FastAPI dependencies, for one reason: FastAPI reads
and parses the body before dependencies run, so a dependency could only refuse a stranger after
reading whatever they sent.  Here a request without valid credentials gets its 401 from the
headers alone, and an oversized body gets its 413 from ``Content-Length`` (or, for a chunked
upload, as soon as the running total passes the limit) before any of it is parsed.

Credentials come from ``[[api_user]]``:

* ``password``: compared in constant time;
* ``password_hash``: an Argon2 PHC string (``$argon2id$v=19$m=...``) as written by argon2-cffi,
  e.g. ``python -c "from argon2 import PasswordHasher; print(PasswordHasher().hash('secret'))"``;
* ``token``: a bearer token (``Authorization: Bearer <token>``).

With no ``[[api_user]]`` at all (the demo set-up) the API answers only anonymous requests that
come straight from the loopback interface (127.0.0.0/8, ::1) and carry no proxy header
(``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``), so a demo is usable with ``curl`` on the
same machine, yet neither reachable from the network nor through a local reverse proxy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from threading import Lock
from typing import Any, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from starlette.exceptions import HTTPException

from ingest.config import ApiUser
from ingest.errors import ConfigError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REALM = "ticketgate"
ANONYMOUS_PATHS = frozenset({"/healthz"})
PROXY_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip")
_VERIFIED_CACHE_SIZE = 256


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an ``[[api_user]]`` name, or ``demo`` for a loopback demo request."""

    name: str
    method: Literal["basic", "bearer", "loopback-demo"]


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_loopback_authority(host_header: str | None) -> bool:
    """``Host: 127.0.0.1:8080``, ``localhost``, ``[::1]:8080``; absent counts as loopback (HTTP/1.0
    clients and in-process test clients send none)."""
    if host_header is None:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host in ("localhost", "localhost.localdomain") or is_loopback_host(host)


class Authenticator:
    """Checks ``Authorization`` headers against the configured API users."""

    def __init__(self, users: list[ApiUser]) -> None:
        self.users = list(users)
        self.demo_mode = not self.users
        self._hasher = PasswordHasher()
        self._cache_key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._lock = Lock()
        for user in self.users:
            if user.password_hash is not None and not user.password_hash.startswith("$argon2"):
                raise ConfigError(
                    f"api_user {user.name!r}: password_hash must be an Argon2 PHC string "
                    "($argon2id$v=19$...), as argon2-cffi's PasswordHasher().hash() writes it")
            if not (user.password or user.password_hash or user.token):
                raise ConfigError(f"api_user {user.name!r}: give password, password_hash or "
                                  "token, or the user can never log in")

    def authenticate(self, authorization: str | None, client_host: str | None,
                     proxied: bool, host_header: str | None = None) -> Principal | None:
        if self.demo_mode:
            # The Host check defeats DNS rebinding: a web page whose name resolves to 127.0.0.1
            # still sends its own name as Host.
            if is_loopback_host(client_host) and not proxied and is_loopback_authority(
                    host_header):
                return Principal("demo", "loopback-demo")
            return None
        if not authorization:
            return None
        scheme, _, credentials = authorization.strip().partition(" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if scheme == "basic":
            return self._basic(credentials)
        if scheme == "bearer":
            return self._bearer(credentials)
        return None

    def _basic(self, credentials: str) -> Principal | None:
        try:
            decoded = base64.b64decode(credentials.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return None
        try:
            text = decoded.decode("utf-8")
        except UnicodeDecodeError:
            text = decoded.decode("latin-1")
        name, colon, password = text.partition(":")
        if not colon:
            return None
        for user in self.users:
            if not hmac.compare_digest(user.name.encode(), name.encode()):
                continue
            if self._password_matches(user, password):
                return Principal(user.name, "basic")
        return None

    def _password_matches(self, user: ApiUser, password: str) -> bool:
        if user.password is not None and hmac.compare_digest(
                user.password.encode(), password.encode()):
            return True
        if user.password_hash is None:
            return False
        # Argon2 is slow on purpose; remember successful checks (keyed by an HMAC under a
        # per-process key, never the password itself) so a busy client is not slowed down.
        key = hmac.new(self._cache_key, f"{user.name}\x00{user.password_hash}\x00{password}"
                       .encode(), hashlib.sha256).digest()
        with self._lock:
            if key in self._verified:
                self._verified.move_to_end(key)
                return True
        try:
            self._hasher.verify(user.password_hash, password)
        except (VerificationError, InvalidHashError):
            return False
        with self._lock:
            self._verified[key] = None
            while len(self._verified) > _VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)
        return True

    def _bearer(self, token: str) -> Principal | None:
        if not token:
            return None
        for user in self.users:
            if user.token and hmac.compare_digest(user.token.encode(), token.encode()):
                return Principal(user.name, "bearer")
        return None


def error_payload(status: int, code: str, message: str, field: str | None = None,
                  path: str = "", **extra: Any) -> dict[str, Any]:
    """The one error shape of the API: ``{"Error": {"Code", "Message", "Field", ...}}``.

    Autotask routes also get ``errors: [message]``, the list Autotask clients look for.
    """
    body: dict[str, Any] = {"Error": {"Code": code, "Message": message, "Field": field,
                                      "Status": status, **extra}}
    if path.startswith("/atservicesrest/"):
        body["errors"] = [message]
    return body


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()), *(headers or [])],
    })
    await send({"type": "http.response.body", "body": data})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return bytes(value)
    return None


class AuthMiddleware:
    """401 with ``WWW-Authenticate`` for every path but /healthz unless the caller is known.

    The principal is left in ``scope["state"]["principal"]`` for the endpoints.
    """

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in ANONYMOUS_PATHS:
            await self.app(scope, receive, send)
            return
        raw = _header(scope, b"authorization")
        authorization = raw.decode("latin-1") if raw is not None else None
        client = scope.get("client")
        host = client[0] if client else None
        proxied = any(_header(scope, name) is not None for name in PROXY_HEADERS)
        raw_host = _header(scope, b"host")
        principal = self.authenticator.authenticate(
            authorization, host, proxied, raw_host.decode("latin-1") if raw_host else None)
        if principal is None:
            if self.authenticator.demo_mode:
                message = ("no [[api_user]] is configured: the demo API answers only requests "
                           "from this machine's loopback interface")
            elif authorization:
                message = "invalid credentials"
            else:
                message = "authentication required (HTTP Basic or Bearer)"
            await send_json(send, 401, error_payload(401, "Unauthorized", message,
                                                     "Authorization", scope.get("path", "")),
                            [(b"www-authenticate",
                              f'Basic realm="{REALM}", charset="UTF-8"'.encode()),
                             (b"www-authenticate", f'Bearer realm="{REALM}"'.encode())])
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit.  An HTTPException, because
    FastAPI turns any other exception raised while it reads the body into a plain 400."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodyLimitMiddleware:
    """413 for bodies over ``[http] max_body_bytes``: by Content-Length before reading, or while
    a chunked body streams in (the endpoint then never sees a truncated body)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, path: str) -> dict[str, Any]:
        return error_payload(413, "RequestTooLarge",
                             f"request body larger than {self.max_bytes} bytes "
                             "([http] max_body_bytes)", None, path, Limit=self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await send_json(send, 400, error_payload(400, "InvalidRequest",
                                                         "invalid Content-Length", None, path))
                return
            if declared > self.max_bytes:
                await send_json(send, 413, self._too_large(path), [(b"connection", b"close")])
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await send_json(send, 413, self._too_large(path), [(b"connection", b"close")])


# --- the connection, below the application --------------------------------------------------


def guarded_h11_protocol(head_timeout: float, max_head_bytes: int) -> type[Any]:
    """uvicorn's h11 protocol with a deadline for each request head, and its framing errors
    answered in the API's error shape instead of uvicorn's plain-text 400.

    uvicorn has no deadline for a request head: clients sending one header line every few
    seconds held their connections for good, and 20,000 of them took every file descriptor of
    the process.  Here a head must be complete within ``head_timeout`` seconds of the
    connection (or of the previous response on it), else the client gets 408 and the
    connection is closed.  The head's size is bounded by uvicorn's
    ``h11_max_incomplete_event_size`` (``max_head_bytes``, for the message): its default
    parser had taken a 300 MiB header whole, spending a core on it for minutes.

    Given to uvicorn as ``http=``; built here rather than at import so that importing this
    module does not import uvicorn."""
    import asyncio

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):  # type: ignore[misc]
        _head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is in: the app has it now
                self._disarm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_deadline()  # the next request's head, on a kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_deadline()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            _send_raw_error(self.transport, 400, "InvalidHttp",
                            f"{msg.rstrip('.')}: the request's framing or head is malformed, "
                            f"or its head is over {max_head_bytes} bytes")

        def _arm_head_deadline(self) -> None:
            self._disarm_head_deadline()
            self._head_deadline = self.loop.call_later(head_timeout, self._head_too_slow)

        def _disarm_head_deadline(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_too_slow(self) -> None:
            self._head_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                _send_raw_error(self.transport, 408, "RequestTimeout",
                                f"no complete request head within {head_timeout:g} s")

    return GuardedH11Protocol


def _send_raw_error(transport: Any, status: int, code: str, message: str) -> None:
    """An error in the API's shape written straight to the connection, which is then closed
    (for what goes wrong before a request reaches the application)."""
    body = json.dumps(error_payload(status, code, message)).encode()
    reason = {400: b"Bad Request", 408: b"Request Timeout"}[status]
    transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                    % (status, reason, len(body), body))
    transport.close()


class JsonMediaTypes:
    """``text/json`` bodies read as JSON: the SuperOffice documents (seeds 001-003) list it
    beside ``application/json``, and FastAPI took such a body for no JSON at all."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            for i, (name, value) in enumerate(headers):
                if name == b"content-type" and value.split(b";", 1)[0].strip().lower() == (
                        b"text/json"):
                    headers = list(headers)
                    headers[i] = (name, b"application/json" + value[len(value.split(b";", 1)[0]):])
                    scope = {**scope, "headers": headers}
                    break
        await self.app(scope, receive, send)
