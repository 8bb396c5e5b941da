"""Money state stays right whatever Stripe, the network or our own process does."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from payments.models import Payment, PaymentStatus
from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe, SmtpServer, StallingProxy, db_query, in_thread, wait_until
from tests.integration.helpers import Issued, csrf_of, invoice_status, issue_invoice, offered_cards, post_event


def link_id_of(settings: Settings, number: str) -> uuid.UUID:
    [(raw,)] = db_query(
        settings.database_url,
        "SELECT l.id FROM payment_links l JOIN invoices i ON i.id = l.invoice_id WHERE i.number = :number",
        number=number,
    )
    return uuid.UUID(str(raw))


def pay_through_page(client: httpx.Client, issued: Issued) -> httpx.Response:
    html = client.get(issued.url).text
    return client.post(issued.url, data={"csrf": csrf_of(html), "payment_method": issued.cards[0]})


def paid_intent(localstripe: LocalStripe, issued: Issued) -> Any:
    [intent] = localstripe.payment_intents_for(issued.stripe_customer)
    assert intent.status == "succeeded"
    return intent


class TestOutOfOrderEvents:
    """Late or repeated events never move a paid invoice back."""

    def test_payment_failed_after_succeeded_stays_paid(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        assert "Payment received" in pay_through_page(browser_client, issued).text
        intent = paid_intent(localstripe, issued).to_dict()
        late_failure = {
            **intent,
            "status": "requires_payment_method",
            "last_payment_error": {"code": "card_declined", "message": "declined"},
        }
        assert post_event(server, "payment_intent.payment_failed", late_failure).status_code == 200
        assert post_event(server, "payment_intent.canceled", {**intent, "status": "canceled"}).status_code == 200
        shown = invoice_status(cli, issued.number)
        assert shown["status"] == "paid"
        assert shown["amount_paid"] == 12050
        assert [p["status"] for p in shown["payments"]] == ["succeeded"]


class TestRefundsAndDisputes:
    """Refunds adjust what was paid; a dispute is flagged and finance hears of it."""

    def test_partial_then_full_refund(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        pay_through_page(browser_client, issued)
        intent = paid_intent(localstripe, issued)
        localstripe.client.v1.refunds.create({"payment_intent": intent.id, "amount": 2050})
        charge = localstripe.client.v1.charges.retrieve(
            intent.latest_charge.id if hasattr(intent.latest_charge, "id") else intent.latest_charge
        )
        assert post_event(server, "charge.refunded", charge.to_dict()).status_code == 200
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_refunded"]) == ("partially_refunded", 2050)
        page = browser_client.get(issued.url).text
        assert "Payment partly refunded" in page
        assert "€20.50" in page

        localstripe.client.v1.refunds.create({"payment_intent": intent.id, "amount": 10000})
        charge = localstripe.client.v1.charges.retrieve(charge.id)
        full = charge.to_dict()
        assert post_event(server, "charge.refunded", full).status_code == 200
        # The earlier, smaller event delivered again late changes nothing.
        assert post_event(server, "charge.refunded", {**full, "amount_refunded": 2050}).status_code == 200
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_refunded"]) == ("refunded", 12050)

    def test_dispute_flags_invoice_and_emails_finance(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        pay_through_page(browser_client, issued)
        intent = paid_intent(localstripe, issued)
        dispute = {
            "id": "dp_test1",
            "object": "dispute",
            "amount": 12050,
            "currency": "eur",
            "reason": "fraudulent",
            "payment_intent": intent.id,
        }
        assert post_event(server, "charge.dispute.created", dispute).status_code == 200
        shown = invoice_status(cli, issued.number)
        assert "disputed: fraudulent" in shown["needs_attention"]
        wait_until(lambda: smtp.mailbox.to("finance@acme.test"), what="the finance alert")
        [alert] = smtp.mailbox.to("finance@acme.test")
        assert issued.number in alert["Subject"]
        listed = cli("invoice", "list", "--json").json()["invoices"]
        assert any(i["number"] == issued.number and "disputed" in (i["needs_attention"] or "") for i in listed)


class TestSavedProfilesInSync:
    """What Stripe says about saved cards is what the page offers."""

    def test_detached_card_is_no_longer_offered(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, "5555555555554444")  # two cards (the same one twice is kept once)
        first, second = issued.cards
        assert offered_cards(browser_client.get(issued.url).text) == [first, second]
        detached = localstripe.client.v1.payment_methods.detach(second)
        assert post_event(server, "payment_method.detached", detached.to_dict()).status_code == 200
        page = browser_client.get(issued.url).text
        assert offered_cards(page) == [first]
        assert second not in page

    def test_attached_card_and_new_default_are_picked_up(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        new_pm = localstripe.add_card(issued.stripe_customer, "5555555555554444")
        pm = localstripe.client.v1.payment_methods.retrieve(new_pm).to_dict()
        assert post_event(server, "payment_method.attached", pm).status_code == 200
        customer = localstripe.client.v1.customers.update(issued.stripe_customer, {"invoice_settings": {"default_payment_method": new_pm}})
        assert post_event(server, "customer.updated", customer.to_dict()).status_code == 200
        assert offered_cards(browser_client.get(issued.url).text) == [new_pm, issued.cards[0]]


class CrashingSession(Session):
    """A session whose commit fails once the payment it records has succeeded: the process 'dies' there."""


@event.listens_for(CrashingSession, "before_commit")
def _crash_when_recording_success(session: Session) -> None:
    if any(isinstance(obj, Payment) and obj.status == PaymentStatus.SUCCEEDED for obj in session.identity_map.values()):
        raise RuntimeError("simulated crash between Stripe's answer and our commit")


def pay_and_crash(settings: Settings, link_id: uuid.UUID, payment_method: str) -> None:
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from payments.checkout import pay_with_saved_profile
    from services import open_services

    async def run() -> None:
        async with open_services(settings) as services:
            # The container's engine, with sessions whose commit fails after Stripe charged.
            sessions = async_sessionmaker(services.engine, expire_on_commit=False, sync_session_class=CrashingSession)
            with pytest.raises(RuntimeError, match="simulated crash"):
                await pay_with_saved_profile(sessions, services.gateway, settings, link_id=link_id, payment_method_id=payment_method)

    asyncio.run(run())


@pytest.mark.postgres
class TestCrashRecovery:
    """If we die after Stripe charged but before we recorded it, the invoice still ends paid, charged once."""

    def test_reconcile_finds_the_charge(self, cli, localstripe: LocalStripe, settings: Settings) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        pay_and_crash(settings, link_id_of(settings, issued.number), issued.cards[0])
        assert invoice_status(cli, issued.number)["status"] == "open"
        [intent] = localstripe.payment_intents_for(issued.stripe_customer)
        assert intent.status == "succeeded"

        result = cli("reconcile", "--json")
        assert result.code == 0, result.err
        report = result.json()
        assert any(c["invoice"] == issued.number and c["to"] in ("paid", "succeeded") for c in report["changes"])
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_paid"]) == ("paid", 12050)
        assert len(localstripe.payment_intents_for(issued.stripe_customer)) == 1

        again = cli("reconcile", "--json").json()  # safe to run again: nothing more changes
        assert not [c for c in again["changes"] if c["invoice"] == issued.number]
        assert invoice_status(cli, issued.number)["amount_paid"] == 12050

    def test_webhook_finds_the_charge(self, cli, localstripe: LocalStripe, settings: Settings, server) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        pay_and_crash(settings, link_id_of(settings, issued.number), issued.cards[0])
        # localstripe delivers its own signed payment_intent.succeeded about a second later.
        wait_until(lambda: invoice_status(cli, issued.number)["status"] == "paid", timeout=15, what="the webhook to mark it paid")
        assert invoice_status(cli, issued.number)["amount_paid"] == 12050
        assert len(localstripe.payment_intents_for(issued.stripe_customer)) == 1


class TestStripeTimeouts:
    """A timeout never says 'failed': the customer is told we are confirming, and nothing is charged twice."""

    def test_timeout_on_confirm_shows_confirming_then_recovers(
        self, cli, localstripe: LocalStripe, settings: Settings, start_server, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        proxy = StallingProxy(localstripe.base, stall=r"/confirm$").start()
        try:
            issued = issue_invoice(cli, localstripe, CARD_OK)
            server = start_server(STRIPE_API_BASE=proxy.base, STRIPE_TIMEOUT_SECONDS="1", STRIPE_MAX_NETWORK_RETRIES="0")
            with httpx.Client(base_url=server.base, follow_redirects=True, timeout=30) as client:
                page = pay_through_page(client, issued)
                assert "We are confirming your payment" in page.text
                assert 'name="payment_method"' not in page.text  # no second Pay button
                assert proxy.stalled, "the confirm call should have been stalled"
                assert invoice_status(cli, issued.number)["payments"][0]["status"] == "pending"
                assert "We are confirming your payment" in client.get(issued.url).text

                # The confirm never reached Stripe. Once the attempt is stale, reconcile cancels it at
                # Stripe and frees the invoice; the customer can pay again, and is charged once.
                monkeypatch.setenv("STRIPE_TIMEOUT_SECONDS", "1")
                monkeypatch.setenv("STALE_CLAIM_SECONDS", "1.5")  # longer than the Stripe timeout, as it must be
                time.sleep(1.6)
                report = cli("reconcile", "--json").json()
                assert any(c["invoice"] == issued.number and c["to"] == "canceled" for c in report["changes"])
                again = client.get(issued.url).text
                assert offered_cards(again) == issued.cards
                assert "Pay €120.50 with Visa •••• 4242" in again
        finally:
            proxy.stop()
        intents = localstripe.payment_intents_for(issued.stripe_customer)
        assert [pi.status for pi in intents] == ["canceled"]
        assert not any(pi.status == "succeeded" for pi in intents)


def apply_concurrently(settings: Settings, snapshots: list[Any]) -> None:
    """Apply several Stripe snapshots at the same moment, each in its own transaction, as the
    pay POST and a webhook (or two webhook deliveries) would."""
    from payments.state import apply_intent
    from services import open_services

    async def run() -> None:
        async with open_services(settings) as services:

            async def apply(snapshot: Any) -> None:
                async with services.sessions.begin() as session:
                    await session.run_sync(apply_intent, settings, snapshot, actor="test")

            await asyncio.gather(*(apply(s) for s in snapshots))

    in_thread(asyncio.run, run())


@pytest.mark.postgres
class TestConcurrentTruth:
    """The same success recorded twice at the same moment pays once and sends one receipt."""

    def test_simultaneous_success_sends_one_receipt(self, cli, localstripe: LocalStripe, settings: Settings) -> None:
        from payments.gateway import intent_snapshot

        issued = issue_invoice(cli, localstripe, CARD_OK)
        pay_and_crash(settings, link_id_of(settings, issued.number), issued.cards[0])  # charged at Stripe, not recorded
        snapshot = intent_snapshot(paid_intent(localstripe, issued).to_dict())
        apply_concurrently(settings, [snapshot, snapshot, snapshot])
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_paid"]) == ("paid", 12050)
        assert db_query(settings.database_url, "SELECT count(*) FROM outbox WHERE kind = 'receipt'") == [(1,)]

    def test_refund_event_before_success_event(self, cli, localstripe: LocalStripe, settings: Settings, server) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        pay_and_crash(settings, link_id_of(settings, issued.number), issued.cards[0])
        intent = paid_intent(localstripe, issued)
        localstripe.client.v1.refunds.create({"payment_intent": intent.id})
        charge_id = intent.latest_charge.id if hasattr(intent.latest_charge, "id") else intent.latest_charge
        charge = localstripe.client.v1.charges.retrieve(charge_id).to_dict()
        assert post_event(server, "charge.refunded", charge).status_code == 200
        assert post_event(server, "payment_intent.succeeded", intent.to_dict()).status_code == 200
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_paid"], shown["amount_refunded"]) == ("refunded", 12050, 12050)


class TestBatchedRecovery:
    """A payment found by its metadata and refunded in the same webhook batch ends refunded."""

    def test_success_and_refund_in_one_batch_after_a_crash_before_the_id_was_kept(
        self, cli, localstripe: LocalStripe, settings: Settings
    ) -> None:
        from sqlalchemy.orm import Session

        from payments.events import record_and_apply_batch
        from plumbing.db import create_sync_sqlite_engine
        from tests.harness import db_execute

        issued = issue_invoice(cli, localstripe, CARD_OK)
        pay_and_crash(settings, link_id_of(settings, issued.number), issued.cards[0])
        db_execute(settings.database_url, "UPDATE payments SET stripe_payment_intent_id = NULL")  # died before keeping the id
        intent = paid_intent(localstripe, issued)
        localstripe.client.v1.refunds.create({"payment_intent": intent.id})
        charge_id = intent.latest_charge.id if hasattr(intent.latest_charge, "id") else intent.latest_charge
        charge = localstripe.client.v1.charges.retrieve(charge_id).to_dict()
        events = [
            {"id": "evt_b_paid", "type": "payment_intent.succeeded", "created": int(time.time()), "data": {"object": intent.to_dict()}},
            {"id": "evt_b_refund", "type": "charge.refunded", "created": int(time.time()), "data": {"object": charge}},
        ]
        engine = create_sync_sqlite_engine(settings.database_url)
        try:
            with Session(engine) as session, session.begin(), session.no_autoflush:
                assert record_and_apply_batch(session, settings, events) == [True, True]
        finally:
            engine.dispose()
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_refunded"]) == ("refunded", 12050)


def intent_from_elsewhere(localstripe: LocalStripe, issued: Issued, amount: int, currency: str) -> dict[str, Any]:
    """A PaymentIntent really paid at localstripe for this invoice, not through our page (another
    system, a dashboard payment): the amount and currency are whatever it says."""
    intent = localstripe.client.v1.payment_intents.create(
        {
            "amount": amount,
            "currency": currency,
            "customer": issued.stripe_customer,
            "payment_method": issued.cards[0],
            "payment_method_types": ["card"],
            "metadata": {"invoice_id": issued.invoice_id},
            "confirm": True,
        }
    )
    assert intent.status == "succeeded"
    return intent.to_dict()


def outbox_kinds(settings: Settings) -> dict[str, int]:
    return dict(db_query(settings.database_url, "SELECT kind, count(*) FROM outbox GROUP BY kind"))


@pytest.mark.postgres
class TestAmountAndCurrencyChecks:
    """A payment that does not cover the invoice, or comes in another currency, is recorded but never marks it paid."""

    def test_a_payment_in_another_currency_is_recorded_flagged_and_not_counted(
        self, cli, localstripe: LocalStripe, server, settings: Settings, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)  # €120.50
        intent = intent_from_elsewhere(localstripe, issued, 12050, "usd")
        assert post_event(server, "payment_intent.succeeded", intent).status_code == 200
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_paid"], shown["paid_at"]) == ("open", 0, None)
        assert "in USD, not the invoice's EUR" in shown["needs_attention"]
        assert db_query(settings.database_url, "SELECT status, amount, currency FROM payments") == [("succeeded", 12050, "usd")]
        kinds = outbox_kinds(settings)
        assert kinds.get("finance_alert") == 1 and "receipt" not in kinds
        assert offered_cards(browser_client.get(issued.url).text) == issued.cards  # still asks to be paid

        # Finance refunds it at Stripe: the invoice's refunds (in euros) do not change.
        localstripe.client.v1.refunds.create({"payment_intent": intent["id"]})
        latest = intent["latest_charge"]
        charge = localstripe.client.v1.charges.retrieve(latest["id"] if isinstance(latest, dict) else latest).to_dict()
        assert post_event(server, "charge.refunded", charge).status_code == 200
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_paid"], shown["amount_refunded"]) == ("open", 0, 0)

    def test_an_underpayment_leaves_the_rest_to_pay(
        self, cli, localstripe: LocalStripe, server, settings: Settings, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)  # €120.50
        assert post_event(server, "payment_intent.succeeded", intent_from_elsewhere(localstripe, issued, 5000, "eur")).status_code == 200
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_paid"], shown["paid_at"]) == ("open", 5000, None)
        assert "underpaid by €70.50" in shown["needs_attention"]
        assert outbox_kinds(settings).get("finance_alert") == 1

        # The page asks for the rest, in its heading and on its button, not for the whole invoice.
        page = browser_client.get(issued.url).text
        assert "Pay €70.50" in page and "Pay €70.50 with Visa •••• 4242" in page and "Pay €120.50" not in page
        # The customer pays the rest on the page: €70.50 is charged, and now the invoice is paid.
        assert "Payment received" in pay_through_page(browser_client, issued).text
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_paid"]) == ("paid", 12050)
        assert sorted(pi.amount for pi in localstripe.payment_intents_for(issued.stripe_customer)) == [5000, 7050]
        assert "overpaid" not in shown["needs_attention"]

    def test_an_overpayment_is_paid_and_flagged(self, cli, localstripe: LocalStripe, server, settings: Settings) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        assert post_event(server, "payment_intent.succeeded", intent_from_elsewhere(localstripe, issued, 13000, "eur")).status_code == 200
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_paid"]) == ("paid", 13000)
        assert "overpaid by 950" in shown["needs_attention"]


class DyingSession(Session):
    """A session whose commit fails when it would keep a new PaymentIntent's id: the process 'dies'
    after Stripe created the intent and before we recorded it."""


@event.listens_for(DyingSession, "before_commit")
def _die_before_keeping_the_intent_id(session: Session) -> None:
    if any(
        isinstance(obj, Payment) and obj.stripe_payment_intent_id and obj.status == PaymentStatus.REQUIRES_CONFIRMATION
        for obj in session.identity_map.values()
    ):
        raise RuntimeError("simulated crash between creating the intent and keeping its id")


def pay_and_die_before_keeping_the_intent(settings: Settings, link_id: uuid.UUID, payment_method: str) -> None:
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from payments.checkout import pay_with_saved_profile
    from services import open_services

    async def run() -> None:
        async with open_services(settings) as services:
            sessions = async_sessionmaker(services.engine, expire_on_commit=False, sync_session_class=DyingSession)
            with pytest.raises(RuntimeError, match="simulated crash"):
                await pay_with_saved_profile(sessions, services.gateway, settings, link_id=link_id, payment_method_id=payment_method)

    in_thread(asyncio.run, run())


@pytest.mark.postgres
class TestOrphanIntents:
    """An intent created at Stripe whose id we never kept is canceled by reconcile, never while its attempt might still confirm it."""

    def test_reconcile_cancels_the_orphan_once_its_attempt_is_abandoned(
        self, cli, localstripe: LocalStripe, settings: Settings, server, browser_client: httpx.Client
    ) -> None:
        from datetime import UTC, datetime, timedelta

        from tests.harness import db_execute

        issued = issue_invoice(cli, localstripe, CARD_OK)
        pay_and_die_before_keeping_the_intent(settings, link_id_of(settings, issued.number), issued.cards[0])
        [orphan] = localstripe.payment_intents_for(issued.stripe_customer)
        assert orphan.status == "requires_confirmation"
        [(payment_id, kept)] = db_query(settings.database_url, "SELECT id, stripe_payment_intent_id FROM payments")
        assert orphan.metadata["payment_id"] == str(uuid.UUID(str(payment_id))) and kept is None
        # Someone else's unconfirmed intent for the same customer (no payment of ours named): never touched.
        theirs = localstripe.client.v1.payment_intents.create(
            {"amount": 999, "currency": "eur", "customer": issued.stripe_customer, "payment_method": issued.cards[0],
             "payment_method_types": ["card"], "metadata": {"order": "elsewhere-42"}}
        )  # fmt: skip

        # The attempt is still live: it may be about to keep the id and confirm. Reconcile leaves it.
        first = cli("reconcile", "--json")
        assert first.code == 0, first.err
        assert first.json()["orphans_canceled"] == 0
        assert localstripe.client.v1.payment_intents.retrieve(orphan.id).status == "requires_confirmation"

        # Later (past STALE_CLAIM_SECONDS), the attempt is abandoned: reconcile releases it and cancels its intent.
        db_execute(settings.database_url, "UPDATE payments SET updated_at = :old", old=datetime.now(UTC) - timedelta(minutes=10))
        second = cli("reconcile", "--json").json()
        assert second["orphans_canceled"] == 1
        assert any(c.get("intent") == orphan.id and c["to"] == "canceled" for c in second["changes"])
        assert localstripe.client.v1.payment_intents.retrieve(orphan.id).status == "canceled"
        assert localstripe.client.v1.payment_intents.retrieve(theirs.id).status == "requires_confirmation"
        assert db_query(settings.database_url, "SELECT status, stripe_payment_intent_id FROM payments") == [("canceled", orphan.id)]
        assert cli("reconcile", "--json").json()["orphans_canceled"] == 0  # safe to run again

        # The customer pays again and is charged once.
        assert "Payment received" in pay_through_page(browser_client, issued).text
        statuses = sorted(pi.status for pi in localstripe.payment_intents_for(issued.stripe_customer) if pi.id != theirs.id)
        assert statuses == ["canceled", "succeeded"]
        assert invoice_status(cli, issued.number)["status"] == "paid"
