"""Web plumbing that knows no domain: language negotiation, small forms, where a form came from,
CSRF tokens bound to the browser, client addresses as keyed hashes, and the middleware (body size,
access log without tokens, security headers)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from itsdangerous import BadSignature
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from plumbing.i18n import SUPPORTED_LOCALES, negotiate_locale, normalize_locale
from plumbing.logs import info_line, new_request_id, request_id
from plumbing.metrics import REQUEST_SECONDS, REQUESTS
from plumbing.settings import Settings
from plumbing.signing import csrf_dumps, csrf_serializer
from plumbing.usage import latency

CSRF_MAX_AGE_SECONDS = 24 * 3600
MAX_FORM_BYTES = 16 * 1024


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _normalized_origin(url: str) -> str | None:
    """scheme://host[:port] in lower case, default port dropped; None if `url` has no origin."""
    try:
        parts = urlsplit(url.strip())
        scheme, host, port = parts.scheme.lower(), (parts.hostname or "").lower(), parts.port
    except ValueError:  # a port that is not a number, a broken IPv6 literal
        return None
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


def posted_from_our_pages(request: Request, base_url: str) -> bool:
    """Whether a state-changing request may come from our own pages (BASE_URL's origin).

    - `Sec-Fetch-Site` (set by the browser; a page cannot forge it) other than same-origin (or
      none: the person started it, e.g. resubmitted the form by reloading): refused.
    - `Origin` naming another origin: refused. Our pages send `Referrer-Policy: no-referrer`, and
      with that policy a browser sends `Origin: null` on the pages' own form posts (Fetch standard),
      so "null" names no origin: it is judged like an absent header.
    - No (or a null) Origin: `Referer`, if present, must name our origin.
    - Neither Origin nor Referer: allowed. That is a client that is not a browser (curl, a script
      holding the link); a browser always sends `Origin` on a cross-site POST. The CSRF token, bound
      to the link and to this browser's cookie, still has to be valid.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    ours = _normalized_origin(base_url)
    origin = request.headers.get("origin")
    if origin is not None and origin.strip() != "null":
        return _normalized_origin(origin) == ours
    referer = request.headers.get("referer")
    if referer:
        return _normalized_origin(referer) == ours
    return True


LANGUAGE_COOKIE = "paylink_lang"


def _chosen(*picked: str | None) -> str | None:
    """A language the visitor picked with the switcher: this request's ?lang=, else the remembered one."""
    for chosen in picked:
        if chosen and normalize_locale(chosen, default="") in SUPPORTED_LOCALES:
            return normalize_locale(chosen)
    return None


def request_locale(request: Request, stored: str | None, default: str) -> str:
    """The visitor's own choice (switcher), then the customer's stored locale, then Accept-Language."""
    accept = request.headers.get("accept-language")
    return locale_of(request.query_params.get("lang"), request.cookies.get(LANGUAGE_COOKIE), stored, accept, default)


def locale_of(query_lang: str | None, cookie_lang: str | None, stored: str | None, accept_language: str | None, default: str) -> str:
    """`request_locale` from the request's parts (the raw ASGI hot path has no Request)."""
    chosen = _chosen(query_lang, cookie_lang)
    if chosen:
        return chosen
    if stored:
        return normalize_locale(stored, default)
    if accept_language is not None and len(accept_language) > MAX_REMEMBERED_ACCEPT_LANGUAGE:
        return negotiate_locale(accept_language, normalize_locale(default))
    return _negotiated(accept_language, default)


MAX_REMEMBERED_ACCEPT_LANGUAGE = 256  # browsers send far less; a longer header is parsed, not remembered


@lru_cache(maxsize=1024)
def _negotiated(accept_language: str | None, default: str) -> str:
    # Browsers send a handful of distinct headers; parsing one costs more than the rest of a cached page.
    return negotiate_locale(accept_language, normalize_locale(default))


async def small_form(request: Request) -> dict[str, str] | None:
    """The posted form's text fields, or None for an oversized or malformed body (a chunked body over
    the request limit goes on up to BodySizeLimit, which answers 413)."""
    if int(request.headers.get("content-length") or 0) > MAX_FORM_BYTES:
        return None
    try:
        form = await request.form(max_files=0, max_fields=20)
    except _BodyTooLarge:
        raise
    except Exception:  # malformed multipart or urlencoded body: the caller answers 400
        return None
    return {k: v for k, v in form.items() if isinstance(v, str)}


# --- CSRF: a signed token bound to the link (or address) the form belongs to, and to this browser ---
#
# Every browser gets a random cookie the first time a page with a form is rendered for it; the
# token in the form signs the subject's id and a digest of that cookie. A token copied from one
# browser (an attacker's own visit to a link) is worthless in another. Over https the cookie is
# `__Host-pl_csrf` (Secure, Path=/, no Domain: no sibling subdomain can set or shadow it); over plain
# http (development, tests) `__Host-` cookies cannot exist, so it is `paylink_csrf`.

CSRF_COOKIE_HTTPS = "__Host-pl_csrf"
CSRF_COOKIE_HTTP = "paylink_csrf"
_NEW_BROWSER_ID = "paylink.csrf_cookie"  # scope key: a cookie value minted for this answer
_BROWSER_ID = re.compile(r"[A-Za-z0-9_-]{43}")


def is_https(settings: Settings) -> bool:
    return settings.base_url.startswith("https://")


def csrf_cookie_name(settings: Settings) -> str:
    return CSRF_COOKIE_HTTPS if is_https(settings) else CSRF_COOKIE_HTTP


def _browser_id(request: Request, settings: Settings) -> str | None:
    return sane_browser_id(request.cookies.get(csrf_cookie_name(settings)))


def sane_browser_id(value: str | None) -> str | None:
    """The browser cookie's value if it is one we could have minted, else None (a new one is minted)."""
    return value if value is not None and _BROWSER_ID.fullmatch(value) else None


class _Randomness:
    """Bytes from the kernel's CSPRNG, fetched 8 KB at a time and each handed out once: one `getrandom`
    call per few hundred answers instead of one or two per answer (CSP nonces and browser ids were an
    eighth of a cached page's answer). Emptied in a forked child, so that no two processes share any."""

    BATCH = 8192

    def __init__(self) -> None:
        self._buffer = b""
        self._at = 0
        self._lock = threading.Lock()  # the event loop's thread takes nearly all; never the same bytes twice
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()  # (a lock held by another thread at the fork stays held in the child)
        self._buffer, self._at = b"", 0

    def take(self, size: int) -> bytes:
        with self._lock:
            buffer, at = self._buffer, self._at
            if at + size > len(buffer):
                buffer, at = os.urandom(max(self.BATCH, size)), 0
                self._buffer = buffer
            self._at = at + size
        return buffer[at : at + size]

    def token(self, size: int) -> str:
        """`secrets.token_urlsafe(size)`'s format: `size` random bytes, base64url without padding."""
        return base64.urlsafe_b64encode(self.take(size)).rstrip(b"=").decode("ascii")


_random = _Randomness()
NONCE_BYTES = 18  # 144 bits: 24 base64url characters, no padding


def new_browser_id() -> str:
    return _random.token(32)


def _browser_digest(browser_id: str) -> str:
    # The form carries a digest, never the cookie itself: the page's HTML does not reveal it.
    return hashlib.sha256(browser_id.encode()).hexdigest()[:32]


# A page rendered once for many answers (views/page_cache.py) gets placeholders instead of this
# request's CSP nonce and form tokens; each answer puts its own in.
RENDER_ONCE = "paylink.render_once"  # scope key: the Placeholders of a page being rendered for the cache


@dataclass
class Placeholders:
    """What stands in for per-request values while a page is rendered once, and what the render chose."""

    nonce: str  # stands for the CSP nonce
    csrf: str  # followed by the subject's id (32 hex digits) and "-": stands for csrf_token(…, subject)
    template: str | None = None  # the page rendered (set by views.render.render_page)
    locale: str | None = None  # …in this language


def render_once(request: Request) -> Placeholders | None:
    return request.scope.get(RENDER_ONCE)


def csrf_token(request: Request, settings: Settings, subject_id: uuid.UUID) -> str:
    """A form token for `subject_id` in this browser (a new browser cookie is minted if needed;
    `remember_browser` sets it on the answer, and `views.render.render_page` calls that)."""
    placeholders = request.scope.get(RENDER_ONCE)
    if placeholders is not None:
        return f"{placeholders.csrf}{subject_id.hex}-"
    browser_id = _browser_id(request, settings) or request.scope.get(_NEW_BROWSER_ID)
    if browser_id is None:
        browser_id = request.scope[_NEW_BROWSER_ID] = new_browser_id()
    return csrf_token_for(settings, subject_id, browser_id)


def csrf_token_for(settings: Settings, subject_id: uuid.UUID, browser_id: str) -> str:
    """The form token for `subject_id` in the browser whose cookie is `browser_id`."""
    return csrf_dumps(settings).dumps([subject_id.hex, _browser_digest(browser_id)])


def remember_browser(request: Request, response: Response, settings: Settings) -> None:
    """Set the browser cookie minted while rendering this answer (a session cookie, HttpOnly, Lax)."""
    browser_id = request.scope.get(_NEW_BROWSER_ID)
    if browser_id is not None:
        response.raw_headers.append((b"set-cookie", browser_cookie(settings, browser_id)))


def browser_cookie(settings: Settings, browser_id: str) -> bytes:
    """The Set-Cookie value of the browser cookie: what Starlette's `set_cookie(name, value, path="/",
    secure=…, httponly=True, samesite="lax")` writes, without building a SimpleCookie per answer."""
    secure = "; Secure" if is_https(settings) else ""
    return f"{csrf_cookie_name(settings)}={browser_id}; HttpOnly; Path=/; SameSite=lax{secure}".encode("latin-1")


def csrf_valid(request: Request, settings: Settings, subject_id: uuid.UUID, token: str | None) -> bool:
    browser_id = _browser_id(request, settings)
    if not token or browser_id is None:
        return False
    return csrf_valid_token(settings, subject_id, browser_id, token)


def csrf_valid_token(settings: Settings, subject_id: uuid.UUID, browser_id: str, token: str) -> bool:
    """Whether `token` is a form token for `subject_id` in the browser whose cookie is `browser_id`."""
    try:
        signed = csrf_serializer(settings).loads(token, max_age=CSRF_MAX_AGE_SECONDS)
    except BadSignature:
        return False
    expected = [subject_id.hex, _browser_digest(browser_id)]
    return (
        isinstance(signed, list)
        and len(signed) == 2
        and all(isinstance(v, str) for v in signed)
        and all(hmac.compare_digest(a, b) for a, b in zip(signed, expected, strict=True))
    )


# --- the client's address, as a keyed hash ------------------------------------------------------


def client_key(request: Request, settings: Settings) -> str:
    """Who is asking, for counting (brakes): a keyed hash of the client's address, never the address.

    `request.client` is the peer; behind a proxy, run uvicorn with `--proxy-headers` and
    `--forwarded-allow-ips <the proxy>` so that it is the address the proxy saw (X-Forwarded-For).
    An IPv6 client counts by its /64 network: one subscriber can pick any address in it."""
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
            host = str(ipaddress.IPv6Network((address, 64), strict=False))
        elif isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            host = str(address.ipv4_mapped)
    except ValueError:
        pass  # not an address (a unix socket, a test client): count it as it is
    key = hashlib.sha256(f"paylink.client-address.v1:{settings.link_secret_keys[0]}".encode()).digest()
    return hmac.new(key, host.encode(), hashlib.sha256).hexdigest()[:32]


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
        declared = _header(scope, b"content-length")
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


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


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
LINK_IN_PATH = re.compile(r"^/pay/l/[^/]+")


def templated_path(path: str) -> str:
    """The path as it may be logged: a link's token becomes `{token}`, a link's id `{link}`."""
    if LINK_IN_PATH.match(path):
        return LINK_IN_PATH.sub("/pay/l/{link}", path)
    return TOKEN_IN_PATH.sub(lambda m: f"/{m.group(1)}/{{token}}", path)


access_log = logging.getLogger("paylink.access")
REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID_SCOPE = "paylink.request_id"
STARTED = "paylink.started"  # scope key: when the request's handling began (the hot path, before it handed over)


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/pay/l/{link}`), for metrics: never the path itself."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path or "/"
    return "unmatched"


class AccessLog:
    """Pure ASGI middleware: one line per request, with link tokens replaced by `{token}`, and the
    request's metrics (latency by route template, status counts, the hourly latency for the usage
    report). It gives each request an id (the client's `X-Request-ID` if sane, else a new one),
    sends it back in `X-Request-ID` and keeps it in `plumbing.logs.request_id` for the request's
    log lines, audit entries and outbox rows.

    uvicorn's own access log would write the bearer token of every link; run it with --no-access-log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = scope.get(STARTED) or time.perf_counter()
        status = 500
        incoming = _header(scope, REQUEST_ID_HEADER)
        rid = new_request_id(incoming.decode("latin-1") if incoming else None)
        reset = request_id.set(rid)
        scope[REQUEST_ID_SCOPE] = rid  # for the 500 page, which Starlette answers outside this middleware

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            elapsed = time.perf_counter() - started
            record_request(scope.get("method", ""), scope.get("path", ""), route_template(scope), status, elapsed, rid)
            request_id.reset(reset)


# The metrics' children by label values (a route template, a method, a status: a bounded set), looked
# up once instead of on every request.
@lru_cache(maxsize=1024)
def _seconds(method: str, route: str) -> Any:
    return REQUEST_SECONDS.labels(method, route)


@lru_cache(maxsize=4096)
def _requests(method: str, route: str, status: int) -> Any:
    return REQUESTS.labels(method, route, str(status))


def record_request(method: str, path: str, route: str, status: int, elapsed: float, rid: str) -> None:
    """A request's metrics and its access-log line (the path with tokens templated, never a token)."""
    if route != "/metrics":
        _seconds(method, route).observe(elapsed)
        _requests(method, route, status).inc()
        latency.observe(elapsed)
    templated = templated_path(path)
    ms = round(elapsed * 1000, 1)
    fields = {"event": "request", "request_id": rid, "method": method, "path": templated, "route": route, "status": status, "ms": ms}
    line = "request method=%s path=%s status=%d ms=%.1f request_id=%s"
    info_line(access_log, line, (method, templated, status, elapsed * 1000, rid), fields, rid)


# --- security headers --------------------------------------------------------------------------------


SECURITY_HEADERS = "paylink.security_headers"  # scope key: the headers every answer carries


class SecurityPolicy:
    """The headers every answer carries: CSP with the answer's nonce, and the other strict headers."""

    def __init__(self, *, stripe_origins: list[str], hsts: bool) -> None:
        stripe = " ".join(dict.fromkeys(stripe_origins))
        self._csp = (
            f"default-src 'self'; script-src 'self' 'nonce-{{nonce}}' {stripe}; frame-src {stripe}; "
            f"connect-src 'self' {stripe}; img-src 'self' data:; style-src 'self' 'nonce-{{nonce}}'; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
        )
        self._fixed = [
            (b"referrer-policy", b"no-referrer"),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=(self)"),
        ]
        if hsts:
            self._fixed.append((b"strict-transport-security", b"max-age=63072000; includeSubDomains"))

    @staticmethod
    def new_nonce() -> str:
        return _random.token(NONCE_BYTES)

    def headers(self, nonce: str, path: str) -> list[tuple[bytes, bytes]]:
        strict = [(b"content-security-policy", self._csp.replace("{nonce}", nonce).encode()), *self._fixed]
        if not path.startswith(("/static/", "/brand/")) and path != "/favicon.ico":
            strict.append((b"cache-control", b"no-store"))
        return strict


class SecurityHeaders:
    """Pure ASGI middleware: the security policy's headers on every answer, with a per-request nonce."""

    def __init__(self, app: ASGIApp, *, policy: SecurityPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = scope["csp_nonce"] = self.policy.new_nonce()
        strict = self.policy.headers(nonce, scope.get("path", ""))
        # Starlette answers an unhandled error outside every middleware: its handler adds these itself.
        scope[SECURITY_HEADERS] = strict

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *strict]
            await send(message)

        await self.app(scope, receive, send_with_headers)
