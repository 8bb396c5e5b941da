"""A link for accounts payable (issue 13): the invoice goes to a colleague with a link of their own,
from the CLI or from the customer's pay page; it never offers the customer's saved cards, and the
colleague pays with a card of their own."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from plumbing.settings import Settings
from plumbing.signing import Purpose, TokenSigner
from tests.conftest import LINK_KEY
from tests.harness import CARD_OK, LocalStripe, SmtpServer, db_execute, pay_link_in, text_part, wait_until
from tests.integration.helpers import (
    attached_cards,
    csrf_of,
    invoice_status,
    issue_invoice,
    offered_cards,
    pay_with_new_card,
)

AP = "ap@customer.example"


def audit_actions(cli: Any, number: str) -> list[dict[str, Any]]:
    shown = cli("audit", "--invoice", number, "--json")
    assert shown.code == 0, shown.err
    return shown.json()["entries"]  # type: ignore[no-any-return]


def colleague_links(cli: Any, number: str) -> list[dict[str, Any]]:
    return [k for k in invoice_status(cli, number)["links"] if k["to"]]


def mail_to(smtp: SmtpServer, recipient: str, count: int = 1) -> list[Any]:
    wait_until(lambda: len(smtp.mailbox.to(recipient)) >= count, what=f"{count} email(s) to {recipient}")
    return smtp.mailbox.to(recipient)


def send_from_page(client: httpx.Client, url: str, email: str) -> httpx.Response:
    page = client.get(url)
    base = str(page.url).split("?", 1)[0]
    return client.post(f"{base}/colleague", data={"csrf": csrf_of(page.text), "email": email})


def lead_of(html: str) -> str:
    match = re.search(r'<p class="lead">(.*?)</p>', html, re.S)
    assert match, "the page has no lead paragraph"
    return match.group(1)


@pytest.mark.postgres
class TestFinanceSendsToAccountsPayable:
    """Finance runs `link issue N --to ap@…`: accounts payable gets a link of their own, listed and revocable."""

    def test_colleague_gets_their_own_link_and_pays_with_their_own_card(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        other = cli(
            "invoice",
            "create",
            "--customer",
            issued.email,
            "--amount",
            "80",
            "--currency",
            "eur",
            "--description",
            "Other",
            "--send",
            "--json",
        )
        other_number = other.json()["number"]
        sent = cli("link", "issue", issued.number, "--to", " AP@Customer.example ", "--json")
        assert sent.code == 0, sent.err
        assert sent.json()["to"] == AP
        assert sent.json()["link"]["emailed"] is True

        [message] = mail_to(smtp, AP)
        body = text_part(message)
        assert "Acme Consulting sends you this invoice, addressed to Test Customer." in body
        assert "with your own card" in body
        assert issued.number in message["Subject"] and "Test Customer" in message["Subject"]
        url = pay_link_in(message)
        assert url != issued.url

        [listed] = colleague_links(cli, issued.number)
        assert listed["to"] == AP and listed["created_by"].startswith("cli:") and listed["sent_at"]
        shown = cli("invoice", "show", issued.number)
        assert f"Colleague link  to {AP}" in shown.out or f"to {AP} (by cli:" in shown.out
        assert any(e["action"] == "link.colleague" and e["details"]["to"] == AP for e in audit_actions(cli, issued.number))

        # Their page: no saved card of the customer, no "send on", no card management, no other invoices.
        with httpx.Client(timeout=30, follow_redirects=True) as colleague:
            page = colleague.get(url).text
            assert offered_cards(page) == []
            assert "4242" not in page
            assert "Send this invoice to a colleague" not in page
            assert "Manage saved cards" not in page
            assert 'name="scope" value="all"' not in page
            assert other_number not in page and "open invoices" not in page  # never the customer's other invoices
            assert "Save this card" not in page
            assert "Pay by card" in page
            assert "Paying by card needs JavaScript" in page and "saved card" not in page  # (without JavaScript: no "or a saved card")
            paid = pay_with_new_card(colleague, localstripe, url, CARD_OK, save=True)
            assert paid.status_code == 200, paid.text
            assert "Payment received" in paid.text

        assert invoice_status(cli, issued.number)["status"] == "paid"
        assert localstripe.payment_intents_for(issued.stripe_customer) == []  # the customer's Stripe customer: untouched
        [card] = cli("customer", "cards", issued.email, "--json").json()["cards"]
        assert card["id"] == issued.cards[0]  # the colleague's card never joined the customer's
        assert [c.id for c in attached_cards(localstripe, issued.stripe_customer)] == issued.cards

    def test_revoke_one_colleague_or_all(self, cli, localstripe: LocalStripe, smtp: SmtpServer, server) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        assert cli("link", "issue", issued.number, "--to", AP).code == 0
        assert cli("link", "issue", issued.number, "--to", "boss@customer.example").code == 0
        [message] = mail_to(smtp, AP)

        revoked = cli("link", "revoke", issued.number, "--to", AP, "--json")
        assert revoked.code == 0, revoked.err
        assert revoked.json()["revoked"] == 1
        with httpx.Client(timeout=30, follow_redirects=True) as colleague:
            assert colleague.get(pay_link_in(message)).status_code == 410
        with httpx.Client(timeout=30, follow_redirects=True) as customer:
            assert customer.get(issued.url).status_code == 200  # the customer's own link still works
        states = {k["to"]: k["state"] for k in colleague_links(cli, issued.number)}
        assert states[AP] == "revoked" and states["boss@customer.example"] != "revoked"

        never = cli("link", "revoke", issued.number, "--to", "someone@else.example")
        assert never.code == 1 and "never sent to someone@else.example" in never.err
        bad = cli("link", "issue", issued.number, "--to", "not an address")
        assert bad.code == 1 and "not valid" in bad.err

        everything = cli("link", "revoke", issued.number, "--json")
        assert everything.json()["revoked"] == 2  # the customer's and the boss's

    def test_a_colleague_never_sees_the_card_the_customer_paid_with(self, cli, localstripe: LocalStripe, smtp: SmtpServer, server) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        assert cli("link", "issue", issued.number, "--to", AP).code == 0
        [message] = mail_to(smtp, AP)
        with httpx.Client(timeout=30, follow_redirects=True) as customer:
            page = customer.get(issued.url).text
            paid = customer.post(issued.url, data={"csrf": csrf_of(page), "payment_method": issued.cards[0]}).text
            assert "Payment received" in paid and "•••• 4242" in paid  # the customer sees their card
        with httpx.Client(timeout=30, follow_redirects=True) as colleague:
            receipt = colleague.get(pay_link_in(message))
            assert receipt.status_code == 200 and "Payment received" in receipt.text
            assert "4242" not in receipt.text and "Paid with" not in receipt.text
            pdf = colleague.get(str(receipt.url) + "/receipt.pdf")
            assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
            from io import BytesIO

            from pypdf import PdfReader

            text = "".join(p.extract_text() for p in PdfReader(BytesIO(pdf.content)).pages)
            assert issued.number in text and "4242" not in text
            # The same receipt asked for by its number (the page's list of parts links so) hides it too.
            [number] = [p["receipt_number"] for p in invoice_status(cli, issued.number)["payments"]]
            numbered = colleague.get(str(receipt.url) + "/receipt.pdf", params={"number": number})
            assert numbered.status_code == 200 and f"-receipt-{number}.pdf" in numbered.headers["content-disposition"]
            text = "".join(p.extract_text() for p in PdfReader(BytesIO(numbered.content)).pages)
            assert number in text and "4242" not in text

    def test_revoke_on_a_paid_invoice_says_what_it_did(self, cli, localstripe: LocalStripe, server, browser_client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page = browser_client.get(issued.url).text
        assert "Payment received" in browser_client.post(issued.url, data={"csrf": csrf_of(page), "payment_method": issued.cards[0]}).text
        revoked = cli("link", "revoke", issued.number)
        assert revoked.code == 0
        assert "Revoked 1 live link(s)" in revoked.out
        assert "The invoice is paid" in revoked.out and "keep showing the receipt" in revoked.out
        assert cli("link", "revoke", issued.number, "--json").json()["note"].startswith("The invoice is paid")


@pytest.mark.postgres
class TestCustomerSendsFromThePayPage:
    """The customer's "send this invoice to a colleague" on the pay page: the same answer whatever happened, within limits."""

    def test_send_from_the_page(self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page = browser_client.get(issued.url).text
        assert "Send this invoice to a colleague" in page
        answer = send_from_page(browser_client, issued.url, AP)
        assert answer.status_code == 200
        assert "is on its way" in answer.text

        [message] = mail_to(smtp, AP)
        assert "Test Customer asked us to send you this invoice from Acme Consulting." in text_part(message)
        [listed] = colleague_links(cli, issued.number)
        assert listed["created_by"].startswith("link:")
        assert any(e["action"] == "link.colleague" for e in audit_actions(cli, issued.number))

        # The colleague's link cannot send it on (and shows no form for it).
        with httpx.Client(timeout=30, follow_redirects=True) as colleague:
            theirs = colleague.get(pay_link_in(message))
            assert "Send this invoice to a colleague" not in theirs.text
            base = str(theirs.url)
            refused = colleague.post(f"{base}/colleague", data={"csrf": csrf_of(theirs.text), "email": "next@customer.example"})
            assert refused.status_code == 403
            assert "cannot be sent on" in refused.text
        assert len(colleague_links(cli, issued.number)) == 1

    def test_the_same_answer_past_the_limit_and_for_any_address(self, cli, localstripe: LocalStripe, smtp: SmtpServer, server) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        answers = []
        with httpx.Client(base_url=server.base, timeout=30, follow_redirects=True) as client:
            for n in range(5):  # COLLEAGUE_LINKS_PER_INVOICE_DAY is 3
                answers.append(send_from_page(client, issued.url, f"ap{n}@customer.example"))
            smtp.mailbox.rcpt_replies.append("550 5.1.1 no such user")
            answers.append(send_from_page(client, issued.url, "nobody@customer.example"))
        assert {a.status_code for a in answers} == {200}
        assert len({lead_of(a.text) for a in answers}) == 1  # nothing tells a sent link from a refused one
        assert len(colleague_links(cli, issued.number)) == 3
        refusals = [e for e in audit_actions(cli, issued.number) if e["action"] == "link.colleague_refused"]
        assert len(refusals) == 3 and refusals[0]["details"]["reason"] == "rate limit"

    def test_the_limit_holds_for_simultaneous_sends(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page = browser_client.get(issued.url)
        base, form = str(page.url), {"csrf": csrf_of(page.text)}

        async def send_six_at_once() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30, cookies=browser_client.cookies) as client:
                sends = [client.post(f"{base}/colleague", data={**form, "email": f"ap{n}@customer.example"}) for n in range(6)]
                return list(await asyncio.gather(*sends))

        answers = asyncio.run(send_six_at_once())
        assert {a.status_code for a in answers} == {200}
        assert len(colleague_links(cli, issued.number)) == 3

    def test_per_customer_limit(self, cli, localstripe: LocalStripe, start_server) -> None:
        app_server = start_server(COLLEAGUE_LINKS_PER_CUSTOMER_DAY="2")
        first = issue_invoice(cli, localstripe, CARD_OK)
        second = cli(
            "invoice", "create", "--customer", first.email, "--amount", "10", "--currency", "eur", "--description", "B", "--send", "--json"
        )
        with httpx.Client(base_url=app_server.base, timeout=30, follow_redirects=True) as client:
            assert send_from_page(client, first.url, AP).status_code == 200
            assert send_from_page(client, first.url, AP).status_code == 200
            assert send_from_page(client, second.json()["link"]["url"], AP).status_code == 200
        assert len(colleague_links(cli, first.number)) == 2
        assert colleague_links(cli, second.json()["number"]) == []

    def test_a_malformed_address_is_shown_back(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        for bad in ("", "ap@", "ap@customer.example, boss@customer.example", "x" * 400 + "@example.com"):
            answer = send_from_page(browser_client, issued.url, bad)
            assert answer.status_code == 400, bad
            assert "Please enter one email address" in answer.text
        assert colleague_links(cli, issued.number) == []
        no_csrf = browser_client.post(f"{issued.url}/colleague", data={"email": AP})
        assert no_csrf.status_code == 400
        assert colleague_links(cli, issued.number) == []


class TestColleaguesExpiredLink:
    """A colleague's expired link asks for a fresh one, which goes to the colleague, never to the customer."""

    def test_fresh_link_goes_to_the_colleague(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, settings: Settings, database_url: str
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        link_id = cli("link", "issue", issued.number, "--to", AP, "--json").json()["link"]["id"]
        mail_to(smtp, AP)
        to_customer = len(smtp.mailbox.to(issued.email))
        past = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0)
        db_execute(database_url, "UPDATE payment_links SET expires_at = :past", past=past)
        expired_url = f"{settings.base_url}/pay/{TokenSigner([LINK_KEY], Purpose.PAY).sign(uuid.UUID(link_id), past)}"
        with httpx.Client(timeout=30, follow_redirects=True) as colleague:
            page = colleague.get(expired_url)
            assert page.status_code == 410
            renewed = colleague.post(f"{expired_url}/renew", data={"csrf": csrf_of(page.text)})
            assert renewed.status_code == 200
            [_, fresh] = mail_to(smtp, AP, 2)
            theirs = colleague.get(pay_link_in(fresh))
            assert theirs.status_code == 200 and offered_cards(theirs.text) == [] and "4242" not in theirs.text
        assert len(smtp.mailbox.to(issued.email)) == to_customer
        assert len(colleague_links(cli, issued.number)) == 2
