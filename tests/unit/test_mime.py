"""The MIME message the worker sends: headers a mail client shows right, in any language."""

from __future__ import annotations

import email
import email.policy

import pytest

from emails.outbox import ClaimedMessage
from emails.sender import build_mime
from plumbing.settings import Settings

ENV = {
    "LINK_SECRET_KEYS": "k" * 20,
    "STRIPE_SECRET_KEY": "sk_test_x",
    "STRIPE_PUBLISHABLE_KEY": "pk_test_x",
    "STRIPE_WEBHOOK_SECRET": "whsec_x",
    "MAIL_FROM": "Zoë's Café <billing@cafe.test>",
    "MAIL_REPLY_TO": "accounts@cafe.test",
}


def claimed(subject: str = "Rechnung INV-1 von Zoë's Café: 120,50 €", recipient: str = "ann@example.com") -> ClaimedMessage:
    return ClaimedMessage(
        "token", 1, "invoice", recipient, subject, "Text part: https://x/pay/t", "<p>HTML part</p>", "<id-1@cafe.test>", 0, None
    )


def test_headers_round_trip_through_a_mail_client() -> None:
    raw = build_mime(Settings.from_env(ENV), claimed()).as_bytes()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == "Rechnung INV-1 von Zoë's Café: 120,50 €"
    assert parsed["From"].addresses[0].display_name == "Zoë's Café"
    assert parsed["From"].addresses[0].addr_spec == "billing@cafe.test"
    assert parsed["Reply-To"] == "accounts@cafe.test"
    assert parsed["Message-ID"] == "<id-1@cafe.test>"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["Date"]
    assert parsed.get_body(preferencelist=("plain",)).get_content().strip() == "Text part: https://x/pay/t"  # type: ignore[union-attr]
    assert "HTML part" in parsed.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]


@pytest.mark.parametrize(("subject", "recipient"), [("Hi\nBcc: victim@example.com", "a@example.com"), ("Hi", "a@example.com\r\nBcc: x@y")])
def test_header_injection_is_refused(subject: str, recipient: str) -> None:
    with pytest.raises(ValueError, match="line break"):
        build_mime(Settings.from_env(ENV), claimed(subject, recipient))
