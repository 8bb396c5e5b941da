"""Part payments: what a customer may pay now, within the rules finance set (links/partial.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime

import pytest

from emails.messages import AllocationFact, InvoiceFacts, Kind, colleague_message, invoice_message, receipt_message
from links.partial import AmountRefused, PartRules, allowed, check_amount, parse_amount, percent_of, resolve_amount
from plumbing.i18n import format_money

OFF = PartRules()
FREE = PartRules(allow_partial=True)


def refusal(amount: int, due: int, paid: int, rules: PartRules, currency: str = "eur") -> AmountRefused:
    with pytest.raises(AmountRefused) as caught:
        check_amount(amount, due, paid, rules, currency)
    return caught.value


class TestFullBalance:
    """Paying the whole balance is always allowed; more never is."""

    def test_balance_allowed_under_every_rule(self) -> None:
        for rules in (OFF, FREE, PartRules(True, min_amount=50_000), PartRules(True, deposit_percent=30)):
            assert check_amount(12050, 12050, 0, rules, "eur") == 12050
            assert check_amount(2050, 12050, 10000, rules, "eur") == 2050

    def test_more_than_the_balance_is_refused(self) -> None:
        refused = refusal(12051, 12050, 0, FREE)
        assert refused.amounts == {"balance": 12050}

    def test_without_part_payments_only_the_balance(self) -> None:
        refused = refusal(5000, 12050, 0, OFF)
        assert "paid in full" in refused.message
        assert allowed(12050, 0, OFF, "eur").choices is False

    def test_nothing_left(self) -> None:
        assert "nothing left" in refusal(100, 12050, 12050, FREE).message


class TestMinimums:
    """A part payment is at least the minimum amount or percentage, unless the balance is smaller."""

    def test_minimum_amount(self) -> None:
        rules = PartRules(True, min_amount=5000)
        assert refusal(4999, 20000, 0, rules).amounts == {"minimum": 5000}
        assert check_amount(5000, 20000, 0, rules, "eur") == 5000

    def test_minimum_percent_rounds_up(self) -> None:
        rules = PartRules(True, min_percent=30)
        assert percent_of(1001, 30) == 301
        assert allowed(1001, 0, rules, "eur").minimum == 301

    def test_balance_below_the_minimum_is_the_only_amount(self) -> None:
        rules = PartRules(True, min_amount=5000)
        window = allowed(20000, 17000, rules, "eur")
        assert (window.minimum, window.maximum, window.choices) == (3000, 3000, False)
        assert check_amount(3000, 20000, 17000, rules, "eur") == 3000

    def test_never_below_stripes_minimum(self) -> None:
        assert refusal(49, 20000, 0, FREE).amounts == {"minimum": 50}
        assert allowed(20000, 0, FREE, "gbp").minimum == 30

    def test_never_leaves_a_rest_stripe_could_not_charge(self) -> None:
        refused = refusal(19980, 20000, 0, FREE)
        assert refused.amounts == {"rest": 50, "balance": 20000, "largest": 19950}
        assert check_amount(19950, 20000, 0, FREE, "eur") == 19950


class TestDeposit:
    """While nothing is paid, the first payment is at least the deposit; then the minimums apply."""

    def test_deposit_first(self) -> None:
        rules = PartRules(True, deposit_percent=30)
        window = allowed(100000, 0, rules, "eur")
        assert window.deposit and window.minimum == 30000
        refused = refusal(29999, 100000, 0, rules)
        assert "deposit" in refused.message and refused.amounts == {"minimum": 30000}

    def test_after_the_deposit_any_amount_within_the_minimum(self) -> None:
        rules = PartRules(True, min_amount=10000, deposit_percent=30)
        window = allowed(100000, 30000, rules, "eur")
        assert not window.deposit and window.minimum == 10000
        assert check_amount(10000, 100000, 30000, rules, "eur") == 10000


class TestParsing:
    """The typed amount is read strictly, in major units with the currency's decimals."""

    @pytest.mark.parametrize(("text", "minor"), [("12.50", 1250), ("12.5", 1250), ("12", 1200), (" 7.05 ", 705), ("0.5", 50)])
    def test_good_amounts(self, text: str, minor: int) -> None:
        assert parse_amount(text, "eur") == minor

    def test_yen_has_no_decimals(self) -> None:
        assert parse_amount("1200", "jpy") == 1200
        with pytest.raises(AmountRefused, match="whole digits"):
            parse_amount("1200.5", "jpy")

    @pytest.mark.parametrize(("text", "minor"), [("12,50", 1250), ("12,5", 1250), ("0,01", 1), (" 428,40 ", 42840)])
    def test_a_decimal_comma_as_the_page_writes_amounts_in_german_spanish_and_french(self, text: str, minor: int) -> None:
        assert parse_amount(text, "eur") == minor

    @pytest.mark.parametrize("text", ["1.234,56", "1,234.56", "1 234,56", "1\u202f234,56", "1'234.56", "1.234", "1,234", "12,505"])
    def test_thousands_separators_are_refused_never_guessed(self, text: str) -> None:
        # "1.234" is 1234 in German and 1.234 in English: asked again, never charged either way.
        with pytest.raises(AmountRefused, match="without thousands separators"):
            parse_amount(text, "eur")

    def test_yen_refuses_a_comma_too(self) -> None:
        for text in ("1,200", "1200,5"):
            with pytest.raises(AmountRefused, match="whole digits"):
                parse_amount(text, "jpy")

    @pytest.mark.parametrize(
        "text", ["", "abc", "12.505", "-5", "1e3", "€12", "1,000.00", "12.", ".5", "1 000", "NaN", "１２", "12,", ",5", "1,2,3"]
    )
    def test_bad_amounts(self, text: str) -> None:
        with pytest.raises(AmountRefused):
            parse_amount(text, "eur")

    def test_nothing_typed_means_the_balance(self) -> None:
        assert resolve_amount(None, 12050, 2050, FREE, "eur") == 10000
        assert resolve_amount("  ", 12050, 0, OFF, "eur") == 12050
        assert resolve_amount("20.50", 12050, 0, FREE, "eur") == 2050


class TestEmailsSayTheBalance:
    """Receipts of a part payment say what is still due; a pay-all receipt lists which invoice got what;
    reminders ask for the balance, not the whole invoice."""

    FACTS = InvoiceFacts("Acme GmbH", "Ann Lee", "INV-7", "Kitchen", 100000, "eur", date(2026, 12, 15))
    WHEN = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)

    def test_part_payment_receipt(self) -> None:
        mail = receipt_message(
            self.FACTS, amount_paid=30000, brand="visa", last4="4242", paid_at=self.WHEN, link_url=None, locale="en",
            balance=70000, receipt_number="RCT-000003",
        )  # fmt: skip
        assert "Amount paid: €300.00" in mail.text and "Balance still due: €700.00" in mail.text and "RCT-000003" in mail.text
        assert "€700.00" in mail.html and "Balance still due" in mail.html

    def test_pay_all_receipt_lists_the_allocation(self) -> None:
        allocation = (AllocationFact("INV-7", 10000, 0), AllocationFact("INV-8", 20000, 0), AllocationFact("INV-9", 30000, 0))
        mail = receipt_message(
            self.FACTS, amount_paid=60000, brand="visa", last4="4242", paid_at=self.WHEN, link_url=None, locale="de",
            allocation=allocation,
        )  # fmt: skip
        assert mail.subject == "Quittung für 3 Rechnungen von Acme GmbH"  # (one word for a receipt throughout)
        for number, amount in (("INV-7", 10000), ("INV-8", 20000), ("INV-9", 30000)):
            assert f"Rechnung {number}: {format_money(amount, 'eur', 'de')}\n" in mail.text

    @pytest.mark.parametrize("locale", ["en", "de", "fr", "es"])
    def test_reminder_asks_for_the_balance(self, locale: str) -> None:
        facts = replace(self.FACTS, amount_paid=30000, balance=70000)
        mail = invoice_message(facts, "https://pay.example.com/pay/x", self.WHEN, locale, kind=Kind.REMINDER)
        balance = format_money(70000, "eur", locale)
        assert balance in mail.subject and format_money(30000, "eur", locale) in mail.text
        assert balance in mail.html
        if locale != "en":
            assert "Paid so far" not in mail.text  # translated

    @pytest.mark.parametrize("locale", ["en", "de"])
    @pytest.mark.parametrize("kind", [Kind.INVOICE, Kind.NEW_LINK, "colleague"])
    def test_every_email_of_a_partly_paid_invoice_asks_for_the_balance(self, kind: str, locale: str) -> None:
        """Sent again, to a colleague or as a fresh link after a part was paid: the balance, not the total
        (a colleague paying by bank transfer from the email would overpay)."""
        facts = replace(self.FACTS, amount_paid=30000, balance=70000)
        url = "https://pay.example.com/pay/x"
        if kind == "colleague":
            mail = colleague_message(facts, url, self.WHEN, locale, asked_by_customer=True)
        else:
            mail = invoice_message(facts, url, self.WHEN, locale, kind=kind)
        balance, paid, total = (format_money(v, "eur", locale) for v in (70000, 30000, 100000))
        if kind != Kind.NEW_LINK:  # (its subject names no amount)
            assert balance in mail.subject and total not in mail.subject
        assert balance in mail.text and paid in mail.text
        assert (f"Pay {balance}" if locale == "en" else f"{balance} bezahlen") in mail.html
