"""Customers, invoices and the payment links that point at them."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from enum import StrEnum
from typing import ClassVar

from sqlalchemy import JSON, CheckConstraint, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from plumbing.db import Base, new_id, utcnow


class InvoiceStatus(StrEnum):
    OPEN = "open"
    PARTIALLY_PAID = "partially_paid"  # part payments allowed and some paid: the balance is still payable
    PROCESSING = "processing"  # a payment is on its way (bank transfer, slow card network)
    PAID = "paid"
    VOID = "void"
    REFUNDED = "refunded"
    PARTIALLY_REFUNDED = "partially_refunded"

    # Named groups (assigned below the class: an enum's body may only hold its members).
    PAYABLE: ClassVar[tuple[InvoiceStatus, ...]]
    HAS_RECEIPT: ClassVar[tuple[InvoiceStatus, ...]]
    UNSETTLED: ClassVar[tuple[InvoiceStatus, ...]]


InvoiceStatus.PAYABLE = (InvoiceStatus.OPEN, InvoiceStatus.PARTIALLY_PAID)
InvoiceStatus.HAS_RECEIPT = (InvoiceStatus.PAID, InvoiceStatus.REFUNDED, InvoiceStatus.PARTIALLY_REFUNDED)
InvoiceStatus.UNSETTLED = (InvoiceStatus.OPEN, InvoiceStatus.PARTIALLY_PAID, InvoiceStatus.PROCESSING)  # its money state may still change


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(320), unique=True)  # normalized: trimmed, lower-case
    name: Mapped[str] = mapped_column(String(200))
    email_verified_at: Mapped[datetime | None]
    email_verified_by: Mapped[str | None] = mapped_column(String(200))
    # Names the current verification request; a new request (or an email change) replaces it, so an
    # older verification link can never verify a newer address.
    email_verification_id: Mapped[uuid.UUID | None] = mapped_column(unique=True)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    locale: Mapped[str | None] = mapped_column(String(16))
    # Set when mail to this address failed permanently; sends to it pause until the address changes.
    email_undeliverable_at: Mapped[datetime | None]
    email_undeliverable_reason: Mapped[str | None] = mapped_column(Text)
    address_line1: Mapped[str | None] = mapped_column(String(200))
    address_line2: Mapped[str | None] = mapped_column(String(200))
    postal_code: Mapped[str | None] = mapped_column(String(32))
    city: Mapped[str | None] = mapped_column(String(100))
    country: Mapped[str | None] = mapped_column(String(2))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The import that created this customer (see ImportBatch); None for customers added otherwise.
    import_batch_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    # When the saved card marked default was last decided, in whole seconds: by the customer on the page, by
    # a fresh read of Stripe, or by a customer.updated event's `created`. An event dated before it is a
    # late delivery and does not undo it (payments/cards.apply_customer_event).
    default_card_at: Mapped[datetime | None]

    @property
    def is_verified(self) -> bool:
        return self.email_verified_at is not None

    @property
    def address_lines(self) -> list[str]:
        city_line = " ".join(p for p in (self.postal_code, self.city) if p)
        return [p for p in (self.address_line1, self.address_line2, city_line, self.country) if p]


class Invoice(Base):
    __tablename__ = "invoices"
    __table_args__ = (
        CheckConstraint("amount_due > 0", name="amount_due_positive"),
        Index("ix_invoices_customer_id", "customer_id"),
        Index("ix_invoices_status", "status"),
        Index("ix_invoices_import_batch_id", "import_batch_id"),
        Index("ix_invoices_due_date", "due_date"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    number: Mapped[str] = mapped_column(String(64), unique=True)  # given, or the next of NumberSequence "invoice"
    customer_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("customers.id"))
    currency: Mapped[str] = mapped_column(String(3))  # ISO 4217, lower-case as Stripe wants it
    amount_due: Mapped[int]  # minor units
    amount_paid: Mapped[int] = mapped_column(default=0)
    amount_refunded: Mapped[int] = mapped_column(default=0)
    description: Mapped[str] = mapped_column(Text)
    # One dict per line (links.lines.LineItem.to_json); None on invoices made before line items
    # existed (links.lines.lines_of reads those as one untaxed line). amount_due is their total.
    line_items: Mapped[list[dict[str, object]] | None] = mapped_column(JSON)
    notes: Mapped[str | None] = mapped_column(Text)  # shown to the customer (emails, page, PDF)
    due_date: Mapped[date | None]
    status: Mapped[str] = mapped_column(String(24), default=InvoiceStatus.OPEN)
    needs_attention: Mapped[str | None] = mapped_column(Text)  # why finance must look at it
    void_reason: Mapped[str | None] = mapped_column(Text)  # `invoice void --reason`: for finance, never shown to the customer
    # Part payments (issue 13): off unless allowed per invoice (or by PARTIAL_PAYMENTS_DEFAULT when it
    # was created). A part payment is at least min_partial_amount (minor units) or min_partial_percent
    # of amount_due; deposit_percent asks that much of amount_due first. Whole percents.
    allow_partial: Mapped[bool] = mapped_column(default=False, server_default="0")
    min_partial_amount: Mapped[int | None]
    min_partial_percent: Mapped[int | None]
    deposit_percent: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    paid_at: Mapped[datetime | None]
    # For a CSV row imported without a number: derived from the row's contents (IMP-…), so that
    # importing the same file again finds the invoice instead of creating it twice.
    import_key: Mapped[str | None] = mapped_column(String(32), unique=True)
    # The import that created this invoice (see ImportBatch); None for invoices created otherwise.
    import_batch_id: Mapped[uuid.UUID | None]

    # Loaded only on purpose (contains_eager / joins): an accidental lazy load raises.
    customer: Mapped[Customer] = relationship(lazy="raise")


class PaymentLink(Base):
    __tablename__ = "payment_links"
    __table_args__ = (Index("ix_payment_links_invoice_id", "invoice_id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)  # the UUID in the URL
    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id"))
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    sent_at: Mapped[datetime | None]
    first_opened_at: Mapped[datetime | None]
    last_opened_at: Mapped[datetime | None]
    open_count: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A link for someone other than the customer (issue 13, "send to a colleague"): the address it
    # went to. Such a link never shows or charges the customer's saved cards and shows no other
    # invoice; its payer gets a Stripe customer of their own (stripe_customer_id).
    recipient_email: Mapped[str | None] = mapped_column(String(320))
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255))
    created_by: Mapped[str | None] = mapped_column(String(200))  # the actor that issued it (audit)

    # Written on every open (links/opens.py), shown on no page: the pay page's cache leaves them out of
    # its keys, so that a link opened often stays cached (views/page_cache.py).
    OPEN_COUNTERS: ClassVar[frozenset[str]] = frozenset({"open_count", "first_opened_at", "last_opened_at"})


class LinkOpen(Base):
    """The access log behind the usage report (no token, no IP address): a link's opens within one minute,
    as one worker's flush wrote them (links/opens.py): at most one row per link, worker and second, however
    often the page is reloaded."""

    __tablename__ = "link_opens"
    __table_args__ = (Index("ix_link_opens_opened_at", "opened_at"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    link_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("payment_links.id"))
    opened_at: Mapped[datetime]  # the first of them
    opens: Mapped[int] = mapped_column(default=1, server_default="1")  # how many


class LinkRequest(Base):
    """A customer asked for a fresh link from an expired one; kept for the rate limit."""

    __tablename__ = "link_requests"
    __table_args__ = (
        Index("ix_link_requests_invoice", "invoice_id", "requested_at"),
        Index("ix_link_requests_customer", "customer_id", "requested_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id"))
    customer_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("customers.id"))
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent: Mapped[bool] = mapped_column(default=False)


class ReminderSent(Base):
    """One row per invoice and reminder point: the unique key makes `remind` safe to re-run."""

    __tablename__ = "reminders_sent"
    __table_args__ = (UniqueConstraint("invoice_id", "point"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id"))
    point: Mapped[str] = mapped_column(String(64))  # e.g. "due-3d", "link-expiry:<link id>"
    sent_at: Mapped[datetime] = mapped_column(default=utcnow)


class NumberSequence(Base):
    """Human, gap-free numbers (INV-000042): one row per sequence, bumped with UPDATE … RETURNING in
    the transaction that uses the number. The row lock serialises creators (PostgreSQL; SQLite
    writers are serialised already), and a creator that rolls back gives its number back."""

    __tablename__ = "number_sequences"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)  # "invoice"
    last_value: Mapped[int]  # the last number handed out


class ImportStatus(StrEnum):
    WRITING = "writing"  # chunks are being written; its emails are held
    DONE = "done"  # every row written, emails released
    ABORTED = "aborted"  # failed; what its chunks wrote was deleted again


class ImportBatch(Base):
    """One `import` run. Its rows are written in short transactions (chunks) and carry its id, so
    that a failed run can be undone, and its emails are held until the whole file is written."""

    __tablename__ = "import_batches"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    status: Mapped[str] = mapped_column(String(16), default=ImportStatus.WRITING)
    actor: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(500))  # the file name, for the audit trail
    rows: Mapped[int] = mapped_column(default=0)
    # Invoice numbers the run took from the sequence (first and last), to give back if it fails.
    first_number: Mapped[int | None]
    last_number: Mapped[int | None]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)  # every chunk; a stale one is undone
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
