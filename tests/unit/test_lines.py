"""Line items, tax and totals: the rounding rule finance can check by hand."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal

import pytest

from emails.messages import (
    FactLine,
    InvoiceFacts,
    Kind,
    invoice_message,
    invoice_payload,
    invoice_void_payload,
    pay_link_url,
    render_payload,
)
from links.errors import LinkError
from links.lines import LineItem, check_lines, lines_json, lines_of, parse_item, plain_line, rate_text, totals
from plumbing.settings import Settings


class TestTotals:
    """Per line, half-up, then summed: the page, the PDF and the charge agree to the cent."""

    def test_three_lines_two_rates(self) -> None:
        lines = [parse_item("Consulting|3|400.00|19", "eur"), parse_item("Travel|1|85.50|7", "eur"), parse_item("Fee|1|10.00|", "eur")]
        result = totals(lines)
        assert result.subtotal == 120000 + 8550 + 1000
        assert result.taxes == [(Decimal("7"), 599), (Decimal("19"), 22800)]  # 85.50 x 7 % = 5.985 -> 5.99 (half-up)
        assert result.total == 129550 + 599 + 22800

    def test_half_up_per_line(self) -> None:
        line = LineItem("x", Decimal("1"), 5, Decimal("10"))  # 0.05 x 10 % = 0.005 -> 0.01
        assert (line.net, line.tax) == (5, 1)
        quarter = LineItem("y", Decimal("0.5"), 1, None)  # 0.5 minor unit -> 1
        assert quarter.net == 1

    def test_a_plain_amount_is_one_untaxed_line(self) -> None:
        [line] = lines_of(None, description="Annual service", amount_due=12050)
        assert (line.description, line.net, line.tax) == ("Annual service", 12050, 0)

    def test_round_trip_through_json(self) -> None:
        line = parse_item("Consulting|2.5|400.00|19", "eur")
        assert LineItem.from_json(line.to_json()) == line


class TestRefusals:
    """Bad items and totals Stripe cannot charge are refused with one clear line."""

    @pytest.mark.parametrize(
        "spec",
        [
            "Consulting|3",
            "|1|10.00|",
            "X|0|10.00|",
            "X|-1|10.00|",
            "X|abc|10.00|",
            "X|1|10.001|",
            "X|1|10.00|101",
            "X|1|10.00|abc",
            "X|1|0|",
        ],
    )
    def test_bad_item(self, spec: str) -> None:
        with pytest.raises(LinkError):
            parse_item(spec, "eur")

    def test_below_stripes_minimum_names_it(self) -> None:
        with pytest.raises(LinkError, match=r"minimum charge of 0\.50 EUR"):
            check_lines([parse_item("Tiny|1|0.49|", "eur")], "eur")
        with pytest.raises(LinkError, match=r"0\.30 GBP"):
            check_lines([parse_item("Tiny|1|0.29|", "gbp")], "gbp")
        with pytest.raises(LinkError, match="50 JPY"):
            check_lines([parse_item("Tiny|1|49|", "jpy")], "jpy")
        assert check_lines([parse_item("Ok|1|0.50|", "eur")], "eur").total == 50


class TestStoredShape:
    """What `Invoice.line_items` holds reads back the same, and quantities and rates look as finance typed them."""

    def test_quantities_and_rates_are_plain(self) -> None:
        line = parse_item("Boxes|100|1.00|19.0", "eur")
        assert line.to_json()["quantity"] == "100" and line.to_json()["tax_percent"] == "19"
        assert parse_item("Hours|2.50|10.00|7.5", "eur").to_json()["quantity"] == "2.5"
        assert rate_text(Decimal("19.000")) == "19 %" and rate_text(Decimal("7.50")) == "7.5 %"

    def test_lines_json_round_trip(self) -> None:
        lines = [parse_item(spec, "eur") for spec in ("Consulting|3|400.00|19", "Travel|1|85.50|7", "Fee|1|10.00|")]
        assert [LineItem.from_json(item) for item in lines_json(lines)] == lines
        assert totals([plain_line(" Annual ", 12050)]).total == 12050

    @pytest.mark.parametrize("quantity", [Decimal("2.5"), Decimal("0.3333")])
    def test_fractional_quantities_round_once_per_line(self, quantity: Decimal) -> None:
        line = LineItem("Work", quantity, 3333, Decimal("19"))
        assert line.net == int((quantity * 3333).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        assert totals([line, line]).total == 2 * line.total


FACTS = InvoiceFacts(
    "Acme GmbH", "Ann Lee", "INV-7", "November work", 154399, "eur", date(2026, 12, 15), date(2026, 11, 23),
    (FactLine("Consulting", "3", 40000, "19", 120000), FactLine("Travel", "1", 8550, "7", 8550), FactLine("Fee", "2", 1225, None, 2450)),
    131000, (("7", 599), ("19", 22800)), "Payable within 14 days.",
)  # fmt: skip
SETTINGS = Settings.from_env(
    {"LINK_SECRET_KEYS": "unit-test-link-key-0123456789", "STRIPE_SECRET_KEY": "sk_test_x", "STRIPE_PUBLISHABLE_KEY": "pk_test_x",
     "STRIPE_WEBHOOK_SECRET": "whsec_x", "BASE_URL": "https://pay.example.com"}
)  # fmt: skip
WHEN = datetime(2026, 12, 20, 9, 30, tzinfo=UTC)


class TestEmails:
    """Invoice, new-link and reminder emails list the lines, tax per rate, total, dates and notes; the void email is short."""

    @pytest.mark.parametrize(
        ("locale", "expected"),
        [
            (
                "en",
                [
                    "3 × €400.00 = €1,200.00 (Tax 19%)",  # the line's net amount, then its rate (not "Tax 19%: €1,200.00")
                    "Tax 7%: €5.99",
                    "Subtotal: €1,310.00",
                    "Total: €1,543.99",
                    "Issued: November 23, 2026",
                ],
            ),
            (
                "de",
                [
                    "3 × 400,00\xa0€ = 1.200,00\xa0€ (MwSt. 19\xa0%)",
                    "MwSt. 19\xa0%: 228,00\xa0€",
                    "Zwischensumme: 1.310,00\xa0€",
                    "Gesamtbetrag: 1.543,99\xa0€",
                    "Ausgestellt am: 23. November 2026",
                ],
            ),
            ("fr", ["TVA 7\xa0%", "Sous-total", "Émise le"]),
            ("es", ["IVA 19\xa0%", "Subtotal", "Emitida el"]),
        ],
    )
    def test_lines_in_every_language(self, locale: str, expected: list[str]) -> None:
        for kind in (Kind.INVOICE, Kind.NEW_LINK, Kind.REMINDER):
            message = invoice_message(FACTS, "https://pay.example.com/pay/abc", WHEN, locale, kind=kind)
            for text in expected:
                assert text in message.text, (kind, text)
            assert "Payable within 14 days." in message.text and "Payable within 14 days." in message.html
            assert "Consulting" in message.html and "Fee" in message.html

    def test_queued_facts_render_the_same(self) -> None:
        for kind in (Kind.INVOICE, Kind.REMINDER):
            subject, payload = invoice_payload(FACTS, link_id=uuid.UUID(int=7), expires_at=WHEN, locale="de", kind=kind)
            later = render_payload(SETTINGS, kind, json.loads(json.dumps(payload)))
            direct = invoice_message(FACTS, pay_link_url(SETTINGS, uuid.UUID(int=7), WHEN), WHEN, "de", kind=kind)
            assert (subject, later.text, later.html) == (direct.subject, direct.text, direct.html)

    def test_a_payload_queued_before_line_items_still_renders(self) -> None:
        invoice = {"merchant": "Acme", "customer_name": "Ann", "number": "INV-1", "description": "Annual service", "amount": 12050}
        old = {
            "locale": "en",
            "invoice": {**invoice, "currency": "eur", "due_date": "2026-12-15"},
            "link": {"id": uuid.UUID(int=1).hex, "expires_at": WHEN.isoformat()},
        }
        text = render_payload(SETTINGS, Kind.INVOICE, old).text
        assert "Amount: €120.50" in text and "Subtotal" not in text

    def test_a_plain_invoice_shows_one_amount(self) -> None:
        plain = replace(
            FACTS, amount=12050, lines=(FactLine("November work", "1", 12050, None, 12050),), subtotal=12050, taxes=(), notes=None
        )
        text = invoice_message(plain, "https://x/pay/a", WHEN, "en").text
        assert "Amount: €120.50" in text and "Subtotal" not in text and "Total" not in text

    @pytest.mark.parametrize(
        ("locale", "subject", "wording"),
        [
            ("en", "Overdue: invoice INV-7 from Acme GmbH, €1,543.99", "is overdue since December 15, 2026"),
            ("de", "Überfällig: Rechnung INV-7 von Acme GmbH, 1.543,99\xa0€", "seit dem 15. Dezember 2026 überfällig"),
            ("fr", "En retard : facture INV-7 de Acme GmbH, 1\u202f543,99\xa0€", "en retard depuis le 15 décembre 2026"),
            ("es", "Vencida: factura INV-7 de Acme GmbH, 1.543,99\xa0€", "vencida desde el 15 de diciembre de 2026"),
        ],
    )
    def test_overdue_reminder(self, locale: str, subject: str, wording: str) -> None:
        overdue = replace(FACTS, overdue_since=date(2026, 12, 15))
        message = invoice_message(overdue, "https://x/pay/a", WHEN, locale, kind=Kind.REMINDER)
        assert message.subject == subject
        assert wording in message.text and wording in message.html
        assert "overdue" not in invoice_message(FACTS, "https://x/pay/a", WHEN, "en", kind=Kind.REMINDER).text

    @pytest.mark.parametrize(
        ("locale", "subject"),
        [
            ("en", "Invoice INV-7 from Acme GmbH has been cancelled"),
            ("de", "Rechnung INV-7 von Acme GmbH wurde storniert"),
            ("fr", "La facture INV-7 de Acme GmbH a été annulée"),
            ("es", "La factura INV-7 de Acme GmbH ha sido anulada"),
        ],
    )
    def test_void_notice(self, locale: str, subject: str) -> None:
        subject_now, payload = invoice_void_payload(FACTS, locale=locale)
        message = render_payload(SETTINGS, Kind.INVOICE_VOID, json.loads(json.dumps(payload)))
        assert message.subject == subject_now == subject
        assert "INV-7" in message.text and "/pay/" not in message.text + message.html
