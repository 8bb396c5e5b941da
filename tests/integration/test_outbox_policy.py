"""What the invoicing rules make of the outbox: flags add up, a paused address gets nothing, a
template bug delays mail but loses none, no stored message holds a link, and old data goes.

The shop is driven through its services (the container every root opens) and the worker's own
entry point (`python -m emails.worker --once`), on real localstripe and aiosmtpd."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

import services
from emails import outbox, worker
from emails.messages import InvoiceFacts, Kind, receipt_payload
from emails.models import OutboxMessage
from links.customers import add_customer, find_customer
from links.invoices import create_invoice
from links.issuing import issue_link
from links.models import Invoice, LinkOpen, LinkRequest, PaymentLink
from links.retention import purge_expired
from links.verification import change_email, request_verification
from payments.cards import sync_profiles
from payments.checkout import pay_with_saved_profile
from plumbing.settings import Settings
from tests.harness import (
    CARD_OK,
    PAY_LINK,
    VERIFY_LINK,
    LocalStripe,
    SmtpServer,
    db_execute,
    db_query,
    html_part,
    in_thread,
    text_part,
)
from tests.integration.helpers import csrf_of, unique_email

pytestmark = pytest.mark.postgres


@pytest.fixture
def worker_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The worker's environment: no in-process loop; these tests run `--once` themselves."""
    env["OUTBOX_IN_PROCESS"] = "false"
    env["OUTBOX_BACKOFF_BASE_SECONDS"] = "0.05"
    env["OUTBOX_BACKOFF_MAX_SECONDS"] = "0.1"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def shop(worker_env: dict[str, str], settings: Settings, localstripe: LocalStripe) -> Shop:
    return Shop(Settings.from_env(worker_env), localstripe)


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return in_thread(asyncio.run, coroutine)


@dataclass
class Bill:
    email: str
    number: str
    link_id: uuid.UUID
    card: str


@dataclass
class WorkerRun:
    sent: int
    retrying: int
    dead: int


class Shop:
    """The merchant's side: customers, invoices, payments, Stripe's events, and the worker."""

    def __init__(self, settings: Settings, localstripe: LocalStripe) -> None:
        self.settings = settings
        self.localstripe = localstripe

    def worker_once(self) -> WorkerRun:
        """`python -m emails.worker --once`, in-process: what an operator's cron would run."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = in_thread(worker.main, ["--once"])
        assert code == 0
        match = re.fullmatch(r"sent (\d+), retrying (\d+), dead (\d+)\n", out.getvalue())
        assert match, out.getvalue()
        return WorkerRun(*(int(n) for n in match.groups()))

    def bill(self) -> Bill:
        """A verified customer with a saved card, and an invoice whose link is emailed."""
        email = unique_email("policy")
        stripe_id, [card] = self.localstripe.customer_with_cards(email, "Test Customer", CARD_OK)

        async def go() -> Bill:
            async with services.open_services(self.settings) as s:
                async with s.sessions.begin() as session:
                    customer = await add_customer(
                        session, email=email, name="Test Customer", actor="test", stripe_customer_id=stripe_id, verified=True
                    )
                    invoice = await create_invoice(
                        session, customer=customer, amount="120.50", currency="eur", description="Annual service", actor="test"
                    )
                    issued = await issue_link(session, s.settings, invoice=invoice, customer=customer, actor="test")
                    assert issued.emailed
                await sync_profiles(s.sessions, s.gateway, customer.id)
                return Bill(email, invoice.number, issued.link_id, card)

        return run(go())  # type: ignore[no-any-return]

    def pay(self, bill: Bill) -> None:
        """The customer pays with the saved card (what POST /pay does)."""

        async def go() -> str:
            async with services.open_services(self.settings) as s:
                outcome = await pay_with_saved_profile(s.sessions, s.gateway, s.settings, link_id=bill.link_id, payment_method_id=bill.card)
                return outcome.status

        assert run(go()) == "succeeded"

    def stripe_event(self, kind: str, obj: dict[str, Any]) -> None:
        """A verified webhook event, applied as POST /webhooks/stripe applies it."""
        event = {"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": kind, "created": int(time.time()), "data": {"object": obj}}

        async def go() -> bool:
            async with services.open_services(self.settings, background=True) as s:
                return await s.events.apply(event)

        assert run(go()) is True

    def verification_request(self, email: str) -> None:
        """`python -m links customer verify EMAIL`: email the customer a confirmation link."""

        async def go() -> None:
            async with services.open_services(self.settings) as s, s.sessions.begin() as session:
                request_verification(session, s.settings, await find_customer(session, email), actor="test")

        run(go())

    def new_unverified_customer(self) -> str:
        """`customer add` without --verified: the confirmation email is queued with the customer."""
        email = unique_email("unverified")

        async def go() -> None:
            async with services.open_services(self.settings) as s, s.sessions.begin() as session:
                customer = await add_customer(session, email=email, name="New Customer", actor="test")
                request_verification(session, s.settings, customer, actor="test")

        run(go())
        return email

    def change_email(self, email: str, new_email: str) -> None:
        async def go() -> None:
            async with services.open_services(self.settings) as s, s.sessions.begin() as session:
                await change_email(session, s.settings, await find_customer(session, email), new_email, actor="test")

        run(go())

    # What an operator reads.

    def query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return db_query(self.settings.database_url, sql, **params)

    def needs_attention(self, number: str) -> str:
        [(flags,)] = self.query("SELECT needs_attention FROM invoices WHERE number = :n", n=number)
        return str(flags or "")

    def outbox_rows(self, kind: str) -> list[tuple[Any, ...]]:
        return self.query("SELECT recipient, status, attempts, last_error FROM outbox WHERE kind = :k ORDER BY id", k=kind)

    def audit(self, action: str) -> list[tuple[str, dict[str, Any]]]:
        rows = self.query("SELECT subject, details FROM audit_log WHERE action = :a ORDER BY id", a=action)
        return [(subject, json.loads(details) if isinstance(details, str) else details) for subject, details in rows]


class TestFlagsAddUp:
    """Finance sees every reason an invoice needs attention: a bounced receipt never hides a dispute."""

    def test_a_dead_receipt_keeps_the_dispute_flag(self, shop: Shop, smtp: SmtpServer) -> None:
        bill = shop.bill()
        assert shop.worker_once().sent == 1  # the invoice email
        shop.pay(bill)  # the receipt is queued
        [(intent_id,)] = shop.query(
            "SELECT p.stripe_payment_intent_id FROM payments p JOIN invoices i ON i.id = p.invoice_id WHERE i.number = :n", n=bill.number
        )
        dispute = {"id": "dp_policy", "object": "dispute", "amount": 12050, "currency": "eur", "reason": "fraudulent"}
        shop.stripe_event("charge.dispute.created", {**dispute, "payment_intent": intent_id})
        assert shop.needs_attention(bill.number).startswith("disputed: fraudulent")

        smtp.mailbox.rcpt_replies.append("550 5.1.1 No such user here")  # the customer's mailbox is gone
        ran = shop.worker_once()
        assert (ran.dead, ran.sent) == (1, 1)  # the receipt died; the dispute alert went to finance
        [(recipient, status, _, error)] = shop.outbox_rows(Kind.RECEIPT)
        assert (recipient, status) == (bill.email, "dead") and "550" in error

        flags = shop.needs_attention(bill.number)
        assert "disputed: fraudulent (12050 eur)" in flags
        assert f"email undeliverable to {bill.email}: 550" in flags
        shop.worker_once()  # the alert about the dead receipt
        subjects = [m["Subject"] for m in smtp.mailbox.to("finance@acme.test")]
        assert subjects == [
            f"[Acme Consulting] Invoice {bill.number} needs attention",
            f"[Acme Consulting] Email undeliverable to {bill.email}",
        ]
        [(paused_at,)] = shop.query("SELECT email_undeliverable_at FROM customers WHERE email = :e", e=bill.email)
        assert paused_at is not None

    def test_the_same_bounce_twice_is_one_flag(self, shop: Shop, smtp: SmtpServer) -> None:
        bill = shop.bill()
        smtp.mailbox.replies.append("554 5.7.1 Message rejected")  # the content, not the address
        assert shop.worker_once().dead == 1
        retried = run(_requeue_dead(shop.settings))
        assert retried == 1
        smtp.mailbox.replies.append("554 5.7.1 Message rejected")
        assert shop.worker_once().dead == 1
        assert shop.needs_attention(bill.number) == f"email undeliverable to {bill.email}: 554 5.7.1 Message rejected"


async def _requeue_dead(settings: Settings) -> int:
    """`python -m links outbox retry --dead`."""
    async with services.open_services(settings) as s, s.sessions.begin() as session:
        return await outbox.requeue(session, include_dead=True)


class TestPausedAddress:
    """Once mail to an address bounces for good, nothing more is sent to it, whatever the kind."""

    def test_a_receipt_to_a_paused_address_is_not_sent(self, shop: Shop, smtp: SmtpServer) -> None:
        bill = shop.bill()
        smtp.mailbox.rcpt_replies.append("550 5.1.1 No such user here")
        assert shop.worker_once().dead == 1  # the invoice email bounced: the address is paused
        shop.worker_once()  # finance hears of it
        shop.pay(bill)  # the customer pays anyway, from the link finance sent by other means

        assert shop.query("SELECT status FROM invoices WHERE number = :n", n=bill.number) == [("paid",)]
        assert shop.outbox_rows(Kind.RECEIPT) == []  # held, never queued
        assert shop.worker_once().sent == 0
        assert smtp.mailbox.to(bill.email) == []
        [(subject, details)] = shop.audit("email.held")
        assert subject == f"customer:{bill.email}" and details["kind"] == Kind.RECEIPT
        assert "550" in details["reason"]
        assert f"receipt not sent to {bill.email}: email undeliverable: 550" in shop.needs_attention(bill.number)

    def test_a_verification_email_to_a_paused_address_is_not_sent(self, shop: Shop, smtp: SmtpServer) -> None:
        email = shop.new_unverified_customer()
        smtp.mailbox.rcpt_replies.append("550 5.1.1 No such user here")
        assert shop.worker_once().dead == 1  # the confirmation email bounced: the address is paused
        shop.worker_once()  # finance hears of it

        shop.verification_request(email)  # someone asks again: held
        assert [status for (_, status, _, _) in shop.outbox_rows(Kind.VERIFICATION)] == ["dead"]
        assert shop.worker_once().sent == 0
        assert smtp.mailbox.to(email) == []
        [(subject, details)] = shop.audit("email.held")
        assert (subject, details["kind"]) == (f"customer:{email}", Kind.VERIFICATION)

        # The address is corrected: the pause is lifted and the confirmation goes to the new one.
        fixed = unique_email("fixed")
        shop.change_email(email, fixed)
        assert shop.worker_once().sent == 1
        [message] = smtp.mailbox.to(fixed)
        assert VERIFY_LINK.search(text_part(message))


class TestTemplateErrors:
    """A template bug after a deploy delays receipts; once fixed, every one goes out."""

    def test_a_render_error_is_retried_then_sent(self, shop: Shop, smtp: SmtpServer) -> None:
        facts = InvoiceFacts("Acme Consulting", "Ann", "INV-9", "Annual service", 12050, "eur", None)
        subject, good = receipt_payload(facts, amount_paid=12050, brand="visa", last4="4242", paid_at=datetime.now(UTC), locale="en")
        broken = {key: value for key, value in good.items() if key != "amount_paid"}  # what the templates now fail on
        message_id = run(_queue_receipt(shop.settings, subject, broken))

        for attempt in (1, 2):
            ran = shop.worker_once()
            assert (ran.sent, ran.retrying, ran.dead) == (0, 1, 0)
            [(_, status, attempts, error)] = shop.outbox_rows(Kind.RECEIPT)
            assert (status, attempts) == ("pending", attempt)
            assert "cannot render the message" in error and "amount_paid" in error
            time.sleep(0.15)  # the backoff (OUTBOX_BACKOFF_MAX_SECONDS=0.1)
        assert smtp.mailbox.messages == []  # and finance was not told: nothing is dead

        run(_set_payload(shop.settings, message_id, good))  # the fix is deployed
        assert shop.worker_once().sent == 1
        assert [r[1:3] for r in shop.outbox_rows(Kind.RECEIPT)] == [("sent", 3)]
        [receipt] = smtp.mailbox.to("ann@example.com")
        assert receipt["Subject"] == subject and "INV-9" in text_part(receipt)

    def test_a_message_that_can_never_be_built_still_goes_dead(self, shop: Shop, smtp: SmtpServer) -> None:
        facts = InvoiceFacts("Acme Consulting", "Ann", "INV-9", "Annual service", 12050, "eur", None)
        _, payload = receipt_payload(facts, amount_paid=12050, brand="visa", last4="4242", paid_at=datetime.now(UTC), locale="en")
        run(_queue_receipt(shop.settings, "Receipt\nBcc: someone@example.com", payload))
        assert shop.worker_once().dead == 1
        [(_, status, attempts, error)] = shop.outbox_rows(Kind.RECEIPT)
        assert (status, attempts) == ("dead", 1) and "line break" in error


async def _queue_receipt(settings: Settings, subject: str, payload: dict[str, Any]) -> int:
    async with services.open_services(settings) as s, s.sessions.begin() as session:
        message = outbox.enqueue_to_render(session, settings, "ann@example.com", Kind.RECEIPT, subject, payload)
        await session.flush()
        return message.id


async def _set_payload(settings: Settings, message_id: int, payload: dict[str, Any]) -> None:
    async with services.open_services(settings) as s, s.sessions.begin() as session:
        await session.execute(update(OutboxMessage).where(OutboxMessage.id == message_id).values(payload=payload))


# An itsdangerous token as the pay and verify links carry it: a base64 payload, a dot, a signature.
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_\-]{20,}\.[A-Za-z0-9_\-]{20,}")


class TestNoLinksInStorage:
    """Whoever holds a copy of the database cannot open an invoice or confirm an address from it."""

    def test_the_outbox_holds_no_link_yet_every_emailed_link_works(
        self, cli: Any, localstripe: LocalStripe, smtp: SmtpServer, server: Any, browser_client: httpx.Client, settings: Settings
    ) -> None:
        # An unverified customer: the address confirmation goes out, the invoice email is held.
        email = unique_email("storage")
        cus_id, _ = localstripe.customer_with_cards(email, "Sto Rage", CARD_OK)
        assert cli("customer", "add", "--email", email, "--name", "Sto Rage", "--stripe-customer", cus_id).code == 0
        held = cli(
            "invoice", "create", "--customer", email, "--amount", "80", "--currency", "eur", "--description", "Held", "--send", "--json"
        )
        assert held.json()["link"]["emailed"] is False
        # A verified customer: an invoice due tomorrow (so a reminder is due), and a fresh link for it.
        verified = unique_email("verified")
        cus_id, _ = localstripe.customer_with_cards(verified, "Vera Fied", CARD_OK)
        assert cli("customer", "add", "--email", verified, "--name", "Vera Fied", "--stripe-customer", cus_id, "--verified").code == 0
        tomorrow = (date.today() + timedelta(days=1)).isoformat()
        args = ["--amount", "120.50", "--currency", "eur", "--description", "Annual service", "--due", tomorrow, "--send", "--json"]
        number = cli("invoice", "create", "--customer", verified, *args).json()["number"]
        assert cli("remind", "--json").json()["sent"][0]["invoice"] == number
        resent = cli("link", "resend", number, "--json")
        assert "/pay/" in resent.json()["link"]["url"]  # the CLI still shows finance the link it issued

        [confirmation] = smtp.mailbox.wait_for(4)[:1]
        verify_url = VERIFY_LINK.search(text_part(confirmation))
        assert verify_url
        page = browser_client.get(verify_url.group(0))
        assert page.status_code == 200
        assert "your address is confirmed" in browser_client.post(verify_url.group(0), data={"csrf": csrf_of(page.text)}).text
        delivered = smtp.mailbox.wait_for(5)  # ...and the held invoice is released

        kinds = sorted(str(kind) for (kind,) in db_query(settings.database_url, "SELECT kind FROM outbox"))
        # (finance's resend is the invoice email again; the "new link, as you asked" one is the customer's own request)
        assert kinds == sorted([Kind.VERIFICATION, Kind.INVOICE, Kind.REMINDER, Kind.INVOICE, Kind.INVOICE])
        stored = "\n".join(
            json.dumps(row, default=str) for row in db_query(settings.database_url, "SELECT text, html, payload FROM outbox")
        )
        assert "/pay/" not in stored and "/verify/" not in stored
        assert not TOKEN_SHAPE.search(stored)
        urls = [match.group(0) for m in delivered for match in [*PAY_LINK.finditer(text_part(m)), *VERIFY_LINK.finditer(text_part(m))]]
        assert len(urls) == 5
        assert not [url for url in urls if url.rsplit("/", 1)[1] in stored]
        assert all(url in html_part(m) for m, url in zip(delivered, urls, strict=True))  # the button, too

        # Each emailed payment link opens its invoice.
        for url in urls:
            if "/pay/" in url:
                opened = browser_client.get(url)
                assert opened.status_code == 200 and "Pay" in opened.text, url


class TestRetention:
    """Nothing is kept longer than it is useful: old message bodies, link opens and link requests go."""

    def test_old_rows_are_emptied_or_deleted_and_recent_ones_kept(self, shop: Shop, smtp: SmtpServer) -> None:
        settings = shop.settings  # OUTBOX_KEEP_DAYS 30, LINK_OPENS_KEEP_DAYS 400, LINK_REQUESTS_KEEP_DAYS 30
        old_sent, recent_sent = shop.bill(), shop.bill()
        assert shop.worker_once().sent == 2
        old_dead = shop.bill()
        smtp.mailbox.replies.append("554 5.7.1 Message rejected")  # the third invoice email is refused
        assert shop.worker_once().dead == 1
        shop.bill()  # a fourth, still pending (as is finance's alert about the third)
        invoice_rows = "SELECT o.id, i.number FROM outbox o JOIN invoices i ON i.id = o.invoice_id WHERE o.kind = 'invoice'"
        ids = {number: i for i, number in shop.query(invoice_rows)}
        rows = {
            number: shop.query("SELECT status FROM outbox WHERE id = :i", i=ids[number])[0][0]
            for number in (old_sent.number, recent_sent.number, old_dead.number)
        }
        assert rows == {old_sent.number: "sent", recent_sent.number: "sent", old_dead.number: "dead"}
        now = datetime.now(UTC)
        for number, age in ((old_sent.number, 31), (recent_sent.number, 29), (old_dead.number, 31)):
            db_execute(
                settings.database_url, "UPDATE outbox SET created_at = :at WHERE id = :i", at=now - timedelta(days=age), i=ids[number]
            )
        db_execute(settings.database_url, "UPDATE outbox SET created_at = :at WHERE status = 'pending'", at=now - timedelta(days=60))
        run(_add_activity(settings, old_sent.link_id, now))

        assert run(_purge(settings)) == {"outbox_bodies": 2, "link_opens": 1, "link_requests": 1}
        bodies = dict(
            shop.query(
                "SELECT i.number, length(o.text) + length(o.html) + (CASE WHEN o.payload IS NULL THEN 0 ELSE 1 END) "
                "FROM outbox o JOIN invoices i ON i.id = o.invoice_id WHERE o.kind = 'invoice'"
            )
        )
        assert bodies[old_sent.number] == 0 and bodies[old_dead.number] == 0
        assert bodies[recent_sent.number] > 0 and len([n for n, size in bodies.items() if size > 0]) == 2  # and the pending one
        assert shop.query("SELECT count(*) FROM outbox WHERE recipient = :e AND message_id != ''", e=old_sent.email) == [(1,)]
        opens = sorted((now - _aware(at)).days for (at,) in shop.query("SELECT opened_at FROM link_opens"))
        assert opens == [399]
        requests = sorted((now - _aware(at)).days for (at,) in shop.query("SELECT requested_at FROM link_requests"))
        assert requests == [29]

        assert run(_purge(settings)) == {"outbox_bodies": 0, "link_opens": 0, "link_requests": 0}
        assert run(_requeue_dead(settings)) == 0  # an emptied message cannot be sent again


def _aware(value: Any) -> datetime:
    at = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return at if at.tzinfo else at.replace(tzinfo=UTC)


async def _purge(settings: Settings) -> dict[str, int]:
    async with services.open_services(settings) as s:
        return await purge_expired(s.sessions, s.settings)


async def _add_activity(settings: Settings, link_id: uuid.UUID, now: datetime) -> None:
    """Opens of a link (401 and 399 days ago) and fresh-link requests (31 and 29 days ago)."""
    async with services.open_services(settings) as s, s.sessions.begin() as session:
        invoice_id, customer_id = (
            await session.execute(
                select(Invoice.id, Invoice.customer_id)
                .join(PaymentLink, PaymentLink.invoice_id == Invoice.id)
                .where(PaymentLink.id == link_id)
            )
        ).one()
        for days in (401, 399):
            session.add(LinkOpen(link_id=link_id, opened_at=now - timedelta(days=days)))
        for days in (31, 29):
            session.add(LinkRequest(invoice_id=invoice_id, customer_id=customer_id, requested_at=now - timedelta(days=days), sent=True))
