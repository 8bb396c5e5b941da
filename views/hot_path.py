"""The pay page's hot path: payday's two requests answered before Starlette, from the page cache.

On payday nearly every request is one of two: GET /pay/l/<link> of a browser holding the link's cookie
(the page, most often a page already rendered for that state and language), and, from anyone probing,
GET /pay/<forged token>. Starlette's routing, its Request, the three middlewares and the exception
handling cost more than answering from the cache. `HotPath` is a pure ASGI middleware, outermost,
that answers exactly these cases itself and hands everything else, untouched, to the app:

- GET /pay/l/<32 hex>, no query string, with a cookie holding a valid token for that link: one raw
  read (payments/page_reader.PageRows: the rows as the driver returns them, on the replica unless this
  browser just posted a form), a key from those rows, the language and the day
  (views/page_cache.PageCache.fast_key_of), and, when the page is kept, the answer: the page's text with
  this answer's CSP nonce and form tokens, the browser cookie the tokens are bound to if the browser
  has none, the security policy's headers and the request id; the open is counted as on the slow
  path. On a miss the app renders the page as always and keeps it under this key too.
- GET /pay/<token>, no query string, where the token is not ours: the "this link does not work" page
  of the visitor's language, if kept (it is after the first), with no database query.

What it answers is byte for byte what the app would (tests/integration/test_hot_path.py compares
them), with the same access-log line and metrics (plumbing/web.record_request). Anything else (a
missing or expired cookie, a page that needs more reads than PAGE, a query string, HEAD, an error
while reading) goes the general way, which answers it as before; nothing has been sent by then.
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Receive, Scope, Send

from plumbing.logs import new_request_id
from plumbing.settings import Settings
from plumbing.signing import TokenExpired, TokenInvalid, pay_signer
from plumbing.web import (
    LANGUAGE_COOKIE,
    REQUEST_ID_HEADER,
    STARTED,
    SecurityPolicy,
    browser_cookie,
    csrf_cookie_name,
    csrf_token_for,
    locale_of,
    new_browser_id,
    record_request,
    sane_browser_id,
)
from views.errors import InvalidLink, fixed_page_data
from views.page_cache import FAST_KEY, FAST_LOCALE, FAST_ROWS, CachedPage, PageCache, fill
from views.pages import LINK_COOKIE_PREFIX, LINK_HEX, PRIMARY_COOKIE, PageServices

log = logging.getLogger("paylink.hot_path")
PAGE_ROUTE = "/pay/l/{link_hex}"  # the routes' templates, as the access log and the metrics name them
TOKEN_ROUTE = "/pay/{token}"  # noqa: S105 (a route template, not a secret)
_PAGE_PREFIX = "/pay/l/"
_PAGE_PATH_LENGTH = len(_PAGE_PREFIX) + 32


class HotPath:
    def __init__(self, app: ASGIApp, *, settings: Settings, policy: SecurityPolicy) -> None:
        self.app = app
        self.settings = settings
        self.policy = policy
        self.signer = pay_signer(settings)
        self.browser_cookie_name = csrf_cookie_name(settings)
        self.invalid_link = InvalidLink()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope["query_string"]:
            path: str = scope["path"]
            started = time.perf_counter()
            if len(path) == _PAGE_PATH_LENGTH and path.startswith(_PAGE_PREFIX):
                if await self._page(scope, send, path, started):
                    return
            elif path.startswith("/pay/") and path.find("/", 5) == -1 and len(path) > 6:
                if await self._forged(scope, send, path, started):
                    return
        await self.app(scope, receive, send)

    async def _page(self, scope: Scope, send: Send, path: str, started: float) -> bool:
        link_hex = path[len(_PAGE_PREFIX) :]
        if not LINK_HEX.fullmatch(link_hex):
            return False
        headers = _headers(scope)
        cookies = _cookies(scope)
        token = cookies.get(LINK_COOKIE_PREFIX + link_hex)
        if not token:
            return False
        try:
            claims = self.signer.verify(token)
        except (TokenExpired, TokenInvalid):
            return False
        if claims.subject_id.hex != link_hex:
            return False
        services: PageServices | None = scope.get("state", {}).get("services")
        if services is None:
            return False
        reader = services.pages if PRIMARY_COOKIE in cookies else services.replica_pages
        try:
            rows = await reader.page_rows(claims.subject_id)
        except Exception:  # the general way reads again, and answers the error as it always does
            log.debug("hot_path.read_failed", exc_info=True)
            return False
        if rows is None:
            return False
        accept = _text(headers.get(b"accept-language"))
        locale = locale_of(None, cookies.get(LANGUAGE_COOKIE), rows.locale, accept, self.settings.default_locale)
        cache = _cache(scope)
        key = cache.fast_key_of(path, locale, rows)
        found = cache.lookup(key)
        if found is None:
            # The app renders the page of these very rows and keeps it under this key (views/pages.py).
            scope[FAST_KEY], scope[FAST_LOCALE], scope[FAST_ROWS], scope[STARTED] = key, locale, rows, started
            return False
        services.opens.record(claims.subject_id)
        await self._send(scope, send, headers, cookies, *found, path, PAGE_ROUTE, started)
        return True

    async def _forged(self, scope: Scope, send: Send, path: str, started: float) -> bool:
        if not self.signer.forged(path[5:]):
            return False  # a genuine token (current or expired): the handoff or the expired page (views/pages.py)
        headers = _headers(scope)
        cookies = _cookies(scope)
        locale = locale_of(None, cookies.get(LANGUAGE_COOKIE), None, _text(headers.get(b"accept-language")), self.settings.default_locale)
        cache = _cache(scope)
        found = cache.lookup(cache.fixed_key(fixed_page_data(self.invalid_link, locale)))
        if found is None:
            return False
        await self._send(scope, send, headers, cookies, *found, path, TOKEN_ROUTE, started)
        return True

    async def _send(
        self,
        scope: Scope,
        send: Send,
        headers: dict[bytes, bytes],
        cookies: dict[str, str],
        page: CachedPage,
        text: bytes,
        path: str,
        route: str,
        started: float,
    ) -> None:
        """The kept page with this answer's nonce, form tokens and cookie; the headers the middlewares add."""
        nonce = self.policy.new_nonce()
        browser_id = sane_browser_id(cookies.get(self.browser_cookie_name))
        minted: list[str] = []

        def token_for(subject: uuid.UUID) -> str:
            nonlocal browser_id
            if browser_id is None:
                browser_id = new_browser_id()
                minted.append(browser_id)
            return csrf_token_for(self.settings, subject, browser_id)

        body = fill(page, text, nonce.encode(), token_for)
        incoming = headers.get(REQUEST_ID_HEADER)
        rid = new_request_id(incoming.decode("latin-1") if incoming else None)
        answer: list[tuple[bytes, bytes]] = [(b"content-length", str(len(body)).encode()), *page.headers]
        if minted:
            answer.append((b"set-cookie", browser_cookie(self.settings, minted[0])))
        answer += self.policy.headers(nonce, path)
        answer.append((REQUEST_ID_HEADER, rid.encode()))
        await send({"type": "http.response.start", "status": page.status, "headers": answer})
        await send({"type": "http.response.body", "body": body})
        record_request("GET", path, route, page.status, time.perf_counter() - started, rid)


def _cache(scope: Scope) -> PageCache:
    """The app's page cache (app.state.page_cache: the one the app's own render keeps pages in)."""
    return scope["app"].state.page_cache  # type: ignore[no-any-return]


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by name, the first of each (as Starlette's `headers.get` reads them)."""
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        found.setdefault(name, value)
    return found


def _cookies(scope: Scope) -> dict[str, str]:
    """The request's cookies as Starlette's `Request.cookies` reads them: every Cookie header (HTTP/2 may
    split one, and proxies pass the pieces on), in order, a later one winning."""
    cookies: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name == b"cookie":
            cookies.update(cookie_parser(value.decode("latin-1")))
    return cookies


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None
