"""The pay page's own pool on PostgreSQL skips the pre-ping round trip before every read; a
connection the server closed meanwhile (a restart, a failover) is found on use, dropped, and the
read tried again: the customer never sees an error for it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from plumbing.settings import Settings
from tests.harness import CARD_OK, LocalStripe, db_execute
from tests.integration.helpers import issue_invoice


@pytest.mark.postgres
class TestServerClosedThePagesConnections:
    def test_page_still_answers(self, backend: str, cli: Any, localstripe: LocalStripe, server: Any, settings: Settings) -> None:
        if backend != "postgres":
            pytest.skip("the page's own pool is PostgreSQL's (SQLite reads on a read-only connection of its own)")
        issued = issue_invoice(cli, localstripe, CARD_OK)
        with httpx.Client(base_url=server.base, timeout=30, follow_redirects=True) as browser:
            assert browser.get(issued.url).status_code == 200  # the page's pool now holds a connection
            database = make_url(settings.database_url).database
            admin = make_url(settings.database_url).set(database="postgres").render_as_string(hide_password=False)
            # Every connection of the app to its database is closed by the server (as a restart would).
            db_execute(admin, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")  # noqa: S608
            for _ in range(3):
                page = browser.get(issued.url)
                assert page.status_code == 200, page.text[:300]
                assert "Pay €120.50 with Visa •••• 4242" in page.text
