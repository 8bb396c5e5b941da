"""Issue 13 in a real Chromium: the invoice sent to accounts payable, who pays with their own card and
never sees the customer's; and a customer removing a saved card. Phone and desktop, axe-core clean."""

from __future__ import annotations

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import DESKTOP, assert_accessible, small_targets, snap
from tests.browser.test_stories import fill_card
from tests.harness import CARD_OK, LocalStripe, SmtpServer, pay_link_in, wait_until
from tests.integration.helpers import attached_cards, invoice_status, issue_invoice, stripe_told_us_the_default

pytestmark = pytest.mark.browser

AP = "ap@customer.example"
CARD_OTHER = "5555555555554444"  # localstripe calls every card a Visa: "Visa •••• 4444"


class TestAccountsPayablePays:
    """The customer sends the invoice to a colleague, who opens their own link and pays with their own card."""

    def test_send_to_a_colleague_who_pays(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, page: Page, browser: Browser
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page.goto(issued.url)
        page.get_by_text("Send this invoice to a colleague").click()
        email = page.get_by_label("Their email address")
        expect(email).to_be_visible()
        assert_accessible(page)
        snap(page, "colleague-form-phone")
        email.fill(AP)
        page.get_by_role("button", name="Send the invoice").click()
        expect(page.get_by_role("heading", level=1)).to_have_text(f"Invoice {issued.number} sent")
        assert_accessible(page)
        assert small_targets(page) == []  # "Back to the invoice" too
        snap(page, "colleague-sent-phone")

        wait_until(lambda: smtp.mailbox.to(AP), what="the colleague's email")
        [message] = smtp.mailbox.to(AP)
        colleague = browser.new_context(viewport=DESKTOP, locale="en-GB")
        try:
            theirs = colleague.new_page()
            theirs.goto(pay_link_in(message))
            expect(theirs.get_by_role("heading", level=1)).to_have_text("Pay €120.50")
            expect(theirs.get_by_role("heading", name="Pay by card")).to_be_visible()
            content = theirs.content()
            assert "4242" not in content  # not the customer's card, not even its last four digits
            assert "Manage saved cards" not in content and "Send this invoice to a colleague" not in content
            assert "Save this card" not in content
            assert_accessible(theirs)
            snap(theirs, "colleague-page-desktop")
            fill_card(theirs, CARD_OK)
            theirs.get_by_role("button", name="Pay €120.50 with this card").click()
            expect(theirs.get_by_role("heading", level=1)).to_have_text("Payment received")
            assert_accessible(theirs)
            snap(theirs, "colleague-paid-desktop")
        finally:
            colleague.close()

        assert invoice_status(cli, issued.number)["status"] == "paid"
        assert localstripe.payment_intents_for(issued.stripe_customer) == []  # charged the colleague's own Stripe customer
        assert [c.id for c in attached_cards(localstripe, issued.stripe_customer)] == issued.cards


class TestRemoveSavedCard:
    """The customer removes a saved card from the pay page; it is gone at Stripe and from the page."""

    def test_remove_a_card_on_the_phone(self, cli, localstripe: LocalStripe, server, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, CARD_OTHER)
        page.goto(issued.url)
        page.get_by_text("Manage saved cards").click()
        remove = page.get_by_role("button", name="Remove Visa •••• 4444")
        expect(remove).to_be_visible()
        assert_accessible(page)
        snap(page, "manage-cards-phone")
        remove.click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Card removed")
        expect(page.get_by_role("status")).to_contain_text("Visa •••• 4444 is no longer saved")
        assert_accessible(page)
        page.get_by_role("link", name="Back to the invoice").click()
        expect(page.get_by_role("button", name="Pay €120.50 with Visa •••• 4242")).to_be_visible()
        assert "4444" not in page.content()
        assert [c.id for c in attached_cards(localstripe, issued.stripe_customer)] == [issued.cards[0]]

    @pytest.mark.parametrize("page", [{"viewport": DESKTOP}], indirect=True)
    def test_make_a_card_the_default_on_the_desktop(self, cli, localstripe: LocalStripe, server, page: Page, database_url: str) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, CARD_OTHER)
        stripe_told_us_the_default(database_url)
        page.goto(issued.url)
        page.get_by_text("Manage saved cards").click()
        snap(page, "manage-cards-desktop")
        page.get_by_role("button", name="Make default Visa •••• 4444").click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Default card changed")
        assert_accessible(page)
        page.get_by_role("link", name="Back to the invoice").click()
        page.get_by_text("Manage saved cards").click()
        expect(page.get_by_role("button", name="Make default Visa •••• 4242")).to_be_visible()
        customer = localstripe.client.v1.customers.retrieve(issued.stripe_customer)
        assert customer.invoice_settings.default_payment_method == issued.cards[1]
