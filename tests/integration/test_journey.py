"""The core journey on real parts: CLI -> email -> link -> prefilled page -> one click -> webhook -> receipt."""

from __future__ import annotations

import logging
import re
from datetime import date, timedelta
from decimal import Decimal

import httpx
import pytest

from links.lines import parse_item, totals
from plumbing.i18n import format_day, format_money
from tests.harness import CARD_OK, PAY_LINK, LocalStripe, SmtpServer, pay_link_in, text_part, wait_until
from tests.integration.helpers import csrf_of, invoice_status, issue_invoice, offered_cards

DUE = date.today() + timedelta(days=21)  # a due date is never in the past; three weeks fits the default link lifetime


class TestCoreJourney:
    """Finance issues an invoice from the CLI; the customer pays it with one click from the email."""

    def test_invoice_email_link_page_one_click_webhook_paid_receipt(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, browser_client: httpx.Client, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO)
        cus_id, [pm_id] = localstripe.customer_with_cards("ann@example.com", "Ann Lee", CARD_OK)

        added = cli(
            "customer", "add", "--email", "Ann@Example.com", "--name", "Ann Lee", "--stripe-customer", cus_id, "--verified", "--json"
        )
        assert added.code == 0, added.err
        assert added.json()["email"] == "ann@example.com"
        assert added.json()["verified"] is True

        created = cli(
            "invoice",
            "create",
            "--customer",
            "ann@example.com",
            "--amount",
            "120.50",
            "--currency",
            "eur",
            "--description",
            "Consulting, November",
            "--due",
            DUE.isoformat(),
            "--send",
            "--json",
        )
        assert created.code == 0, created.err
        invoice = created.json()
        assert invoice["status"] == "open"
        assert invoice["amount_due"] == 12050
        assert invoice["link"]["emailed"] is True

        # The worker sends the invoice email over SMTP; the customer opens the link in it.
        [mail] = smtp.mailbox.wait_for(1)
        assert mail["To"] == "ann@example.com"
        assert invoice["number"] in mail["Subject"]
        assert "€120.50" in text_part(mail)
        link = pay_link_in(mail)
        assert link == invoice["link"]["url"]

        page = browser_client.get(link)
        assert page.status_code == 200
        html = page.text
        for expected in (
            "Acme Consulting",
            invoice["number"],
            "Consulting, November",
            "€120.50",
            format_day(DUE, "en"),
            "Ann Lee",
            "ann@example.com",
            "Visa •••• 4242",
            "expires 12/30",
        ):
            assert expected in html, f"{expected!r} missing from the pay page"
        assert offered_cards(html) == [pm_id]
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["referrer-policy"] == "no-referrer"

        # One click: a plain form POST (works without JavaScript), then the receipt.
        paid = browser_client.post(link, data={"csrf": csrf_of(html), "payment_method": pm_id})
        assert paid.status_code == 200
        assert "Payment received" in paid.text
        assert "Visa •••• 4242" in paid.text

        intents = localstripe.payment_intents_for(cus_id)
        assert [(pi.amount, pi.currency, pi.status) for pi in intents] == [(12050, "eur", "succeeded")]

        # localstripe's signed webhook arrives and is recorded (the POST already applied the same truth).
        wait_until(lambda: invoice_status(cli, invoice["number"])["status"] == "paid", what="invoice to be paid")
        receipt = smtp.mailbox.wait_for(2)[1]
        assert receipt["Subject"].startswith("Receipt for invoice")
        assert "Visa **** 4242" in text_part(receipt)
        assert "€120.50" in text_part(receipt)
        # It links to the online receipt, which opens on any device.
        [online] = PAY_LINK.findall(text_part(receipt))
        with httpx.Client(timeout=30, follow_redirects=True) as other_device:
            shown = other_device.get(online)
        assert shown.status_code == 200 and "Payment received" in shown.text

        # Opening the link again shows the receipt, not a pay button.
        again = browser_client.get(link)
        assert "Payment received" in again.text
        assert 'name="payment_method"' not in again.text

        # The link is a bearer credential: it is never written to the logs.
        token = link.rsplit("/", 1)[1]
        assert any("path=/pay/{token}" in r.getMessage() for r in caplog.records)
        app_records = [r for r in caplog.records if r.name != "httpx"]  # "httpx" here is this test's own client
        assert not [r for r in app_records if token in r.getMessage()]


class TestSecurityHeaders:
    """Link pages are locked down: a per-request nonce, only Stripe's origin for scripts and frames."""

    def test_headers_on_a_link_page(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        first, second = browser_client.get(issued.url), browser_client.get(issued.url)
        csp = first.headers["content-security-policy"]
        nonce = re.search(r"'nonce-([^']+)'", csp)
        assert nonce and f'nonce="{nonce.group(1)}"' in first.text
        assert nonce.group(1) not in second.headers["content-security-policy"]  # new for every request
        assert f"script-src 'self' 'nonce-{nonce.group(1)}' {localstripe.base}" in csp
        assert f"frame-src {localstripe.base}" in csp
        assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert first.headers["x-content-type-options"] == "nosniff"
        assert first.headers["referrer-policy"] == "no-referrer"
        assert first.headers["cache-control"] == "no-store"
        assert "strict-transport-security" not in first.headers  # plain http here

    def test_hsts_when_served_over_https(self, start_server) -> None:
        app_server = start_server(BASE_URL="https://pay.example.com")
        response = httpx.get(f"{app_server.base}/health")
        assert response.headers["strict-transport-security"].startswith("max-age=")


class TestLineItemsJourney:
    """Finance bills three lines at two tax rates; the customer pays from the email and is charged exactly the computed total."""

    def test_three_lines_two_rates_charge_the_computed_total(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, browser_client: httpx.Client
    ) -> None:
        cus_id, [pm_id] = localstripe.customer_with_cards("lina@example.com", "Lina Items", CARD_OK)
        assert (
            cli("customer", "add", "--email", "lina@example.com", "--name", "Lina Items", "--stripe-customer", cus_id, "--verified").code
            == 0
        )
        items = ("Consulting|3|400.00|19", "Travel|1|85.50|7", "Printed report|2|12.25|19")
        # What finance expects, worked out with the documented rule (links/lines.py: per line, half-up).
        expected = totals([parse_item(spec, "eur") for spec in items])
        assert [rate for rate, _ in expected.taxes] == [Decimal("7"), Decimal("19")]
        assert expected.total == 120000 + 22800 + 8550 + 599 + 2450 + 466  # 24.50 x 19 % = 4.655 -> 4.66

        created = cli(
            "invoice", "create", "--customer", "lina@example.com", "--currency", "eur", "--description", "November work",
            *(arg for spec in items for arg in ("--item", spec)), "--due", DUE.isoformat(), "--send", "--json",
        )  # fmt: skip
        assert created.code == 0, created.err
        invoice = created.json()
        assert invoice["amount_due"] == expected.total == invoice["total"]
        total_shown = format_money(expected.total, "eur")

        [mail] = smtp.mailbox.wait_for(1)
        text = text_part(mail)
        assert "Consulting" in text and "Printed report" in text and f"Total: {total_shown}" in text
        link = pay_link_in(mail)
        page = browser_client.get(link)
        assert page.status_code == 200 and total_shown in page.text

        paid = browser_client.post(link, data={"csrf": csrf_of(page.text), "payment_method": pm_id})
        assert paid.status_code == 200 and "Payment received" in paid.text
        [intent] = localstripe.payment_intents_for(cus_id)
        assert (intent.amount, intent.currency, intent.status) == (expected.total, "eur", "succeeded")
        wait_until(lambda: invoice_status(cli, invoice["number"])["status"] == "paid", what="invoice to be paid")
        assert invoice_status(cli, invoice["number"])["amount_paid"] == expected.total
