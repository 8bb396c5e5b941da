"""Bad links, expired links and bad forms are exceptions; one handler renders each as its page.

Views raise; they never return "a page or an error" for the caller to check.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from links.models import InvoiceStatus
from plumbing.i18n import N_
from plumbing.rendering import pages
from plumbing.web import request_locale
from views.page_cache import page_cache_of
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
    """Ours, but its time is up: the page offers to email a fresh link (context: pay_path, csrf, link_id).

    The token was genuine (signed by us), so the handler may read the link's page, once: to name the
    invoice, and to show its receipt instead when it has one (`receipt_page(page, receipt)`, set by
    the views): a paid invoice's link always shows its receipt, however old the link is."""

    template = "expired.html"
    status_code = 410

    def __init__(self, receipt_page: Callable[[Any, Any], Response] | None = None, **context: Any) -> None:
        super().__init__(**context)
        self.receipt_page = receipt_page


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


def fixed_page_data(exc: InvalidLink, locale: str) -> tuple[Any, ...]:
    """What decides the page of an InvalidLink (for `PageCache.answer_fixed`; views/hot_path.py asks too)."""
    return (exc.template, exc.status_code, locale, *sorted(exc.context.items()))


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
    if isinstance(exc, InvalidLink) and not exc.headers:
        # The same page for every forged link (per language and reason): rendered once, filled per answer.
        locale = request_locale(request, None, settings_of(request).default_locale)
        data = fixed_page_data(exc, locale)
        page = functools.partial(render_page, request, exc.template, locale=locale, status_code=exc.status_code, **context)
        return page_cache_of(request).answer_fixed(request, data, page)
    if isinstance(exc, ExpiredLink) and "link_id" in context:
        # The expired page names the invoice and its amount (a read, off the hot path).
        page, receipt = await request.state.services.pages.pay_page(context["link_id"])
        if page is not None and exc.receipt_page is not None and page.invoice.status in InvoiceStatus.HAS_RECEIPT:
            return exc.receipt_page(page, receipt)
        if page is not None:
            context.update(invoice=page.invoice, customer=page.customer)
            locale = request_locale(request, page.customer.locale, settings_of(request).default_locale)
            context.setdefault("locale", locale)
    response = render_page(request, exc.template, status_code=exc.status_code, **context)
    response.headers.update(exc.headers)
    return response


# --- what a failed payment tells the customer ------------------------------------------------------------
# Stripe's codes (its error code, or "card_declined:<the issuer's decline code>") as short translated
# sentences naming the card. Stripe's own English text stays in the database, for finance.

CARD_DECLINED = N_("Your bank declined the payment with %(card)s.")
CARD_FAILURES = {
    "payment_intent_authentication_failure": N_("Your bank did not confirm the payment: %(card)s failed authentication."),
    "authentication_required": N_("Your bank did not confirm the payment: %(card)s failed authentication."),
    "card_declined": CARD_DECLINED,
    "insufficient_funds": N_("Your bank declined the payment with %(card)s: there are not enough funds on the card."),
    "card_velocity_exceeded": N_("Your bank declined the payment with %(card)s: the card has reached its limit."),
    "expired_card": N_("The card %(card)s has expired."),
    "incorrect_cvc": N_("The security code of %(card)s was not accepted."),
    "invalid_cvc": N_("The security code of %(card)s was not accepted."),
    "processing_error": N_("The bank could not process the payment with %(card)s. Please try again in a moment."),
}
# Decline codes that say no more to a customer than "declined" (and should not: lost, stolen, fraud).
for _code in (
    "generic_decline", "do_not_honor", "do_not_try_again", "lost_card", "stolen_card", "pickup_card", "fraudulent",
    "restricted_card", "security_violation", "transaction_not_allowed", "not_permitted", "call_issuer", "revocation_of_authorization",
):  # fmt: skip
    CARD_FAILURES[_code] = CARD_DECLINED
PAYMENT_NOT_COMPLETED = N_("The payment with %(card)s was not completed.")
AUTHENTICATION_STOPPED = N_("You stopped your bank's confirmation for %(card)s.")
NOT_ABANDONED = N_("We could not stop your bank's confirmation. Please try again in a moment.")
YOUR_CARD = N_("your card")


def card_failure_message(code: object) -> str:
    """The sentence (untranslated: translate it with the card's name as `card`) for a failure code."""
    if isinstance(code, str):
        for part in reversed(code.split(":")):  # the issuer's decline code is the more precise
            if part in CARD_FAILURES:
                return CARD_FAILURES[part]
    return PAYMENT_NOT_COMPLETED
