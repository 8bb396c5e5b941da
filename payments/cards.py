"""Saved cards, kept in step with Stripe by webhooks, by a sync when a link is issued, and by what the
customer (pay page) and finance (CLI) do with them.

One card, one profile. Stripe gives every card number a fingerprint, the same each time it is entered;
a card entered again (a new payment method with the fingerprint of a saved one) takes the saved
profile's place, keeping its "saved" and "default" marks, and the older payment method is detached at
Stripe, best effort (`forget_replaced_cards`, after the payment, and `sync_profiles`). A newly entered
card never takes the default from another card: only the customer (pay page) or Stripe's own default
(a sync, the customer.updated webhook) sets it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from links.errors import LinkError
from links.models import Customer
from payments.gateway import CardSummary, GatewayError, GatewayUnavailable, StripeGateway, card_summary
from payments.models import Payment, PaymentProfile, PaymentStatus
from plumbing import audit
from plumbing.db import utcnow

log = logging.getLogger("paylink.payments")


class UnknownCard(LinkError):
    """The payment method is not a saved card of this customer."""


class CardInUse(LinkError):
    """A payment in progress uses the card: it cannot be removed until that payment is over."""


def upsert_profile(
    session: Session,
    customer_id: uuid.UUID,
    card: CardSummary,
    *,
    is_default: bool | None = None,
    reusable: bool | None = None,
    merge: bool = True,
    decided_at: datetime | None = None,
) -> PaymentProfile:
    """Create or update the profile of `card`. With `merge` (every caller but the webhooks: see
    `apply_card_event`), a saved profile of the same customer with the same fingerprint is replaced by
    this one, which inherits its "saved" and "default" marks; the replaced one is left unsaved and not
    default, for `forget_replaced_cards` to detach at Stripe once no payment uses it. `decided_at`: when a
    default it sets was decided (now if not given)."""
    _lock_customer(session, customer_id)  # before any profile: see _set_default
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
    if card.fingerprint:
        profile.fingerprint = card.fingerprint
    if reusable is not None:
        profile.reusable = reusable
    session.flush()
    replaced = _replace_same_card(session, profile) if merge and card.fingerprint else []
    if replaced:
        profile.reusable = True  # the card was saved before: entering it again does not unsave it
        if is_default is None and any(r.is_default for r in replaced):
            is_default = True
        for old in replaced:
            old.reusable, old.is_default = False, False
    if is_default:
        _set_default(session, customer_id, card.payment_method_id, decided_at or _decided_now())  # and no other card
    if is_default is not None:
        profile.is_default = is_default
    session.flush()
    return profile


def _replace_same_card(session: Session, profile: PaymentProfile) -> list[PaymentProfile]:
    """The customer's other saved profiles of the same card (fingerprint) as `profile`."""
    query = select(PaymentProfile).where(
        PaymentProfile.customer_id == profile.customer_id,
        PaymentProfile.fingerprint == profile.fingerprint,
        PaymentProfile.id != profile.id,
        PaymentProfile.reusable.is_(True),
    )
    replaced = list(session.execute(query).scalars())
    for old in replaced:
        log.info(
            "card.replaced customer=%s old=%s new=%s", profile.customer_id, old.stripe_payment_method_id, profile.stripe_payment_method_id
        )
    return replaced


def _set_default(session: Session, customer_id: uuid.UUID, payment_method_id: str | None, at: datetime | None) -> None:
    """Mark `payment_method_id` the customer's default card (None: no card is), decided `at` (a whole
    second; None: leave the time of the last decision as it is). The customer's row first, then the
    profiles: the order every writer of both takes (two writers in opposite orders deadlock)."""
    if at is not None:
        session.execute(update(Customer).where(Customer.id == customer_id).values(default_card_at=at))
    session.execute(
        update(PaymentProfile)
        .where(PaymentProfile.customer_id == customer_id)
        .values(is_default=PaymentProfile.stripe_payment_method_id == payment_method_id if payment_method_id else False)
    )


def _second(moment: datetime) -> datetime:
    """Stripe dates events to the second: a time as the start of its second (what a read of Stripe at
    `moment` may be compared with: an event of that second may be newer than the read)."""
    return moment.replace(microsecond=0)


def _decided_now() -> datetime:
    """A decision made here now, as a whole second rounded up: an event Stripe dated to this second or
    before is taken as older than the decision (our own change's echo among them; it says the same)."""
    now = utcnow()
    return now.replace(microsecond=0) + timedelta(seconds=1) if now.microsecond else now


def _lock_customer(session: Session, customer_id: uuid.UUID) -> None:
    session.execute(select(Customer.id).where(Customer.id == customer_id).with_for_update())


async def sync_profiles(sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, customer_id: uuid.UUID) -> list[PaymentProfile]:
    """Replace a customer's saved profiles with what Stripe holds (called when a link is issued),
    one profile per card: a card attached twice or more (same fingerprint) keeps one payment method,
    the others are detached at Stripe, best effort.

    Stripe is asked before the write transaction opens, so no lock is held across the network."""
    async with sessions() as session:
        customer = await session.get_one(Customer, customer_id)
        profiles = list((await session.execute(_profiles_of(customer_id))).scalars())
        known = {p.stripe_payment_method_id: p.reusable for p in profiles}
        our_default = next((p.stripe_payment_method_id for p in profiles if p.is_default), None)
        live = await _live_payment_methods(session)
    if not customer.stripe_customer_id:
        return []
    read_at = utcnow()  # what Stripe says below is at least this fresh
    cards = await gateway.list_cards(customer.stripe_customer_id)
    default = await gateway.default_payment_method(customer.stripe_customer_id)
    one_time = {pm for pm, reusable in known.items() if not reusable}
    duplicates = _duplicates(cards, default, known, one_time | live)
    for pm in duplicates:
        await _detach_quietly(gateway, pm)
    cards = [c for c in cards if c.payment_method_id not in duplicates]
    listed = {c.payment_method_id for c in cards}
    if default not in listed:  # none at Stripe (cards saved here), or one just detached: ours, else the first
        default = our_default if our_default in listed else None
    if default is None and cards:
        default = next((c.payment_method_id for c in cards if c.payment_method_id not in one_time), None)
    async with sessions.begin() as session:
        decided = (await session.execute(select(Customer.default_card_at).where(Customer.id == customer_id).with_for_update())).scalar()
        if decided is not None and decided >= _second(read_at):
            # The default was decided after Stripe was read (the customer on the page, a customer.updated
            # event): that decision stands; the cards themselves are synced.
            current = (await session.execute(_profiles_of(customer_id))).scalars()
            chosen = next((p.stripe_payment_method_id for p in current if p.is_default), None)
            if chosen in listed:  # (a card detached since keeps Stripe's choice above)
                default = chosen
        decided_at = max(decided, _second(read_at)) if decided is not None else _second(read_at)  # never back in time
        await session.execute(
            delete(PaymentProfile).where(
                PaymentProfile.customer_id == customer_id,
                PaymentProfile.stripe_payment_method_id.not_in([c.payment_method_id for c in cards]),
            )
        )
        profiles = await session.run_sync(
            lambda sync: [
                upsert_profile(sync, customer_id, card, is_default=card.payment_method_id == default, decided_at=decided_at)
                for card in cards
            ]
        )
    await forget_replaced_cards(sessions, gateway, customer_id)
    return profiles


def _duplicates(cards: Sequence[CardSummary], default: str | None, known: Collection[str], untouchable: Collection[str]) -> set[str]:
    """Payment methods that repeat a card (same fingerprint) kept once: the default, else one we
    already know, else the one that expires last. One-time cards and cards in a live payment stay."""
    groups: dict[str, list[CardSummary]] = {}
    for card in cards:
        if card.fingerprint and card.payment_method_id not in untouchable:
            groups.setdefault(card.fingerprint, []).append(card)
    duplicates: set[str] = set()
    for group in groups.values():
        keep = max(
            group,
            key=lambda c: (c.payment_method_id == default, c.payment_method_id in known, c.exp_year or 0, c.exp_month or 0),
        )
        duplicates.update(c.payment_method_id for c in group if c is not keep)
    return duplicates


def _profiles_of(customer_id: uuid.UUID) -> Any:
    return select(PaymentProfile).where(PaymentProfile.customer_id == customer_id)


async def _live_payment_methods(session: AsyncSession) -> set[str]:
    query = select(Payment.stripe_payment_method_id).where(
        Payment.live_invoice_id.is_not(None), Payment.stripe_payment_method_id.is_not(None)
    )
    return {pm for pm in (await session.execute(query)).scalars() if pm}


async def _detach_quietly(gateway: StripeGateway, payment_method_id: str) -> bool:
    try:
        await gateway.detach_card(payment_method_id)
    except GatewayError as exc:  # the next sync or the payment_method.detached webhook will catch up
        log.warning("card.detach_failed payment_method=%s error=%s", payment_method_id, exc)
        return False
    return True


async def forget_one_time_card(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, payment_id: uuid.UUID, status: str
) -> None:
    """Once a payment made with an unsaved card is over, detach the card at Stripe and drop its profile;
    then detach the cards that a card entered again replaced (`forget_replaced_cards`)."""
    if status not in PaymentStatus.FINAL:
        return
    async with sessions() as session:
        payment = await session.get_one(Payment, payment_id)
        profile = (
            await session.execute(select(PaymentProfile).where(PaymentProfile.stripe_payment_method_id == payment.stripe_payment_method_id))
        ).scalar_one_or_none()
    if profile is None:
        return
    if not profile.reusable:
        if not await _detach_quietly(gateway, profile.stripe_payment_method_id):
            return
        async with sessions.begin() as session:
            await session.execute(delete(PaymentProfile).where(PaymentProfile.id == profile.id, PaymentProfile.reusable.is_(False)))
    await forget_replaced_cards(sessions, gateway, profile.customer_id)


async def forget_replaced_cards(sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, customer_id: uuid.UUID) -> int:
    """Detach at Stripe, and drop, the customer's unsaved profiles that repeat a saved card (replaced
    by the same card entered again) and that no live payment uses. Returns how many went."""
    async with sessions() as session:
        customer = await session.get_one(Customer, customer_id)
        profiles = list((await session.execute(_profiles_of(customer_id))).scalars())
        live = await _live_payment_methods(session)
    saved = {p.fingerprint: p for p in profiles if p.reusable and p.fingerprint}
    replaced = [p for p in profiles if not p.reusable and p.fingerprint in saved and p.stripe_payment_method_id not in live]
    gone = 0
    for fingerprint in {p.fingerprint for p in replaced}:
        keeper = saved[fingerprint]
        if keeper.is_default and customer.stripe_customer_id:  # the default moves to the card that replaced it, at Stripe too
            try:
                await gateway.set_default_payment_method(customer.stripe_customer_id, keeper.stripe_payment_method_id)
            except GatewayError as exc:
                log.warning("card.default_failed payment_method=%s error=%s", keeper.stripe_payment_method_id, exc)
    for profile in replaced:
        if await _detach_quietly(gateway, profile.stripe_payment_method_id):
            async with sessions.begin() as session:
                await session.execute(delete(PaymentProfile).where(PaymentProfile.id == profile.id, PaymentProfile.reusable.is_(False)))
            gone += 1
    return gone


# --- what the customer (pay page) and finance (CLI) do with saved cards ------------------------------


@dataclass(frozen=True)
class CardChange:
    payment_method_id: str
    brand: str
    last4: str


async def _saved_card(session: AsyncSession, customer_id: uuid.UUID, payment_method_id: str) -> PaymentProfile:
    profile = (
        await session.execute(
            select(PaymentProfile).where(
                PaymentProfile.customer_id == customer_id,
                PaymentProfile.stripe_payment_method_id == payment_method_id,
                PaymentProfile.reusable.is_(True),
            )
        )
    ).scalar_one_or_none()
    if profile is None:
        raise UnknownCard(f"{payment_method_id or 'that card'} is not a saved card of this customer")
    return profile


async def remove_card(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, customer_id: uuid.UUID, payment_method_id: str, *, actor: str
) -> CardChange:
    """Remove a saved card: detached at Stripe first (so it can never be charged again), then its
    profile dropped; audited. Refused for a card that is not the customer's saved card (UnknownCard)
    or that a payment in progress uses (CardInUse); GatewayUnavailable leaves everything as it was."""
    async with sessions() as session:
        customer = await session.get_one(Customer, customer_id)
        profile = await _saved_card(session, customer_id, payment_method_id)
        if payment_method_id in await _live_payment_methods(session):
            raise CardInUse("a payment in progress uses this card; remove it once that payment is over")
    try:
        await gateway.detach_card(payment_method_id)
    except GatewayUnavailable:
        raise
    except GatewayError:
        # Already detached (another tab, the dashboard)? Then only our profile is left to drop.
        card = await gateway.retrieve_card(payment_method_id)
        if card.customer_id is not None and card.customer_id == customer.stripe_customer_id:
            raise
    async with sessions.begin() as session:
        await session.execute(delete(PaymentProfile).where(PaymentProfile.id == profile.id))
        audit.record(session, actor, "card.remove", f"customer:{customer.email}", payment_method=payment_method_id, last4=profile.last4)
    return CardChange(payment_method_id, profile.brand, profile.last4)


async def make_default_card(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, customer_id: uuid.UUID, payment_method_id: str, *, actor: str
) -> CardChange:
    """Make a saved card the customer's default: Stripe's invoice_settings.default_payment_method
    first, then ours (the customer.updated webhook says the same); audited."""
    async with sessions() as session:
        customer = await session.get_one(Customer, customer_id)
        profile = await _saved_card(session, customer_id, payment_method_id)
    if not customer.stripe_customer_id:
        raise UnknownCard("this customer has no saved cards")
    await gateway.set_default_payment_method(customer.stripe_customer_id, payment_method_id)
    async with sessions.begin() as session:
        await session.run_sync(_set_default, customer_id, payment_method_id, _decided_now())
        audit.record(session, actor, "card.default", f"customer:{customer.email}", payment_method=payment_method_id, last4=profile.last4)
    return CardChange(payment_method_id, profile.brand, profile.last4)


# --- webhooks ------------------------------------------------------------------------------------------


def apply_card_event(session: Session, pm: dict[str, Any]) -> None:
    """payment_method.attached / updated: the card's details. No merge here: the checkout that
    attached a card decides whether it is saved, and merges then (a webhook may arrive first)."""
    customer_stripe_id = pm.get("customer")
    if not customer_stripe_id or pm.get("type", "card") != "card":
        return
    customer = (session.execute(select(Customer).where(Customer.stripe_customer_id == customer_stripe_id))).scalar_one_or_none()
    if customer is not None:
        upsert_profile(session, customer.id, card_summary(pm), merge=False)


def apply_customer_event(session: Session, obj: dict[str, Any], created: datetime | None = None) -> None:
    """customer.updated: the default card Stripe holds, unless the last decision is dated after the event's
    `created` (Stripe delivers events late and out of order: an old event must not undo the default the
    customer just chose; the customer's choices are dated to the next whole second, `_decided_now`)."""
    customer = (
        session.execute(select(Customer).where(Customer.stripe_customer_id == obj.get("id")).with_for_update())
    ).scalar_one_or_none()
    if customer is None:
        return
    if created is not None and customer.default_card_at is not None and created < customer.default_card_at:
        log.info(
            "card.default_event_late customer=%s created=%s decided=%s",
            customer.id,
            created.isoformat(),
            customer.default_card_at.isoformat(),
        )
        return
    default = (obj.get("invoice_settings") or {}).get("default_payment_method")
    if isinstance(default, dict):
        default = default.get("id")
    _set_default(session, customer.id, default, created)  # (an event with no time leaves the last decision's)
