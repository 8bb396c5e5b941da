"""Documents: the invoice and the receipt as PDF, and the receipt's number.

Receipt numbers (RCT-000042) are gap-free: the `number_sequences` row "receipt" is bumped with one
UPDATE … RETURNING in the transaction that marks the payment succeeded (payments/state.py), so a
rolled-back payment gives its number back, and on PostgreSQL a concurrent payment waits for the row
lock instead of taking the same number (the column is unique as well). A batch of webhooks takes all
its numbers at once, as its last statement before the commit (`defer_receipt_numbers`), so the row
is locked once per batch and only while the batch commits. A number is given when the
money counts towards the invoice (its currency); a payment in another currency, or one that arrived
after the invoice was settled, gets none (finance settles those by hand).

The PDFs are rendered from the page templates under templates/documents/ with the page's
translations and Babel's money and date formats, in the customer's (or the visitor's) language, by
WeasyPrint on its own thread pool (plumbing/pdf.py): never on the event loop, never on GET /pay.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal

from markupsafe import Markup
from sqlalchemy import and_, event, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import flag_modified

from emails.messages import Kind
from emails.models import OutboxMessage
from emails.outbox import ClaimedMessage
from emails.sender import Attachment, AttachmentHook
from links.customers import customer_locale
from links.issuing import link_with_invoice
from links.lines import LineItem, Totals, lines_of, totals
from links.models import Customer, Invoice, NumberSequence, PaymentLink
from payments.models import Payment, PaymentAllocation, PaymentStatus
from plumbing.db import insert_ignore
from plumbing.pdf import render_pdf
from plumbing.rendering import brand_of, pages, read_logo
from plumbing.settings import Settings

RECEIPT_SEQUENCE = "receipt"
_RCT_NUMBER = re.compile(r"RCT-(\d+)")
DocumentKind = Literal["invoice", "receipt"]
PDF = "application/pdf"


def format_receipt_number(value: int) -> str:
    return f"RCT-{value:06d}"


def next_receipt_number(session: Session) -> str:
    """The next receipt number, in the caller's transaction (see the module's docstring)."""
    return format_receipt_number(_take_numbers(session, 1))


def _take_numbers(session: Session, count: int) -> int:
    """Bump the receipt sequence by `count` in the caller's transaction; returns the last number taken."""
    bump = (
        update(NumberSequence)
        .where(NumberSequence.name == RECEIPT_SEQUENCE)
        .values(last_value=NumberSequence.last_value + count)
        .returning(NumberSequence.last_value)
        .execution_options(synchronize_session=False)
    )
    value = session.execute(bump).scalar_one_or_none()
    if value is None:  # the row is missing (migration 0010 creates it): start after the highest number given
        given = session.execute(select(Payment.receipt_number).where(Payment.receipt_number.is_not(None))).scalars()
        highest = max((int(m.group(1)) for n in given if n and (m := _RCT_NUMBER.fullmatch(n))), default=0)
        session.execute(insert_ignore(session, NumberSequence).values(name=RECEIPT_SEQUENCE, last_value=highest))
        value = session.execute(bump).scalar_one()
    return int(value)


# Batches of webhooks (payments/sqlite_batches.py, payments/pg_batches.py) number their receipts at
# the end, with one UPDATE for the whole batch, just before the commit: the sequence row is locked
# once per batch and only for the commit, instead of from each payment to the commit. The numbers
# are still taken in the transaction that marks the payments succeeded (a rolled-back batch gives
# all of them back: gap-free), in the order the payments succeeded, under the row lock (unique).
_DEFERRED = "paylink.deferred_receipt_numbers"  # session.info key: [(payment, [receipt payloads])]


def defer_receipt_numbers(session: Session) -> None:
    """From now on in this session, `give_receipt_number` only notes the payment; call
    `number_deferred_receipts` before the commit."""
    session.info[_DEFERRED] = []


def give_receipt_number(session: Session, payment: Payment) -> None:
    """Give the payment its gap-free receipt number: now, or at the end of a batch (see above)."""
    if payment.receipt_number:
        return
    pending: list[tuple[Payment, list[dict[str, Any]]]] | None = session.info.get(_DEFERRED)
    if pending is None:
        payment.receipt_number = next_receipt_number(session)
    elif all(noted is not payment for noted, _ in pending):
        pending.append((payment, []))


def number_later(session: Session, payment: Payment, payload: dict[str, Any]) -> None:
    """A receipt email queued (as facts) before its payment's number was given: it gets the number too."""
    for noted, payloads in session.info.get(_DEFERRED) or ():
        if noted is payment:
            payloads.append(payload)


def number_deferred_receipts(session: Session) -> None:
    """Number every payment noted since `defer_receipt_numbers`, in order, with one UPDATE."""
    pending: list[tuple[Payment, list[dict[str, Any]]]] = session.info.pop(_DEFERRED, None) or []
    if not pending:
        return
    first = _take_numbers(session, len(pending)) - len(pending) + 1
    for offset, (payment, payloads) in enumerate(pending):
        payment.receipt_number = format_receipt_number(first + offset)
        for payload in payloads:
            payload["receipt_number"] = payment.receipt_number
    for message in session.info.pop(_WRITTEN, ()):
        flag_modified(message, "payload")  # written by a flush earlier in the batch: written again


_WRITTEN = "paylink.receipts_written_unnumbered"  # session.info key: receipt messages a flush wrote before their number


@event.listens_for(Session, "before_flush")
def _keep_unnumbered_receipts(session: Session, _context: Any, _instances: Any) -> None:
    """An event may flush in the middle of a batch (a payment we did not start is inserted): the
    receipts queued before it are written without their number, and the session only keeps weak
    references to written rows. Keep those messages, so that numbering writes them again."""
    pending: list[tuple[Payment, list[dict[str, Any]]]] | None = session.info.get(_DEFERRED)
    if not pending:
        return
    unnumbered = {id(payload) for _, payloads in pending for payload in payloads}
    if unnumbered:
        written = session.info.setdefault(_WRITTEN, [])
        written.extend(m for m in session.new if isinstance(m, OutboxMessage) and id(m.payload) in unnumbered)


def stop_deferring_receipt_numbers(session: Session) -> None:
    session.info.pop(_DEFERRED, None)
    session.info.pop(_WRITTEN, None)


# --- what a document shows --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceiptFacts:
    number: str | None
    paid_at: datetime | None
    amount: int  # what this payment paid, minor units
    currency: str
    brand: str | None
    last4: str | None
    # Part payments and pay-all (issue 13): this invoice's share of the payment, what was still due on
    # it after this payment, and for a payment of several invoices which got what (number, amount).
    share: int | None = None
    balance_after: int = 0
    allocation: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Document:
    invoice: Invoice
    customer: Customer
    link: PaymentLink | None
    lines: list[LineItem]
    sums: Totals
    issued_on: date
    receipt: ReceiptFacts | None  # the latest payment that counted, if any


def _receipt_of(session: Session, invoice: Invoice, paid_at: datetime | None = None, number: str | None = None) -> ReceiptFacts | None:
    """The receipt of the payment made at `paid_at` (an emailed receipt's), else of the latest one that
    counted: the invoice's own payments and pay-all payments that included it. With `number`, the
    receipt of that number among them (a part payment's, asked for on the page), or None."""
    allocated = select(PaymentAllocation.payment_id).where(PaymentAllocation.invoice_id == invoice.id)
    query = (
        select(Payment)
        .where(
            or_(and_(Payment.invoice_id == invoice.id, Payment.scope != "all"), Payment.id.in_(allocated)),
            Payment.status == PaymentStatus.SUCCEEDED,
            Payment.currency == invoice.currency,
        )
        .order_by(Payment.succeeded_at.desc())
    )
    found = list(session.execute(query).scalars())
    if not found:
        return None
    if number is not None:
        numbered = next((p for p in found if p.receipt_number == number), None)
        if numbered is None:
            return None
        chosen = numbered
    else:
        chosen = next((p for p in found if paid_at is not None and p.succeeded_at == paid_at), found[0])
    splits: dict[uuid.UUID, list[tuple[str, int, uuid.UUID]]] = {}
    pay_all = [p.id for p in found if p.scope == "all"]
    if pay_all:
        rows = session.execute(
            select(PaymentAllocation.payment_id, Invoice.number, PaymentAllocation.amount, Invoice.id)
            .join(Invoice, Invoice.id == PaymentAllocation.invoice_id)
            .where(PaymentAllocation.payment_id.in_(pay_all))
            .order_by(Invoice.number)
        )
        for payment_id, number, amount, invoice_id in rows:
            splits.setdefault(payment_id, []).append((number, amount, invoice_id))

    def share_of(payment: Payment) -> int:
        if payment.scope != "all":
            return payment.amount
        return sum(amount for _, amount, inv in splits.get(payment.id, []) if inv == invoice.id)

    paid_until = sum(share_of(p) for p in found if p.succeeded_at and chosen.succeeded_at and p.succeeded_at <= chosen.succeeded_at)
    allocation = tuple((number, amount) for number, amount, _ in splits.get(chosen.id, []))
    return ReceiptFacts(
        chosen.receipt_number, chosen.succeeded_at, chosen.amount, chosen.currency, chosen.brand, chosen.last4,
        share=share_of(chosen), balance_after=max(invoice.amount_due - paid_until, 0), allocation=allocation,
    )  # fmt: skip


def _document(
    session: Session, link: PaymentLink | None, invoice: Invoice, customer: Customer, paid_at: datetime | None, number: str | None = None
) -> Document:
    lines = lines_of(invoice.line_items, description=invoice.description, amount_due=invoice.amount_due)
    receipt = _receipt_of(session, invoice, paid_at, number)
    return Document(invoice, customer, link, lines, totals(lines), invoice.created_at.date(), receipt)


def _link_document_sync(session: Session, link_id: uuid.UUID, receipt_number: str | None) -> Document | None:
    row = session.execute(link_with_invoice(link_id)).one_or_none()
    if row is None:
        return None
    link, invoice, customer = row
    return _document(session, link, invoice, customer, None, receipt_number)


def _invoice_document_sync(session: Session, invoice_id: uuid.UUID, paid_at: datetime | None) -> Document | None:
    row = session.execute(
        select(Invoice, Customer).join(Customer, Customer.id == Invoice.customer_id).where(Invoice.id == invoice_id)
    ).first()
    if row is None:
        return None
    return _document(session, None, row[0], row[1], paid_at)


async def link_document(session: AsyncSession, link_id: uuid.UUID, *, receipt_number: str | None = None) -> Document | None:
    """The link's invoice with its lines, totals and receipt (one read-only session): the latest
    payment's, or with `receipt_number` that receipt's if it is one of the invoice's (else none)."""
    return await session.run_sync(_link_document_sync, link_id, receipt_number)


async def invoice_document(session: AsyncSession, invoice_id: uuid.UUID, *, paid_at: datetime | None = None) -> Document | None:
    return await session.run_sync(_invoice_document_sync, invoice_id, paid_at)


# --- rendering ---------------------------------------------------------------------------------------------


def filename(kind: DocumentKind, document: Document, *, numbered: bool = False) -> str:
    """INV-000001.pdf, INV-000001-receipt.pdf (INV-000001-receipt-RCT-000002.pdf for one receipt of
    several, `numbered`): the numbers, made safe for a header."""
    safe = _UNSAFE_IN_NAME.sub("_", document.invoice.number) or "invoice"
    if kind == "invoice":
        return f"{safe}.pdf"
    if numbered and document.receipt is not None and document.receipt.number:
        return f"{safe}-receipt-{_UNSAFE_IN_NAME.sub('_', document.receipt.number)}.pdf"
    return f"{safe}-receipt.pdf"


_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9._-]")  # what a file name in Content-Disposition may not hold


def document_html(settings: Settings, kind: DocumentKind, document: Document, locale: str) -> str:
    logo = read_logo(settings.merchant_logo_path).data_uri if settings.merchant_logo_path else None
    return pages.render(
        f"documents/{kind}.html",
        locale,
        identity=brand_of(settings),
        logo=logo,
        doc=document,
        invoice=document.invoice,
        customer=document.customer,
        lines=document.lines,
        sums=document.sums,
        receipt=document.receipt,
        # css_string escapes every character but letters, digits and a few harmless ones (never < or >).
        footer_css=Markup(css_string(" · ".join((settings.merchant_name, *settings.merchant_address)))),  # noqa: S704
    )


def css_string(text: str) -> str:
    """A CSS string literal for `content:` inside a <style> element (no HTML escaping applies there)."""
    escaped = "".join(c if c.isalnum() or c in " .,·-_@()/&'+" else f"\\{ord(c):x} " for c in text)
    return f'"{escaped}"'


def _one_of_several(document: Document) -> bool:
    """Whether the receipt is of a payment that paid other than the whole invoice (a part, or a pay-all
    payment): one receipt of several, each attached under its own number (saved side by side, they
    would otherwise overwrite each other)."""
    receipt = document.receipt
    return receipt is not None and receipt.amount != document.invoice.amount_due


async def render_document(settings: Settings, kind: DocumentKind, document: Document, locale: str) -> bytes:
    """The PDF, rendered on the PDF thread pool (CPU-heavy: never on the event loop)."""
    return await render_pdf(document_html(settings, kind, document, locale))


def email_attachments(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> AttachmentHook:
    """The outbox's attachment hook: with INVOICE_PDF_ATTACH, the invoice email carries the invoice
    PDF and the receipt email the receipt PDF, in the email's language, rendered when it is sent."""

    async def attach(message: ClaimedMessage) -> list[Attachment]:
        if (
            not settings.invoice_pdf_attach
            or message.invoice_id is None
            or message.kind not in (Kind.INVOICE, Kind.COLLEAGUE_INVOICE, Kind.RECEIPT)
        ):
            return []
        payload = message.payload or {}
        paid_at = datetime.fromisoformat(payload["paid_at"]) if payload.get("paid_at") else None
        async with sessions() as session:
            document = await invoice_document(session, message.invoice_id, paid_at=paid_at)
        if document is None:
            return []
        kind: DocumentKind = "receipt" if message.kind == Kind.RECEIPT else "invoice"
        if kind == "receipt" and document.receipt is None:
            return []
        locale = payload.get("locale") or customer_locale(settings, document.customer)
        pdf = await render_document(settings, kind, document, locale)
        return [Attachment(filename(kind, document, numbered=_one_of_several(document)), PDF, pdf)]

    return attach
