"""The raw hot path (views/hot_path.py) answers payday's two requests exactly as the app would: the same
page, headers and cookies, a form token the app accepts, the open counted, the access line and metrics
written, and never a stale state. The real app under uvicorn, real localstripe."""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from itsdangerous import URLSafeTimedSerializer
from starlette.responses import Response

from payments.page_reader import PageReader
from plumbing.settings import Settings
from plumbing.signing import QuickTimedDumps, csrf_serializer
from plumbing.web import LANGUAGE_COOKIE, browser_cookie, csrf_cookie_name, csrf_token_for, csrf_valid_token
from tests.harness import CARD_OK, LocalStripe, db_execute, wait_until
from tests.integration.helpers import csrf_of, invoice_status, issue_invoice, link_hex_of
from tests.integration.test_observability import METRICS_TOKEN, scrape, value
from views.errors import InvalidLink
from views.hot_path import PAGE_ROUTE, TOKEN_ROUTE
from views.page_cache import PageCache
from views.pages import routes

pytestmark = pytest.mark.postgres
NONCE = re.compile(r'nonce="[^"]+"')
CSRF = re.compile(r'name="csrf" value="[^"]+"')
PER_ANSWER = {"content-security-policy", "x-request-id", "set-cookie", "date"}


def cache_of(server: Any) -> PageCache:
    cache: PageCache = server.server.config.app.state.page_cache
    return cache


def normalised(response: httpx.Response) -> tuple[str, list[tuple[str, str]]]:
    """The body and headers without what differs per answer (nonce, form tokens, request id, cookie value)."""
    body = CSRF.sub('name="csrf" value="T"', NONCE.sub('nonce="N"', response.text))
    headers = sorted((k, v) for k, v in response.headers.multi_items() if k not in PER_ANSWER)
    return body, headers


def opened(server: Any, url: str) -> tuple[httpx.Client, str]:
    """A browser that opened the emailed link (the handoff set the link's cookie); the page's path."""
    browser = httpx.Client(base_url=server.base, timeout=30)
    handoff = browser.get(url.replace(url.split("/pay/", 1)[0], server.base))
    assert handoff.status_code == 303
    return browser, handoff.headers["location"]


class TestSameAnswerAsTheApp:
    def test_a_kept_page_is_the_apps_page(self, cli: Any, localstripe: LocalStripe, server: Any) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        browser, path = opened(server, issued.url)
        with contextlib.closing(browser):
            cache = cache_of(server)
            first = browser.get(path)  # rendered by the app, kept under the hot path's key
            hits = cache.hits
            hot = browser.get(path)
            assert cache.hits == hits + 1  # answered from the cache by the hot path
            general = browser.get(f"{path}?via=app")  # a query string: the app's own way
            assert first.status_code == hot.status_code == general.status_code == 200
            assert normalised(hot) == normalised(first) == normalised(general)
            assert "4242" in hot.text and issued.number in hot.text
            # Its own nonce, in the CSP header and in the page; its own request id.
            nonce = re.search(r"'nonce-([^']+)'", hot.headers["content-security-policy"])
            assert nonce and f'nonce="{nonce.group(1)}"' in hot.text
            assert nonce.group(1) not in first.text
            assert hot.headers["x-request-id"] != first.headers["x-request-id"]
            assert hot.headers["cache-control"] == "no-store"

    def test_a_new_browser_gets_its_cookie_and_its_token_pays(self, cli: Any, localstripe: LocalStripe, server: Any) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        warm, path = opened(server, issued.url)
        warm.get(path)  # the page is kept now
        warm.close()
        browser, path = opened(server, issued.url)  # another browser: no CSRF cookie yet
        with contextlib.closing(browser):
            hits = cache_of(server).hits
            page = browser.get(path)
            assert cache_of(server).hits == hits + 1
            minted = [v for k, v in page.headers.multi_items() if k == "set-cookie"]
            assert len(minted) == 1 and minted[0].startswith("paylink_csrf=") and "HttpOnly" in minted[0]
            # The token the hot path signed is one the app accepts: the payment goes through.
            paid = browser.post(path, data={"csrf": csrf_of(page.text), "payment_method": issued.cards[0]})
            assert paid.status_code == 303, paid.text
            wait_until(lambda: invoice_status(cli, issued.number)["status"] == "paid", what="the webhook to mark it paid")
            # Never stale: the next GET (the hot path's key is the rows, which changed) shows the receipt.
            after = browser.get(path)
            assert after.status_code == 200 and "Pay €" not in after.text and "4242" in after.text

    def test_cookies_split_over_several_headers_are_read_as_the_app_reads_them(
        self, cli: Any, localstripe: LocalStripe, server: Any, settings: Settings
    ) -> None:
        """HTTP/2 may split the Cookie header, and some proxies pass the pieces on as several headers: the
        hot path reads them all, as Starlette does (a later one wins), never only the first."""
        issued = issue_invoice(cli, localstripe, CARD_OK)
        browser, path = opened(server, issued.url)
        with contextlib.closing(browser):
            browser.get(path)  # this browser has its form-token cookie now
            jar = {cookie.name: cookie.value for cookie in browser.cookies.jar}
        link_cookie = next(f"{name}={value}" for name, value in jar.items() if name.startswith("pl_"))
        browser_id = f"{csrf_cookie_name(settings)}={jar[csrf_cookie_name(settings)]}"
        split = [("cookie", link_cookie), ("cookie", browser_id), ("cookie", f"{LANGUAGE_COOKIE}=es")]
        with httpx.Client(base_url=server.base, timeout=30) as client:
            client.get(path, headers=split)  # the Spanish page, rendered by the app and kept
            hits = cache_of(server).hits
            hot = client.get(path, headers=split)
            assert cache_of(server).hits == hits + 1
            general = client.get(f"{path}?via=app", headers=split)
        assert hot.status_code == general.status_code == 200
        assert 'lang="es"' in hot.text and normalised(hot) == normalised(general)
        # The browser's form-token cookie was read: no new one (it would break the forms of its other tabs).
        assert "set-cookie" not in hot.headers and "set-cookie" not in general.headers

    def test_a_forged_link_is_the_apps_page_without_a_query(self, server: Any) -> None:
        with httpx.Client(base_url=server.base, timeout=30) as browser:
            forged = "/pay/" + "A" * 40 + "." + "B" * 43
            first = browser.get(forged, headers={"accept-language": "de"})
            hits = cache_of(server).hits
            hot = browser.get(forged, headers={"accept-language": "de"})
            assert cache_of(server).hits == hits + 1
            general = browser.get(forged + "?via=app", headers={"accept-language": "de"})
            assert hot.status_code == first.status_code == general.status_code == 404
            assert normalised(hot) == normalised(first) == normalised(general)
            assert 'lang="de"' in hot.text
            english = browser.get(forged, headers={"accept-language": "en"})
            assert 'lang="en"' in english.text

    def test_what_it_leaves_to_the_app(self, cli: Any, localstripe: LocalStripe, server: Any) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        browser, path = opened(server, issued.url)
        with contextlib.closing(browser):
            browser.get(path)
            hex_ = link_hex_of(path)
            token = browser.cookies[f"pl_{hex_}"]
            # No cookie, a cookie of another link, a forged cookie: "open the link from your email".
            for cookie in ("", f"pl_{uuid.uuid4().hex}={token}", f"pl_{hex_}={token[:-3]}AAA"):
                answer = httpx.get(f"{server.base}{path}", headers={"cookie": cookie} if cookie else {})
                assert answer.status_code == 404 and "email" in answer.text
            assert browser.head(path).status_code == 200
            assert browser.get(path.upper()).status_code == 404


def shown_opens(cli: Any, number: str) -> int:
    links = invoice_status(cli, number)["links"]
    return sum(int(link["open_count"]) for link in links)


class TestNeverAnotherStatesPage:
    """The page kept under the hot path's key is the page of the rows that key was made of."""

    def test_a_commit_right_after_the_read(
        self, cli: Any, localstripe: LocalStripe, server: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        browser, path = opened(server, issued.url)
        link_id = uuid.UUID(hex=link_hex_of(path))
        ident = link_id.hex if settings.database_url.startswith("sqlite") else str(link_id)
        revoke = "UPDATE payment_links SET revoked_at = created_at WHERE id = :i"
        original, fired = PageReader.page_rows, []

        async def then_commit(self: PageReader, read: uuid.UUID) -> Any:
            rows = await original(self, read)
            if read == link_id and not fired:  # finance revokes the link right after the hot path's read
                fired.append(True)
                db_execute(settings.database_url, revoke, i=ident)
            return rows

        monkeypatch.setattr(PageReader, "page_rows", then_commit)
        with contextlib.closing(browser):
            assert browser.get(path).status_code == 200  # the page of what was read: live
            time.sleep(1.1)  # (past SQLite's one-second memo of the rows)
            revoked = browser.get(path)  # the next read sees the revocation
            assert revoked.status_code == 410, (revoked.status_code, revoked.text[:400])
            db_execute(settings.database_url, "UPDATE payment_links SET revoked_at = NULL WHERE id = :i", i=ident)
            time.sleep(1.1)
            # Back exactly to the first rows: their key holds the live page, never the revoked one.
            assert browser.get(path).status_code == 200
            assert browser.get(f"{path}?via=app").status_code == 200

    def test_an_error_page_is_never_kept_under_the_pages_key(
        self, cli: Any, localstripe: LocalStripe, server: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        browser, path = opened(server, issued.url)
        original, failed = PageReader.page_of, []

        def once_unknown(self: PageReader, rows: Any) -> Any:
            if not failed:  # the app finds no such link, this once
                failed.append(True)
                raise InvalidLink()
            return original(self, rows)

        monkeypatch.setattr(PageReader, "page_of", once_unknown)
        with contextlib.closing(browser):
            assert browser.get(path, headers={"accept-language": "fr"}).status_code == 404
            assert browser.get(path, headers={"accept-language": "fr"}).status_code == 200


class TestThePostgresPool:
    def test_a_url_with_driver_options_and_a_pool_that_cannot_open(
        self, cli: Any, localstripe: LocalStripe, start_server: Any, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        if not env["DATABASE_URL"].startswith("postgresql"):
            pytest.skip("the hot read's own pool is PostgreSQL's")
        attempts: list[dict[str, Any]] = []
        real = asyncpg.create_pool

        async def counted(**params: Any) -> Any:
            attempts.append(params)
            return await real(**params)

        monkeypatch.setattr(asyncpg, "create_pool", counted)
        app = start_server(DATABASE_URL=env["DATABASE_URL"] + "?ssl=disable&command_timeout=5")  # SQLAlchemy's own URL options
        issued = issue_invoice(cli, localstripe, CARD_OK)
        browser, path = opened(app, issued.url)
        with contextlib.closing(browser):
            for _ in range(5):
                assert browser.get(path).status_code == 200
            assert len(attempts) == 1 and attempts[0]["ssl"] == "disable"
            assert cache_of(app).hits >= 4  # served by the hot path: the pool works with those options

    def test_a_pool_that_cannot_open_is_not_retried_per_request(
        self, cli: Any, localstripe: LocalStripe, start_server: Any, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        if not env["DATABASE_URL"].startswith("postgresql"):
            pytest.skip("the hot read's own pool is PostgreSQL's")
        attempts: list[int] = []

        async def refused(**params: Any) -> Any:
            attempts.append(1)
            raise OSError("connection refused")

        monkeypatch.setattr(asyncpg, "create_pool", refused)
        app = start_server()
        issued = issue_invoice(cli, localstripe, CARD_OK)
        browser, path = opened(app, issued.url)
        with contextlib.closing(browser):
            for _ in range(10):
                page = browser.get(path)
                assert page.status_code == 200 and "4242" in page.text  # the general read serves
        assert len(attempts) == 1


class TestBookkeeping:
    def test_opens_access_lines_and_metrics(self, cli: Any, localstripe: LocalStripe, start_server: Any, caplog: Any) -> None:
        app = start_server(METRICS_TOKEN=METRICS_TOKEN)
        issued = issue_invoice(cli, localstripe, CARD_OK)
        browser, path = opened(app, issued.url)
        before = scrape(app.base)
        with contextlib.closing(browser), caplog.at_level("INFO", logger="paylink.access"):
            for _ in range(5):
                assert browser.get(path).status_code == 200
            assert httpx.get(f"{app.base}/pay/{'A' * 40}.{'B' * 43}").status_code == 404
            assert httpx.get(f"{app.base}/pay/{'A' * 40}.{'B' * 43}").status_code == 404
            # A request's line is logged right after its answer is sent: the client may read it first.
            wait_until(lambda: len([r for r in caplog.records if r.name == "paylink.access"]) >= 7, what="the access lines")
        lines = [r.getMessage() for r in caplog.records if r.name == "paylink.access"]
        assert sum("path=/pay/l/{link} status=200" in line for line in lines) == 5
        assert sum("path=/pay/{token} status=404" in line for line in lines) == 2
        assert not [line for line in lines if link_hex_of(path) in line or "AAAAAAAA" in line]
        after = scrape(app.base)
        for name, labels, count in (
            ("paylink_http_requests_total", {"route": PAGE_ROUTE, "status": "200"}, 5),
            ("paylink_http_requests_total", {"route": TOKEN_ROUTE, "status": "404"}, 2),
            ("paylink_http_request_duration_seconds_count", {"route": PAGE_ROUTE}, 5),
        ):
            assert value(after, name, method="GET", **labels) - value(before, name, method="GET", **labels) == count, (name, labels)
        # Counted as the app counts them (written each second): the 5 pages, and the handoff's page is not one.
        wait_until(lambda: shown_opens(cli, issued.number) >= 5, what="the opens to be written")
        assert shown_opens(cli, issued.number) == 5

    def test_route_templates_are_the_apps(self) -> None:
        paths = {getattr(route, "path", None) for route in routes}
        assert PAGE_ROUTE in paths and TOKEN_ROUTE in paths


class TestCookieAndTokens:
    def test_the_browser_cookie_is_starlettes(self, settings: Settings) -> None:
        response = Response()
        response.set_cookie(csrf_cookie_name(settings), "x" * 43, path="/", secure=False, httponly=True, samesite="lax")
        assert dict(response.raw_headers)[b"set-cookie"] == browser_cookie(settings, "x" * 43)

    @pytest.mark.parametrize("value", [["a" * 32, "b" * 32], ["0123456789abcdef" * 2, "é-not-hex"]])
    def test_quick_tokens_are_itsdangerous_tokens(self, settings: Settings, value: list[str]) -> None:
        serializer = csrf_serializer(settings)
        token = QuickTimedDumps(serializer).dumps(value)
        assert serializer.loads(token, max_age=60) == value
        signer = serializer.make_signer()
        signed, signature = token.rsplit(".", 1)
        assert signer.get_signature(signed.encode()).decode() == signature
        other = URLSafeTimedSerializer("another key", salt=serializer.salt)
        with pytest.raises(Exception, match=r"[Ss]ignature"):
            other.loads(token)

    def test_a_form_token_is_bound_to_link_and_browser(self, settings: Settings) -> None:
        link, browser = uuid.uuid4(), "b" * 43
        token = csrf_token_for(settings, link, browser)
        assert csrf_valid_token(settings, link, browser, token)
        assert not csrf_valid_token(settings, uuid.uuid4(), browser, token)
        assert not csrf_valid_token(settings, link, "c" * 43, token)
