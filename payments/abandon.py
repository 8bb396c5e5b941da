"""Giving up on the bank's confirmation (3-D Secure) to pay with another card.

While an attempt waits for 3-D Secure it holds the invoice's one live slot, so the page can only offer
to continue it. When the customer would rather pay with another card, the attempt's PaymentIntent is
canceled at Stripe first and the state machine applies Stripe's answer, which releases the slot: an
intent that cannot be canceled any more (the customer finished the check in another tab, and it
succeeded or is processing) is recorded as it is instead, so no payment is ever lost or made twice.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from links.models import PaymentLink
from payments.checkout import live_payment
from payments.gateway import GatewayError, StripeGateway
from payments.models import PaymentStatus
from payments.state import apply_intent
from plumbing.settings import Settings

log = logging.getLogger("paylink.payments")


@dataclass(frozen=True)
class Abandoned:
    payment_id: uuid.UUID
    status: str  # the attempt's status afterwards: canceled, or what Stripe says it became


async def abandon_authentication(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, settings: Settings, *, link_id: uuid.UUID
) -> Abandoned | None:
    """Cancel the link's invoice's live attempt if it waits for 3-D Secure, and release its slot.

    Returns the attempt and its status afterwards, or None when no attempt waits for the bank (there
    is nothing to give up). Raises GatewayError when Stripe cannot be asked (nothing changed)."""
    async with sessions() as session:
        invoice_id = await session.scalar(select(PaymentLink.invoice_id).where(PaymentLink.id == link_id))
        # The attempt holding the invoice's slot: its own, or a pay-all attempt that includes it.
        live = await live_payment(session, invoice_id) if invoice_id is not None else None
    if live is None or live.status != PaymentStatus.REQUIRES_ACTION or live.stripe_payment_intent_id is None:
        return None
    try:
        snapshot = await gateway.cancel_payment_intent(live.stripe_payment_intent_id)
    except GatewayError:
        # Not cancelable any more (or Stripe did not answer): record what it is now, if Stripe says.
        snapshot = await gateway.retrieve_payment_intent(live.stripe_payment_intent_id)
    async with sessions.begin() as session:
        applied = await session.run_sync(apply_intent, settings, snapshot, actor="link")
        status = applied.status if applied is not None else live.status
    log.info("payment.abandoned_authentication payment=%s intent=%s status=%s", live.id, snapshot.id, status)
    return Abandoned(live.id, status)
