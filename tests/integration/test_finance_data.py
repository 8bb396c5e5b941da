"""Data that cannot hurt finance: exports a spreadsheet cannot run, invoice numbers that never fail
or skip, customers checked before Stripe hears of them, imports that never stall webhooks and
never leave half a file behind. Real commands, real localstripe, SQLite files and PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from plumbing.settings import Settings
from tests.harness import ROOT, LocalStripe, db_execute, db_query, in_thread, signed_event, wait_until

pytestmark = pytest.mark.postgres

HEADER = "email,name,amount,currency,description,due_date,number,locale\n"


def write_csv(tmp_path: Path, body: str, name: str = "invoices.csv") -> str:
    path = tmp_path / name
    path.write_text(HEADER + body, encoding="utf-8")
    return str(path)


def create(cli: Any, email: str, *extra: str, amount: str = "10", description: str = "Consulting") -> Any:
    return cli("invoice", "create", "--customer", email, "--amount", amount, "--currency", "eur", f"--description={description}",
               "--json", *extra)  # fmt: skip


def add_customer(cli: Any, email: str, name: str = "Ann Lee") -> None:
    result = cli("customer", "add", "--email", email, f"--name={name}", "--stripe-customer", f"cus_{uuid.uuid4().hex[:14]}", "--verified")
    assert result.code == 0, result.err


def count(settings: Settings, table: str) -> int:
    [(n,)] = db_query(settings.database_url, f"SELECT count(*) FROM {table}")  # noqa: S608 (fixed table names)
    return int(n)


class TestExportCannotRunFormulas:
    """Finance opens the CSV export in a spreadsheet: no name or description runs as a formula, and JSON stays exact."""

    def test_formula_cells_are_neutralised_in_csv_only(self, cli, settings: Settings) -> None:
        evil_name = '=HYPERLINK("http://evil.example","x")'
        add_customer(cli, "mallory@example.com", evil_name)
        descriptions = ["@SUM(1+1)", "+1", "-1", "\t=1", "Consulting, November"]
        numbers = []
        for description in descriptions:
            created = create(cli, "mallory@example.com", description=description)
            assert created.code == 0, created.err
            numbers.append(created.json()["number"])
        # Written behind the app's back (an older row, another tool): the factories trim these away.
        for number, raw in zip(numbers[3:5], ["\t=1", "  =2+3"], strict=True):
            db_execute(settings.database_url, "UPDATE invoices SET description = :d WHERE number = :n", d=raw, n=number)
        dde = "\r=cmd|' /C calc'!A0"
        db_execute(settings.database_url, "UPDATE invoices SET needs_attention = :d WHERE number = :n", d=dde, n=numbers[0])

        exported = cli("export", "--format", "csv")
        assert exported.code == 0, exported.err
        rows = {r["number"]: r for r in csv.DictReader(io.StringIO(exported.out))}
        cells = [rows[n]["description"] for n in numbers]
        assert cells == ["'@SUM(1+1)", "'+1", "'-1", "'\t=1", "'  =2+3"]
        assert {rows[n]["customer_name"] for n in numbers} == {"'" + evil_name}
        assert rows[numbers[0]]["needs_attention"] == "'" + dde
        assert (rows[numbers[0]]["amount_due"], rows[numbers[0]]["amount_due_formatted"]) == ("1000", "€10.00")  # numbers untouched
        assert rows[numbers[0]]["customer_email"] == "mallory@example.com"

        as_json = {r["number"]: r for r in json.loads(cli("export", "--format", "json").out)}
        assert [as_json[n]["description"] for n in numbers] == ["@SUM(1+1)", "+1", "-1", "\t=1", "  =2+3"]
        assert as_json[numbers[0]]["customer_name"] == evil_name
        assert as_json[numbers[0]]["amount_due"] == 1000


def create_concurrently(settings: Settings, email: str, n: int) -> list[str | BaseException]:
    """`n` creates at the same moment, each on its own thread, event loop, connection and transaction
    (as `n` finance desks running `invoice create` would); returns each one's number or error."""
    from links.customers import find_customer
    from links.invoices import create_invoice
    from services import open_services

    barrier = threading.Barrier(n)
    results: list[str | BaseException] = [RuntimeError("not run")] * n

    async def one(index: int) -> str:
        async with open_services(settings) as services:
            async with services.readers() as session:
                customer = await find_customer(session, email)
            await asyncio.to_thread(barrier.wait)
            async with services.sessions.begin() as session:
                invoice = await create_invoice(
                    session, customer=customer, amount="12.00", currency="eur", description=f"desk {index}", actor=f"cli:desk{index}"
                )
                return invoice.number

    def run(index: int) -> None:
        try:
            results[index] = asyncio.run(one(index))
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


class TestInvoiceNumbers:
    """Invoices created at the same moment all succeed, with human numbers that never skip one."""

    def test_24_concurrent_creates_all_succeed_with_consecutive_numbers(self, cli, settings: Settings) -> None:
        add_customer(cli, "desk@example.com")
        assert create(cli, "desk@example.com").json()["number"] == "INV-000001"
        results = create_concurrently(settings, "desk@example.com", 24)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors
        assert sorted(results) == [f"INV-{i:06d}" for i in range(2, 26)]  # type: ignore[type-var]
        assert create(cli, "desk@example.com").json()["number"] == "INV-000026"

    def test_a_rolled_back_create_gives_its_number_back(self, cli, settings: Settings) -> None:
        from links.customers import find_customer
        from links.invoices import create_invoice
        from services import open_services

        add_customer(cli, "undo@example.com")
        assert create(cli, "undo@example.com").json()["number"] == "INV-000001"

        async def create_then_fail() -> str:
            async with open_services(settings) as services:
                taken = ""
                with pytest.raises(RuntimeError):
                    async with services.sessions.begin() as session:
                        customer = await find_customer(session, "undo@example.com")
                        invoice = await create_invoice(session, customer=customer, amount="1", currency="eur", description="d", actor="t")
                        taken = invoice.number
                        raise RuntimeError("the command failed after numbering")
                return taken

        assert in_thread(asyncio.run, create_then_fail()) == "INV-000002"
        assert create(cli, "undo@example.com").json()["number"] == "INV-000002"

    def test_numbers_given_by_hand_are_skipped_and_imports_share_the_sequence(self, cli, settings: Settings, tmp_path: Path) -> None:
        add_customer(cli, "hand@example.com")
        assert create(cli, "hand@example.com", "--number", "INV-000002").code == 0
        assert create(cli, "hand@example.com").json()["number"] == "INV-000001"
        assert create(cli, "hand@example.com").json()["number"] == "INV-000003"
        path = write_csv(tmp_path, "a@example.com,A,5,eur,first,,,\nb@example.com,B,6,eur,second,,X-1,\nc@example.com,C,7,eur,third,,,\n")
        imported = cli("import", path, "--json")
        assert imported.code == 0, imported.err
        numbers = dict(db_query(settings.database_url, "SELECT description, number FROM invoices"))
        assert (numbers["first"], numbers["second"], numbers["third"]) == ("INV-000004", "X-1", "INV-000005")
        again = cli("import", path, "--json").json()  # the same file again: found by number, or by contents
        assert (again["created_invoices"], again["already_imported"]) == (0, 3)
        assert create(cli, "hand@example.com").json()["number"] == "INV-000006"


class TestMigrationSeedsTheSequence:
    """Upgrading a database with invoices numbered the old way carries on after the highest INV- number."""

    def test_seed_from_existing_numbers(self, tmp_path: Path, backend: str) -> None:
        if backend != "sqlite":
            pytest.skip("the migration's SQL is the same on both; one database is enough")
        from alembic import command

        from plumbing.db import alembic_config

        url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        in_thread(command.upgrade, alembic_config(url), "0007")
        customer = uuid.uuid4()
        now = datetime.now(UTC)
        db_execute(url, "INSERT INTO customers (id, email, name, created_at) VALUES (:id, 'old@example.com', 'Old', :at)",
                   id=customer.hex, at=now)  # fmt: skip
        for number in ("INV-000041", "INV-000007", "INV-2026-0099", "IMP-0123456789AB"):
            db_execute(
                url,
                "INSERT INTO invoices (id, number, customer_id, currency, amount_due, amount_paid, amount_refunded, description, status,"
                " created_at) VALUES (:id, :number, :customer, 'eur', 100, 0, 0, 'd', 'open', :at)",
                id=uuid.uuid4().hex, number=number, customer=customer.hex, at=now,
            )  # fmt: skip
        in_thread(command.upgrade, alembic_config(url), "head")
        assert db_query(url, "SELECT name, last_value FROM number_sequences WHERE name = 'invoice'") == [("invoice", 41)]
        assert db_query(url, "SELECT number FROM invoices WHERE import_key IS NOT NULL") == [("IMP-0123456789AB",)]


class TestCustomersAreCheckedBeforeStripe:
    """Staff mistype a customer's details: the command refuses them before anything is created at Stripe."""

    @staticmethod
    def stripe_customers(localstripe: LocalStripe) -> set[str]:
        return {c.id for c in localstripe.client.v1.customers.list({"limit": 100}).auto_paging_iter()}

    def test_bad_details_leave_no_orphan_at_stripe(self, cli, localstripe: LocalStripe, settings: Settings) -> None:
        before = self.stripe_customers(localstripe)
        base = ["customer", "add", "--email", "ann@example.com"]
        cases = {
            "country": [*base, "--name", "Ann Lee", "--country", "XX"],
            "country name": [*base, "--name", "Ann Lee", "--country", "Germany"],
            "locale": [*base, "--name", "Ann Lee", "--locale", "klingon"],
            "blank name": [*base, "--name", "   "],
            "name on two lines": [*base, "--name", "Ann\nLee"],
            "long name": [*base, "--name", "A" * 201],
            "long city": [*base, "--name", "Ann Lee", "--city", "C" * 101],
            "stripe id": [*base, "--name", "Ann Lee", "--stripe-customer", "cus_ with spaces"],
            "email": ["customer", "add", "--email", "not-an-email", "--name", "Ann Lee"],
        }
        for case, line in cases.items():
            result = cli(*line)
            assert result.code == 1, (case, result.out, result.err)
            assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err, case
        assert self.stripe_customers(localstripe) == before
        assert count(settings, "customers") == 0

        added = cli("customer", "add", "--email", "ann@example.com", "--name", "Ann Lee", "--locale", "de-AT", "--country", "de", "--json")
        assert added.code == 0, added.err
        assert added.json()["locale"] == "de"
        assert len(self.stripe_customers(localstripe) - before) == 1

    def test_a_failed_write_takes_back_the_stripe_customer(self, cli, localstripe: LocalStripe, settings: Settings, backend: str) -> None:
        """Our own write fails right after Stripe created the customer (here: the database refuses the row)."""
        refuse_rows(settings, backend, "customers", "NEW.name = 'Refused'")
        before = self.stripe_customers(localstripe)
        result = cli("customer", "add", "--email", "refused@example.com", "--name", "Refused")
        assert result.code == 1 and "forced failure at this row" in result.err
        assert self.stripe_customers(localstripe) == before
        assert count(settings, "customers") == 0


def refuse_rows(settings: Settings, backend: str, table: str, condition: str) -> None:
    """A trigger that makes the database refuse rows of `table` matching `condition`: a real failure
    at the database, at exactly the row we choose."""
    if backend == "sqlite":
        db_execute(settings.database_url, f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} WHEN {condition} "
                                          "BEGIN SELECT RAISE(ABORT, 'forced failure at this row'); END")  # fmt: skip
        return
    db_execute(settings.database_url, f"CREATE FUNCTION refuse_{table}() RETURNS trigger AS $$ BEGIN IF {condition} "
               "THEN RAISE EXCEPTION 'forced failure at this row'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql")  # fmt: skip
    db_execute(
        settings.database_url, f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION refuse_{table}()"
    )


def big_csv(tmp_path: Path, n: int, *, explode_at: int | None = None, name: str = "big.csv", prefix: str = "bulk") -> str:
    lines = []
    for i in range(n):
        description = "explode" if i == explode_at else f"Service {i}"
        lines.append(f"{prefix}{i % (n // 2 or 1)}@example.com,Customer {i},{10 + i % 90}.50,eur,{description},2030-01-31,,en\n")
    return write_csv(tmp_path, "".join(lines), name)


def run_import(env: dict[str, str], path: str, *flags: str) -> subprocess.Popen[str]:
    """`python -m links import` as finance runs it: its own process, beside the web app."""
    command = [sys.executable, "-m", "links", "import", path, "--json", *flags]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def leftovers(settings: Settings) -> dict[str, int]:
    return {table: count(settings, table) for table in ("invoices", "customers", "payment_links", "outbox")}


class TestLargeImports:
    """A large import with emails never makes Stripe's webhooks wait, and a failed one leaves nothing behind."""

    def test_webhooks_are_answered_quickly_during_a_large_import(self, env: dict[str, str], server, settings: Settings,
                                                                tmp_path: Path) -> None:  # fmt: skip
        path = big_csv(tmp_path, 6000)
        latencies: list[float] = []
        statuses: list[int] = []
        importing = run_import(env, path, "--send", "--verified")
        try:
            wait_until(lambda: count(settings, "import_batches") > 0 or importing.poll() is not None, timeout=60, what="the import")
            with httpx.Client(timeout=30) as client:
                while importing.poll() is None:
                    event = {"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": "payment_intent.succeeded",
                             "created": int(time.time()), "data": {"object": {"id": f"pi_{uuid.uuid4().hex[:24]}", "object":
                             "payment_intent", "status": "succeeded", "amount": 100, "currency": "eur", "metadata": {}}}}  # fmt: skip
                    payload, header = signed_event(event)
                    started = time.perf_counter()
                    response = client.post(f"{server.base}/webhooks/stripe", content=payload, headers={"stripe-signature": header})
                    latencies.append(time.perf_counter() - started)
                    statuses.append(response.status_code)
                    time.sleep(0.05)
            out, err = importing.communicate(timeout=120)
        finally:
            if importing.poll() is None:
                importing.kill()
        assert importing.returncode == 0, err
        assert json.loads(out)["created_invoices"] == 6000
        assert len(latencies) >= 10, f"only {len(latencies)} webhooks went out while the import ran"
        assert set(statuses) == {200}
        assert max(latencies) < 2.0, f"slowest webhook answer during the import: {max(latencies):.2f} s"
        # Every invoice email was held until the whole file was written, then released at once.
        assert db_query(settings.database_url, "SELECT count(*) FROM outbox WHERE kind = 'invoice' AND next_attempt_at > :far",
                        far=datetime(9000, 1, 1, tzinfo=UTC)) == [(0,)]  # fmt: skip
        assert count(settings, "outbox") == 6000

    def test_a_failure_part_way_leaves_nothing_behind(self, cli, settings: Settings, backend: str, tmp_path: Path) -> None:
        add_customer(cli, "bulk3@example.com", "Existing customer")
        assert create(cli, "bulk3@example.com").json()["number"] == "INV-000001"
        before = leftovers(settings)
        # A real failure from the database, at row 1,301 of 1,500, after two chunks were committed.
        refuse_rows(settings, backend, "invoices", "NEW.description = 'explode'")
        result = cli("import", big_csv(tmp_path, 1500, explode_at=1300), "--send", "--json")
        assert result.code == 1
        error = json.loads(result.err.splitlines()[-1])["error"]
        assert "forced failure at this row" in error and "nothing was imported" in error
        assert leftovers(settings) == before
        assert db_query(settings.database_url, "SELECT status, rows FROM import_batches") == [("aborted", 1500)]
        assert create(cli, "bulk3@example.com").json()["number"] == "INV-000002"  # its numbers went back: no gap

    def test_an_import_killed_part_way_is_undone_by_the_next(self, cli, env: dict[str, str], settings: Settings, tmp_path: Path) -> None:
        cli("invoice", "list")  # the database exists
        killed = run_import(env, big_csv(tmp_path, 6000, name="killed.csv"), "--send")
        try:
            wait_until(lambda: count(settings, "invoices") > 0 or killed.poll() is not None, timeout=60, what="a first chunk")
        finally:
            killed.send_signal(signal.SIGKILL)
            killed.wait(30)
        written = count(settings, "invoices")
        assert 0 < written < 6000, "the import should have died part-way"
        assert db_query(settings.database_url, "SELECT count(*) FROM outbox WHERE next_attempt_at < :soon",
                        soon=datetime.now(UTC) + timedelta(days=1)) == [(0,)]  # its emails are held, none can go out  # fmt: skip
        # Ten minutes later (no heartbeat since), `reconcile` (cron) undoes it; so would the next import.
        db_execute(settings.database_url, "UPDATE import_batches SET heartbeat_at = :old", old=datetime.now(UTC) - timedelta(minutes=11))
        reconciled = cli("reconcile", "--json")
        assert reconciled.code == 0, reconciled.err
        assert len(reconciled.json()["imports_undone"]) == 1
        assert leftovers(settings) == {"invoices": 0, "customers": 0, "payment_links": 0, "outbox": 0}
        result = cli("import", write_csv(tmp_path, "zed@example.com,Zed,5,eur,after the crash,,,\n"), "--json")
        assert result.code == 0, result.err
        assert leftovers(settings) == {"invoices": 1, "customers": 1, "payment_links": 0, "outbox": 0}
        assert db_query(settings.database_url, "SELECT number FROM invoices") == [("INV-000001",)]
        assert sorted(db_query(settings.database_url, "SELECT status FROM import_batches")) == [("aborted",), ("done",)]
