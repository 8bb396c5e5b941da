"""Documents (issue 12): the invoice and receipt PDFs, read back with pypdf; receipt numbers; the
merchant's identity on pages and in emails. Real localstripe, aiosmtpd, uvicorn and WeasyPrint."""

from __future__ import annotations

import asyncio
import functools
import io
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from pypdf import PdfReader
from sqlalchemy import update

from emails.sender import run_once
from links.hooks import apply_dead_message_policy
from links.lines import LineItem, lines_json, make_item, totals
from links.models import Customer, Invoice
from payments.documents import email_attachments, next_receipt_number
from plumbing.db import create_engine, create_session_factory
from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe, SmtpServer, db_query, html_part, in_thread, text_part
from tests.integration.helpers import Issued, csrf_of, issue_invoice

ROOT = Path(__file__).resolve().parent.parent.parent
LOGO = ROOT / "samples" / "logo.svg"
MERCHANT = {
    "MERCHANT_NAME": "Acme Consulting GmbH",
    "MERCHANT_ADDRESS": "Hauptstraße 5|10115 Berlin|Germany",
    "MERCHANT_TAX_ID": "DE123456789",
    "MERCHANT_SUPPORT_EMAIL": "help@acme.test",
    "MERCHANT_SUPPORT_PHONE": "+49 30 1234567",
    "MERCHANT_LOGO_PATH": str(LOGO),
}
THREE_LINES = ("Consulting|3|400.00|19", "Travel|1|85.50|7", "Printed report|2|12.25|19")


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """The test environment with a full merchant identity."""
    return {**env, **MERCHANT}


def run_db(database_url: str, statement: Any) -> None:
    async def run() -> None:
        engine = create_engine(database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(statement)
        finally:
            await engine.dispose()

    in_thread(asyncio.run, run())


def set_lines(settings: Settings, number: str, specs: tuple[str, ...]) -> int:
    """Give an issued invoice these line items (DESCRIPTION|QTY|UNIT|TAX); returns the total."""
    lines: list[LineItem] = [make_item(*spec.split("|"), "eur") for spec in specs]
    total = totals(lines).total
    run_db(settings.database_url, update(Invoice).where(Invoice.number == number).values(line_items=lines_json(lines), amount_due=total))
    return total


def pdf_text(data: bytes) -> str:
    reader = PdfReader(io.BytesIO(data))
    text = "\n".join(page.extract_text() for page in reader.pages)
    return text.replace("\xa0", " ").replace("\u202f", " ")  # Babel's no-break spaces, as a reader sees them


def fonts_embedded(data: bytes) -> list[str]:
    """Names of the PDF's fonts; each must carry its font program (FontFile, FontFile2 or FontFile3)."""
    reader = PdfReader(io.BytesIO(data))
    names = []
    for page in reader.pages:
        for font in page["/Resources"]["/Font"].values():
            font = font.get_object()
            descendants = font.get("/DescendantFonts")
            described = descendants[0].get_object() if descendants else font
            descriptor = described["/FontDescriptor"].get_object()
            assert any(key in descriptor for key in ("/FontFile", "/FontFile2", "/FontFile3")), f"{font['/BaseFont']} is not embedded"
            names.append(str(font["/BaseFont"]))
    return names


def open_page(client: httpx.Client, issued: Issued) -> httpx.Response:
    page = client.get(issued.url)
    assert page.status_code == 200 and "/pay/l/" in str(page.url)
    return page


def pay(client: httpx.Client, issued: Issued) -> httpx.Response:
    page = open_page(client, issued)
    paid = client.post(str(page.url), data={"csrf": csrf_of(page.text), "payment_method": issued.cards[0]})
    assert "Payment received" in paid.text or "Zahlung erhalten" in paid.text, paid.text[:500]
    return paid


class TestInvoicePdf:
    """A customer downloads the invoice as a PDF from the pay page: numbers, lines, tax per rate, total."""

    def test_three_lines_two_rates(self, cli, localstripe: LocalStripe, settings: Settings, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        total = set_lines(settings, issued.number, THREE_LINES)
        assert total == 154865  # 1,310.00 net + 232.66 (19 %) + 5.99 (7 %), half-up per line
        page = open_page(browser_client, issued)
        # The page shows the same lines and totals, and links to the PDF.
        for shown in ("Consulting", "Printed report", "€1,310.00", "€232.66", "€5.99", "€1,548.65", "Tax 19%", "Tax 7%"):
            assert shown in page.text, shown
        assert f'href="{page.url.path}/invoice.pdf"' in page.text
        assert "receipt.pdf" not in page.text  # not paid: no receipt offered

        response = browser_client.get(f"{page.url}/invoice.pdf")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/pdf"
        assert response.headers["content-disposition"] == f'attachment; filename="{issued.number}.pdf"'
        assert response.headers["cache-control"] == "no-store"
        text = pdf_text(response.content)
        for shown in ("Invoice", issued.number, "Consulting", "Travel", "Printed report", "€400.00", "€1,310.00", "€232.66", "€5.99"):
            assert shown in text, shown
        assert "€1,548.65" in text
        # The merchant's identity.
        for shown in ("Acme Consulting GmbH", "Hauptstraße 5", "10115 Berlin", "DE123456789", "help@acme.test"):
            assert shown in text, shown
        assert fonts_embedded(response.content)
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        (artifacts / "invoice-three-lines.pdf").write_bytes(response.content)  # to look at (pdftoppm turns it into PNG)

    def test_the_token_address_serves_it_too(self, cli, localstripe: LocalStripe, server) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        response = httpx.get(f"{issued.url}/invoice.pdf", timeout=30)
        assert response.status_code == 200 and response.content.startswith(b"%PDF")
        assert f'filename="{issued.number}.pdf"' in response.headers["content-disposition"]

    def test_german(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, locale="de")
        page = open_page(browser_client, issued)
        text = pdf_text(browser_client.get(f"{page.url}/invoice.pdf").content)
        assert "Rechnung" in text and "120,50 €" in text and "Rechnungsnummer" in text
        assert "Beschreibung" in text and "Einzelpreis" in text
        assert re.search(r"\d{1,2}\. \w+ 20\d\d", text), "a German long date"


class TestReceiptPdf:
    """After paying, the customer downloads a receipt usable as a tax receipt; before, there is none."""

    def test_receipt_after_paying(self, cli, localstripe: LocalStripe, settings: Settings, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page = open_page(browser_client, issued)
        unpaid = browser_client.get(f"{page.url}/receipt.pdf")
        assert unpaid.status_code == 404 and unpaid.headers["content-type"].startswith("text/html")
        assert "There is no receipt yet" in unpaid.text

        paid = pay(browser_client, issued)
        assert "receipt.pdf" in paid.text and "invoice.pdf" in paid.text
        response = browser_client.get(f"{page.url}/receipt.pdf")
        assert response.status_code == 200
        assert response.headers["content-disposition"] == f'attachment; filename="{issued.number}-receipt.pdf"'
        text = pdf_text(response.content)
        [(number,)] = db_query(settings.database_url, "SELECT receipt_number FROM payments WHERE status = 'succeeded'")
        assert re.fullmatch(r"RCT-\d{6}", number)
        for shown in ("Receipt", number, issued.number, "€120.50", "4242", "Acme Consulting GmbH", "Hauptstraße 5", "DE123456789", "UTC"):
            assert shown in text, shown
        fonts_embedded(response.content)

    def test_german_receipt(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, locale="de")
        page = open_page(browser_client, issued)
        pay(browser_client, issued)
        text = pdf_text(browser_client.get(f"{page.url}/receipt.pdf").content)
        assert "Quittung" in text and "120,50 €" in text and "Rechnung" in text and "Bezahlt am" in text


class TestNoPdfWithoutTheLink:
    """A forged, foreign or expired link never yields a PDF: it gets the page that says why."""

    def test_forged_token_and_no_cookie(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        forged = issued.url[:-3] + ("aaa" if not issued.url.endswith("aaa") else "bbb")
        for url in (f"{forged}/invoice.pdf", f"{forged}/receipt.pdf"):
            response = httpx.get(url, timeout=30)
            assert response.status_code == 404 and not response.content.startswith(b"%PDF")
        page = open_page(browser_client, issued)
        # The page's address without the link's cookie (another browser): "open the link from your email".
        response = httpx.get(f"{page.url}/invoice.pdf", timeout=30)
        assert response.status_code == 404 and not response.content.startswith(b"%PDF")

    def test_expired_link(self, cli, localstripe: LocalStripe, settings: Settings, server) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        from plumbing.signing import pay_signer

        link_id = pay_signer(settings).verify(issued.url.rsplit("/", 1)[1]).subject_id
        from datetime import UTC, datetime, timedelta

        expired = pay_signer(settings).sign(link_id, datetime.now(UTC) - timedelta(days=1))
        response = httpx.get(f"{settings.base_url}/pay/{expired}/invoice.pdf", timeout=30)
        assert response.status_code == 410 and not response.content.startswith(b"%PDF")
        # The expired page names the invoice and its amount, and how to reach the merchant.
        assert issued.number in response.text and "€120.50" in response.text and "help@acme.test" in response.text
        assert response.text.count("mailto:help@acme.test") == 1  # in the page, not again in its footer


class TestMerchantIdentity:
    """Every page and email shows who the customer deals with and how to reach them."""

    def test_page_logo_favicon_country(
        self, cli, localstripe: LocalStripe, settings: Settings, server, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        run_db(settings.database_url, update(Customer).where(Customer.email == issued.email).values(country="DE", city="Berlin"))
        page = open_page(browser_client, issued)
        for shown in ('src="/brand/logo"', "Acme Consulting GmbH", "Hauptstraße 5", "mailto:help@acme.test", "+49 30 1234567", "Germany"):
            assert shown in page.text, shown
        french = browser_client.get(f"{page.url}?lang=fr")
        assert "Allemagne" in french.text
        logo = browser_client.get("/brand/logo")
        assert logo.status_code == 200 and logo.headers["content-type"] == "image/svg+xml" and b"<svg" in logo.content
        icon = browser_client.get("/favicon.ico")
        assert icon.status_code == 200 and icon.content == logo.content

    def test_emails_carry_identity_and_attach_pdfs(self, cli, localstripe: LocalStripe, env: dict[str, str], smtp: SmtpServer) -> None:
        settings = Settings.from_env({**env, "OUTBOX_IN_PROCESS": "false", "INVOICE_PDF_ATTACH": "true"})
        issue_invoice(cli, localstripe, CARD_OK)

        async def work() -> None:
            engine = create_engine(settings.database_url)
            try:
                sessions = create_session_factory(engine)
                on_dead = functools.partial(apply_dead_message_policy, settings)
                await run_once(sessions, settings, on_dead=on_dead, attach=email_attachments(sessions, settings))
            finally:
                await engine.dispose()

        in_thread(asyncio.run, work())
        [mail] = smtp.mailbox.wait_for(1)
        assert mail["From"].addresses[0].display_name == "Acme Billing"  # MAIL_FROM names one itself
        assert mail["Reply-To"] == "help@acme.test"  # MAIL_REPLY_TO defaults to the support email
        html = html_part(mail)
        assert "Hauptstraße 5" in html and "DE123456789" in html and "/brand/logo" in html
        assert "Hauptstraße 5" in text_part(mail) and "help@acme.test" in text_part(mail)
        [attachment] = [part for part in mail.iter_attachments()]
        assert attachment.get_content_type() == "application/pdf"
        number = db_query(settings.database_url, "SELECT number FROM invoices")[0][0]
        assert attachment.get_filename() == f"{number}.pdf"
        assert number in pdf_text(attachment.get_content())


@pytest.mark.postgres
class TestReceiptNumbers:
    """Receipt numbers are unique and gap-free, even when payments succeed at the same moment or roll back."""

    def test_concurrent_and_rolled_back(self, settings: Settings, backend: str) -> None:
        async def run() -> list[str]:
            engine = create_engine(settings.database_url)
            sessions = create_session_factory(engine)
            committed: list[str] = []

            async def take(index: int) -> None:
                async with sessions() as session:
                    async with session.begin():
                        number = await session.run_sync(next_receipt_number)
                        await asyncio.sleep(0.01)
                        if index % 3 == 0:
                            await session.rollback()  # a payment that did not commit gives its number back
                            return
                    committed.append(number)

            try:
                await asyncio.gather(*(take(i) for i in range(30)))
            finally:
                await engine.dispose()
            return committed

        committed = in_thread(asyncio.run, run())
        assert len(committed) == 20 and len(set(committed)) == 20
        assert sorted(committed) == [f"RCT-{n:06d}" for n in range(1, 21)]
        assert db_query(settings.database_url, "SELECT last_value FROM number_sequences WHERE name = 'receipt'") == [(20,)]


def test_decimal_quantity_rendering_is_locale_aware() -> None:
    from plumbing.rendering import pages

    env = pages.environment("de")
    assert env.filters["number"](Decimal("2.5")) == "2,5"
    assert env.filters["percent"]("19") == "19\xa0%"
