"""Invoices: the one factory (CLI, importer and services use it), numbering, look-ups, the facts emails show.

Numbering: invoices created without a number (by `invoice create` or an import row without one)
take the next number of one sequence, INV-000001, INV-000002, … with no gaps and no failures under
concurrency (see `allocate_invoice_numbers`)."""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from emails.messages import EmailContent, FactLine, InvoiceFacts, Kind, invoice_void_payload
from links.customers import customer_locale
from links.errors import LinkError, NotFound
from links.hooks import queue_customer_email
from links.lines import LineItem, check_lines, lines_json, lines_of, plain_line, totals
from links.models import Customer, Invoice, InvoiceStatus, NumberSequence, PaymentLink
from links.partial import PartRules
from plumbing import audit
from plumbing.db import chunked, insert_ignore, new_id, utcnow
from plumbing.i18n import check_currency, format_money, to_minor_units
from plumbing.settings import Settings

# The unique constraint on invoices.number, as the database names it in an IntegrityError
# (PostgreSQL names the constraint, SQLite the column).
_NUMBER_CONSTRAINT = ("uq_invoices_number", "invoices.number")


def check_invoice_number(number: str) -> str:
    """Invoice numbers appear in email subjects: printable, one line, 1 to 64 characters."""
    number = number.strip()
    if not number or len(number) > 64:
        raise LinkError("an invoice number must be 1 to 64 characters")
    if any(unicodedata.category(c).startswith("C") for c in number):
        raise LinkError("an invoice number cannot contain line breaks or control characters")
    return number


INVOICE_SEQUENCE = "invoice"
_INV_NUMBER = re.compile(r"INV-(\d+)")


def format_invoice_number(value: int) -> str:
    return f"INV-{value:06d}"


@dataclass(frozen=True)
class NumberAllocation:
    """Numbers taken from the invoice sequence in one transaction: `first`..`last` of the sequence
    were ours (those already used by invoices numbered by hand were skipped)."""

    numbers: list[str]
    first: int
    last: int


async def allocate_invoice_numbers(session: AsyncSession, count: int) -> NumberAllocation:
    """The next `count` invoice numbers (INV-000042), in the caller's transaction.

    The sequence row is bumped with one UPDATE … RETURNING: on PostgreSQL its row lock makes a
    concurrent creator wait for this transaction (and then carry on from its result) instead of
    failing; on SQLite writers are serialised by BEGIN IMMEDIATE anyway. If the caller rolls back,
    the numbers go back with it, so the sequence has no gaps. A number someone gave by hand
    (`--number INV-000050`) is skipped, not reused."""
    if count <= 0:
        raise ValueError("count must be positive")
    numbers: list[str] = []
    first: int | None = None
    last = 0
    while len(numbers) < count:
        need = count - len(numbers)
        last = await _bump_sequence(session, need)
        first = last - need + 1 if first is None else first
        candidates = [format_invoice_number(value) for value in range(last - need + 1, last + 1)]
        taken: set[str] = set()
        for chunk in chunked(candidates):
            taken.update((await session.execute(select(Invoice.number).where(Invoice.number.in_(chunk)))).scalars())
        numbers += [c for c in candidates if c not in taken]
    assert first is not None
    return NumberAllocation(numbers, first, last)


async def next_invoice_number(session: AsyncSession) -> str:
    return (await allocate_invoice_numbers(session, 1)).numbers[0]


async def give_back_invoice_numbers(session: AsyncSession, first: int, last: int) -> bool:
    """Undo an allocation committed earlier (a failed import): possible only while nobody has taken
    a number since. Returns whether the numbers went back (otherwise they stay unused: a gap)."""
    result = await session.execute(
        update(NumberSequence)
        .where(NumberSequence.name == INVOICE_SEQUENCE, NumberSequence.last_value == last)
        .values(last_value=first - 1)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def _bump_sequence(session: AsyncSession, by: int) -> int:
    bump = (
        update(NumberSequence)
        .where(NumberSequence.name == INVOICE_SEQUENCE)
        .values(last_value=NumberSequence.last_value + by)
        .returning(NumberSequence.last_value)
        .execution_options(synchronize_session=False)
    )
    value = (await session.execute(bump)).scalar_one_or_none()
    if value is None:  # the row is missing (migration 0008 creates it): start after the highest INV- number
        numbers = (await session.execute(select(Invoice.number).where(Invoice.number.like("INV-%")))).scalars()
        highest = max((int(m.group(1)) for n in numbers if (m := _INV_NUMBER.fullmatch(n))), default=0)
        await session.execute(insert_ignore(session, NumberSequence).values(name=INVOICE_SEQUENCE, last_value=highest))
        value = (await session.execute(bump)).scalar_one()
    return int(value)


NOTES_LIMIT = 2000


def check_notes(notes: str | None) -> str | None:
    """Invoice-level notes shown to the customer: up to 2,000 characters; line breaks and tabs allowed."""
    if notes is None or not notes.strip():
        return None
    notes = notes.strip().replace("\r\n", "\n")
    if len(notes) > NOTES_LIMIT:
        raise LinkError(f"notes are at most {NOTES_LIMIT} characters")
    if any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in notes):
        raise LinkError("notes cannot contain control characters")
    return notes


def check_due_date(due_date: date | None, *, today: date | None = None) -> date | None:
    """A due date is today or later (UTC): an invoice is never created overdue."""
    today = today or utcnow().date()
    if due_date is not None and due_date < today:
        raise LinkError(f"the due date {due_date.isoformat()} is in the past (today is {today.isoformat()} UTC); give today or later")
    return due_date


def default_part_rules(settings: Settings) -> PartRules:
    """The rules of an invoice created without any: PARTIAL_PAYMENTS_DEFAULT (no minimum, no deposit)."""
    return PartRules(allow_partial=settings.partial_payments_default)


def check_part_rules(rules: PartRules, total: int, currency: str) -> PartRules:
    """Part-payment rules that make sense for an invoice of `total` (minor units), or LinkError."""
    if not rules.allow_partial:
        if rules.min_amount is not None or rules.min_percent is not None or rules.deposit_percent is not None:
            raise LinkError("a minimum or a deposit only applies with part payments: add --allow-partial")
        return rules
    if rules.min_amount is not None and rules.min_percent is not None:
        raise LinkError("give a minimum amount or a minimum percentage, not both")
    for name, percent in (("minimum percentage", rules.min_percent), ("deposit percentage", rules.deposit_percent)):
        if percent is not None and not 1 <= percent <= 100:
            raise LinkError(f"the {name} must be a whole number from 1 to 100")
    if rules.min_amount is not None:
        if rules.min_amount <= 0:
            raise LinkError("the minimum amount must be greater than zero")
        if rules.min_amount > total:
            raise LinkError(
                f"the minimum amount {format_money(rules.min_amount, currency)} is more than the total {format_money(total, currency)}"
            )
    return rules


def new_invoice(
    *,
    customer_id: uuid.UUID,
    number: str,
    currency: str,
    description: str,
    amount_due: int | None = None,
    lines: Sequence[LineItem] | None = None,
    notes: str | None = None,
    due_date: date | None = None,
    import_key: str | None = None,
    import_batch_id: uuid.UUID | None = None,
    today: date | None = None,
    part_rules: PartRules | None = None,
) -> Invoice:
    """The one way an invoice row is built (CLI, importer, services): an open invoice for its line
    items (links/lines.py), or for a plain amount in minor units (one untaxed line). amount_due is
    the lines' total: what gets charged. Refused (LinkError): no description, a due date in the
    past, a total below Stripe's minimum charge for the currency (or above its maximum).
    Part payments follow `part_rules` (links/partial.py; default: none), checked against the total.
    The caller adds it to its session (and see `flush_new_invoices`)."""
    if not description.strip():
        raise LinkError("an invoice needs a description")
    currency = check_currency(currency)
    if lines is None:
        if amount_due is None or amount_due <= 0:
            raise LinkError("an invoice amount must be greater than zero")
        lines = [plain_line(description, amount_due)]
    elif amount_due is not None and amount_due != totals(lines).total:
        raise LinkError(f"the amount {amount_due} does not match the total of the lines, {totals(lines).total} (minor units)")
    total = check_lines(lines, currency).total
    rules = check_part_rules(part_rules or PartRules(), total, currency)
    return Invoice(
        id=new_id(),
        number=check_invoice_number(number),
        customer_id=customer_id,
        currency=currency,
        amount_due=total,
        description=description.strip(),
        line_items=lines_json(lines),
        notes=check_notes(notes),
        due_date=check_due_date(due_date, today=today),
        status=InvoiceStatus.OPEN,
        created_at=utcnow(),  # now, not at flush: the email queued in the same transaction shows it
        import_key=import_key,
        import_batch_id=import_batch_id,
        allow_partial=rules.allow_partial,
        min_partial_amount=rules.min_amount,
        min_partial_percent=rules.min_percent,
        deposit_percent=rules.deposit_percent,
    )


def number_taken(exc: IntegrityError) -> bool:
    """Whether the database refused an invoice because its number is already used."""
    text = str(exc.orig)
    return any(name in text for name in _NUMBER_CONSTRAINT)


async def flush_new_invoices(session: AsyncSession, numbers: Sequence[str], *, auto_numbered: bool = False) -> None:
    """Flush newly added invoices. Another transaction may have taken one of their numbers since
    we looked (two creates at the same moment): that is one clear LinkError, not a database error."""
    try:
        await session.flush()
    except IntegrityError as exc:
        if not number_taken(exc):
            raise
        if len(numbers) != 1:
            raise LinkError("an invoice number was taken by another invoice created at the same moment; nothing was written") from None
        retry = " by an invoice created at the same moment; run the command again" if auto_numbered else ""
        raise LinkError(f"invoice number {numbers[0]} is already used{retry}") from None


async def create_invoice(
    session: AsyncSession,
    *,
    customer: Customer,
    currency: str,
    description: str,
    actor: str,
    amount: str | None = None,
    lines: Sequence[LineItem] | None = None,
    notes: str | None = None,
    due_date: date | None = None,
    number: str | None = None,
    part_rules: PartRules | None = None,
) -> Invoice:
    """An invoice for a plain `amount` in major units ("120.50", one untaxed line) or for `lines`
    (exactly one of the two), numbered `number` or the next of the sequence, with `part_rules`."""
    currency_code = check_currency(currency)
    if (amount is None) == (lines is None):
        raise LinkError("an invoice has a plain amount or line items: give exactly one of the two")
    minor = to_minor_units(amount, currency_code) if amount is not None else None
    if not description.strip():
        raise LinkError("an invoice needs a description")
    if number is not None:
        number = check_invoice_number(number)
        if (await session.execute(select(Invoice.id).where(Invoice.number == number))).first():
            raise LinkError(f"invoice number {number} is already used")
    invoice = new_invoice(
        customer_id=customer.id,
        number=number or await next_invoice_number(session),  # a refused invoice gives it back (rollback)
        currency=currency_code,
        amount_due=minor,
        lines=lines,
        notes=notes,
        description=description,
        due_date=due_date,
        part_rules=part_rules,
    )
    session.add(invoice)
    await flush_new_invoices(session, [invoice.number], auto_numbered=number is None)
    audit.record(
        session, actor, "invoice.create", f"invoice:{invoice.number}", amount=invoice.amount_due, currency=currency_code,
        lines=len(invoice.line_items or ()), allow_partial=invoice.allow_partial, min_partial_amount=invoice.min_partial_amount,
        min_partial_percent=invoice.min_partial_percent, deposit_percent=invoice.deposit_percent,
    )  # fmt: skip
    return invoice


async def find_invoice(session: AsyncSession, number: str) -> Invoice:
    invoice = (await session.execute(select(Invoice).where(Invoice.number == number))).scalar_one_or_none()
    if invoice is None:
        raise NotFound(f"no invoice numbered {number}")
    return invoice


async def find_invoice_with_customer(session: AsyncSession, number: str) -> tuple[Invoice, Customer]:
    row = (
        await session.execute(select(Invoice, Customer).join(Customer, Customer.id == Invoice.customer_id).where(Invoice.number == number))
    ).one_or_none()
    if row is None:
        raise NotFound(f"no invoice numbered {number}")
    return row[0], row[1]


async def list_invoices(
    session: AsyncSession,
    *,
    status: str | None = None,
    customer_id: uuid.UUID | None = None,
    overdue_on: date | None = None,
    since: date | None = None,
) -> list[tuple[Invoice, Customer]]:
    """Invoices with their customers, oldest first; only those in `status`, of one customer, overdue
    on the day `overdue_on` (payable, due before it) or created on or after `since` (UTC), when given."""
    query = select(Invoice, Customer).join(Customer, Customer.id == Invoice.customer_id).order_by(Invoice.created_at, Invoice.number)
    if status:
        query = query.where(Invoice.status == status)
    if customer_id is not None:
        query = query.where(Invoice.customer_id == customer_id)
    if overdue_on is not None:
        query = query.where(Invoice.status.in_(InvoiceStatus.PAYABLE), Invoice.due_date < overdue_on)
    if since is not None:
        query = query.where(Invoice.created_at >= datetime.combine(since, time(), tzinfo=UTC))
    return [(invoice, customer) for invoice, customer in (await session.execute(query)).all()]


def is_overdue(invoice: Invoice, today: date) -> bool:
    return invoice.status in InvoiceStatus.PAYABLE and invoice.due_date is not None and invoice.due_date < today


async def invoice_links(session: AsyncSession, invoice_id: uuid.UUID) -> list[PaymentLink]:
    """Every link issued for the invoice, oldest first (revoked and expired ones too)."""
    query = select(PaymentLink).where(PaymentLink.invoice_id == invoice_id).order_by(PaymentLink.created_at)
    return list((await session.execute(query)).scalars())


def invoice_facts(settings: Settings, invoice: Invoice, customer: Customer, *, today: date | None = None) -> InvoiceFacts:
    """What the invoice, new-link, reminder (and receipt) emails show: the lines, tax per rate and
    total (links/lines.py), the issue and due dates, the notes, and since when it is overdue."""
    lines = lines_of(invoice.line_items, description=invoice.description, amount_due=invoice.amount_due)
    summed = totals(lines)
    today = today or utcnow().date()
    paid = invoice.amount_paid or 0  # None on an invoice not flushed yet
    return InvoiceFacts(
        merchant=settings.merchant_name,
        customer_name=customer.name,
        number=invoice.number,
        description=invoice.description,
        amount=invoice.amount_due,
        currency=invoice.currency,
        due_date=invoice.due_date,
        issued_on=(invoice.created_at or utcnow()).date(),
        lines=tuple(
            FactLine(
                line.description,
                str(line.quantity),
                line.unit_amount,
                None if line.tax_percent is None else str(line.tax_percent),
                line.net,
            )
            for line in lines
        ),
        subtotal=summed.subtotal,
        taxes=tuple((str(rate), amount) for rate, amount in summed.taxes),
        notes=invoice.notes,
        overdue_since=invoice.due_date if is_overdue(invoice, today) else None,
        amount_paid=paid,
        balance=invoice.amount_due - paid if 0 < paid < invoice.amount_due else None,
    )


async def void_notice(session: AsyncSession, settings: Settings, invoice: Invoice, *, reason: str | None, actor: str) -> bool:
    """After `payments.checkout.void_invoice` (same transaction): keep the reason (finance's, never
    shown to the customer), audit it, and tell the customer the invoice was cancelled, if they were
    ever sent it (through `queue_customer_email`, so a paused address is respected). Returns whether
    the email was queued."""
    reason = (reason or "").strip() or None
    if reason is not None:
        if len(reason) > 1000 or any(unicodedata.category(c) == "Cc" for c in reason):
            raise LinkError("a void reason is one line of at most 1,000 characters")
        invoice.void_reason = reason
    customer = await session.get_one(Customer, invoice.customer_id)
    was_sent = (
        await session.execute(select(PaymentLink.id).where(PaymentLink.invoice_id == invoice.id, PaymentLink.sent_at.is_not(None)).limit(1))
    ).first() is not None
    queued = False
    if was_sent:
        subject, payload = invoice_void_payload(invoice_facts(settings, invoice, customer), locale=customer_locale(settings, customer))
        content = EmailContent(Kind.INVOICE_VOID, subject, "", "")
        queued = queue_customer_email(session, settings, customer, content, actor=actor, payload=payload, invoice_id=invoice.id)
    audit.record(session, actor, "invoice.void_notice", f"invoice:{invoice.number}", reason=reason, emailed=queued, was_sent=was_sent)
    return queued
