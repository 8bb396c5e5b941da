"""Steps that many stories share: a customer with saved cards and an issued invoice, a page, a form."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from tests.harness import LocalStripe

_counter = {"n": 0}


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "the page has no CSRF field"
    return match.group(1)


def offered_cards(html: str) -> list[str]:
    return re.findall(r'name="payment_method" value="(pm_[^"]+)"', html)


@dataclass
class Issued:
    email: str
    number: str
    url: str
    stripe_customer: str
    cards: list[str]
    invoice_id: str  # as `invoice create --json` prints it


def unique_email(prefix: str = "customer") -> str:
    _counter["n"] += 1
    return f"{prefix}{_counter['n']}@example.com"


def issue_invoice(
    cli: Any,
    localstripe: LocalStripe,
    *cards: str,
    amount: str = "120.50",
    currency: str = "eur",
    email: str | None = None,
    locale: str | None = None,
) -> Issued:
    """Customer (verified) with these cards in Stripe, and an open invoice whose link was issued."""
    email = email or unique_email()
    cus_id, pm_ids = localstripe.customer_with_cards(email, "Test Customer", *cards)
    extra = ["--locale", locale] if locale else []
    result = cli("customer", "add", "--email", email, "--name", "Test Customer", "--stripe-customer", cus_id, "--verified", *extra)
    assert result.code == 0, result.err
    created = cli(
        "invoice",
        "create",
        "--customer",
        email,
        "--amount",
        amount,
        "--currency",
        currency,
        "--description",
        "Annual service",
        "--send",
        "--json",
    )
    assert created.code == 0, created.err
    data = created.json()
    return Issued(email, data["number"], data["link"]["url"], cus_id, pm_ids, data["id"])


def invoice_status(cli: Any, number: str) -> dict[str, Any]:
    shown = cli("invoice", "show", number, "--json")
    assert shown.code == 0, shown.err
    return shown.json()  # type: ignore[no-any-return]


# --- the link handoff and the brakes (issue 11) --------------------------------------------------------

LINK_PAGE = re.compile(r"/pay/l/([0-9a-f]{32})$")


def link_hex_of(url: Any) -> str:
    """The link id in a page address `/pay/l/<link id hex>` (where GET /pay/<token> hands over to)."""
    match = LINK_PAGE.search(str(url).split("?", 1)[0])
    assert match, f"{url} is not a link page address"
    return match.group(1)


def setup_intents_for(localstripe: LocalStripe, customer_id: str) -> list[Any]:
    """The SetupIntents localstripe holds for a customer (its list API, filtered here)."""
    intents = localstripe.client.v1.setup_intents.list({"limit": 100})
    return [si for si in intents.auto_paging_iter() if si.customer == customer_id]


def set_cookies(response: Any) -> dict[str, str]:
    """The Set-Cookie headers of an answer, by cookie name, each with its attributes as sent."""
    cookies = {}
    for header in response.headers.get_list("set-cookie"):
        name = header.split("=", 1)[0]
        cookies[name] = header
    return cookies


# --- Stripe events, as another system would cause them ----------------------------------------------


def intent_event(event_id: str, intent: dict[str, Any], kind: str = "payment_intent.succeeded") -> dict[str, Any]:
    return {"id": event_id, "object": "event", "type": kind, "created": int(time.time()), "data": {"object": intent}}


def paid_intent_for(localstripe: LocalStripe, issued: Any) -> dict[str, Any]:
    """A PaymentIntent really made in localstripe for this invoice, as another system would make it."""
    intent = localstripe.client.v1.payment_intents.create(
        {
            "amount": 12050,
            "currency": "eur",
            "customer": issued.stripe_customer,
            "payment_method": issued.cards[0],
            "payment_method_types": ["card"],
            "metadata": {"invoice_id": issued.invoice_id},
            "confirm": True,
        }
    )
    return intent.to_dict()
