"""Cards the customer controls (issue 13): one card is one saved card (Stripe's fingerprint), saving is
asked for, and the customer (pay page) or finance (CLI) removes a card or picks the default, at Stripe too."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from links.models import Customer
from payments import cards
from payments.models import PaymentProfile
from plumbing.db import create_engine, create_session_factory
from plumbing.settings import Settings
from tests.harness import CARD_3DS, CARD_OK, LocalStripe, db_query
from tests.integration.helpers import (
    attached_cards,
    csrf_of,
    invoice_status,
    issue_invoice,
    offered_cards,
    pay_with_new_card,
    post_event,
    stripe_told_us_the_default,
)

CARD_OTHER = "5555555555554444"  # localstripe calls every card a Visa: this one is "Visa •••• 4444"


def cards_of(cli: Any, email: str) -> list[dict[str, Any]]:
    listed = cli("customer", "cards", email, "--json")
    assert listed.code == 0, listed.err
    return listed.json()["cards"]  # type: ignore[no-any-return]


def next_invoice(cli: Any, email: str, amount: str = "45") -> str:
    created = cli(
        "invoice", "create", "--customer", email, "--amount", amount, "--currency", "eur", "--description", "Next", "--send", "--json"
    )
    assert created.code == 0, created.err
    return str(created.json()["link"]["url"])


def post_card_form(client: httpx.Client, url: str, action: str, payment_method: str) -> httpx.Response:
    page = client.get(url)
    base = str(page.url).split("?", 1)[0]
    return client.post(f"{base}/cards/{action}", data={"csrf": csrf_of(page.text), "card": payment_method})


def card_audit(cli: Any) -> list[dict[str, Any]]:
    return [e for e in cli("audit", "--json").json()["entries"] if e["action"].startswith("card.")]


@pytest.mark.postgres
class TestOneCardOnce:
    """The same card entered again is still one saved card ("Visa •••• 4242" once, not three times)."""

    def test_paying_twice_with_the_same_new_card_keeps_one(self, cli, localstripe: LocalStripe, server, browser_client) -> None:
        issued = issue_invoice(cli, localstripe)  # no card yet
        assert "Payment received" in pay_with_new_card(browser_client, localstripe, issued.url, CARD_OK, save=True).text
        [first] = cards_of(cli, issued.email)

        url = next_invoice(cli, issued.email)
        html = browser_client.get(url).text
        assert offered_cards(html) == [first["id"]]
        assert "Payment received" in pay_with_new_card(browser_client, localstripe, url, CARD_OK, save=True).text

        [card] = cards_of(cli, issued.email)
        assert card["last4"] == "4242" and card["saved"] is True and card["default"] is True
        assert [c.id for c in attached_cards(localstripe, issued.stripe_customer)] == [card["id"]]  # the other detached
        assert offered_cards(browser_client.get(next_invoice(cli, issued.email)).text) == [card["id"]]

    def test_the_same_card_unsaved_leaves_the_saved_one_saved(self, cli, localstripe: LocalStripe, server, browser_client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        assert "Payment received" in pay_with_new_card(browser_client, localstripe, issued.url, CARD_OK, save=False).text
        [card] = cards_of(cli, issued.email)
        assert card["saved"] is True and card["default"] is True
        assert len(attached_cards(localstripe, issued.stripe_customer)) == 1

    def test_cards_attached_twice_before_are_cleaned_up(self, cli, localstripe: LocalStripe, server) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, CARD_OK, CARD_OK, CARD_OTHER)
        cards = cards_of(cli, issued.email)
        assert sorted(c["last4"] for c in cards) == ["4242", "4444"]
        visa = next(c for c in cards if c["last4"] == "4242")
        assert visa["id"] == issued.cards[0] and visa["default"] is True  # Stripe's default is the one kept
        assert sorted(c.id for c in attached_cards(localstripe, issued.stripe_customer)) == sorted([issued.cards[0], issued.cards[3]])


@pytest.mark.postgres
class TestSavingIsAskedFor:
    """Saving a card is asked for ("save this card" starts unticked); a new card never silently becomes the default."""

    def test_unticked_by_default_and_not_saved(self, cli, localstripe: LocalStripe, server, browser_client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        html = browser_client.get(issued.url).text
        assert 'name="save_card" value="1">' in html  # no `checked`
        assert "Payment received" in pay_with_new_card(browser_client, localstripe, issued.url, CARD_OTHER, save=False).text
        assert [c["last4"] for c in cards_of(cli, issued.email)] == ["4242"]
        assert [c.id for c in attached_cards(localstripe, issued.stripe_customer)] == issued.cards

    def test_a_saved_new_card_does_not_take_the_default(self, cli, localstripe: LocalStripe, server, browser_client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        assert "Payment received" in pay_with_new_card(browser_client, localstripe, issued.url, CARD_OTHER, save=True).text
        cards = {c["last4"]: c for c in cards_of(cli, issued.email)}
        assert cards["4242"]["default"] is True and cards["4444"]["default"] is False and cards["4444"]["saved"] is True

    def test_after_the_default_was_removed_a_new_card_still_does_not_take_it(
        self, cli, localstripe: LocalStripe, server, browser_client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, CARD_OTHER)
        visa, _ = issued.cards
        assert post_card_form(browser_client, issued.url, "remove", visa).status_code == 200  # the default goes
        assert "Payment received" in pay_with_new_card(browser_client, localstripe, issued.url, CARD_OK, save=True).text
        cards = {c["last4"]: c for c in cards_of(cli, issued.email)}
        assert cards["4242"]["saved"] is True and cards["4242"]["default"] is False  # entered anew: not made the default


@pytest.mark.postgres
class TestCustomerManagesCards:
    """From the pay page the customer removes a card or picks the default; Stripe follows; audited."""

    def test_remove_a_saved_card(self, cli, localstripe: LocalStripe, server, browser_client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, CARD_OTHER)
        visa, other = issued.cards
        html = browser_client.get(issued.url).text
        assert "Manage saved cards" in html
        removed = post_card_form(browser_client, issued.url, "remove", other)
        assert removed.status_code == 200
        assert "Visa •••• 4444 is no longer saved" in removed.text
        assert localstripe.client.v1.payment_methods.retrieve(other).customer is None  # detached at Stripe
        assert offered_cards(browser_client.get(issued.url).text) == [visa]
        [entry] = card_audit(cli)
        assert entry["action"] == "card.remove" and entry["subject"] == f"customer:{issued.email}"

        again = post_card_form(browser_client, issued.url, "remove", other)
        assert again.status_code == 404 and "not one of your saved cards" in again.text

    def test_make_a_card_the_default(self, cli, localstripe: LocalStripe, server, browser_client, database_url: str) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, CARD_OTHER)
        stripe_told_us_the_default(database_url)
        visa, other = issued.cards
        made = post_card_form(browser_client, issued.url, "default", other)
        assert made.status_code == 200 and "Visa •••• 4444 is now your default card" in made.text
        customer = localstripe.client.v1.customers.retrieve(issued.stripe_customer)
        assert customer.invoice_settings.default_payment_method == other
        assert offered_cards(browser_client.get(issued.url).text)[0] == other  # the default first
        assert {c["id"]: c["default"] for c in cards_of(cli, issued.email)} == {visa: False, other: True}
        assert [e["action"] for e in card_audit(cli)] == ["card.default"]

    def test_a_late_event_does_not_undo_the_default_just_chosen(
        self, cli, localstripe: LocalStripe, server, browser_client, database_url: str
    ) -> None:
        """Stripe delivers events late and out of order: a customer.updated from before the customer chose
        another card (it names the old default) changes nothing when it arrives after; a newer one does."""
        issued = issue_invoice(cli, localstripe, CARD_OK, CARD_OTHER)
        stripe_told_us_the_default(database_url)
        visa, other = issued.cards
        before = localstripe.client.v1.customers.retrieve(issued.stripe_customer).to_dict()
        assert before["invoice_settings"]["default_payment_method"] == visa
        assert post_card_form(browser_client, issued.url, "default", other).status_code == 200

        late = f"evt_late_{uuid.uuid4().hex}"
        assert post_event(server, "customer.updated", before, late, created=int(time.time()) - 120).status_code == 200  # two minutes old
        assert offered_cards(browser_client.get(issued.url).text)[0] == other
        assert {c["id"]: c["default"] for c in cards_of(cli, issued.email)} == {visa: False, other: True}
        assert db_query(database_url, "SELECT count(*) FROM webhook_events WHERE id = :i", i=late)[0][0] == 1  # recorded all the same

        # A change made at Stripe after the customer's (e.g. in the dashboard) is taken.
        assert post_event(server, "customer.updated", before, created=int(time.time()) + 2).status_code == 200
        assert {c["id"]: c["default"] for c in cards_of(cli, issued.email)} == {visa: True, other: False}
        assert offered_cards(browser_client.get(issued.url).text)[0] == visa

    def test_only_the_customers_own_saved_cards(self, cli, localstripe: LocalStripe, server, browser_client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        other = issue_invoice(cli, localstripe, CARD_OK)
        for action in ("remove", "default"):
            for pm in (other.cards[0], "pm_nonexistent", "", "x" * 2000):
                answer = post_card_form(browser_client, issued.url, action, pm)
                assert answer.status_code == 404, (action, pm)
        assert localstripe.client.v1.payment_methods.retrieve(other.cards[0]).customer == other.stripe_customer
        forged = browser_client.post(f"{issued.url}/cards/remove", data={"card": issued.cards[0]})
        assert forged.status_code == 400  # no CSRF token
        assert len(attached_cards(localstripe, issued.stripe_customer)) == 1
        assert card_audit(cli) == []

    def test_not_from_a_colleagues_link(self, cli, localstripe: LocalStripe, smtp, server) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        url = cli("link", "issue", issued.number, "--to", "ap@customer.example", "--json").json()["link"]["url"]
        with httpx.Client(timeout=30, follow_redirects=True) as colleague:
            assert "Manage saved cards" not in colleague.get(url).text
            answer = post_card_form(colleague, url, "remove", issued.cards[0])
            assert answer.status_code == 403
        assert [c.id for c in attached_cards(localstripe, issued.stripe_customer)] == issued.cards

    def test_a_card_in_a_payment_in_progress_stays(self, cli, localstripe: LocalStripe, server, browser_client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_3DS)
        html = browser_client.get(issued.url).text
        assert (
            "Confirm with your bank"
            in browser_client.post(issued.url, data={"csrf": csrf_of(html), "payment_method": issued.cards[0]}).text
        )
        answer = post_card_form(browser_client, issued.url, "remove", issued.cards[0])
        assert answer.status_code == 409
        assert len(attached_cards(localstripe, issued.stripe_customer)) == 1
        assert invoice_status(cli, issued.number)["status"] == "open"


@pytest.mark.postgres
class TestFinanceManagesCards:
    """`customer cards E` lists them; `customer remove-card E PM_ID` detaches one at Stripe."""

    def test_list_and_remove(self, cli, localstripe: LocalStripe, server) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, CARD_OTHER)
        visa, other = issued.cards
        table = cli("customer", "cards", issued.email)
        assert table.code == 0
        assert visa in table.out and other in table.out and "4444" in table.out and "12/2030" in table.out
        listed = cards_of(cli, issued.email)
        assert {(c["id"], c["brand"], c["last4"], c["exp_month"], c["exp_year"], c["default"], c["saved"]) for c in listed} == {
            (visa, "visa", "4242", 12, 2030, True, True),
            (other, "visa", "4444", 12, 2030, False, True),
        }

        removed = cli("customer", "remove-card", issued.email, other, "--json")
        assert removed.code == 0, removed.err
        assert removed.json()["removed"] == other
        assert [c.id for c in attached_cards(localstripe, issued.stripe_customer)] == [visa]
        assert [c["id"] for c in cards_of(cli, issued.email)] == [visa]
        assert [e["action"] for e in card_audit(cli)] == ["card.remove"]

        unknown = cli("customer", "remove-card", issued.email, other)
        assert unknown.code == 1 and "is not a saved card of" in unknown.err
        assert cli("customer", "cards", "nobody@example.com").code == 1


@pytest.mark.postgres
class TestDefaultCardLocks:
    """Every writer of the default takes the customer's row before the cards' rows: a customer.updated being
    applied and the customer's choice written at the same moment wait for each other, never deadlock."""

    def test_a_choice_while_an_event_is_applied(self, cli, localstripe: LocalStripe, server, settings: Settings, database_url: str) -> None:
        if database_url.startswith("sqlite"):
            pytest.skip("SQLite has one writer at a time: no row locks to take in any order")
        issued = issue_invoice(cli, localstripe, CARD_OK, CARD_OTHER)
        stripe_told_us_the_default(database_url)
        visa, other = issued.cards
        customer_id = uuid.UUID(str(db_query(database_url, "SELECT id FROM customers WHERE email = :e", e=issued.email)[0][0]))

        async def race() -> None:
            engine = create_engine(settings.database_url)
            sessions = create_session_factory(engine)
            try:
                async with sessions.begin() as event:  # a customer.updated being applied: the customer's row first
                    await event.execute(select(Customer.id).where(Customer.id == customer_id).with_for_update())

                    async def choose() -> None:  # meanwhile the customer's choice is written
                        async with sessions.begin() as choice:
                            await choice.run_sync(cards._set_default, customer_id, other, cards._decided_now())

                    chosen = asyncio.create_task(choose())
                    await asyncio.sleep(0.5)  # the choice waits (for the customer's row; in the old order, holding the cards')
                    await event.execute(
                        update(PaymentProfile)
                        .where(PaymentProfile.customer_id == customer_id)
                        .values(is_default=PaymentProfile.stripe_payment_method_id == visa)
                    )
                await asyncio.wait_for(chosen, 10)  # (a deadlock would fail one of the two here or above)
            finally:
                await engine.dispose()

        asyncio.run(race())
        assert {c["id"]: c["default"] for c in cards_of(cli, issued.email)} == {visa: False, other: True}  # the later write
