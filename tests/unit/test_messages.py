"""Every email kind, in the customer's language, with both parts and the link as the call to action."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from emails.messages import InvoiceFacts, Kind, finance_alert_message, invoice_message, receipt_message, verification_message
from plumbing.i18n import format_money

FACTS = InvoiceFacts("Acme GmbH", "Ann Lee", "INV-7", "Beratung <November>", 12050, "eur", date(2026, 12, 15))
LINK = "https://pay.example.com/pay/abc.def"
WHEN = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)


@pytest.mark.parametrize("kind", [Kind.INVOICE, Kind.NEW_LINK, Kind.REMINDER])
@pytest.mark.parametrize(("locale", "amount", "due"), [("en", "€120.50", "December 15, 2026"), ("de", "120,50\xa0€", "15. Dezember 2026")])
def test_invoice_kinds_have_both_parts_and_the_link(kind: str, locale: str, amount: str, due: str) -> None:
    message = invoice_message(FACTS, LINK, WHEN, locale, kind=kind)
    assert message.kind == kind
    assert "INV-7" in message.subject
    for part in (message.text, message.html):
        assert LINK in part
        assert amount in part
        assert due in part
        assert "Acme GmbH" in part or kind == Kind.NEW_LINK
    assert "Beratung &lt;November&gt;" in message.html  # escaped in HTML
    assert "Beratung <November>" in message.text  # plain in text
    assert message.html.count(f'href="{LINK}"') >= 1


def test_german_wording() -> None:
    message = invoice_message(FACTS, LINK, WHEN, "de")
    assert message.subject == "Rechnung INV-7 von Acme GmbH: 120,50\xa0€"
    assert "Ann Lee" in message.text.splitlines()[0]
    assert "120,50\xa0€ bezahlen" in message.html


@pytest.mark.parametrize("locale", ["en", "fr"])
def test_receipt(locale: str) -> None:
    message = receipt_message(FACTS, amount_paid=12050, brand="visa", last4="4242", paid_at=WHEN, link_url=LINK, locale=locale)
    assert format_money(12050, "eur", locale) in message.text
    assert ("Amount paid" if locale == "en" else "Montant") in message.text
    assert "4242" in message.text and "4242" in message.html
    assert "INV-7" in message.subject


def test_zero_decimal_currency() -> None:
    yen = InvoiceFacts("Acme", "Kenji", "INV-8", "Licence", 1500, "jpy", None)
    assert "¥1,500" in invoice_message(yen, LINK, WHEN, "en").text


@pytest.mark.parametrize("locale", ["en", "es"])
def test_verification(locale: str) -> None:
    message = verification_message("Acme", "Ann", "https://pay.example.com/verify/xyz", WHEN, locale)
    assert "https://pay.example.com/verify/xyz" in message.text and "https://pay.example.com/verify/xyz" in message.html
    assert "Acme" in message.subject


def test_finance_alert() -> None:
    message = finance_alert_message("Acme", "Invoice INV-7 needs attention", ["disputed: fraudulent"])
    assert message.subject == "[Acme] Invoice INV-7 needs attention"
    assert "disputed: fraudulent" in message.text and "disputed: fraudulent" in message.html


def test_receipt_queued_as_facts_renders_the_same_as_directly() -> None:
    from emails.messages import receipt_payload, render_payload

    subject, payload = receipt_payload(FACTS, amount_paid=12050, brand="visa", last4="4242", paid_at=WHEN, locale="de")
    direct = receipt_message(FACTS, amount_paid=12050, brand="visa", last4="4242", paid_at=WHEN, link_url=None, locale="de")
    import json

    later = render_payload(Kind.RECEIPT, json.loads(json.dumps(payload)))  # as stored in the outbox's JSON column
    assert (subject, later.text, later.html) == (direct.subject, direct.text, direct.html)
    assert "120,50\xa0€" in later.text
