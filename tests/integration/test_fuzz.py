"""Property-based fuzzing (hypothesis) of every route, the webhook endpoint and the CSV importer.

Whatever arrives (any method, path parameter, body, encoding, header or token), the answer is never a
5xx, and nothing is half-written: no claimed attempt is left behind, nothing is charged twice, a bad
import writes nothing. Bounded: a few hundred examples each, well under two minutes in all.
"""

from __future__ import annotations

import json
import re
import string
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plumbing.settings import Settings
from tests.harness import CARD_DECLINED, CARD_OK, LocalStripe, db_query, signed_event
from tests.integration.helpers import csrf_of, issue_invoice

# The app under test runs in threads of this process; should a library there draw on the global random
# generator while an example is generated, Hypothesis would take it for our strategies using `random`.
# They do not. (Paylink's own code keeps off the global generator: Message-IDs come from `secrets`,
# backoff jitter from a generator of its own.)
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
CONTENT_TYPES = [
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded; charset=latin-1",
    "multipart/form-data; boundary=xyz",
    "multipart/form-data",
    "application/json",
    "text/plain; charset=utf-16",
    "",
    "\x00garbage/; ;;=",
]
text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)
header_text = st.text(
    alphabet=string.printable.replace("\r", "").replace("\n", "").replace("\x0b", "").replace("\x0c", ""), max_size=120
).map(str.strip)


def _route_paths(server: Any) -> list[str]:
    """Every route the app serves, as path templates (new routes are fuzzed without editing this file)."""
    paths = {route.path for route in server.server.config.app.routes if hasattr(route, "path") and not route.path.startswith("/static")}
    return sorted(paths | {"/static/{name}", "/nope/{x}"})


def _fill(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: values.get(m.group(1), values["token"]), template)


class TestEveryRouteSurvivesAnything:
    """Forged, truncated and real tokens, hostile bodies and headers on every route: never a 5xx."""

    def test_routes(self, cli: Any, localstripe: LocalStripe, server: Any, settings: Settings) -> None:
        issued = issue_invoice(cli, localstripe, CARD_DECLINED, CARD_OK)
        real_token = issued.url.rsplit("/", 1)[1]
        with httpx.Client(base_url=server.base, timeout=30, follow_redirects=True) as browser:
            page = browser.get(issued.url)
            csrf = csrf_of(page.text)
            cookies = dict(browser.cookies)
        link_hex = next((name[3:] for name in cookies if name.startswith("pl_")), "0" * 32)
        templates = _route_paths(server)
        tokens = st.one_of(
            st.just(real_token),
            st.builds(lambda n: real_token[:n], st.integers(0, len(real_token))),
            st.builds(lambda t, c: t[:-1] + c, st.just(real_token), st.sampled_from("A_-.x0")),
            text.filter(lambda t: "/" not in t and "?" not in t and "#" not in t and t not in (".", "..")),
            st.just(link_hex),
            st.just("x" * 600),
        )
        form = st.dictionaries(
            st.sampled_from(["csrf", "payment_method", "setup_intent", "save_card", "amount", "scope", "email", "lang", "x"]),
            st.one_of(text, st.just(csrf), st.sampled_from(issued.cards), st.just("seti_" + "a" * 24)),
            max_size=5,
        )
        bodies = st.one_of(
            form.map(lambda d: httpx.QueryParams(d).__str__().encode()),
            st.binary(max_size=2000),
            st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(text, text, max_size=4)),
        )
        seen: list[int] = []

        @FUZZ
        @given(
            method=st.sampled_from(METHODS),
            template=st.sampled_from(templates),
            token=tokens,
            body=bodies,
            content_type=st.sampled_from(CONTENT_TYPES),
            origin=st.one_of(st.none(), st.just(server.base), st.just("https://evil.example"), header_text),
            language=st.one_of(st.none(), header_text),
            cookie=st.one_of(st.none(), st.just("; ".join(f"{k}={v}" for k, v in cookies.items())), header_text),
            query=st.one_of(st.just(""), st.builds(lambda v: "?lang=" + httpx.QueryParams({"v": v}).__str__()[2:], text)),
        )
        def hit(
            method: str,
            template: str,
            token: str,
            body: bytes,
            content_type: str,
            origin: str | None,
            language: str | None,
            cookie: str | None,
            query: str,
        ) -> None:
            headers = {"content-type": content_type}
            if origin is not None:
                headers["origin"] = origin
            if language is not None:
                headers["accept-language"] = language
            if cookie is not None:
                headers["cookie"] = cookie
            path = _fill(template, {"token": token, "link": link_hex, "link_hex": link_hex}) + query
            with httpx.Client(base_url=server.base, timeout=30) as client:
                try:
                    response = client.request(method, path, content=body if method not in ("GET", "HEAD") else None, headers=headers)
                except (httpx.InvalidURL, httpx.LocalProtocolError):
                    return  # the client refuses to send it; nothing reached us
            seen.append(response.status_code)
            assert response.status_code < 500, f"{method} {template} -> {response.status_code}: {response.text[:300]}"

        hit()
        assert len(seen) > 100
        # Nothing half-written: no claimed attempt is left without an outcome, nothing charged twice.
        assert db_query(settings.database_url, "SELECT count(*) FROM payments WHERE status = 'created'") == [(0,)]
        succeeded = [pi for pi in localstripe.payment_intents_for(issued.stripe_customer) if pi.status == "succeeded"]
        assert len(succeeded) <= 1


class TestWebhookSurvivesAnything:
    """Validly signed events of every handled type with random contents, and unsigned noise: 200 or 400, never 5xx."""

    def test_webhooks(self, server: Any, settings: Settings) -> None:
        json_values = st.recursive(
            st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | text,
            lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
            max_leaves=12,
        )
        kinds = st.sampled_from(
            [
                "payment_intent.succeeded",
                "payment_intent.payment_failed",
                "payment_intent.processing",
                "payment_intent.canceled",
                "charge.refunded",
                "charge.dispute.created",
                "payment_method.attached",
                "payment_method.detached",
                "customer.updated",
                "invoice.paid",
            ]
        )
        fields = st.fixed_dictionaries(
            {},
            optional={
                "id": st.one_of(text, st.just("pi_fuzz")),
                "amount": json_values,
                "amount_refunded": json_values,
                "currency": json_values,
                "status": st.one_of(json_values, st.sampled_from(["succeeded", "processing", "canceled", "requires_payment_method"])),
                "payment_intent": json_values,
                "customer": json_values,
                "metadata": st.one_of(json_values, st.dictionaries(st.sampled_from(["invoice_id", "payment_id"]), text)),
                "last_payment_error": json_values,
                "card": json_values,
            },
        )
        counter = {"n": 0}

        @FUZZ
        @given(kind=kinds, obj=st.one_of(fields, json_values), signed=st.booleans(), data_key=st.sampled_from(["data", "dat", None]))
        def deliver(kind: str, obj: Any, signed: bool, data_key: str | None) -> None:
            counter["n"] += 1
            event: dict[str, Any] = {"id": f"evt_fuzz_{counter['n']}", "object": "event", "type": kind, "created": int(time.time())}
            if data_key:
                event[data_key] = {"object": obj}
            payload, header = signed_event(event)
            if not signed:
                header = header[:-4] + "0000"
            response = httpx.post(f"{server.base}/webhooks/stripe", content=payload, headers={"stripe-signature": header}, timeout=30)
            assert response.status_code in (200, 400), f"{kind}: {response.status_code} {response.text[:200]}"
            if not signed:
                assert response.status_code == 400

        deliver()
        assert db_query(settings.database_url, "SELECT count(*) FROM invoices") == [(0,)]


class TestImporterSurvivesAnything:
    """Any CSV (broken quoting, odd encodings, absurd values): a clear exit 0 or 1, and a refused file writes nothing."""

    def test_csv(self, cli: Any, settings: Settings, tmp_path: Path) -> None:
        header = "email,name,amount,currency,description,due_date,number,locale"
        cell = st.one_of(
            text,
            st.sampled_from(
                ["a@example.com", "A@Example.COM", "120.50", "1e9", "-1", "0", "eur", "EUR", "jpy", "xxx", "2030-01-31", "31/01/2030"]
            ),
            st.sampled_from(['"', '""', '="cmd"', "\x00", "\r\n", ",", "INV-000001", "de", "zz"]),
        )
        rows = st.lists(st.lists(cell, min_size=0, max_size=10), max_size=6)
        counter = {"n": 0}

        @FUZZ
        @given(rows=rows, with_header=st.booleans(), encoding=st.sampled_from(["utf-8", "utf-16", "latin-1"]))
        def run(rows: list[list[str]], with_header: bool, encoding: str) -> None:
            counter["n"] += 1
            lines = ([header] if with_header else []) + [",".join(row) for row in rows]
            path = tmp_path / f"fuzz{counter['n']}.csv"
            path.write_bytes("\n".join(lines).encode(encoding, errors="replace"))
            before = db_query(settings.database_url, "SELECT count(*) FROM invoices")
            result = cli("import", str(path))
            assert result.code in (0, 1), (result.code, result.err[-500:])
            assert "Traceback" not in result.err
            if result.code == 1:
                assert db_query(settings.database_url, "SELECT count(*) FROM invoices") == before

        run()
