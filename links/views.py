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

from links import service
from links.models import InvoiceStatus
from links.tokens import TokenClaims, TokenExpired, TokenInvalid
from payments.models import PaymentStatus
from web import csrf_token, paylink, render_page, request_locale

IN_FLIGHT = (PaymentStatus.CREATED, PaymentStatus.REQUIRES_CONFIRMATION, PaymentStatus.PROCESSING, PaymentStatus.PENDING)


def verify_pay_token(request: Request, token: str) -> TokenClaims | Response:
    """The link's claims, or the page to show instead (never a database query for a bad token)."""
    app = paylink(request)
    locale = request_locale(request, None, app.settings.default_locale)
    try:
        return service.pay_signer(app.settings).verify(token)
    except TokenExpired:
        return render_page(request, "expired.html", locale=locale, status_code=410, token=token)
    except TokenInvalid:
        return render_page(request, "invalid_link.html", locale=locale, status_code=404)


async def pay_page(request: Request) -> Response:
    token = request.path_params["token"]
    claims = verify_pay_token(request, token)
    if isinstance(claims, Response):
        return claims
    app = paylink(request)
    async with app.readers() as session:
        page = await service.load_pay_page(session, claims.subject_id)
        receipt = None
        if page is not None and page.invoice.status in (InvoiceStatus.PAID, InvoiceStatus.REFUNDED, InvoiceStatus.PARTIALLY_REFUNDED):
            receipt = await service.last_successful_payment(session, page.invoice.id)
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
    if page.link.revoked_at is not None:
        return render_page(request, "revoked.html", locale=locale, status_code=410, **context)
    invoice = page.invoice
    if invoice.status == InvoiceStatus.VOID:
        return render_page(request, "void.html", locale=locale, status_code=410, **context)
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
        **context,
    )


routes = [Route("/pay/{token}", pay_page, methods=["GET", "HEAD"], name="pay_page")]
