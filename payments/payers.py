"""Who pays through a link: the invoice's customer, or a colleague the invoice was sent to (issue 13).

A colleague's link (PaymentLink.recipient_email set) never offers or charges the customer's saved
cards and never shows their other invoices. Its payer gets a Stripe customer of their own, made the
first time they enter a card and kept on the link, so their card is never attached to the invoice's
customer at Stripe.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from links.models import Customer, PaymentLink
from payments.gateway import StripeGateway


def is_colleague_link(link: PaymentLink) -> bool:
    return link.recipient_email is not None


def uses_saved_cards(link: PaymentLink) -> bool:
    """Whether the page may offer (and a pay request may charge) the customer's saved cards."""
    return not is_colleague_link(link)


def may_pay_all(link: PaymentLink) -> bool:
    """Whether the page may show (and pay) the customer's other open invoices."""
    return not is_colleague_link(link)


def known_stripe_customer(link: PaymentLink, customer: Customer) -> str | None:
    """The Stripe customer this link's payments use, if it exists yet."""
    return link.stripe_customer_id if is_colleague_link(link) else customer.stripe_customer_id


async def stripe_customer_for(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, link: PaymentLink, customer: Customer
) -> str:
    """The Stripe customer this link's payments use, created at Stripe the first time it is needed
    (customers imported in bulk, and every colleague). Two tabs racing keep the first one's."""
    known = known_stripe_customer(link, customer)
    if known:
        return known
    if is_colleague_link(link):
        assert link.recipient_email is not None
        stripe_id = await gateway.create_customer(link.recipient_email, link.recipient_email)
        async with sessions.begin() as session:
            row = await session.get_one(PaymentLink, link.id, with_for_update=True)
            if row.stripe_customer_id is None:
                row.stripe_customer_id = stripe_id
            return row.stripe_customer_id
    stripe_id = await gateway.create_customer(customer.email, customer.name)
    async with sessions.begin() as session:
        cust = await session.get_one(Customer, customer.id, with_for_update=True)
        if cust.stripe_customer_id is None:
            cust.stripe_customer_id = stripe_id
        return cust.stripe_customer_id
