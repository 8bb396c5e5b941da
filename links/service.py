"""Customers, invoices and payment links: add, create, issue, resolve, revoke. No HTTP, no CLI code.

Services take a session and plain values and return plain results; they never render or print.
The caller owns the transaction, so a state change and the email it causes commit together.
"""

from __future__ import annotations

import unicodedata
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import audit
from db import utcnow
from emails import outbox
from emails.messages import InvoiceFacts, Kind, invoice_message
from i18n import check_currency, normalize_locale, to_minor_units
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from links.tokens import Purpose, TokenSigner
from settings import Settings


class LinkError(Exception):
    """A request that finance staff or a customer can fix; the message is one clear line."""


class NotFound(LinkError):
    pass


def normalize_email(email: str) -> str:
    """Check the syntax (no DNS look-up) and return the address trimmed and lower-cased."""
    try:
        return str(validate_email(email.strip(), check_deliverability=False).normalized).lower()
    except EmailNotValidError as exc:
        raise LinkError(f"invalid email address {email!r}: {exc}") from None


def check_invoice_number(number: str) -> str:
    """Invoice numbers appear in email subjects: printable, one line, 1 to 64 characters."""
    number = number.strip()
    if not number or len(number) > 64:
        raise LinkError("an invoice number must be 1 to 64 characters")
    if any(unicodedata.category(c).startswith("C") for c in number):
        raise LinkError("an invoice number cannot contain line breaks or control characters")
    return number


def pay_signer(settings: Settings) -> TokenSigner:
    return TokenSigner([str(k) for k in settings.link_secret_keys], Purpose.PAY)


def pay_url(settings: Settings, token: str) -> str:
    return f"{settings.base_url}/pay/{token}"


# --- customers -------------------------------------------------------------------------------------


async def find_customer(session: AsyncSession, email: str) -> Customer:
    customer = (await session.execute(select(Customer).where(Customer.email == normalize_email(email)))).scalar_one_or_none()
    if customer is None:
        raise NotFound(f"no customer with email {email}")
    return customer


async def add_customer(
    session: AsyncSession,
    *,
    email: str,
    name: str,
    actor: str,
    locale: str | None = None,
    stripe_customer_id: str | None = None,
    verified: bool = False,
    address: dict[str, str] | None = None,
) -> Customer:
    normalized = normalize_email(email)
    if not name.strip():
        raise LinkError("a customer needs a name")
    if (await session.execute(select(Customer.id).where(Customer.email == normalized))).first():
        raise LinkError(f"a customer with email {normalized} already exists")
    if stripe_customer_id is not None and not stripe_customer_id.startswith("cus_"):
        raise LinkError(f"{stripe_customer_id!r} is not a Stripe customer id (cus_…)")
    now = utcnow()
    customer = Customer(
        email=normalized,
        name=name.strip(),
        locale=normalize_locale(locale) if locale else None,
        stripe_customer_id=stripe_customer_id,
        email_verified_at=now if verified else None,
        email_verified_by=f"attested by {actor}" if verified else None,
        **(address or {}),
    )
    session.add(customer)
    await session.flush()
    audit.record(session, actor, "customer.add", f"customer:{normalized}", verified=verified)
    if verified:
        audit.record(session, actor, "customer.verify_attest", f"customer:{normalized}")
    return customer


# --- invoices --------------------------------------------------------------------------------------


async def next_invoice_number(session: AsyncSession) -> str:
    count = (await session.execute(select(func.count()).select_from(Invoice))).scalar_one()
    number = count + 1
    while True:
        candidate = f"INV-{number:06d}"
        if not (await session.execute(select(Invoice.id).where(Invoice.number == candidate))).first():
            return candidate
        number += 1


async def create_invoice(
    session: AsyncSession,
    *,
    customer: Customer,
    amount: str,
    currency: str,
    description: str,
    actor: str,
    due_date: date | None = None,
    number: str | None = None,
) -> Invoice:
    currency_code = check_currency(currency)
    minor = to_minor_units(amount, currency_code)
    if not description.strip():
        raise LinkError("an invoice needs a description")
    if number is not None:
        number = check_invoice_number(number)
        if (await session.execute(select(Invoice.id).where(Invoice.number == number))).first():
            raise LinkError(f"invoice number {number} is already used")
    invoice = Invoice(
        number=number or await next_invoice_number(session),
        customer_id=customer.id,
        currency=currency_code,
        amount_due=minor,
        description=description.strip(),
        due_date=due_date,
        status=InvoiceStatus.OPEN,
    )
    session.add(invoice)
    await session.flush()
    audit.record(session, actor, "invoice.create", f"invoice:{invoice.number}", amount=minor, currency=currency_code)
    return invoice


async def find_invoice(session: AsyncSession, number: str) -> Invoice:
    invoice = (await session.execute(select(Invoice).where(Invoice.number == number))).scalar_one_or_none()
    if invoice is None:
        raise NotFound(f"no invoice numbered {number}")
    return invoice


def invoice_facts(settings: Settings, invoice: Invoice, customer: Customer) -> InvoiceFacts:
    return InvoiceFacts(
        merchant=settings.merchant_name,
        customer_name=customer.name,
        number=invoice.number,
        description=invoice.description,
        amount=invoice.amount_due,
        currency=invoice.currency,
        due_date=invoice.due_date,
    )


def customer_locale(settings: Settings, customer: Customer) -> str:
    return customer.locale or normalize_locale(settings.default_locale)


# --- links -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedLink:
    link_id: uuid.UUID
    url: str
    expires_at: datetime
    emailed: bool  # False when the email is held (unverified address) or not asked for
    held_reason: str | None


async def issue_link(
    session: AsyncSession,
    settings: Settings,
    *,
    invoice: Invoice,
    customer: Customer,
    actor: str,
    ttl_days: int | None = None,
    send: bool = True,
    kind: str = Kind.INVOICE,
    audited: bool = True,
) -> IssuedLink:
    """Create a signed link for the invoice and, if asked, queue its email in this transaction.

    `audited=False` is for bulk callers that write one audit entry for the whole operation."""
    if invoice.status not in InvoiceStatus.PAYABLE:
        raise LinkError(f"invoice {invoice.number} is {invoice.status}; links are issued only for open invoices")
    ttl = ttl_days if ttl_days is not None else settings.link_ttl_days
    if not 1 <= ttl <= 365:
        raise LinkError("a link lives between 1 and 365 days")
    now = utcnow()
    # Whole seconds: the expiry in the token and in the database must be the same instant.
    expires_at = (now + timedelta(days=ttl)).replace(microsecond=0)
    link = PaymentLink(id=uuid.uuid4(), invoice_id=invoice.id, expires_at=expires_at)
    session.add(link)
    url = pay_url(settings, pay_signer(settings).sign(link.id, expires_at))
    held = send_block_reason(customer) if send else None
    emailed = send and held is None
    if emailed:
        content = invoice_message(
            invoice_facts(settings, invoice, customer), url, expires_at, customer_locale(settings, customer), kind=kind
        )
        outbox.enqueue(session, settings, customer.email, content, invoice_id=invoice.id)
        link.sent_at = now
    if audited:
        audit.record(session, actor, "link.issue", f"invoice:{invoice.number}", link=str(link.id), emailed=emailed, held=held)
    return IssuedLink(link.id, url, expires_at, emailed, held)


def send_block_reason(customer: Customer) -> str | None:
    """Why an invoice email must not go to this customer now, or None when it may."""
    if customer.email_verified_at is None:
        return "email address not verified"
    if customer.email_undeliverable_at is not None:
        return f"email undeliverable: {customer.email_undeliverable_reason or 'permanent failure'}"
    return None


def link_with_invoice(link_id: uuid.UUID) -> Select[PaymentLink, Invoice, Customer]:
    """A link with its invoice and customer: one indexed read."""
    return (
        select(PaymentLink, Invoice, Customer)
        .join(Invoice, Invoice.id == PaymentLink.invoice_id)
        .join(Customer, Customer.id == Invoice.customer_id)
        .where(PaymentLink.id == link_id)
    )


# --- the pay page (the hot path: one indexed read, no Stripe call, no write) -----------------------


@dataclass(frozen=True)
class SavedCard:
    payment_method_id: str
    brand: str
    last4: str
    exp_month: int | None
    exp_year: int | None
    is_default: bool


@dataclass(frozen=True)
class LivePayment:
    id: uuid.UUID
    status: str


@dataclass(frozen=True)
class PayPage:
    link: PaymentLink
    invoice: Invoice
    customer: Customer
    cards: list[SavedCard]
    live_payment: LivePayment | None


def pay_page_sync(session: Session, link_id: uuid.UUID) -> PayPage | None:
    """Link, invoice, customer and live payment in one indexed read, then the saved cards.

    Synchronous on purpose: on SQLite the page reader runs it on a read-only connection right on
    the event loop (links/pagereader.py); elsewhere it runs inside an async session via run_sync."""
    from payments.models import Payment, PaymentProfile

    row = session.execute(
        link_with_invoice(link_id).add_columns(Payment.id, Payment.status).outerjoin(Payment, Payment.live_invoice_id == Invoice.id)
    ).one_or_none()
    if row is None:
        return None
    link, invoice, customer, payment_id, payment_status = row
    cards: list[SavedCard] = []
    if invoice.status == InvoiceStatus.OPEN:
        profiles = session.execute(
            select(PaymentProfile)
            .where(PaymentProfile.customer_id == customer.id, PaymentProfile.reusable.is_(True))
            .order_by(PaymentProfile.is_default.desc(), PaymentProfile.created_at)
        )
        cards = [SavedCard(p.stripe_payment_method_id, p.brand, p.last4, p.exp_month, p.exp_year, p.is_default) for p in profiles.scalars()]
    live = LivePayment(payment_id, payment_status) if payment_id is not None else None
    return PayPage(link, invoice, customer, cards, live)


async def load_pay_page(session: AsyncSession, link_id: uuid.UUID) -> PayPage | None:
    return await session.run_sync(pay_page_sync, link_id)


def last_successful_payment_sync(session: Session, invoice_id: uuid.UUID) -> tuple[str | None, str | None, datetime | None]:
    """Brand, last4 and time of the payment that paid an invoice, for the receipt."""
    from payments.models import Payment, PaymentStatus

    row = session.execute(
        select(Payment.brand, Payment.last4, Payment.succeeded_at)
        .where(Payment.invoice_id == invoice_id, Payment.status == PaymentStatus.SUCCEEDED)
        .order_by(Payment.succeeded_at.desc())
        .limit(1)
    ).first()
    return (row[0], row[1], row[2]) if row else (None, None, None)
