"""Rendering a page for a request: the merchant, the languages, the CSP nonce, the chosen language, and
the browser cookie that the page's CSRF tokens are bound to.

A page rendered once for many answers (views/page_cache.py) is rendered with placeholders for the
nonce and the form tokens, and without this request's cookies: `finish_page` sets those on each answer.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from plumbing.i18n import LOCALE_NAMES, normalize_locale
from plumbing.rendering import LOGO_PATH, brand_of, pages
from plumbing.settings import Settings
from plumbing.web import LANGUAGE_COOKIE, remember_browser, render_once, request_locale


def settings_of(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def render_page(request: Request, name: str, *, locale: str | None = None, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render a page in `locale` (default: the visitor's choice, then Accept-Language)."""
    settings = settings_of(request)
    locale = locale or request_locale(request, None, settings.default_locale)
    context.setdefault("languages", LOCALE_NAMES)
    placeholders = render_once(request)
    html = pages.render(
        name,
        locale,
        request=request,
        csp_nonce=placeholders.nonce if placeholders else request.scope.get("csp_nonce", ""),
        merchant=settings.merchant_name,
        identity=brand_of(settings),
        logo_path=LOGO_PATH if settings.merchant_logo_path else None,
        **context,
    )
    response = HTMLResponse(html, status_code=status_code)
    if placeholders is not None:
        placeholders.template, placeholders.locale = name, locale
        return response  # rendered for many answers: each gets its own cookies (finish_page)
    finish_page(request, response, locale)
    return response


def finish_page(request: Request, response: Response, locale: str) -> None:
    """This request's cookies on a page's answer: the browser cookie its forms' tokens are bound to (if
    rendering minted one), and the language picked with the switcher."""
    remember_browser(request, response, settings_of(request))
    picked = request.query_params.get("lang")
    if picked and normalize_locale(picked, default="") == locale:
        # Remember the switcher's choice, so the pages after a form post stay in that language.
        response.set_cookie(LANGUAGE_COOKIE, locale, max_age=365 * 24 * 3600, httponly=True, samesite="lax")
