"""Finance voids an invoice at the moment its customer clicks Pay: never both."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest

from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe
from tests.integration.helpers import csrf_of, invoice_status, issue_invoice


def hold_invoice_lock(database_url: str, number: str, locked: threading.Event, release: threading.Event) -> None:
    """Lock the invoice row the way a slow transaction would, until `release` is set (PostgreSQL)."""
    from sqlalchemy import text

    from plumbing.db import create_engine

    async def run() -> None:
        engine = create_engine(database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("SELECT id FROM invoices WHERE number = :n FOR UPDATE"), {"n": number})
                locked.set()
                await asyncio.to_thread(release.wait, 60)
        finally:
            await engine.dispose()

    asyncio.run(run())


@pytest.mark.postgres
class TestVoidRacingAPayment:
    """A void and a pay click that arrive together are serialised on the invoice row: the customer is
    charged and the void refused, or the invoice is void and nobody is charged, never both."""

    def test_void_and_pay_at_the_same_moment(
        self, backend: str, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client, settings: Settings
    ) -> None:
        if backend != "postgres":
            pytest.skip("SQLite serialises every writer already (BEGIN IMMEDIATE); the race is PostgreSQL's")
        issued = issue_invoice(cli, localstripe, CARD_OK)
        html = browser_client.get(issued.url).text
        locked, release = threading.Event(), threading.Event()
        holder = threading.Thread(target=hold_invoice_lock, args=(settings.database_url, issued.number, locked, release))
        holder.start()
        assert locked.wait(10)
        results: dict[str, Any] = {}

        def pay() -> None:
            with httpx.Client(base_url=server.base, timeout=60, follow_redirects=True, cookies=browser_client.cookies) as client:
                results["pay"] = client.post(issued.url, data={"csrf": csrf_of(html), "payment_method": issued.cards[0]})

        def void() -> None:
            results["void"] = cli("invoice", "void", issued.number, "--json")

        payer = threading.Thread(target=pay)
        payer.start()
        time.sleep(0.5)  # the click reaches the database first and waits for the row
        voider = threading.Thread(target=void)
        voider.start()
        time.sleep(0.5)  # both now wait on the same row
        release.set()
        for thread in (holder, payer, voider):
            thread.join(60)

        assert results["pay"].status_code not in (400, 403), "the click must be a valid one, or there is no race"
        intents = localstripe.payment_intents_for(issued.stripe_customer)
        charged = [pi for pi in intents if pi.status == "succeeded"]
        shown = invoice_status(cli, issued.number)
        if shown["status"] == "void":
            assert charged == [], "a voided invoice was charged"
        else:
            assert shown["status"] == "paid" and len(charged) == 1
            assert results["void"].code == 1
            assert "payment in progress" in results["void"].err or "paid" in results["void"].err
