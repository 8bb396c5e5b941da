"""GET /pay/{token}: the prefilled payment page and its other states (expired, revoked, void, paid).

The hot path: the token is verified in memory (a forged one never reaches the database), then one
read-only transaction loads link, invoice, customer, live payment and saved cards; the open is
counted in memory and written in the background. Stripe is never called here.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from links import lifecycle, service
from links.models import InvoiceStatus
from links.tokens import TokenClaims, TokenExpired, TokenInvalid
from payments.models import PaymentStatus
from web import csrf_token, csrf_valid, paylink, render_page, request_locale, small_form

IN_FLIGHT = (PaymentStatus.CREATED, PaymentStatus.REQUIRES_CONFIRMATION, PaymentStatus.PROCESSING, PaymentStatus.PENDING)


def verify_pay_token(request: Request, token: str) -> TokenClaims | Response:
    """The link's claims, or the page to show instead (never a database query for a bad token)."""
    app = paylink(request)
    locale = request_locale(request, None, app.settings.default_locale)
    try:
        return service.pay_signer(app.settings).verify(token)
    except TokenExpired as expired:
        csrf = csrf_token(app.settings, expired.subject_id)
        return render_page(request, "expired.html", locale=locale, status_code=410, token=token, csrf=csrf)
    except TokenInvalid:
        return render_page(request, "invalid_link.html", locale=locale, status_code=404)


async def pay_page(request: Request) -> Response:
    token = request.path_params["token"]
    claims = verify_pay_token(request, token)
    if isinstance(claims, Response):
        return claims
    app = paylink(request)
    page, receipt = await app.pages.pay_page(claims.subject_id)
    if page is None:
        return render_page(request, "invalid_link.html", locale=request_locale(request, None, app.settings.default_locale), status_code=404)
    if request.method == "GET":
        app.opens.record(page.link.id)
    return render_pay_state(request, token, page, receipt=receipt)


def render_pay_state(
    request: Request,
    token: str,
    page: service.PayPage,
    *,
    receipt: tuple[str | None, str | None, object] | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    app = paylink(request)
    locale = request_locale(request, page.customer.locale, app.settings.default_locale)
    context: dict[str, Any] = {"token": token, "invoice": page.invoice, "customer": page.customer, "link": page.link}
    invoice = page.invoice
    if invoice.status == InvoiceStatus.VOID:  # before "revoked": voiding also revokes the links
        return render_page(request, "void.html", locale=locale, status_code=410, **context)
    if page.link.revoked_at is not None:
        return render_page(request, "revoked.html", locale=locale, status_code=410, **context)
    if invoice.status in (InvoiceStatus.PAID, InvoiceStatus.REFUNDED, InvoiceStatus.PARTIALLY_REFUNDED):
        brand, last4, paid_at = receipt or (None, None, None)
        return render_page(request, "paid.html", locale=locale, brand=brand, last4=last4, paid_at=paid_at or invoice.paid_at, **context)
    live = page.live_payment
    if invoice.status == InvoiceStatus.PROCESSING or (live is not None and live.status in IN_FLIGHT):
        return render_page(request, "processing.html", locale=locale, csrf=csrf_token(app.settings, page.link.id), **context)
    return render_page(
        request,
        "pay.html",
        locale=locale,
        status_code=status_code,
        cards=page.cards,
        csrf=csrf_token(app.settings, page.link.id),
        needs_action=live is not None and live.status == PaymentStatus.REQUIRES_ACTION,
        error=error,
        publishable_key=app.settings.stripe_publishable_key,
        stripe_js_url=app.settings.stripe_js_url,
        **context,
    )


async def request_fresh_link(request: Request) -> Response:
    """POST /pay/{token}/renew from the expired page: a fresh link goes to the address on file.

    The answer is the same whether or not an email went out (rate limit, paid, unknown)."""
    app = paylink(request)
    token = request.path_params["token"]
    locale = request_locale(request, None, app.settings.default_locale)
    try:
        link_id = service.pay_signer(app.settings).verify(token).subject_id
    except TokenExpired as expired:
        link_id = expired.subject_id
    except TokenInvalid:
        return render_page(request, "invalid_link.html", locale=locale, status_code=404)
    form = await small_form(request)
    if form is None or not csrf_valid(request, app.settings, link_id, form.get("csrf")):
        return render_page(request, "error.html", locale=locale, status_code=400, reason="form")
    async with app.sessions.begin() as session:
        await lifecycle.request_fresh_link(session, app.settings, link_id)
    app.outbox_wakeup.set()
    return render_page(request, "renewed.html", locale=locale, token=token)


def _verification_id(request: Request) -> tuple[str, Any] | Response:
    app = paylink(request)
    token = request.path_params["token"]
    locale = request_locale(request, None, app.settings.default_locale)
    try:
        return locale, lifecycle.verify_signer(app.settings).verify(token).subject_id
    except TokenExpired:
        return render_page(request, "verify.html", locale=locale, status_code=410, state="expired")
    except TokenInvalid:
        return render_page(request, "invalid_link.html", locale=locale, status_code=404)


async def verify_page(request: Request) -> Response:
    """GET /verify/{token}: a button to confirm (GET changes nothing: mail scanners prefetch links)."""
    found = _verification_id(request)
    if isinstance(found, Response):
        return found
    locale, verification_id = found
    app = paylink(request)
    async with app.readers() as session:
        customer = await lifecycle.find_verification(session, verification_id)
    if customer is None:
        return render_page(request, "verify.html", locale=locale, status_code=410, state="replaced")
    locale = request_locale(request, customer.locale, app.settings.default_locale)
    state = "done" if customer.email_verified_at else "confirm"
    return render_page(
        request, "verify.html", locale=locale, state=state, customer=customer, csrf=csrf_token(app.settings, verification_id)
    )


async def confirm_verification(request: Request) -> Response:
    found = _verification_id(request)
    if isinstance(found, Response):
        return found
    locale, verification_id = found
    app = paylink(request)
    form = await small_form(request)
    if form is None or not csrf_valid(request, app.settings, verification_id, form.get("csrf")):
        return render_page(request, "error.html", locale=locale, status_code=400, reason="form")
    async with app.sessions.begin() as session:
        customer = await lifecycle.confirm_verification(session, app.settings, verification_id)
    if customer is None:
        return render_page(request, "verify.html", locale=locale, status_code=410, state="replaced")
    app.outbox_wakeup.set()
    locale = request_locale(request, customer.locale, app.settings.default_locale)
    return render_page(request, "verify.html", locale=locale, state="done", customer=customer)


routes = [
    Route("/pay/{token}", pay_page, methods=["GET", "HEAD"], name="pay_page"),
    Route("/pay/{token}/renew", request_fresh_link, methods=["POST"], name="pay_renew"),
    Route("/verify/{token}", verify_page, methods=["GET", "HEAD"], name="verify_page"),
    Route("/verify/{token}", confirm_verification, methods=["POST"], name="verify_confirm"),
]
