"""Past one machine: page reads on a read replica that may lag, and PostgreSQL behind PgBouncer in
transaction mode. The real app under uvicorn, real localstripe, the PostgreSQL of CI (a read-only role
stands in for the replica; a copy of the database that never receives a write stands in for a replica
that lags forever)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from plumbing.db import create_engine
from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe, db_query, in_thread
from tests.integration.helpers import csrf_of, invoice_status, issue_invoice, link_hex_of

pytestmark = pytest.mark.postgres


def admin(database_url: str, *statements: str) -> None:
    """Run SQL as the test's superuser on the database behind `database_url`."""
    import asyncpg

    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)

    async def run() -> None:
        connection = await asyncpg.connect(dsn)
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    in_thread(asyncio.run, run())


@pytest.fixture
def lagging_replica(backend: str, database_url: str) -> Iterator[Any]:
    """copy(): a copy of the database as it is now, as the URL of a replica that will never see a later write."""
    copies: list[str] = []

    def copy() -> str:
        if backend == "sqlite":
            source = Path(make_url(database_url).database or "")
            target = source.with_name(f"replica-{uuid.uuid4().hex[:8]}.db")
            with sqlite3.connect(source) as live, sqlite3.connect(target) as replica:
                live.backup(replica)  # a consistent copy, WAL included
            copies.append(str(target))
            return f"sqlite+aiosqlite:///{target}"
        name = f"{make_url(database_url).database}_replica"
        admin(database_url, f'CREATE DATABASE "{name}" TEMPLATE "{make_url(database_url).database}"')
        copies.append(name)
        return make_url(database_url).set(database=name).render_as_string(hide_password=False)

    yield copy
    for made in copies:
        if backend == "sqlite":
            Path(made).unlink(missing_ok=True)
        else:
            admin(database_url, f'DROP DATABASE IF EXISTS "{made}" WITH (FORCE)')


def pay(browser: httpx.Client, page: httpx.Response, card: str) -> httpx.Response:
    return browser.post(str(page.url), data={"csrf": csrf_of(page.text), "payment_method": card}, follow_redirects=True)


class TestReplicaLag:
    """A paid page never shows "pay" because the replica lags: after this browser's payment, its reads of that link go to the primary."""

    def test_after_paying_the_page_reads_the_primary(
        self, cli: Any, localstripe: LocalStripe, start_server: Any, lagging_replica: Any, settings: Settings
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        app = start_server(DATABASE_READ_URL=lagging_replica())  # the replica stops here: it never sees the payment
        with httpx.Client(base_url=app.base, timeout=30, follow_redirects=True) as browser:
            page = browser.get(issued.url)
            assert "Pay €120.50" in page.text  # read from the replica
            paid = pay(browser, page, issued.cards[0])
            assert paid.status_code == 200 and "Payment received" in paid.text  # the redirect read the primary
            cookie = next(c for c in browser.cookies.jar if c.name == "pl_primary")
            assert cookie.path == f"/pay/l/{link_hex_of(page.url)}" and cookie.expires is not None
            assert "Payment received" in browser.get(str(page.url)).text  # and every read while the cookie lives
            status = browser.get(f"{page.url}/status").json()
            assert status["invoice_status"] == "paid"
        assert invoice_status(cli, issued.number)["status"] == "paid"  # written once, on the primary
        # Another browser, which posted nothing, reads the replica (which here lags forever).
        with httpx.Client(base_url=app.base, timeout=30, follow_redirects=True) as other:
            assert "Pay €120.50" in other.get(issued.url).text

    def test_without_a_replica_there_is_no_cookie(self, cli: Any, localstripe: LocalStripe, server: Any) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        with httpx.Client(base_url=server.base, timeout=30, follow_redirects=True) as browser:
            paid = pay(browser, browser.get(issued.url), issued.cards[0])
            assert "Payment received" in paid.text
            assert "pl_primary" not in {c.name for c in browser.cookies.jar}


class TestReadOnlyRole:
    """DATABASE_READ_URL as a role that may only read: pages are read through it, every write goes to the primary."""

    def test_pages_through_the_read_only_role_and_writes_through_the_primary(
        self, backend: str, cli: Any, localstripe: LocalStripe, start_server: Any, database_url: str
    ) -> None:
        if backend != "postgres":
            pytest.skip("a read-only role is PostgreSQL's")
        role = f"paylink_ro_{uuid.uuid4().hex[:8]}"
        name = make_url(database_url).database
        admin(
            database_url,
            f'CREATE ROLE "{role}" LOGIN',
            f'GRANT CONNECT ON DATABASE "{name}" TO "{role}"',
            f'GRANT USAGE ON SCHEMA public TO "{role}"',
            f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"',
        )
        try:
            issued = issue_invoice(cli, localstripe, CARD_OK)
            replica_url = make_url(database_url).set(username=role).render_as_string(hide_password=False)
            app = start_server(DATABASE_READ_URL=replica_url)
            with httpx.Client(base_url=app.base, timeout=30, follow_redirects=True) as browser:
                page = browser.get(issued.url)
                assert page.status_code == 200 and "Pay €120.50" in page.text
                sessions = db_query(database_url, "SELECT count(*) FROM pg_stat_activity WHERE usename = :role", role=role)
                assert sessions[0][0] >= 1  # the page was read through the replica's role
                assert "Payment received" in pay(browser, page, issued.cards[0]).text
            assert invoice_status(cli, issued.number)["status"] == "paid"
            with httpx.Client(base_url=app.base, timeout=30, follow_redirects=True) as later:
                assert "Payment received" in later.get(issued.url).text  # the replica caught up at once
        finally:
            _roles_to_drop.append((database_url, role))  # dropped once the app (holding its connections) has stopped


_roles_to_drop: list[tuple[str, str]] = []


@pytest.fixture(autouse=True)
def _drop_roles() -> Iterator[None]:
    yield
    while _roles_to_drop:
        _, role = _roles_to_drop.pop()
        admin(
            os.environ["TEST_POSTGRES_URL"],  # the test's database is gone by now; roles belong to the server
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'",  # noqa: S608  (our own name)
            f'DROP ROLE IF EXISTS "{role}"',
        )


class TestPgBouncerTransactionMode:
    """DATABASE_STATEMENT_CACHE=off: no prepared statement outlives its transaction (PgBouncer may run the next one elsewhere)."""

    def test_no_statement_is_left_on_the_server_connection(self, backend: str, database_url: str, settings: Settings) -> None:
        if backend != "postgres":
            pytest.skip("asyncpg's statement cache is PostgreSQL's")

        async def left_behind(statement_cache: bool) -> int:
            engine = create_engine(database_url, statement_cache=statement_cache, pool_size=1, max_overflow=0)
            try:
                for _ in range(3):
                    async with engine.begin() as connection:
                        await connection.execute(text("SELECT count(*) FROM invoices WHERE status = :s"), {"s": "open"})
                async with engine.connect() as connection:  # the same pooled server connection
                    left = text("SELECT count(*) FROM pg_prepared_statements WHERE statement NOT LIKE '%pg_prepared_statements%'")
                    return int((await connection.execute(left)).scalar_one())
            finally:
                await engine.dispose()

        assert in_thread(asyncio.run, left_behind(True)) > 0  # the default keeps them: fine without PgBouncer
        assert in_thread(asyncio.run, left_behind(False)) == 0

    def test_the_app_works_with_the_cache_off(self, cli: Any, localstripe: LocalStripe, start_server: Any) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        app = start_server(DATABASE_STATEMENT_CACHE="off")
        with httpx.Client(base_url=app.base, timeout=30, follow_redirects=True) as browser:
            assert "Payment received" in pay(browser, browser.get(issued.url), issued.cards[0]).text
        assert invoice_status(cli, issued.number)["status"] == "paid"
