"""A link's whole life: verified addresses, expiry and fresh links, revocation, void, reminders."""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, date, datetime, timedelta

import httpx
import pytest

from plumbing.settings import Settings
from plumbing.signing import Purpose, TokenSigner
from tests.conftest import LINK_KEY
from tests.harness import CARD_OK, VERIFY_LINK, LocalStripe, SmtpServer, db_execute, db_query, pay_link_in, text_part, wait_until
from tests.integration.helpers import csrf_of, invoice_status, issue_invoice, unique_email


def verify_link_in(message) -> str:  # type: ignore[no-untyped-def]
    match = VERIFY_LINK.search(text_part(message))
    assert match, "no confirmation link in the email"
    return match.group(0)


def expire_links(settings: Settings, number: str) -> str:
    """Make the invoice's link expired (in the database and in its token) and return its URL."""
    past = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0)
    [(raw,)] = db_query(
        settings.database_url,
        "SELECT l.id FROM payment_links l JOIN invoices i ON i.id = l.invoice_id WHERE i.number = :n",
        n=number,
    )
    link_id = uuid.UUID(str(raw))
    db_execute(settings.database_url, "UPDATE payment_links SET expires_at = :past", past=past)
    return f"{settings.base_url}/pay/{TokenSigner([LINK_KEY], Purpose.PAY).sign(link_id, past)}"


class TestVerifiedAddresses:
    """Invoice emails go only to confirmed addresses; held invoices follow the confirmation."""

    def test_unverified_invoice_is_held_until_the_address_is_confirmed(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, browser_client: httpx.Client
    ) -> None:
        email = unique_email("unverified")
        cus_id, _ = localstripe.customer_with_cards(email, "Una Verified", CARD_OK)
        assert cli("customer", "add", "--email", email, "--name", "Una Verified", "--stripe-customer", cus_id).code == 0
        [confirmation] = smtp.mailbox.wait_for(1)
        assert confirmation["Subject"] == "Confirm this address for invoices from Acme Consulting"

        created = cli(
            "invoice", "create", "--customer", email, "--amount", "80", "--currency", "eur", "--description", "Spring", "--send", "--json"
        )
        link = created.json()["link"]
        assert (link["emailed"], link["held_reason"]) == (False, "email address not verified")
        assert cli("customer", "show", email, "--json").json()["verified"] is False

        verify_url = verify_link_in(confirmation)
        page = browser_client.get(verify_url)
        assert page.status_code == 200 and "Yes, this is my address" in page.text
        assert cli("customer", "show", email, "--json").json()["verified"] is False  # GET changes nothing
        done = browser_client.post(verify_url, data={"csrf": csrf_of(page.text)})
        assert "your address is confirmed" in done.text

        invoice_mail = smtp.mailbox.wait_for(2)[1]
        assert created.json()["number"] in invoice_mail["Subject"]
        assert browser_client.get(pay_link_in(invoice_mail)).status_code == 200
        shown = cli("customer", "show", email, "--json").json()
        assert shown["verified"] is True and "confirmation link" in shown["email_verified_by"]

    def test_verify_and_pay_tokens_cannot_stand_in_for_each_other(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, browser_client: httpx.Client
    ) -> None:
        email = unique_email("swap")
        cli("customer", "add", "--email", email, "--name", "Sam Swap", "--stripe-customer", localstripe.customer_with_cards(email, "S")[0])
        verify_token = verify_link_in(smtp.mailbox.wait_for(1)[0]).rsplit("/", 1)[1]
        assert browser_client.get(f"/pay/{verify_token}").status_code == 404
        issued = issue_invoice(cli, localstripe, CARD_OK)
        pay_token = issued.url.rsplit("/", 1)[1]
        assert browser_client.get(f"/verify/{pay_token}").status_code == 404
        assert browser_client.post(f"/verify/{pay_token}", data={"csrf": "x"}).status_code == 404

    def test_changing_the_email_makes_it_unverified_again(self, cli, localstripe: LocalStripe, smtp: SmtpServer, server) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        new_email = unique_email("moved")
        changed = cli("customer", "update", issued.email, "--email", new_email, "--json")
        assert changed.code == 0, changed.err
        assert changed.json()["verified"] is False
        wait_until(lambda: smtp.mailbox.to(new_email), what="confirmation to the new address")
        resend = cli("link", "resend", issued.number, "--json").json()
        assert resend["link"]["emailed"] is False
        assert resend["link"]["held_reason"] == "email address not verified"


class TestExpiredLinks:
    """An expired link is not a dead end: a fresh one goes to the address on file, within limits."""

    def test_expired_link_asks_for_a_new_one_which_pays(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, settings: Settings, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        smtp.mailbox.wait_for(1)
        expired_url = expire_links(settings, issued.number)
        page = browser_client.get(expired_url)
        assert page.status_code == 410
        assert "This link has expired" in page.text and "Email me a new link" in page.text

        renewed = browser_client.post(f"{expired_url}/renew", data={"csrf": csrf_of(page.text)})
        assert renewed.status_code == 200
        assert "a new payment link is on its way" in renewed.text
        fresh_mail = smtp.mailbox.wait_for(2)[1]
        assert fresh_mail["To"] == issued.email
        assert fresh_mail["Subject"] == f"Your new payment link for invoice {issued.number}"
        fresh = pay_link_in(fresh_mail)
        html = browser_client.get(fresh).text
        paid = browser_client.post(fresh, data={"csrf": csrf_of(html), "payment_method": issued.cards[0]})
        assert "Payment received" in paid.text

    def test_fourth_request_in_an_hour_sends_nothing_and_says_the_same(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, settings: Settings, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        smtp.mailbox.wait_for(1)
        expired_url = expire_links(settings, issued.number)
        csrf = csrf_of(browser_client.get(expired_url).text)
        answers = [browser_client.post(f"{expired_url}/renew", data={"csrf": csrf}) for _ in range(4)]
        assert [a.status_code for a in answers] == [200] * 4
        assert len({re.sub(r'nonce-[^"\']+|nonce="[^"]+"', "", a.text) for a in answers}) == 1  # indistinguishable
        smtp.mailbox.wait_for(4)
        time.sleep(1.0)  # room for a fifth email, which must not come
        assert len(smtp.mailbox.to(issued.email)) == 4  # the invoice email and three fresh links, not four
        assert db_query(settings.database_url, "SELECT count(*) FROM link_requests WHERE sent") == [(3,)]

    def test_the_answer_is_in_the_customer_s_language(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, settings: Settings, browser_client: httpx.Client
    ) -> None:
        """A German customer (stored by finance) on an English browser: the expired page is German, and so is
        the answer to its button (it followed the browser)."""
        issued = issue_invoice(cli, localstripe, CARD_OK)
        cli("customer", "update", issued.email, "--locale", "de")
        expired_url = expire_links(settings, issued.number)
        english = {"accept-language": "en"}
        page = browser_client.get(expired_url, headers=english)
        assert 'lang="de"' in page.text
        renewed = browser_client.post(f"{expired_url}/renew", data={"csrf": csrf_of(page.text)}, headers=english)
        assert renewed.status_code == 200 and 'lang="de"' in renewed.text

    def test_renew_needs_the_form_token(
        self, cli, localstripe: LocalStripe, server, settings: Settings, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        expired_url = expire_links(settings, issued.number)
        assert browser_client.post(f"{expired_url}/renew", data={}).status_code == 400
        assert db_query(settings.database_url, "SELECT count(*) FROM link_requests") == [(0,)]


class TestPageStates:
    """Each state has its own clear page; looking changes nothing."""

    def test_revoked_link(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        assert cli("link", "revoke", issued.number, "--json").json()["revoked"] == 1
        page = browser_client.get(issued.url)
        assert page.status_code == 410 and "This link is no longer valid" in page.text

    def test_void_invoice(self, cli, localstripe: LocalStripe, server, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        assert cli("invoice", "void", issued.number).code == 0
        page = browser_client.get(issued.url)
        assert page.status_code == 410
        assert "This invoice has been cancelled" in page.text
        assert cli("link", "issue", issued.number).code == 1  # a void invoice gets no new link

    def test_resend_keeps_older_links_working(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        resent = cli("link", "resend", issued.number, "--json").json()["link"]
        assert resent["emailed"] is True and resent["url"] != issued.url
        assert browser_client.get(issued.url).status_code == 200
        assert browser_client.get(resent["url"]).status_code == 200
        # The invoice email again, with the fresh link: not "your new link, as you asked" (the customer asked nothing).
        wait_until(lambda: any(resent["url"] in text_part(m) for m in smtp.mailbox.to(issued.email)), what="the resent email")
        [mail] = [m for m in smtp.mailbox.to(issued.email) if resent["url"] in text_part(m)]
        assert str(mail["Subject"]).startswith(f"Invoice {issued.number} from ") and "as you asked" not in text_part(mail)

    def test_head_and_get_change_nothing_but_the_open_counters(
        self, cli, localstripe: LocalStripe, server, settings: Settings, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        before = invoice_status(cli, issued.number)
        assert browser_client.head(issued.url).status_code == 200
        for _ in range(2):
            assert browser_client.get(issued.url).status_code == 200
        after = invoice_status(cli, issued.number)
        assert {k: v for k, v in after.items() if k != "links"} == {k: v for k, v in before.items() if k != "links"}
        wait_until(lambda: invoice_status(cli, issued.number)["links"][0]["open_count"] == 2, what="opens to be recorded")
        # Both opens in the access log (one row per link, flush and minute: one row or two).
        [(rows, opens)] = db_query(settings.database_url, "SELECT count(*), sum(opens) FROM link_opens")
        assert opens == 2 and rows in (1, 2)

    def test_forged_and_garbage_tokens_are_404(self, server, browser_client: httpx.Client) -> None:
        for token in ("nope", "WyJhYmMiLDFd.forged", "x" * 700):
            page = browser_client.get(f"/pay/{token}")
            assert page.status_code == 404 and "This link does not work" in page.text


class TestReminders:
    """Reminders go once per invoice and point, never for paid or void invoices."""

    def test_remind_twice_sends_each_once(
        self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, browser_client: httpx.Client
    ) -> None:
        soon = (date.today() + timedelta(days=2)).isoformat()
        due = issue_invoice(cli, localstripe, CARD_OK)
        cli("invoice", "void", due.number)  # void: never reminded
        email = unique_email("remind")
        cus_id, _ = localstripe.customer_with_cards(email, "Rita Remind", CARD_OK)
        cli("customer", "add", "--email", email, "--name", "Rita Remind", "--stripe-customer", cus_id, "--verified")
        created = cli(
            "invoice",
            "create",
            "--customer",
            email,
            "--amount",
            "10",
            "--currency",
            "eur",
            "--description",
            "x",
            "--due",
            soon,
            "--send",
            "--json",
        )
        number = created.json()["number"]
        later = (date.today() + timedelta(days=30)).isoformat()
        cli("invoice", "create", "--customer", email, "--amount", "11", "--currency", "eur", "--description", "y", "--due", later, "--send")

        first = cli("remind", "--json").json()["sent"]
        assert [(r["invoice"], r["point"]) for r in first] == [(number, "due-3d")]
        second = cli("remind", "--json").json()["sent"]
        assert second == []
        wait_until(lambda: [m for m in smtp.mailbox.to(email) if m["Subject"].startswith("Reminder")], what="the reminder")
        [reminder] = [m for m in smtp.mailbox.to(email) if m["Subject"].startswith("Reminder")]
        assert number in reminder["Subject"] and "/pay/" in text_part(reminder)


@pytest.mark.parametrize("locale", ["en"])
def test_expired_page_is_in_plain_words(locale: str) -> None:
    from plumbing.rendering import Brand, pages

    acme = Brand("Acme", (), None, "help@acme.test", None, None, "#0b5cad", None)
    html = pages.render(
        "expired.html",
        locale,
        request=None,
        csp_nonce="n",
        merchant="Acme",
        identity=acme,
        logo_path=None,
        languages={},
        token="t",
        csrf="c",
    )
    assert "Email me a new link" in html
