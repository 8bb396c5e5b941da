"""Stripe on payday (issue 15): a 429 from Stripe's rate limiter, or a timeout, on the pay POST is waited
out with a jittered backoff; if Stripe still does not answer, the customer is told "we are confirming
your payment", never "failed", and is never charged twice. Real stripe SDK, real localstripe, behind a
real proxy that answers 429 the way Stripe does."""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from typing import Any

import httpx

from payments.gateway import RateLimitBackoff
from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe, StallingProxy, free_port, relay
from tests.integration.helpers import csrf_of, invoice_status, issue_invoice

RATE_LIMITED = {
    "error": {
        "message": "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
        "type": "invalid_request_error",
        "code": "rate_limit",
    }
}


class RateLimitingProxy:
    """An HTTP proxy in front of localstripe that answers the first `limit` POSTs whose path matches
    `pattern` with Stripe's 429 (the request never reaches localstripe) and forwards everything else."""

    def __init__(self, target: str, pattern: str, limit: int) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.limit = limit
        self.limited: list[str] = []  # the requests answered 429, in order
        self.forwarded: list[str] = []  # "POST /v1/…" as they reached localstripe
        self._lock = threading.Lock()
        proxy = self
        matches = re.compile(pattern)

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.command == "POST" and matches.search(self.path) and proxy._take():
                    proxy.limited.append(self.path)
                    payload = json.dumps(RATE_LIMITED).encode()
                    self.send_response(429)
                    self.send_header("content-type", "application/json")
                    self.send_header("request-id", "req_ratelimited")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                proxy.forwarded.append(f"{self.command} {self.path}")
                relay(self, target, body)

            do_GET = do_POST = do_DELETE = _forward

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _take(self) -> bool:
        with self._lock:
            if len(self.limited) < self.limit:
                return True
            return False

    def recover(self) -> None:
        """Stripe's rate limiter lets requests through again."""
        with self._lock:
            self.limit = len(self.limited)

    def start(self) -> RateLimitingProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def press_pay(client: httpx.Client, issued: Any) -> httpx.Response:
    page = client.get(issued.url)
    return client.post(str(page.url), data={"csrf": csrf_of(page.text), "payment_method": issued.cards[0]})


def proxied(start_server: Any, proxy: Any, **settings: str) -> Any:
    return start_server(STRIPE_API_BASE=proxy.base, STRIPE_MAX_NETWORK_RETRIES="0", **settings)


class TestRateLimitedPayday:
    """Stripe answers 429 to the first tries: the pay POST waits them out, and the customer is charged once."""

    def test_429s_on_create_are_waited_out(self, cli: Any, localstripe: LocalStripe, start_server: Any) -> None:
        proxy = RateLimitingProxy(localstripe.base, r"^/v1/payment_intents$", limit=2).start()
        try:
            issued = issue_invoice(cli, localstripe, CARD_OK)
            server = proxied(start_server, proxy)
            with httpx.Client(base_url=server.base, follow_redirects=True, timeout=30) as client:
                started = time.monotonic()
                answer = press_pay(client, issued)
                assert time.monotonic() - started < 10
                assert answer.status_code == 200 and "Payment received" in answer.text
        finally:
            proxy.stop()
        assert len(proxy.limited) == 2
        assert proxy.forwarded.count("POST /v1/payment_intents") == 1
        [intent] = localstripe.payment_intents_for(issued.stripe_customer)
        assert intent.status == "succeeded" and intent.amount == 12050
        assert invoice_status(cli, issued.number)["status"] == "paid"

    def test_429s_on_confirm_are_waited_out(self, cli: Any, localstripe: LocalStripe, start_server: Any) -> None:
        proxy = RateLimitingProxy(localstripe.base, r"/confirm$", limit=2).start()
        try:
            issued = issue_invoice(cli, localstripe, CARD_OK)
            server = proxied(start_server, proxy)
            with httpx.Client(base_url=server.base, follow_redirects=True, timeout=30) as client:
                assert "Payment received" in press_pay(client, issued).text
        finally:
            proxy.stop()
        assert len(proxy.limited) == 2
        assert [pi.status for pi in localstripe.payment_intents_for(issued.stripe_customer)] == ["succeeded"]


class TestRateLimitThatLasts:
    """Stripe keeps answering 429: the customer sees "we are confirming", never "failed", and pays once later."""

    def test_create_never_answered_then_paid_once(self, cli: Any, localstripe: LocalStripe, start_server: Any) -> None:
        proxy = RateLimitingProxy(localstripe.base, r"^/v1/payment_intents$", limit=1000).start()
        try:
            issued = issue_invoice(cli, localstripe, CARD_OK)
            server = proxied(start_server, proxy, STRIPE_TIMEOUT_SECONDS="1", STALE_CLAIM_SECONDS="3")
            with httpx.Client(base_url=server.base, follow_redirects=True, timeout=30) as client:
                started = time.monotonic()
                answer = press_pay(client, issued)
                assert time.monotonic() - started < 3  # the backoff stays inside STALE_CLAIM_SECONDS
                assert answer.status_code == 200
                assert "We are confirming your payment" in answer.text
                assert "did not go through" not in answer.text and 'name="payment_method"' not in answer.text
                assert len(proxy.limited) >= 2  # tried again before giving up
                # Pressing again (a second tab, an impatient customer) finds the same attempt.
                page = client.get(issued.url)
                again = client.post(str(page.url), data={"csrf": csrf_of(page.text), "payment_method": issued.cards[0]})
                assert "We are confirming your payment" in again.text
                [payment] = invoice_status(cli, issued.number)["payments"]
                assert payment["status"] == "pending"

                # Stripe lets requests through again; once the attempt is stale (it never reached
                # Stripe), checking again frees the invoice and the customer pays, once.
                proxy.recover()
                time.sleep(3.2)
                checked = client.post(f"{page.url}/status", data={"csrf": csrf_of(again.text)})
                assert "Pay €120.50 with Visa •••• 4242" in checked.text  # free to pay again
                assert "Payment received" in press_pay(client, issued).text
        finally:
            proxy.stop()
        assert [pi.status for pi in localstripe.payment_intents_for(issued.stripe_customer)] == ["succeeded"]
        assert invoice_status(cli, issued.number)["amount_paid"] == 12050

    def test_confirm_never_answered_charges_nothing(self, cli: Any, localstripe: LocalStripe, start_server: Any) -> None:
        proxy = RateLimitingProxy(localstripe.base, r"/confirm$", limit=1000).start()
        try:
            issued = issue_invoice(cli, localstripe, CARD_OK)
            server = proxied(start_server, proxy, STRIPE_TIMEOUT_SECONDS="1", STALE_CLAIM_SECONDS="3")
            with httpx.Client(base_url=server.base, follow_redirects=True, timeout=30) as client:
                answer = press_pay(client, issued)
                assert "We are confirming your payment" in answer.text
                [intent] = localstripe.payment_intents_for(issued.stripe_customer)
                assert intent.status == "requires_confirmation"  # created, never confirmed: no money moved
                proxy.recover()
                time.sleep(3.2)
                page = client.get(issued.url)
                checked = client.post(f"{page.url}/status", data={"csrf": csrf_of(page.text)})
                assert "Pay €120.50 with Visa •••• 4242" in checked.text  # the stale attempt was canceled at Stripe
                assert "Payment received" in press_pay(client, issued).text
        finally:
            proxy.stop()
        statuses = sorted(pi.status for pi in localstripe.payment_intents_for(issued.stripe_customer))
        assert statuses == ["canceled", "succeeded"]
        assert invoice_status(cli, issued.number)["amount_paid"] == 12050


class TestTimeoutOnCreate:
    """Stripe does not answer the create call at all: "we are confirming", and nothing is charged."""

    def test_timeout_says_confirming(self, cli: Any, localstripe: LocalStripe, start_server: Any) -> None:
        proxy = StallingProxy(localstripe.base, stall=r"^/v1/payment_intents$").start()
        try:
            issued = issue_invoice(cli, localstripe, CARD_OK)
            server = proxied(start_server, proxy, STRIPE_TIMEOUT_SECONDS="1")
            with httpx.Client(base_url=server.base, follow_redirects=True, timeout=30) as client:
                answer = press_pay(client, issued)
                assert answer.status_code == 200 and "We are confirming your payment" in answer.text
        finally:
            proxy.stop()
        assert proxy.stalled
        assert localstripe.payment_intents_for(issued.stripe_customer) == []


class TestBackoffBounds:
    """The backoff is bounded: a few tries, jittered, and always well inside STALE_CLAIM_SECONDS."""

    def settings(self, env: dict[str, str], **overrides: str) -> Settings:
        return Settings.from_env({**env, **overrides})

    def test_defaults(self, env: dict[str, str]) -> None:
        backoff = RateLimitBackoff.from_settings(self.settings(env, STRIPE_TIMEOUT_SECONDS="20", STRIPE_MAX_NETWORK_RETRIES="2"))
        assert backoff.window_seconds == 8.0  # 120 s stale claims, 60 s for the longest create: 8 s at most
        waits = []
        for attempt in range(10):
            wait = backoff.delay(attempt, sum(waits), {})
            if wait is None:
                break
            waits.append(wait)
        assert 1 <= len(waits) <= backoff.retries
        assert sum(waits) <= backoff.window_seconds
        assert all(0.25 <= w <= 4.0 for w in waits)
        # Jitter: a crowd of customers does not come back at the same instant.
        assert len({round(backoff.delay(0, 0.0, {}) or 0, 6) for _ in range(20)}) > 1

    def test_no_room_no_retry_and_no_double_retries(self, env: dict[str, str]) -> None:
        tight = RateLimitBackoff.from_settings(self.settings(env, STRIPE_TIMEOUT_SECONDS="10", STALE_CLAIM_SECONDS="10.2"))
        assert tight.window_seconds <= 0.1 and tight.delay(0, 0.0, {}) is None
        sdk_retries = RateLimitBackoff.from_settings(self.settings(env, STRIPE_MAX_NETWORK_RETRIES="2", STRIPE_TIMEOUT_SECONDS="5"))
        # Stripe said "retry" and the SDK did (it honours Stripe-Should-Retry): not again here.
        assert sdk_retries.delay(0, 0.0, {"stripe-should-retry": "true"}) is None
        assert sdk_retries.delay(0, 0.0, {}) is not None
