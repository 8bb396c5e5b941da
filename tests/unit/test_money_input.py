"""Money as staff type it (CLI, CSV import): only currencies Stripe can charge, only plain amounts (plumbing/i18n.py)."""

from __future__ import annotations

import pytest
from babel.numbers import is_currency

from plumbing.i18n import STRIPE_CURRENCIES, MoneyError, check_currency, currency_digits, to_minor_units


def refused(amount: str, currency: str = "eur") -> str:
    with pytest.raises(MoneyError) as caught:
        to_minor_units(amount, currency)
    return str(caught.value)


def currency_refused(currency: str) -> str:
    with pytest.raises(MoneyError) as caught:
        check_currency(currency)
    return str(caught.value)


class TestCurrencies:
    """Babel knows every ISO 4217 code; Stripe charges only its presentment currencies."""

    @pytest.mark.parametrize("currency", ["eur", "EUR", " usd ", "gbp", "jpy", "chf", "nok", "sek", "dkk", "pln", "cad", "aud"])
    def test_everyday_currencies(self, currency: str) -> None:
        assert check_currency(currency) == currency.strip().lower()

    @pytest.mark.parametrize(
        "currency",
        ["xxx", "XAU", "xag", "xpt", "xpd", "xdr", "xts", "xba", "xbb", "xbc", "xbd", "xsu", "xua",
         "usn", "bov", "che", "chw", "clf", "cou", "mxv", "uyi", "uyw"],
    )  # fmt: skip
    def test_codes_no_one_can_pay_in(self, currency: str) -> None:
        assert is_currency(currency.upper())  # Babel accepts them: that was the hole
        assert f"currency {currency.upper()} cannot be charged with Stripe" in currency_refused(currency)

    def test_three_decimal_currencies_are_not_presentment_currencies(self) -> None:
        for currency in ("bhd", "jod", "kwd", "omr", "tnd"):
            assert "cannot be charged with Stripe" in currency_refused(currency)

    def test_unknown_codes_keep_their_message(self) -> None:
        for currency in ("xyz", "euro", "", "ＥＵＲ"):
            assert "unknown currency" in currency_refused(currency)

    def test_units_that_stripe_counts_differently_are_refused(self) -> None:
        # Stripe takes these in hundredths, Babel (and so our amounts) in whole units: 100 ALL would be charged 1.00 ALL.
        for currency in ("all", "isk", "ugx", "afn", "lak", "lbp", "mmk", "rsd", "sos", "std", "yer"):
            assert currency_digits(currency) == 0
            assert f"currency {currency.upper()} is not supported" in currency_refused(currency)

    def test_every_listed_currency_is_known_to_babel(self) -> None:
        assert len(STRIPE_CURRENCIES) == 135
        assert all(is_currency(code.upper()) for code in STRIPE_CURRENCIES)


class TestAmounts:
    """Major units: ASCII digits, an optional point, at most the currency's decimals, as the README says."""

    @pytest.mark.parametrize(
        ("amount", "currency", "minor"),
        [("120.50", "eur", 12050), ("120.5", "eur", 12050), (" 7 ", "eur", 700), ("0.50", "gbp", 50),
         ("1200", "jpy", 1200), ("007", "usd", 700), ("999999.99", "eur", 99_999_999)],
    )  # fmt: skip
    def test_plain_amounts(self, amount: str, currency: str, minor: int) -> None:
        assert to_minor_units(amount, currency) == minor

    @pytest.mark.parametrize(
        "amount",
        ["1_000", "1e2", "1E2", "١٢٠", "۱۲۰", "१२०", "１２０", "1 000", "1,000", "12,50", "+5", ".5", "5.", "1.2.3",
         "NaN", "Infinity", "-Infinity", "0x10", "", " ", "€5", "5 EUR"],
    )  # fmt: skip
    def test_anything_else_is_not_a_number(self, amount: str) -> None:
        assert refused(amount) == f"amount {amount!r} is not a number (write digits and an optional decimal point, e.g. 120.50)"

    def test_the_example_fits_the_currency(self) -> None:
        assert refused("1e3", "jpy").endswith("e.g. 1200)")

    def test_existing_refusals_keep_their_messages(self) -> None:
        assert refused("0") == "amount '0' must be greater than zero"
        assert refused("0.00") == "amount '0.00' must be greater than zero"
        assert refused("-5") == "amount '-5' must be greater than zero"
        assert refused("10.999") == "amount '10.999' has more than 2 decimals for EUR"
        assert refused("10.5", "jpy") == "amount '10.5' has more than 0 decimals for JPY"
        assert refused("1000000") == "amount '1000000' is larger than a single card payment allows"
        assert refused("1" + "0" * 400).endswith("is larger than a single card payment allows")

    def test_currency_is_checked_first(self) -> None:
        assert "cannot be charged with Stripe" in refused("100", "xxx")
