"""Issue 13 in a real Chromium: a deposit, then the rest, with the same link; three invoices in one charge."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import DESKTOP, PHONE, assert_accessible, small_targets, snap
from tests.harness import CARD_OK, LocalStripe
from tests.integration.helpers import another_invoice, invoice_status, issue_invoice

pytestmark = pytest.mark.browser


@pytest.mark.parametrize("page", [{"viewport": PHONE}, {"viewport": DESKTOP}], indirect=True, ids=["phone", "desktop"])
class TestPayYourWay:
    """The customer chooses what to pay: a part within the rules finance set, or all their open invoices."""

    def test_deposit_then_the_rest(self, cli, localstripe: LocalStripe, server, page: Page, request) -> None:
        size = request.node.callspec.id
        issued = issue_invoice(cli, localstripe, CARD_OK, amount="1.00")
        kitchen = another_invoice(cli, issued.email, "1000.00", "--allow-partial", "--deposit-percent", "30")
        page.goto(kitchen.url or "")
        expect(page.get_by_role("heading", level=1)).to_have_text("Pay €1,000.00")
        page.get_by_text("Pay another amount").first.click()
        amount = page.get_by_label("Amount (EUR)").first
        expect(page.get_by_text("The first payment is a deposit of at least €300.00.").first).to_be_visible()
        assert_accessible(page)
        snap(page, f"part-choice-{size}")

        amount.fill("250")
        page.get_by_role("button", name="Pay this amount with Visa •••• 4242").click()
        expect(page.get_by_role("alert")).to_contain_text("The first payment is a deposit of at least €300.00.")
        assert [pi.amount for pi in localstripe.payment_intents_for(issued.stripe_customer)] == []

        # Refused, nothing charged: the choice is still open with what was typed, to correct it.
        expect(page.get_by_role("alert")).to_contain_text("Nothing was charged.")
        expect(page.get_by_label("Amount (EUR)").first).to_have_value("250")
        page.get_by_label("Amount (EUR)").first.fill("300.00")
        page.get_by_role("button", name="Pay this amount with Visa •••• 4242").click()
        expect(page.get_by_role("heading", name="Paid so far")).to_be_visible()
        expect(page.get_by_text("You have paid €300.00 of €1,000.00. The balance still due is €700.00.")).to_be_visible()
        expect(page.get_by_role("heading", level=1)).to_have_text("Pay €700.00")  # the same link pays the rest
        assert_accessible(page)
        snap(page, f"part-paid-deposit-{size}")
        page.get_by_text("Use another card").click()  # (its save-card box too)
        assert small_targets(page) == [], "touch targets at least 44 px: the parts' receipts, contact links, check boxes"
        page.get_by_text("Use another card").click()
        with page.expect_download() as deposit_receipt:  # the deposit's receipt, from the list of what was paid
            page.get_by_role("link", name=re.compile(r"^receipt RCT-")).click()
        assert re.fullmatch(rf"{kitchen.number}-receipt-RCT-\d+\.pdf", deposit_receipt.value.suggested_filename)

        page.get_by_role("button", name="Pay €700.00 with Visa •••• 4242").click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Payment received")
        expect(page.get_by_role("heading", name="Paid in parts")).to_be_visible()
        assert invoice_status(cli, kitchen.number)["status"] == "paid"
        assert sorted(pi.amount for pi in localstripe.payment_intents_for(issued.stripe_customer)) == [30000, 70000]
        expect(page.get_by_role("link", name=re.compile(r"^receipt RCT-"))).to_have_count(2)  # each part's own
        assert_accessible(page)
        assert small_targets(page) == []
        snap(page, f"part-paid-in-full-{size}")

    def test_three_invoices_in_one_charge(self, cli, localstripe: LocalStripe, server, page: Page, request) -> None:
        size = request.node.callspec.id
        first = issue_invoice(cli, localstripe, CARD_OK, amount="100.00")
        second = another_invoice(cli, first.email, "200.00")
        third = another_invoice(cli, first.email, "940.00")
        page.goto(first.url)
        offer = page.get_by_role("region", name=re.compile("You have 3 open invoices from Acme Consulting: pay all €1,240.00"))
        expect(offer).to_be_visible()
        for number in (first.number, second.number, third.number):
            expect(offer.get_by_role("table")).to_contain_text(number)
        assert_accessible(page)
        snap(page, f"pay-all-offer-{size}")
        # The new-card form repeats the offer (a group there: two regions of one name fail axe's landmark-unique).
        page.get_by_text("Use another card").click()
        expect(page.get_by_role("group", name=re.compile("pay all €1,240.00"))).to_be_visible()
        assert_accessible(page)
        page.get_by_text("Use another card").click()

        offer.get_by_role("button", name="Pay all €1,240.00 with Visa •••• 4242").click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Payment received")
        allocation = page.get_by_role("table", name="Paid in one payment together with your other invoices")
        for number, amount in ((first.number, "€100.00"), (second.number, "€200.00"), (third.number, "€940.00")):
            expect(allocation.get_by_role("row", name=re.compile(number))).to_contain_text(amount)
        [intent] = localstripe.payment_intents_for(first.stripe_customer)
        assert intent.amount == 124000
        assert all(invoice_status(cli, n)["status"] == "paid" for n in (first.number, second.number, third.number))
        assert_accessible(page)
        snap(page, f"pay-all-receipt-{size}")


@pytest.mark.parametrize("page", [{"viewport": PHONE, "javascript": False}], indirect=True, ids=["no-js"])
class TestWithoutJavaScript:
    """Without JavaScript every choice is a button of its own: a part payment works, and no button lies."""

    def test_part_payment_without_javascript(self, cli, localstripe: LocalStripe, server, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, amount="1.00")
        invoice = another_invoice(cli, issued.email, "200.00", "--allow-partial", "--min-amount", "20.00")
        page.goto(invoice.url or "")
        page.get_by_text("Pay another amount").first.click()
        page.get_by_label("Amount (EUR)").first.fill("20.00")
        page.get_by_role("button", name="Pay this amount with Visa •••• 4242").click()
        expect(page.get_by_text("You have paid €20.00 of €200.00. The balance still due is €180.00.")).to_be_visible()
        assert [pi.amount for pi in localstripe.payment_intents_for(issued.stripe_customer)] == [2000]
        # (axe-core needs the page's JavaScript: the same markup is checked by the stories above.)
        snap(page, "part-paid-no-js")
