"""POST /webhooks/stripe: Stripe's events are the truth about money.

The raw body is verified (Stripe-Signature) before anything is parsed; the event id is stored first,
in the transaction that applies it, so a duplicate does nothing (see payments/events.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from payments.events import EventRefused, EventWriter
from payments.gateway import InvalidSignature, StripeGateway
from plumbing.metrics import WEBHOOK_EVENTS, WEBHOOK_LAG

log = logging.getLogger("paylink.payments")
MAX_WEBHOOK_BYTES = 512 * 1024


class WebhookServices(Protocol):
    """What the endpoint uses of the container (services.Services provides it)."""

    gateway: StripeGateway
    events: EventWriter
    outbox_wakeup: asyncio.Event


async def stripe_webhook(request: Request) -> Response:
    app: WebhookServices = request.state.services
    if int(request.headers.get("content-length") or 0) > MAX_WEBHOOK_BYTES:
        return PlainTextResponse("payload too large", status_code=413)
    payload = await request.body()
    try:
        event = app.gateway.parse_webhook(payload, request.headers.get("stripe-signature"))
    except InvalidSignature as exc:
        log.warning("webhook.rejected reason=%s", exc)
        WEBHOOK_EVENTS.labels("invalid_signature").inc()
        return PlainTextResponse("invalid signature", status_code=400)
    try:
        is_new = await app.events.apply(event)
    except EventRefused as refused:
        # Stored and reported to finance: a redelivery is a duplicate. 400 says "never send it again".
        WEBHOOK_EVENTS.labels("refused").inc()
        return PlainTextResponse(f"event refused: {refused}", status_code=400)
    except Exception:
        # Rolled back, event id included: answer 5xx so that Stripe delivers it again.
        log.warning("webhook.not_applied event=%s type=%s", event.get("id"), event.get("type"))
        WEBHOOK_EVENTS.labels("failed").inc()
        return PlainTextResponse("could not apply event", status_code=500)
    app.outbox_wakeup.set()
    WEBHOOK_EVENTS.labels("applied" if is_new else "duplicate").inc()
    created = event.get("created")
    if is_new and isinstance(created, int | float) and not isinstance(created, bool):
        WEBHOOK_LAG.observe(max(time.time() - created, 0.0))
    log.info("webhook.received event=%s type=%s new=%s", event["id"], event.get("type"), is_new)
    return JSONResponse({"received": True, "duplicate": not is_new})


routes = [Route("/webhooks/stripe", stripe_webhook, methods=["POST"], name="stripe_webhook")]
