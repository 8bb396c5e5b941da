"""Build the messages Paylink sends: an HTML part and a plain-text part, in the customer's language.

Every message that carries a link (invoice, new link, reminder, address confirmation) and every
receipt is queued as facts (`*_payload`: the subject now, a JSON payload for later) and rendered by
the worker when it sends it (`render_payload`). A payload names its link by id and expiry only; the
signed URL is built at send time (`pay_link_url`, `verify_link_url`: the token is deterministic), so
the outbox never holds a token that opens an invoice or confirms an address.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import date, datetime
from decimal import Decimal
from functools import partial
from typing import Any

from babel.numbers import format_decimal, format_percent

from plumbing.i18n import N_, format_money, normalize_locale
from plumbing.rendering import emails
from plumbing.settings import Settings
from plumbing.signing import pay_signer, verify_signer


class Kind:
    INVOICE = "invoice"
    NEW_LINK = "new_link"
    REMINDER = "reminder"
    RECEIPT = "receipt"
    VERIFICATION = "verification"
    FINANCE_ALERT = "finance_alert"
    INVOICE_VOID = "invoice_void"  # "this invoice was cancelled"
    COLLEAGUE_INVOICE = "colleague_invoice"  # the invoice, sent to a colleague of the customer with a link of their own

    WITH_PAY_LINK = (INVOICE, NEW_LINK, REMINDER)


@dataclass(frozen=True)
class EmailContent:
    kind: str
    subject: str
    text: str
    html: str


@dataclass(frozen=True)
class FactLine:
    """One line item as an email shows it (amounts in minor units, quantity and rate as decimal text)."""

    description: str
    quantity: str
    unit_amount: int
    tax_percent: str | None  # None: no tax on this line
    net: int  # quantity x unit amount, rounded half-up


@dataclass(frozen=True)
class InvoiceFacts:
    """What a customer needs to recognise an invoice in their inbox.

    The fields after `due_date` came with line items (issue 12); a payload queued before them
    renders as before (one amount, no lines)."""

    merchant: str
    customer_name: str
    number: str
    description: str
    amount: int  # the total: what gets charged
    currency: str
    due_date: date | None
    issued_on: date | None = None
    lines: tuple[FactLine, ...] = ()
    subtotal: int | None = None
    taxes: tuple[tuple[str, int], ...] = ()  # (rate in percent, tax at that rate), by rate
    notes: str | None = None
    overdue_since: date | None = None  # set when the email is queued after the due date
    # Part payments (issue 13): what was paid so far, and the balance still due when something was
    # paid and something is still due (None: nothing paid yet, the whole amount is due).
    amount_paid: int = 0
    balance: int | None = None

    @property
    def to_pay(self) -> int:
        """What the customer is asked to pay now: the balance, or the whole amount."""
        return self.balance if self.balance is not None else self.amount

    @property
    def itemised(self) -> bool:
        """Whether the email lists the lines: more than one, any tax, or one that is not simply the description."""
        if len(self.lines) > 1 or self.taxes:
            return True
        return bool(self.lines) and (self.lines[0].description != self.description or self.lines[0].quantity != "1")


def _quantity(locale: str, value: str) -> str:
    return str(format_decimal(Decimal(value), locale=normalize_locale(locale)))


def _percent(locale: str, value: str) -> str:
    return str(format_percent(Decimal(value) / 100, locale=normalize_locale(locale), decimal_quantization=False))


def _build(kind: str, locale: str, subject: str, **context: Any) -> EmailContent:
    context["subject"] = subject
    context["quantity"] = partial(_quantity, locale)
    context["percent"] = partial(_percent, locale)
    return EmailContent(
        kind=kind,
        subject=subject,
        text=emails.render(f"{kind}.txt", locale, **context),
        html=emails.render(f"{kind}.html", locale, **context),
    )


def pay_link_url(settings: Settings, link_id: uuid.UUID, expires_at: datetime) -> str:
    """The emailed URL of a payment link (the token is deterministic: same link, same URL)."""
    return f"{settings.base_url}/pay/{pay_signer(settings).sign(link_id, expires_at)}"


def verify_link_url(settings: Settings, verification_id: uuid.UUID, expires_at: datetime) -> str:
    """The emailed URL that confirms a customer's address."""
    return f"{settings.base_url}/verify/{verify_signer(settings).sign(verification_id, expires_at)}"


_INVOICE_SUBJECTS = {
    Kind.INVOICE: N_("Invoice %(number)s from %(merchant)s: %(amount)s"),
    Kind.NEW_LINK: N_("Your new payment link for invoice %(number)s"),
    Kind.REMINDER: N_("Reminder: invoice %(number)s from %(merchant)s, %(amount)s"),
}


_OVERDUE_SUBJECT = N_("Overdue: invoice %(number)s from %(merchant)s, %(amount)s")


def _invoice_subject(facts: InvoiceFacts, locale: str, kind: str) -> str:
    amount = format_money(facts.to_pay, facts.currency, locale)  # the balance of a partly paid invoice
    subject = _OVERDUE_SUBJECT if kind == Kind.REMINDER and facts.overdue_since else _INVOICE_SUBJECTS[kind]
    return emails.gettext(locale, subject, number=facts.number, merchant=facts.merchant, amount=amount)


def invoice_message(facts: InvoiceFacts, link_url: str, expires_at: datetime, locale: str, *, kind: str = Kind.INVOICE) -> EmailContent:
    """The invoice email, or a fresh link for it (kind NEW_LINK) or a reminder (kind REMINDER)."""
    subject = _invoice_subject(facts, locale, kind)
    return _build(kind, locale, subject, invoice=facts, link_url=link_url, expires_at=expires_at)


def invoice_payload(
    facts: InvoiceFacts, *, link_id: uuid.UUID, expires_at: datetime, locale: str, kind: str = Kind.INVOICE
) -> tuple[str, dict[str, Any]]:
    """The subject now, and the facts to render an invoice, new-link or reminder email from when it
    is sent: the link by id and expiry, never its URL or token."""
    if kind not in Kind.WITH_PAY_LINK:
        raise ValueError(f"{kind!r} is not an email with a payment link")
    payload = {"locale": locale, "invoice": _facts_json(facts), "link": _link_json(link_id, expires_at)}
    return _invoice_subject(facts, locale, kind), payload


def verification_payload(
    merchant: str, customer_name: str, *, verification_id: uuid.UUID, expires_at: datetime, locale: str
) -> tuple[str, dict[str, Any]]:
    """The subject now, and the facts to render the address confirmation from when it is sent."""
    payload = {
        "locale": locale,
        "merchant": merchant,
        "customer_name": customer_name,
        "link": _link_json(verification_id, expires_at),
    }
    return _verification_subject(merchant, locale), payload


_FACT_DATES = ("due_date", "issued_on", "overdue_since")


def _facts_json(facts: InvoiceFacts) -> dict[str, Any]:
    data = asdict(facts)
    for name in _FACT_DATES:
        value = getattr(facts, name)
        data[name] = value.isoformat() if value else None
    return data


def _facts_from_json(invoice: dict[str, Any]) -> InvoiceFacts:
    invoice = dict(invoice)
    for name in _FACT_DATES:
        invoice[name] = date.fromisoformat(invoice[name]) if invoice.get(name) else None
    invoice["lines"] = tuple(FactLine(**line) for line in invoice.get("lines") or ())
    invoice["taxes"] = tuple((str(rate), int(amount)) for rate, amount in invoice.get("taxes") or ())
    return InvoiceFacts(**invoice)


def _link_json(subject_id: uuid.UUID, expires_at: datetime) -> dict[str, str]:
    return {"id": subject_id.hex, "expires_at": expires_at.isoformat()}


def _link_from_json(link: dict[str, str]) -> tuple[uuid.UUID, datetime]:
    return uuid.UUID(hex=link["id"]), datetime.fromisoformat(link["expires_at"])


@dataclass(frozen=True)
class AllocationFact:
    """One invoice a pay-all payment paid: its number, what it got, and what is still due on it."""

    number: str
    amount: int
    balance: int


def receipt_message(
    facts: InvoiceFacts,
    *,
    amount_paid: int,
    brand: str | None,
    last4: str | None,
    paid_at: datetime,
    link_url: str | None,
    locale: str,
    balance: int | None = None,
    receipt_number: str | None = None,
    allocation: tuple[AllocationFact, ...] = (),
) -> EmailContent:
    """The receipt of one payment: of one invoice (with the balance still due after a part payment),
    or of several (`allocation`: which invoice got what)."""
    if allocation is not None and len(allocation) > 1:
        subject = emails.gettext(
            locale, "Receipt for %(count)s invoices from %(merchant)s", count=str(len(allocation)), merchant=facts.merchant
        )
    else:
        subject = emails.gettext(locale, "Receipt for invoice %(number)s from %(merchant)s", number=facts.number, merchant=facts.merchant)
    return _build(
        Kind.RECEIPT, locale, subject, invoice=facts, amount_paid=amount_paid, brand=brand, last4=last4, paid_at=paid_at, link_url=link_url,
        balance=balance, receipt_number=receipt_number, allocation=allocation,
    )  # fmt: skip


def receipt_payload(
    facts: InvoiceFacts,
    *,
    amount_paid: int,
    brand: str | None,
    last4: str | None,
    paid_at: datetime,
    locale: str,
    link: tuple[uuid.UUID, datetime] | None = None,
    balance: int | None = None,
    receipt_number: str | None = None,
    allocation: list[tuple[str, int, int]] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The receipt's subject now, and the facts to render its body from when it is sent. `balance`:
    what is still due on the invoice after this payment; `allocation`: (number, amount, balance) per
    invoice of a pay-all payment.

    Applying a payment happens inside the webhook writer's transaction, where every millisecond
    counts on payday; the outbox worker renders the two parts later (see `render_payload`)."""
    if allocation is not None and len(allocation) > 1:
        subject = emails.gettext(
            locale, "Receipt for %(count)s invoices from %(merchant)s", count=str(len(allocation)), merchant=facts.merchant
        )
    else:
        subject = emails.gettext(locale, "Receipt for invoice %(number)s from %(merchant)s", number=facts.number, merchant=facts.merchant)
    payload: dict[str, Any] = {
        "locale": locale,
        "invoice": _facts_json(facts),
        "amount_paid": amount_paid,
        "brand": brand,
        "last4": last4,
        "paid_at": paid_at.isoformat(),
        "balance": balance,
        "receipt_number": receipt_number,
        "allocation": [list(line) for line in allocation or ()],
    }
    if link is not None:  # the online receipt: the invoice's link shows it once the invoice is paid
        payload["link"] = _link_json(*link)
    return subject, payload


def render_payload(settings: Settings, kind: str, payload: dict[str, Any]) -> EmailContent:
    """Render a message queued as facts (`receipt_payload`, `invoice_payload`, `verification_payload`),
    building its link's signed URL now (BASE_URL and the newest LINK_SECRET_KEYS key)."""
    locale = payload["locale"]
    if kind == Kind.RECEIPT:
        return receipt_message(
            _facts_from_json(payload["invoice"]),
            amount_paid=payload["amount_paid"],
            brand=payload["brand"],
            last4=payload["last4"],
            paid_at=datetime.fromisoformat(payload["paid_at"]),
            link_url=pay_link_url(settings, *_link_from_json(payload["link"])) if payload.get("link") else None,
            locale=locale,
            balance=payload.get("balance"),
            receipt_number=payload.get("receipt_number"),
            allocation=tuple(AllocationFact(str(n), int(a), int(b)) for n, a, b in payload.get("allocation") or ()),
        )
    if kind in Kind.WITH_PAY_LINK:
        link_id, expires_at = _link_from_json(payload["link"])
        url = pay_link_url(settings, link_id, expires_at)
        return invoice_message(_facts_from_json(payload["invoice"]), url, expires_at, locale, kind=kind)
    if kind == Kind.INVOICE_VOID:
        return invoice_void_message(_facts_from_json(payload["invoice"]), locale)
    if kind == Kind.VERIFICATION:
        verification_id, expires_at = _link_from_json(payload["link"])
        url = verify_link_url(settings, verification_id, expires_at)
        return verification_message(payload["merchant"], payload["customer_name"], url, expires_at, locale)
    if kind == Kind.COLLEAGUE_INVOICE:
        return _render_colleague(settings, payload)
    raise ValueError(f"no deferred rendering for {kind!r} messages")


def _void_subject(facts: InvoiceFacts, locale: str) -> str:
    return emails.gettext(locale, "Invoice %(number)s from %(merchant)s has been cancelled", number=facts.number, merchant=facts.merchant)


def invoice_void_message(facts: InvoiceFacts, locale: str) -> EmailContent:
    """The "this invoice was cancelled" email: short, in the customer's language, no link to pay."""
    return _build(Kind.INVOICE_VOID, locale, _void_subject(facts, locale), invoice=facts)


def invoice_void_payload(facts: InvoiceFacts, *, locale: str) -> tuple[str, dict[str, Any]]:
    """The cancellation's subject now, and the facts to render it from when it is sent (like every
    customer email, so the sender renders them all the same way)."""
    return _void_subject(facts, locale), {"locale": locale, "invoice": _facts_json(facts)}


def _verification_subject(merchant: str, locale: str) -> str:
    return emails.gettext(locale, "Confirm this address for invoices from %(merchant)s", merchant=merchant)


def verification_message(merchant: str, customer_name: str, verify_url: str, expires_at: datetime, locale: str) -> EmailContent:
    subject = _verification_subject(merchant, locale)
    return _build(
        Kind.VERIFICATION, locale, subject, merchant=merchant, customer_name=customer_name, link_url=verify_url, expires_at=expires_at
    )


def finance_alert_message(merchant: str, title: str, lines: list[str]) -> EmailContent:
    """An alert for the finance team (always in English: it goes to staff, not customers)."""
    subject = f"[{merchant}] {title}"
    return _build(Kind.FINANCE_ALERT, "en", subject, merchant=merchant, title=title, lines=lines)


# --- the invoice sent to a colleague (issue 13, "a link for accounts payable") ----------------------


def _colleague_subject(facts: InvoiceFacts, locale: str) -> str:
    amount = format_money(facts.to_pay, facts.currency, locale)  # the balance of a partly paid invoice
    return emails.gettext(
        locale,
        "Invoice %(number)s from %(merchant)s for %(customer)s: %(amount)s",
        number=facts.number,
        merchant=facts.merchant,
        customer=facts.customer_name,
        amount=amount,
    )


def colleague_payload(
    facts: InvoiceFacts, *, link_id: uuid.UUID, expires_at: datetime, locale: str, asked_by_customer: bool
) -> tuple[str, dict[str, Any]]:
    """The subject now, and the facts to render the colleague's email from when it is sent: their own
    link by id and expiry (never its URL), and whether the customer asked for it (the pay page) or
    finance sent it (the CLI)."""
    payload = {
        "locale": locale,
        "invoice": _facts_json(facts),
        "link": _link_json(link_id, expires_at),
        "asked_by_customer": asked_by_customer,
    }
    return _colleague_subject(facts, locale), payload


def colleague_message(facts: InvoiceFacts, link_url: str, expires_at: datetime, locale: str, *, asked_by_customer: bool) -> EmailContent:
    subject = _colleague_subject(facts, locale)
    return _build(
        Kind.COLLEAGUE_INVOICE,
        locale,
        subject,
        invoice=facts,
        link_url=link_url,
        expires_at=expires_at,
        asked_by_customer=asked_by_customer,
    )


def _render_colleague(settings: Settings, payload: dict[str, Any]) -> EmailContent:
    link_id, expires_at = _link_from_json(payload["link"])
    url = pay_link_url(settings, link_id, expires_at)
    facts = _facts_from_json(payload["invoice"])
    return colleague_message(facts, url, expires_at, payload["locale"], asked_by_customer=bool(payload.get("asked_by_customer")))
