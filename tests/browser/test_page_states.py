"""Every other page state a customer can meet is accessible too (axe-core, WCAG 2.2 AA)."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Browser, Page, expect
from starlette.requests import Request
from starlette.routing import Route

from plumbing.settings import Settings
from tests.browser.conftest import assert_accessible, snap
from tests.harness import (
    CARD_3DS,
    CARD_DECLINED,
    CARD_OK,
    VERIFY_LINK,
    AppServer,
    LocalStripe,
    SmtpServer,
    db_execute,
    free_port,
    text_part,
)
from tests.integration.helpers import issue_invoice, unique_email

pytestmark = pytest.mark.browser


def test_processing_page(cli, localstripe: LocalStripe, server, settings: Settings, page: Page) -> None:
    issued = issue_invoice(cli, localstripe, CARD_OK)
    db_execute(settings.database_url, "UPDATE invoices SET status = 'processing' WHERE number = :n", n=issued.number)
    page.goto(issued.url)
    expect(page.get_by_role("heading", level=1)).to_have_text("We are confirming your payment")
    expect(page.get_by_role("button", name=re.compile("^Pay"))).to_have_count(0)
    assert_accessible(page)
    snap(page, "state-processing")
    # The webhook settles it: the page notices by itself, without a timed reload.
    db_execute(settings.database_url, "UPDATE invoices SET status = 'paid', amount_paid = amount_due WHERE number = :n", n=issued.number)
    expect(page.get_by_role("heading", level=1)).to_have_text("Payment received", timeout=15_000)


def test_bank_confirmation_page(cli, localstripe: LocalStripe, server, page: Page) -> None:
    issued = issue_invoice(cli, localstripe, CARD_3DS)
    page.goto(issued.url)
    page.get_by_role("button", name=re.compile("Pay €120.50")).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Confirm with your bank")
    page.get_by_role("button", name="Fail authentication").click()  # localstripe's stand-in dialog
    expect(page.get_by_role("alert")).to_contain_text("The payment did not go through.")
    assert_accessible(page)


def test_address_confirmation_pages(cli, localstripe: LocalStripe, smtp: SmtpServer, server, page: Page) -> None:
    email = unique_email("confirm")
    cli("customer", "add", "--email", email, "--name", "Cora Confirm", "--stripe-customer", localstripe.customer_with_cards(email, "C")[0])
    match = VERIFY_LINK.search(text_part(smtp.mailbox.wait_for(1)[0]))
    assert match
    page.goto(match.group(0))
    expect(page.get_by_role("heading", level=1)).to_have_text("Confirm your email address")
    assert_accessible(page)
    page.get_by_role("button", name="Yes, this is my address").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Thank you, your address is confirmed")
    assert_accessible(page)
    snap(page, "state-address-confirmed")


def test_expired_form_page(cli, localstripe: LocalStripe, server, page: Page) -> None:
    issued = issue_invoice(cli, localstripe, CARD_OK)
    page.goto(issued.url)
    page.evaluate("() => { document.querySelector('input[name=csrf]').value = 'stale'; }")
    page.get_by_role("button", name=re.compile("Pay €120.50")).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Please try again")
    assert_accessible(page)


def test_friendly_500_leaks_nothing(settings: Settings, page: Page) -> None:
    from app import create_app

    async def boom(request: Request) -> None:
        raise RuntimeError("secret internal detail sk_live_should_never_show")

    app = create_app(settings)
    app.router.routes.append(Route("/boom", boom))
    server = AppServer(app, free_port()).start()
    try:
        response = page.goto(f"{server.base}/boom")
        assert response is not None and response.status == 500
        expect(page.get_by_role("heading", level=1)).to_have_text("Something went wrong")
        content = page.content()
        assert "secret internal detail" not in content and "Traceback" not in content and "RuntimeError" not in content
        assert_accessible(page)
    finally:
        server.stop()


def test_open_the_link_from_your_email_page(cli, localstripe: LocalStripe, server, browser: Browser, page: Page) -> None:
    """The page address alone, in another browser (no cookie), asks to open the emailed link."""
    issued = issue_invoice(cli, localstripe, CARD_OK)
    page.goto(issued.url)
    link_page = page.url
    other = browser.new_context(viewport={"width": 375, "height": 667})
    try:
        elsewhere = other.new_page()
        response = elsewhere.goto(link_page)
        assert response is not None and response.status == 404
        expect(elsewhere.get_by_role("heading", level=1)).to_have_text("Please open the link from your email")
        assert issued.number not in elsewhere.content()
        assert_accessible(elsewhere)
        snap(elsewhere, "state-open-from-email")
        elsewhere.goto(issued.url)  # the emailed link works in this browser too
        expect(elsewhere.get_by_role("heading", level=1)).to_have_text("Pay €120.50")
    finally:
        other.close()


def test_too_many_attempts_page(cli, localstripe: LocalStripe, start_server, page: Page) -> None:
    """Past a brake the customer sees a calm page: try again later, or contact the merchant."""
    start_server(PAY_FAILED_ATTEMPTS_PER_INVOICE_HOUR="1")
    issued = issue_invoice(cli, localstripe, CARD_DECLINED)
    page.goto(issued.url)
    page.get_by_role("button", name=re.compile("Pay €120.50")).click()
    expect(page.get_by_role("alert")).to_contain_text("declined")
    page.get_by_role("button", name=re.compile("Pay €120.50")).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Too many attempts")
    expect(page.get_by_text("Please try again later, or contact Acme Consulting.")).to_be_visible()
    assert_accessible(page)
    snap(page, "state-too-many-attempts")
    assert len(localstripe.payment_intents_for(issued.stripe_customer)) == 1
