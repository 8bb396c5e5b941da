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
from datetime import date

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from emails.messages import InvoiceFacts
from links.errors import LinkError, NotFound
from links.models import Customer, Invoice, InvoiceStatus, NumberSequence, PaymentLink
from plumbing import audit
from plumbing.db import chunked, insert_ignore, new_id
from plumbing.i18n import check_currency, to_minor_units
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


def new_invoice(
    *,
    customer_id: uuid.UUID,
    number: str,
    currency: str,
    amount_due: int,
    description: str,
    due_date: date | None = None,
    import_key: str | None = None,
    import_batch_id: uuid.UUID | None = None,
) -> Invoice:
    """The one way an invoice row is built (CLI, importer, services): an open invoice for an amount
    in minor units. The caller adds it to its session (and see `flush_new_invoices`)."""
    if amount_due <= 0:
        raise LinkError("an invoice amount must be greater than zero")
    if not description.strip():
        raise LinkError("an invoice needs a description")
    return Invoice(
        id=new_id(),
        number=check_invoice_number(number),
        customer_id=customer_id,
        currency=check_currency(currency),
        amount_due=amount_due,
        description=description.strip(),
        due_date=due_date,
        status=InvoiceStatus.OPEN,
        import_key=import_key,
        import_batch_id=import_batch_id,
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
    invoice = new_invoice(
        customer_id=customer.id,
        number=number or await next_invoice_number(session),
        currency=currency_code,
        amount_due=minor,
        description=description,
        due_date=due_date,
    )
    session.add(invoice)
    await flush_new_invoices(session, [invoice.number], auto_numbered=number is None)
    audit.record(session, actor, "invoice.create", f"invoice:{invoice.number}", amount=minor, currency=currency_code)
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


async def list_invoices(session: AsyncSession, *, status: str | None = None) -> list[tuple[Invoice, Customer]]:
    """Invoices with their customers, oldest first; only those in `status` when given."""
    query = select(Invoice, Customer).join(Customer, Customer.id == Invoice.customer_id).order_by(Invoice.created_at)
    if status:
        query = query.where(Invoice.status == status)
    return [(invoice, customer) for invoice, customer in (await session.execute(query)).all()]


async def invoice_links(session: AsyncSession, invoice_id: uuid.UUID) -> list[PaymentLink]:
    """Every link issued for the invoice, oldest first (revoked and expired ones too)."""
    query = select(PaymentLink).where(PaymentLink.invoice_id == invoice_id).order_by(PaymentLink.created_at)
    return list((await session.execute(query)).scalars())


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
