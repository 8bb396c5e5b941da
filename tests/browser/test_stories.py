"""The customer's stories, each in a real Chromium against the real app, localstripe and SMTP."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Browser, Page, expect

from plumbing.settings import Settings
from tests.browser.conftest import DESKTOP, PHONE, assert_accessible, small_targets, snap
from tests.harness import CARD_3DS, CARD_DECLINED, CARD_OK, LocalStripe, SmtpServer, pay_link_in
from tests.integration.helpers import invoice_status, issue_invoice
from tests.integration.test_link_lifecycle import expire_links

pytestmark = pytest.mark.browser


def receipt_shown(page: Page) -> None:
    expect(page.get_by_role("heading", level=1)).to_have_text("Payment received")
    assert_accessible(page)


def fill_card(page: Page, number: str) -> None:
    """Type into Stripe's card element (localstripe's stand-in renders plain inputs)."""
    element = page.locator("#card-element")
    element.locator("input[placeholder=number]").fill(number)
    element.locator("input[placeholder=exp_month]").fill("12")
    element.locator("input[placeholder=exp_year]").fill("30")
    element.locator("input[placeholder=cvc]").fill("123")
    element.locator("input[placeholder=postal_code]").fill("10115")


class TestSavedCard:
    """1. Pay with the saved card, with JavaScript and without."""

    def test_pay_with_saved_card(self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page.goto(issued.url)
        expect(page.get_by_role("heading", level=1)).to_have_text("Pay €120.50")
        # The token went into a cookie: the address bar (and so the history) holds none.
        token = issued.url.rsplit("/", 1)[1]
        assert token not in page.url and re.fullmatch(rf"{re.escape(server.base)}/pay/l/[0-9a-f]{{32}}", page.url)
        assert token not in page.content()
        assert_accessible(page)
        page.get_by_role("button", name="Pay €120.50 with Visa •••• 4242").click()
        receipt_shown(page)
        assert invoice_status(cli, issued.number)["status"] == "paid"

    @pytest.mark.parametrize("page", [{"javascript": False}], indirect=True)
    def test_pay_with_saved_card_without_javascript(self, cli, localstripe: LocalStripe, server, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page.goto(issued.url)
        page.get_by_text("Use another card").click()
        expect(page.get_by_text("Paying with a new card needs JavaScript")).to_be_visible()
        page.get_by_role("button", name="Pay €120.50 with Visa •••• 4242").click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Payment received")


class TestNewCard:
    """2. Pay with a new card through the card element, saving it; the next invoice offers it."""

    def test_new_card_saved_and_offered_next_time(self, cli, localstripe: LocalStripe, server, page: Page) -> None:
        issued = issue_invoice(cli, localstripe)  # no saved card yet
        page.goto(issued.url)
        expect(page.get_by_role("heading", name="Pay by card")).to_be_visible()
        assert_accessible(page)
        fill_card(page, CARD_OK)
        expect(page.get_by_label("Save this card for future invoices")).not_to_be_checked()  # consent: unticked (issue 13)
        page.get_by_label("Save this card for future invoices").check()
        page.get_by_role("button", name="Pay €120.50 with this card").click()
        receipt_shown(page)
        [intent] = localstripe.payment_intents_for(issued.stripe_customer)
        assert intent.status == "succeeded"

        nxt = cli(
            "invoice",
            "create",
            "--customer",
            issued.email,
            "--amount",
            "45",
            "--currency",
            "eur",
            "--description",
            "Next",
            "--send",
            "--json",
        )
        page.goto(nxt.json()["link"]["url"])
        expect(page.get_by_role("button", name="Pay €45.00 with Visa •••• 4242")).to_be_visible()


class TestThreeDSecure:
    """3. A card that needs the bank: authenticate -> paid; fail -> a clear message, and try again."""

    def test_authenticate_then_paid(self, cli, localstripe: LocalStripe, server, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_3DS)
        page.goto(issued.url)
        page.get_by_role("button", name=re.compile("Pay €120.50")).click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Confirm with your bank")
        snap(page, "3ds-bank-confirmation")
        page.get_by_role("button", name="Complete authentication").click()
        receipt_shown(page)

    def test_failed_authentication_then_try_again(self, cli, localstripe: LocalStripe, server, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_3DS)
        page.goto(issued.url)
        page.get_by_role("button", name=re.compile("Pay €120.50")).click()
        page.get_by_role("button", name="Fail authentication").click()
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("The payment did not go through.")
        expect(alert).to_contain_text("failed authentication")
        assert_accessible(page)
        assert invoice_status(cli, issued.number)["status"] == "open"
        page.get_by_role("button", name=re.compile("Pay €120.50")).click()
        page.get_by_role("button", name="Complete authentication").click()
        receipt_shown(page)


class TestDeclined:
    """4. A declined card shows why; another card pays."""

    def test_declined_then_new_card(self, cli, localstripe: LocalStripe, server, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_DECLINED)
        page.goto(issued.url)
        page.get_by_role("button", name=re.compile("Pay €120.50 with Visa •••• 0341")).click()
        expect(page.get_by_role("alert")).to_contain_text("declined")
        assert_accessible(page)
        page.get_by_text("Use another card").click()
        fill_card(page, CARD_OK)
        page.get_by_role("button", name="Pay €120.50 with this card").click()
        receipt_shown(page)


class TestExpiredLink:
    """5. Expired link -> email me a new link -> open the new email's link -> pay."""

    def test_expired_link_renew_and_pay(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, settings: Settings, page: Page
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        smtp.mailbox.wait_for(1)
        page.goto(expire_links(settings, issued.number))
        expect(page.get_by_role("heading", level=1)).to_have_text("This link has expired")
        assert_accessible(page)
        assert small_targets(page) == []  # the merchant's contact links too
        page.get_by_role("button", name="Email me a new link").click()
        expect(page.get_by_role("status")).to_contain_text("a new payment link is on its way")
        assert_accessible(page)
        fresh = pay_link_in(smtp.mailbox.wait_for(2)[1])
        page.goto(fresh)
        page.get_by_role("button", name="Pay €120.50 with Visa •••• 4242").click()
        receipt_shown(page)


class TestOtherStates:
    """6. Revoked, void and already-paid links show their own pages."""

    def test_revoked_void_and_paid(self, cli, localstripe: LocalStripe, server, page: Page) -> None:
        revoked = issue_invoice(cli, localstripe, CARD_OK)
        cli("link", "revoke", revoked.number)
        page.goto(revoked.url)
        expect(page.get_by_role("heading", level=1)).to_have_text("This link is no longer valid")
        assert_accessible(page)
        snap(page, "state-revoked")

        void = issue_invoice(cli, localstripe, CARD_OK)
        cli("invoice", "void", void.number)
        page.goto(void.url)
        expect(page.get_by_role("heading", level=1)).to_have_text("This invoice has been cancelled")
        assert_accessible(page)
        snap(page, "state-void")

        paid = issue_invoice(cli, localstripe, CARD_OK)
        page.goto(paid.url)
        page.get_by_role("button", name=re.compile("Pay €120.50")).click()
        page.goto(paid.url)
        receipt_shown(page)
        expect(page.get_by_role("button", name=re.compile("^Pay"))).to_have_count(0)

        page.goto(f"{server.base}/pay/not-a-real-token")
        expect(page.get_by_role("heading", level=1)).to_have_text("This link does not work")
        assert_accessible(page)


class TestKeyboard:
    """7. Keyboard only: tab to Pay, press Enter, receipt."""

    def test_keyboard_only(self, cli, localstripe: LocalStripe, server, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page.goto(issued.url)
        for _ in range(15):
            page.keyboard.press("Tab")
            focused = page.evaluate("document.activeElement.textContent")
            if "Pay €120.50 with Visa" in (focused or ""):
                break
        else:
            pytest.fail("the Pay button cannot be reached with Tab")
        outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert outline != "none", "the focused Pay button must show a visible focus ring"
        page.keyboard.press("Enter")
        receipt_shown(page)


class TestLayout:
    """8. Phone 375x667: no horizontal scroll, Pay above the fold; comfortable on a desktop."""

    @pytest.mark.parametrize("viewport", [PHONE, {"width": 768, "height": 1024}, DESKTOP], ids=["phone", "tablet", "desktop"])
    def test_viewports(self, cli, localstripe: LocalStripe, server, browser: Browser, viewport: dict[str, int]) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, CARD_3DS)
        context = browser.new_context(viewport=viewport)
        page = context.new_page()
        try:
            page.goto(issued.url)
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "horizontal scroll"
            pay = page.get_by_role("button", name=re.compile(r"^Pay €120.50 with Visa •••• 4242$"))
            button = pay.bounding_box()
            amount = page.get_by_role("heading", level=1).bounding_box()
            assert button and amount
            assert button["y"] + button["height"] <= viewport["height"], "the Pay button must be visible without scrolling"
            assert amount["y"] + amount["height"] <= viewport["height"]
            assert button["height"] >= 44 and button["width"] >= 44, "touch target at least 44 px"
            for radio in page.locator("label.card-choice").all():
                box = radio.bounding_box()
                assert box and box["height"] >= 44
            snap(page, f"layout-{viewport['width']}x{viewport['height']}")
            page.locator("label.card-choice").nth(1).click()  # the button follows the chosen card
            expect(page.locator("#pay-button")).to_have_text("Pay €120.50 with Visa •••• 3184")
        finally:
            context.close()


class TestLanguages:
    """9. A German customer sees German text and '120,50 €'."""

    def test_german_customer(self, cli, localstripe: LocalStripe, server, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, locale="de")
        page.goto(issued.url)
        expect(page.locator("html")).to_have_attribute("lang", "de")
        expect(page.get_by_role("heading", level=1)).to_have_text("120,50 € bezahlen")
        assert_accessible(page)
        page.get_by_role("button", name=re.compile("120,50 €")).click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Zahlung erhalten")

    def test_switcher_keeps_the_customer_on_the_same_link(self, cli, localstripe: LocalStripe, server, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page.goto(issued.url)
        link_page = page.url  # where the emailed link handed over to (/pay/l/<link>)
        page.get_by_role("link", name="Français").click()
        expect(page.locator("html")).to_have_attribute("lang", "fr")
        assert page.url.startswith(link_page)
        expect(page.get_by_role("heading", level=1)).to_have_text("Payer 120,50 €")
        page.get_by_role("button", name=re.compile("120,50 €")).click()  # the choice outlives the form post
        expect(page.locator("html")).to_have_attribute("lang", "fr")
        expect(page.get_by_role("heading", level=1)).to_have_text("Paiement reçu")
