"""Web plumbing that knows no domain: language negotiation, small forms, CSRF tokens, and the
middleware (body size, access log without tokens, security headers)."""

from __future__ import annotations

import logging
import re
import secrets
import time
import uuid
from urllib.parse import urlsplit

from itsdangerous import BadSignature
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from plumbing.i18n import SUPPORTED_LOCALES, negotiate_locale, normalize_locale
from plumbing.settings import Settings
from plumbing.signing import csrf_serializer

CSRF_MAX_AGE_SECONDS = 24 * 3600
MAX_FORM_BYTES = 16 * 1024


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


LANGUAGE_COOKIE = "paylink_lang"


def chosen_language(request: Request) -> str | None:
    """A language the visitor picked with the switcher: this request's ?lang=, else the remembered one."""
    for chosen in (request.query_params.get("lang"), request.cookies.get(LANGUAGE_COOKIE)):
        if chosen and normalize_locale(chosen, default="") in SUPPORTED_LOCALES:
            return normalize_locale(chosen)
    return None


def request_locale(request: Request, stored: str | None, default: str) -> str:
    """The visitor's own choice (switcher), then the customer's stored locale, then Accept-Language."""
    chosen = chosen_language(request)
    if chosen:
        return chosen
    if stored:
        return normalize_locale(stored, default)
    return negotiate_locale(request.headers.get("accept-language"), normalize_locale(default))


async def small_form(request: Request) -> dict[str, str] | None:
    """The posted form's text fields, or None for an oversized or malformed body."""
    if int(request.headers.get("content-length") or 0) > MAX_FORM_BYTES:
        return None
    try:
        form = await request.form(max_files=0, max_fields=20)
    except Exception:  # malformed multipart or urlencoded body: the caller answers 400
        return None
    return {k: v for k, v in form.items() if isinstance(v, str)}


# --- CSRF: a signed token bound to the link the form belongs to ------------------------------------


def csrf_token(settings: Settings, link_id: uuid.UUID) -> str:
    return csrf_serializer(settings).dumps(link_id.hex)


def csrf_valid(request: Request, settings: Settings, link_id: uuid.UUID, token: str | None) -> bool:
    # A browser tells us when a form was posted from another site; refuse those outright.
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    if not token:
        return False
    try:
        return bool(csrf_serializer(settings).loads(token, max_age=CSRF_MAX_AGE_SECONDS) == link_id.hex)
    except BadSignature:
        return False


# --- request size ---------------------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Pure ASGI middleware: refuse request bodies over `max_bytes` with 413, chunked ones included."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _plain(send, 413, b"request body too large")
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await _plain(send, 413, b"request body too large")


async def _plain(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --- an access log that never contains a token ---------------------------------------------------------

TOKEN_IN_PATH = re.compile(r"^/(pay|verify)/[^/]+")


def templated_path(path: str) -> str:
    """The path as it may be logged: a link's token becomes `{token}`."""
    return TOKEN_IN_PATH.sub(lambda m: f"/{m.group(1)}/{{token}}", path)


access_log = logging.getLogger("paylink.access")


class AccessLog:
    """Pure ASGI middleware: one line per request, with link tokens replaced by `{token}`.

    uvicorn's own access log would write the bearer token of every link; run it with --no-access-log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            path = templated_path(scope.get("path", ""))
            elapsed_ms = (time.perf_counter() - started) * 1000
            access_log.info("request method=%s path=%s status=%d ms=%.1f", scope.get("method"), path, status, elapsed_ms)


# --- security headers --------------------------------------------------------------------------------


SECURITY_HEADERS = "paylink.security_headers"  # scope key: the headers every answer carries


class SecurityHeaders:
    """Pure ASGI middleware: CSP with a per-request nonce, and the other strict headers."""

    def __init__(self, app: ASGIApp, *, stripe_origins: list[str], hsts: bool) -> None:
        self.app = app
        self.stripe = " ".join(dict.fromkeys(stripe_origins))
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(16)
        scope["csp_nonce"] = nonce
        csp = (
            f"default-src 'self'; script-src 'self' 'nonce-{nonce}' {self.stripe}; frame-src {self.stripe}; "
            f"connect-src 'self' {self.stripe}; img-src 'self' data:; style-src 'self' 'nonce-{nonce}'; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
        )
        path: str = scope.get("path", "")
        strict = [
            (b"content-security-policy", csp.encode()),
            (b"referrer-policy", b"no-referrer"),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=(self)"),
        ]
        if self.hsts:
            strict.append((b"strict-transport-security", b"max-age=63072000; includeSubDomains"))
        if not path.startswith("/static/"):
            strict.append((b"cache-control", b"no-store"))
        # Starlette answers an unhandled error outside every middleware: its handler adds these itself.
        scope[SECURITY_HEADERS] = strict

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *strict]
            await send(message)

        await self.app(scope, receive, send_with_headers)
