"""The finance desk: which invoices need doing, and why (`invoice list`, `invoice show`).

Attention flags are derived from the data, each from the place that knows it: the invoice's status,
dates and amounts (overdue, over- and underpaid), the customer (held: address not verified; email
undeliverable: address paused), the payments (stuck in 3-D Secure: a payment waiting for the
customer's bank for more than STUCK_3DS_AFTER), the outbox (an email to the invoice that went dead)
and the links (the last link sent expires before the due date). Only disputes come from the
invoice's "needs attention" note alone (the dispute webhook records nothing else); anything else in
that note shows as `note`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from emails.messages import Kind
from emails.models import OutboxMessage, OutboxStatus
from links.customers import find_customer
from links.hooks import FLAG_SEPARATOR
from links.invoices import is_overdue, list_invoices
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from payments.models import Payment, PaymentAllocation, PaymentStatus
from plumbing.db import chunked, utcnow

STUCK_3DS_AFTER = timedelta(minutes=15)


class Flag(StrEnum):
    OVERDUE = "overdue"
    HELD = "held"  # open, and the customer has not confirmed the address: its emails are held
    NOT_SENT = "not_sent"  # open, the address is fine, but no email with a link ever went out
    STUCK_3DS = "3ds_stuck"
    UNDELIVERABLE = "email_undeliverable"
    DISPUTED = "disputed"
    OVERPAID = "overpaid"
    UNDERPAID = "underpaid"
    LINK_EXPIRES_BEFORE_DUE = "link_expires_before_due"
    NOTE = "note"  # the needs-attention note says something else (e.g. a payment in another currency)


FLAG_LABELS: dict[Flag, str] = {
    Flag.OVERDUE: "overdue",
    Flag.HELD: "held: address not verified",
    Flag.NOT_SENT: "never sent",
    Flag.STUCK_3DS: "stuck in 3-D Secure",
    Flag.UNDELIVERABLE: "email undeliverable",
    Flag.DISPUTED: "disputed",
    Flag.OVERPAID: "overpaid",
    Flag.UNDERPAID: "underpaid",
    Flag.LINK_EXPIRES_BEFORE_DUE: "link expires before due date",
    Flag.NOTE: "see note",
}


@dataclass(frozen=True)
class DeskRow:
    invoice: Invoice
    customer: Customer
    flags: list[Flag]
    days_overdue: int | None


@dataclass
class CurrencyTotal:
    invoices: int = 0
    due: int = 0  # amount due of every invoice but void ones
    paid: int = 0
    outstanding: int = 0  # not yet received on open and processing invoices
    overdue: int = 0  # of that, on overdue invoices


@dataclass(frozen=True)
class _Facts:
    """What the flags need beyond the invoice and its customer."""

    stuck_3ds: set[uuid.UUID] = field(default_factory=set)
    dead_mail: set[uuid.UUID] = field(default_factory=set)
    sent: set[uuid.UUID] = field(default_factory=set)
    last_link_expiry: dict[uuid.UUID, datetime] = field(default_factory=dict)


def _note_flags(note: str | None) -> set[Flag]:
    flags: set[Flag] = set()
    for part in (p.strip() for p in (note or "").split(FLAG_SEPARATOR)):
        if not part:
            continue
        if part.startswith("disputed"):
            flags.add(Flag.DISPUTED)
        elif "undeliverable" in part or part.startswith("receipt not sent"):
            flags.add(Flag.UNDELIVERABLE)
        elif part.startswith(("overpaid", "underpaid")):
            continue  # derived from the amounts below, which stay true after a later payment
        else:
            flags.add(Flag.NOTE)
    return flags


def attention_flags(invoice: Invoice, customer: Customer, facts: _Facts, today: date) -> list[Flag]:
    flags = _note_flags(invoice.needs_attention)
    payable = invoice.status in InvoiceStatus.PAYABLE
    if is_overdue(invoice, today):
        flags.add(Flag.OVERDUE)
    if payable and customer.email_verified_at is None:
        flags.add(Flag.HELD)
    elif payable and invoice.id not in facts.sent and customer.email_undeliverable_at is None:
        flags.add(Flag.NOT_SENT)
    if customer.email_undeliverable_at is not None or invoice.id in facts.dead_mail:
        flags.add(Flag.UNDELIVERABLE)
    if invoice.id in facts.stuck_3ds:
        flags.add(Flag.STUCK_3DS)
    if invoice.amount_paid > invoice.amount_due:
        flags.add(Flag.OVERPAID)
    elif payable and 0 < invoice.amount_paid < invoice.amount_due and not invoice.allow_partial:
        flags.add(Flag.UNDERPAID)  # with part payments allowed, a balance is the plan, not a problem
    expiry = facts.last_link_expiry.get(invoice.id)
    if payable and invoice.due_date is not None and expiry is not None and invoice.due_date >= today and expiry.date() < invoice.due_date:
        flags.add(Flag.LINK_EXPIRES_BEFORE_DUE)
    return [flag for flag in Flag if flag in flags]  # always in the same order


async def _facts(session: AsyncSession, invoice_ids: Sequence[uuid.UUID], now: datetime) -> _Facts:
    facts = _Facts()
    for chunk in chunked(invoice_ids):
        stuck = select(Payment.invoice_id).where(
            Payment.invoice_id.in_(chunk), Payment.status == PaymentStatus.REQUIRES_ACTION, Payment.updated_at < now - STUCK_3DS_AFTER
        )
        facts.stuck_3ds.update((await session.execute(stuck)).scalars())
        dead = select(OutboxMessage.invoice_id).where(
            OutboxMessage.invoice_id.in_(chunk), OutboxMessage.status == OutboxStatus.DEAD, OutboxMessage.kind != Kind.FINANCE_ALERT
        )
        facts.dead_mail.update(i for i in (await session.execute(dead)).scalars() if i is not None)
        links = (
            select(PaymentLink.invoice_id, func.max(PaymentLink.expires_at))
            .where(PaymentLink.invoice_id.in_(chunk), PaymentLink.sent_at.is_not(None), PaymentLink.revoked_at.is_(None))
            .group_by(PaymentLink.invoice_id)
        )
        facts.last_link_expiry.update({invoice_id: expires_at for invoice_id, expires_at in (await session.execute(links)).all()})
        ever_sent = select(PaymentLink.invoice_id).where(PaymentLink.invoice_id.in_(chunk), PaymentLink.sent_at.is_not(None)).distinct()
        facts.sent.update((await session.execute(ever_sent)).scalars())
    return facts


async def desk_rows(
    session: AsyncSession,
    *,
    status: str | None = None,
    customer_email: str | None = None,
    overdue: bool = False,
    since: date | None = None,
    now: datetime | None = None,
) -> list[DeskRow]:
    """Invoices (oldest first) with their attention flags: of one customer, overdue only, created
    on or after a day (UTC), in one status, as asked."""
    now = now or utcnow()
    today = now.date()
    customer_id = (await find_customer(session, customer_email)).id if customer_email else None
    rows = await list_invoices(session, status=status, customer_id=customer_id, overdue_on=today if overdue else None, since=since)
    facts = await _facts(session, [invoice.id for invoice, _ in rows], now)
    return [
        DeskRow(
            invoice,
            customer,
            attention_flags(invoice, customer, facts, today),
            (today - invoice.due_date).days if is_overdue(invoice, today) and invoice.due_date else None,
        )
        for invoice, customer in rows
    ]


async def desk_row(session: AsyncSession, invoice: Invoice, customer: Customer, *, now: datetime | None = None) -> DeskRow:
    """One invoice's flags (`invoice show`)."""
    now = now or utcnow()
    today = now.date()
    facts = await _facts(session, [invoice.id], now)
    days = (today - invoice.due_date).days if is_overdue(invoice, today) and invoice.due_date else None
    return DeskRow(invoice, customer, attention_flags(invoice, customer, facts, today), days)


def currency_totals(rows: Iterable[DeskRow]) -> dict[str, CurrencyTotal]:
    """Totals per currency (never summed across currencies), in minor units."""
    result: dict[str, CurrencyTotal] = {}
    for row in rows:
        invoice = row.invoice
        total = result.setdefault(invoice.currency, CurrencyTotal())
        total.invoices += 1
        total.paid += invoice.amount_paid
        if invoice.status == InvoiceStatus.VOID:
            continue
        total.due += invoice.amount_due
        if invoice.status in InvoiceStatus.UNSETTLED:
            open_amount = max(0, invoice.amount_due - invoice.amount_paid)
            total.outstanding += open_amount
            if row.days_overdue is not None:
                total.overdue += open_amount
    return dict(sorted(result.items()))


@dataclass(frozen=True)
class AllocationLine:
    invoice_number: str
    amount: int
    amount_refunded: int


@dataclass(frozen=True)
class InvoicePayment:
    """A payment that paid (or tried to pay) an invoice: its own, or a pay-all payment that included it."""

    payment: Payment
    allocation: list[AllocationLine]  # a pay-all payment's split over its invoices; [] for a payment of one invoice
    share: int  # what of it is (or would be) this invoice's


async def payments_of_invoice(session: AsyncSession, invoice_id: uuid.UUID) -> list[InvoicePayment]:
    """Every payment attempt on the invoice, oldest first: its own, and pay-all payments it was part of."""
    allocated = select(PaymentAllocation.payment_id).where(PaymentAllocation.invoice_id == invoice_id)
    query = select(Payment).where((Payment.invoice_id == invoice_id) | Payment.id.in_(allocated)).order_by(Payment.created_at, Payment.id)
    payments = list((await session.execute(query)).scalars())
    splits = await allocations_of(session, [p.id for p in payments if p.scope == "all"])
    result = []
    for payment in payments:
        lines = splits.get(payment.id, [])
        mine = [a for a, inv in lines if inv == invoice_id]
        share = mine[0].amount if mine else (payment.amount if payment.scope != "all" else 0)
        result.append(InvoicePayment(payment, [a for a, _ in lines], share))
    return result


Split = list[tuple[AllocationLine, uuid.UUID]]  # each line with its invoice's id


async def allocations_of(session: AsyncSession, payment_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Split]:
    """The allocation lines of pay-all payments, by payment id (in invoice-number order)."""
    result: dict[uuid.UUID, Split] = {}
    for chunk in chunked(list(payment_ids)):
        rows = await session.execute(
            select(PaymentAllocation.payment_id, Invoice.number, PaymentAllocation.amount, PaymentAllocation.amount_refunded, Invoice.id)
            .join(Invoice, Invoice.id == PaymentAllocation.invoice_id)
            .where(PaymentAllocation.payment_id.in_(chunk))
            .order_by(Invoice.number)
        )
        for payment_id, number, amount, refunded, inv_id in rows:
            result.setdefault(payment_id, []).append((AllocationLine(number, amount, refunded), inv_id))
    return result
