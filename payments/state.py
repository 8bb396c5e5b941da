"""The money state machine: what Stripe says about a PaymentIntent or a charge, applied to our rows.

Plain synchronous database code (no network): async callers run it with `AsyncSession.run_sync`,
and the SQLite batch writer runs batches of it on one connection in a thread of its own. Its
rules: a succeeded payment never moves back; a paid invoice never moves back to open; every
transition a customer should hear about queues its email in the same transaction.

Part payments (issue 13): an invoice that allows them is `partially_paid` while 0 < paid < due; each
payment gets its own receipt number and receipt email ("paid X, balance Y"). Pay-all payments
(scope "all") carry one PaymentAllocation per invoice: success applies each allocation to its
invoice (under that invoice's row lock), failure or cancellation gives every invoice's live slot
back, and one receipt lists the allocation.

Refunds. Stripe reports a charge's refunded total (cumulative). A refund never changes what is owed:
amount_paid keeps what was received and amount_refunded what went back, so the balance of an invoice
still being paid (amount_due - amount_paid) stays what it was, and a paid invoice becomes
partially_refunded or refunded. A pay-all payment's refunded total is spread over its allocations
from the last invoice (by number) back to the first, each up to its amount, recomputed from the
total each time (so repeated or late events change nothing).
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session, contains_eager

from emails import outbox
from emails.messages import EmailContent, Kind, receipt_payload
from links.customers import customer_locale
from links.hooks import append_flag, paused_reason, queue_customer_email
from links.invoices import invoice_facts
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from payments.documents import give_receipt_number, number_later
from payments.gateway import IntentSnapshot
from payments.models import Payment, PaymentAllocation, PaymentStatus
from plumbing import audit
from plumbing.db import utcnow
from plumbing.i18n import N_, format_money
from plumbing.settings import Settings

log = logging.getLogger("paylink.payments")


def release_attempt(payment: Payment, status: str, message: str | None = None, code: str | None = None) -> None:
    """End an attempt: it no longer holds its invoice's live slot. A pay-all attempt's allocations hold
    slots too: the caller gives those back (`release_allocations`, or checkout's async twin)."""
    payment.status = status
    payment.live_invoice_id = None
    payment.failure_message = message
    payment.failure_code = code


def release_allocations(session: Session, payment: Payment) -> list[uuid.UUID]:
    """Give back every invoice slot a pay-all attempt held; returns the ids of the invoices whose slot it still held."""
    if payment.scope != "all":
        return []
    held = list(
        session.execute(
            select(PaymentAllocation.invoice_id).where(
                PaymentAllocation.payment_id == payment.id, PaymentAllocation.live_invoice_id.is_not(None)
            )
        ).scalars()
    )
    if held:
        session.execute(update(PaymentAllocation).where(PaymentAllocation.payment_id == payment.id).values(live_invoice_id=None))
    return held


def _allocations(session: Session, payment: Payment) -> list[PaymentAllocation]:
    """A pay-all payment's allocations with their invoices, the invoice rows locked in id order."""
    rows = list(session.execute(select(PaymentAllocation).where(PaymentAllocation.payment_id == payment.id)).scalars())
    ids = sorted({a.invoice_id for a in rows})
    if ids:
        session.execute(select(Invoice).where(Invoice.id.in_(ids)).order_by(Invoice.id).with_for_update()).scalars().all()
    return rows


def _invoices_by_number(session: Session, allocations: list[PaymentAllocation]) -> list[tuple[PaymentAllocation, Invoice]]:
    pairs = [(a, session.get_one(Invoice, a.invoice_id)) for a in allocations]
    return sorted(pairs, key=lambda pair: pair[1].number)


def open_status(invoice: Invoice) -> str:
    """What an unsettled invoice with nothing in flight is: partially paid (part payments allowed and
    some paid), else open."""
    if invoice.allow_partial and 0 < invoice.amount_paid < invoice.amount_due:
        return InvoiceStatus.PARTIALLY_PAID
    return InvoiceStatus.OPEN


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
            if invoice.status in InvoiceStatus.PAYABLE and payment.live_invoice_id == invoice.id:
                invoice.status = InvoiceStatus.PROCESSING
            if payment.scope == "all":
                for allocation in _allocations(session, payment):
                    other = session.get_one(Invoice, allocation.invoice_id)
                    if other.status in InvoiceStatus.PAYABLE and allocation.live_invoice_id == other.id:
                        other.status = InvoiceStatus.PROCESSING
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
        _reopen_allocated(session, payment)
    elif status == "canceled":
        was_live = payment.live_invoice_id == invoice.id
        if payment.status not in PaymentStatus.FINAL:
            release_attempt(payment, PaymentStatus.CANCELED, N_("The payment was canceled."))
        _reopen(session, invoice, was_live)
        _reopen_allocated(session, payment)
    return payment  # flushed by the caller's commit (or savepoint), so that batches flush once


def _reopen(session: Session, invoice: Invoice, was_live: bool) -> None:
    """A processing invoice is open again when the attempt that made it processing ended without
    paying it. Not for an older attempt's late news (e.g. an orphan intent `reconcile` canceled)
    while the current attempt is still processing."""
    if invoice.status != InvoiceStatus.PROCESSING:
        return
    if was_live or not has_live_attempt(session, invoice.id):
        invoice.status = open_status(invoice)


def has_live_attempt(session: Session, invoice_id: uuid.UUID) -> bool:
    """Whether an attempt holds the invoice's live slot: its own, or a pay-all attempt's allocation."""
    if session.execute(select(Payment.id).where(Payment.live_invoice_id == invoice_id)).first() is not None:
        return True
    return session.execute(select(PaymentAllocation.id).where(PaymentAllocation.live_invoice_id == invoice_id)).first() is not None


def _reopen_allocated(session: Session, payment: Payment) -> None:
    """A pay-all attempt that ended without paying: every invoice it held is free again (and open
    again if it was processing because of it)."""
    if payment.scope != "all":
        return
    _allocations(session, payment)  # lock the invoices first, in id order
    for invoice_id in release_allocations(session, payment):
        _reopen(session, session.get_one(Invoice, invoice_id), True)


PREFETCHED_PAYMENTS = "paylink.prefetched_payments"  # session.info key: intent id -> Payment
PREFETCHED_LINKS = "paylink.prefetched_links"  # session.info key: invoice id -> its newest own link (id, expires_at), or None


def newest_links(invoice_ids: Any) -> Select[uuid.UUID, uuid.UUID, datetime]:
    """The customer's own unrevoked links of these invoices, newest first per invoice (what a receipt links to)."""
    return (
        select(PaymentLink.invoice_id, PaymentLink.id, PaymentLink.expires_at)
        .where(PaymentLink.invoice_id.in_(invoice_ids), PaymentLink.revoked_at.is_(None), PaymentLink.recipient_email.is_(None))
        .order_by(PaymentLink.invoice_id, PaymentLink.expires_at.desc())
    )


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
        currency=snapshot.currency, scope=payment.scope,
    )  # fmt: skip
    if payment.scope == "all":
        _pay_all_succeeded(session, settings, payment, invoice, snapshot, actor=actor)
        return
    received = format_money(snapshot.amount, snapshot.currency)
    if snapshot.currency != invoice.currency:
        # Never added to an amount in another currency, never "paid": finance refunds it or settles by hand.
        _reopen(session, invoice, was_live)
        reason = f"payment {snapshot.id} of {received} is in {snapshot.currency.upper()}, not the invoice's {invoice.currency.upper()}"
        flag_invoice(session, settings, invoice, f"{reason}: not counted; refund it or settle by hand", actor)
        return
    if invoice.status not in InvoiceStatus.UNSETTLED:
        # Paid twice, or paid after it was voided: keep the money on record and tell finance.
        invoice.amount_paid += snapshot.amount
        flag_invoice(session, settings, invoice, f"payment {snapshot.id} received while the invoice was {invoice.status}", actor)
        return
    # The money counts: the payment gets its receipt's gap-free number in this transaction.
    give_receipt_number(session, payment)
    _count_towards(session, settings, invoice, snapshot.amount, f"payment {snapshot.id} of {received}", actor, was_live=was_live)
    if invoice.status != InvoiceStatus.REFUNDED:
        _queue_receipt(session, settings, invoice, payment, actor=actor)


def _count_towards(session: Session, settings: Settings, invoice: Invoice, amount: int, what: str, actor: str, *, was_live: bool) -> None:
    """Add `amount` to an unsettled invoice: paid when it covers what is due; otherwise partially paid
    (part payments allowed) or open and flagged as underpaid (not allowed: finance looks at it)."""
    invoice.amount_paid += amount
    short = invoice.amount_due - invoice.amount_paid
    if short > 0:
        _reopen(session, invoice, was_live)
        if invoice.status in InvoiceStatus.PAYABLE:
            invoice.status = open_status(invoice)
        if not invoice.allow_partial:
            # Underpaid: the invoice stays open for the rest (the next payment asks for what is still due).
            due = format_money(short, invoice.currency)
            flag_invoice(session, settings, invoice, f"underpaid by {due}: {what}; {due} still due", actor)
        return
    invoice.status = InvoiceStatus.PAID
    invoice.paid_at = utcnow()
    if invoice.amount_paid > invoice.amount_due:
        flag_invoice(session, settings, invoice, f"overpaid by {invoice.amount_paid - invoice.amount_due} (minor units)", actor)
    if invoice.amount_refunded > 0:  # the refund's event overtook the payment's
        set_refund_status(invoice)


def _pay_all_succeeded(
    session: Session, settings: Settings, payment: Payment, page_invoice: Invoice, snapshot: IntentSnapshot, *, actor: str
) -> None:
    """A pay-all payment arrived: each allocation goes to its invoice (in invoice-number order, each
    getting what it was allotted), every slot is given back, and one receipt lists the allocation."""
    pairs = _invoices_by_number(session, _allocations(session, payment))
    release_allocations(session, payment)
    received = format_money(snapshot.amount, snapshot.currency)
    if snapshot.currency != page_invoice.currency:
        reason = f"pay-all payment {snapshot.id} of {received} is in {snapshot.currency.upper()}, not {page_invoice.currency.upper()}"
        for _, invoice in pairs:
            _reopen(session, invoice, True)
        flag_invoice(session, settings, page_invoice, f"{reason}: not counted; refund it or settle by hand", actor)
        return
    give_receipt_number(session, payment)
    planned = sum(allocation.amount for allocation, _ in pairs)
    if snapshot.amount != planned:
        # Never expected (we asked Stripe for the total); if it happens, invoices are served in order.
        flag_invoice(
            session, settings, page_invoice, f"pay-all payment {snapshot.id} of {received} differs from its allocation ({planned})", actor
        )
    remaining = snapshot.amount
    for index, (allocation, invoice) in enumerate(pairs):
        share = min(allocation.amount, remaining) if index < len(pairs) - 1 else remaining
        remaining -= share
        allocation.amount = share  # what it really got
        what = f"pay-all payment {snapshot.id}, {format_money(share, invoice.currency)} of {received}"
        if invoice.status not in InvoiceStatus.UNSETTLED:
            invoice.amount_paid += share
            flag_invoice(session, settings, invoice, f"{what} received while the invoice was {invoice.status}", actor)
            continue
        _count_towards(session, settings, invoice, share, what, actor, was_live=True)
    _queue_receipt(session, settings, page_invoice, payment, actor=actor, allocation=[(inv.number, a.amount, inv) for a, inv in pairs])


def flag_invoice(session: Session, settings: Settings, invoice: Invoice, reason: str, actor: str) -> None:
    """Add a reason for finance to look at the invoice (kept beside earlier ones) and alert finance."""
    append_flag(invoice, reason)
    audit.record(session, actor, "invoice.flagged", f"invoice:{invoice.number}", reason=reason)
    outbox.alert_finance(session, settings, f"Invoice {invoice.number} needs attention", [reason], invoice_id=invoice.id)


def _queue_receipt(
    session: Session,
    settings: Settings,
    invoice: Invoice,
    payment: Payment,
    *,
    actor: str,
    allocation: list[tuple[str, int, Invoice]] | None = None,
) -> None:
    """Queue the receipt of one payment, rendered when it is sent: what it paid, and the balance still
    due (a part payment), or for a pay-all payment which invoice got what. Held while the customer's
    address is paused: the invoice is paid all the same, and its flag tells finance that no receipt went out."""
    customer = session.get_one(Customer, invoice.customer_id)
    # The receipt email links to the online receipt: the invoice's newest link shows it once paid.
    prefetched = session.info.get(PREFETCHED_LINKS, {})
    newest = (
        prefetched[invoice.id]
        if invoice.id in prefetched
        else session.execute(
            select(PaymentLink.id, PaymentLink.expires_at)
            # Never a colleague's link (issue 13): the customer's receipt carries the customer's own link.
            .where(PaymentLink.invoice_id == invoice.id, PaymentLink.revoked_at.is_(None), PaymentLink.recipient_email.is_(None))
            .order_by(PaymentLink.expires_at.desc())
            .limit(1)
        ).first()
    )
    subject, payload = receipt_payload(
        invoice_facts(settings, invoice, customer),
        amount_paid=payment.amount,
        brand=payment.brand,
        last4=payment.last4,
        paid_at=payment.succeeded_at or utcnow(),
        locale=customer_locale(settings, customer),
        link=(newest[0], newest[1]) if newest else None,
        balance=max(invoice.amount_due - invoice.amount_paid, 0) if allocation is None else None,
        receipt_number=payment.receipt_number,
        allocation=[(number, amount, max(inv.amount_due - inv.amount_paid, 0)) for number, amount, inv in allocation or ()],
    )
    if payment.receipt_number is None:
        number_later(session, payment, payload)  # a batch numbers its receipts just before its commit
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
    if payment.scope == "all":
        pairs = _invoices_by_number(session, _allocations(session, payment))
        spread_refund(payment.amount_refunded, [allocation for allocation, _ in pairs])
        invoices = [invoice for _, invoice in pairs]
    else:
        invoices = [session.get_one(Invoice, payment.invoice_id, with_for_update=True)]
    session.flush()  # the sums below must see this payment's new refund
    for invoice in invoices:
        refunded = refunded_on(session, invoice)
        invoice.amount_refunded = refunded
        if invoice.status in (InvoiceStatus.PAID, InvoiceStatus.PARTIALLY_REFUNDED, InvoiceStatus.REFUNDED):
            set_refund_status(invoice)
        audit.record(
            session, actor, "payment.refunded", f"invoice:{invoice.number}", refunded=refunded, intent=payment.stripe_payment_intent_id
        )


def spread_refund(total: int, allocations: list[PaymentAllocation]) -> None:
    """Spread a pay-all payment's refunded total over its allocations (given in invoice-number order):
    the last invoice first, each up to what it got. Recomputed from the total, so idempotent."""
    left = total
    for allocation in reversed(allocations):
        allocation.amount_refunded = min(allocation.amount, left)
        left -= allocation.amount_refunded


def refunded_on(session: Session, invoice: Invoice) -> int:
    """What was refunded of money that counted towards the invoice: its own payments in its currency
    (a payment in another currency never counted) and its share of pay-all payments."""
    own = select(Payment.amount_refunded).where(
        Payment.invoice_id == invoice.id, Payment.currency == invoice.currency, Payment.scope != "all"
    )
    shares = (
        select(PaymentAllocation.amount_refunded)
        .join(Payment, Payment.id == PaymentAllocation.payment_id)
        .where(PaymentAllocation.invoice_id == invoice.id, Payment.currency == invoice.currency, Payment.status == PaymentStatus.SUCCEEDED)
    )
    return sum(session.execute(own).scalars()) + sum(session.execute(shares).scalars())


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
