"""The emailed link hands its token to a cookie and leaves the address bar; forms are checked for where
they came from and for the browser they were made for. Real app under uvicorn, real localstripe."""

from __future__ import annotations

import re
from typing import Any

import httpx

from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe, db_query
from tests.integration.helpers import csrf_of, invoice_status, issue_invoice, link_hex_of, set_cookies
from tests.integration.test_link_lifecycle import expire_links


def token_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def attributes(set_cookie: str) -> set[str]:
    """The attributes of one Set-Cookie header, lower-cased, e.g. {"httponly", "path=/pay/l/…"}."""
    return {part.strip().lower() for part in set_cookie.split(";")[1:]}


class TestHandoff:
    """Opening the emailed link moves its token into a cookie and the browser to an address without it."""

    def test_redirect_sets_a_cookie_scoped_to_the_link(self, cli: Any, localstripe: LocalStripe, server: Any) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        token = token_of(issued.url)
        with httpx.Client(base_url=server.base, timeout=30) as browser:
            handoff = browser.get(issued.url)
            assert handoff.status_code == 303
            location = handoff.headers["location"]
            link_hex = link_hex_of(location)
            assert location == f"/pay/l/{link_hex}" and token not in location
            cookie = set_cookies(handoff)[f"pl_{link_hex}"]
            assert cookie.startswith(f"pl_{link_hex}={token};")
            attrs = attributes(cookie)
            assert {"httponly", "samesite=lax", f"path=/pay/l/{link_hex}"} <= attrs
            assert "secure" not in attrs  # plain http here; see the https test below
            max_age = next(int(a.split("=")[1]) for a in attrs if a.startswith("max-age="))
            assert 29 * 86400 < max_age <= 31 * 86400  # the link's 30 days (and a day to ask for a new one)
            assert handoff.headers["referrer-policy"] == "no-referrer"
            assert handoff.headers["cache-control"] == "no-store"

            page = browser.get(location)
            assert page.status_code == 200
            assert "Pay €120.50 with Visa •••• 4242" in page.text
            assert token not in page.text  # not in a form's action, not anywhere on the page
            assert f'action="/pay/l/{link_hex}"' in page.text
            assert f'data-setup-url="/pay/l/{link_hex}/setup"' in page.text
            assert page.headers["referrer-policy"] == "no-referrer"
            assert page.headers["cache-control"] == "no-store"

            # The forms post under the new address, with the cookie, and the receipt follows.
            paid = browser.post(location, data={"csrf": csrf_of(page.text), "payment_method": issued.cards[0]}, follow_redirects=True)
            assert "Payment received" in paid.text
            assert str(paid.url).endswith(f"/pay/l/{link_hex}")
        assert invoice_status(cli, issued.number)["status"] == "paid"

    def test_the_final_address_has_no_token(self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page = browser_client.get(issued.url)
        assert [r.status_code for r in page.history] == [303]
        assert page.status_code == 200
        assert token_of(issued.url) not in str(page.url)
        assert re.fullmatch(rf"{re.escape(server.base)}/pay/l/[0-9a-f]{{32}}", str(page.url))
        # The language switcher keeps the customer on that address.
        assert f'href="/pay/l/{link_hex_of(page.url)}?lang=de"' in page.text

    def test_cookies_are_secure_over_https(self, cli: Any, localstripe: LocalStripe, start_server: Any) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        app_server = start_server(BASE_URL="https://pay.example.com")  # TLS ends at the proxy in front
        with httpx.Client(base_url=app_server.base, timeout=30) as client:
            handoff = client.get(f"/pay/{token_of(issued.url)}")
            link_hex = link_hex_of(handoff.headers["location"])
            assert "secure" in attributes(set_cookies(handoff)[f"pl_{link_hex}"])
            # (httpx keeps Secure cookies for https only: send it the way a browser would.)
            page = client.get(f"/pay/l/{link_hex}", headers={"cookie": f"pl_{link_hex}={token_of(issued.url)}"})
            assert page.status_code == 200
            csrf_cookie = set_cookies(page)["__Host-pl_csrf"]
            assert {"secure", "httponly", "path=/", "samesite=lax"} <= attributes(csrf_cookie)
            assert not any(a.startswith("domain=") for a in attributes(csrf_cookie))  # __Host-: no Domain

    def test_the_emailed_link_works_in_any_browser(self, cli: Any, localstripe: LocalStripe, server: Any) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        for _ in range(2):  # a phone and a laptop: each hands over for itself
            with httpx.Client(base_url=server.base, timeout=30, follow_redirects=True) as device:
                assert "Pay €120.50" in device.get(issued.url).text


class TestWithoutTheCookie:
    """The page address alone opens nothing: another browser, a cookieless scanner, a forged cookie see "open from your email"."""

    def test_another_browser_and_a_scanner_without_cookies(
        self, cli: Any, localstripe: LocalStripe, server: Any, settings: Settings, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page_url = str(browser_client.get(issued.url).url)
        before = invoice_status(cli, issued.number)
        with httpx.Client(timeout=30) as other:
            shown = other.get(page_url)
            assert shown.status_code == 404
            assert "Please open the link from your email" in shown.text
            assert "Pay €120.50" not in shown.text and issued.number not in shown.text
            assert shown.headers["cache-control"] == "no-store"
            # A scanner that follows the redirect but keeps no cookies: the same answer, no change.
            assert httpx.get(issued.url, timeout=30).status_code == 303
            assert other.get(page_url).status_code == 404
            refused = other.post(page_url, data={"payment_method": issued.cards[0]})
            assert refused.status_code == 404
        # A scanner that keeps its cookies while following the redirect sees the page itself.
        with httpx.Client(timeout=30, follow_redirects=True) as scanner:
            assert scanner.get(issued.url).status_code == 200
        after = invoice_status(cli, issued.number)
        assert {k: v for k, v in after.items() if k != "links"} == {k: v for k, v in before.items() if k != "links"}
        assert localstripe.payment_intents_for(issued.stripe_customer) == []

    def test_a_forged_cookie_and_another_links_cookie(self, cli: Any, localstripe: LocalStripe, server: Any) -> None:
        mine = issue_invoice(cli, localstripe, CARD_OK)
        theirs = issue_invoice(cli, localstripe, CARD_OK)
        with httpx.Client(base_url=server.base, timeout=30) as browser:
            link_hex = link_hex_of(browser.get(mine.url).headers["location"])
        path = f"/pay/l/{link_hex}"
        token = token_of(mine.url)
        forged = [token[:-2] + ("AA" if not token.endswith("AA") else "BB"), "x" * 80, token_of(theirs.url), ""]
        for value in forged:
            with httpx.Client(base_url=server.base, timeout=30) as attacker:
                answer = attacker.get(path, headers={"cookie": f"pl_{link_hex}={value}"})
                assert answer.status_code == 404, value
                assert "Please open the link from your email" in answer.text
        with httpx.Client(base_url=server.base, timeout=30) as attacker:  # the real one, for contrast
            assert attacker.get(path, headers={"cookie": f"pl_{link_hex}={token}"}).status_code == 200
        for bad_path in ("/pay/l/" + "0" * 32, "/pay/l/NOT-HEX", "/pay/l/" + link_hex.upper()):
            assert httpx.get(f"{server.base}{bad_path}", headers={"cookie": f"pl_{link_hex}={token}"}).status_code == 404

    def test_an_expired_token_in_the_cookie_still_offers_a_new_link(
        self, cli: Any, localstripe: LocalStripe, smtp: Any, server: Any, settings: Settings
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        smtp.mailbox.wait_for(1)
        expired_url = expire_links(settings, issued.number)
        with httpx.Client(base_url=server.base, timeout=30) as browser:
            # The emailed (expired) link shows the expired page right away...
            shown = browser.get(expired_url)
            assert shown.status_code == 410 and "Email me a new link" in shown.text
            # ...and a tab on the page address whose cookie's token expired meanwhile offers the same.
            link_hex = link_hex_of(browser.get(issued.url).headers["location"])
            browser.cookies.clear()
            page = browser.get(f"/pay/l/{link_hex}", headers={"cookie": f"pl_{link_hex}={token_of(expired_url)}"})
            assert page.status_code == 410
            assert f'action="/pay/l/{link_hex}/renew"' in page.text
            csrf_cookie = set_cookies(page)["paylink_csrf"].split(";")[0]
            renewed = browser.post(
                f"/pay/l/{link_hex}/renew",
                data={"csrf": csrf_of(page.text)},
                headers={"cookie": f"pl_{link_hex}={token_of(expired_url)}; {csrf_cookie}"},
            )
            assert renewed.status_code == 200 and "a new payment link is on its way" in renewed.text
        assert db_query(settings.database_url, "SELECT count(*) FROM link_requests WHERE sent") == [(1,)]


class TestCrossOriginPosts:
    """A form posted from another website is refused with 403, even with a valid CSRF token."""

    def test_a_valid_token_posted_from_another_origin_charges_nothing(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page = browser_client.get(issued.url)
        form = {"csrf": csrf_of(page.text), "payment_method": issued.cards[0]}
        hostile = [
            {"origin": "https://evil.example"},
            {"origin": "https://evil.example", "sec-fetch-site": "cross-site"},
            {"referer": "https://evil.example/phish"},
            {"origin": "null", "sec-fetch-site": "cross-site"},  # a sandboxed frame on another site
            {"origin": server.base.replace("127.0.0.1", "localhost")},  # another origin, same machine
        ]
        for headers in hostile:
            for url in (str(page.url), issued.url):  # the page's address and the old token address
                refused = browser_client.post(url, data=form, headers=headers)
                assert refused.status_code == 403, (headers, url)
                assert "This form came from another website" in refused.text
                assert "Nothing was charged" in refused.text
        setup = browser_client.post(f"{page.url}/setup", data={"csrf": form["csrf"]}, headers={"origin": "https://evil.example"})
        assert setup.status_code == 403
        assert localstripe.payment_intents_for(issued.stripe_customer) == []
        assert invoice_status(cli, issued.number)["status"] == "open"

    def test_our_own_pages_pay_as_browsers_send_them(
        self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client
    ) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page = browser_client.get(issued.url)
        # A page sent with Referrer-Policy: no-referrer makes browsers post `Origin: null`, with
        # Sec-Fetch-Site saying where the form really was.
        paid = browser_client.post(
            str(page.url),
            data={"csrf": csrf_of(page.text), "payment_method": issued.cards[0]},
            headers={"origin": "null", "sec-fetch-site": "same-origin"},
        )
        assert paid.status_code == 200 and "Payment received" in paid.text

    def test_our_origin_is_accepted(self, cli: Any, localstripe: LocalStripe, server: Any, browser_client: httpx.Client) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        page = browser_client.get(issued.url)
        paid = browser_client.post(
            str(page.url), data={"csrf": csrf_of(page.text), "payment_method": issued.cards[0]}, headers={"origin": server.base}
        )
        assert "Payment received" in paid.text


class TestCsrfBoundToTheBrowser:
    """A form token works only in the browser it was made for: one copied from another browser is refused."""

    def test_a_token_from_another_browser_is_refused(self, cli: Any, localstripe: LocalStripe, server: Any) -> None:
        issued = issue_invoice(cli, localstripe, CARD_OK)
        with (
            httpx.Client(timeout=30, follow_redirects=True) as attacker,
            httpx.Client(timeout=30, follow_redirects=True) as victim,
        ):
            attackers_page = attacker.get(issued.url)  # the attacker's own visit: a valid token, for their browser
            victims_page = victim.get(issued.url)
            refused = victim.post(str(victims_page.url), data={"csrf": csrf_of(attackers_page.text), "payment_method": issued.cards[0]})
            assert refused.status_code == 400 and "Please try again" in refused.text
            old_route = victim.post(issued.url, data={"csrf": csrf_of(attackers_page.text), "payment_method": issued.cards[0]})
            assert old_route.status_code == 400
            assert localstripe.payment_intents_for(issued.stripe_customer) == []
            # The browser cookie is what binds it: without it, even the right page's token is refused.
            cookie = set_cookies(victims_page)["paylink_csrf"]
            assert {"httponly", "path=/", "samesite=lax"} <= attributes(cookie)
            victim.cookies.delete("paylink_csrf")
            assert victim.post(str(victims_page.url), data={"csrf": csrf_of(victims_page.text)}).status_code == 400
            # Its own token, in its own browser, pays.
            again = victim.get(issued.url)
            paid = victim.post(str(again.url), data={"csrf": csrf_of(again.text), "payment_method": issued.cards[0]})
            assert "Payment received" in paid.text
        assert len(localstripe.payment_intents_for(issued.stripe_customer)) == 1
