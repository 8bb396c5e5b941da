"""Paying an invoice: claim the attempt, create the PaymentIntent, confirm it; settle and void.

Every phase survives a crash anywhere (see `pay_with_saved_profile`). Claiming a payment and voiding
an invoice both lock the invoice row first, so on PostgreSQL they can never interleave: a card is
never charged for an invoice voided a moment earlier.

Brakes (payments/brakes.py) come before Stripe is called: SetupIntents per link and per client
address; failed attempts per invoice (counted here from the payments table, under the invoice row
lock that the claim takes, so concurrent attempts cannot slip past it) and per client address (a
hit reserved before the attempt, given back unless the attempt failed).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from links.errors import LinkError, NotFound
from links.issuing import link_with_invoice
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from payments import brakes
from payments.cards import forget_one_time_card, upsert_profile
from payments.gateway import CardDeclined, GatewayError, GatewayUnavailable, IntentSnapshot, StripeGateway
from payments.models import Payment, PaymentProfile, PaymentStatus
from payments.state import apply_intent, release_attempt
from plumbing import audit
from plumbing.db import utcnow
from plumbing.i18n import N_
from plumbing.metrics import PAY_ATTEMPTS
from plumbing.settings import Settings

log = logging.getLogger("paylink.payments")


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


async def _payable_link(session: AsyncSession, link_id: uuid.UUID, *, lock: bool = False) -> tuple[PaymentLink, Invoice, Customer]:
    """The link with its invoice and customer; with `lock`, the invoice row is locked until commit
    (PostgreSQL; SQLite writers are serialised already), the same lock `void_invoice` takes."""
    query = link_with_invoice(link_id)
    if lock:
        query = query.with_for_update(of=Invoice).execution_options(populate_existing=True)
    row = (await session.execute(query)).one_or_none()
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


async def start_new_card(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, settings: Settings, *, link_id: uuid.UUID, client: str | None = None
) -> str:
    """A SetupIntent for the link's customer; the page confirms it with Stripe.js. Returns its client secret.

    At most SETUP_INTENTS_PER_LINK_DAY per link, and per client address (`client`, a keyed hash), in
    a day: counted before anything is created at Stripe (a Stripe customer included)."""
    async with sessions() as session:
        _, invoice, customer = await _payable_link(session, link_id)
    _check_payable(invoice)
    limits = [brakes.setup_intents_per_link(settings, link_id.hex, invoice.number)]
    if client:
        limits.append(brakes.setup_intents_per_client(settings, client))
    await brakes.take(sessions, settings, *limits)
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
    client: str | None = None,
) -> PayOutcome:
    """Pay with a card the customer just entered in Stripe's card element (confirmed SetupIntent).

    Card data went from the browser to Stripe only; we see the SetupIntent and its payment method."""
    try:
        async with _failure_brakes(sessions, settings, link_id, client) as outcomes:
            outcome = await _pay_with_new_card(sessions, gateway, settings, link_id=link_id, setup_intent_id=setup_intent_id, save=save)
            outcomes.append(outcome)
            PAY_ATTEMPTS.labels("new", outcome.status).inc()
            return outcome
    except Exception as exc:
        PAY_ATTEMPTS.labels("new", _attempt_failure(exc)).inc()
        raise


async def _pay_with_new_card(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    settings: Settings,
    *,
    link_id: uuid.UUID,
    setup_intent_id: str,
    save: bool,
) -> PayOutcome:
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
    outcome = await _pay_with_saved_profile(sessions, gateway, settings, link_id=link_id, payment_method_id=card.payment_method_id)
    await forget_one_time_card(sessions, gateway, outcome.payment_id, outcome.status)
    return outcome


async def pay_with_saved_profile(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    settings: Settings,
    *,
    link_id: uuid.UUID,
    payment_method_id: str,
    client: str | None = None,
) -> PayOutcome:
    """Pay the invoice's stored amount with a saved card, in phases that survive a crash anywhere.

    1. Claim the attempt in our database (one live attempt per invoice, by a unique key): a double
       submit or a second tab finds the first attempt instead of starting another.
    2. Create the PaymentIntent with an idempotency key derived from the attempt; commit its id.
    3. Confirm it and record the result through the state machine.
    A crash after 2 leaves an id that the webhook, the next request or `reconcile` can look up;
    money only moves at 3, which runs only for an id we have committed.

    Past PAY_FAILED_ATTEMPTS_PER_INVOICE_HOUR failed attempts for the invoice, or from the client
    address (`client`, a keyed hash), it raises brakes.TooManyAttempts before calling Stripe.
    """
    try:
        async with _failure_brakes(sessions, settings, link_id, client) as outcomes:
            outcome = await _pay_with_saved_profile(sessions, gateway, settings, link_id=link_id, payment_method_id=payment_method_id)
            outcomes.append(outcome)
            PAY_ATTEMPTS.labels("saved", outcome.status).inc()
            return outcome
    except Exception as exc:
        PAY_ATTEMPTS.labels("saved", _attempt_failure(exc)).inc()
        raise


def _attempt_failure(exc: Exception) -> str:
    """The `outcome` label of a pay attempt that raised (metrics)."""
    if isinstance(exc, brakes.TooManyAttempts):
        return "rate_limited"
    return "refused" if isinstance(exc, PaymentRefused) else "error"


@contextlib.asynccontextmanager
async def _failure_brakes(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, link_id: uuid.UUID, client: str | None
) -> AsyncIterator[list[PayOutcome]]:
    """The failed-attempt brakes around one pay request. The invoice's count is checked first (the
    claim checks it again under the invoice row lock); then a hit is reserved for the client address
    and given back unless the attempt failed, so concurrent attempts from one address cannot slip
    past its limit. The body appends its outcome to the list it is given."""
    try:
        async with sessions() as session:
            _, invoice, _ = await _payable_link(session, link_id)
            await _check_failed_attempts(session, settings, invoice)
    except _InvoiceBrake as exc:
        raise await brakes.refuse(sessions, settings, exc.brake) from None
    reserved = await brakes.take(sessions, settings, brakes.failed_payments_per_client(settings, client)) if client else []
    outcomes: list[PayOutcome] = []
    try:
        yield outcomes
    finally:
        if reserved and not (outcomes and outcomes[-1].status == PaymentStatus.FAILED):
            await brakes.give_back(sessions, reserved)


class _InvoiceBrake(Exception):
    """The invoice's failed attempts are used up (raised inside a transaction, recorded after it)."""

    def __init__(self, brake: brakes.Brake) -> None:
        super().__init__(brake.key)
        self.brake = brake


async def _check_failed_attempts(session: AsyncSession, settings: Settings, invoice: Invoice) -> None:
    """Raise _InvoiceBrake if the invoice had PAY_FAILED_ATTEMPTS_PER_INVOICE_HOUR failed attempts
    started in the last hour (counted from the payments table, the truth about attempts)."""
    brake = brakes.failed_payments_per_invoice(settings, invoice.id.hex, invoice.number)
    failed = await session.scalar(
        select(func.count())
        .select_from(Payment)
        .where(Payment.invoice_id == invoice.id, Payment.status == PaymentStatus.FAILED, Payment.created_at > utcnow() - brake.window)
    )
    if (failed or 0) >= brake.limit:
        raise _InvoiceBrake(brake)


async def _pay_with_saved_profile(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    settings: Settings,
    *,
    link_id: uuid.UUID,
    payment_method_id: str,
) -> PayOutcome:
    claimed = await _claim_attempt(sessions, settings, link_id=link_id, payment_method_id=payment_method_id)
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
    sessions: async_sessionmaker[AsyncSession], settings: Settings, *, link_id: uuid.UUID, payment_method_id: str
) -> tuple[Payment, str, str] | PayOutcome:
    try:
        return await _try_claim(sessions, settings, link_id=link_id, payment_method_id=payment_method_id)
    except _InvoiceBrake as exc:
        raise await brakes.refuse(sessions, settings, exc.brake) from None
    except _ClaimedElsewhere as exc:
        async with sessions() as session:
            existing = await _live_payment(session, uuid.UUID(str(exc)))
        if existing is None:
            raise PaymentRefused(N_("Please try again.")) from None
        return PayOutcome(existing.status, existing.id)


async def _try_claim(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, *, link_id: uuid.UUID, payment_method_id: str
) -> tuple[Payment, str, str] | PayOutcome:
    stale_claim = timedelta(seconds=settings.stale_claim_seconds)
    async with sessions.begin() as session:
        _, invoice, customer = await _payable_link(session, link_id, lock=True)
        now = utcnow()
        live = await _live_payment(session, invoice.id)
        if live is not None:
            if live.stripe_payment_intent_id is None and live.status == PaymentStatus.CREATED and now - live.created_at > stale_claim:
                release_attempt(live, PaymentStatus.CANCELED, "abandoned before reaching Stripe")
                await session.flush()
            else:
                return PayOutcome(live.status, live.id)
        _check_payable(invoice)
        await _check_failed_attempts(session, settings, invoice)  # under the invoice row lock
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
        release_attempt(row, PaymentStatus.FAILED, str(exc), code)
        return PayOutcome(row.status, row.id, error_message=row.failure_message)


def _outcome(payment: Payment, snapshot: IntentSnapshot) -> PayOutcome:
    secret = snapshot.client_secret if payment.status == PaymentStatus.REQUIRES_ACTION else None
    return PayOutcome(payment.status, payment.id, client_secret=secret, error_message=payment.failure_message)


async def settle_payment(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, settings: Settings, payment_id: uuid.UUID, *, actor: str
) -> PayOutcome:
    """Ask Stripe about one unfinished payment and apply its answer (after 3-D Secure, `reconcile`).

    An attempt that never reached Stripe's confirm (we timed out before it arrived, or died) and
    has waited longer than STALE_CLAIM_SECONDS is canceled at Stripe and released, so the customer can pay
    again; it cannot have charged anyone. Anything Stripe did confirm is recorded as it is.
    """
    async with sessions() as session:
        payment = await session.get_one(Payment, payment_id)
    if payment.status in PaymentStatus.FINAL:
        return PayOutcome(payment.status, payment.id, error_message=payment.failure_message)
    stale = utcnow() - payment.updated_at > timedelta(seconds=settings.stale_claim_seconds)
    if payment.stripe_payment_intent_id is None:
        if stale and payment.status in (PaymentStatus.CREATED, PaymentStatus.PENDING):
            async with sessions.begin() as session:
                row = await session.get_one(Payment, payment_id)
                if row.stripe_payment_intent_id is None and row.status == payment.status:
                    release_attempt(row, PaymentStatus.CANCELED, "abandoned before reaching Stripe")
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
    await forget_one_time_card(sessions, gateway, outcome.payment_id, outcome.status)
    return outcome


# --- voiding ----------------------------------------------------------------------------------------


async def void_invoice(session: AsyncSession, number: str, *, actor: str) -> Invoice:
    """Void an open invoice and revoke its links. The invoice row is locked first, the lock a
    payment claim takes, so a void and a claim never interleave: one of them waits and then sees
    the other's result (a voided invoice is not claimed; a claimed one is not voided)."""
    query = select(Invoice).where(Invoice.number == number).with_for_update().execution_options(populate_existing=True)
    invoice = (await session.execute(query)).scalar_one_or_none()
    if invoice is None:
        raise NotFound(f"no invoice numbered {number}")
    if invoice.status != InvoiceStatus.OPEN:
        raise LinkError(f"invoice {invoice.number} is {invoice.status}; only open invoices can be voided")
    live = (await session.execute(select(Payment.id).where(Payment.live_invoice_id == invoice.id))).first()
    if live is not None:
        raise LinkError(f"invoice {invoice.number} has a payment in progress; run `python -m links reconcile` first")
    invoice.status = InvoiceStatus.VOID
    await session.execute(
        update(PaymentLink).where(PaymentLink.invoice_id == invoice.id, PaymentLink.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    audit.record(session, actor, "invoice.void", f"invoice:{invoice.number}")
    return invoice
