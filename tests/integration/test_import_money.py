"""Money typed by staff or imported from a spreadsheet: a currency Stripe cannot charge, or an amount written any other
way than plain digits, is refused before anything is written or emailed (plumbing/i18n.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe, db_query
from tests.integration.helpers import unique_email

pytestmark = pytest.mark.postgres

HEADER = "email,name,amount,currency,description,due_date,number,locale\n"
ITEM_HEADER = (
    "email,name,amount,currency,description,due_date,number,locale,notes,item_description,item_quantity,item_unit_amount,item_tax_percent\n"
)
LOOSE_AMOUNTS = ("1_000", "1e2", "١٢٠")  # Decimal() read them as 1000.00, 100.00 and 120.00


def write_csv(tmp_path: Path, body: str, header: str = HEADER) -> str:
    path = tmp_path / "invoices.csv"
    path.write_text(header + body, encoding="utf-8")
    return str(path)


def add_customer(cli: Any, localstripe: LocalStripe) -> str:
    email = unique_email("money")
    cus_id, _ = localstripe.customer_with_cards(email, "Mona Money", CARD_OK)
    added = cli("customer", "add", "--email", email, "--name", "Mona Money", "--stripe-customer", cus_id, "--verified")
    assert added.code == 0, added.err
    return email


def nothing_written(settings: Settings) -> None:
    assert db_query(settings.database_url, "SELECT count(*) FROM invoices") == [(0,)]
    assert db_query(settings.database_url, "SELECT count(*) FROM outbox") == [(0,)]


class TestCurrencyStripeCannotCharge:
    """XXX, gold, fund codes: Babel knows them, Stripe charges none of them, so no one would be billed in them."""

    def test_create_and_send_is_refused(self, cli: Any, localstripe: LocalStripe, settings: Settings) -> None:
        email = add_customer(cli, localstripe)
        for currency in ("xxx", "XAU", "usn"):
            result = cli(
                "invoice", "create", "--customer", email, "--amount", "100", "--currency", currency, "--description", "d", "--send"
            )
            assert result.code == 1, (currency, result.out)
            assert result.err.strip().splitlines() == [
                f"error: currency {currency.upper()} cannot be charged with Stripe (use a currency Stripe supports, such as EUR)"
            ]
        nothing_written(settings)

    def test_import_reports_each_row_and_imports_nothing(self, cli: Any, settings: Settings, tmp_path: Path) -> None:
        path = write_csv(
            tmp_path,
            "a@example.com,A,100,xxx,d,,X-1,\n"  # line 2
            "b@example.com,B,100,XAU,d,,X-2,\n"  # 3
            "c@example.com,C,100,usn,d,,X-3,\n"  # 4
            "d@example.com,D,100,eur,d,,X-4,\n",  # 5: good
        )
        result = cli("import", path, "--send", "--verified", "--json")
        assert result.code == 1
        assert result.json()["bad_rows"] == [
            {"line": line, "reason": f"currency {code} cannot be charged with Stripe (use a currency Stripe supports, such as EUR)"}
            for line, code in ((2, "XXX"), (3, "XAU"), (4, "USN"))
        ]
        nothing_written(settings)

        skipped = cli("import", path, "--skip-bad", "--json")
        assert skipped.code == 0, skipped.err
        assert db_query(settings.database_url, "SELECT number, currency FROM invoices") == [("X-4", "eur")]

    def test_currencies_stripe_charges_still_import(self, cli: Any, settings: Settings, tmp_path: Path) -> None:
        path = write_csv(
            tmp_path,
            "a@example.com,A,120.50,EUR,d,,C-1,\nb@example.com,B,9.99,usd,d,,C-2,\nc@example.com,C,5,gbp,d,,C-3,\n"
            "d@example.com,D,1500,jpy,d,,C-4,\ne@example.com,E,12.30,chf,d,,C-5,\n",
        )
        result = cli("import", path, "--json")
        assert result.code == 0, result.err
        rows = db_query(settings.database_url, "SELECT number, currency, amount_due FROM invoices ORDER BY number")
        assert rows == [("C-1", "eur", 12050), ("C-2", "usd", 999), ("C-3", "gbp", 500), ("C-4", "jpy", 1500), ("C-5", "chf", 1230)]


class TestPlainAmountsOnly:
    """'1_000', '1e2' and Arabic-Indic digits are not what the README allows: refused, never read as something else."""

    def test_cli_refuses_loose_amounts(self, cli: Any, localstripe: LocalStripe, settings: Settings) -> None:
        email = add_customer(cli, localstripe)
        base = ("invoice", "create", "--customer", email, "--currency", "eur", "--description", "d")
        for amount in LOOSE_AMOUNTS:
            plain = cli(*base, "--amount", amount, "--send")
            assert plain.code == 1 and f"amount {amount!r} is not a number" in plain.err, plain.err
            item = cli(*base, "--item", f"Work|1|{amount}|19")
            assert item.code == 1 and f"unit amount: amount {amount!r} is not a number" in item.err, item.err
            minimum = cli(*base, "--amount", "5000", "--allow-partial", "--min-amount", amount)
            assert minimum.code == 1 and f"--min-amount: amount {amount!r} is not a number" in minimum.err, minimum.err
        nothing_written(settings)

    def test_import_refuses_loose_amounts(self, cli: Any, settings: Settings, tmp_path: Path) -> None:
        plain = "".join(f"p{i}@example.com,P,{amount},eur,d,,P-{i},,,,,,\n" for i, amount in enumerate(LOOSE_AMOUNTS))
        items = "".join(f"i{i}@example.com,I,,eur,d,,I-{i},,,Work,1,{amount},\n" for i, amount in enumerate(LOOSE_AMOUNTS))
        path = write_csv(tmp_path, plain + items + "ok@example.com,Ok,1000,eur,d,,OK-1,,,,,,\n", header=ITEM_HEADER)
        result = cli("import", path, "--json")
        assert result.code == 1
        reasons = {b["line"]: b["reason"] for b in result.json()["bad_rows"]}
        assert sorted(reasons) == [2, 3, 4, 5, 6, 7], reasons
        for line, amount in zip((2, 3, 4), LOOSE_AMOUNTS, strict=True):
            assert reasons[line].startswith(f"amount {amount!r} is not a number"), reasons[line]
        for line, amount in zip((5, 6, 7), LOOSE_AMOUNTS, strict=True):
            assert f"amount {amount!r} is not a number" in reasons[line], reasons[line]
        nothing_written(settings)
