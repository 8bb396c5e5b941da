"""Saved cards: kept in step with Stripe by webhooks and by a sync when a link is issued."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from links.models import Customer
from payments.gateway import CardSummary, GatewayError, StripeGateway, card_summary
from payments.models import Payment, PaymentProfile, PaymentStatus

log = logging.getLogger("paylink.payments")


def upsert_profile(
    session: Session, customer_id: uuid.UUID, card: CardSummary, *, is_default: bool | None = None, reusable: bool | None = None
) -> PaymentProfile:
    profile = (
        session.execute(select(PaymentProfile).where(PaymentProfile.stripe_payment_method_id == card.payment_method_id))
    ).scalar_one_or_none()
    if profile is None:
        profile = PaymentProfile(
            customer_id=customer_id, stripe_payment_method_id=card.payment_method_id, brand=card.brand, last4=card.last4
        )
        session.add(profile)
    profile.customer_id = customer_id
    profile.brand, profile.last4 = card.brand, card.last4
    profile.exp_month, profile.exp_year = card.exp_month, card.exp_year
    if reusable is not None:
        profile.reusable = reusable
    if is_default is not None:
        _set_default(session, customer_id, card.payment_method_id if is_default else None)
        profile.is_default = is_default
    session.flush()
    return profile


def _set_default(session: Session, customer_id: uuid.UUID, payment_method_id: str | None) -> None:
    session.execute(
        update(PaymentProfile)
        .where(PaymentProfile.customer_id == customer_id)
        .values(is_default=PaymentProfile.stripe_payment_method_id == payment_method_id if payment_method_id else False)
    )


async def sync_profiles(sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, customer_id: uuid.UUID) -> list[PaymentProfile]:
    """Replace a customer's saved profiles with what Stripe holds (called when a link is issued).

    Stripe is asked before the write transaction opens, so no lock is held across the network."""
    async with sessions() as session:
        customer = await session.get_one(Customer, customer_id)
    if not customer.stripe_customer_id:
        return []
    cards = await gateway.list_cards(customer.stripe_customer_id)
    default = await gateway.default_payment_method(customer.stripe_customer_id)
    if default is None and cards:
        default = cards[0].payment_method_id
    async with sessions.begin() as session:
        await session.execute(
            delete(PaymentProfile).where(
                PaymentProfile.customer_id == customer_id,
                PaymentProfile.stripe_payment_method_id.not_in([c.payment_method_id for c in cards]),
            )
        )
        profiles = await session.run_sync(
            lambda sync: [upsert_profile(sync, customer_id, card, is_default=card.payment_method_id == default) for card in cards]
        )
    return profiles


async def forget_one_time_card(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, payment_id: uuid.UUID, status: str
) -> None:
    """Once a payment made with an unsaved card is over, detach the card at Stripe and drop its profile."""
    if status not in PaymentStatus.FINAL:
        return
    async with sessions() as session:
        payment = await session.get_one(Payment, payment_id)
        profile = (
            await session.execute(select(PaymentProfile).where(PaymentProfile.stripe_payment_method_id == payment.stripe_payment_method_id))
        ).scalar_one_or_none()
    if profile is None or profile.reusable:
        return
    try:
        await gateway.detach_card(profile.stripe_payment_method_id)
    except GatewayError as exc:  # sync_profiles or the payment_method.detached webhook will catch up
        log.warning("card.detach_failed payment_method=%s error=%s", profile.stripe_payment_method_id, exc)
        return
    async with sessions.begin() as session:
        await session.execute(delete(PaymentProfile).where(PaymentProfile.id == profile.id, PaymentProfile.reusable.is_(False)))


def apply_card_event(session: Session, pm: dict[str, Any]) -> None:
    customer_stripe_id = pm.get("customer")
    if not customer_stripe_id or pm.get("type", "card") != "card":
        return
    customer = (session.execute(select(Customer).where(Customer.stripe_customer_id == customer_stripe_id))).scalar_one_or_none()
    if customer is not None:
        upsert_profile(session, customer.id, card_summary(pm))


def apply_customer_event(session: Session, obj: dict[str, Any]) -> None:
    customer = (session.execute(select(Customer).where(Customer.stripe_customer_id == obj.get("id")))).scalar_one_or_none()
    if customer is None:
        return
    default = (obj.get("invoice_settings") or {}).get("default_payment_method")
    if isinstance(default, dict):
        default = default.get("id")
    _set_default(session, customer.id, default)
