"""Payments (one per PaymentIntent attempt), saved payment profiles, received webhook events, and the
counters of the brakes against card testing (payments/brakes.py)."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import ClassVar

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from links.models import Invoice
from plumbing.db import Base, new_id, utcnow


class PaymentStatus(StrEnum):
    CREATED = "created"  # attempt claimed in our database, no PaymentIntent yet
    REQUIRES_CONFIRMATION = "requires_confirmation"  # PaymentIntent created, not yet confirmed
    REQUIRES_ACTION = "requires_action"  # 3-D Secure in progress
    PROCESSING = "processing"
    PENDING = "pending"  # we could not hear Stripe's answer; webhook or reconcile will tell
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    # Named groups (assigned below the class: an enum's body may only hold its members).
    FINAL: ClassVar[tuple[PaymentStatus, ...]]
    LIVE: ClassVar[tuple[PaymentStatus, ...]]
    IN_FLIGHT: ClassVar[tuple[PaymentStatus, ...]]


PaymentStatus.FINAL = (PaymentStatus.SUCCEEDED, PaymentStatus.FAILED, PaymentStatus.CANCELED)
# An attempt that holds the invoice's one live slot.
PaymentStatus.LIVE = (
    PaymentStatus.CREATED,
    PaymentStatus.REQUIRES_CONFIRMATION,
    PaymentStatus.REQUIRES_ACTION,
    PaymentStatus.PROCESSING,
    PaymentStatus.PENDING,
)
# Money may be moving and nothing is asked of the customer: the page says "we are confirming".
PaymentStatus.IN_FLIGHT = (
    PaymentStatus.CREATED,
    PaymentStatus.REQUIRES_CONFIRMATION,
    PaymentStatus.PROCESSING,
    PaymentStatus.PENDING,
)


class Payment(Base):
    __tablename__ = "payments"
    __table_args__ = (Index("ix_payments_invoice_id", "invoice_id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id"))
    # Set to invoice_id while the attempt is live and cleared when it ends: the unique constraint
    # allows one live attempt per invoice (NULLs never collide), so a double submit finds it.
    live_invoice_id: Mapped[uuid.UUID | None] = mapped_column(unique=True)
    stripe_payment_intent_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    stripe_payment_method_id: Mapped[str | None] = mapped_column(String(255))
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    amount: Mapped[int]
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(32), default=PaymentStatus.CREATED)
    brand: Mapped[str | None] = mapped_column(String(32))
    last4: Mapped[str | None] = mapped_column(String(4))
    failure_code: Mapped[str | None] = mapped_column(String(64))
    failure_message: Mapped[str | None] = mapped_column(Text)
    amount_refunded: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    succeeded_at: Mapped[datetime | None]
    # The receipt's number (RCT-000042, payments/documents.py): gap-free, given in the transaction that
    # marks the payment succeeded, when the money counts towards the invoice.
    receipt_number: Mapped[str | None] = mapped_column(String(32), unique=True)
    # "invoice" (pays invoice_id) or "all" (pays several invoices of the customer at once: see
    # PaymentAllocation; invoice_id is then the invoice whose page started it).
    scope: Mapped[str] = mapped_column(String(16), default="invoice", server_default="invoice")
    link_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("payment_links.id"))  # the link that paid

    # Loaded only on purpose (contains_eager): an accidental lazy load raises.
    invoice: Mapped[Invoice] = relationship(lazy="raise")


class PaymentAllocation(Base):
    """Which invoice got what of a payment that paid several (scope "all"). While the payment is
    live, live_invoice_id holds the invoice's live slot (unique, as Payment.live_invoice_id does for
    one invoice), so no other attempt can claim an invoice a pay-all attempt is paying."""

    __tablename__ = "payment_allocations"
    __table_args__ = (Index("ix_payment_allocations_payment_id", "payment_id"), Index("ix_payment_allocations_invoice_id", "invoice_id"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    payment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("payments.id"))
    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id"))
    amount: Mapped[int]  # minor units, in the payment's currency
    amount_refunded: Mapped[int] = mapped_column(default=0)
    live_invoice_id: Mapped[uuid.UUID | None] = mapped_column(unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PaymentProfile(Base):
    __tablename__ = "payment_profiles"
    __table_args__ = (Index("ix_payment_profiles_customer_id", "customer_id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    customer_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("customers.id"))
    stripe_payment_method_id: Mapped[str] = mapped_column(String(255), unique=True)
    brand: Mapped[str] = mapped_column(String(32))
    last4: Mapped[str] = mapped_column(String(4))
    exp_month: Mapped[int | None]
    exp_year: Mapped[int | None]
    is_default: Mapped[bool] = mapped_column(default=False)
    # False for a card entered for one payment without "save this card": it is not offered again,
    # and it is detached at Stripe once that payment is over.
    reusable: Mapped[bool] = mapped_column(default=True, server_default="1")
    # Stripe's card fingerprint: the same card number entered twice has the same one (de-duplication).
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookEvent(Base):
    __tablename__ = "webhook_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # Stripe's event id
    type: Mapped[str] = mapped_column(String(100))
    stripe_created: Mapped[int | None]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    processed_at: Mapped[datetime | None]


class BrakeHit(Base):
    """One counted event under a brake's key (a SetupIntent created, a pay attempt that may fail, a
    POST), kept while it can still count: each key's rows older than its window are deleted when
    the key counts again, and every row older than a day by `brakes.purge`."""

    __tablename__ = "brake_hits"
    __table_args__ = (Index("ix_brake_hits_key_at", "key", "at"), Index("ix_brake_hits_at", "at"))

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(100))  # e.g. "setup_intents:link:<hex>", "posts:client:<keyed hash>"
    at: Mapped[datetime] = mapped_column(default=utcnow)


class BrakeTrip(Base):
    """A brake refused a request: one row per key and alert window, so finance is alerted once."""

    __tablename__ = "brake_trips"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(primary_key=True)
    tripped_at: Mapped[datetime] = mapped_column(default=utcnow)
