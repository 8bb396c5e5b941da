"""POST /pay/{token} (pay), /pay/{token}/status, and POST /webhooks/stripe."""

from __future__ import annotations

import logging
import re
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from links import service as links
from links.tokens import TokenClaims
from links.views import render_pay_state, verify_pay_token
from payments import service
from payments.gateway import GatewayError, GatewayUnavailable, InvalidSignature
from payments.models import Payment, PaymentStatus
from web import csrf_token, csrf_valid, paylink, render_page, request_locale, small_form

log = logging.getLogger("paylink.payments")
MAX_WEBHOOK_BYTES = 512 * 1024
SETUP_INTENT_ID = re.compile(r"seti_[A-Za-z0-9]{1,250}")


async def _checked(request: Request) -> tuple[str, TokenClaims, dict[str, str]] | Response:
    token = request.path_params["token"]
    claims = verify_pay_token(request, token)
    if isinstance(claims, Response):
        return claims
    app = paylink(request)
    form = await small_form(request)
    if form is None or not csrf_valid(request, app.settings, claims.subject_id, form.get("csrf")):
        locale = request_locale(request, None, app.settings.default_locale)
        return render_page(request, "error.html", locale=locale, status_code=400, reason="form")
    return token, claims, form


async def pay(request: Request) -> Response:
    checked = await _checked(request)
    if isinstance(checked, Response):
        return checked
    token, claims, form = checked
    app = paylink(request)
    setup_intent = form.get("setup_intent", "")
    try:
        if setup_intent:
            if not SETUP_INTENT_ID.fullmatch(setup_intent):
                return await _show(request, token, claims, error=service.NEW_CARD_NOT_CONFIRMED, status_code=400)
            outcome = await service.pay_with_new_card(
                app.sessions,
                app.gateway,
                app.settings,
                link_id=claims.subject_id,
                setup_intent_id=setup_intent,
                save=form.get("save_card") == "1",
            )
        else:
            outcome = await service.pay_with_saved_profile(
                app.sessions, app.gateway, app.settings, link_id=claims.subject_id, payment_method_id=form.get("payment_method", "")
            )
    except service.PaymentRefused as exc:
        return await _show(request, token, claims, error=str(exc), status_code=409)
    except GatewayUnavailable:
        return await _show(request, token, claims, error=service.GATEWAY_DOWN, status_code=503)
    except GatewayError:
        return await _show(request, token, claims, error=service.NEW_CARD_NOT_CONFIRMED, status_code=400)
    app.outbox_wakeup.set()
    log.info("payment.attempt payment=%s status=%s", outcome.payment_id, outcome.status)
    if outcome.status == PaymentStatus.REQUIRES_ACTION and outcome.client_secret:
        return await _authenticate(request, token, claims, outcome.client_secret)
    if outcome.status == PaymentStatus.FAILED:
        return await _show(request, token, claims, error=outcome.error_message or service.NOT_COMPLETED, status_code=402)
    return RedirectResponse(f"/pay/{token}", status_code=303)


async def start_new_card(request: Request) -> Response:
    """POST /pay/{token}/setup: a SetupIntent client secret for Stripe's card element (JSON)."""
    checked = await _checked(request)
    if isinstance(checked, Response):
        return JSONResponse({"error": "invalid_request"}, status_code=checked.status_code)
    _, claims, _ = checked
    app = paylink(request)
    try:
        client_secret = await service.start_new_card(app.sessions, app.gateway, link_id=claims.subject_id)
    except service.PaymentRefused as exc:
        return JSONResponse({"error": str(exc)}, status_code=409)
    except GatewayError:
        return JSONResponse({"error": service.GATEWAY_DOWN}, status_code=503)
    return JSONResponse({"client_secret": client_secret})


async def _authenticate(request: Request, token: str, claims: TokenClaims, client_secret: str) -> Response:
    app = paylink(request)
    async with app.readers() as session:
        page = await links.load_pay_page(session, claims.subject_id)
    assert page is not None
    locale = request_locale(request, page.customer.locale, app.settings.default_locale)
    return render_page(
        request,
        "authenticate.html",
        locale=locale,
        token=token,
        invoice=page.invoice,
        customer=page.customer,
        client_secret=client_secret,
        publishable_key=app.settings.stripe_publishable_key,
        stripe_js_url=app.settings.stripe_js_url,
        csrf=csrf_token(app.settings, claims.subject_id),
        status_code=200,
    )


async def _show(request: Request, token: str, claims: TokenClaims, *, error: str | None, status_code: int) -> Response:
    app = paylink(request)
    async with app.readers() as session:
        page = await links.load_pay_page(session, claims.subject_id)
    if page is None:
        locale = request_locale(request, None, app.settings.default_locale)
        return render_page(request, "invalid_link.html", locale=locale, status_code=404)
    return render_pay_state(request, token, page, error=error, status_code=status_code)


async def refresh_status(request: Request) -> Response:
    """Ask Stripe about the invoice's live payment (after 3-D Secure, or while it is processing)."""
    checked = await _checked(request)
    if isinstance(checked, Response):
        return checked
    token, claims, _ = checked
    app = paylink(request)
    payment_id = await _latest_payment_id(request, claims.subject_id)
    if payment_id is not None:
        outcome = await service.settle_payment(app.sessions, app.gateway, app.settings, payment_id, actor="link")
        app.outbox_wakeup.set()
        if outcome.status == PaymentStatus.REQUIRES_ACTION and outcome.client_secret:
            return await _authenticate(request, token, claims, outcome.client_secret)
        if outcome.status == PaymentStatus.FAILED:
            return await _show(request, token, claims, error=outcome.error_message, status_code=402)
    return RedirectResponse(f"/pay/{token}", status_code=303)


async def _latest_payment_id(request: Request, link_id: uuid.UUID) -> uuid.UUID | None:
    from sqlalchemy import select

    from links.models import PaymentLink

    async with paylink(request).readers() as session:
        invoice_id = (await session.execute(select(PaymentLink.invoice_id).where(PaymentLink.id == link_id))).scalar_one_or_none()
        if invoice_id is None:
            return None
        result = await session.execute(
            select(Payment.id).where(Payment.invoice_id == invoice_id).order_by(Payment.created_at.desc()).limit(1)
        )
        return result.scalar_one_or_none()


async def status_json(request: Request) -> Response:
    """Where the invoice stands, from our database (for the processing page to poll)."""
    claims = verify_pay_token(request, request.path_params["token"])
    if isinstance(claims, Response):
        return JSONResponse({"error": "invalid_link"}, status_code=claims.status_code)
    page, _ = await paylink(request).pages.pay_page(claims.subject_id)  # the same cheap read as the page
    if page is None:
        return JSONResponse({"error": "invalid_link"}, status_code=404)
    live = page.live_payment
    return JSONResponse({"invoice_status": page.invoice.status, "payment_status": live.status if live else None})


async def stripe_webhook(request: Request) -> Response:
    app = paylink(request)
    if int(request.headers.get("content-length") or 0) > MAX_WEBHOOK_BYTES:
        return PlainTextResponse("payload too large", status_code=413)
    payload = await request.body()
    try:
        event = app.gateway.parse_webhook(payload, request.headers.get("stripe-signature"))
    except InvalidSignature as exc:
        log.warning("webhook.rejected reason=%s", exc)
        return PlainTextResponse("invalid signature", status_code=400)
    try:
        is_new = await app.webhooks.apply(event)
    except Exception:
        # Rolled back, event id included: answer 5xx so that Stripe delivers it again.
        log.warning("webhook.not_applied event=%s type=%s", event.get("id"), event.get("type"))
        return PlainTextResponse("could not apply event", status_code=500)
    app.outbox_wakeup.set()
    log.info("webhook.received event=%s type=%s new=%s", event["id"], event.get("type"), is_new)
    return JSONResponse({"received": True, "duplicate": not is_new})


routes = [
    Route("/pay/{token}", pay, methods=["POST"], name="pay"),
    Route("/pay/{token}/setup", start_new_card, methods=["POST"], name="pay_new_card"),
    Route("/pay/{token}/status", refresh_status, methods=["POST"], name="pay_status_refresh"),
    Route("/pay/{token}/status", status_json, methods=["GET"], name="pay_status"),
    Route("/webhooks/stripe", stripe_webhook, methods=["POST"], name="stripe_webhook"),
]
