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
