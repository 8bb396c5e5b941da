"""Issue 12 in a real Chromium: line items and tax, the merchant's identity, PDF downloads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import DESKTOP, PHONE, assert_accessible, snap
from tests.harness import CARD_OK, LocalStripe
from tests.integration.helpers import issue_invoice
from tests.integration.test_documents import MERCHANT, THREE_LINES, pdf_text, set_lines

pytestmark = pytest.mark.browser


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """The test environment with a full merchant identity (logo, address, support contact)."""
    return {**env, **MERCHANT}


def download_pdf(page: Page, link_name: str) -> tuple[str, str]:
    with page.expect_download() as info:
        page.get_by_role("link", name=link_name).click()
    download = info.value
    return download.suggested_filename, pdf_text(Path(download.path()).read_bytes())


@pytest.mark.parametrize("page", [{"viewport": PHONE}, {"viewport": DESKTOP}], indirect=True, ids=["phone", "desktop"])
class TestItemisedInvoice:
    """A three-line invoice with two tax rates: the page shows lines and totals, the charge is the total,
    and the invoice and receipt PDFs download from the pay page and the paid page."""

    def test_lines_totals_charge_and_pdfs(self, cli, localstripe: LocalStripe, settings, server, page: Page, request) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        total = set_lines(settings, issued.number, THREE_LINES)
        size = request.node.callspec.id
        page.goto(issued.url)
        expect(page.get_by_role("heading", level=1)).to_have_text("Pay €1,548.65")
        table = page.get_by_role("table", name="Items")
        expect(table).to_contain_text("Consulting")
        expect(table).to_contain_text("Travel")
        expect(table).to_contain_text("Printed report")
        expect(table.get_by_role("row", name=re.compile("^Subtotal"))).to_contain_text("€1,310.00")
        expect(table.get_by_role("row", name=re.compile("^Tax 19%"))).to_contain_text("€232.66")
        expect(table.get_by_role("row", name=re.compile("^Tax 7%"))).to_contain_text("€5.99")
        expect(table.get_by_role("row", name=re.compile("^Total"))).to_contain_text("€1,548.65")
        # The merchant: logo, address and support contact.
        expect(page.locator("header.site img.logo")).to_be_visible()
        footer = page.get_by_role("contentinfo")
        expect(footer).to_contain_text("Acme Consulting GmbH")
        expect(footer).to_contain_text("Hauptstraße 5")
        expect(footer.get_by_role("link", name="help@acme.test")).to_be_visible()
        expect(footer.get_by_role("link", name="+49 30 1234567")).to_be_visible()
        assert_accessible(page)
        snap(page, f"itemised-pay-page-{size}")

        name, text = download_pdf(page, "Download the invoice (PDF)")
        assert name == f"{issued.number}.pdf"
        assert "€1,548.65" in text and "€232.66" in text and "€5.99" in text

        page.get_by_role("button", name="Pay €1,548.65 with Visa •••• 4242").click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Payment received")
        [intent] = localstripe.payment_intents_for(issued.stripe_customer)
        assert intent.amount == total == 154865  # the charge is the total the page showed
        assert_accessible(page)
        snap(page, f"itemised-paid-page-{size}")
        name, text = download_pdf(page, "Download the receipt (PDF)")
        assert name == f"{issued.number}-receipt.pdf"
        assert "€1,548.65" in text and re.search(r"RCT-\d{6}", text) and "DE123456789" in text
        name, _ = download_pdf(page, "Download the invoice (PDF)")
        assert name == f"{issued.number}.pdf"


class TestGermanDocuments:
    """A German customer downloads the invoice and the receipt in German."""

    @pytest.mark.parametrize("page", [{"locale": "de-DE"}], indirect=True)
    def test_german_invoice_and_receipt(self, cli, localstripe: LocalStripe, server, page: Page) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, locale="de")
        page.goto(issued.url)
        _, text = download_pdf(page, "Rechnung herunterladen (PDF)")
        assert "Rechnung" in text and "120,50 €" in text
        page.get_by_role("button", name=re.compile("120,50")).click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Zahlung erhalten")
        assert_accessible(page)
        snap(page, "german-paid-page")
        _, text = download_pdf(page, "Quittung herunterladen (PDF)")
        assert "Quittung" in text and "120,50 €" in text and "Bezahlt am" in text
