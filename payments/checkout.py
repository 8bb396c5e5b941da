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
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from links.errors import LinkError, NotFound
from links.issuing import link_with_invoice
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from links.partial import AmountRefused, amount_for, balance_of, check_amount, parse_amount, rules_of
from payments import brakes
from payments.cards import forget_one_time_card, upsert_profile
from payments.gateway import CardDeclined, CardSummary, GatewayError, GatewayUnavailable, IntentSnapshot, StripeGateway
from payments.models import Payment, PaymentAllocation, PaymentProfile, PaymentStatus
from payments.page_reader import pay_all_invoices
from payments.payers import known_stripe_customer, may_pay_all, stripe_customer_for, uses_saved_cards
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
# The same amount with the same card on the same invoice, again within this long after it was paid, is the
# same form sent twice (a double click without JavaScript, a resent POST): it finds the first payment and
# charges nothing. (In flight, the invoice's live slot does that; a part payment frees the slot when it
# succeeds, and leaves a balance that the same amount can still pay.)
DUPLICATE_WINDOW = timedelta(minutes=2)


NOT_SET_UP = N_("Card payments are not set up for this customer yet.")


NEW_CARD_NOT_CONFIRMED = N_("The new card was not confirmed. Please enter it again.")


GATEWAY_DOWN = N_("We could not reach the payment processor. Nothing was charged; please try again in a moment.")


NOT_COMPLETED = N_("No reason was given.")


class PaymentRefused(Exception):
    """The pay request cannot go ahead (link or invoice not payable, unknown card, an amount outside
    the rules); one clear line: a msgid, with the amounts it names (minor units, in `currency`)."""

    def __init__(
        self, message: str, amounts: dict[str, int] | None = None, currency: str | None = None, texts: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.amounts = amounts or {}
        self.currency = currency
        self.texts = texts or {}  # other named parts of the message (an invoice number)


SCOPE_INVOICE = "invoice"
SCOPE_ALL = "all"  # every sent, open invoice of the customer in one charge (PaymentAllocation)

# Stripe metadata values are at most 500 characters.
_METADATA_VALUE = 500

TOTAL_CHANGED = N_("Your open invoices changed since this page was shown: the total is now %(total)s. Please check it and press Pay again.")


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
    if invoice.status not in InvoiceStatus.PAYABLE or balance_of(invoice.amount_due, invoice.amount_paid) <= 0:
        raise PaymentRefused(N_("This invoice is already paid, or its payment is being confirmed."))


def _charge_for(invoice: Invoice, amount: int | str | None) -> int:
    """What to charge on `invoice` now: its balance, or the part asked for if the rules allow it
    (links/partial.py). Checked under the invoice row lock, against the balance of that moment.
    `amount` is minor units, or the pay form's text in major units; a form's amount on an invoice
    without part payments is ignored (its page offered no other amount: the button named the balance)."""
    try:
        if isinstance(amount, int):
            return check_amount(amount, invoice.amount_due, invoice.amount_paid, rules_of(invoice), invoice.currency)
        return amount_for(invoice, amount if invoice.allow_partial else None)
    except AmountRefused as refused:
        raise PaymentRefused(refused.message, refused.amounts, invoice.currency) from None


def parse_requested(amount: str | None, currency: str) -> int | None:
    """The pay form's `amount` (major units) in minor units, or None for the balance; PaymentRefused if unreadable."""
    if amount is None or not amount.strip():
        return None
    try:
        return parse_amount(amount, currency)
    except AmountRefused as refused:
        raise PaymentRefused(refused.message, refused.amounts, currency) from None


async def start_new_card(
    sessions: async_sessionmaker[AsyncSession], gateway: StripeGateway, settings: Settings, *, link_id: uuid.UUID, client: str | None = None
) -> str:
    """A SetupIntent for the link's payer (payments/payers.py); the page confirms it with Stripe.js.
    Returns its client secret.

    At most SETUP_INTENTS_PER_LINK_DAY per link, per invoice (all its links: a colleague's too), and per
    client address (`client`, a keyed hash), in a day: counted before anything is created at Stripe (a
    Stripe customer included)."""
    async with sessions() as session:
        link, invoice, customer = await _payable_link(session, link_id)
    _check_payable(invoice)
    limits = [
        brakes.setup_intents_per_link(settings, link_id.hex, invoice.number),
        brakes.setup_intents_per_invoice(settings, invoice.id.hex, invoice.number),
    ]
    if client:
        limits.append(brakes.setup_intents_per_client(settings, client))
    await brakes.take(sessions, settings, *limits)
    stripe_customer_id = await stripe_customer_for(sessions, gateway, link, customer)
    setup = await gateway.create_setup_intent(stripe_customer_id)
    if not setup.client_secret:
        raise GatewayError("Stripe returned no client secret")
    return setup.client_secret


async def pay_with_new_card(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    settings: Settings,
    *,
    link_id: uuid.UUID,
    setup_intent_id: str,
    save: bool,
    client: str | None = None,
    amount: int | str | None = None,
    scope: str = SCOPE_INVOICE,
    expected_total: int | None = None,
) -> PayOutcome:
    """Pay with a card the customer just entered in Stripe's card element (confirmed SetupIntent).

    Card data went from the browser to Stripe only; we see the SetupIntent and its payment method.
    `amount` and `scope` as for `pay_with_saved_profile`."""
    return await _counted_attempt(
        "new",
        sessions,
        settings,
        link_id,
        client,
        functools.partial(
            _pay_with_new_card,
            sessions,
            gateway,
            settings,
            link_id=link_id,
            setup_intent_id=setup_intent_id,
            save=save,
            amount=amount,
            scope=scope,
            expected_total=expected_total,
        ),
    )


async def _pay_with_new_card(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    settings: Settings,
    *,
    link_id: uuid.UUID,
    setup_intent_id: str,
    save: bool,
    amount: int | str | None,
    scope: str,
    expected_total: int | None = None,
) -> PayOutcome:
    async with sessions() as session:
        link, invoice, customer = await _payable_link(session, link_id)
    _check_payable(invoice)
    payer = known_stripe_customer(link, customer)  # made by start_new_card, for the customer or a colleague
    if payer is None:
        raise PaymentRefused(NOT_SET_UP)
    setup = await gateway.retrieve_setup_intent(setup_intent_id)
    if setup.customer_id != payer or setup.status != "succeeded" or not setup.payment_method_id:
        raise PaymentRefused(NEW_CARD_NOT_CONFIRMED)
    card = await gateway.retrieve_card(setup.payment_method_id)
    if card.customer_id != payer:
        # Stripe attaches a SetupIntent's card to its customer; localstripe needs it done explicitly.
        card = await gateway.attach_card(setup.payment_method_id, payer)
    if not uses_saved_cards(link):
        # A colleague's card stays theirs: kept on their own Stripe customer, never among the customer's cards.
        async with sessions.begin() as session:
            audit.record(session, "link", "card.added", f"link:{link.id.hex}", saved=False, last4=card.last4, colleague=True)
        return await _pay(
            sessions,
            gateway,
            settings,
            link_id=link_id,
            payment_method_id=card.payment_method_id,
            card=card,
            amount=amount,
            scope=scope,
            expected_total=expected_total,
        )
    async with sessions.begin() as session:
        # A new card never silently becomes the default: only a customer's first and only saved card is
        # (the same card entered again keeps the marks of its saved profile, see cards.upsert_profile).
        same_card = PaymentProfile.stripe_payment_method_id == card.payment_method_id
        if card.fingerprint:
            same_card = or_(same_card, func.coalesce(PaymentProfile.fingerprint, "") == card.fingerprint)  # NULL-safe under NOT
        other_saved = (
            await session.execute(
                select(PaymentProfile.id).where(PaymentProfile.customer_id == customer.id, PaymentProfile.reusable.is_(True), ~same_card)
            )
        ).first() is not None
        await session.run_sync(upsert_profile, customer.id, card, reusable=save, is_default=True if save and not other_saved else None)
        audit.record(session, "link", "card.added", f"customer:{customer.email}", saved=save, last4=card.last4)
    outcome = await _pay(
        sessions,
        gateway,
        settings,
        link_id=link_id,
        payment_method_id=card.payment_method_id,
        amount=amount,
        scope=scope,
        expected_total=expected_total,
    )
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
    amount: int | str | None = None,
    scope: str = SCOPE_INVOICE,
    expected_total: int | None = None,
) -> PayOutcome:
    """Pay with a saved card, in phases that survive a crash anywhere.

    What is charged is decided under the invoice row lock, never taken from the form as it is: the
    balance; or with `amount` (minor units, or the form's text in major units) a part of it that the
    invoice's rules allow (links/partial.py); or with scope "all" every sent, open invoice of the
    customer in one charge (see `_try_claim_all`).

    1. Claim the attempt in our database (one live attempt per invoice, by a unique key): a double
       submit or a second tab finds the first attempt instead of starting another.
    2. Create the PaymentIntent with an idempotency key derived from the attempt; commit its id.
    3. Confirm it and record the result through the state machine.
    A crash after 2 leaves an id that the webhook, the next request or `reconcile` can look up;
    money only moves at 3, which runs only for an id we have committed.

    Past PAY_FAILED_ATTEMPTS_PER_INVOICE_HOUR failed attempts for the invoice, or from the client
    address (`client`, a keyed hash), it raises brakes.TooManyAttempts before calling Stripe.
    """
    return await _counted_attempt(
        "saved",
        sessions,
        settings,
        link_id,
        client,
        functools.partial(
            _pay,
            sessions,
            gateway,
            settings,
            link_id=link_id,
            payment_method_id=payment_method_id,
            amount=amount,
            scope=scope,
            expected_total=expected_total,
        ),
    )


async def _counted_attempt(
    kind: str,
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    link_id: uuid.UUID,
    client: str | None,
    attempt: Callable[[], Awaitable[PayOutcome]],
) -> PayOutcome:
    """Run one pay attempt (`kind`: "saved" or "new" card) inside the failed-attempt brakes, and count
    its outcome (metrics)."""
    try:
        async with _failure_brakes(sessions, settings, link_id, client) as outcomes:
            outcome = await attempt()
            outcomes.append(outcome)
            PAY_ATTEMPTS.labels(kind, outcome.status).inc()
            return outcome
    except Exception as exc:
        PAY_ATTEMPTS.labels(kind, _attempt_failure(exc)).inc()
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


@dataclass(frozen=True)
class _Claim:
    payment: Payment
    stripe_customer_id: str
    metadata: dict[str, str]


async def _pay(
    sessions: async_sessionmaker[AsyncSession],
    gateway: StripeGateway,
    settings: Settings,
    *,
    link_id: uuid.UUID,
    payment_method_id: str,
    amount: int | str | None,
    scope: str,
    card: CardSummary | None = None,
    expected_total: int | None = None,
) -> PayOutcome:
    claimed = await _claim_attempt(
        sessions,
        settings,
        link_id=link_id,
        payment_method_id=payment_method_id,
        card=card,
        amount=amount,
        scope=scope,
        expected_total=expected_total,
    )
    if isinstance(claimed, PayOutcome):
        return claimed
    payment = claimed.payment

    try:
        snapshot = await gateway.create_payment_intent(
            amount=payment.amount,
            currency=payment.currency,
            customer_id=claimed.stripe_customer_id,
            payment_method_id=payment_method_id,
            metadata=claimed.metadata,
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
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    *,
    link_id: uuid.UUID,
    payment_method_id: str,
    card: CardSummary | None,
    amount: int | str | None,
    scope: str,
    expected_total: int | None = None,
) -> _Claim | PayOutcome:
    try:
        if scope == SCOPE_ALL:
            return await _try_claim_all(
                sessions, settings, link_id=link_id, payment_method_id=payment_method_id, card=card, expected_total=expected_total
            )
        if scope != SCOPE_INVOICE:
            raise PaymentRefused(N_("Please try again."))
        return await _try_claim(sessions, settings, link_id=link_id, payment_method_id=payment_method_id, card=card, amount=amount)
    except _InvoiceBrake as exc:
        raise await brakes.refuse(sessions, settings, exc.brake) from None
    except _ClaimedElsewhere as exc:
        async with sessions() as session:
            existing = await live_payment(session, uuid.UUID(str(exc)))
        if existing is None:
            raise PaymentRefused(N_("Please try again.")) from None
        return PayOutcome(existing.status, existing.id)
    except DBAPIError as exc:
        # PostgreSQL broke a lock cycle (two pay-all attempts and a webhook taking the same invoices
        # in different orders): nothing was written; the customer may simply press Pay again.
        if getattr(exc.orig, "sqlstate", None) in ("40P01", "40001") or "deadlock" in str(exc).lower():
            log.warning("payment.claim_deadlock link=%s", link_id.hex)
            raise PaymentRefused(N_("Please try again.")) from None
        raise


async def _card_for(
    session: AsyncSession, link: PaymentLink, customer: Customer, payment_method_id: str, card: CardSummary | None
) -> tuple[str, str, str]:
    """The Stripe customer, brand and last4 to charge: the card just entered (checked by the caller
    against the link's payer), or one of the customer's saved cards (never on a colleague's link)."""
    if card is not None:
        payer = known_stripe_customer(link, customer)
        if not payer or card.payment_method_id != payment_method_id:
            raise PaymentRefused(NOT_SET_UP)
        return payer, card.brand, card.last4
    if not uses_saved_cards(link):
        raise PaymentRefused(N_("That card is not saved for this customer."))
    profile = (
        await session.execute(
            select(PaymentProfile).where(
                PaymentProfile.customer_id == customer.id, PaymentProfile.stripe_payment_method_id == payment_method_id
            )
        )
    ).scalar_one_or_none()
    if profile is None or not customer.stripe_customer_id:
        raise PaymentRefused(N_("That card is not saved for this customer."))
    return customer.stripe_customer_id, profile.brand, profile.last4


async def _take_live_slot(session: AsyncSession, settings: Settings, invoice_id: uuid.UUID) -> Payment | None:
    """The live attempt on the invoice that still holds its slot (a stale claim that never reached
    Stripe is released first), or None when the invoice is free to claim."""
    live = await live_payment(session, invoice_id)
    if live is None:
        return None
    stale_claim = timedelta(seconds=settings.stale_claim_seconds)
    if live.stripe_payment_intent_id is None and live.status == PaymentStatus.CREATED and utcnow() - live.created_at > stale_claim:
        release_attempt(live, PaymentStatus.CANCELED, "abandoned before reaching Stripe")
        await _release_allocations(session, live)
        await session.flush()
        return None
    return live


async def _try_claim(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    *,
    link_id: uuid.UUID,
    payment_method_id: str,
    card: CardSummary | None,
    amount: int | str | None,
) -> _Claim | PayOutcome:
    async with sessions.begin() as session:
        link, invoice, customer = await _payable_link(session, link_id, lock=True)
        live = await _take_live_slot(session, settings, invoice.id)
        if live is not None:
            return PayOutcome(live.status, live.id)
        _check_payable(invoice)
        charge = _charge_for(invoice, amount)  # under the invoice row lock: the balance of this moment
        again = await _just_paid(session, invoice.id, charge, payment_method_id)
        if again is not None:
            return PayOutcome(again.status, again.id)  # the same form sent twice: nothing is charged again
        await _check_failed_attempts(session, settings, invoice)  # under the invoice row lock
        stripe_customer_id, brand, last4 = await _card_for(session, link, customer, payment_method_id, card)
        payment_id = uuid.uuid4()
        payment = Payment(
            id=payment_id,
            invoice_id=invoice.id,
            live_invoice_id=invoice.id,
            stripe_payment_method_id=payment_method_id,
            idempotency_key=f"paylink-{invoice.id}-{payment_id}",
            amount=charge,
            currency=invoice.currency,
            brand=brand,
            last4=last4,
            status=PaymentStatus.CREATED,
            scope=SCOPE_INVOICE,
            link_id=link.id,
        )
        session.add(payment)
        invoice_id = invoice.id  # read before a failed flush expires the instance
        try:
            await session.flush()
        except IntegrityError:
            raise _ClaimedElsewhere(str(invoice_id)) from None
        part = charge < invoice.amount_due - invoice.amount_paid
        audit.record(session, "link", "payment.claim", f"invoice:{invoice.number}", payment=str(payment_id), amount=charge, part=part)
        metadata = {"invoice_id": str(invoice.id), "payment_id": str(payment_id), "invoice_number": invoice.number}
        return _Claim(payment, stripe_customer_id, metadata)


async def _just_paid(session: AsyncSession, invoice_id: uuid.UUID, amount: int, payment_method_id: str) -> Payment | None:
    """A payment of `amount` on the invoice with this card that succeeded within DUPLICATE_WINDOW, if any."""
    query = (
        select(Payment)
        .where(
            Payment.invoice_id == invoice_id,
            Payment.scope == SCOPE_INVOICE,
            Payment.amount == amount,
            Payment.stripe_payment_method_id == payment_method_id,
            Payment.status == PaymentStatus.SUCCEEDED,
            Payment.created_at > utcnow() - DUPLICATE_WINDOW,
        )
        .order_by(Payment.created_at.desc())
        .limit(1)
    )
    return (await session.execute(query)).scalar_one_or_none()


async def _try_claim_all(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    *,
    link_id: uuid.UUID,
    payment_method_id: str,
    card: CardSummary | None,
    expected_total: int | None = None,
) -> _Claim | PayOutcome:
    """Claim one attempt that pays every sent, open invoice of the customer (scope "all").

    Every invoice row is locked, in one fixed order (by id) so that two such claims cannot deadlock;
    the set and the total are recomputed under those locks, so an invoice voided or paid elsewhere
    after the page was shown is left out before anything is charged. None of them may have a live
    attempt: the payment takes the page's invoice's slot, and one allocation per invoice takes
    that invoice's slot (PaymentAllocation.live_invoice_id), until the payment ends."""
    async with sessions.begin() as session:
        link, page_invoice, customer = await _payable_link(session, link_id)  # not locked yet: see the lock order
        if not may_pay_all(link):
            raise PaymentRefused(N_("This link pays this invoice only."))
        ids = list((await session.execute(pay_all_invoices(customer.id, page_invoice.currency))).scalars())
        if page_invoice.id not in ids:
            ids.append(page_invoice.id)
        locked = (
            await session.execute(
                select(Invoice).where(Invoice.id.in_(ids)).order_by(Invoice.id).with_for_update().execution_options(populate_existing=True)
            )
        ).scalars()
        invoices = {inv.id: inv for inv in locked}
        page_invoice = invoices[page_invoice.id]
        live = await _take_live_slot(session, settings, page_invoice.id)
        if live is not None:
            return PayOutcome(live.status, live.id)  # a double submit finds the first attempt
        _check_payable(page_invoice)
        if link.revoked_at is not None or link.expires_at <= utcnow():
            raise PaymentRefused(N_("This payment link is no longer valid."))
        # Under the locks: still payable, still sent (a void revokes the links), nothing in flight.
        still = set((await session.execute(pay_all_invoices(customer.id, page_invoice.currency).where(Invoice.id.in_(ids)))).scalars())
        chosen = sorted((inv for inv in invoices.values() if inv.id in still or inv.id == page_invoice.id), key=lambda i: i.number)
        for inv in chosen:
            if inv.id != page_invoice.id and await _take_live_slot(session, settings, inv.id) is not None:
                raise _busy(inv.number)
        await _check_failed_attempts(session, settings, page_invoice)
        stripe_customer_id, brand, last4 = await _card_for(session, link, customer, payment_method_id, card)
        shares = [(inv, balance_of(inv.amount_due, inv.amount_paid)) for inv in chosen]
        shares = [(inv, share) for inv, share in shares if share > 0]
        total = sum(share for _, share in shares)
        if total <= 0:
            raise PaymentRefused(N_("This invoice is already paid, or its payment is being confirmed."))
        if expected_total is not None and total > expected_total:
            # More than the page showed (an invoice was sent meanwhile): never charge more than was asked.
            raise PaymentRefused(TOTAL_CHANGED, {"total": total}, page_invoice.currency)
        if total > 99_999_999:
            raise PaymentRefused(N_("Together these invoices are more than a single card payment allows. Please pay them one by one."))
        payment_id = uuid.uuid4()
        payment = Payment(
            id=payment_id,
            invoice_id=page_invoice.id,
            live_invoice_id=page_invoice.id,
            stripe_payment_method_id=payment_method_id,
            idempotency_key=f"paylink-all-{page_invoice.id}-{payment_id}",
            amount=total,
            currency=page_invoice.currency,
            brand=brand,
            last4=last4,
            status=PaymentStatus.CREATED,
            scope=SCOPE_ALL,
            link_id=link.id,
        )
        session.add(payment)
        for inv, share in shares:
            session.add(PaymentAllocation(payment_id=payment_id, invoice_id=inv.id, amount=share, live_invoice_id=inv.id))
        page_id = page_invoice.id
        try:
            await session.flush()
        except IntegrityError:
            raise _ClaimedElsewhere(str(page_id)) from None
        numbers = ",".join(inv.number for inv, _ in shares)
        audit.record(
            session,
            "link",
            "payment.claim",
            f"invoice:{page_invoice.number}",
            payment=str(payment_id),
            amount=total,
            scope="all",
            invoices=numbers,
        )
        metadata = {
            "invoice_id": str(page_invoice.id),
            "payment_id": str(payment_id),
            "invoice_number": page_invoice.number,
            "scope": SCOPE_ALL,
            "invoices": numbers if len(numbers) <= _METADATA_VALUE else numbers[: _METADATA_VALUE - 1] + "…",
        }
        return _Claim(payment, stripe_customer_id, metadata)


def _busy(number: str) -> PaymentRefused:
    return PaymentRefused(
        N_("A payment for invoice %(number)s is already under way. Please wait for it to finish, then pay the rest."),
        texts={"number": number},
    )


async def live_payment(session: AsyncSession, invoice_id: uuid.UUID) -> Payment | None:
    """The attempt holding the invoice's live slot: its own payment, or a pay-all payment that includes it."""
    own = (await session.execute(select(Payment).where(Payment.live_invoice_id == invoice_id))).scalar_one_or_none()
    if own is not None:
        return own
    query = (
        select(Payment)
        .join(PaymentAllocation, PaymentAllocation.payment_id == Payment.id)
        .where(PaymentAllocation.live_invoice_id == invoice_id)
    )
    return (await session.execute(query)).scalar_one_or_none()


async def _release_allocations(session: AsyncSession, payment: Payment) -> None:
    """A pay-all attempt that ended gives every invoice's slot back."""
    if payment.scope == SCOPE_ALL:
        await session.execute(update(PaymentAllocation).where(PaymentAllocation.payment_id == payment.id).values(live_invoice_id=None))


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
        await _release_allocations(session, row)
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
                    await _release_allocations(session, row)
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
    live = await live_payment(session, invoice.id)  # its own attempt, or a pay-all attempt that includes it
    if live is not None:
        raise LinkError(f"invoice {invoice.number} has a payment in progress; run `python -m links reconcile` first")
    invoice.status = InvoiceStatus.VOID
    await session.execute(
        update(PaymentLink).where(PaymentLink.invoice_id == invoice.id, PaymentLink.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    audit.record(session, actor, "invoice.void", f"invoice:{invoice.number}")
    return invoice
