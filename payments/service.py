"""Money state: pay with a saved profile, apply what Stripe says, keep saved profiles in sync.

One state machine (`apply_intent`) serves the pay POST, the webhooks and reconcile alike. It is plain
synchronous database code (no network): async callers run it with `AsyncSession.run_sync`, and the
webhook writer runs batches of it on one SQLite connection in a thread of its own. Its rules:
a succeeded payment never moves back; a paid invoice never moves back to open; every transition
that a customer should hear about queues its email in the same transaction.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, contains_eager

import audit
from db import utcnow
from emails import outbox
from emails.messages import Kind, receipt_payload
from i18n import N_
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from links.service import customer_locale, invoice_facts, link_with_invoice
from payments.gateway import CardDeclined, CardSummary, GatewayError, GatewayUnavailable, IntentSnapshot, StripeGateway, intent_snapshot
from payments.models import Payment, PaymentProfile, PaymentStatus, WebhookEvent
from settings import Settings

log = logging.getLogger("paylink.payments")

# A claimed attempt that never got a PaymentIntent id (the process died, or Stripe never answered
# the create) cannot have charged anyone: it is released after this long so the customer can retry.
STALE_CLAIM = timedelta(minutes=2)
# A 3-D Secure check left unfinished this long (the browser was closed) is canceled and released,
# so that the customer can pay again, with this card or another.
ABANDONED_AUTHENTICATION = timedelta(minutes=15)


NOT_SET_UP = N_("Card payments are not set up for this customer yet.")
NEW_CARD_NOT_CONFIRMED = N_("The new card was not confirmed. Please enter it again.")
GATEWAY_DOWN = N_("We could not reach the payment processor. Nothing was charged; please try again in a moment.")
NOT_COMPLETED = N_("No reason was given.")


class PaymentRefused(Exception):
    """The pay request cannot go ahead (link or invoice not payable, unknown card); one clear line."""


@dataclass(frozen=True)
class PayOutcome:
    status: str  # a PaymentStatus value
    payment_id: uuid.UUID
    client_secret: str | None = None  # for 3-D Secure in the browser
    error_message: str | None = None


# --- saved payment profiles -----------------------------------------------------------------------


def upsert_profile(
    session: Session, customer_id: uuid.UUID, card: CardSummary, *, is_default: bool | None = None, reusable: bool | None = None
) -> PaymentProfile:
    profile = (
        session.execute(select(PaymentProfile).where(PaymentProfile.stripe_payment_method_id == card.payment_method_id))
    ).scalar_one_or_none()
    if profile is None:
        profile = PaymentProfile(
            customer_id=customer_id, stripe_payment_method_id=card.payment_method_id, brand=card.brand, last4=card.last4
        )
        session.add(profile)
    profile.customer_id = customer_id
    profile.brand, profile.last4 = card.brand, card.last4
    profile.exp_month, profile.exp_year = card.exp_month, card.exp_year
    if reusable is not None:
        profile.reusable = reusable
    if is_default is not None:
        _set_default(session, customer_id, card.payment_method_id if is_default else None)
        profile.is_default = is_default
    session.flush()
    return profile


def _set_default(session: Session, customer_id: uuid.UUID, payment_method_id: str | None) -> None:
    session.execute(
        update(PaymentProfile)
        .where(PaymentProfile.customer_id == customer_id)
        .values(is_default=PaymentProfile.stripe_payment_method_id == payment_method_id if payment_method_id else False)
    )


async def sync_profiles(sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, customer_id: uuid.UUID) -> list[PaymentProfile]:
    """Replace a customer's saved profiles with what Stripe holds (called when a link is issued).

    Stripe is asked before the write transaction opens, so no lock is held across the network."""
    async with sessions() as session:
        customer = await session.get_one(Customer, customer_id)
    if not customer.stripe_customer_id:
        return []
    cards = await gateway.list_cards(customer.stripe_customer_id)
    default = await gateway.default_payment_method(customer.stripe_customer_id)
    if default is None and cards:
        default = cards[0].payment_method_id
    async with sessions.begin() as session:
        await session.execute(
            delete(PaymentProfile).where(
                PaymentProfile.customer_id == customer_id,
                PaymentProfile.stripe_payment_method_id.not_in([c.payment_method_id for c in cards]),
            )
        )
        profiles = await session.run_sync(
            lambda sync: [upsert_profile(sync, customer_id, card, is_default=card.payment_method_id == default) for card in cards]
        )
    return profiles


# --- paying ---------------------------------------------------------------------------------------


async def _payable_link(session: AsyncSession, link_id: uuid.UUID) -> tuple[PaymentLink, Invoice, Customer]:
    row = (await session.execute(link_with_invoice(link_id))).one_or_none()
    if row is None:
        raise PaymentRefused(N_("This payment link does not exist."))
    link, invoice, customer = row
    if link.revoked_at is not None or link.expires_at <= utcnow():
        raise PaymentRefused(N_("This payment link is no longer valid."))
    return link, invoice, customer


def _check_payable(invoice: Invoice) -> None:
    if invoice.status == InvoiceStatus.VOID:
        raise PaymentRefused(N_("This invoice has been cancelled. There is nothing to pay."))
    if invoice.status != InvoiceStatus.OPEN:
        raise PaymentRefused(N_("This invoice is already paid, or its payment is being confirmed."))


async def start_new_card(sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, *, link_id: uuid.UUID) -> str:
    """A SetupIntent for the link's customer; the page confirms it with Stripe.js. Returns its client secret."""
    async with sessions() as session:
        _, invoice, customer = await _payable_link(session, link_id)
    _check_payable(invoice)
    stripe_customer_id = customer.stripe_customer_id or await _create_stripe_customer(sessions, gateway, customer)
    setup = await gateway.create_setup_intent(stripe_customer_id)
    if not setup.client_secret:
        raise GatewayError("Stripe returned no client secret")
    return setup.client_secret


async def _create_stripe_customer(sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, customer: Customer) -> str:
    """Customers imported in bulk get their Stripe customer the first time they enter a card."""
    stripe_id = await gateway.create_customer(customer.email, customer.name)
    async with sessions.begin() as session:
        row = await session.get_one(Customer, customer.id)
        if row.stripe_customer_id is None:  # a second tab may have been first: keep theirs
            row.stripe_customer_id = stripe_id
        return row.stripe_customer_id


async def pay_with_new_card(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    settings: Settings,
    *,
    link_id: uuid.UUID,
    setup_intent_id: str,
    save: bool,
) -> PayOutcome:
    """Pay with a card the customer just entered in Stripe's card element (confirmed SetupIntent).

    Card data went from the browser to Stripe only; we see the SetupIntent and its payment method."""
    async with sessions() as session:
        _, invoice, customer = await _payable_link(session, link_id)
    _check_payable(invoice)
    if not customer.stripe_customer_id:
        raise PaymentRefused(NOT_SET_UP)
    setup = await gateway.retrieve_setup_intent(setup_intent_id)
    if setup.customer_id != customer.stripe_customer_id or setup.status != "succeeded" or not setup.payment_method_id:
        raise PaymentRefused(NEW_CARD_NOT_CONFIRMED)
    card = await gateway.retrieve_card(setup.payment_method_id)
    if card.customer_id != customer.stripe_customer_id:
        # Stripe attaches a SetupIntent's card to its customer; localstripe needs it done explicitly.
        card = await gateway.attach_card(setup.payment_method_id, customer.stripe_customer_id)
    async with sessions.begin() as session:
        has_default = (
            await session.execute(
                select(PaymentProfile.id).where(
                    PaymentProfile.customer_id == customer.id, PaymentProfile.is_default.is_(True), PaymentProfile.reusable.is_(True)
                )
            )
        ).first() is not None
        await session.run_sync(upsert_profile, customer.id, card, reusable=save, is_default=True if save and not has_default else None)
        audit.record(session, "link", "card.added", f"customer:{customer.email}", saved=save, last4=card.last4)
    outcome = await pay_with_saved_profile(sessions, gateway, settings, link_id=link_id, payment_method_id=card.payment_method_id)
    await forget_one_time_card(sessions, gateway, outcome)
    return outcome


async def forget_one_time_card(sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, outcome: PayOutcome) -> None:
    """Once a payment made with an unsaved card is over, detach the card at Stripe and drop its profile."""
    if outcome.status not in PaymentStatus.FINAL:
        return
    async with sessions() as session:
        payment = await session.get_one(Payment, outcome.payment_id)
        profile = (
            await session.execute(select(PaymentProfile).where(PaymentProfile.stripe_payment_method_id == payment.stripe_payment_method_id))
        ).scalar_one_or_none()
    if profile is None or profile.reusable:
        return
    try:
        await gateway.detach_card(profile.stripe_payment_method_id)
    except GatewayError as exc:  # sync_profiles or the payment_method.detached webhook will catch up
        log.warning("card.detach_failed payment_method=%s error=%s", profile.stripe_payment_method_id, exc)
        return
    async with sessions.begin() as session:
        await session.execute(delete(PaymentProfile).where(PaymentProfile.id == profile.id, PaymentProfile.reusable.is_(False)))


async def pay_with_saved_profile(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    settings: Settings,
    *,
    link_id: uuid.UUID,
    payment_method_id: str,
) -> PayOutcome:
    """Pay the invoice's stored amount with a saved card, in phases that survive a crash anywhere.

    1. Claim the attempt in our database (one live attempt per invoice, by a unique key): a double
       submit or a second tab finds the first attempt instead of starting another.
    2. Create the PaymentIntent with an idempotency key derived from the attempt; commit its id.
    3. Confirm it and record the result through the state machine.
    A crash after 2 leaves an id that the webhook, the next request or `reconcile` can look up;
    money only moves at 3, which runs only for an id we have committed.
    """
    claimed = await _claim_attempt(sessions, link_id=link_id, payment_method_id=payment_method_id)
    if isinstance(claimed, PayOutcome):
        return claimed
    payment, customer_stripe_id, invoice_number = claimed

    try:
        snapshot = await gateway.create_payment_intent(
            amount=payment.amount,
            currency=payment.currency,
            customer_id=customer_stripe_id,
            payment_method_id=payment_method_id,
            metadata={"invoice_id": str(payment.invoice_id), "payment_id": str(payment.id), "invoice_number": invoice_number},
            idempotency_key=payment.idempotency_key,
        )
    except GatewayUnavailable as exc:
        return await _mark_pending(sessions, payment.id, str(exc))
    except GatewayError as exc:
        return await _fail_attempt(sessions, payment.id, exc)

    async with sessions.begin() as session:
        row = await session.get_one(Payment, payment.id, with_for_update=True)
        still_ours = row.status == PaymentStatus.CREATED and row.live_invoice_id == row.invoice_id
        if still_ours:
            row.stripe_payment_intent_id = snapshot.id
            row.status = PaymentStatus.REQUIRES_CONFIRMATION
    if not still_ours:
        # Stripe answered so late that the attempt was released (and maybe retried) meanwhile:
        # this intent must never be confirmed. Cancel it, best effort; it has charged nothing.
        log.warning("payment.late_intent payment=%s intent=%s", payment.id, snapshot.id)
        try:
            await gateway.cancel_payment_intent(snapshot.id)
        except GatewayError:
            pass
        return PayOutcome(row.status, row.id, error_message=row.failure_message)

    try:
        snapshot = await gateway.confirm_payment_intent(snapshot.id, f"{payment.idempotency_key}:confirm")
    except GatewayUnavailable as exc:
        return await _mark_pending(sessions, payment.id, str(exc))
    except GatewayError as exc:
        # Stripe refused to confirm: ask it what state the intent is in rather than guess.
        try:
            snapshot = await gateway.retrieve_payment_intent(snapshot.id)
        except GatewayError:
            # We do not know whether the confirm went through: never say "failed" (the customer
            # would pay again). The webhook, the status check or reconcile will tell.
            return await _mark_pending(sessions, payment.id, str(exc))
    async with sessions.begin() as session:
        applied = await session.run_sync(apply_intent, settings, snapshot, actor="link")
        assert applied is not None  # the payment row exists: we committed its intent id above
        return _outcome(applied, snapshot)


class _ClaimedElsewhere(Exception):
    """Another request claimed the invoice between our read and our write."""


async def _claim_attempt(
    sessions: async_sessionmaker[AsyncSession], *, link_id: uuid.UUID, payment_method_id: str
) -> tuple[Payment, str, str] | PayOutcome:
    try:
        return await _try_claim(sessions, link_id=link_id, payment_method_id=payment_method_id)
    except _ClaimedElsewhere as exc:
        async with sessions() as session:
            existing = await _live_payment(session, uuid.UUID(str(exc)))
        if existing is None:
            raise PaymentRefused(N_("Please try again.")) from None
        return PayOutcome(existing.status, existing.id)


async def _try_claim(
    sessions: async_sessionmaker[AsyncSession], *, link_id: uuid.UUID, payment_method_id: str
) -> tuple[Payment, str, str] | PayOutcome:
    async with sessions.begin() as session:
        _, invoice, customer = await _payable_link(session, link_id)
        now = utcnow()
        live = await _live_payment(session, invoice.id)
        if live is not None:
            if live.stripe_payment_intent_id is None and live.status == PaymentStatus.CREATED and now - live.created_at > STALE_CLAIM:
                _release(live, PaymentStatus.CANCELED, "abandoned before reaching Stripe")
                await session.flush()
            else:
                return PayOutcome(live.status, live.id)
        _check_payable(invoice)
        profile = (
            await session.execute(
                select(PaymentProfile).where(
                    PaymentProfile.customer_id == customer.id, PaymentProfile.stripe_payment_method_id == payment_method_id
                )
            )
        ).scalar_one_or_none()
        if profile is None or not customer.stripe_customer_id:
            raise PaymentRefused(N_("That card is not saved for this customer."))
        payment_id = uuid.uuid4()
        payment = Payment(
            id=payment_id,
            invoice_id=invoice.id,
            live_invoice_id=invoice.id,
            stripe_payment_method_id=payment_method_id,
            idempotency_key=f"paylink-{invoice.id}-{payment_id}",
            amount=invoice.amount_due - invoice.amount_paid,
            currency=invoice.currency,
            brand=profile.brand,
            last4=profile.last4,
            status=PaymentStatus.CREATED,
        )
        session.add(payment)
        invoice_id = invoice.id  # read before a failed flush expires the instance
        try:
            await session.flush()
        except IntegrityError:
            raise _ClaimedElsewhere(str(invoice_id)) from None
        audit.record(session, "link", "payment.claim", f"invoice:{invoice.number}", payment=str(payment_id))
        return payment, customer.stripe_customer_id, invoice.number


async def _live_payment(session: AsyncSession, invoice_id: uuid.UUID) -> Payment | None:
    return (await session.execute(select(Payment).where(Payment.live_invoice_id == invoice_id))).scalar_one_or_none()


def _release(payment: Payment, status: str, message: str | None = None, code: str | None = None) -> None:
    payment.status = status
    payment.live_invoice_id = None
    payment.failure_message = message
    payment.failure_code = code


async def _mark_pending(sessions: async_sessionmaker[AsyncSession], payment_id: uuid.UUID, error: str) -> PayOutcome:
    """We could not hear Stripe: the money may or may not have moved. Never say "failed"."""
    log.warning("payment.pending payment=%s error=%s", payment_id, error)
    async with sessions.begin() as session:
        row = await session.get_one(Payment, payment_id)
        if row.status not in PaymentStatus.FINAL:
            row.status = PaymentStatus.PENDING
        return PayOutcome(row.status, row.id)


async def _fail_attempt(sessions: async_sessionmaker[AsyncSession], payment_id: uuid.UUID, exc: GatewayError) -> PayOutcome:
    code = exc.code if isinstance(exc, CardDeclined) else None
    async with sessions.begin() as session:
        row = await session.get_one(Payment, payment_id)
        _release(row, PaymentStatus.FAILED, str(exc), code)
        return PayOutcome(row.status, row.id, error_message=row.failure_message)


def _outcome(payment: Payment, snapshot: IntentSnapshot) -> PayOutcome:
    secret = snapshot.client_secret if payment.status == PaymentStatus.REQUIRES_ACTION else None
    return PayOutcome(payment.status, payment.id, client_secret=secret, error_message=payment.failure_message)


async def settle_payment(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, settings: Settings, payment_id: uuid.UUID, *, actor: str
) -> PayOutcome:
    """Ask Stripe about one unfinished payment and apply its answer (after 3-D Secure, `reconcile`).

    An attempt that never reached Stripe's confirm (we timed out before it arrived, or died) and
    has waited longer than STALE_CLAIM is canceled at Stripe and released, so the customer can pay
    again; it cannot have charged anyone. Anything Stripe did confirm is recorded as it is.
    """
    async with sessions() as session:
        payment = await session.get_one(Payment, payment_id)
    if payment.status in PaymentStatus.FINAL:
        return PayOutcome(payment.status, payment.id, error_message=payment.failure_message)
    stale = utcnow() - payment.updated_at > STALE_CLAIM
    if payment.stripe_payment_intent_id is None:
        if stale and payment.status in (PaymentStatus.CREATED, PaymentStatus.PENDING):
            async with sessions.begin() as session:
                row = await session.get_one(Payment, payment_id)
                if row.stripe_payment_intent_id is None and row.status == payment.status:
                    _release(row, PaymentStatus.CANCELED, "abandoned before reaching Stripe")
                return PayOutcome(row.status, row.id)
        return PayOutcome(payment.status, payment.id)
    try:
        snapshot = await gateway.retrieve_payment_intent(payment.stripe_payment_intent_id)
        abandoned = utcnow() - payment.updated_at > ABANDONED_AUTHENTICATION
        if (snapshot.status == "requires_confirmation" and stale) or (snapshot.status == "requires_action" and abandoned):
            try:
                snapshot = await gateway.cancel_payment_intent(snapshot.id)
            except GatewayError:
                snapshot = await gateway.retrieve_payment_intent(snapshot.id)
    except GatewayError:
        return PayOutcome(payment.status, payment.id, error_message=payment.failure_message)
    async with sessions.begin() as session:
        applied = await session.run_sync(apply_intent, settings, snapshot, actor=actor)
        assert applied is not None
        outcome = _outcome(applied, snapshot)
    await forget_one_time_card(sessions, gateway, outcome)
    return outcome


# --- the state machine ----------------------------------------------------------------------------


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
        if payment.status not in PaymentStatus.FINAL:
            _release(payment, PaymentStatus.FAILED, snapshot.error_message or N_("The payment was not completed."), snapshot.error_code)
            audit.record(session, actor, "payment.failed", f"invoice:{invoice.number}", payment=str(payment.id), code=snapshot.error_code)
        if invoice.status == InvoiceStatus.PROCESSING:
            invoice.status = InvoiceStatus.OPEN
    elif status == "canceled":
        if payment.status not in PaymentStatus.FINAL:
            _release(payment, PaymentStatus.CANCELED, N_("The payment was canceled."))
        if invoice.status == InvoiceStatus.PROCESSING:
            invoice.status = InvoiceStatus.OPEN
    return payment  # flushed by the caller's commit (or savepoint), so that batches flush once


PREFETCHED_PAYMENTS = "paylink.prefetched_payments"  # session.info key: intent id -> Payment


def _payments_with_invoice(condition: Any) -> Select[Payment]:
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
    return session.execute(_payments_with_invoice(condition)).scalar_one_or_none()


def _payment_for_intent(session: Session, snapshot: IntentSnapshot) -> Payment | None:
    payment = _payment_by_intent_id(session, snapshot.id)
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
    now = utcnow()
    payment.status = PaymentStatus.SUCCEEDED
    payment.live_invoice_id = None
    payment.succeeded_at = now
    payment.failure_code = payment.failure_message = None
    payment.amount = snapshot.amount
    subject = f"invoice:{invoice.number}"
    audit.record(session, actor, "payment.succeeded", subject, payment=str(payment.id), intent=snapshot.id, amount=snapshot.amount)
    if invoice.status in (InvoiceStatus.OPEN, InvoiceStatus.PROCESSING):
        invoice.amount_paid += snapshot.amount
        invoice.status = InvoiceStatus.PAID
        invoice.paid_at = now
        if invoice.amount_paid > invoice.amount_due:
            _flag(session, settings, invoice, f"overpaid by {invoice.amount_paid - invoice.amount_due} (minor units)", actor)
        if invoice.amount_refunded > 0:  # the refund's event overtook the payment's
            _set_refund_status(invoice)
        if invoice.status != InvoiceStatus.REFUNDED:
            _queue_receipt(session, settings, invoice, payment)
    else:
        # Paid twice, or paid after it was voided: keep the money on record and tell finance.
        invoice.amount_paid += snapshot.amount
        _flag(session, settings, invoice, f"payment {snapshot.id} received while the invoice was {invoice.status}", actor)


def _flag(session: Session, settings: Settings, invoice: Invoice, reason: str, actor: str) -> None:
    invoice.needs_attention = reason if not invoice.needs_attention else f"{invoice.needs_attention}; {reason}"
    audit.record(session, actor, "invoice.flagged", f"invoice:{invoice.number}", reason=reason)
    outbox.alert_finance(session, settings, f"Invoice {invoice.number} needs attention", [reason], invoice_id=invoice.id)


def _queue_receipt(session: Session, settings: Settings, invoice: Invoice, payment: Payment) -> None:
    customer = session.get_one(Customer, invoice.customer_id)
    subject, payload = receipt_payload(
        invoice_facts(settings, invoice, customer),
        amount_paid=payment.amount,
        brand=payment.brand,
        last4=payment.last4,
        paid_at=payment.succeeded_at or utcnow(),
        locale=customer_locale(settings, customer),
    )
    outbox.enqueue_to_render(session, settings, customer.email, Kind.RECEIPT, subject, payload, invoice_id=invoice.id)


# --- webhooks -------------------------------------------------------------------------------------


def _event_row(event: dict[str, Any], now: datetime) -> dict[str, Any]:
    # processed_at is set here: the event is applied in this same transaction, or not at all.
    return {
        "id": event["id"],
        "type": str(event.get("type")),
        "stripe_created": event.get("created"),
        "received_at": now,
        "processed_at": now,
    }


def _insert_events(session: Session) -> Any:
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    return insert(WebhookEvent).on_conflict_do_nothing(index_elements=["id"])


def record_event(session: Session, event: dict[str, Any]) -> bool:
    """Store the event id first, with an insert that cannot race. True if it is new."""
    result = session.execute(_insert_events(session).values(**_event_row(event, utcnow())))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def record_and_apply_batch(session: Session, settings: Settings, events: list[dict[str, Any]]) -> list[bool]:
    """record_and_apply for many events in one transaction, with one statement to store their ids
    and one query for the payments they name. Call it with autoflush off: one flush at the end."""
    now = utcnow()
    inserted = session.execute(_insert_events(session).values([_event_row(e, now) for e in events]).returning(WebhookEvent.id)).scalars()
    new_ids = set(inserted)
    intents = [
        str(e["data"]["object"]["id"]) for e in events if str(e.get("type", "")).startswith("payment_intent.") and e["id"] in new_ids
    ]
    if intents:
        loaded = session.execute(_payments_with_invoice(Payment.stripe_payment_intent_id.in_(intents))).scalars().all()
        session.info[PREFETCHED_PAYMENTS] = {p.stripe_payment_intent_id: p for p in loaded}
    results = []
    try:
        for event in events:
            is_new = event["id"] in new_ids
            new_ids.discard(event["id"])  # a second copy in the same batch is a duplicate
            if is_new:
                apply_stripe_event(session, settings, event)
            results.append(is_new)
    finally:
        session.info.pop(PREFETCHED_PAYMENTS, None)
    return results


def record_and_apply(session: Session, settings: Settings, event: dict[str, Any], *, actor: str = "webhook") -> bool:
    """Store the event id; apply the event only if it is new. Returns whether it was new."""
    is_new = record_event(session, event)
    if is_new:
        apply_stripe_event(session, settings, event, actor=actor)
    return is_new


def apply_stripe_event(session: Session, settings: Settings, event: dict[str, Any], *, actor: str = "webhook") -> None:
    """Apply one verified, newly recorded event. Unknown types are stored and acknowledged."""
    kind = str(event.get("type"))
    obj = (event.get("data") or {}).get("object") or {}
    if kind.startswith("payment_intent."):
        apply_intent(session, settings, intent_snapshot(obj), actor=actor)
    elif kind == "charge.refunded":
        _apply_refund(session, settings, obj, actor)
    elif kind == "charge.dispute.created":
        _apply_dispute(session, settings, obj, actor)
    elif kind in ("payment_method.attached", "payment_method.updated", "payment_method.automatically_updated"):
        _apply_card(session, obj)
    elif kind == "payment_method.detached":
        session.execute(delete(PaymentProfile).where(PaymentProfile.stripe_payment_method_id == obj.get("id")))
    elif kind == "customer.updated":
        _apply_customer(session, obj)


def _payment_by_intent_id(session: Session, intent_id: Any) -> Payment | None:
    if not isinstance(intent_id, str):
        return None
    prefetched = session.info.get(PREFETCHED_PAYMENTS, {}).get(intent_id)
    if prefetched is not None:
        return prefetched  # type: ignore[no-any-return]
    return _locked_payment(session, Payment.stripe_payment_intent_id == intent_id)


def _apply_refund(session: Session, settings: Settings, charge: dict[str, Any], actor: str) -> None:
    payment = _payment_by_intent_id(session, charge.get("payment_intent"))
    if payment is None:
        log.warning("refund.unknown_payment intent=%s charge=%s", charge.get("payment_intent"), charge.get("id"))
        return
    # Stripe's amount_refunded is cumulative: keep the largest seen, so late or repeated events are harmless.
    payment.amount_refunded = max(payment.amount_refunded, int(charge.get("amount_refunded") or 0))
    invoice = session.get_one(Invoice, payment.invoice_id, with_for_update=True)
    session.flush()  # the sum below must see this payment's new refund
    refunded = sum((session.execute(select(Payment.amount_refunded).where(Payment.invoice_id == invoice.id))).scalars())
    invoice.amount_refunded = refunded
    if invoice.status in (InvoiceStatus.PAID, InvoiceStatus.PARTIALLY_REFUNDED, InvoiceStatus.REFUNDED):
        _set_refund_status(invoice)
    audit.record(
        session, actor, "payment.refunded", f"invoice:{invoice.number}", refunded=refunded, intent=payment.stripe_payment_intent_id
    )


def _set_refund_status(invoice: Invoice) -> None:
    if invoice.amount_refunded > 0:
        invoice.status = InvoiceStatus.REFUNDED if invoice.amount_refunded >= invoice.amount_paid else InvoiceStatus.PARTIALLY_REFUNDED


def _apply_dispute(session: Session, settings: Settings, dispute: dict[str, Any], actor: str) -> None:
    payment = _payment_by_intent_id(session, dispute.get("payment_intent"))
    if payment is None:
        return
    invoice = session.get_one(Invoice, payment.invoice_id)
    reason = (
        f"disputed: {dispute.get('reason') or 'no reason given'} ({dispute.get('amount')} {dispute.get('currency') or invoice.currency})"
    )
    _flag(session, settings, invoice, reason, actor)


def _apply_card(session: Session, pm: dict[str, Any]) -> None:
    customer_stripe_id = pm.get("customer")
    if not customer_stripe_id or pm.get("type", "card") != "card":
        return
    customer = (session.execute(select(Customer).where(Customer.stripe_customer_id == customer_stripe_id))).scalar_one_or_none()
    if customer is not None:
        from payments.gateway import card_summary

        upsert_profile(session, customer.id, card_summary(pm))


def _apply_customer(session: Session, obj: dict[str, Any]) -> None:
    customer = (session.execute(select(Customer).where(Customer.stripe_customer_id == obj.get("id")))).scalar_one_or_none()
    if customer is None:
        return
    default = (obj.get("invoice_settings") or {}).get("default_payment_method")
    if isinstance(default, dict):
        default = default.get("id")
    _set_default(session, customer.id, default)
