"""Every open invoice in one charge: one PaymentIntent, an allocation per invoice, one receipt (issue 13)."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import httpx
import pytest

from plumbing.settings import Settings
from tests.harness import CARD_3DS, CARD_OK, LocalStripe, SmtpServer, db_execute, db_query, text_part, wait_until
from tests.integration.helpers import Issued, another_invoice, csrf_of, invoice_status, issue_invoice, pay_all_form, post_event
from tests.integration.test_documents import pdf_text


def three_open_invoices(cli: Any, localstripe: LocalStripe, card: str = CARD_OK) -> tuple[Issued, list[str]]:
    """A customer with three sent, open invoices in EUR (€100.00, €200.00, €300.00), and two that pay-all
    must leave out: one never sent, one in another currency. Returns the first and all three numbers."""
    first = issue_invoice(cli, localstripe, card, amount="100.00")
    second = another_invoice(cli, first.email, "200.00")
    third = another_invoice(cli, first.email, "300.00")
    another_invoice(cli, first.email, "50.00", send=False)  # never sent: not offered
    another_invoice(cli, first.email, "70.00", currency="usd")  # another currency: not in this charge
    return first, [first.number, second.number, third.number]


def succeeded(localstripe: LocalStripe, customer: str) -> list[Any]:
    return [pi for pi in localstripe.payment_intents_for(customer) if pi.status == "succeeded"]


@pytest.mark.postgres
class TestPayAllInOneCharge:
    """A customer with three open invoices pays them all from any one of their pages, in one charge."""

    def test_three_invoices_one_charge_one_receipt(
        self, cli: Any, localstripe: LocalStripe, server: Any, smtp: SmtpServer, browser_client: httpx.Client
    ) -> None:
        first, numbers = three_open_invoices(cli, localstripe)
        html = browser_client.get(first.url).text
        assert "You have 3 open invoices from Acme Consulting: pay all €600.00" in html
        for number in numbers:
            assert number in html

        page = browser_client.post(first.url, data=pay_all_form(html, first.cards[0]))
        assert page.status_code == 200 and "Payment received" in page.text
        assert "Paid in one payment together with your other invoices" in page.text
        [intent] = succeeded(localstripe, first.stripe_customer)
        assert intent.amount == 60000 and intent.metadata["scope"] == "all"
        for number, amount in zip(numbers, (10000, 20000, 30000), strict=True):
            shown = invoice_status(cli, number)
            assert (shown["status"], shown["amount_paid"]) == ("paid", amount)
        shown = invoice_status(cli, numbers[0])
        [payment] = [p for p in shown["payments"] if p["status"] == "succeeded"]
        assert [(a["invoice"], a["amount"]) for a in payment["allocation"]] == list(zip(numbers, (10000, 20000, 30000), strict=True))
        assert " ".join(cli("invoice", "show", numbers[2]).out.split()).count("pays all") == 1

        # One receipt email for the one payment, listing which invoice got what.
        def receipts() -> list[Any]:
            return [m for m in smtp.mailbox.to(first.email) if "Receipt" in str(m["Subject"])]

        wait_until(lambda: receipts(), what="the receipt")
        time.sleep(0.5)
        [receipt] = receipts()
        assert "Receipt for 3 invoices" in str(receipt["Subject"])
        body = text_part(receipt)
        for number, amount in zip(numbers, ("€100.00", "€200.00", "€300.00"), strict=True):
            assert f"Invoice {number}: {amount}" in body
        # The receipt PDF of any of them shows the allocation.
        pdf = browser_client.get(f"{str(page.url).split('?')[0]}/receipt.pdf")
        assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
        text = " ".join(pdf_text(pdf.content).split())
        assert "received €600.00 for 3 invoices, €100.00 of it for invoice" in text
        for number in numbers:
            assert number in text
        # The export carries the allocation (finance's accounting import).
        exported = {row["number"]: row for row in cli("export", "--format", "json").json()}
        assert exported[numbers[1]]["allocation"] == f"{intent.id}: {numbers[0]} 10000 + {numbers[1]} 20000 + {numbers[2]} 30000"
        assert exported[numbers[1]]["stripe_payment_intent"] == intent.id and exported[numbers[1]]["payments"] == 1
        # The USD invoice and the unsent one were not in it: still open.
        opened = [i for i in cli("invoice", "list", "--customer", first.email, "--json").json()["invoices"] if i["status"] == "open"]
        assert sorted(i["amount_due"] for i in opened) == [5000, 7000]

    def test_an_invoice_voided_after_the_page_was_shown_is_left_out(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        first, numbers = three_open_invoices(cli, localstripe)
        html = browser_client.get(first.url).text
        assert "pay all €600.00" in html
        assert cli("invoice", "void", numbers[1]).code == 0  # meanwhile, finance voids the €200.00 one
        browser_client.post(first.url, data=pay_all_form(html, first.cards[0]))
        [intent] = succeeded(localstripe, first.stripe_customer)
        assert intent.amount == 40000  # recomputed before charging
        assert invoice_status(cli, numbers[1])["status"] == "void"
        assert [invoice_status(cli, n)["status"] for n in (numbers[0], numbers[2])] == ["paid", "paid"]

    def test_a_new_invoice_sent_after_the_page_was_shown_is_not_charged_unasked(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        first, _ = three_open_invoices(cli, localstripe)
        html = browser_client.get(first.url).text
        another_invoice(cli, first.email, "400.00")
        refused = browser_client.post(first.url, data=pay_all_form(html, first.cards[0]))
        assert refused.status_code == 409 and "the total is now €1,000.00" in refused.text
        assert succeeded(localstripe, first.stripe_customer) == []

    def test_an_invoice_being_paid_blocks_pay_all(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client, settings: Settings
    ) -> None:
        first, numbers = three_open_invoices(cli, localstripe)
        html = browser_client.get(first.url).text
        # Another tab's attempt on the second invoice is in flight (claimed, not yet at Stripe).
        db_execute(
            settings.database_url,
            "INSERT INTO payments (id, invoice_id, live_invoice_id, idempotency_key, amount, currency, status, amount_refunded,"
            " created_at, updated_at, scope) SELECT :id, id, id, :key, 20000, 'eur', 'created', 0, CURRENT_TIMESTAMP,"
            " CURRENT_TIMESTAMP, 'invoice' FROM invoices WHERE number = :n",
            id=uuid.uuid4().hex,
            key=f"test-{uuid.uuid4()}",
            n=numbers[1],
        )
        refused = browser_client.post(first.url, data=pay_all_form(html, first.cards[0]))
        assert refused.status_code == 409 and f"A payment for invoice {numbers[1]} is already under way" in refused.text
        assert succeeded(localstripe, first.stripe_customer) == []


@pytest.mark.postgres
class TestPayAllEvents:
    """Stripe's events about a multi-invoice payment, twice or out of order, leave every invoice right."""

    def test_failure_before_success_and_duplicates(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client, settings: Settings
    ) -> None:
        first, numbers = three_open_invoices(cli, localstripe, CARD_3DS)
        html = browser_client.get(first.url).text
        page = browser_client.post(first.url, data=pay_all_form(html, first.cards[0]))
        assert "Confirm with your bank" in page.text
        total = re.search(r"pay all (€[0-9,.]+)", html)
        assert total is not None and f"confirm this payment of {total.group(1)}." in page.text  # the three together
        live = db_query(settings.database_url, "SELECT count(*) FROM payment_allocations WHERE live_invoice_id IS NOT NULL")
        assert live == [(3,)]
        # While the bank's check is open, every invoice in it is taken: not voidable, not payable on its own.
        voided = cli("invoice", "void", numbers[2])
        assert voided.code == 1 and "payment in progress" in voided.err
        [intent] = localstripe.payment_intents_for(first.stripe_customer)
        # The bank says no first (an old failure event), then the customer finishes the check: success.
        failed = {
            **intent.to_dict(),
            "status": "requires_payment_method",
            "last_payment_error": {"message": "declined", "code": "card_declined"},
        }
        assert post_event(server, "payment_intent.payment_failed", failed).status_code == 200
        assert db_query(settings.database_url, "SELECT count(*) FROM payment_allocations WHERE live_invoice_id IS NOT NULL") == [(0,)]
        secret = re.search(r'data-client-secret="([^"]+)"', page.text)
        assert secret
        answer = httpx.post(
            f"{localstripe.base}/v1/payment_intents/{intent.id}/_authenticate?success=true",
            json={"key": "pk_test_paylink", "client_secret": secret.group(1)},
            timeout=10,
        )
        assert answer.status_code == 200
        paid = localstripe.client.v1.payment_intents.retrieve(intent.id).to_dict()
        assert paid["status"] == "succeeded"
        for event_id in ("evt_all_ok_1", "evt_all_ok_2"):
            assert post_event(server, "payment_intent.succeeded", paid, event_id).status_code == 200
        assert post_event(server, "payment_intent.succeeded", paid).status_code == 200  # a redelivery under a new id
        assert post_event(server, "payment_intent.payment_failed", failed).status_code == 200  # late news of the old failure
        for number, amount in zip(numbers, (10000, 20000, 30000), strict=True):
            shown = invoice_status(cli, number)
            assert (shown["status"], shown["amount_paid"]) == ("paid", amount), number
        receipts = db_query(settings.database_url, "SELECT count(*) FROM payments WHERE receipt_number IS NOT NULL")
        assert receipts == [(1,)]
        assert db_query(settings.database_url, "SELECT count(*) FROM outbox WHERE kind = 'receipt'") == [(1,)]

    def test_refund_of_a_multi_invoice_payment(self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client) -> None:
        first, numbers = three_open_invoices(cli, localstripe)
        html = browser_client.get(first.url).text
        browser_client.post(first.url, data=pay_all_form(html, first.cards[0]))
        [intent] = succeeded(localstripe, first.stripe_customer)
        # €350.00 back: the last invoice (€300.00) first, then €50.00 of the one before it.
        localstripe.client.v1.refunds.create({"payment_intent": intent.id, "amount": 35000})
        charge = localstripe.client.v1.charges.retrieve(
            intent.latest_charge if isinstance(intent.latest_charge, str) else intent.latest_charge.id
        ).to_dict()
        for _ in range(2):  # twice: the same total changes nothing more
            assert post_event(server, "charge.refunded", charge).status_code == 200
        states = [(invoice_status(cli, n)["status"], invoice_status(cli, n)["amount_refunded"]) for n in numbers]
        assert states == [("paid", 0), ("partially_refunded", 5000), ("refunded", 30000)]
        allocation = next(p for p in invoice_status(cli, numbers[0])["payments"] if p["status"] == "succeeded")["allocation"]
        assert [a["amount_refunded"] for a in allocation] == [0, 5000, 30000]


class TestColleagueLinks:
    """A colleague's link pays its own invoice only: no pay-all offer, and a forged `scope=all` is refused."""

    def test_no_pay_all_on_a_colleague_link(self, cli: Any, localstripe: LocalStripe, server: Any) -> None:
        first, _ = three_open_invoices(cli, localstripe)
        sent = cli("link", "issue", first.number, "--to", "ap@customer.example", "--json")
        assert sent.code == 0, sent.err
        url = sent.json()["link"]["url"]
        with httpx.Client(base_url=server.base, timeout=30, follow_redirects=True) as colleague:
            html = colleague.get(url).text
            assert "open invoices" not in html and "pay all" not in html
            refused = colleague.post(url, data={"csrf": csrf_of(html), "payment_method": first.cards[0], "pay_choice": "all"})
        assert refused.status_code == 409 and "This link pays this invoice only." in refused.text
        assert succeeded(localstripe, first.stripe_customer) == []
