"""Build the messages Paylink sends: an HTML part and a plain-text part, in the customer's language."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any

from plumbing.i18n import N_, format_money
from plumbing.rendering import emails


class Kind:
    INVOICE = "invoice"
    NEW_LINK = "new_link"
    REMINDER = "reminder"
    RECEIPT = "receipt"
    VERIFICATION = "verification"
    FINANCE_ALERT = "finance_alert"


@dataclass(frozen=True)
class EmailContent:
    kind: str
    subject: str
    text: str
    html: str


@dataclass(frozen=True)
class InvoiceFacts:
    """What a customer needs to recognise an invoice in their inbox."""

    merchant: str
    customer_name: str
    number: str
    description: str
    amount: int
    currency: str
    due_date: date | None


def _build(kind: str, locale: str, subject: str, **context: Any) -> EmailContent:
    context["subject"] = subject
    return EmailContent(
        kind=kind,
        subject=subject,
        text=emails.render(f"{kind}.txt", locale, **context),
        html=emails.render(f"{kind}.html", locale, **context),
    )


def invoice_message(facts: InvoiceFacts, link_url: str, expires_at: datetime, locale: str, *, kind: str = Kind.INVOICE) -> EmailContent:
    """The invoice email, or a fresh link for it (kind NEW_LINK) or a reminder (kind REMINDER)."""
    amount = format_money(facts.amount, facts.currency, locale)
    subjects = {
        Kind.INVOICE: N_("Invoice %(number)s from %(merchant)s: %(amount)s"),
        Kind.NEW_LINK: N_("Your new payment link for invoice %(number)s"),
        Kind.REMINDER: N_("Reminder: invoice %(number)s from %(merchant)s, %(amount)s"),
    }
    subject = emails.gettext(locale, subjects[kind], number=facts.number, merchant=facts.merchant, amount=amount)
    return _build(kind, locale, subject, invoice=facts, link_url=link_url, expires_at=expires_at)


def receipt_message(
    facts: InvoiceFacts, *, amount_paid: int, brand: str | None, last4: str | None, paid_at: datetime, link_url: str | None, locale: str
) -> EmailContent:
    subject = emails.gettext(locale, "Receipt for invoice %(number)s from %(merchant)s", number=facts.number, merchant=facts.merchant)
    return _build(
        Kind.RECEIPT, locale, subject, invoice=facts, amount_paid=amount_paid, brand=brand, last4=last4, paid_at=paid_at, link_url=link_url
    )


def receipt_payload(
    facts: InvoiceFacts, *, amount_paid: int, brand: str | None, last4: str | None, paid_at: datetime, locale: str
) -> tuple[str, dict[str, Any]]:
    """The receipt's subject now, and the facts to render its body from when it is sent.

    Applying a payment happens inside the webhook writer's transaction, where every millisecond
    counts on payday; the outbox worker renders the two parts later (see `render_payload`)."""
    subject = emails.gettext(locale, "Receipt for invoice %(number)s from %(merchant)s", number=facts.number, merchant=facts.merchant)
    invoice = {**asdict(facts), "due_date": facts.due_date.isoformat() if facts.due_date else None}
    payload = {
        "locale": locale,
        "invoice": invoice,
        "amount_paid": amount_paid,
        "brand": brand,
        "last4": last4,
        "paid_at": paid_at.isoformat(),
    }
    return subject, payload


def render_payload(kind: str, payload: dict[str, Any]) -> EmailContent:
    """Render a message queued as facts (see `receipt_payload`)."""
    if kind != Kind.RECEIPT:
        raise ValueError(f"no deferred rendering for {kind!r} messages")
    invoice = dict(payload["invoice"])
    invoice["due_date"] = date.fromisoformat(invoice["due_date"]) if invoice.get("due_date") else None
    return receipt_message(
        InvoiceFacts(**invoice),
        amount_paid=payload["amount_paid"],
        brand=payload["brand"],
        last4=payload["last4"],
        paid_at=datetime.fromisoformat(payload["paid_at"]),
        link_url=None,
        locale=payload["locale"],
    )


def verification_message(merchant: str, customer_name: str, verify_url: str, expires_at: datetime, locale: str) -> EmailContent:
    subject = emails.gettext(locale, "Confirm this address for invoices from %(merchant)s", merchant=merchant)
    return _build(
        Kind.VERIFICATION, locale, subject, merchant=merchant, customer_name=customer_name, link_url=verify_url, expires_at=expires_at
    )


def finance_alert_message(merchant: str, title: str, lines: list[str]) -> EmailContent:
    """An alert for the finance team (always in English: it goes to staff, not customers)."""
    subject = f"[{merchant}] {title}"
    return _build(Kind.FINANCE_ALERT, "en", subject, merchant=merchant, title=title, lines=lines)
