"""Steps that many stories share: a customer with saved cards and an issued invoice, a page, a form."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from tests.harness import LocalStripe, signed_event

_counter = {"n": 0}


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "the page has no CSRF field"
    return match.group(1)


def offered_cards(html: str) -> list[str]:
    """The saved cards the page offers, once each, in the page's order (several forms may carry
    the same card: pay in full, pay another amount, pay all)."""
    return list(dict.fromkeys(re.findall(r'name="payment_method" value="(pm_[^"]+)"', html)))


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


# --- new cards and colleagues (issue 13) ------------------------------------------------------------


def confirmed_setup_intent(localstripe: LocalStripe, client_secret: str, number: str) -> str:
    """What Stripe.js's confirmCardSetup does on the page: the card entered, the SetupIntent confirmed."""
    setup_intent = client_secret.split("_secret_")[0]
    pm = localstripe.client.v1.payment_methods.create(
        {"type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"}}  # type: ignore[typeddict-item]
    )
    localstripe.client.v1.setup_intents.confirm(setup_intent, {"payment_method": pm.id})
    return setup_intent


def pay_with_new_card(client: Any, localstripe: LocalStripe, url: str, number: str, *, save: bool) -> Any:
    """Open the link, enter a new card (ticking "save this card" or not) and pay; the final answer."""
    page = client.get(url)
    csrf = csrf_of(page.text)
    base = str(page.url).split("?", 1)[0]
    setup = client.post(f"{base}/setup", data={"csrf": csrf})
    assert setup.status_code == 200, setup.text
    form = {"csrf": csrf, "setup_intent": confirmed_setup_intent(localstripe, setup.json()["client_secret"], number)}
    if save:
        form["save_card"] = "1"
    return client.post(base, data=form)


def attached_cards(localstripe: LocalStripe, customer_id: str) -> list[Any]:
    """The cards attached to a customer at localstripe, as Stripe lists them."""
    return list(localstripe.client.v1.payment_methods.list({"customer": customer_id, "type": "card"}).data)


# --- part payments and pay-all (issue 13) --------------------------------------------------------------


@dataclass
class MoreInvoice:
    number: str
    url: str | None  # None when it was not sent
    invoice_id: str


def another_invoice(cli: Any, email: str, amount: str, *options: str, currency: str = "eur", send: bool = True) -> MoreInvoice:
    """One more invoice for a customer who exists already (options: e.g. "--allow-partial", "--min-amount", "50")."""
    args = ["invoice", "create", "--customer", email, "--amount", amount, "--currency", currency, "--description", "More work"]
    created = cli(*args, *options, *(["--send"] if send else []), "--json")
    assert created.code == 0, created.err
    data = created.json()
    return MoreInvoice(data["number"], data["link"]["url"] if send else None, data["id"])


def part_form(html: str, amount: str, card: str, choice: str = "part") -> dict[str, str]:
    """The saved-card form with "Pay another amount" pressed (templates/_pay_options.html)."""
    return {"csrf": csrf_of(html), "payment_method": card, "offers_part": "1", "pay_choice": choice, "amount": amount}


def pay_all_form(html: str, card: str) -> dict[str, str]:
    """The saved-card form with "Pay all" pressed: the total the page showed goes along."""
    match = re.search(r'name="all_total" value="(\d*)"', html)
    assert match and match.group(1), "the page offers no pay-all"
    return {"csrf": csrf_of(html), "payment_method": card, "offers_part": "1", "pay_choice": "all", "all_total": match.group(1)}


def stripe_told_us_the_default(database_url: str) -> None:
    """Wait until the app has applied the customer.updated webhook that setting up the test customer
    caused (localstripe sends webhooks a second late): a later change must not race with it."""
    from tests.harness import db_query, wait_until

    query = "SELECT count(*) FROM webhook_events WHERE type = 'customer.updated' AND processed_at IS NOT NULL"
    wait_until(lambda: db_query(database_url, query)[0][0] >= 1, what="the customer.updated webhook")


def post_event(server: Any, kind: str, obj: dict[str, Any], event_id: str | None = None, *, created: int | None = None) -> httpx.Response:
    """A Stripe event about `obj` (created now, unless `created`), signed as Stripe signs it, delivered to the app's webhook."""
    body = {
        "id": event_id or f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "type": kind,
        "created": int(time.time()) if created is None else created,
        "data": {"object": obj},
    }
    payload, header = signed_event(body)
    return httpx.post(f"{server.base}/webhooks/stripe", content=payload, headers={"stripe-signature": header}, timeout=30)
