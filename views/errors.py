"""Bad links, expired links and bad forms are exceptions; one handler renders each as its page.

Views raise; they never return "a page or an error" for the caller to check.
"""

from __future__ import annotations

from typing import Any, ClassVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from plumbing.i18n import N_
from plumbing.rendering import pages
from plumbing.web import request_locale
from views.render import render_page, settings_of


class PageError(Exception):
    """A request the page answers with another page (4xx): which template, what status, what context."""

    template = "error.html"
    status_code = 400
    json_code: ClassVar[str | None] = None  # the JSON answer's "error" (else the route's own code)
    json_message: ClassVar[str | None] = None  # and its "message" for the customer (translated)

    def __init__(self, **context: Any) -> None:
        super().__init__(self.template)
        self.context = context
        self.headers: dict[str, str] = {}


class InvalidLink(PageError):
    """Forged, tampered, truncated, retired or unknown: "open the link from your email"."""

    template = "invalid_link.html"
    status_code = 404


class OpenFromEmail(InvalidLink):
    """/pay/l/<link> without this link's cookie (another browser or device, a scanner that keeps no
    cookies, a forged cookie): the page asks to open the link from the email."""

    def __init__(self) -> None:
        super().__init__(reason="handoff")


class ExpiredLink(PageError):
    """Ours, but its time is up: the page offers to email a fresh link (context: renew_url, csrf)."""

    template = "expired.html"
    status_code = 410


class NoReceipt(PageError):
    """…/receipt.pdf of an invoice that is not paid (yet): there is no receipt to give."""

    template = "error.html"
    status_code = 404

    def __init__(self, **context: Any) -> None:
        super().__init__(reason="no_receipt", **context)


class BadForm(PageError):
    """A missing or stale CSRF token, a cross-site post, an oversized or malformed body."""

    template = "error.html"
    status_code = 400

    def __init__(self) -> None:
        super().__init__(reason="form")


class CrossOrigin(PageError):
    """A form posted from another website (Origin or Referer not ours)."""

    template = "error.html"
    status_code = 403

    def __init__(self) -> None:
        super().__init__(reason="origin")


class TooManyAttempts(PageError):
    """A brake refused the request (payments/brakes.py): try again later, or contact the merchant."""

    template = "too_many.html"
    status_code = 429
    json_code = "too_many_attempts"
    json_message = N_("Too many attempts. Please try again later, or contact %(merchant)s.")

    def __init__(self, retry_after_seconds: int) -> None:
        super().__init__()
        self.headers["Retry-After"] = str(retry_after_seconds)


class VerificationGone(PageError):
    """A verification link that expired, or was replaced by a newer request."""

    template = "verify.html"
    status_code = 410

    def __init__(self, state: str) -> None:
        super().__init__(state=state)


JSON_ERROR = "paylink.json"  # scope key: this route answers errors in JSON, with this error code


async def render_page_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PageError)
    json_error = request.scope.get(JSON_ERROR)  # set by the routes that answer in JSON
    if json_error:
        body = {"error": exc.json_code or json_error}
        if exc.json_message:
            settings = settings_of(request)
            locale = request_locale(request, None, settings.default_locale)
            body["message"] = pages.gettext(locale, exc.json_message, merchant=settings.merchant_name)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
    context = dict(exc.context)
    if isinstance(exc, ExpiredLink) and "link_id" in context:
        # The expired page names the invoice and its amount (a read, off the hot path).
        page, _ = await request.state.services.pages.pay_page(context["link_id"])
        if page is not None:
            context.update(invoice=page.invoice, customer=page.customer)
            locale = request_locale(request, page.customer.locale, settings_of(request).default_locale)
            context.setdefault("locale", locale)
    response = render_page(request, exc.template, status_code=exc.status_code, **context)
    response.headers.update(exc.headers)
    return response
