"""Operations on real parts: /metrics after a real journey, health checks that fail when the database
does, request ids in logs, audit entries and answers, and system usage sampled into the database."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import CARD_OK, LocalStripe, db_execute, db_query, free_port, in_thread, wait_until
from tests.integration.helpers import csrf_of, invoice_status, issue_invoice, offered_cards

ROOT = Path(__file__).resolve().parent.parent.parent
METRICS_TOKEN = "metrics-token-0123456789abcdef"


def scrape(base: str, token: str = METRICS_TOKEN) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics answer: (name, sorted labels) -> value."""
    answer = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def pay_through_the_page(base: str, url: str, request_id: str | None = None) -> httpx.Response:
    with httpx.Client(base_url=base, timeout=30, follow_redirects=True) as browser:
        page = browser.get(url)
        assert page.status_code == 200
        headers = {"X-Request-ID": request_id} if request_id else {}
        return browser.post(
            str(page.url), data={"csrf": csrf_of(page.text), "payment_method": offered_cards(page.text)[0]}, headers=headers
        )


class TestMetrics:
    """An operator scrapes /metrics with a bearer token and sees the journey move the counters; without the setting there is no /metrics."""

    @pytest.mark.postgres
    def test_a_journey_moves_the_counters(self, cli, localstripe: LocalStripe, start_server, settings) -> None:
        app = start_server(METRICS_TOKEN=METRICS_TOKEN)
        before = scrape(app.base)
        issued = issue_invoice(cli, localstripe, CARD_OK)
        paid = pay_through_the_page(app.base, issued.url)
        assert "Payment received" in paid.text
        wait_until(lambda: invoice_status(cli, issued.number)["status"] == "paid", what="invoice to be paid")

        def webhook_counted() -> bool:
            now = scrape(app.base)
            moved = sum(
                value(now, "paylink_webhook_events_total", result=r) - value(before, "paylink_webhook_events_total", result=r)
                for r in ("applied", "duplicate")
            )
            return moved >= 1

        wait_until(webhook_counted, timeout=15, what="the webhook to be counted")
        after = scrape(app.base)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert moved("paylink_pay_attempts_total", card="saved", outcome="succeeded") == 1
        assert moved("paylink_http_requests_total", method="GET", route="/pay/{token}", status="303") >= 1
        assert moved("paylink_http_requests_total", method="POST", route="/pay/l/{link_hex}", status="303") >= 1
        assert moved("paylink_http_request_duration_seconds_count", method="POST", route="/pay/l/{link_hex}") >= 1
        assert moved("paylink_webhook_lag_seconds_count") >= 1 or moved("paylink_webhook_events_total", result="duplicate") >= 1
        # Read from the database at scrape time: the invoice email and the receipt were sent.
        assert ("paylink_outbox_pending", ()) in after and ("paylink_outbox_dead", ()) in after
        assert ("paylink_outbox_oldest_pending_age_seconds", ()) in after
        assert value(after, "process_cpu_seconds_total") > 0 and value(after, "paylink_process_resident_memory_bytes") > 0
        # Route templates only: never a link's token or id.
        body = httpx.get(f"{app.base}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
        token = issued.url.rsplit("/", 1)[1]
        assert token not in body and "/pay/l/{link_hex}" in body
        assert "/pay/l/0" not in body and "/pay/l/a" not in body

    def test_outbox_gauges_count_pending_and_dead_messages(self, start_server, settings) -> None:
        app = start_server(METRICS_TOKEN=METRICS_TOKEN, OUTBOX_IN_PROCESS="false")
        old = datetime.now(UTC) - timedelta(minutes=10)
        for n, status in enumerate(("pending", "pending", "dead")):
            _outbox_row(settings.database_url, f"gauge-{n}", status, old)
        after = scrape(app.base)
        assert value(after, "paylink_outbox_pending") == 2
        assert value(after, "paylink_outbox_dead") == 1
        assert 590 <= value(after, "paylink_outbox_oldest_pending_age_seconds") < 900

    def test_the_token_is_required(self, start_server) -> None:
        app = start_server(METRICS_TOKEN=METRICS_TOKEN)
        assert httpx.get(f"{app.base}/metrics").status_code == 401
        assert httpx.get(f"{app.base}/metrics", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        assert httpx.get(f"{app.base}/metrics", headers={"Authorization": f"Basic {METRICS_TOKEN}"}).status_code == 401
        assert httpx.get(f"{app.base}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).status_code == 200

    def test_no_token_setting_no_metrics_route(self, server) -> None:
        assert httpx.get(f"{server.base}/metrics").status_code == 404
        assert httpx.get(f"{server.base}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).status_code == 404


def _outbox_row(database_url: str, key: str, status: str, at: datetime) -> None:
    db_execute(
        database_url,
        "INSERT INTO outbox (kind, recipient, subject, text, html, message_id, status, attempts, next_attempt_at, created_at) "
        "VALUES ('invoice', 'x@example.com', 's', 't', 'h', :mid, :status, 0, :at, :at)",
        mid=f"<{key}@test>",
        status=status,
        at=at,
    )


class TestHealth:
    """A load balancer sends traffic only to processes whose database answers, is migrated and whose outbox moves."""

    def test_live_and_ready(self, server) -> None:
        for path in ("/health", "/health/live"):
            answer = httpx.get(f"{server.base}{path}")
            assert (answer.status_code, answer.json()) == (200, {"status": "ok"})
        ready = httpx.get(f"{server.base}/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ok" and ready.json()["schema"]

    def test_not_ready_when_the_schema_is_behind_the_code(self, server, settings) -> None:
        db_execute(settings.database_url, "UPDATE alembic_version SET version_num = '0009'")
        answer = httpx.get(f"{server.base}/health/ready")
        assert answer.status_code == 503
        assert answer.json() == {"status": "unavailable", "reason": answer.json()["reason"]}
        assert "schema is at 0009" in answer.json()["reason"]
        assert httpx.get(f"{server.base}/health/live").status_code == 200  # the process still answers

    def test_not_ready_on_an_unmigrated_database(self, tmp_path, start_server) -> None:
        empty = tmp_path / "empty.db"
        import sqlite3

        sqlite3.connect(empty).close()  # a file without any table; the app only migrates SQLite at start, so stop that
        app = start_server(DATABASE_URL=f"sqlite+aiosqlite:///{empty}")
        db_execute(f"sqlite+aiosqlite:///{empty}", "DROP TABLE alembic_version")
        answer = httpx.get(f"{app.base}/health/ready")
        assert (answer.status_code, answer.json()) == (503, {"status": "unavailable", "reason": "database not migrated"})

    def test_not_ready_when_the_outbox_is_stuck(self, start_server, settings) -> None:
        app = start_server(OUTBOX_IN_PROCESS="false", READY_OUTBOX_STUCK_MINUTES="5")
        _outbox_row(settings.database_url, "stuck", "pending", datetime.now(UTC) - timedelta(minutes=20))
        answer = httpx.get(f"{app.base}/health/ready")
        assert answer.status_code == 503
        assert answer.json()["reason"].startswith("outbox stuck: a message has been due for 20 minutes")

    @pytest.mark.postgres
    def test_not_ready_when_the_database_is_gone(self, backend, server, database_url) -> None:
        if backend == "sqlite":
            pytest.skip("on SQLite: the schema and unmigrated-file cases above")
        assert httpx.get(f"{server.base}/health/ready").status_code == 200
        # Every connection is cut (pg_terminate_backend) and the database dropped: nothing to reconnect to.
        import asyncpg
        from sqlalchemy.engine import make_url

        url = make_url(database_url)
        dsn = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)

        async def drop() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", url.database)
                await conn.execute(f'DROP DATABASE "{url.database}" WITH (FORCE)')
            finally:
                await conn.close()

        in_thread(asyncio.run, drop())
        answer = httpx.get(f"{server.base}/health/ready", timeout=15)
        assert (answer.status_code, answer.json()) == (503, {"status": "unavailable", "reason": "database unreachable"})
        assert httpx.get(f"{server.base}/health/live").status_code == 200


class TestRequestIds:
    """Support follows one request through the access log, the audit log and the answer by its request id."""

    def test_request_id_in_answer_log_and_audit(
        self, cli, localstripe: LocalStripe, server, settings, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO)
        issued = issue_invoice(cli, localstripe, CARD_OK)
        paid = pay_through_the_page(server.base, issued.url, request_id="support-case-4711")
        assert paid.headers["x-request-id"] == "support-case-4711"
        actions = db_query(settings.database_url, "SELECT action FROM audit_log WHERE request_id = :r", r="support-case-4711")
        assert ("payment.succeeded",) in actions or actions, actions
        lines = [r for r in caplog.records if r.name == "paylink.access" and "request_id=support-case-4711" in r.getMessage()]
        assert lines and "path=/pay/l/{link}" in lines[0].getMessage()
        # The same line as JSON (LOG_FORMAT=json): structured fields, no token.
        from plumbing.logs import JsonFormatter

        line = json.loads(JsonFormatter().format(lines[0]))
        fields = (line["event"], line["route"], line["status"], line["request_id"])
        assert fields == ("request", "/pay/l/{link_hex}", 303, "support-case-4711")
        token = issued.url.rsplit("/", 1)[1]
        assert not [r for r in caplog.records if r.name != "httpx" and token in r.getMessage()]

    def test_an_insane_request_id_is_replaced(self, server) -> None:
        for given in ("short", "x" * 200, "has spaces in it", "<script>alert(1)</script>"):
            answer = httpx.get(f"{server.base}/health/live", headers={"X-Request-ID": given})
            assert answer.headers["x-request-id"] != given
            assert len(answer.headers["x-request-id"]) == 24
        generated = httpx.get(f"{server.base}/health/live").headers["x-request-id"]
        assert generated != httpx.get(f"{server.base}/health/live").headers["x-request-id"]


class TestSystemUsage:
    """Finance asks when the peak is and whether we were slow then: every process samples its CPU, memory and latency."""

    def test_web_samples_and_the_report_names_cpu_and_p95_at_the_peak(
        self, cli, localstripe: LocalStripe, start_server, settings, tmp_path
    ) -> None:
        app = start_server(USAGE_SAMPLE_SECONDS="0.3")
        issued = issue_invoice(cli, localstripe, CARD_OK)
        with httpx.Client(base_url=app.base, follow_redirects=True) as browser:
            for _ in range(5):
                assert browser.get(issued.url).status_code == 200
        wait_until(
            lambda: db_query(settings.database_url, "SELECT count(*) FROM usage_samples WHERE role = 'web' AND requests > 0")[0][0] >= 1,
            what="a usage sample with requests",
        )
        [(cpu, rss, load1)] = db_query(
            settings.database_url, "SELECT cpu_percent, rss_bytes, load1 FROM usage_samples WHERE requests > 0 LIMIT 1"
        )
        assert cpu >= 0 and rss > 10_000_000 and load1 is not None
        opens = "SELECT coalesce(sum(opens), 0) FROM link_opens"
        wait_until(lambda: db_query(settings.database_url, opens)[0][0] >= 5, what="opens recorded")
        # The samples after the first may land later (one every 0.3 s; on a loaded machine the report once saw
        # only the first sample's 2 requests): wait until they count the requests made.
        wait_until(
            lambda: db_query(settings.database_url, "SELECT coalesce(sum(requests), 0) FROM usage_samples WHERE role = 'web'")[0][0] >= 5,
            what="the samples count every request",
        )

        report = cli("report", "usage", "--days", "1", "--json").json()
        hour = datetime.now(UTC).hour
        assert report["peak_hour_utc"] == hour
        system = report["system_by_hour_utc"][hour]
        assert system["cpu_percent"] is not None and system["p95_ms"] is not None and system["requests"] >= 5
        human = cli("report", "usage", "--days", "1")
        assert f"Peak hour for link opens: {hour:02d}:00-{hour:02d}:59 UTC" in human.out
        assert "Then: CPU" in human.out and "p95 latency under" in human.out
        assert "quiet" in human.out or hour in (0, 23)  # the empty hours collapse
        assert len(human.out.splitlines()) < 30

        page = tmp_path / "usage.html"
        assert cli("report", "usage", "--days", "1", "--html", str(page)).code == 0
        html = page.read_text()
        assert html.count("<svg") == 2 and "Peak hour for link opens" in html
        assert "http://" not in html and "https://" not in html  # nothing to fetch

    def test_old_samples_are_deleted(self, start_server, settings) -> None:
        old = datetime.now(UTC) - timedelta(days=10)
        db_execute(
            settings.database_url,
            "INSERT INTO usage_samples (at, role, host, pid, interval_seconds, cpu_percent, rss_bytes, load1, requests) "
            "VALUES (:at, 'web', 'old-host', 1, 60, 5, 1000, 0.1, 0)",
            at=old,
        )
        start_server(USAGE_SAMPLE_SECONDS="0.2", USAGE_KEEP_DAYS="7")
        wait_until(lambda: not db_query(settings.database_url, "SELECT id FROM usage_samples WHERE host = 'old-host'"), what="the purge")


class TestWorkerMetrics:
    """The outbox worker exposes its own metrics port and samples its own usage."""

    def test_worker_port_and_samples(self, env, settings) -> None:
        port = free_port()
        worker_env = {**os.environ, **env, "WORKER_METRICS_PORT": str(port), "METRICS_TOKEN": METRICS_TOKEN, "USAGE_SAMPLE_SECONDS": "0.3"}
        worker_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        process = subprocess.Popen(
            [sys.executable, "-m", "emails.worker"], cwd=ROOT, env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:

            def scraped() -> httpx.Response | None:
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
                except httpx.TransportError:
                    return None

            answer = wait_until(scraped, timeout=20, what="the worker's metrics port")
            assert answer.status_code == 200
            assert "paylink_outbox_pending 0.0" in answer.text and "process_resident_memory_bytes" in answer.text
            assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 401
            wait_until(
                lambda: db_query(settings.database_url, "SELECT count(*) FROM usage_samples WHERE role = 'worker'")[0][0] >= 1,
                what="a worker usage sample",
            )
        finally:
            process.send_signal(signal.SIGTERM)
            output = process.communicate(timeout=20)[0].decode()
        assert process.returncode == 0, output
        assert "worker started" in output
