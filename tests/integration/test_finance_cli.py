"""The finance desk: real commands on a real database file, as staff would type them."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from links.customers import find_customer
from links.invoices import create_invoice
from plumbing.i18n import format_day
from plumbing.settings import ConfigError, Settings
from services import open_services
from tests.harness import (
    CARD_3DS,
    CARD_OK,
    ROOT,
    LocalStripe,
    SmtpServer,
    db_execute,
    db_query,
    html_part,
    in_thread,
    signed_event,
    text_part,
    wait_until,
)
from tests.integration.helpers import csrf_of, issue_invoice, unique_email

pytestmark = pytest.mark.postgres

HEADER = "email,name,amount,currency,description,due_date,number,locale\n"


def write_csv(tmp_path: Path, body: str, name: str = "invoices.csv") -> str:
    path = tmp_path / name
    path.write_text(HEADER + body, encoding="utf-8")
    return str(path)


class TestImport:
    """Bulk import: every row checked first; all or nothing; the same file twice creates nothing twice."""

    def test_sample_file_imports_and_queues_emails(self, cli, settings: Settings) -> None:
        result = cli("import", str(ROOT / "samples" / "invoices.csv"), "--send", "--verified", "--json")
        assert result.code == 0, result.err
        report = result.json()
        assert (report["created_invoices"], report["created_customers"], report["emailed"], report["bad_rows"]) == (4, 4, 4, [])
        listed = {i["number"]: i for i in cli("invoice", "list", "--json").json()["invoices"]}
        assert listed["INV-2026-0003"]["amount_due"] == 1500 and listed["INV-2026-0003"]["currency"] == "jpy"
        sequenced = [n for n in listed if not n.startswith("INV-2026-")]
        assert sequenced == ["INV-000001"]  # the row without a number: the next of the invoice sequence
        assert db_query(settings.database_url, "SELECT count(*) FROM outbox WHERE kind = 'invoice'") == [(4,)]
        audit = cli("audit", "--json").json()["entries"]
        assert any(e["action"] == "import" and e["details"]["created"] == 4 for e in audit)

    def test_every_bad_row_is_reported_by_line_and_nothing_is_written(self, cli, settings: Settings, tmp_path: Path) -> None:
        cli("invoice", "list")  # the database exists and is empty
        path = write_csv(
            tmp_path,
            "ok@example.com,Ok,10.00,eur,Fine,,A-1,\n"  # line 2: good
            "not-an-email,Bad,10,eur,x,,A-2,\n"  # 3
            "b@example.com,B,0,eur,x,,A-3,\n"  # 4
            "c@example.com,C,10.999,eur,x,,A-4,\n"  # 5
            "d@example.com,D,10,xyz,x,,A-5,\n"  # 6
            "e@example.com,E,10,eur,x,31/12/2026,A-6,\n"  # 7
            "f@example.com,F,10,eur,x,,A-1,\n"  # 8: duplicate number in the file
            "g@example.com,G,10.5,jpy,x,,A-7,\n"  # 9: JPY has no decimals
            "h@example.com,,10,eur,x,,A-8,\n"  # 10: no name
            "i@example.com,I,10,eur,x,,A-9,klingon\n",  # 11: unknown language
        )
        result = cli("import", path, "--json")
        assert result.code == 1
        lines = {b["line"]: b["reason"] for b in result.json()["bad_rows"]}
        assert sorted(lines) == [3, 4, 5, 6, 7, 8, 9, 10, 11]
        assert "not valid" in lines[3]
        assert "greater than zero" in lines[4]
        assert "more than 2 decimals" in lines[5]
        assert "unknown currency" in lines[6]
        assert "not a date" in lines[7]
        assert "also on line 2" in lines[8]
        assert "more than 0 decimals for JPY" in lines[9]
        assert "name is empty" in lines[10]
        assert "locale" in lines[11]
        assert f"{path}:3:" in result.err  # one line per bad row on stderr, like a compiler
        assert "nothing was imported" in result.err
        assert db_query(settings.database_url, "SELECT count(*) FROM invoices") == [(0,)]
        assert db_query(settings.database_url, "SELECT count(*) FROM customers") == [(0,)]

        skipped = cli("import", path, "--skip-bad", "--json")
        assert skipped.code == 0, skipped.err
        assert skipped.json()["created_invoices"] == 1

    def test_reimport_is_idempotent_and_customers_match_case_insensitively(self, cli, settings: Settings, tmp_path: Path) -> None:
        cli("customer", "add", "--email", "Ann@Example.com", "--name", "Ann Lee", "--stripe-customer", "cus_existing1", "--verified")
        path = write_csv(tmp_path, "ANN@example.com,Ann Lee,12.00,eur,First,,,\nann@EXAMPLE.com,Ann Lee,13.00,eur,Second,,B-2,\n")
        first = cli("import", path, "--json").json()
        assert (first["created_invoices"], first["created_customers"]) == (2, 0)
        second = cli("import", path, "--json").json()
        assert (second["created_invoices"], second["already_imported"]) == (0, 2)
        assert db_query(settings.database_url, "SELECT count(*) FROM invoices") == [(2,)]
        assert db_query(settings.database_url, "SELECT count(*) FROM customers") == [(1,)]

    def test_number_used_by_another_invoice_is_a_bad_row(self, cli, tmp_path: Path) -> None:
        cli("customer", "add", "--email", "x@example.com", "--name", "X", "--stripe-customer", "cus_x1", "--verified")
        cli(
            "invoice",
            "create",
            "--customer",
            "x@example.com",
            "--amount",
            "5",
            "--currency",
            "eur",
            "--description",
            "d",
            "--number",
            "C-1",
        )
        result = cli("import", write_csv(tmp_path, "y@example.com,Y,9,eur,d,,C-1,\n"), "--json")
        assert result.code == 1
        assert result.json()["bad_rows"] == [{"line": 2, "reason": "invoice number C-1 is already used by a different invoice"}]

    def test_new_customers_are_unverified_and_get_a_confirmation_email(self, cli, settings: Settings, tmp_path: Path) -> None:
        result = cli("import", write_csv(tmp_path, "new@example.com,New,9,eur,d,,D-1,\n"), "--send", "--json").json()
        assert (result["emailed"], result["held"]) == (0, 1)
        assert cli("customer", "show", "new@example.com", "--json").json()["verified"] is False
        kinds = db_query(settings.database_url, "SELECT kind FROM outbox")
        assert kinds == [("verification",)]

    def test_unreadable_files_are_one_line_errors(self, cli, tmp_path: Path) -> None:
        missing = cli("import", str(tmp_path / "nope.csv"))
        assert missing.code == 1 and missing.err.startswith("error: cannot read") and "Traceback" not in missing.err
        (tmp_path / "bad.csv").write_text("foo,bar\n1,2\n")
        wrong = cli("import", str(tmp_path / "bad.csv"))
        assert wrong.code == 1 and "lacks the column(s): email" in wrong.err


class TestExportAndReports:
    """Exports for accounting, usage for payday planning, aging for collections."""

    def test_export_csv_and_json(self, cli) -> None:
        cli("import", str(ROOT / "samples" / "invoices.csv"), "--verified", "--send")
        exported = cli("export", "--format", "csv")
        assert exported.code == 0, exported.err
        rows = list(csv.DictReader(io.StringIO(exported.out)))
        assert len(rows) == 4
        ann = next(r for r in rows if r["number"] == "INV-2026-0001")
        assert (ann["amount_due"], ann["amount_due_formatted"], ann["status"], ann["currency"]) == ("12050", "€120.50", "open", "eur")
        assert ann["link_sent_at"]
        as_json = json.loads(cli("export", "--format", "json", "--since", "2000-01-01").out)
        assert {r["number"] for r in as_json} == {r["number"] for r in rows}
        assert json.loads(cli("export", "--format", "json", "--since", "2999-01-01").out) == []

    def test_usage_report_names_the_peak_hour(self, cli, settings: Settings) -> None:
        cli("import", str(ROOT / "samples" / "invoices.csv"), "--verified", "--send")
        [(link_id,)] = db_query(settings.database_url, "SELECT id FROM payment_links LIMIT 1")
        from datetime import UTC, datetime

        from tests.harness import db_execute

        # A row of the access log counts a link's opens in a minute (links/opens.py).
        for hour, opens in ((9, 1), (9, 1), (9, 40), (14, 7)):
            at = datetime.now(UTC).replace(hour=hour, minute=5, second=0, microsecond=0)
            insert = "INSERT INTO link_opens (link_id, opened_at, opens) VALUES (:l, :at, :n)"
            db_execute(settings.database_url, insert, l=link_id, at=at, n=opens)
        report = cli("report", "usage", "--days", "2", "--json").json()
        assert report["peak_hour_utc"] == 9
        assert report["by_hour_utc"]["opens"][9] == 42 and report["by_hour_utc"]["opens"][14] == 7
        human = cli("report", "usage", "--days", "2")
        assert "Peak hour for link opens: 09:00-09:59 UTC (42 opens)" in human.out
        assert "█" in human.out

    def test_aging(self, cli, settings: Settings) -> None:
        cli("customer", "add", "--email", "old@example.com", "--name", "Old", "--stripe-customer", "cus_old1", "--verified")
        created = cli(
            "invoice",
            "create",
            "--customer",
            "old@example.com",
            "--amount",
            "100",
            "--currency",
            "eur",
            "--description",
            "a",
            "--due",
            date.today().isoformat(),  # an invoice is never created overdue: time passes instead
            "--json",
        )
        number = created.json()["number"]
        db_execute(settings.database_url, "UPDATE invoices SET due_date = :d WHERE number = :n", d=date(2020, 1, 1), n=number)
        cli(
            "invoice",
            "create",
            "--customer",
            "old@example.com",
            "--amount",
            "50",
            "--currency",
            "eur",
            "--description",
            "b",
            "--due",
            "2099-01-01",
        )
        report = cli("report", "aging", "--json").json()
        assert report["over 90 days"]["eur"] == {"count": 1, "total": 10000, "total_formatted": "€100.00"}
        assert report["not yet due"]["eur"]["count"] == 1


class TestCommandLine:
    """Exit codes, --json everywhere, help with examples, quiet when piped."""

    def test_exit_codes(self, cli) -> None:
        assert cli("invoice", "show", "NOPE").code == 1
        assert cli("invoice", "show", "NOPE").err.strip() == "error: no invoice numbered NOPE"
        assert cli("invoice", "frobnicate").code == 2
        assert cli("customer", "add", "--email", "bad", "--name", "x", "--stripe-customer", "cus_1").code == 1
        assert cli("invoice", "create", "--customer", "x@example.com", "--amount", "1", "--currency", "eur", "--description", "d",
                   "--due", "tomorrow").code == 2  # fmt: skip

    def test_help_has_examples(self, cli) -> None:
        for command in (["import"], ["invoice", "create"], ["report", "usage"], ["link", "revoke"]):
            shown = cli(*command, "--help")
            assert shown.code == 0
            assert "example:" in shown.out and "python -m links" in shown.out

    def test_missing_configuration_is_one_line(self, tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LINK_", "STRIPE_"))}
        run = subprocess.run([sys.executable, "-m", "links", "invoice", "list"], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert run.returncode == 1
        assert run.stderr.strip().splitlines() == ["configuration error: Config 'LINK_SECRET_KEYS' is missing, and has no default."]

    def test_piped_import_shows_no_progress_bar(self, env: dict[str, str], settings: Settings, tmp_path: Path) -> None:
        path = write_csv(tmp_path, "".join(f"p{i}@example.com,P,{i + 1},eur,d,,P-{i},\n" for i in range(300)))
        run = subprocess.run([sys.executable, "-m", "links", "import", path], cwd=ROOT, env={**os.environ, **env},
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stderr == ""
        assert "\x1b[" not in run.stdout and "━" not in run.stdout
        assert "Imported 300 invoice(s)" in run.stdout


class TestBadInputIsOneLine:
    """Whatever staff type, the answer is one clear line and exit code 1, never a traceback."""

    def test_absurd_amounts_and_numbers(self, cli) -> None:
        cli("customer", "add", "--email", "z@example.com", "--name", "Z", "--stripe-customer", "cus_z1", "--verified")
        for amount in ("1e30", "NaN", "-5", "12,50"):
            result = cli("invoice", "create", "--customer", "z@example.com", "--amount", amount, "--currency", "eur", "--description", "d")
            assert result.code == 1, amount
            assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
        bad_number = cli("invoice", "create", "--customer", "z@example.com", "--amount", "5", "--currency", "eur", "--description", "d",
                         "--number", "A\nB")  # fmt: skip
        assert bad_number.code == 1 and "line breaks" in bad_number.err

    def test_multiline_cells_report_the_right_line(self, cli, tmp_path: Path) -> None:
        path = write_csv(tmp_path, 'a@example.com,A,5,eur,"two\nlines",,M-1,\nb@example.com,B,0,eur,d,,M-2,\n')
        result = cli("import", path, "--json")
        assert result.json()["bad_rows"] == [{"line": 4, "reason": "amount '0' must be greater than zero"}]

    def test_unmigrated_database_is_one_line(self, env: dict[str, str], tmp_path: Path) -> None:
        fresh = {**os.environ, **env, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"}
        run = subprocess.run(
            [sys.executable, "-m", "links", "invoice", "list"], cwd=ROOT, env=fresh, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 1
        assert run.stderr.strip().splitlines() == [
            "error: database: no such table: invoices (is the schema up to date? run `python -m links migrate`)"
        ]


def add_customer_with_invoice(cli, email: str, number: str) -> None:
    assert cli("customer", "add", "--email", email, "--name", "Gil", "--stripe-customer", f"cus_{number.lower()}", "--verified").code == 0
    created = cli(
        "invoice", "create", "--customer", email, "--amount", "9.50", "--currency", "eur", "--description", "d", "--number", number
    )
    assert created.code == 0, created.err


class TestGlobalOptions:
    """Staff type --json and --actor before or after the command; both are honoured, and the audit log names who acted."""

    def test_json_anywhere_on_the_line(self, cli) -> None:
        add_customer_with_invoice(cli, "gil@example.com", "G-1")
        for line in (
            ("--json", "invoice", "list"),
            ("invoice", "--json", "list"),
            ("invoice", "list", "--json"),
            ("--json", "invoice", "list", "--status", "open"),
        ):
            result = cli(*line)
            assert result.code == 0, (line, result.err)
            assert [i["number"] for i in result.json()["invoices"]] == ["G-1"], line
        assert "G-1" in cli("invoice", "list").out and not cli("invoice", "list").out.lstrip().startswith("{")

    def test_actor_before_the_command_is_recorded(self, cli) -> None:
        add_customer_with_invoice(cli, "gil@example.com", "G-2")
        assert cli("--actor", "jane", "invoice", "void", "G-2").code == 0
        assert cli("--actor", "max", "--json", "link", "revoke", "G-2").json()["revoked"] == 0
        assert cli("outbox", "retry", "--actor", "ola").code == 0
        entries = cli("--json", "audit").json()["entries"]
        actors = {e["action"]: e["actor"] for e in entries}
        assert actors["invoice.void"] == "cli:jane"
        assert actors["link.revoke"] == "cli:max"
        assert actors["outbox.retry"] == "cli:ola"
        assert actors["invoice.create"].startswith("cli:") and actors["invoice.create"] != "cli:jane"  # the OS user by default


class TestJsonErrors:
    """A script that asks for --json gets its errors as JSON on stderr too, with the same exit codes."""

    def test_user_errors(self, cli) -> None:
        for line in (("--json", "invoice", "show", "NOPE"), ("invoice", "show", "NOPE", "--json")):
            result = cli(*line)
            assert result.code == 1
            assert result.out == ""
            assert json.loads(result.err) == {"error": "no invoice numbered NOPE", "kind": "user"}
        assert cli("invoice", "show", "NOPE").err.strip() == "error: no invoice numbered NOPE"  # people still read one line

    def test_usage_errors(self, cli) -> None:
        result = cli("--json", "invoice", "frobnicate")
        assert result.code == 2
        error = json.loads(result.err)
        assert error["kind"] == "usage" and "frobnicate" in error["error"] and error["usage"].startswith("usage: python -m links invoice")
        plain = cli("invoice", "frobnicate")
        assert plain.code == 2 and plain.err.startswith("usage: python -m links invoice") and "error: argument ACTION" in plain.err

    def test_bad_import_rows_are_json_lines(self, cli, tmp_path: Path) -> None:
        path = write_csv(tmp_path, "a@example.com,A,0,eur,d,,J-1,\nnot-an-email,B,5,eur,d,,J-2,\n")
        result = cli("--json", "import", path)
        assert result.code == 1
        lines = [json.loads(line) for line in result.err.splitlines()]
        assert [(e.get("line"), e["error"].startswith(f"{path}:")) for e in lines[:2]] == [(2, True), (3, True)]
        assert lines[2]["kind"] == "user" and "nothing was imported" in lines[2]["error"]
        assert result.json()["bad_rows"][0] == {"line": 2, "reason": "amount '0' must be greater than zero"}

    def test_configuration_and_database_errors(self, cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'never-migrated.db'}")
        database = cli("--json", "invoice", "list")
        assert database.code == 1
        assert json.loads(database.err) == {
            "error": "no such table: invoices",
            "kind": "database",
            "hint": "is the schema up to date? run `python -m links migrate`",
        }
        monkeypatch.delenv("LINK_SECRET_KEYS")
        config = cli("invoice", "list", "--json")
        assert config.code == 1
        assert json.loads(config.err) == {"error": "Config 'LINK_SECRET_KEYS' is missing, and has no default.", "kind": "configuration"}


class TestDuplicateNumbers:
    """Two people create the same invoice number at the same moment: the second is told the number is taken."""

    def test_number_taken_while_we_were_creating(self, cli, settings: Settings, backend: str) -> None:
        add_customer_with_invoice(cli, "gil@example.com", "G-3")
        command = ("invoice", "create", "--customer", "gil@example.com", "--amount", "5", "--currency", "eur", "--description", "d")

        async def race() -> object:
            async with open_services(settings) as services:
                async with services.sessions.begin() as session:  # the first create, not yet committed
                    customer = await find_customer(session, "gil@example.com")
                    await create_invoice(
                        session, customer=customer, amount="5", currency="eur", description="first", actor="t", number="R-1"
                    )
                    second = asyncio.create_task(asyncio.to_thread(cli, *command, "--number", "R-1"))
                    await until_blocked(services, backend)
                return await second

        result = in_thread(asyncio.run, race())
        assert result.code == 1
        assert result.err.strip() == "error: invoice number R-1 is already used"  # not "is the schema up to date?"
        assert db_query(settings.database_url, "SELECT description FROM invoices WHERE number = 'R-1'") == [("first",)]


async def until_blocked(services, backend: str) -> None:
    """Wait until another connection waits for our transaction (PostgreSQL: on the unique index;
    SQLite: for the write lock, which cannot be observed, so give it a moment)."""
    if backend == "sqlite":
        await asyncio.sleep(1.5)
        return
    query = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with services.readers() as session:
            if (await session.execute(query)).scalar_one():
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the second create never waited for the first")


# --- issue 12: the finance desk, customers, reminders on a schedule, void with a reason -------------------


def days_from_today(days: int) -> date:
    return date.today() + timedelta(days=days)


def set_due(settings: Settings, number: str, due: date) -> None:
    """Time passes: the invoice's due date moves (an invoice is never created overdue)."""
    db_execute(settings.database_url, "UPDATE invoices SET due_date = :d WHERE number = :n", d=due, n=number)


def create_plain(cli, email: str, amount: str = "10", currency: str = "eur", *args: str) -> str:
    created = cli(
        "invoice", "create", "--customer", email, "--amount", amount, "--currency", currency, "--description", "d", *args, "--json"
    )
    assert created.code == 0, created.err
    return str(created.json()["number"])


class TestFinanceDesk:
    """Finance opens `invoice list` and sees what needs doing, derived from what happened, with totals per currency."""

    def test_flags(self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, browser_client: httpx.Client, settings: Settings) -> None:
        # Email undeliverable: the mail server refuses the address for good (a real 550 over SMTP).
        smtp.mailbox.rcpt_replies.append("550 5.1.1 no such user")
        bounced = issue_invoice(cli, localstripe, CARD_OK)
        wait_until(lambda: "email_undeliverable" in flags_of(cli, bounced.number), what="the bounce to flag the invoice")

        overdue = issue_invoice(cli, localstripe, CARD_OK)
        set_due(settings, overdue.number, days_from_today(-5))

        held_email = unique_email("held")
        assert cli("customer", "add", "--email", held_email, "--name", "Hel D", "--stripe-customer", "cus_held1").code == 0
        held = create_plain(cli, held_email, "10", "eur", "--send")

        quiet_email = unique_email("quiet")
        assert cli("customer", "add", "--email", quiet_email, "--name", "Qui Et", "--stripe-customer", "cus_quiet1", "--verified").code == 0
        not_sent = create_plain(cli, quiet_email)

        # Stuck in 3-D Secure: the customer started paying and never came back from their bank.
        stuck = issue_invoice(cli, localstripe, CARD_3DS)
        html = browser_client.get(stuck.url).text
        assert (
            "Confirm with your bank" in browser_client.post(stuck.url, data={"csrf": csrf_of(html), "payment_method": stuck.cards[0]}).text
        )
        assert "3ds_stuck" not in flags_of(cli, stuck.number)  # a customer at their bank right now is not stuck
        db_execute(settings.database_url, "UPDATE payments SET updated_at = :t", t=datetime.now(UTC) - timedelta(minutes=20))

        # Disputed: a real signed dispute event for a paid invoice.
        disputed = issue_invoice(cli, localstripe, CARD_OK)
        html = browser_client.get(disputed.url).text
        browser_client.post(disputed.url, data={"csrf": csrf_of(html), "payment_method": disputed.cards[0]})
        [intent] = localstripe.payment_intents_for(disputed.stripe_customer)
        dispute = {
            "id": "dp_desk",
            "object": "dispute",
            "amount": 12050,
            "currency": "eur",
            "reason": "fraudulent",
            "payment_intent": intent.id,
        }
        payload, header = signed_event(
            {
                "id": "evt_desk_dispute",
                "object": "event",
                "type": "charge.dispute.created",
                "created": int(time.time()),
                "data": {"object": dispute},
            }
        )
        assert (
            httpx.post(f"{server.base}/webhooks/stripe", content=payload, headers={"stripe-signature": header}, timeout=30).status_code
            == 200
        )

        # Over- and underpaid: the amounts say so.
        over, under = create_plain(cli, quiet_email), create_plain(cli, quiet_email)
        db_execute(settings.database_url, "UPDATE invoices SET amount_paid = 1500 WHERE number = :n", n=over)
        db_execute(settings.database_url, "UPDATE invoices SET amount_paid = 400 WHERE number = :n", n=under)

        flags = {i["number"]: i["flags"] for i in cli("invoice", "list", "--json").json()["invoices"]}
        assert "email_undeliverable" in flags[bounced.number]
        assert flags[overdue.number] == ["overdue"]
        assert flags[held] == ["held"]
        assert flags[not_sent] == ["not_sent"]
        assert flags[stuck.number] == ["3ds_stuck"]
        assert flags[disputed.number] == ["disputed"]
        assert "overpaid" in flags[over] and "underpaid" in flags[under]
        human = cli("invoice", "list")
        for label in ("overdue 5d", "held: address not verified", "stuck in 3-D Secure", "email undeliverable", "disputed", "overpaid"):
            assert label in " ".join(human.out.split()), label
        shown = cli("invoice", "show", stuck.number)
        assert "waiting for the customer's 3-D Secure" in " ".join(shown.out.split())
        assert stuck.url.rsplit("/", 1)[1] not in shown.out + cli("invoice", "show", stuck.number, "--json").out  # never the token

    def test_filters_and_totals_per_currency(self, cli, settings: Settings) -> None:
        for email, cus in (("ann@example.com", "cus_ann1"), ("bob@example.com", "cus_bob1")):
            assert cli("customer", "add", "--email", email, "--name", "X", "--stripe-customer", cus, "--verified").code == 0
        late = create_plain(cli, "ann@example.com", "100.00", "eur", "--due", date.today().isoformat())
        set_due(settings, late, days_from_today(-3))
        create_plain(cli, "ann@example.com", "50.00", "eur", "--due", days_from_today(10).isoformat())
        old = create_plain(cli, "bob@example.com", "20.00", "usd")
        void = create_plain(cli, "bob@example.com", "7.00", "eur")
        assert cli("invoice", "void", void, "--reason", "typo").code == 0
        db_execute(
            settings.database_url, "UPDATE invoices SET created_at = :t WHERE number = :n", t=datetime(2026, 1, 5, tzinfo=UTC), n=old
        )

        everything = cli("invoice", "list", "--json").json()
        assert everything["totals"]["eur"] == {
            "invoices": 3, "due": 15000, "paid": 0, "outstanding": 15000, "overdue": 10000,
            "formatted": {"due": "€150.00", "paid": "€0.00", "outstanding": "€150.00", "overdue": "€100.00"},
        }  # fmt: skip
        assert everything["totals"]["usd"]["outstanding"] == 2000
        numbers = lambda *args: [i["number"] for i in cli("invoice", "list", *args, "--json").json()["invoices"]]  # noqa: E731
        assert numbers("--customer", "ANN@example.com") == [late, numbers("--customer", "ann@example.com")[1]]
        assert numbers("--overdue") == [late]
        assert old not in numbers("--since", "2026-02-01") and old in numbers("--since", "2026-01-01")
        assert numbers("--customer", "bob@example.com", "--status", "void") == [void]
        assert cli("invoice", "list", "--customer", "nobody@example.com").err.strip() == "error: no customer with email nobody@example.com"
        human = " ".join(cli("invoice", "list").out.replace("│", " ").split())
        assert "Totals per currency" in human and "EUR 3 €150.00 €0.00 €150.00 €100.00" in human and "USD 1 $20.00" in human


class TestCustomers:
    """Finance finds a customer by part of a name or address, and sees the billing address on file."""

    def test_list_search_and_show_address(self, cli) -> None:
        assert cli("customer", "add", "--email", "ann@example.com", "--name", "Ann Lee", "--stripe-customer", "cus_a1", "--verified",
                   "--address-line1", "Hauptstr. 1", "--postal-code", "10115", "--city", "Berlin", "--country", "DE").code == 0  # fmt: skip
        assert cli("customer", "add", "--email", "bob@example.org", "--name", "Bob Ray", "--stripe-customer", "cus_b1").code == 0
        create_plain(cli, "ann@example.com")
        listed = cli("customer", "list", "--json").json()["customers"]
        assert [(c["email"], c["verified"], c["invoices"], c["open_invoices"]) for c in listed] == [
            ("ann@example.com", True, 1, 1),
            ("bob@example.org", False, 0, 0),
        ]
        assert [c["email"] for c in cli("customer", "list", "--search", "LEE", "--json").json()["customers"]] == ["ann@example.com"]
        assert [c["email"] for c in cli("customer", "list", "--search", "example.org", "--json").json()["customers"]] == ["bob@example.org"]
        assert cli("customer", "list", "--search", "100%", "--json").json()["customers"] == []  # % is a character, not a wildcard
        shown = cli("customer", "show", "ann@example.com")
        assert "Hauptstr. 1, 10115 Berlin, DE" in shown.out
        assert "2 customer(s)." in cli("customer", "list").out


class TestReminderSchedule:
    """Customers are reminded at the points finance chose, each once, never before they had the invoice, told when it is overdue."""

    def test_never_the_first_contact(self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, settings: Settings) -> None:
        email = unique_email("first")
        cus_id, _ = localstripe.customer_with_cards(email, "Fir St", CARD_OK)
        assert cli("customer", "add", "--email", email, "--name", "Fir St", "--stripe-customer", cus_id, "--verified").code == 0
        number = create_plain(cli, email, "10", "eur", "--due", days_from_today(1).isoformat())  # never sent
        sent = cli("remind", "--json").json()["sent"]
        assert [(s["invoice"], s["point"], s["kind"]) for s in sent] == [(number, "due-3d", "invoice")]
        [mail] = smtp.mailbox.wait_for(1)
        assert mail["Subject"].startswith(f"Invoice {number}") and "/pay/" in text_part(mail)
        assert cli("remind", "--json").json()["sent"] == []
        set_due(settings, number, date.today())
        assert [(s["point"], s["kind"]) for s in cli("remind", "--json").json()["sent"]] == [("due+0d", "reminder")]  # now it was sent

    def test_each_point_once_and_overdue_wording(self, cli, localstripe: LocalStripe, smtp: SmtpServer, server, settings: Settings) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        smtp.mailbox.wait_for(1)
        set_due(settings, issued.number, days_from_today(10))
        assert cli("remind", "--json").json()["sent"] == []  # REMINDER_SCHEDULE -3,0,7,14: nothing yet
        due = days_from_today(-8)
        set_due(settings, issued.number, due)  # the worker was stopped: -3, 0 and 7 all passed; only 7 is sent
        result = cli("remind", "--json").json()
        assert result["schedule"] == [-3, 0, 7, 14]
        assert [(s["invoice"], s["point"], s["kind"]) for s in result["sent"]] == [(issued.number, "due+7d", "reminder")]
        assert cli("remind", "--json").json()["sent"] == []
        reminder = smtp.mailbox.wait_for(2)[1]
        assert reminder["Subject"].startswith(f"Overdue: invoice {issued.number}")
        assert f"overdue since {format_day(due, 'en')}" in text_part(reminder)
        set_due(settings, issued.number, days_from_today(-15))
        assert [s["point"] for s in cli("remind", "--json").json()["sent"]] == ["due+14d"]
        assert [s["point"] for s in cli("remind", "--json").json()["sent"]] == []
        assert db_query(settings.database_url, "SELECT count(*) FROM reminders_sent") == [(2,)]

    def test_schedule_from_the_environment_and_the_command_line(
        self, cli, localstripe: LocalStripe, server, settings: Settings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        set_due(settings, issued.number, days_from_today(10))
        assert [s["point"] for s in cli("remind", "--schedule=-20,5", "--json").json()["sent"]] == ["due-20d"]
        monkeypatch.setenv("REMINDER_SCHEDULE", "-12")
        assert [s["point"] for s in cli("remind", "--json").json()["sent"]] == ["due-12d"]
        assert cli("remind", "--days-before-due", "11", "--json").json()["sent"][0]["point"] == "due-11d"
        monkeypatch.setenv("REMINDER_SCHEDULE", "soon")
        bad = cli("remind")
        assert bad.code == 1
        assert (
            bad.err.strip()
            == "configuration error: REMINDER_SCHEDULE must list whole days relative to the due date, not 'soon'; e.g. -3,0,7,14"
        )
        assert cli("remind", "--schedule=1,1").code == 2


def test_reminder_schedule_setting(env: dict[str, str]) -> None:
    assert Settings.from_env(env).reminder_schedule == (-3, 0, 7, 14)
    assert Settings.from_env({**env, "REMINDER_SCHEDULE": "14, -3,7"}).reminder_schedule == (-3, 7, 14)
    assert Settings.from_env({**env, "REMINDER_SCHEDULE": ""}).reminder_schedule == ()
    assert Settings.from_env({**env, "REMINDER_DAYS_BEFORE_DUE": "5"}).reminder_schedule == (-5,)  # the older setting still works
    for bad, message in (
        ({"REMINDER_SCHEDULE": "-3,400"}, "400 is more than a year"),
        ({"REMINDER_SCHEDULE": "0,0"}, "lists 0 twice"),
        ({"REMINDER_SCHEDULE": "-3", "REMINDER_DAYS_BEFORE_DUE": "3"}, "not both"),
    ):
        with pytest.raises(ConfigError, match=message):
            Settings.from_env({**env, **bad})


class TestVoidWithReason:
    """Finance voids an invoice with a reason: it is kept and audited, and the customer is told it was cancelled, in their language."""

    def test_reason_audited_and_customer_told(self, cli, localstripe: LocalStripe, smtp: SmtpServer, server) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, locale="de")
        smtp.mailbox.wait_for(1)
        voided = cli("invoice", "void", issued.number, "--reason", "Doppelt erfasst (intern)", "--json")
        assert voided.code == 0, voided.err
        assert voided.json()["customer_notified"] is True and voided.json()["void_reason"] == "Doppelt erfasst (intern)"
        notice = smtp.mailbox.wait_for(2)[1]
        assert notice["To"] == issued.email
        assert notice["Subject"] == f"Rechnung {issued.number} von Acme Consulting wurde storniert"
        text = text_part(notice)
        assert "storniert" in text and "120,50\xa0€" in text and "/pay/" not in text
        assert "intern" not in text + html_part(notice)  # the reason is finance's, not the customer's
        assert cli("invoice", "show", issued.number, "--json").json()["void_reason"] == "Doppelt erfasst (intern)"
        entries = cli("audit", "--invoice", issued.number, "--json").json()["entries"]
        notice_entry = next(e for e in entries if e["action"] == "invoice.void_notice")
        assert notice_entry["details"]["reason"] == "Doppelt erfasst (intern)" and notice_entry["details"]["emailed"] is True
        assert "Void reason" in cli("invoice", "show", issued.number).out

    def test_an_invoice_never_sent_is_voided_quietly(self, cli, settings: Settings) -> None:
        assert cli("customer", "add", "--email", "q@example.com", "--name", "Q", "--stripe-customer", "cus_q1", "--verified").code == 0
        number = create_plain(cli, "q@example.com")
        voided = cli("invoice", "void", number, "--reason", "never meant to be sent", "--json")
        assert voided.code == 0 and voided.json()["customer_notified"] is False
        assert db_query(settings.database_url, "SELECT count(*) FROM outbox WHERE kind = 'invoice_void'") == [(0,)]


def flags_of(cli, number: str) -> list[str]:
    return [i for i in cli("invoice", "show", number, "--json").json()["flags"]]


def test_a_bad_setting_is_quoted_whole(env: dict[str, str]) -> None:
    """The value named in the message keeps both its quotes ("not 'red'", the closing one was cut)."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**env, "MERCHANT_BRAND_COLOR": "red"})
    assert str(caught.value).endswith("not 'red'")
    with pytest.raises(ConfigError) as missing:
        Settings.from_env({k: v for k, v in env.items() if k != "LINK_SECRET_KEYS"})
    assert str(missing.value) == "Config 'LINK_SECRET_KEYS' is missing, and has no default."


def test_on_off_settings_read_alike(env: dict[str, str]) -> None:
    """Every on/off setting takes on/off, true/false, yes/no, 1/0 (INVOICE_PDF_ATTACH and OUTBOX_IN_PROCESS took true/false only)."""
    for word, value in (("on", True), ("yes", True), ("1", True), ("off", False), ("no", False), ("false", False)):
        settings = Settings.from_env({**env, "INVOICE_PDF_ATTACH": word, "OUTBOX_IN_PROCESS": word})
        assert (settings.invoice_pdf_attach, settings.outbox_in_process) == (value, value)
    with pytest.raises(ConfigError, match="INVOICE_PDF_ATTACH must be on or off, not 'maybe'"):
        Settings.from_env({**env, "INVOICE_PDF_ATTACH": "maybe"})


def test_a_file_that_is_not_utf8_says_how_to_save_it(cli, tmp_path: Path) -> None:
    latin1 = tmp_path / "excel.csv"
    latin1.write_bytes("email,name,amount,currency,description\nj@example.com,Jürgen Müller,12.50,eur,Beratung\n".encode("cp1252"))
    result = cli("import", str(latin1))
    assert result.code == 1 and 'it is not UTF-8 (line 2 is not): save it as "CSV UTF-8"' in result.err
    assert cli("invoice", "list", "--json").json()["invoices"] == []
