"""The pay page fixes of issue 13, as a customer meets them in a real Chromium: a failed 3-D Secure then
another card, a 3-D Secure left unfinished, "Processing…" while paying, Stripe.js that is slow or never
loads, a script error, and the button without JavaScript. Real app, localstripe (and its stand-in
Stripe.js) and SMTP; axe-core on every state; phone and desktop screenshots in test-artifacts/."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import Page, Route, expect

from tests.browser.conftest import DESKTOP, PHONE, assert_accessible, snap
from tests.harness import CARD_3DS, CARD_OK, LocalStripe
from tests.integration.helpers import invoice_status, issue_invoice

pytestmark = pytest.mark.browser

VIEWPORTS = [{"viewport": PHONE}, {"viewport": DESKTOP}]


def size(page: Page) -> str:
    return "phone" if (page.viewport_size or PHONE)["width"] < 600 else "desktop"


def receipt_shown(page: Page) -> None:
    expect(page.get_by_role("heading", level=1)).to_have_text("Payment received")
    assert_accessible(page)


class TestFailedThreeDSecure:
    """The bank's check fails: a sentence in the customer's words names the card, and another card is chosen."""

    @pytest.mark.parametrize("page", VIEWPORTS, indirect=True)
    def test_failed_3d_secure_then_another_card(self, cli: Any, localstripe: LocalStripe, server: Any, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_3DS, CARD_OK)
        page.goto(issued.url)
        pay = page.locator("#pay-button")
        expect(pay).to_have_text("Pay €120.50 with Visa •••• 3184")  # pay.js names the chosen card
        pay.click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Confirm with your bank")
        expect(page.get_by_text("needs JavaScript")).to_have_count(0)
        page.get_by_role("button", name="Fail authentication").click()

        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("The payment did not go through.")
        expect(alert).to_contain_text("Your bank did not confirm the payment: Visa •••• 3184 failed authentication.")
        expect(page.get_by_text("The provided PaymentMethod")).to_have_count(0)
        expect(page.get_by_role("radio", name=re.compile("4242"))).to_be_checked()
        expect(pay).to_have_text("Pay €120.50 with Visa •••• 4242")
        assert_accessible(page)
        snap(page, f"page-fix-3ds-failed-{size(page)}")
        pay.click()
        receipt_shown(page)
        [paid] = [pi for pi in localstripe.payment_intents_for(issued.stripe_customer) if pi.status == "succeeded"]
        assert paid.payment_method == issued.cards[1]


class TestAbandonedThreeDSecure:
    """The customer closed the bank's window: coming back, they may pay with another card instead."""

    @pytest.mark.parametrize("page", VIEWPORTS, indirect=True)
    def test_come_back_and_pay_with_another_card(self, cli: Any, localstripe: LocalStripe, server: Any, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_3DS, CARD_OK)
        page.goto(issued.url)
        page_url = page.url
        page.locator("#pay-button").click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Confirm with your bank")
        page.goto(page_url)  # later, from the email again
        expect(page.get_by_role("button", name="Continue with my bank's confirmation")).to_be_visible()
        another = page.get_by_role("button", name="Pay with another card instead")
        expect(another).to_be_visible()
        assert_accessible(page)
        snap(page, f"page-fix-3ds-abandoned-{size(page)}")
        another.click()
        expect(page.get_by_role("alert")).to_contain_text("You stopped your bank's confirmation for Visa •••• 3184.")
        expect(page.get_by_role("radio", name=re.compile("4242"))).to_be_checked()
        assert_accessible(page)
        page.locator("#pay-button").click()
        receipt_shown(page)
        statuses = sorted(pi.status for pi in localstripe.payment_intents_for(issued.stripe_customer))
        assert statuses == ["canceled", "succeeded"]


class TestProcessing:
    """While the payment is on its way the button says so, keeps the focus, and a live region tells."""

    @pytest.mark.parametrize("page", VIEWPORTS, indirect=True)
    def test_saved_card_processing_state(self, cli: Any, localstripe: LocalStripe, server: Any, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, CARD_3DS)
        page.goto(issued.url)
        # Hold the form where a slow network would: after the page's own handler ran, before it leaves.
        page.evaluate(
            "document.addEventListener('submit', (event) => { window.submits = (window.submits || 0) + 1; event.preventDefault(); })"
        )
        pay = page.locator("#pay-button")
        pay.focus()
        page.keyboard.press("Enter")
        expect(pay).to_have_text("Processing…")
        expect(pay).to_have_attribute("aria-busy", "true")
        expect(page.locator("#pay-status")).to_have_text("Processing your payment. Please wait, and do not close this page.")
        assert page.evaluate("document.activeElement && document.activeElement.id") == "pay-button"
        page.keyboard.press("Enter")  # a second press: the page's handler refuses it before anything is sent
        assert page.evaluate("window.submits") == 2
        assert page.evaluate("document.getElementById('saved-card-form').hasAttribute('data-busy')")
        assert_accessible(page)
        snap(page, f"page-fix-processing-{size(page)}")
        page.evaluate("document.getElementById('saved-card-form').submit()")  # and the network delivers it
        receipt_shown(page)
        assert len(localstripe.payment_intents_for(issued.stripe_customer)) == 1

    def test_new_card_processing_state(self, cli: Any, localstripe: LocalStripe, server: Any, page: Page) -> None:
        issued = issue_invoice(cli, localstripe)  # no saved card
        page.goto(issued.url)
        held: list[Route] = []
        page.route(re.compile(r"/setup$"), lambda route: held.append(route))
        fill_card(page, CARD_OK)
        button = page.get_by_role("button", name="Pay €120.50 with this card")
        button.click()
        expect(page.locator("#new-card-button")).to_have_text("Processing…")
        expect(page.locator("#new-card-status")).to_have_text("Checking your card…")
        held[0].continue_()
        receipt_shown(page)


class TestErrorsInOurWords:
    """Whatever breaks in the browser, the customer reads a sentence in their language, never a script's error."""

    def test_a_broken_answer_is_not_shown_raw(self, cli: Any, localstripe: LocalStripe, server: Any, page: Page) -> None:
        issued = issue_invoice(cli, localstripe)
        page.goto(issued.url)
        page.route(
            re.compile(r"/setup$"), lambda route: route.fulfill(status=502, body="<html>Bad gateway</html>", content_type="text/html")
        )
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text) if message.type == "error" else None)
        fill_card(page, CARD_OK)
        page.get_by_role("button", name="Pay €120.50 with this card").click()
        status = page.locator("#new-card-status")
        expect(status).to_have_text("Something went wrong while checking your card. Nothing was charged. Please try again.")
        assert "Unexpected token" not in page.content() and "JSON" not in status.inner_text()
        assert any("paylink" in line for line in console), console  # the detail went to the console
        expect(page.locator("#new-card-button")).to_have_text("Pay €120.50 with this card")
        assert_accessible(page)
        assert localstripe.payment_intents_for(issued.stripe_customer) == []

    def test_failed_stripe_js_on_the_pay_page(self, cli: Any, localstripe: LocalStripe, server: Any, page: Page, settings: Any) -> None:
        issued = issue_invoice(cli, localstripe)  # no saved card: the card form is all there is
        held: list[Route] = []
        page.route(f"{settings.stripe_js_url}**", lambda route: held.append(route))
        page.goto(issued.url, wait_until="domcontentloaded")  # ("load" waits for Stripe.js, held here)
        unavailable = page.get_by_text("The card form could not be loaded. Please check your connection and reload this page.")
        # Still loading (a slow network): nothing says JavaScript is needed, nothing says it failed.
        expect(page.get_by_text("needs JavaScript")).to_be_hidden()
        page.wait_for_timeout(500)
        expect(unavailable).to_be_hidden()
        held[0].abort()  # and then it never arrives
        expect(unavailable).to_be_visible()
        expect(page.locator("#new-card-form")).to_be_hidden()
        assert_accessible(page)
        snap(page, f"page-fix-card-form-failed-{size(page)}")

    def test_slow_then_failed_stripe_js_on_the_bank_page(
        self, cli: Any, localstripe: LocalStripe, server: Any, page: Page, settings: Any
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_3DS, CARD_OK)
        page.goto(issued.url)
        held: list[Route] = []
        page.route(f"{settings.stripe_js_url}**", lambda route: held.append(route))
        page.locator("#pay-button").click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Confirm with your bank")
        # Still loading: it says so, and says nothing about JavaScript being needed.
        expect(page.get_by_text("Opening your bank's confirmation…")).to_be_visible()
        expect(page.get_by_text("needs JavaScript")).to_have_count(0)
        page.wait_for_timeout(500)
        expect(page.get_by_role("alert")).to_be_hidden()
        held[0].abort()  # and then it never arrives
        alert = page.get_by_role("alert")
        expect(alert).to_have_text(
            "Your bank's confirmation could not be loaded. Please check your connection and reload this page, or pay with another card."
        )
        assert_accessible(page)
        snap(page, f"page-fix-stripe-js-failed-{size(page)}")
        page.get_by_role("button", name="Pay with another card instead").click()
        expect(page.get_by_role("radio", name=re.compile("4242"))).to_be_checked()
        page.unroute(f"{settings.stripe_js_url}**")
        page.locator("#pay-button").click()
        receipt_shown(page)
        assert invoice_status(cli, issued.number)["status"] == "paid"


class TestWithoutJavaScript:
    """Without JavaScript the button of several cards names none, so it never names the wrong one."""

    @pytest.mark.parametrize("page", [{"javascript": False, "viewport": PHONE}, {"javascript": False, "viewport": DESKTOP}], indirect=True)
    def test_no_js_label_and_the_chosen_card_pays(self, cli: Any, localstripe: LocalStripe, server: Any, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, CARD_3DS)
        page.goto(issued.url)
        pay = page.locator("#pay-button")
        expect(pay).to_have_text("Pay €120.50")
        page.get_by_role("radio", name=re.compile("3184")).check()
        expect(pay).to_have_text("Pay €120.50")  # still true: it names no card
        # (axe-core needs JavaScript to run: the same page is checked with it in the stories above.)
        snap(page, f"page-fix-no-js-{size(page)}")
        page.get_by_role("radio", name=re.compile("4242")).check()
        pay.click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Payment received")
        [intent] = localstripe.payment_intents_for(issued.stripe_customer)
        assert intent.payment_method == issued.cards[0]


def fill_card(page: Page, number: str) -> None:
    """Type into Stripe's card element (localstripe's stand-in renders plain inputs)."""
    element = page.locator("#card-element")
    element.locator("input[placeholder=number]").fill(number)
    element.locator("input[placeholder=exp_month]").fill("12")
    element.locator("input[placeholder=exp_year]").fill("30")
    element.locator("input[placeholder=cvc]").fill("123")
    element.locator("input[placeholder=postal_code]").fill("10115")
