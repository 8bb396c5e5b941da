"""What an attacker or a broken client sends: every answer is a calm 4xx with the security headers."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import httpx
import pytest

from tests.harness import wait_until

STRICT_HEADERS = ("content-security-policy", "referrer-policy", "x-content-type-options", "x-frame-options", "cache-control")


class TestOversizedBodies:
    """A body over the limit is refused with 413 before it is read, and the answer is as strict as any page."""

    def test_413_carries_the_security_headers(self, server: Any) -> None:
        response = httpx.post(f"{server.base}/webhooks/stripe", content=b"x" * (600 * 1024), headers={"stripe-signature": "t=1,v1=0"})
        assert response.status_code == 413
        for header in STRICT_HEADERS:
            assert header in response.headers, header
        assert response.headers["cache-control"] == "no-store"

    def test_a_chunked_body_over_the_limit_is_refused_too(self, server: Any) -> None:
        def chunks():  # type: ignore[no-untyped-def]
            for _ in range(80):
                yield b"y" * 8192

        response = httpx.post(f"{server.base}/webhooks/stripe", content=chunks(), headers={"stripe-signature": "t=1,v1=0"})
        assert response.status_code == 413
        assert "content-security-policy" in response.headers


class TestClientsThatHangUp:
    """A client that disconnects half-way through its body is logged as a disconnect, not as our error."""

    def test_disconnect_mid_body_is_not_a_500(self, server: Any, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            head = "POST /webhooks/stripe HTTP/1.1\r\nHost: 127.0.0.1\r\nStripe-Signature: t=1,v1=0\r\nContent-Length: 5000\r\n\r\n"
            sock.sendall(head.encode() + b'{"id": "evt_')
            time.sleep(0.2)
        wait_until(lambda: any("client_disconnected" in r.getMessage() for r in caplog.records), what="the disconnect to be logged")
        time.sleep(0.2)  # the access log line follows
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not any("status=500" in r.getMessage() for r in caplog.records)


class TestMethodNotAllowed:
    """A 405 says which methods the address takes (RFC 9110: `Allow` is required on a 405)."""

    def test_405_carries_allow(self, server: Any) -> None:
        webhook = httpx.get(f"{server.base}/webhooks/stripe")
        assert (webhook.status_code, webhook.headers.get("allow")) == (405, "POST")
        page = httpx.put(f"{server.base}/pay/l/{'ab' * 16}", content=b"")
        assert page.status_code == 405
        assert {"GET", "HEAD"} <= {m.strip() for m in page.headers.get("allow", "").split(",")}
        for header in STRICT_HEADERS:
            assert header in page.headers, header


class TestTrailingSlashes:
    """No answer builds a URL from the Host header, which the client chooses: a path with a trailing
    slash is not found (a redirect to http://<Host>/… would send a link to the attacker's host)."""

    @pytest.mark.parametrize(
        "path", [f"/pay/l/{'ab' * 16}/", "/pay/sometoken/", "/verify/sometoken/", "/health/", "/brand/logo/", f"/pay/l/{'ab' * 16}/status/"]
    )
    def test_no_redirect_to_the_host_header(self, server: Any, path: str) -> None:
        response = httpx.get(f"{server.base}{path}", headers={"host": "evil.example"}, follow_redirects=False)
        assert response.status_code == 404
        assert "location" not in response.headers
        assert "evil.example" not in response.text

    def test_not_for_a_post_either(self, server: Any) -> None:
        response = httpx.post(f"{server.base}/webhooks/stripe/", content=b"{}", headers={"host": "evil.example"}, follow_redirects=False)
        assert response.status_code == 404
        assert "evil.example" not in response.headers.get("location", "")


class TestOversizedForms:
    """A form streamed in chunks past the request limit is answered 413, like a declared one (not 400)."""

    def test_a_chunked_form_over_the_limit_is_413(self, cli: Any, localstripe: Any, browser_client: httpx.Client) -> None:
        from tests.integration.helpers import csrf_of, invoice_status, issue_invoice

        issued = issue_invoice(cli, localstripe)
        page = browser_client.get(issued.url)

        def chunks():  # type: ignore[no-untyped-def]
            yield f"csrf={csrf_of(page.text)}&notes=".encode()
            for _ in range(80):
                yield b"y" * 8192

        response = browser_client.post(str(page.url), content=chunks(), headers={"content-type": "application/x-www-form-urlencoded"})
        assert response.status_code == 413, response.text
        assert response.text == "request body too large"
        for header in STRICT_HEADERS:
            assert header in response.headers, header
        assert invoice_status(cli, issued.number)["status"] == "open"
