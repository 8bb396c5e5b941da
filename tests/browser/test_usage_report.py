"""The usage report's HTML page, opened in Chromium as finance would open it: from a file, offline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from playwright.sync_api import Browser

from tests.browser.conftest import ARTIFACTS, DESKTOP
from tests.harness import db_execute, db_query


def _history(database_url: str, link_id: str) -> None:
    """A week of link opens peaking at 10:00 UTC, with the web server's usage samples."""
    today = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    opens_by_hour = {8: 3, 9: 6, 10: 14, 11: 7, 14: 4, 16: 2}
    for days_ago in range(5):
        day = today - timedelta(days=days_ago)
        for hour, count in opens_by_hour.items():
            at = day.replace(hour=hour)
            if at > datetime.now(UTC):
                at -= timedelta(days=7)
            for n in range(count + days_ago % 2):
                db_execute(
                    database_url, "INSERT INTO link_opens (link_id, opened_at) VALUES (:l, :at)", l=link_id, at=at + timedelta(minutes=n)
                )
            cpu = 4.0 + count * 3.5
            buckets = "[0, 2, 10, 20, 8, 4, 1, 0, 0, 0, 0, 0]" if hour == 10 else "[2, 10, 6, 2, 0, 0, 0, 0, 0, 0, 0, 0]"
            db_execute(
                database_url,
                "INSERT INTO usage_samples (at, role, host, pid, interval_seconds, cpu_percent, rss_bytes, load1, requests, "
                "latency_ms_buckets) "
                "VALUES (:at, 'web', 'web-1', 100, 60, :cpu, 150000000, 0.4, 45, :b)",
                at=at + timedelta(minutes=30),
                cpu=cpu,
                b=buckets,
            )


class TestUsageReportPage:
    """A finance lead opens `report usage --html` offline and sees when the peak is and how busy the servers were then."""

    def test_the_page_renders_offline_with_charts_and_the_peak(self, browser: Browser, cli, settings, tmp_path) -> None:
        from pathlib import Path

        samples = Path(__file__).resolve().parent.parent.parent / "samples" / "invoices.csv"
        assert cli("import", str(samples), "--verified", "--send").code == 0
        [(link_id,)] = db_query(settings.database_url, "SELECT id FROM payment_links LIMIT 1")
        _history(settings.database_url, str(link_id))
        page_file = tmp_path / "usage.html"
        made = cli("report", "usage", "--days", "31", "--html", str(page_file))
        assert made.code == 0, made.err

        context = browser.new_context(viewport=DESKTOP)
        page = context.new_page()
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "usage_report.png"), full_page=True)

        assert page.locator("svg").count() == 2
        assert page.locator("svg rect").count() > 48  # 24 hours x 2 series, and the days
        assert page.locator("svg polyline").count() == 1  # the CPU line
        peak = page.locator("#peak").inner_text()
        assert peak.startswith("Peak hour for link opens: 10:00-10:59 UTC")
        assert "Then: CPU" in peak and "p95 latency under 250 ms" in peak
        assert page.locator("tr.peak th").inner_text() == "10:00"
        assert "Busiest days of the month" in page.content()
        assert requests == [page_file.as_uri()], f"the page fetched something: {requests}"
        context.close()
