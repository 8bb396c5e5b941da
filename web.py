"""Shared web plumbing: the per-app context, page rendering, CSRF tokens, security headers."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from i18n import LOCALE_NAMES, SUPPORTED_LOCALES, negotiate_locale, normalize_locale
from links.opens import OpenRecorder
from links.pagereader import PageReader
from payments.gateway import StripeGateway
from payments.webhooks import WebhookWriter
from rendering import pages
from settings import Settings

CSRF_MAX_AGE_SECONDS = 24 * 3600
MAX_FORM_BYTES = 16 * 1024


@dataclass
class Paylink:
    """Everything a request needs, built once by the lifespan."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]  # read-write (BEGIN IMMEDIATE on SQLite)
    readers: async_sessionmaker[AsyncSession]  # read-only transactions
    gateway: StripeGateway
    opens: OpenRecorder
    pages: PageReader
    webhooks: WebhookWriter
    outbox_wakeup: asyncio.Event = field(default_factory=asyncio.Event)


def paylink(request: Request) -> Paylink:
    return request.state.paylink  # type: ignore[no-any-return]


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


def render_page(request: Request, name: str, *, locale: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    settings = paylink(request).settings
    html = pages.render(
        name,
        locale,
        request=request,
        csp_nonce=request.scope.get("csp_nonce", ""),
        merchant=settings.merchant_name,
        languages=LOCALE_NAMES,
        **context,
    )
    response = HTMLResponse(html, status_code=status_code)
    picked = request.query_params.get("lang")
    if picked and normalize_locale(picked, default="") == locale:
        # Remember the switcher's choice, so the pages after a form post stay in that language.
        response.set_cookie(LANGUAGE_COOKIE, locale, max_age=365 * 24 * 3600, httponly=True, samesite="lax")
    return response


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


def _csrf_serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer([str(k) for k in reversed(settings.link_secret_keys)], salt="paylink.csrf.v1")


def csrf_token(settings: Settings, link_id: uuid.UUID) -> str:
    return _csrf_serializer(settings).dumps(link_id.hex)


def csrf_valid(request: Request, settings: Settings, link_id: uuid.UUID, token: str | None) -> bool:
    # A browser tells us when a form was posted from another site; refuse those outright.
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    if not token:
        return False
    try:
        return bool(_csrf_serializer(settings).loads(token, max_age=CSRF_MAX_AGE_SECONDS) == link_id.hex)
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
            path = TOKEN_IN_PATH.sub(lambda m: f"/{m.group(1)}/{{token}}", scope.get("path", ""))
            elapsed_ms = (time.perf_counter() - started) * 1000
            access_log.info("request method=%s path=%s status=%d ms=%.1f", scope.get("method"), path, status, elapsed_ms)


# --- security headers --------------------------------------------------------------------------------


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

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", csp.encode()),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=(self)"),
                ]
                if self.hsts:
                    headers.append((b"strict-transport-security", b"max-age=63072000; includeSubDomains"))
                if not path.startswith("/static/"):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
