"""Every customer-facing route of a link: /pay/{token} (page, pay, new card, status, fresh link) and
/verify/{token}. Views are thin: they check the link and the form, call a service, pick a page.

The hot path (GET /pay/{token}): the token is verified in memory (a forged one never reaches the
database), then one read loads link, invoice, customer, live payment and saved cards; the open is
counted in memory and written in the background. Stripe is never called on GET: mail scanners
prefetch links, so GET changes nothing a customer would notice; only POST moves money.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from links import issuing, verification
from links.models import InvoiceStatus
from links.opens import OpenRecorder
from payments import checkout
from payments.gateway import GatewayError, GatewayUnavailable, StripeGateway
from payments.models import PaymentStatus
from payments.page_reader import PageReader, PayPage, Receipt, latest_payment_id, load_pay_page
from plumbing.settings import Settings
from plumbing.signing import TokenClaims, TokenExpired, TokenInvalid, pay_signer, verify_signer
from plumbing.web import csrf_token, csrf_valid, request_locale, small_form
from views.errors import BadForm, ExpiredLink, InvalidLink, VerificationGone
from views.render import render_page

log = logging.getLogger("paylink.pages")
SETUP_INTENT_ID = re.compile(r"seti_[A-Za-z0-9]{1,250}")


class PageServices(Protocol):
    """What these views use of the container (services.Services provides it)."""

    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    readers: async_sessionmaker[AsyncSession]
    gateway: StripeGateway
    pages: PageReader
    opens: OpenRecorder
    outbox_wakeup: asyncio.Event


def services_of(request: Request) -> PageServices:
    return request.state.services  # type: ignore[no-any-return]


# --- checks shared by every route -------------------------------------------------------------------


def verify_pay_token(request: Request, token: str) -> TokenClaims:
    """The link's claims; a bad or expired token raises before any database query."""
    settings = services_of(request).settings
    try:
        return pay_signer(settings).verify(token)
    except TokenExpired as expired:
        raise ExpiredLink(token=token, csrf=csrf_token(settings, expired.subject_id)) from None
    except TokenInvalid:
        raise InvalidLink() from None


async def checked_form(request: Request, subject_id: uuid.UUID) -> dict[str, str]:
    """The posted form, after its CSRF token (bound to this link) and its size are checked."""
    form = await small_form(request)
    if form is None or not csrf_valid(request, services_of(request).settings, subject_id, form.get("csrf")):
        raise BadForm()
    return form


async def _read_page(request: Request, link_id: uuid.UUID) -> tuple[PayPage, Receipt | None]:
    page, receipt = await services_of(request).pages.pay_page(link_id)
    if page is None:
        raise InvalidLink()
    return page, receipt


# --- GET /pay/{token} and the page's states ------------------------------------------------------


async def pay_page(request: Request) -> Response:
    token = request.path_params["token"]
    claims = verify_pay_token(request, token)
    page, receipt = await _read_page(request, claims.subject_id)
    if request.method == "GET":
        services_of(request).opens.record(page.link.id)
    return render_pay_state(request, token, page, receipt=receipt)


def render_pay_state(
    request: Request,
    token: str,
    page: PayPage,
    *,
    receipt: Receipt | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    settings = services_of(request).settings
    locale = request_locale(request, page.customer.locale, settings.default_locale)
    context: dict[str, Any] = {"token": token, "invoice": page.invoice, "customer": page.customer, "link": page.link}
    invoice = page.invoice
    if invoice.status == InvoiceStatus.VOID:  # before "revoked": voiding also revokes the links
        return render_page(request, "void.html", locale=locale, status_code=410, **context)
    if page.link.revoked_at is not None:
        return render_page(request, "revoked.html", locale=locale, status_code=410, **context)
    if invoice.status in InvoiceStatus.HAS_RECEIPT:
        brand, last4, paid_at = receipt or (None, None, None)
        return render_page(request, "paid.html", locale=locale, brand=brand, last4=last4, paid_at=paid_at or invoice.paid_at, **context)
    live = page.live_payment
    if invoice.status == InvoiceStatus.PROCESSING or (live is not None and live.status in PaymentStatus.IN_FLIGHT):
        return render_page(request, "processing.html", locale=locale, csrf=csrf_token(settings, page.link.id), **context)
    return render_page(
        request,
        "pay.html",
        locale=locale,
        status_code=status_code,
        cards=page.cards,
        csrf=csrf_token(settings, page.link.id),
        needs_action=live is not None and live.status == PaymentStatus.REQUIRES_ACTION,
        error=error,
        publishable_key=settings.stripe_publishable_key,
        stripe_js_url=settings.stripe_js_url,
        **context,
    )


async def _show(request: Request, token: str, link_id: uuid.UUID, *, error: str | None, status_code: int) -> Response:
    """The page again, with a message (a declined card, a refused request)."""
    page, _ = await _read_page(request, link_id)
    return render_pay_state(request, token, page, error=error, status_code=status_code)


async def _authenticate(request: Request, token: str, link_id: uuid.UUID, client_secret: str) -> Response:
    """The 3-D Secure page: Stripe.js finishes the bank's check, then the page posts to /status."""
    app = services_of(request)
    async with app.readers() as session:
        page = await load_pay_page(session, link_id)
    if page is None:
        raise InvalidLink()
    return render_page(
        request,
        "authenticate.html",
        locale=request_locale(request, page.customer.locale, app.settings.default_locale),
        token=token,
        invoice=page.invoice,
        customer=page.customer,
        client_secret=client_secret,
        publishable_key=app.settings.stripe_publishable_key,
        stripe_js_url=app.settings.stripe_js_url,
        csrf=csrf_token(app.settings, link_id),
    )


# --- POST /pay/{token}: pay -------------------------------------------------------------------------


async def pay(request: Request) -> Response:
    token = request.path_params["token"]
    claims = verify_pay_token(request, token)
    form = await checked_form(request, claims.subject_id)
    app = services_of(request)
    setup_intent = form.get("setup_intent", "")
    try:
        if setup_intent:
            if not SETUP_INTENT_ID.fullmatch(setup_intent):
                return await _show(request, token, claims.subject_id, error=checkout.NEW_CARD_NOT_CONFIRMED, status_code=400)
            outcome = await checkout.pay_with_new_card(
                app.sessions,
                app.gateway,
                app.settings,
                link_id=claims.subject_id,
                setup_intent_id=setup_intent,
                save=form.get("save_card") == "1",
            )
        else:
            outcome = await checkout.pay_with_saved_profile(
                app.sessions, app.gateway, app.settings, link_id=claims.subject_id, payment_method_id=form.get("payment_method", "")
            )
    except checkout.PaymentRefused as exc:
        return await _show(request, token, claims.subject_id, error=str(exc), status_code=409)
    except GatewayUnavailable:
        return await _show(request, token, claims.subject_id, error=checkout.GATEWAY_DOWN, status_code=503)
    except GatewayError:
        return await _show(request, token, claims.subject_id, error=checkout.NEW_CARD_NOT_CONFIRMED, status_code=400)
    app.outbox_wakeup.set()
    log.info("payment.attempt payment=%s status=%s", outcome.payment_id, outcome.status)
    if outcome.status == PaymentStatus.REQUIRES_ACTION and outcome.client_secret:
        return await _authenticate(request, token, claims.subject_id, outcome.client_secret)
    if outcome.status == PaymentStatus.FAILED:
        return await _show(request, token, claims.subject_id, error=outcome.error_message or checkout.NOT_COMPLETED, status_code=402)
    return RedirectResponse(f"/pay/{token}", status_code=303)


async def start_new_card(request: Request) -> Response:
    """POST /pay/{token}/setup: a SetupIntent client secret for Stripe's card element (JSON)."""
    request.scope["paylink.json"] = "invalid_request"  # errors raised below answer in JSON
    claims = verify_pay_token(request, request.path_params["token"])
    await checked_form(request, claims.subject_id)
    app = services_of(request)
    try:
        client_secret = await checkout.start_new_card(app.sessions, app.gateway, link_id=claims.subject_id)
    except checkout.PaymentRefused as exc:
        return JSONResponse({"error": str(exc)}, status_code=409)
    except GatewayError:
        return JSONResponse({"error": checkout.GATEWAY_DOWN}, status_code=503)
    return JSONResponse({"client_secret": client_secret})


async def refresh_status(request: Request) -> Response:
    """POST /pay/{token}/status: ask Stripe about the invoice's latest payment (after 3-D Secure,
    or while it is processing) and show where it stands."""
    token = request.path_params["token"]
    claims = verify_pay_token(request, token)
    await checked_form(request, claims.subject_id)
    app = services_of(request)
    async with app.readers() as session:
        payment_id = await latest_payment_id(session, claims.subject_id)
    if payment_id is not None:
        outcome = await checkout.settle_payment(app.sessions, app.gateway, app.settings, payment_id, actor="link")
        app.outbox_wakeup.set()
        if outcome.status == PaymentStatus.REQUIRES_ACTION and outcome.client_secret:
            return await _authenticate(request, token, claims.subject_id, outcome.client_secret)
        if outcome.status == PaymentStatus.FAILED:
            return await _show(request, token, claims.subject_id, error=outcome.error_message, status_code=402)
    return RedirectResponse(f"/pay/{token}", status_code=303)


async def status_json(request: Request) -> Response:
    """GET /pay/{token}/status: where the invoice stands, from our database (the processing page polls)."""
    request.scope["paylink.json"] = "invalid_link"
    claims = verify_pay_token(request, request.path_params["token"])
    page, _ = await _read_page(request, claims.subject_id)  # the same cheap read as the page
    live = page.live_payment
    return JSONResponse({"invoice_status": page.invoice.status, "payment_status": live.status if live else None})


async def request_fresh_link(request: Request) -> Response:
    """POST /pay/{token}/renew from the expired page: a fresh link goes to the address on file.

    The answer is the same whether or not an email went out (rate limit, paid, unknown)."""
    app = services_of(request)
    token = request.path_params["token"]
    try:
        link_id = pay_signer(app.settings).verify(token).subject_id
    except TokenExpired as expired:
        link_id = expired.subject_id
    except TokenInvalid:
        raise InvalidLink() from None
    await checked_form(request, link_id)
    async with app.sessions.begin() as session:
        await issuing.request_fresh_link(session, app.settings, link_id)
    app.outbox_wakeup.set()
    return render_page(request, "renewed.html", token=token)


# --- /verify/{token} ------------------------------------------------------------------------------------


def _verification_id(request: Request) -> uuid.UUID:
    try:
        return verify_signer(services_of(request).settings).verify(request.path_params["token"]).subject_id
    except TokenExpired:
        raise VerificationGone("expired") from None
    except TokenInvalid:
        raise InvalidLink() from None


async def verify_page(request: Request) -> Response:
    """GET /verify/{token}: a button to confirm (GET changes nothing: mail scanners prefetch links)."""
    verification_id = _verification_id(request)
    app = services_of(request)
    async with app.readers() as session:
        customer = await verification.find_verification(session, verification_id)
    if customer is None:
        raise VerificationGone("replaced")
    locale = request_locale(request, customer.locale, app.settings.default_locale)
    state = "done" if customer.email_verified_at else "confirm"
    return render_page(
        request, "verify.html", locale=locale, state=state, customer=customer, csrf=csrf_token(app.settings, verification_id)
    )


async def confirm_verification(request: Request) -> Response:
    """POST /verify/{token}: the address is confirmed; invoices held for it are sent."""
    verification_id = _verification_id(request)
    await checked_form(request, verification_id)
    app = services_of(request)
    async with app.sessions.begin() as session:
        customer = await verification.confirm_verification(session, app.settings, verification_id)
    if customer is None:
        raise VerificationGone("replaced")
    app.outbox_wakeup.set()
    locale = request_locale(request, customer.locale, app.settings.default_locale)
    return render_page(request, "verify.html", locale=locale, state="done", customer=customer)


routes = [
    Route("/pay/{token}", pay_page, methods=["GET", "HEAD"], name="pay_page"),
    Route("/pay/{token}", pay, methods=["POST"], name="pay"),
    Route("/pay/{token}/setup", start_new_card, methods=["POST"], name="pay_new_card"),
    Route("/pay/{token}/status", refresh_status, methods=["POST"], name="pay_status_refresh"),
    Route("/pay/{token}/status", status_json, methods=["GET"], name="pay_status"),
    Route("/pay/{token}/renew", request_fresh_link, methods=["POST"], name="pay_renew"),
    Route("/verify/{token}", verify_page, methods=["GET", "HEAD"], name="verify_page"),
    Route("/verify/{token}", confirm_verification, methods=["POST"], name="verify_confirm"),
]
