"""The pay page is rendered once per state and served many times, and it is never stale: the real app
under uvicorn (two of them, as two workers sharing the database), real localstripe."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import jinja2
import pytest

from plumbing.rendering import pages
from plumbing.settings import Settings
from tests.harness import CARD_OK, AppServer, LocalStripe, free_port
from tests.integration.helpers import csrf_of, invoice_status, issue_invoice, offered_cards
from views.page_cache import PageCache, uncacheable_reason

NONCE = re.compile(r'nonce="([^"]+)"')


def nonces(html: str) -> set[str]:
    return set(NONCE.findall(html))


@pytest.fixture
def workers(settings: Settings, localstripe: LocalStripe) -> Iterator[Any]:
    """Start app instances on free ports, each with its own memory (as uvicorn workers or machines
    would be), sharing the test's database: workers(2) -> [worker, worker]."""
    from app import create_app

    started: list[AppServer] = []

    def start(count: int, **cache: int) -> list[AppServer]:
        for _ in range(count):
            app = create_app(settings)
            if cache:
                app.state.page_cache = PageCache(settings, **cache)
            started.append(AppServer(app, free_port()).start())
        localstripe.register_webhook(f"{started[0].base}/webhooks/stripe")
        return started[-count:]

    yield start
    for server in started:
        server.stop()


def cache_of(server: AppServer) -> PageCache:
    app: Any = server.server.config.app
    cache: PageCache = app.state.page_cache
    return cache


_browsers: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_browsers() -> Iterator[None]:
    yield
    while _browsers:
        _browsers.pop().close()


def open_page(base: str, url: str) -> tuple[httpx.Client, httpx.Response]:
    """A new browser (its own cookies) opens the emailed link on the worker at `base`."""
    browser = httpx.Client(base_url=base, timeout=30, follow_redirects=True)
    _browsers.append(browser)
    page = browser.get(url.replace(url.split("/pay/", 1)[0], base))
    assert page.status_code == 200, page.text
    return browser, page


class TestPerAnswerValues:
    """Every answer from the cache carries its own CSP nonce and form tokens, matching its headers and its browser."""

    def test_nonce_and_csrf_differ_per_answer(self, cli: Any, localstripe: LocalStripe, workers: Any) -> None:
        (worker,) = workers(1)
        issued = issue_invoice(cli, localstripe, CARD_OK)
        first, page = open_page(worker.base, issued.url)
        second, other = open_page(worker.base, issued.url)
        again = first.get(str(page.url))
        assert cache_of(worker).hits >= 2  # the second browser and the reload came from the cache
        for answer in (page, other, again):
            assert "Pay €120.50 with Visa •••• 4242" in answer.text
            assert "plnonce" not in answer.text and "plcsrf" not in answer.text  # no placeholder left
            (nonce,) = nonces(answer.text)
            assert f"'nonce-{nonce}'" in answer.headers["content-security-policy"]
        assert len({next(iter(nonces(a.text))) for a in (page, other, again)}) == 3
        # Each browser's form token is bound to its own cookie: different, and only valid there.
        assert csrf_of(page.text) != csrf_of(other.text)
        assert "paylink_csrf" in other.cookies  # a new browser got its cookie from a cached page
        refused = second.post(str(page.url), data={"csrf": csrf_of(page.text), "payment_method": issued.cards[0]})
        assert refused.status_code == 400
        paid = second.post(str(page.url), data={"csrf": csrf_of(other.text), "payment_method": offered_cards(other.text)[0]})
        assert "Payment received" in paid.text
        assert invoice_status(cli, issued.number)["status"] == "paid"

    def test_languages_are_separate_pages(self, cli: Any, localstripe: LocalStripe, workers: Any) -> None:
        (worker,) = workers(1)
        issued = issue_invoice(cli, localstripe, CARD_OK)
        browser, page = open_page(worker.base, issued.url)
        german = browser.get(f"{page.url}?lang=de")
        assert 'lang="de"' in german.text and "paylink_lang" in german.headers.get("set-cookie", "")
        assert 'lang="de"' in browser.get(str(page.url)).text  # remembered, and cached apart from English
        assert 'lang="en"' in browser.get(f"{page.url}?lang=en").text


@pytest.mark.postgres
class TestNeverStale:
    """A write changes the data the next read sees, so the next page shows it on every worker, with no message between them."""

    def test_paying_shows_paid_on_this_worker_and_another(self, cli: Any, localstripe: LocalStripe, workers: Any) -> None:
        one, two = workers(2)
        issued = issue_invoice(cli, localstripe, CARD_OK)
        browser, page = open_page(one.base, issued.url)
        elsewhere, before = open_page(two.base, issued.url)
        for client, answer in ((browser, page), (elsewhere, before)):  # both caches warm
            assert "Pay €120.50" in client.get(str(answer.url)).text
        assert cache_of(one).hits and cache_of(two).hits
        paid = browser.post(str(page.url), data={"csrf": csrf_of(page.text), "payment_method": issued.cards[0]})
        assert "Payment received" in paid.text
        assert "Payment received" in browser.get(str(page.url)).text
        shown = elsewhere.get(str(before.url))  # the other worker, which never saw the payment
        assert "Payment received" in shown.text and "Pay €120.50" not in shown.text

    def test_a_void_from_the_cli_reaches_every_worker(self, cli: Any, localstripe: LocalStripe, workers: Any) -> None:
        one, two = workers(2)
        issued = issue_invoice(cli, localstripe, CARD_OK)
        browsers = [open_page(worker.base, issued.url) for worker in (one, two)]
        assert cli("invoice", "void", issued.number).code == 0
        for browser, page in browsers:
            gone = browser.get(str(page.url))
            assert gone.status_code == 410 and "This invoice has been cancelled" in gone.text

    def test_a_changed_customer_shows_up(self, cli: Any, localstripe: LocalStripe, workers: Any) -> None:
        (worker,) = workers(1)
        issued = issue_invoice(cli, localstripe, CARD_OK)
        browser, page = open_page(worker.base, issued.url)
        assert "Test Customer" in browser.get(str(page.url)).text  # cached now
        assert cli("customer", "update", issued.email, "--name", "Renamed Customer").code == 0
        assert "Renamed Customer" in browser.get(str(page.url)).text


class TestBounded:
    """The cache holds at most its number of pages and bytes; the oldest go first."""

    def test_entries_and_bytes_are_capped(self, cli: Any, localstripe: LocalStripe, workers: Any) -> None:
        (worker,) = workers(1, max_entries=3)
        links = [issue_invoice(cli, localstripe, CARD_OK).url for _ in range(5)]
        for url in links:
            open_page(worker.base, url)
        cache = cache_of(worker)
        assert len(cache) == 3 and cache.misses == 5
        assert 0 < cache.size_bytes <= cache.max_bytes
        open_page(worker.base, links[-1])  # the newest is still there
        assert cache.hits == 1

    def test_byte_cap(self, cli: Any, localstripe: LocalStripe, workers: Any) -> None:
        (worker,) = workers(1, max_bytes=1_500)  # a few pay pages as kept (~0.7-1 KB; the first, the base itself, less), not 4
        for _ in range(4):
            _, page = open_page(worker.base, issue_invoice(cli, localstripe, CARD_OK).url)
            assert len(page.content) > 3_500
        cache = cache_of(worker)
        assert cache.size_bytes <= 1_500 and 0 < len(cache) < 4

    def test_payday_s_pages_fit(self, cli: Any, localstripe: LocalStripe, workers: Any) -> None:
        """Pages of one template are kept compressed against one of them: 10,000 links' pay pages (and
        half as many again) fit in the default cap, so payday's pages are rendered once, not again and
        again (alone, each kept ~3.4 KB: 10,000 overflowed 32 MB)."""
        (worker,) = workers(1)
        opened = [open_page(worker.base, issue_invoice(cli, localstripe, CARD_OK).url) for _ in range(4)]
        cache = cache_of(worker)
        assert len(cache) == 4 and all(len(page.content) > 3_500 for _, page in opened)
        assert cache.size_bytes / len(cache) < cache.max_bytes / 15_000

        def plain(html: str) -> str:  # without this answer's own values
            for value in (*nonces(html), csrf_of(html)):
                html = html.replace(value, "-")
            return html

        cache._hot.clear()  # the texts kept uncompressed too: each now comes from its compressed copy and base
        for browser, page in opened:  # and comes back from the cache as it was rendered
            again = browser.get(str(page.url))
            assert again.status_code == 200 and plain(again.text) == plain(page.text)
        assert cache.hits == 4


class TestWhatMayBeKept:
    """Only pages that read nothing of the request but the nonce and the form tokens are rendered once for many."""

    @pytest.mark.parametrize("name", ["pay.html", "processing.html", "paid.html", "revoked.html", "void.html"])
    def test_the_link_states_are_cacheable(self, name: str) -> None:
        assert uncacheable_reason(pages.environment("en"), name) is None

    def test_a_template_that_reads_the_request_is_not(self) -> None:
        env = jinja2.Environment(
            autoescape=True,
            loader=jinja2.DictLoader(
                {
                    "base.html": "<p>{% block main %}{% endblock %}</p>",
                    "page.html": '{% extends "base.html" %}{% block main %}{% include "part.html" %}{% endblock %}',
                    "part.html": "{{ request.url }}",
                    "counts.html": "{{ link.open_count }}",
                }
            ),
        )
        assert uncacheable_reason(env, "page.html") == "part.html reads request"
        assert uncacheable_reason(env, "counts.html") == "counts.html shows open_count, which the key leaves out"


class TestTheKey:
    """Two pieces of page data share a key only if they render the same."""

    def test_values_that_python_calls_equal_but_pages_do_not(self) -> None:
        from decimal import Decimal

        from views.page_cache import fingerprint

        def key(value: object) -> str:
            return repr(fingerprint(value))

        assert key(Decimal("1.0")) != key(Decimal("1.00"))
        assert key(True) != key(1) and key(1) != key(1.0)
        assert key([1, 2]) != key((1, 2)) and key({"a": 1}) != key({"a": "1"})

    def test_a_value_it_cannot_key_exactly_is_refused(self) -> None:
        from views.page_cache import Uncacheable, fingerprint

        with pytest.raises(Uncacheable):
            fingerprint(object())

    def test_core_rows_are_keyed_by_their_fields(self) -> None:
        from sqlalchemy import create_engine, text

        from views.page_cache import fingerprint

        with create_engine("sqlite://").connect() as connection:
            one, two = connection.execute(text("SELECT 1 AS a, 'x' AS b UNION ALL SELECT 1 AS a, 'y' AS b")).all()
        assert repr(fingerprint(one)) != repr(fingerprint(two))
        assert repr(fingerprint(one)) != repr(fingerprint((1, "x")))  # the field names count
