"""Line items and tax: typed by finance or imported from a spreadsheet, shown to the customer, charged to the cent."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from links.lines import LineItem, totals
from plumbing.i18n import format_day
from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe, SmtpServer, db_query, html_part, text_part
from tests.integration.helpers import unique_email

pytestmark = pytest.mark.postgres

ITEMS = ("Consulting|3|400.00|19", "Travel|1|85.50|7", "Handling fee|2|12.25|")
# By hand, per line half-up: 1,200.00 + 19 % = 228.00; 85.50 + 7 % = 5.985 -> 5.99; 24.50 untaxed.
SUBTOTAL, TAX_7, TAX_19 = 120000 + 8550 + 2450, 599, 22800
TOTAL = SUBTOTAL + TAX_7 + TAX_19  # 1,543.99


def add_customer(cli: Any, localstripe: LocalStripe, *, verified: bool = True, locale: str | None = None, email: str | None = None) -> str:
    email = email or unique_email("lines")
    cus_id, _ = localstripe.customer_with_cards(email, "Lena Lines", CARD_OK)
    extra = (["--verified"] if verified else []) + (["--locale", locale] if locale else [])
    added = cli("customer", "add", "--email", email, "--name", "Lena Lines", "--stripe-customer", cus_id, *extra)
    assert added.code == 0, added.err
    return email


def create(cli: Any, email: str, *args: str) -> Any:
    items = [a for spec in ITEMS for a in ("--item", spec)]
    return cli("invoice", "create", "--customer", email, "--currency", "eur", "--description", "November work", *items, *args, "--json")


class TestCreateWithItems:
    """Finance bills several lines at two tax rates; the total, worked out per line half-up, is what the invoice asks for."""

    def test_three_lines_two_rates(self, cli: Any, localstripe: LocalStripe, settings: Settings) -> None:
        email = add_customer(cli, localstripe)
        due = date.today() + timedelta(days=14)
        created = create(cli, email, "--notes", "Payable within 14 days.\nThank you!", "--due", due.isoformat())
        assert created.code == 0, created.err
        invoice = created.json()
        assert invoice["amount_due"] == invoice["total"] == TOTAL
        assert invoice["subtotal"] == SUBTOTAL
        assert [(t["rate"], t["amount"]) for t in invoice["taxes"]] == [("7", TAX_7), ("19", TAX_19)]
        assert [(line["description"], line["quantity"], line["net"], line["tax"]) for line in invoice["lines"]] == [
            ("Consulting", "3", 120000, 22800),
            ("Travel", "1", 8550, 599),
            ("Handling fee", "2", 2450, 0),
        ]
        assert invoice["notes"] == "Payable within 14 days.\nThank you!"
        [(stored,)] = db_query(settings.database_url, "SELECT line_items FROM invoices WHERE number = :n", n=invoice["number"])
        stored_lines = json.loads(stored) if isinstance(stored, str) else stored
        assert totals([LineItem.from_json(line) for line in stored_lines]).total == TOTAL

        shown = cli("invoice", "show", invoice["number"])
        assert shown.code == 0, shown.err
        for expected in ("Consulting: 3 × €400.00, tax 19 % = €1,200.00", "Handling fee: 2 × €12.25, no tax", "Tax 7 %", "€5.99",
                         "Total", "€1,543.99", "Payable within 14 days.", due.isoformat()):  # fmt: skip
            assert expected in shown.out, expected

    def test_a_plain_amount_is_still_one_line(self, cli: Any, localstripe: LocalStripe) -> None:
        email = add_customer(cli, localstripe)
        created = cli(
            "invoice", "create", "--customer", email, "--amount", "120.50", "--currency", "eur", "--description", "Annual", "--json"
        )
        assert created.code == 0, created.err
        data = created.json()
        assert (data["amount_due"], data["taxes"]) == (12050, [])
        assert [(line["description"], line["quantity"], line["net"]) for line in data["lines"]] == [("Annual", "1", 12050)]

    def test_amount_and_items_together_is_a_usage_error(self, cli: Any, localstripe: LocalStripe, settings: Settings) -> None:
        email = add_customer(cli, localstripe)
        both = create(cli, email, "--amount", "10")
        assert both.code == 2 and "not allowed with argument" in both.err
        neither = cli("invoice", "create", "--customer", email, "--currency", "eur", "--description", "d")
        assert neither.code == 2 and "one of the arguments --amount --item is required" in neither.err
        assert db_query(settings.database_url, "SELECT count(*) FROM invoices") == [(0,)]

    @pytest.mark.parametrize(
        ("item", "message"),
        [
            ("Consulting|3", "use DESCRIPTION|QUANTITY|UNIT_AMOUNT|TAX_PERCENT"),
            ("Consulting|three|400|19", "quantity 'three' is not a number"),
            ("Consulting|3|400.001|19", "more than 2 decimals"),
            ("Consulting|3|400|119", "between 0 and 100"),
        ],
    )
    def test_a_bad_item_is_one_line_naming_it(self, cli: Any, localstripe: LocalStripe, item: str, message: str) -> None:
        email = add_customer(cli, localstripe)
        result = cli("invoice", "create", "--customer", email, "--currency", "eur", "--description", "d", "--item", item)
        assert result.code == 1
        [line] = result.err.strip().splitlines()
        assert line.startswith(f"error: --item {item!r}:") and message in line

    def test_due_date_in_the_past_and_amounts_below_stripes_minimum_are_refused(
        self, cli: Any, localstripe: LocalStripe, settings: Settings
    ) -> None:
        email = add_customer(cli, localstripe)
        yesterday = (date.today() - timedelta(days=1)).isoformat()
        past = cli(
            "invoice", "create", "--customer", email, "--amount", "10", "--currency", "eur", "--description", "d", "--due", yesterday
        )
        assert past.code == 1
        assert past.err.strip().splitlines() == [
            f"error: the due date {yesterday} is in the past (today is {date.today().isoformat()} UTC); give today or later"
        ]
        assert "a date in the past is refused" in " ".join(cli("invoice", "create", "--help").out.split())
        small = cli("invoice", "create", "--customer", email, "--amount", "0.49", "--currency", "eur", "--description", "d")
        assert small.code == 1 and small.err.strip() == "error: the total is below Stripe's minimum charge of 0.50 EUR"
        pence = cli("invoice", "create", "--customer", email, "--currency", "gbp", "--description", "d", "--item", "Stamp|2|0.10|")
        assert pence.code == 1 and "minimum charge of 0.30 GBP" in pence.err
        assert db_query(settings.database_url, "SELECT count(*) FROM invoices") == [(0,)]
        # Refused invoices give their number back: the next one is still INV-000001.
        ok = cli("invoice", "create", "--customer", email, "--amount", "0.50", "--currency", "eur", "--description", "d", "--json")
        assert ok.json()["number"] == "INV-000001"

    def test_a_link_that_expires_before_the_due_date_is_issued_with_a_warning_and_flagged(self, cli: Any, localstripe: LocalStripe) -> None:
        email = add_customer(cli, localstripe)
        due = date.today() + timedelta(days=60)  # LINK_TTL_DAYS is 30
        created = create(cli, email, "--due", due.isoformat(), "--send")
        assert created.code == 0, created.err
        number = created.json()["number"]
        warning = json.loads(created.err.strip().splitlines()[-1])["warning"]
        assert f"before the due date {due.isoformat()}" in warning and f"link issue {number} --ttl-days 61" in warning
        listed = {i["number"]: i for i in cli("invoice", "list", "--json").json()["invoices"]}
        assert "link_expires_before_due" in listed[number]["flags"]

        longer = cli("link", "issue", number, "--ttl-days", "61", "--json")
        assert longer.code == 0 and longer.err == ""  # covers the due date: no warning
        listed = {i["number"]: i for i in cli("invoice", "list", "--json").json()["invoices"]}
        assert "link_expires_before_due" not in listed[number]["flags"]
        plain = cli("invoice", "create", "--customer", email, "--amount", "5", "--currency", "eur", "--description", "d", "--send",
                    "--due", due.isoformat(), "--ttl-days", "61")  # fmt: skip
        assert plain.code == 0 and plain.err == ""


class TestTheCustomerSeesTheLines:
    """The customer's email lists each line, the tax per rate, the total, the issue and due dates and the notes, in their language."""

    def test_invoice_email_lists_lines_taxes_total_and_dates(
        self, cli: Any, localstripe: LocalStripe, smtp: SmtpServer, server: Any
    ) -> None:
        email = add_customer(cli, localstripe)
        due = date.today() + timedelta(days=14)
        created = create(cli, email, "--due", due.isoformat(), "--notes", "Bank transfer also welcome.", "--send")
        assert created.code == 0, created.err
        [mail] = smtp.mailbox.wait_for(1)
        text, html = text_part(mail), html_part(mail)
        for expected in (
            "Consulting",
            "3 × €400.00 = €1,200.00 (Tax 19%)",
            "Travel",
            "Handling fee",
            "2 × €12.25 = €24.50",
            f"Subtotal: €{SUBTOTAL / 100:,.2f}",
            "Tax 7%: €5.99",
            "Tax 19%: €228.00",
            "Total: €1,543.99",
            f"Issued: {format_day(date.today(), 'en')}",
            f"Due: {format_day(due, 'en')}",
            "Bank transfer also welcome.",
        ):
            assert expected in text, expected
        for expected in ("Consulting", "Tax 19%", "€228.00", "€1,543.99", "Bank transfer also welcome."):
            assert expected in html, expected
        assert "€1,543.99" in mail["Subject"]

    def test_in_german(self, cli: Any, localstripe: LocalStripe, smtp: SmtpServer, server: Any) -> None:
        email = add_customer(cli, localstripe, locale="de")
        assert create(cli, email, "--send").code == 0
        [mail] = smtp.mailbox.wait_for(1)
        text = text_part(mail)
        for expected in (
            "3 × 400,00\xa0€ = 1.200,00\xa0€ (MwSt. 19\xa0%)",
            "MwSt. 7\xa0%: 5,99\xa0€",
            "Zwischensumme",
            "Gesamtbetrag: 1.543,99\xa0€",
            "Ausgestellt am",
        ):
            assert expected in text, expected


IMPORT_HEADER = (
    "email,name,amount,currency,description,due_date,number,locale,notes,item_description,item_quantity,item_unit_amount,item_tax_percent\n"
)


def write_csv(tmp_path: Path, body: str, name: str = "items.csv") -> str:
    path = tmp_path / name
    path.write_text(IMPORT_HEADER + body, encoding="utf-8")
    return str(path)


class TestImportWithItems:
    """Finance imports invoices with line items from a spreadsheet: one row per line, rows sharing a number are one invoice."""

    def test_good_file(self, cli: Any, settings: Settings, tmp_path: Path) -> None:
        due = (date.today() + timedelta(days=10)).isoformat()
        path = write_csv(
            tmp_path,
            f"ann@example.com,Ann Lee,,eur,November,{due},L-1,en,Net 10 days,Consulting,3,400.00,19\n"
            f"ann@example.com,Ann Lee,,eur,November,{due},L-1,en,Net 10 days,Travel,1,85.50,7\n"
            f"ann@example.com,Ann Lee,,eur,November,{due},L-1,en,Net 10 days,Handling fee,2,12.25,\n"
            "bob@example.com,Bob,15.40,eur,Licence,,L-2,,,Licence,,14.00,10\n"  # quantity defaults to 1; amount given and right
            "cid@example.com,Cid,99.00,usd,Plain,,,,,,,,\n",  # the old kind of row: one untaxed line
        )
        result = cli("import", path, "--verified", "--json")
        assert result.code == 0, result.err
        report = result.json()
        assert (report["rows"], report["created_invoices"], report["bad_rows"]) == (5, 3, [])
        listed = {i["number"]: i for i in cli("invoice", "list", "--json").json()["invoices"]}
        assert listed["L-1"]["amount_due"] == TOTAL and listed["L-1"]["notes"] == "Net 10 days"
        assert listed["L-2"]["amount_due"] == 1540
        assert listed["INV-000001"]["amount_due"] == 9900 and listed["INV-000001"]["currency"] == "usd"
        shown = cli("invoice", "show", "L-1", "--json").json()
        assert [line["description"] for line in shown["lines"]] == ["Consulting", "Travel", "Handling fee"]
        assert [(t["rate"], t["amount"]) for t in shown["taxes"]] == [("7", TAX_7), ("19", TAX_19)]

        again = cli("import", path, "--json").json()
        assert (again["created_invoices"], again["already_imported"]) == (0, 3)
        assert db_query(settings.database_url, "SELECT count(*) FROM invoices") == [(3,)]

    def test_every_bad_kind_is_named_by_line_and_nothing_is_written(self, cli: Any, settings: Settings, tmp_path: Path) -> None:
        cli("invoice", "list")
        due = (date.today() + timedelta(days=10)).isoformat()
        past = (date.today() - timedelta(days=1)).isoformat()
        path = write_csv(
            tmp_path,
            "ok@example.com,Ok,,eur,Fine,,B-1,,,Fine,1,10.00,19\n"  # 2: good
            "a@example.com,A,,eur,x,,B-2,,,Thing,two,10.00,\n"  # 3: quantity not a number
            "a@example.com,A,,eur,x,,B-3,,,Thing,1,10.001,\n"  # 4: unit amount with too many decimals
            "a@example.com,A,,eur,x,,B-4,,,Thing,1,10.00,150\n"  # 5: tax above 100 %
            "a@example.com,A,,eur,x,,B-5,,,,1,10.00,19\n"  # 6: item columns without a description
            f"c@example.com,C,,eur,x,{due},B-6,,,One,1,10.00,\n"  # 7: first row of B-6 ...
            f"c@example.com,C,,eur,x,{past},B-6,,,Two,1,10.00,\n"  # 8: ... a due date in the past, and different from line 7
            "d@example.com,D,,eur,x,,B-7,,,One,1,10.00,\n"  # 9: first row of B-7 ...
            "e@example.com,D,,eur,x,,B-7,,,Two,1,10.00,\n"  # 10: ... another email on the same invoice
            "f@example.com,F,20.00,eur,x,,B-8,,,One,1,10.00,19\n"  # 11: amount is not the items' total (11.90)
            "g@example.com,G,,eur,x,,B-9,,,Tiny,1,0.20,\n"  # 12: below Stripe's minimum (EUR 0.50)
            "g@example.com,G,,eur,x,,B-9,,,Tiny too,1,0.20,\n"  # 13: ... the same invoice
            "h@example.com,H,,eur,x,,B-10,,,Good line,1,10.00,\n"  # 14: a good row ...
            "h@example.com,H,,eur,x,,B-10,,,Bad line,1,-5,\n"  # 15: ... of an invoice with a bad one
            f"i@example.com,I,10.00,eur,x,{past},B-11,,,,,,\n"  # 16: a plain row due in the past
            "ok@example.com,Ok,5.00,eur,Plain,,B-1,,,,,,\n",  # 17: a plain row reusing an itemised invoice's number
        )
        result = cli("import", path, "--json")
        assert result.code == 1
        lines = {b["line"]: b["reason"] for b in result.json()["bad_rows"]}
        assert sorted(lines) == list(range(2, 18)), lines
        assert "quantity 'two' is not a number" in lines[3]
        assert "more than 2 decimals" in lines[4]
        assert "between 0 and 100" in lines[5]
        assert "item_description is empty" in lines[6]
        assert "is in the past" in lines[8]
        assert "invoice B-6 has a bad row on line 8" in lines[7]
        assert "invoice B-7: email differ(s) from line 9" in lines[10] and "has a bad row on line 10" in lines[9]
        assert "amount €20.00 is not the total of its items, €11.90" in lines[11]
        assert "minimum charge of 0.50 EUR" in lines[12] and "minimum charge of 0.50 EUR" in lines[13]
        assert "must be greater than zero" in lines[15] and "invoice B-10 has a bad row on line 15" in lines[14]
        assert "is in the past" in lines[16]
        assert "invoice number B-1 is also on line 2" in lines[17] and "has a bad row on line 17" in lines[2]
        assert "nothing was imported" in result.err
        assert db_query(settings.database_url, "SELECT count(*) FROM invoices") == [(0,)]

    def test_skip_bad_never_imports_an_invoice_with_a_line_missing(self, cli: Any, settings: Settings, tmp_path: Path) -> None:
        path = write_csv(
            tmp_path,
            "h@example.com,H,,eur,x,,S-1,,,Good line,1,10.00,\n"
            "h@example.com,H,,eur,x,,S-1,,,Bad line,1,-5,\n"
            "j@example.com,J,,eur,y,,S-2,,,Fine,2,10.00,7\n",
        )
        result = cli("import", path, "--skip-bad", "--json")
        assert result.code == 0, result.err
        assert result.json()["created_invoices"] == 1
        assert db_query(settings.database_url, "SELECT number, amount_due FROM invoices") == [("S-2", 2140)]

    def test_send_says_why_emails_were_held_and_what_to_do(self, cli: Any, settings: Settings, tmp_path: Path) -> None:
        path = write_csv(tmp_path, "new@example.com,New,,eur,x,,H-1,,,Thing,1,10.00,19\n")
        result = cli("import", path, "--send")
        assert result.code == 0, result.err
        assert "1 emailed" not in result.out and "0 emailed, 1 held" in result.out
        assert "the address is not verified" in result.out
        assert "--verified" in result.out and "customer verify" in result.out
        as_json = cli("import", write_csv(tmp_path, "new2@example.com,New,,eur,x,,H-2,,,Thing,1,10.00,19\n", "two.csv"), "--send", "--json")
        assert as_json.json()["held_reasons"] == {"email address not verified": 1}
        assert any("--verified" in note for note in as_json.json()["notes"])
