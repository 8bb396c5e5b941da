"""Every email kind, in the customer's language, with both parts and the link as the call to action."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, date, datetime

import pytest

from emails.messages import (
    InvoiceFacts,
    Kind,
    finance_alert_message,
    invoice_message,
    invoice_payload,
    pay_link_url,
    receipt_message,
    render_payload,
    verification_message,
    verification_payload,
    verify_link_url,
)
from plumbing.i18n import format_money
from plumbing.settings import Settings
from plumbing.signing import pay_signer, verify_signer

FACTS = InvoiceFacts("Acme GmbH", "Ann Lee", "INV-7", "Beratung <November>", 12050, "eur", date(2026, 12, 15))
LINK = "https://pay.example.com/pay/abc.def"
WHEN = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
SETTINGS = Settings.from_env(
    {
        "LINK_SECRET_KEYS": "unit-test-link-key-0123456789",
        "STRIPE_SECRET_KEY": "sk_test_x",
        "STRIPE_PUBLISHABLE_KEY": "pk_test_x",
        "STRIPE_WEBHOOK_SECRET": "whsec_x",
        "BASE_URL": "https://pay.example.com",
    }
)
TOKEN = re.compile(r"[A-Za-z0-9_\-]{20,}\.[A-Za-z0-9_\-]{20,}")


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
    from emails.messages import receipt_payload

    subject, payload = receipt_payload(FACTS, amount_paid=12050, brand="visa", last4="4242", paid_at=WHEN, locale="de")
    direct = receipt_message(FACTS, amount_paid=12050, brand="visa", last4="4242", paid_at=WHEN, link_url=None, locale="de")
    later = render_payload(SETTINGS, Kind.RECEIPT, json.loads(json.dumps(payload)))  # as stored in the outbox's JSON column
    assert (subject, later.text, later.html) == (direct.subject, direct.text, direct.html)
    assert "120,50\xa0€" in later.text


class TestLinksRenderedAtSendTime:
    """A queued email names its link by id and expiry; the signed URL exists only in the email sent."""

    LINK_ID = uuid.UUID("6f1c7a4e-8a0b-4c57-9a57-2f7d0c1e9b11")

    @pytest.mark.parametrize("kind", [Kind.INVOICE, Kind.NEW_LINK, Kind.REMINDER])
    def test_invoice_kinds_render_the_same_as_directly(self, kind: str) -> None:
        subject, payload = invoice_payload(FACTS, link_id=self.LINK_ID, expires_at=WHEN, locale="de", kind=kind)
        stored = json.dumps(payload)  # what the outbox's JSON column holds
        assert "/pay/" not in stored and not TOKEN.search(stored)
        assert self.LINK_ID.hex in stored

        later = render_payload(SETTINGS, kind, json.loads(stored))
        url = pay_link_url(SETTINGS, self.LINK_ID, WHEN)
        direct = invoice_message(FACTS, url, WHEN, "de", kind=kind)
        assert (subject, later.subject, later.text, later.html) == (direct.subject, direct.subject, direct.text, direct.html)
        assert url in later.text and f'href="{url}"' in later.html

    def test_the_rendered_link_is_a_valid_token_for_that_link(self) -> None:
        _, payload = invoice_payload(FACTS, link_id=self.LINK_ID, expires_at=WHEN, locale="en")
        text = render_payload(SETTINGS, Kind.INVOICE, json.loads(json.dumps(payload))).text
        [url] = re.findall(r"https://pay\.example\.com/pay/\S+", text)
        claims = pay_signer(SETTINGS).verify(url.rsplit("/", 1)[1], now=datetime(2026, 11, 1, tzinfo=UTC))
        assert (claims.subject_id, claims.expires_at) == (self.LINK_ID, WHEN)

    def test_verification_renders_the_same_as_directly(self) -> None:
        subject, payload = verification_payload("Acme", "Ann", verification_id=self.LINK_ID, expires_at=WHEN, locale="es")
        stored = json.dumps(payload)
        assert "/verify/" not in stored and not TOKEN.search(stored)

        later = render_payload(SETTINGS, Kind.VERIFICATION, json.loads(stored))
        url = verify_link_url(SETTINGS, self.LINK_ID, WHEN)
        direct = verification_message("Acme", "Ann", url, WHEN, "es")
        assert (subject, later.text, later.html) == (direct.subject, direct.text, direct.html)
        claims = verify_signer(SETTINGS).verify(url.rsplit("/", 1)[1], now=datetime(2026, 11, 1, tzinfo=UTC))
        assert claims.subject_id == self.LINK_ID

    def test_a_kind_without_deferred_rendering_is_refused(self) -> None:
        with pytest.raises(ValueError, match="no deferred rendering"):
            render_payload(SETTINGS, Kind.FINANCE_ALERT, {"locale": "en"})
        with pytest.raises(ValueError, match="not an email with a payment link"):
            invoice_payload(FACTS, link_id=self.LINK_ID, expires_at=WHEN, locale="en", kind=Kind.RECEIPT)
