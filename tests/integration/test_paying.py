"""Paying with a saved card: one charge per invoice, 3-D Secure, declines and second tries."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.harness import CARD_3DS, CARD_DECLINED, CARD_OK, LocalStripe, SmtpServer, wait_until
from tests.integration.helpers import csrf_of, invoice_status, issue_invoice, offered_cards


@pytest.mark.postgres
class TestNoDoubleCharge:
    """However often the customer presses Pay, Stripe sees one PaymentIntent."""

    def test_double_submit_creates_one_payment_intent(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        html = browser_client.get(issued.url).text
        form = {"csrf": csrf_of(html), "payment_method": issued.cards[0]}

        async def press_pay_twice() -> list[httpx.Response]:
            # Two requests from the same browser: its cookies (the form token is bound to them) go along.
            async with httpx.AsyncClient(timeout=30, follow_redirects=True, cookies=browser_client.cookies) as client:
                return list(await asyncio.gather(client.post(issued.url, data=form), client.post(issued.url, data=form)))

        first, second = asyncio.run(press_pay_twice())
        assert {first.status_code, second.status_code} == {200}
        pages = first.text + second.text
        assert "Payment received" in pages
        # Pressing again after it is paid shows the receipt, and charges nothing.
        third = browser_client.post(issued.url, data=form)
        assert "Payment received" in third.text or "This invoice is paid" in third.text

        intents = localstripe.payment_intents_for(issued.stripe_customer)
        assert len(intents) == 1
        assert intents[0].status == "succeeded"
        assert invoice_status(cli, issued.number)["amount_paid"] == 12050

    def test_amount_comes_from_the_invoice_not_the_form(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, amount="99.99")
        html = browser_client.get(issued.url).text
        browser_client.post(issued.url, data={"csrf": csrf_of(html), "payment_method": issued.cards[0], "amount": "1"})
        [intent] = localstripe.payment_intents_for(issued.stripe_customer)
        assert intent.amount == 9999


class TestTheCustomersLanguage:
    """A customer finance gave no language reads the page in German: the receipt that follows is German
    too (it was English: emails used the stored language or the default, never the page's)."""

    def test_the_receipt_follows_in_the_language_of_the_page(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        assert cli("customer", "show", issued.email, "--json").json()["locale"] is None
        german = {"accept-language": "de-DE,de;q=0.9,en;q=0.5"}
        html = browser_client.get(issued.url, headers=german).text
        paid = browser_client.post(issued.url, data={"csrf": csrf_of(html), "payment_method": issued.cards[0]}, headers=german)
        assert paid.status_code == 200 and "Zahlung erhalten" in paid.text
        assert cli("customer", "show", issued.email, "--json").json()["locale"] == "de"
        wait_until(lambda: any("Quittung" in str(m["Subject"]) for m in smtp.mailbox.to(issued.email)), what="a German receipt")

    def test_never_over_finance_s_choice_nor_from_a_colleague(
        self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        cli("customer", "update", issued.email, "--locale", "fr")
        html = browser_client.get(issued.url, headers={"accept-language": "de"}).text
        browser_client.post(issued.url, data={"csrf": csrf_of(html), "payment_method": issued.cards[0]}, headers={"accept-language": "de"})
        assert cli("customer", "show", issued.email, "--json").json()["locale"] == "fr"
        other = issue_invoice(cli, localstripe, CARD_OK)
        colleague = cli("link", "issue", other.number, "--to", "ap@example.com", "--json").json()["link"]["url"]
        with httpx.Client(base_url=server.base, timeout=30, follow_redirects=True) as them:
            page = them.get(colleague, headers={"accept-language": "es"})
            them.post(page.url, data={"csrf": csrf_of(page.text), "amount": ""}, headers={"accept-language": "es"})
        assert cli("customer", "show", other.email, "--json").json()["locale"] is None


class TestThreeDSecure:
    """A card that needs the bank's confirmation hands over to Stripe.js; nothing is charged yet."""

    def test_3ds_card_reports_authentication_needed(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_3DS)
        html = browser_client.get(issued.url).text
        page = browser_client.post(issued.url, data={"csrf": csrf_of(html), "payment_method": issued.cards[0]})
        assert page.status_code == 200
        assert "Confirm with your bank" in page.text
        assert 'data-client-secret="pi_' in page.text
        assert localstripe.base + "/js.stripe.com/v3/" in page.text  # STRIPE_JS_URL
        [intent] = localstripe.payment_intents_for(issued.stripe_customer)
        assert intent.status == "requires_action"
        assert invoice_status(cli, issued.number)["status"] == "open"

        # Coming back later: the page offers to continue, not a second payment.
        again = browser_client.get(issued.url).text
        assert "Continue with my bank" in again
        assert offered_cards(again) == []


class TestDeclines:
    """A declined card says why, leaves the invoice open, and another card can pay."""

    def test_decline_then_second_saved_card_pays(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_DECLINED, CARD_OK)
        declined_pm, good_pm = issued.cards
        html = browser_client.get(issued.url).text
        assert offered_cards(html) == [declined_pm, good_pm]

        declined = browser_client.post(issued.url, data={"csrf": csrf_of(html), "payment_method": declined_pm})
        assert declined.status_code == 402
        assert "The payment did not go through." in declined.text
        assert "declined" in declined.text.lower()
        assert invoice_status(cli, issued.number)["status"] == "open"
        assert offered_cards(declined.text) == [declined_pm, good_pm]  # try again, right there

        paid = browser_client.post(issued.url, data={"csrf": csrf_of(declined.text), "payment_method": good_pm})
        assert paid.status_code == 200
        assert "Payment received" in paid.text
        statuses = sorted(pi.status for pi in localstripe.payment_intents_for(issued.stripe_customer))
        assert statuses == ["requires_payment_method", "succeeded"]
        shown = invoice_status(cli, issued.number)
        assert shown["status"] == "paid"
        # The online receipt names its number, as the PDF and the email do.
        [receipt] = [p["receipt_number"] for p in shown["payments"] if p["receipt_number"]]
        assert f"<dt>Receipt number</dt><dd>{receipt}</dd>" in browser_client.get(issued.url).text


class TestBadRequests:
    """Forged forms and cards that are not the customer's are refused with a 4xx, nothing charged."""

    def test_missing_csrf_is_refused(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        response = browser_client.post(issued.url, data={"payment_method": issued.cards[0]})
        assert response.status_code == 400
        assert "Please try again" in response.text
        assert localstripe.payment_intents_for(issued.stripe_customer) == []

    def test_someone_elses_card_is_refused(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        mine = issue_invoice(cli, localstripe, CARD_OK)
        theirs = issue_invoice(cli, localstripe, CARD_OK)
        html = browser_client.get(mine.url).text
        response = browser_client.post(mine.url, data={"csrf": csrf_of(html), "payment_method": theirs.cards[0]})
        assert response.status_code == 409
        assert "not saved for this customer" in response.text
        assert localstripe.payment_intents_for(mine.stripe_customer) == []
        assert localstripe.payment_intents_for(theirs.stripe_customer) == []

    def test_malformed_body_is_refused(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        response = browser_client.post(issued.url, content=b"\xff\xfe garbage", headers={"content-type": "multipart/form-data; boundary=x"})
        assert response.status_code == 400


class TestNewCardSetup:
    """A customer imported in bulk (no Stripe customer yet) can still pay with a new card."""

    def test_setup_intent_creates_the_stripe_customer_lazily(self, cli, server, browser_client: httpx.Client, tmp_path) -> None:
        csv_file = tmp_path / "one.csv"
        csv_file.write_text("email,name,amount,currency,description\nnew-card@example.com,Nora Card,30,eur,Annual fee\n")
        imported = cli("import", str(csv_file), "--verified", "--send", "--json")
        assert imported.code == 0, imported.err
        assert cli("customer", "show", "new-card@example.com", "--json").json()["stripe_customer_id"] is None
        number = cli("invoice", "list", "--json").json()["invoices"][0]["number"]
        url = cli("link", "issue", number, "--json").json()["link"]["url"]
        page = browser_client.get(url).text
        assert "Pay by card" in page
        setup = browser_client.post(f"{url}/setup", data={"csrf": csrf_of(page)})
        assert setup.status_code == 200
        assert setup.json()["client_secret"].startswith("seti_")
        assert cli("customer", "show", "new-card@example.com", "--json").json()["stripe_customer_id"].startswith("cus_")
        refused = browser_client.post(f"{url}/setup", data={})
        assert refused.status_code == 400

    def test_unconfirmed_setup_intent_is_refused(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe)
        page = browser_client.get(issued.url).text
        secret = browser_client.post(f"{issued.url}/setup", data={"csrf": csrf_of(page)}).json()["client_secret"]
        setup_id = secret.split("_secret_")[0]
        response = browser_client.post(issued.url, data={"csrf": csrf_of(page), "setup_intent": setup_id, "save_card": "1"})
        assert response.status_code == 409
        assert "was not confirmed" in response.text
        assert localstripe.payment_intents_for(issued.stripe_customer) == []
        forged = browser_client.post(issued.url, data={"csrf": csrf_of(page), "setup_intent": "seti_' OR 1=1"})
        assert forged.status_code == 400
