"""Part payments within the rules finance set: a deposit, then the rest, with the same link (issue 13)."""

from __future__ import annotations

import concurrent.futures
import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from plumbing.settings import Settings
from plumbing.signing import pay_signer
from tests.harness import CARD_3DS, CARD_OK, LocalStripe, SmtpServer, db_query, text_part, wait_until
from tests.integration.helpers import another_invoice, csrf_of, invoice_status, issue_invoice, part_form, post_event
from tests.integration.test_documents import pdf_text


def partial_invoice(cli: Any, localstripe: LocalStripe, amount: str, *rules: str, card: str = CARD_OK) -> Any:
    """A customer with a saved card and a sent invoice that allows part payments under `rules`."""
    issued = issue_invoice(cli, localstripe, card, amount="1.00")  # the customer; this first invoice is not used
    more = another_invoice(cli, issued.email, amount, "--allow-partial", *rules)
    issued.number, issued.url, issued.invoice_id = more.number, more.url, more.invoice_id
    return issued


def charge_of(localstripe: LocalStripe, intent_id: str) -> dict[str, Any]:
    intent = localstripe.client.v1.payment_intents.retrieve(intent_id).to_dict()
    latest = intent["latest_charge"]
    return localstripe.client.v1.charges.retrieve(latest["id"] if isinstance(latest, dict) else latest).to_dict()  # type: ignore[no-any-return]


def receipt_links(html: str) -> list[tuple[str, str]]:
    """The page's links to each part's receipt PDF: (href, receipt number)."""
    return re.findall(r'href="([^"]+/receipt\.pdf\?number=[^"]+)" download>receipt ([^<]+)</a>', html)


def charged(localstripe: LocalStripe, customer: str) -> list[int]:
    return sorted(pi.amount for pi in localstripe.payment_intents_for(customer) if pi.status == "succeeded")


@pytest.mark.postgres
class TestDepositThenTheRest:
    """A €1,000 invoice with a 30 % deposit: the customer pays €300 now, the rest later, with the same link."""

    def test_deposit_then_the_rest(
        self, cli: Any, localstripe: LocalStripe, server: Any, smtp: SmtpServer, browser_client: httpx.Client
    ) -> None:
        issued = partial_invoice(cli, localstripe, "1000.00", "--deposit-percent", "30")
        html = browser_client.get(issued.url).text
        assert "Pay another amount" in html and "deposit of at least €300.00" in html
        again = browser_client.get(issued.url)  # the choice's script, allowed by this answer's nonce
        csp = re.search(r"'nonce-([^']+)'", again.headers["content-security-policy"])
        assert csp is not None and f'<script src="/static/pay_options.js" nonce="{csp.group(1)}"></script>' in again.text

        too_small = browser_client.post(issued.url, data=part_form(html, "200.00", issued.cards[0]))
        assert too_small.status_code == 409
        assert "The first payment is a deposit of at least €300.00." in too_small.text
        assert "Nothing was charged." in too_small.text and "did not go through" not in too_small.text
        assert charged(localstripe, issued.stripe_customer) == []

        deposit = browser_client.post(issued.url, data=part_form(too_small.text, "300", issued.cards[0]))
        assert deposit.status_code == 200
        assert "You have paid €300.00 of €1,000.00. The balance still due is €700.00." in deposit.text
        assert "Pay €700.00" in deposit.text  # the same link asks for the rest
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_paid"], shown["balance"]) == ("partially_paid", 30000, 70000)
        assert "underpaid" not in shown["flags"]

        rest = browser_client.post(issued.url, data={"csrf": csrf_of(deposit.text), "payment_method": issued.cards[0], "offers_part": "1"})
        assert "Payment received" in rest.text and "Paid in parts" in rest.text
        assert "Paid with" not in rest.text  # not the last part's card for the whole amount
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_paid"], shown["balance"]) == ("paid", 100000, 0)
        assert charged(localstripe, issued.stripe_customer) == [30000, 70000]
        receipts = [p["receipt_number"] for p in shown["payments"]]
        assert len(set(receipts)) == 2 and all(receipts)

        # Every payment has its own receipt email: the first one says what is still due.
        def receipts_sent() -> list[Any]:
            return [m for m in smtp.mailbox.to(issued.email) if "Receipt" in str(m["Subject"])]

        wait_until(lambda: len(receipts_sent()) == 2, what="two receipt emails")
        bodies = [text_part(m) for m in receipts_sent()]
        assert any("€300.00" in b and "Balance still due: €700.00" in b for b in bodies)
        assert any("€700.00" in b and "Balance still due" not in b for b in bodies)

    def test_a_german_customer_writes_the_deposit_with_a_comma(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        """The German page writes amounts as "300,00 €" and asks for them the same way."""
        issued = partial_invoice(cli, localstripe, "1000.00", "--deposit-percent", "30")
        german = {"accept-language": "de-DE,de;q=0.9"}
        html = browser_client.get(issued.url, headers=german).text
        assert "Anzahlung von mindestens 300,00" in html and "Schreiben Sie ihn wie 12,50." in html
        paid = browser_client.post(issued.url, data=part_form(html, "300,50", issued.cards[0]), headers=german)
        assert paid.status_code == 200, paid.text
        assert charged(localstripe, issued.stripe_customer) == [30050]
        grouped = browser_client.post(issued.url, data=part_form(paid.text, "1.000,00", issued.cards[0]), headers=german)
        assert grouped.status_code == 409 and "ohne Tausenderpunkte, zum Beispiel 1234,50" in grouped.text
        # Told as a refusal (not a card that failed), with what was typed back in its field, the choice open.
        assert "Es wurde nichts abgebucht." in grouped.text and "Zahlung ist nicht durchgegangen" not in grouped.text
        assert 'value="1.000,00" aria-invalid="true"' in grouped.text and 'class="pay-part" id="saved-part" open' in grouped.text
        assert charged(localstripe, issued.stripe_customer) == [30050]

    def test_the_bank_confirms_the_part_not_the_balance(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        issued = partial_invoice(cli, localstripe, "1000.00", "--deposit-percent", "30", card=CARD_3DS)
        html = browser_client.get(issued.url).text
        bank = browser_client.post(issued.url, data=part_form(html, "300", issued.cards[0]))
        assert "Confirm with your bank" in bank.text
        assert "Your bank needs you to confirm this payment of €300.00." in bank.text and "€1,000.00." not in bank.text

    def test_the_same_part_sent_again_is_charged_once(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        """A double click without JavaScript, or the form sent again after the first payment went through
        (each takes ~60 ms here): the first payment is found, nothing is charged again. Another amount is
        another payment."""
        issued = partial_invoice(cli, localstripe, "1000.00")
        html = browser_client.get(issued.url).text
        form = part_form(html, "15.00", issued.cards[0])
        for _ in range(3):  # one after another, each after the previous one went through
            sent = browser_client.post(issued.url, data=form)
            assert sent.status_code == 200 and "You have paid €15.00 of €1,000.00." in sent.text
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # and all at once
            answers = list(pool.map(lambda _: browser_client.post(issued.url, data=form), range(4)))
        assert all(a.status_code == 200 for a in answers), [a.status_code for a in answers]
        assert charged(localstripe, issued.stripe_customer) == [1500]
        assert invoice_status(cli, issued.number)["amount_paid"] == 1500
        other = browser_client.post(issued.url, data=part_form(sent.text, "20.00", issued.cards[0]))
        assert other.status_code == 200 and "You have paid €35.00 of €1,000.00." in other.text
        assert charged(localstripe, issued.stripe_customer) == [1500, 2000]

    def test_a_colleague_is_not_told_they_paid_the_deposit(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        issued = partial_invoice(cli, localstripe, "1000.00", "--deposit-percent", "30")
        html = browser_client.get(issued.url).text
        assert browser_client.post(issued.url, data=part_form(html, "300", issued.cards[0])).status_code == 200
        colleague = cli("link", "issue", issued.number, "--to", "ap@example.com", "--json").json()["link"]["url"]
        with httpx.Client(base_url=server.base, timeout=30, follow_redirects=True) as them:
            page = them.get(colleague)
        assert "€300.00 of €1,000.00 has been paid. The balance still due is €700.00." in page.text
        assert "You have paid" not in page.text


@pytest.mark.postgres
class TestAmountsOutsideTheRules:
    """Amounts the rules do not allow are refused with a clear message, and nothing is charged."""

    @pytest.mark.parametrize(
        ("typed", "message"),
        [
            ("1.000,00", "Please write the amount without thousands separators"),
            ("abc", "Please write the amount in digits"),
            ("49.99", "The smallest amount you can pay is €50.00."),
            ("1000.01", "That is more than the balance of €1,000.00."),
            ("999.80", "That would leave less than €0.50 to pay later"),
            ("", "Please write the amount in digits"),
            ('1"><img src=x onerror=alert(1)>', "Please write the amount in digits"),
        ],
    )
    def test_refused_and_nothing_charged(
        self, typed: str, message: str, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        issued = partial_invoice(cli, localstripe, "1000.00", "--min-amount", "50.00")
        html = browser_client.get(issued.url).text
        refused = browser_client.post(issued.url, data=part_form(html, typed, issued.cards[0]))
        assert refused.status_code == 409, refused.text
        assert message in refused.text
        assert "<img" not in refused.text  # what was typed comes back in its field, escaped
        assert charged(localstripe, issued.stripe_customer) == []
        assert invoice_status(cli, issued.number)["amount_paid"] == 0

    def test_an_amount_typed_then_the_main_button_is_unclear(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        issued = partial_invoice(cli, localstripe, "1000.00")
        html = browser_client.get(issued.url).text
        form = {**part_form(html, "100.00", issued.cards[0]), "pay_choice": ""}
        refused = browser_client.post(issued.url, data=form)
        assert refused.status_code == 409 and "press “Pay this amount”" in refused.text
        assert charged(localstripe, issued.stripe_customer) == []

    def test_without_part_payments_the_page_offers_none(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, amount="99.99")
        html = browser_client.get(issued.url).text
        assert "Pay another amount" not in html and "pay_options.js" not in html
        refused = browser_client.post(issued.url, data=part_form(html, "10.00", issued.cards[0]))
        # The invoice allows no part payment: a stray amount never changes what is charged (the balance).
        assert refused.status_code == 200 and "Payment received" in refused.text
        assert charged(localstripe, issued.stripe_customer) == [9999]


class TestFinanceSetsTheRules:
    """`invoice create` takes the rules, checks them, and `invoice show` prints them with the balance."""

    def test_rules_are_checked(self, cli: Any, localstripe: LocalStripe) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        base = ["invoice", "create", "--customer", issued.email, "--amount", "100.00", "--currency", "eur", "--description", "X"]
        both = cli(*base, "--allow-partial", "--min-amount", "10", "--min-percent", "10")
        assert both.code == 2
        for extra, error in (
            (["--allow-partial", "--min-percent", "0"], "from 1 to 100"),
            (["--allow-partial", "--deposit-percent", "101"], "from 1 to 100"),
            (["--allow-partial", "--min-amount", "100.01"], "more than the total"),
            (["--min-amount", "10"], "add it"),
            (["--no-partial", "--deposit-percent", "30"], "drop --no-partial"),
            (["--allow-partial", "--min-amount", "10,00"], "--min-amount"),
        ):
            result = cli(*base, *extra)
            assert result.code == 1 and error in result.err, (extra, result.err)

        made = cli(*base, "--allow-partial", "--min-percent", "25", "--deposit-percent", "50", "--json")
        assert made.code == 0, made.err
        number = made.json()["number"]
        assert made.json()["part_payments"] == {"allowed": True, "min_amount": None, "min_percent": 25, "deposit_percent": 50}
        shown = cli("invoice", "show", number)
        text = " ".join(shown.out.split())
        assert "allowed, at least 25 % of the total, a deposit of 50 % first" in text
        assert "Balance │ €100.00" in text

    def test_partial_payments_default(self, cli: Any, localstripe: LocalStripe, monkeypatch: pytest.MonkeyPatch) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        monkeypatch.setenv("PARTIAL_PAYMENTS_DEFAULT", "on")
        made = another_invoice(cli, issued.email, "50.00", send=False)
        assert invoice_status(cli, made.number)["part_payments"]["allowed"] is True
        off = another_invoice(cli, issued.email, "50.00", "--no-partial", send=False)
        assert invoice_status(cli, off.number)["part_payments"]["allowed"] is False


@pytest.mark.postgres
class TestTwoTabsTwoParts:
    """Two tabs pay two different part amounts at the same moment: never more than the balance is charged."""

    def test_concurrent_part_payments_never_exceed_the_balance(
        self, backend: str, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client, settings: Settings
    ) -> None:
        issued = partial_invoice(cli, localstripe, "1000.00")
        html = browser_client.get(issued.url).text
        barrier = threading.Barrier(2)
        results: list[httpx.Response] = []

        def pay(amount: str) -> None:
            with httpx.Client(base_url=server.base, timeout=60, follow_redirects=True, cookies=browser_client.cookies) as client:
                barrier.wait(10)
                results.append(client.post(issued.url, data=part_form(html, amount, issued.cards[0])))

        threads = [threading.Thread(target=pay, args=(amount,)) for amount in ("600.00", "700.00")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(results) == 2 and all(r.status_code in (200, 409) for r in results), [r.status_code for r in results]
        money = charged(localstripe, issued.stripe_customer)
        assert sum(money) <= 100000 and len(money) == 1, money
        shown = invoice_status(cli, issued.number)
        assert shown["amount_paid"] == sum(money) and shown["status"] == "partially_paid"
        live = db_query(settings.database_url, "SELECT count(*) FROM payments WHERE live_invoice_id IS NOT NULL")
        assert live == [(0,)]


@pytest.mark.postgres
class TestRefundOfAPart:
    """A refund of a part payment never changes what is still owed (README: refunds)."""

    def test_refund_keeps_the_balance(self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client) -> None:
        issued = partial_invoice(cli, localstripe, "1000.00")
        html = browser_client.get(issued.url).text
        browser_client.post(issued.url, data=part_form(html, "250.00", issued.cards[0]))
        [intent] = [pi for pi in localstripe.payment_intents_for(issued.stripe_customer) if pi.status == "succeeded"]
        localstripe.client.v1.refunds.create({"payment_intent": intent.id, "amount": 5000})
        assert post_event(server, "charge.refunded", charge_of(localstripe, intent.id)).status_code == 200
        shown = invoice_status(cli, issued.number)
        assert (shown["status"], shown["amount_paid"], shown["balance"]) == ("partially_paid", 25000, 75000)


@pytest.mark.postgres
class TestEachPartHasItsReceipt:
    """The page lists what was paid so far; each part's receipt is a PDF from there, while the rest is
    still due and after (the customer's accounts want the deposit's receipt, not only the last one)."""

    def test_the_deposit_s_receipt_from_the_page(
        self, cli: Any, localstripe: LocalStripe, settings: Settings, browser_client: httpx.Client
    ) -> None:
        issued = partial_invoice(cli, localstripe, "1000.00", "--deposit-percent", "30")
        html = browser_client.get(issued.url).text
        deposit = browser_client.post(issued.url, data=part_form(html, "300", issued.cards[0]))
        assert "The balance still due is €700.00." in deposit.text
        [first] = [p["receipt_number"] for p in invoice_status(cli, issued.number)["payments"]]
        links = receipt_links(deposit.text)
        assert [number for _, number in links] == [first]
        pdf = browser_client.get(links[0][0])
        assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
        assert f'filename="{issued.number}-receipt-{first}.pdf"' in pdf.headers["content-disposition"]
        text = " ".join(pdf_text(pdf.content).split())
        assert first in text and "received €300.00 for invoice" in text and "Balance still due €700.00" in text
        # The invoice PDF says what was paid so far, next to what is still due.
        invoice_pdf = " ".join(pdf_text(browser_client.get(f"{links[0][0].split('/receipt.pdf')[0]}/invoice.pdf").content).split())
        assert "Paid so far €300.00" in invoice_pdf and "Amount due €700.00" in invoice_pdf
        # Without a number there is no receipt yet: the invoice is not paid.
        page_path = links[0][0].split("/receipt.pdf")[0]
        assert browser_client.get(f"{page_path}/receipt.pdf").status_code == 404
        # An expired link of the partly paid invoice gets its page (ask for a fresh link), not the PDF.
        signer = pay_signer(settings)
        expired = signer.sign(signer.verify(issued.url.rsplit("/", 1)[1]).subject_id, datetime.now(UTC) - timedelta(days=1))
        old = httpx.get(f"{settings.base_url}/pay/{expired}/receipt.pdf", params={"number": first}, timeout=30)
        assert old.status_code == 410 and not old.content.startswith(b"%PDF") and issued.number in old.text

        # What an attacker would try: another invoice's receipt number, a made-up one, garbage.
        other = partial_invoice(cli, localstripe, "500.00")
        other_html = browser_client.get(other.url).text
        browser_client.post(other.url, data=part_form(other_html, "100", other.cards[0]))
        [foreign] = [p["receipt_number"] for p in invoice_status(cli, other.number)["payments"]]
        for number in (foreign, "RCT-999999", "x" * 200, "'; DROP TABLE payments; --", ""):
            refused = browser_client.get(f"{page_path}/receipt.pdf", params={"number": number})
            assert refused.status_code == 404 and "There is no receipt yet" in refused.text, number

        # Paid in full: the receipt page lists both parts, each with its own receipt.
        rest = browser_client.post(issued.url, data={"csrf": csrf_of(deposit.text), "payment_method": issued.cards[0], "offers_part": "1"})
        assert "Paid in parts" in rest.text
        numbers = [p["receipt_number"] for p in invoice_status(cli, issued.number)["payments"]]
        links = receipt_links(rest.text)
        assert sorted(number for _, number in links) == sorted(numbers) and len(numbers) == 2
        second = next(href for href, number in links if number != first)
        text = " ".join(pdf_text(browser_client.get(second).content).split())
        assert "received €700.00 for invoice" in text and "Balance still due" not in text
