"""The money state machine: what Stripe says about a PaymentIntent or a charge, applied to our rows.

Plain synchronous database code (no network): async callers run it with `AsyncSession.run_sync`,
and the SQLite batch writer runs batches of it on one connection in a thread of its own. Its
rules: a succeeded payment never moves back; a paid invoice never moves back to open; every
transition a customer should hear about queues its email in the same transaction.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, contains_eager

from emails import outbox
from emails.messages import EmailContent, Kind, receipt_payload
from links.customers import customer_locale
from links.hooks import append_flag, paused_reason, queue_customer_email
from links.invoices import invoice_facts
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from payments.documents import next_receipt_number
from payments.gateway import IntentSnapshot
from payments.models import Payment, PaymentStatus
from plumbing import audit
from plumbing.db import utcnow
from plumbing.i18n import N_, format_money
from plumbing.settings import Settings

log = logging.getLogger("paylink.payments")


def release_attempt(payment: Payment, status: str, message: str | None = None, code: str | None = None) -> None:
    payment.status = status
    payment.live_invoice_id = None
    payment.failure_message = message
    payment.failure_code = code


def apply_intent(session: Session, settings: Settings, snapshot: IntentSnapshot, *, actor: str) -> Payment | None:
    """Apply what Stripe says about a PaymentIntent. Idempotent; order of arrival does not matter."""
    payment = _payment_for_intent(session, snapshot)
    if payment is None:
        return None
    # Payment, invoice and customer were read and locked together (PostgreSQL; SQLite writers are
    # serialised already), so the pay POST and a webhook applying the same success at the same
    # moment queue one behind the other. This finds the invoice in the session, without a query.
    invoice = session.get_one(Invoice, payment.invoice_id)
    status = snapshot.status
    if payment.status == PaymentStatus.SUCCEEDED:
        return payment  # money that arrived never un-arrives; late failures are ignored
    if status == "succeeded":
        _payment_succeeded(session, settings, payment, invoice, snapshot, actor=actor)
    elif status == "processing":
        if payment.status not in PaymentStatus.FINAL:
            payment.status = PaymentStatus.PROCESSING
            if invoice.status == InvoiceStatus.OPEN and payment.live_invoice_id == invoice.id:
                invoice.status = InvoiceStatus.PROCESSING
    elif status == "requires_action":
        if payment.status not in PaymentStatus.FINAL:
            payment.status = PaymentStatus.REQUIRES_ACTION
    elif status == "requires_payment_method" and (snapshot.error_message or snapshot.error_code or payment.status != PaymentStatus.CREATED):
        was_live = payment.live_invoice_id == invoice.id
        if payment.status not in PaymentStatus.FINAL:
            release_attempt(
                payment, PaymentStatus.FAILED, snapshot.error_message or N_("The payment was not completed."), snapshot.error_code
            )
            audit.record(session, actor, "payment.failed", f"invoice:{invoice.number}", payment=str(payment.id), code=snapshot.error_code)
        _reopen(session, invoice, was_live)
    elif status == "canceled":
        was_live = payment.live_invoice_id == invoice.id
        if payment.status not in PaymentStatus.FINAL:
            release_attempt(payment, PaymentStatus.CANCELED, N_("The payment was canceled."))
        _reopen(session, invoice, was_live)
    return payment  # flushed by the caller's commit (or savepoint), so that batches flush once


def _reopen(session: Session, invoice: Invoice, was_live: bool) -> None:
    """A processing invoice is open again when the attempt that made it processing ended without
    paying it. Not for an older attempt's late news (e.g. an orphan intent `reconcile` canceled)
    while the current attempt is still processing."""
    if invoice.status != InvoiceStatus.PROCESSING:
        return
    if was_live or session.execute(select(Payment.id).where(Payment.live_invoice_id == invoice.id)).first() is None:
        invoice.status = InvoiceStatus.OPEN


PREFETCHED_PAYMENTS = "paylink.prefetched_payments"  # session.info key: intent id -> Payment


def payments_with_invoice(condition: Any) -> Select[Payment]:
    # contains_eager keeps the invoice and customer referenced from the payment, so that later
    # look-ups by primary key find them in the session instead of querying again.
    return (
        select(Payment)
        .join(Payment.invoice)
        .join(Invoice.customer)
        .options(contains_eager(Payment.invoice).contains_eager(Invoice.customer))
        .where(condition)
        .with_for_update()
    )


def _locked_payment(session: Session, condition: Any) -> Payment | None:
    """The payment with its invoice and customer, in one query, rows locked until commit."""
    return session.execute(payments_with_invoice(condition)).scalar_one_or_none()


def _payment_for_intent(session: Session, snapshot: IntentSnapshot) -> Payment | None:
    payment = payment_by_intent_id(session, snapshot.id)
    if payment is not None:
        return payment
    # The process may have died before committing the intent id: find the attempt by its metadata.
    payment_id = _uuid(snapshot.metadata.get("payment_id"))
    if payment_id is not None:
        payment = _locked_payment(session, Payment.id == payment_id)
        if payment is not None and payment.stripe_payment_intent_id is None:
            payment.stripe_payment_intent_id = snapshot.id
            _remember(session, payment)
            return payment
    invoice_id = _uuid(snapshot.metadata.get("invoice_id"))
    if invoice_id is None or session.get(Invoice, invoice_id, with_for_update=True) is None:
        return None  # not ours
    # A payment for one of our invoices that we did not start (or whose row is gone): record it.
    payment = Payment(
        invoice_id=invoice_id,
        stripe_payment_intent_id=snapshot.id,
        stripe_payment_method_id=snapshot.payment_method_id,
        idempotency_key=f"external-{snapshot.id}",
        amount=snapshot.amount,
        currency=snapshot.currency,
        status=PaymentStatus.PROCESSING,
    )
    session.add(payment)
    session.flush()
    _remember(session, payment)
    return payment


def _remember(session: Session, payment: Payment) -> None:
    """A batch finds by intent id a payment it just linked to one (its refund may follow)."""
    prefetched = session.info.get(PREFETCHED_PAYMENTS)
    if prefetched is not None and payment.stripe_payment_intent_id:
        prefetched[payment.stripe_payment_intent_id] = payment


def _uuid(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None


def _payment_succeeded(
    session: Session, settings: Settings, payment: Payment, invoice: Invoice, snapshot: IntentSnapshot, *, actor: str
) -> None:
    """Money arrived. It is always recorded on the payment; it counts towards the invoice only in
    the invoice's currency, and the invoice is paid only when what was paid covers what is due."""
    now = utcnow()
    was_live = payment.live_invoice_id == invoice.id
    payment.status = PaymentStatus.SUCCEEDED
    payment.live_invoice_id = None
    payment.succeeded_at = now
    payment.failure_code = payment.failure_message = None
    payment.amount = snapshot.amount
    if len(snapshot.currency) == 3:  # what Stripe says was charged (an ISO code, as every Stripe currency is)
        payment.currency = snapshot.currency
    subject = f"invoice:{invoice.number}"
    audit.record(
        session, actor, "payment.succeeded", subject, payment=str(payment.id), intent=snapshot.id, amount=snapshot.amount,
        currency=snapshot.currency,
    )  # fmt: skip
    received = format_money(snapshot.amount, snapshot.currency)
    if snapshot.currency != invoice.currency:
        # Never added to an amount in another currency, never "paid": finance refunds it or settles by hand.
        _reopen(session, invoice, was_live)
        reason = f"payment {snapshot.id} of {received} is in {snapshot.currency.upper()}, not the invoice's {invoice.currency.upper()}"
        flag_invoice(session, settings, invoice, f"{reason}: not counted; refund it or settle by hand", actor)
        return
    invoice.amount_paid += snapshot.amount
    if invoice.status in InvoiceStatus.UNSETTLED:
        # The money counts: the payment gets its receipt's gap-free number in this transaction.
        payment.receipt_number = payment.receipt_number or next_receipt_number(session)
        short = invoice.amount_due - invoice.amount_paid
        if short > 0:
            # Underpaid: the invoice stays open for the rest (the next payment asks for what is still due).
            _reopen(session, invoice, was_live)
            due = format_money(short, invoice.currency)
            flag_invoice(session, settings, invoice, f"underpaid by {due}: payment {snapshot.id} of {received}; {due} still due", actor)
            _queue_receipt(session, settings, invoice, payment, actor=actor)
            return
        invoice.status = InvoiceStatus.PAID
        invoice.paid_at = now
        if invoice.amount_paid > invoice.amount_due:
            flag_invoice(session, settings, invoice, f"overpaid by {invoice.amount_paid - invoice.amount_due} (minor units)", actor)
        if invoice.amount_refunded > 0:  # the refund's event overtook the payment's
            set_refund_status(invoice)
        if invoice.status != InvoiceStatus.REFUNDED:
            _queue_receipt(session, settings, invoice, payment, actor=actor)
    else:
        # Paid twice, or paid after it was voided: keep the money on record and tell finance.
        flag_invoice(session, settings, invoice, f"payment {snapshot.id} received while the invoice was {invoice.status}", actor)


def flag_invoice(session: Session, settings: Settings, invoice: Invoice, reason: str, actor: str) -> None:
    """Add a reason for finance to look at the invoice (kept beside earlier ones) and alert finance."""
    append_flag(invoice, reason)
    audit.record(session, actor, "invoice.flagged", f"invoice:{invoice.number}", reason=reason)
    outbox.alert_finance(session, settings, f"Invoice {invoice.number} needs attention", [reason], invoice_id=invoice.id)


def _queue_receipt(session: Session, settings: Settings, invoice: Invoice, payment: Payment, *, actor: str) -> None:
    """Queue the receipt, rendered when it is sent. Held while the customer's address is paused: the
    invoice is paid all the same, and its flag tells finance that no receipt went out."""
    customer = session.get_one(Customer, invoice.customer_id)
    # The receipt email links to the online receipt: the invoice's newest link shows it once paid.
    newest = session.execute(
        select(PaymentLink.id, PaymentLink.expires_at)
        .where(PaymentLink.invoice_id == invoice.id, PaymentLink.revoked_at.is_(None))
        .order_by(PaymentLink.expires_at.desc())
        .limit(1)
    ).first()
    subject, payload = receipt_payload(
        invoice_facts(settings, invoice, customer),
        amount_paid=payment.amount,
        brand=payment.brand,
        last4=payment.last4,
        paid_at=payment.succeeded_at or utcnow(),
        locale=customer_locale(settings, customer),
        link=(newest[0], newest[1]) if newest else None,
    )
    content = EmailContent(Kind.RECEIPT, subject, "", "")
    if not queue_customer_email(session, settings, customer, content, actor=actor, payload=payload, invoice_id=invoice.id):
        append_flag(invoice, f"receipt not sent to {customer.email}: {paused_reason(customer)}")


def payment_by_intent_id(session: Session, intent_id: Any) -> Payment | None:
    if not isinstance(intent_id, str):
        return None
    prefetched = session.info.get(PREFETCHED_PAYMENTS, {}).get(intent_id)
    if prefetched is not None:
        return prefetched  # type: ignore[no-any-return]
    return _locked_payment(session, Payment.stripe_payment_intent_id == intent_id)


def apply_refund(session: Session, settings: Settings, charge: dict[str, Any], actor: str) -> None:
    payment = payment_by_intent_id(session, charge.get("payment_intent"))
    if payment is None:
        log.warning("refund.unknown_payment intent=%s charge=%s", charge.get("payment_intent"), charge.get("id"))
        return
    # Stripe's amount_refunded is cumulative: keep the largest seen, so late or repeated events are harmless.
    payment.amount_refunded = max(payment.amount_refunded, int(charge.get("amount_refunded") or 0))
    invoice = session.get_one(Invoice, payment.invoice_id, with_for_update=True)
    session.flush()  # the sum below must see this payment's new refund
    # Only refunds of money that counted towards the invoice: a payment in another currency never did.
    same_currency = select(Payment.amount_refunded).where(Payment.invoice_id == invoice.id, Payment.currency == invoice.currency)
    refunded = sum(session.execute(same_currency).scalars())
    invoice.amount_refunded = refunded
    if invoice.status in (InvoiceStatus.PAID, InvoiceStatus.PARTIALLY_REFUNDED, InvoiceStatus.REFUNDED):
        set_refund_status(invoice)
    audit.record(
        session, actor, "payment.refunded", f"invoice:{invoice.number}", refunded=refunded, intent=payment.stripe_payment_intent_id
    )


def set_refund_status(invoice: Invoice) -> None:
    if invoice.amount_refunded > 0:
        invoice.status = InvoiceStatus.REFUNDED if invoice.amount_refunded >= invoice.amount_paid else InvoiceStatus.PARTIALLY_REFUNDED


def apply_dispute(session: Session, settings: Settings, dispute: dict[str, Any], actor: str) -> None:
    payment = payment_by_intent_id(session, dispute.get("payment_intent"))
    if payment is None:
        return
    invoice = session.get_one(Invoice, payment.invoice_id)
    reason = (
        f"disputed: {dispute.get('reason') or 'no reason given'} ({dispute.get('amount')} {dispute.get('currency') or invoice.currency})"
    )
    flag_invoice(session, settings, invoice, reason, actor)
