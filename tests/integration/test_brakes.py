"""Brakes against card testing, on real parts: the app under uvicorn (two of them, sharing one database,
stand in for several web processes), localstripe counting what reaches "Stripe", SMTP receiving
finance's alerts, SQLite and PostgreSQL holding the counters.

uvicorn trusts X-Forwarded-For from 127.0.0.1 (its default FORWARDED_ALLOW_IPS), the way it trusts a
proxy in front of it with --proxy-headers: the tests speak as different client addresses that way.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from plumbing.settings import Settings
from tests.harness import CARD_DECLINED, CARD_OK, AppServer, LocalStripe, SmtpServer, db_execute, db_query, free_port, in_thread, wait_until
from tests.integration.helpers import csrf_of, invoice_status, issue_invoice, setup_intents_for

FINANCE = "finance@acme.test"


def address(n: int) -> dict[str, str]:
    """Headers that make a request come from client address 203.0.113.<n> (through the trusted proxy)."""
    return {"x-forwarded-for": f"203.0.113.{n}"}


def brake_alerts(smtp: SmtpServer, about: str) -> list[Any]:
    return [m for m in smtp.mailbox.to(FINANCE) if "Too many attempts" in m["Subject"] and about in m["Subject"]]


def exactly_one_alert(smtp: SmtpServer, about: str) -> None:
    wait_until(lambda: brake_alerts(smtp, about), timeout=15, what=f"finance's alert about {about}")
    time.sleep(1.0)  # room for a second alert, which must not come
    assert len(brake_alerts(smtp, about)) == 1


def trips_audited(settings: Settings, subject: str) -> list[tuple[Any, ...]]:
    return db_query(
        settings.database_url, "SELECT actor, subject, details FROM audit_log WHERE action = 'brake.tripped' AND subject = :s", s=subject
    )


@pytest.mark.postgres
class TestSetupIntentsPerLink:
    """A card tester posting to one link's new-card endpoint gets at most SETUP_INTENTS_PER_LINK_DAY SetupIntents."""

    def test_colleague_links_bring_no_budget_of_their_own(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        """Whoever holds the link can send it to 3 colleagues a day, each link its own: the limit is the invoice's too."""
        issued = issue_invoice(cli, localstripe)
        page = browser_client.get(issued.url)
        mine = [browser_client.post(f"{page.url}/setup", data={"csrf": csrf_of(page.text)}, headers=address(n)) for n in range(10)]
        assert [a.status_code for a in mine] == [200] * 10
        colleague = cli("link", "issue", issued.number, "--to", "ap@example.com", "--json").json()["link"]["url"]
        with httpx.Client(base_url=server.base, timeout=30, follow_redirects=True) as them:
            theirs = them.get(colleague)
            answer = them.post(f"{theirs.url}/setup", data={"csrf": csrf_of(theirs.text)}, headers=address(50))
        assert answer.status_code == 429
        assert len(setup_intents_for(localstripe, issued.stripe_customer)) == 10

    def test_forty_setups_make_at_most_ten_setup_intents(
        self,
        backend: str,
        cli: Any,
        localstripe: LocalStripe,
        smtp: SmtpServer,
        server: Any,
        settings: Settings,
        browser_client: httpx.Client,
    ) -> None:
        issued = issue_invoice(cli, localstripe)  # no saved card: the page offers a new one
        page = browser_client.get(issued.url)
        setup_url = f"{page.url}/setup"
        # Forty posts from forty addresses (rotating addresses is cheap): the link's own limit holds.
        answers = [browser_client.post(setup_url, data={"csrf": csrf_of(page.text)}, headers=address(n)) for n in range(40)]

        assert [a.status_code for a in answers] == [200] * 10 + [429] * 30
        assert all(a.json()["client_secret"].startswith("seti_") for a in answers[:10])
        eleventh = answers[10]
        assert "Too many attempts" in eleventh.text
        assert "Please try again later, or contact Acme Consulting." in eleventh.text
        assert eleventh.headers["retry-after"] == str(24 * 3600)
        assert eleventh.headers["cache-control"] == "no-store" and "content-security-policy" in eleventh.headers
        assert len(setup_intents_for(localstripe, issued.stripe_customer)) == 10  # nothing more reached Stripe

        # The page's own script asks for JSON and shows the message; other languages get theirs.
        scripted = browser_client.post(setup_url, data={"csrf": csrf_of(page.text)}, headers={"accept": "application/json", **address(99)})
        assert scripted.status_code == 429
        assert scripted.json() == {
            "error": "too_many_attempts",
            "message": "Too many attempts. Please try again later, or contact Acme Consulting.",
        }
        german = browser_client.post(setup_url, data={"csrf": csrf_of(page.text)}, headers={"accept-language": "de", **address(98)})
        assert german.status_code == 429 and "Zu viele Versuche" in german.text
        assert len(setup_intents_for(localstripe, issued.stripe_customer)) == 10

        exactly_one_alert(smtp, f"invoice {issued.number}")
        [(actor, _, details)] = trips_audited(settings, f"invoice:{issued.number}")
        assert actor == "link" and "SETUP_INTENTS_PER_LINK_DAY" in str(details)

    def test_one_address_gets_at_most_ten_across_links(
        self,
        backend: str,
        cli: Any,
        localstripe: LocalStripe,
        smtp: SmtpServer,
        server: Any,
        settings: Settings,
        browser_client: httpx.Client,
    ) -> None:
        first, second = issue_invoice(cli, localstripe), issue_invoice(cli, localstripe)
        pages = [browser_client.get(issued.url) for issued in (first, second)]
        answers = [
            browser_client.post(f"{pages[n % 2].url}/setup", data={"csrf": csrf_of(pages[n % 2].text)}, headers=address(7))
            for n in range(12)
        ]
        assert [a.status_code for a in answers] == [200] * 10 + [429] * 2  # five per link, ten for the address
        stripe_count = len(setup_intents_for(localstripe, first.stripe_customer)) + len(
            setup_intents_for(localstripe, second.stripe_customer)
        )
        assert stripe_count == 10
        assert browser_client.post(f"{pages[0].url}/setup", data={"csrf": csrf_of(pages[0].text)}, headers=address(8)).status_code == 200
        exactly_one_alert(smtp, "client address")
        assert trips_audited(settings, f"invoice:{first.number}") == []


@pytest.mark.postgres
class TestFailedPaymentsPerInvoice:
    """A saved card that declines, posted 15 times, reaches Stripe at most PAY_FAILED_ATTEMPTS_PER_INVOICE_HOUR times."""

    def test_fifteen_declines_make_at_most_five_payment_intents(
        self,
        backend: str,
        cli: Any,
        localstripe: LocalStripe,
        smtp: SmtpServer,
        server: Any,
        settings: Settings,
        browser_client: httpx.Client,
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_DECLINED, CARD_OK)
        declining, good = issued.cards
        page = browser_client.get(issued.url)
        answers = [
            browser_client.post(str(page.url), data={"csrf": csrf_of(page.text), "payment_method": declining}, headers=address(n))
            for n in range(15)
        ]
        assert [a.status_code for a in answers] == [402] * 5 + [429] * 10
        assert "declined" in answers[4].text.lower()
        assert "Too many attempts" in answers[5].text and "Acme Consulting" in answers[5].text
        intents = localstripe.payment_intents_for(issued.stripe_customer)
        assert len(intents) == 5 and {pi.status for pi in intents} == {"requires_payment_method"}

        # The invoice waits out the hour, whatever card comes next: nothing more goes to Stripe.
        other_card = browser_client.post(str(page.url), data={"csrf": csrf_of(page.text), "payment_method": good}, headers=address(50))
        assert other_card.status_code == 429
        assert len(localstripe.payment_intents_for(issued.stripe_customer)) == 5
        assert invoice_status(cli, issued.number)["status"] == "open"
        exactly_one_alert(smtp, f"invoice {issued.number}")
        [(_, _, details)] = trips_audited(settings, f"invoice:{issued.number}")
        assert "PAY_FAILED_ATTEMPTS_PER_INVOICE_HOUR" in str(details)

        # An hour later the customer can pay again.
        an_hour_ago = (datetime.now(UTC) - timedelta(hours=1, minutes=1)).replace(microsecond=0)
        db_execute(settings.database_url, "UPDATE payments SET created_at = :at", at=an_hour_ago)
        paid = browser_client.post(str(page.url), data={"csrf": csrf_of(page.text), "payment_method": good}, headers=address(51))
        assert "Payment received" in paid.text

    def test_one_address_declining_on_several_invoices(
        self, backend: str, cli: Any, localstripe: LocalStripe, smtp: SmtpServer, server: Any, browser_client: httpx.Client
    ) -> None:
        first, second = issue_invoice(cli, localstripe, CARD_DECLINED), issue_invoice(cli, localstripe, CARD_DECLINED)
        codes = []
        for issued in (first, second, first, second, first, second):
            page = browser_client.get(issued.url)
            codes.append(
                browser_client.post(
                    str(page.url), data={"csrf": csrf_of(page.text), "payment_method": issued.cards[0]}, headers=address(9)
                ).status_code
            )
        assert codes == [402] * 5 + [429]  # three and two: each invoice under its limit, the address at its own
        total = len(localstripe.payment_intents_for(first.stripe_customer)) + len(localstripe.payment_intents_for(second.stripe_customer))
        assert total == 5
        exactly_one_alert(smtp, "client address")

    def test_payments_that_do_not_fail_do_not_count(
        self, backend: str, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        for _ in range(7):  # seven customers paying from one office address
            issued = issue_invoice(cli, localstripe, CARD_OK)
            page = browser_client.get(issued.url)
            paid = browser_client.post(
                str(page.url), data={"csrf": csrf_of(page.text), "payment_method": issued.cards[0]}, headers=address(10)
            )
            assert "Payment received" in paid.text


class TestPostsPerClient:
    """One address posting faster than POSTS_PER_CLIENT_MINUTE is refused (429), others are not; no address is stored."""

    def test_the_thirty_first_post_in_a_minute_is_refused(
        self, cli: Any, localstripe: LocalStripe, smtp: SmtpServer, server: Any, settings: Settings, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page = browser_client.get(issued.url)
        status_url = f"{page.url}/status"  # "check again": no payment yet, so it only redirects back
        form = {"csrf": csrf_of(page.text)}
        with httpx.Client(timeout=30, cookies=browser_client.cookies) as client:
            codes = [client.post(status_url, data=form, headers={"x-forwarded-for": "198.51.100.7"}).status_code for _ in range(31)]
            assert codes == [303] * 30 + [429]
            refused = client.post(status_url, data=form, headers={"x-forwarded-for": "198.51.100.7"})
            assert refused.status_code == 429 and "Too many attempts" in refused.text
            assert refused.headers["retry-after"] == "60"
            # Not even a valid payment gets through from that address for now...
            pay = client.post(str(page.url), data={**form, "payment_method": issued.cards[0]}, headers={"x-forwarded-for": "198.51.100.7"})
            assert pay.status_code == 429
            assert localstripe.payment_intents_for(issued.stripe_customer) == []
            # ...while another address is not affected.
            assert client.post(status_url, data=form, headers={"x-forwarded-for": "198.51.100.8"}).status_code == 303
        exactly_one_alert(smtp, "client address")
        stored = db_query(settings.database_url, "SELECT key FROM brake_hits") + db_query(
            settings.database_url, "SELECT key FROM brake_trips"
        )
        stored += db_query(settings.database_url, "SELECT subject, details FROM audit_log")
        assert stored and "198.51.100" not in str(stored)  # a keyed hash, never the address


@pytest.mark.postgres
class TestSeveralWebProcesses:
    """Concurrent requests spread over two app processes sharing the database cannot slip past a limit."""

    def test_concurrent_setups_on_two_servers(
        self,
        backend: str,
        cli: Any,
        localstripe: LocalStripe,
        smtp: SmtpServer,
        server: Any,
        settings: Settings,
        browser_client: httpx.Client,
    ) -> None:
        from app import create_app

        issued = issue_invoice(cli, localstripe)
        page = browser_client.get(issued.url)
        path = f"{page.url.path}/setup"
        second = AppServer(create_app(settings), free_port()).start()  # another process's worth: its own pools and memory
        try:

            async def storm() -> list[httpx.Response]:
                async with (
                    httpx.AsyncClient(base_url=server.base, timeout=60, cookies=browser_client.cookies) as one,
                    httpx.AsyncClient(base_url=second.base, timeout=60, cookies=browser_client.cookies) as two,
                ):
                    form = {"csrf": csrf_of(page.text)}
                    return list(
                        await asyncio.gather(*((one if n % 2 else two).post(path, data=form, headers=address(n)) for n in range(30)))
                    )

            answers = in_thread(asyncio.run, storm())
        finally:
            second.stop()
        codes = sorted(a.status_code for a in answers)
        assert codes == [200] * 10 + [429] * 20
        assert len(setup_intents_for(localstripe, issued.stripe_customer)) == 10
        link_hex = page.url.path.rsplit("/", 1)[1]
        assert db_query(settings.database_url, "SELECT count(*) FROM brake_hits WHERE key = :k", k=f"setup_intents:link:{link_hex}") == [
            (10,)
        ]
        exactly_one_alert(smtp, f"invoice {issued.number}")

    def test_concurrent_declines(
        self, backend: str, cli: Any, localstripe: LocalStripe, server: Any, settings: Settings, browser_client: httpx.Client
    ) -> None:
        """The same card-testing run, fired all at once at one invoice from many addresses."""
        issued = issue_invoice(cli, localstripe, CARD_DECLINED)
        page = browser_client.get(issued.url)
        form = {"csrf": csrf_of(page.text), "payment_method": issued.cards[0]}

        async def storm() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.base, timeout=60, cookies=browser_client.cookies) as client:
                return list(await asyncio.gather(*(client.post(page.url.path, data=form, headers=address(n)) for n in range(15))))

        answers = in_thread(asyncio.run, storm())
        assert all(a.status_code < 500 for a in answers)
        intents = localstripe.payment_intents_for(issued.stripe_customer)
        assert 1 <= len(intents) <= 5
        assert db_query(settings.database_url, "SELECT count(*) FROM payments WHERE status = 'failed'")[0][0] <= 5


class TestCountersDoNotGrow:
    """Old counter rows go away: a key's stale hits when it counts again, every key's after a day."""

    @pytest.mark.postgres
    def test_stale_hits_are_deleted(self, backend: str, settings: Settings) -> None:
        from sqlalchemy import func, insert, select

        from payments import brakes
        from payments.models import BrakeHit, BrakeTrip
        from plumbing.db import create_engine, create_session_factory, utcnow

        async def run() -> tuple[int, int, int, int]:
            engine = create_engine(settings.database_url)
            sessions = create_session_factory(engine)
            brake = brakes.posts_per_client(settings, uuid.uuid4().hex)
            now = utcnow()
            try:
                async with sessions.begin() as session:
                    for n in range(40):  # more than the limit, all older than the window
                        await session.execute(insert(BrakeHit).values(key=brake.key, at=now - timedelta(minutes=2, seconds=n)))
                    await session.execute(insert(BrakeHit).values(key="posts:client:gone", at=now - timedelta(days=2)))
                    await session.execute(insert(BrakeTrip).values(key="posts:client:gone", window_start=now - timedelta(days=3)))
                await brakes.take(sessions, settings, brake)  # counts: the stale ones no longer block, and go
                async with sessions() as session:
                    mine = await session.scalar(select(func.count()).select_from(BrakeHit).where(BrakeHit.key == brake.key))
                    gone_before = await session.scalar(
                        select(func.count()).select_from(BrakeHit).where(BrakeHit.key == "posts:client:gone")
                    )
                async with sessions.begin() as session:
                    await brakes.purge(session)
                async with sessions() as session:
                    gone_after = await session.scalar(select(func.count()).select_from(BrakeHit).where(BrakeHit.key == "posts:client:gone"))
                    trips = await session.scalar(select(func.count()).select_from(BrakeTrip))
                return mine or 0, gone_before or 0, gone_after or 0, trips or 0
            finally:
                await engine.dispose()

        assert in_thread(asyncio.run, run()) == (1, 1, 0, 0)
