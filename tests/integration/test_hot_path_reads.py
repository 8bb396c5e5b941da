"""The pay page's hot read (payments/page_reader.py) and the forged link's page (rendered once per language).

The reader has a fast way (the prebuilt statements straight on the driver's connection, for the common
page) and the general one (the same statements through SQLAlchemy, and the reads a page with payments
or several open invoices needs): both must give the same page data, field by field."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import httpx
import pytest

from links.opens import OpenRecorder
from payments import page_reader
from payments.page_reader import PageReader, PayPage, read_page
from plumbing.db import create_engine, create_session_factory, reader_engine
from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe, db_execute, db_query
from tests.integration.helpers import another_invoice, issue_invoice, link_hex_of
from views.page_cache import PageCache, fingerprint

pytestmark = pytest.mark.postgres
NONCE = re.compile(r'nonce="([^"]+)"')
CSP_NONCE = re.compile(r"'nonce-([^']+)'")


def both_ways(settings: Settings, link_id: uuid.UUID) -> tuple[PayPage | None, PayPage | None]:
    """The page data as the page reader reads it (its fast way where it applies) and through the general read."""

    async def read() -> tuple[PayPage | None, PayPage | None]:
        engine = create_engine(settings.database_url)
        try:
            reader = PageReader(settings.database_url, create_session_factory(reader_engine(engine)))
            try:
                fast, _ = await reader.pay_page(link_id)
            finally:
                reader.close()
            async with engine.connect() as connection:
                general = await connection.run_sync(read_page, link_id)
            return fast, general
        finally:
            await engine.dispose()

    return asyncio.run(read())


def link_id_of(server: Any, url: str) -> uuid.UUID:
    """The link id the emailed link hands over to (GET /pay/<token> answers 303 to /pay/l/<link id hex>)."""
    handoff = httpx.get(f"{server.base}/pay/{url.split('/pay/', 1)[1]}", follow_redirects=False)
    return uuid.UUID(hex=link_hex_of(handoff.headers["location"]))


class TestTheReadGivesTheSamePageEitherWay:
    def test_an_open_invoice_with_a_saved_card(self, cli: Any, localstripe: LocalStripe, settings: Settings, server: Any) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        fast, general = both_ways(settings, link_id_of(server, issued.url))
        assert fast is not None and general is not None
        assert [c.last4 for c in fast.cards] == ["4242"] and fast.live_payment is None
        assert fast.options is not None and fast.options.open_invoices == []
        assert fingerprint(fast) == fingerprint(general)
        # what the templates read of the rows, properties included
        assert fast.customer.is_verified and fast.customer.address_lines == general.customer.address_lines
        assert fast.invoice.number == issued.number and fast.link.recipient_email is None

    def test_two_open_invoices_and_a_part_paid_one(self, cli: Any, localstripe: LocalStripe, settings: Settings, server: Any) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK, amount="100.00")
        another_invoice(cli, issued.email, "200.00")
        fast, general = both_ways(settings, link_id_of(server, issued.url))
        assert fast is not None and fast.options is not None
        assert len(fast.options.open_invoices) == 2 and fast.options.pay_all_total == 30000
        assert fingerprint(fast) == fingerprint(general)
        db_execute(
            settings.database_url, "UPDATE invoices SET amount_paid = 4000, status = 'partially_paid' WHERE number = :n", n=issued.number
        )
        fast, general = both_ways(settings, link_id_of(server, issued.url))
        assert fast is not None and fast.options is not None and fast.options.balance == 6000
        assert fingerprint(fast) == fingerprint(general)

    def test_an_unknown_link(self, settings: Settings, server: Any) -> None:
        assert both_ways(settings, uuid.uuid4()) == (None, None)


class TestTheForgedLinksPage:
    def test_rendered_once_per_language_with_its_own_nonce(self, server: Any) -> None:
        with httpx.Client(base_url=server.base) as client:
            answers = [client.get(f"/pay/forged{i}.token{i}") for i in range(3)]
            german = client.get("/pay/forged.de", headers={"Accept-Language": "de"})
            handoff = client.get(f"/pay/l/{uuid.uuid4().hex}")
        for answer in [*answers, german, handoff]:
            assert answer.status_code == 404
            assert "plnonce" not in answer.text and "plcsrf" not in answer.text
            assert set(NONCE.findall(answer.text)) <= {CSP_NONCE.search(answer.headers["content-security-policy"]).group(1)}  # type: ignore[union-attr]
        assert len({a.headers["content-security-policy"] for a in answers}) == 3  # a nonce of its own
        assert [a.text for a in answers[1:]] == [answers[0].text] * 2
        assert "This link does not work" in answers[0].text
        assert "This link does not work" not in german.text and 'lang="de"' in german.text
        assert "Please open the link from your email" in handoff.text
        cache = server.server.config.app.state.page_cache
        assert len(cache._fixed) == 3  # (en, de, the handoff's page)


class TestTheHotPathsRows:
    """`page_rows` (views/hot_path.py keys the page by them): another connection's commit shows at once,
    and on SQLite a link read again and again with nothing committed in between is read twice a second at most."""

    def test_a_commit_shows_at_once(self, cli: Any, localstripe: LocalStripe, settings: Settings, server: Any) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        link_id = link_id_of(server, issued.url)

        async def read() -> list[Any]:
            engine = create_engine(settings.database_url)
            reader = PageReader(settings.database_url, create_session_factory(reader_engine(engine)))
            try:
                seen = []
                for name in ("Test Customer", "Test Customer", "Test Customer", "Renamed Once", "Renamed Twice"):
                    if name != "Test Customer":  # another connection commits, then the very next read
                        db_execute(settings.database_url, "UPDATE customers SET name = :n WHERE email = :e", n=name, e=issued.email)
                    rows = await reader.page_rows(link_id)
                    assert rows is not None
                    seen.append(rows)
                return seen
            finally:
                await reader.aclose()
                await engine.dispose()

        first, second, third, once, twice = asyncio.run(read())
        assert "Test Customer" in first.rows[0] and first == second == third
        assert "Renamed Once" in once.rows[0] and "Renamed Twice" in twice.rows[0]
        if settings.database_url.startswith("sqlite"):
            # Read once (noted), read again (remembered with the data version), then not read: nothing was committed.
            assert third is second and second is not first


class TestGatheredReads:
    """PostgreSQL: the hot path's reads asked for together run as one statement (payments/page_reader._Gathered),
    each with its own link's rows; a read never shares a statement that was sent before it was asked for."""

    @pytest.fixture
    def postgres(self, settings: Settings) -> None:
        if settings.database_url.startswith("sqlite"):
            pytest.skip("reads are gathered on PostgreSQL (SQLite reads on the event loop's thread)")

    def test_many_at_once(
        self, postgres: None, cli: Any, localstripe: LocalStripe, settings: Settings, server: Any, monkeypatch: Any
    ) -> None:
        links = [link_id_of(server, issue_invoice(cli, localstripe, CARD_OK).url) for _ in range(3)]
        asked = [*links * 10, uuid.uuid4()]  # ten reads of each link, and one of a link that does not exist
        batches: list[int] = []
        run = page_reader._Gathered._run

        async def counted(self: Any, batch: dict[uuid.UUID, Any]) -> None:
            batches.append(len(batch))
            await run(self, batch)

        monkeypatch.setattr(page_reader._Gathered, "_run", counted)

        async def read() -> tuple[list[Any], list[Any]]:
            engine = create_engine(settings.database_url)
            reader = PageReader(settings.database_url, create_session_factory(reader_engine(engine)))
            try:
                one_by_one = [await reader.page_rows(link) for link in links]
                together = await asyncio.gather(*(reader.page_rows(link) for link in asked))
                return one_by_one, list(together)
            finally:
                await reader.aclose()
                await engine.dispose()

        one_by_one, together = asyncio.run(read())
        assert batches[:3] == [1, 1, 1]  # one by one: a statement each
        assert sum(batches[3:]) == 4 and len(batches) - 3 <= 2  # 31 reads of 4 links: at most two statements
        assert together[-1] is None
        for index, link in enumerate(asked[:-1]):
            rows = together[index]
            assert rows is not None and rows == one_by_one[links.index(link)]
            assert rows.rows[0][0] == link and "4242" in rows.rows[0]
        # The reads of one link in one statement share one PageRows, and the page cache keys it once.
        for link in links:
            shared = {id(rows) for rows, asked_for in zip(together, asked, strict=True) if asked_for == link}
            assert len(shared) <= len(batches) - 3
        cache, first = PageCache(settings), together[0]
        assert first is not None
        key = cache.fast_key_of("/pay/l/x", "en", first)
        assert cache.fast_key_of("/pay/l/x", "en", first) == key == cache.fast_key("/pay/l/x", "en", first.rows)
        assert len(first.keys) == 1 and cache.fast_key_of("/pay/l/x", "de", first) != key

    def test_a_commit_before_the_read_shows_even_while_another_read_runs(
        self, postgres: None, cli: Any, localstripe: LocalStripe, settings: Settings, server: Any
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        link_id = link_id_of(server, issued.url)

        async def read() -> tuple[Any, Any, int]:
            engine = create_engine(settings.database_url)
            reader = PageReader(settings.database_url, create_session_factory(reader_engine(engine)))
            try:
                await reader.page_rows(link_id)  # the pool is open
                earlier = asyncio.create_task(reader.page_rows(link_id))
                for _ in range(3):
                    await asyncio.sleep(0)  # its statement is sent
                assert reader._gathered is not None
                in_flight = reader._gathered._in_flight
                db_execute(settings.database_url, "UPDATE customers SET name = 'Renamed' WHERE email = :e", e=issued.email)
                later = await reader.page_rows(link_id)  # asked for after the commit: must not share the earlier statement
                return await earlier, later, in_flight
            finally:
                await reader.aclose()
                await engine.dispose()

        earlier, later, in_flight = asyncio.run(read())
        assert in_flight == 1
        assert earlier is not None and later is not None
        assert "Renamed" in later.rows[0]

    def test_one_reader_given_up_leaves_the_others_their_rows(
        self, postgres: None, cli: Any, localstripe: LocalStripe, settings: Settings, server: Any
    ) -> None:
        link_id = link_id_of(server, issue_invoice(cli, localstripe, CARD_OK).url)

        async def read() -> list[Any]:
            engine = create_engine(settings.database_url)
            reader = PageReader(settings.database_url, create_session_factory(reader_engine(engine)))
            try:
                await reader.page_rows(link_id)
                tasks = [asyncio.create_task(reader.page_rows(link_id)) for _ in range(3)]
                await asyncio.sleep(0)
                tasks[0].cancel()  # a client gone while its read waits
                return await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                await reader.aclose()
                await engine.dispose()

        cancelled, *others = asyncio.run(read())
        assert isinstance(cancelled, asyncio.CancelledError)
        assert all(rows is not None and rows.rows[0][0] == link_id for rows in others)


class TestOpensFromManyWorkers:
    """Workers flush the opens they counted each second; two flushing the same links at once never deadlock."""

    def test_concurrent_flushes_of_the_same_links(self, cli: Any, localstripe: LocalStripe, settings: Settings, server: Any) -> None:
        links = [link_id_of(server, issue_invoice(cli, localstripe, CARD_OK).url) for _ in range(4)]

        async def flush_together() -> list[int]:
            engines = [create_engine(settings.database_url) for _ in range(2)]
            try:
                recorders = [OpenRecorder(create_session_factory(engine)) for engine in engines]
                for _ in range(15):
                    for link in links:  # each worker saw the links in its own order
                        recorders[0].record(link)
                    for link in reversed(links):
                        recorders[1].record(link)
                    written = await asyncio.gather(*(r.flush() for r in recorders))
                    assert written == [4, 4]  # none failed (a deadlock would fail one and keep its opens)
                return [len(r._pending) for r in recorders]
            finally:
                for engine in engines:
                    await engine.dispose()

        assert asyncio.run(flush_together()) == [0, 0]
        total = db_query(settings.database_url, "SELECT sum(open_count) FROM payment_links")[0][0]
        assert total == 2 * 15 * 4


class TestOpensLogStaysSmall:
    """A page reloaded thousands of times (or a leaked link hammered) writes one access-log row per flush and
    minute, not one per request; every open is still counted, on the link and in the usage report."""

    def test_hammered_link_writes_a_row_not_thousands(self, cli: Any, localstripe: LocalStripe, settings: Settings, server: Any) -> None:
        hammered, quiet = (link_id_of(server, issue_invoice(cli, localstripe, CARD_OK).url) for _ in range(2))

        async def record_and_flush() -> int:
            engine = create_engine(settings.database_url)
            try:
                recorder = OpenRecorder(create_session_factory(engine))
                for _ in range(5_000):
                    recorder.record(hammered)
                for _ in range(3):
                    recorder.record(quiet)
                return await recorder.flush()
            finally:
                await engine.dispose()

        assert asyncio.run(record_and_flush()) == 2
        query = "SELECT link_id, count(*), sum(opens) FROM link_opens GROUP BY link_id"
        logged = {str(link).replace("-", ""): (rows, opens) for link, rows, opens in db_query(settings.database_url, query)}
        # One row each (two if the recording ran over a minute's end), holding every open.
        assert logged[hammered.hex][1] == 5_000 and logged[hammered.hex][0] <= 2
        assert logged[quiet.hex][1] == 3 and logged[quiet.hex][0] <= 2
        counted = dict(db_query(settings.database_url, "SELECT invoice_id, open_count FROM payment_links WHERE open_count > 0"))
        assert sorted(counted.values()) == [3, 5_000]
        report = cli("report", "usage", "--days", "1", "--json").json()
        assert sum(report["by_hour_utc"]["opens"]) == 5_003
