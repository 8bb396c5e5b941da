"""What finance reads at the CLI is complete and legible: whole numbers and amounts on an 80-column
terminal, every payment of a part-paid invoice in the export, refunds in the invoice list."""

from __future__ import annotations

import csv
import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import httpx
import pytest

from tests.harness import CARD_OK, ROOT, LocalStripe
from tests.integration.helpers import another_invoice, invoice_status, issue_invoice, part_form, pay_all_form, post_event, unique_email
from tests.integration.test_part_payments import charge_of

pytestmark = pytest.mark.postgres

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def on_terminal(env: dict[str, str], columns: int, *args: str) -> str:
    """`python -m links …` on a terminal `columns` wide (a pseudo-terminal, as `stty cols` sets it, and
    COLUMNS as a shell exports it): what the clerk sees, colours left out."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "links", *args],
        cwd=ROOT,
        env={**os.environ, **env, "COLUMNS": str(columns)},
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=subprocess.PIPE,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the command has finished and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=60) == 0, process.stderr.read() if process.stderr else ""
    return ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")


@dataclass
class Desk:
    """A customer with a long address and three invoices: €1.00 open; €1,486.55 paid in two parts
    (€428.40, then €200.00), €100.00 of the second refunded; €12,345.67 open, never sent."""

    email: str
    part_paid: str
    large: str
    intents: list[str]  # the part-paid invoice's PaymentIntents, oldest first
    due: str


def desk(cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client) -> Desk:
    due = (date.today() + timedelta(days=30)).isoformat()
    issued = issue_invoice(cli, localstripe, CARD_OK, amount="1.00", email=unique_email("accounts.payable.northwind-traders-gmbh"))
    part_paid = another_invoice(cli, issued.email, "1486.55", "--allow-partial", "--due", due)
    large = another_invoice(cli, issued.email, "12345.67", "--due", due, send=False)
    html = browser_client.get(part_paid.url).text
    first = browser_client.post(part_paid.url, data=part_form(html, "428.40", issued.cards[0]))
    assert "You have paid €428.40 of €1,486.55." in first.text
    second = browser_client.post(part_paid.url, data=part_form(first.text, "200.00", issued.cards[0]))
    assert second.status_code == 200, second.text
    intents = [p["payment_intent"] for p in invoice_status(cli, part_paid.number)["payments"] if p["status"] == "succeeded"]
    assert len(intents) == 2
    localstripe.client.v1.refunds.create({"payment_intent": intents[1], "amount": 10000})
    assert post_event(server, "charge.refunded", charge_of(localstripe, intents[1])).status_code == 200
    assert invoice_status(cli, part_paid.number)["amount_refunded"] == 10000
    return Desk(issued.email, part_paid.number, large.number, intents, due)


class TestListOnATerminal:
    """A clerk on an 80-column terminal reads every invoice number, amount and due date whole."""

    def test_numbers_amounts_and_dates_are_never_cut(
        self, cli: Any, env: dict[str, str], localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        d = desk(cli, localstripe, server, browser_client)
        numbers = [i["number"] for i in cli("invoice", "list", "--json").json()["invoices"]]
        for columns in (80, 100):
            shown = on_terminal(env, columns, "invoice", "list")
            assert max(len(line) for line in shown.splitlines()) <= columns
            assert "…" not in shown, shown  # rich's mark of a cut value
            for number in numbers:
                assert number in shown, (columns, number, shown)
            for figure in ("€1,486.55", "€12,345.67", "€1.00", "€628.40", "€100.00", d.due):
                assert figure in shown, (columns, figure, shown)
            words = shown.split()
            assert "partially_paid" in words and "Refunded" in words
            for total in ("€13,833.22", "€528.40", "€13,204.82"):  # due, net paid and outstanding, per currency
                assert total in words, (columns, total, shown)

        shown = on_terminal(env, 80, "invoice", "list", "--status", "open")
        assert "…" not in shown and d.large in shown and "€12,345.67" in shown


class TestExportListsEveryPayment:
    """A clerk matching Stripe payouts finds every PaymentIntent of a part-paid invoice in the export."""

    def test_both_parts_with_receipts_and_amounts(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        d = desk(cli, localstripe, server, browser_client)
        receipts = [p["receipt_number"] for p in invoice_status(cli, d.part_paid)["payments"] if p["status"] == "succeeded"]
        assert all(receipts) and len(set(receipts)) == 2

        as_json = {row["number"]: row for row in cli("export", "--format", "json").json()}
        row = as_json[d.part_paid]
        assert (row["payment_intents"], row["receipt_numbers"], row["payment_amounts"]) == (d.intents, receipts, [42840, 20000])
        assert (row["stripe_payment_intent"], row["payments"], row["amount_refunded"]) == (d.intents[1], 2, 10000)  # as before
        assert as_json[d.large]["payment_intents"] == [] and as_json[d.large]["payments"] == 0

        exported = cli("export", "--format", "csv")
        assert exported.code == 0, exported.err
        rows = {r["number"]: r for r in csv.DictReader(io.StringIO(exported.out))}
        assert rows[d.part_paid]["payment_intents"] == f"{d.intents[0]}; {d.intents[1]}"
        assert rows[d.part_paid]["receipt_numbers"] == f"{receipts[0]}; {receipts[1]}"
        assert rows[d.part_paid]["payment_amounts"] == "42840; 20000"
        assert rows[d.large]["payment_intents"] == "" and rows[d.large]["stripe_payment_intent"] == ""

    def test_a_part_then_pay_all(self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client) -> None:
        """A deposit on one invoice, then one charge for everything open: the invoice lists both, with its share."""
        issued = issue_invoice(cli, localstripe, CARD_OK, amount="200.00")
        partial = another_invoice(cli, issued.email, "1000.00", "--allow-partial")
        html = browser_client.get(partial.url).text
        deposit = browser_client.post(partial.url, data=part_form(html, "300.00", issued.cards[0]))
        assert deposit.status_code == 200, deposit.text
        everything = browser_client.post(partial.url, data=pay_all_form(browser_client.get(partial.url).text, issued.cards[0]))
        assert "Payment received" in everything.text
        [part, together] = [p for p in invoice_status(cli, partial.number)["payments"] if p["status"] == "succeeded"]
        assert together["scope"] == "all" and together["amount"] == 90000

        exported = {row["number"]: row for row in cli("export", "--format", "json").json()}
        mine = exported[partial.number]
        assert mine["payment_intents"] == [part["payment_intent"], together["payment_intent"]]
        assert mine["receipt_numbers"] == [part["receipt_number"], together["receipt_number"]]
        assert mine["payment_amounts"] == [30000, 70000]  # the pay-all charge: this invoice's share
        assert mine["stripe_payment_intent"] == together["payment_intent"] and mine["payments"] == 2
        other = exported[issued.number]
        assert (other["payment_intents"], other["payment_amounts"]) == ([together["payment_intent"]], [20000])


class TestRefundsInTheList:
    """After a refund the list says what was paid back, and the totals what was kept."""

    def test_refunded_per_invoice_and_per_currency(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        d = desk(cli, localstripe, server, browser_client)
        listed = cli("invoice", "list", "--json").json()
        row = next(i for i in listed["invoices"] if i["number"] == d.part_paid)
        assert (row["amount_paid"], row["amount_refunded"], row["status"]) == (62840, 10000, "partially_paid")
        eur = listed["totals"]["eur"]
        assert (eur["paid"], eur["refunded"], eur["net_paid"]) == (62840, 10000, 52840)
        assert (eur["formatted"]["refunded"], eur["formatted"]["net_paid"]) == ("€100.00", "€528.40")

        human = cli("invoice", "list")  # piped: one line per invoice
        line = next(x for x in human.out.splitlines() if d.part_paid in x)
        assert " ".join(line.replace("│", " ").split()).startswith(f"{d.part_paid} {d.email} €1,486.55 €628.40 €100.00 partially_paid")
        totals = " ".join(re.sub("[│┃]", " ", human.out).split())
        assert "Due Paid Refunded Net paid Outstanding Overdue" in totals
        assert "EUR 3 €13,833.22 €628.40 €100.00 €528.40 €13,204.82 €0.00" in totals
