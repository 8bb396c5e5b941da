"""Session-wide real components and per-test app instances. See tests/harness.py."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# anyio imports some modules lazily, and pytest rewrites anyio's modules (it ships a pytest plugin).
# Rewriting runs ast.parse, which on Python 3.11 can fail when two threads parse at once (the app's
# server thread and this one). Import them here, on the main thread, before any server starts.
import hypothesis  # noqa: E402, F401  (the same: its pytest plugin imports lazily)
from anyio import open_file as _open_file  # noqa: E402, F401

from plumbing.settings import Settings  # noqa: E402
from tests.harness import (  # noqa: E402
    STRIPE_SECRET,
    WEBHOOK_SECRET,
    AppServer,
    LocalStripe,
    MigratedTemplates,
    SmtpServer,
    free_port,
    in_thread,
    postgres_database,
)

LINK_KEY = "test-link-key-0123456789abcdef"


@pytest.fixture(scope="session")
def localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStripe]:
    server = LocalStripe(tmp_path_factory.mktemp("localstripe"))
    yield server
    server.stop()


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    yield server
    server.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `postgres` run on SQLite and again on PostgreSQL (when TEST_POSTGRES_URL is set)."""
    if "backend" in metafunc.fixturenames:
        backends = ["sqlite"]
        if metafunc.definition.get_closest_marker("postgres"):
            backends.append("postgres")
        metafunc.parametrize("backend", backends)


@pytest.fixture
def database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh database for each test: a SQLite file, or a new PostgreSQL database dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'paylink.db'}"
        return
    admin_url = os.environ.get("TEST_POSTGRES_URL")
    if not admin_url:
        pytest.skip("TEST_POSTGRES_URL is not set")
    with postgres_database(admin_url) as url:
        yield url


@pytest.fixture
def env(database_url: str, localstripe: LocalStripe, smtp: SmtpServer) -> dict[str, str]:
    """The environment an operator would set, pointed at this test's real components."""
    port = free_port()
    return {
        "DATABASE_URL": database_url,
        "BASE_URL": f"http://127.0.0.1:{port}",
        "LINK_SECRET_KEYS": LINK_KEY,
        "STRIPE_SECRET_KEY": STRIPE_SECRET,
        "STRIPE_PUBLISHABLE_KEY": "pk_test_paylink",
        "STRIPE_API_BASE": localstripe.base,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STRIPE_MAX_NETWORK_RETRIES": "0",
        "STRIPE_TIMEOUT_SECONDS": "10",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp.port),
        "MAIL_FROM": "Acme Billing <billing@acme.test>",
        "MERCHANT_NAME": "Acme Consulting",
        "FINANCE_EMAIL": "finance@acme.test",
        "OUTBOX_IN_PROCESS": "true",
        "OUTBOX_POLL_SECONDS": "0.2",
        "OUTBOX_BACKOFF_BASE_SECONDS": "0.2",
        "OUTBOX_BACKOFF_MAX_SECONDS": "1",
        "REMINDER_INTERVAL_SECONDS": "0",  # tests run `remind` themselves
    }


@pytest.fixture
def settings(env: dict[str, str], migrated: MigratedTemplates) -> Settings:
    """The settings of this test's app, its database migrated to head (a copy of a database the
    migrations built once per session: running them for every test cost ~0.3-1 s each)."""
    migrated.fill(env["DATABASE_URL"])
    return Settings.from_env(env)


@pytest.fixture(scope="session")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MigratedTemplates]:
    templates = MigratedTemplates(tmp_path_factory.mktemp("migrated"), os.environ.get("TEST_POSTGRES_URL"))
    yield templates
    templates.close()


@pytest.fixture
def server(settings: Settings, env: dict[str, str], localstripe: LocalStripe) -> Iterator[AppServer]:
    """The app under uvicorn, with localstripe's webhooks pointed at it."""
    from app import create_app

    port = int(env["BASE_URL"].rsplit(":", 1)[1])
    app_server = AppServer(create_app(settings), port).start()
    localstripe.register_webhook(f"{app_server.base}/webhooks/stripe")
    yield app_server
    app_server.stop()


@pytest.fixture
def start_server(env: dict[str, str], settings: Settings, localstripe: LocalStripe) -> Iterator[Any]:
    """Start the app with some settings changed (same database), e.g. start_server(STRIPE_API_BASE=...)."""
    from app import create_app

    started: list[AppServer] = []

    def start(**overrides: str) -> AppServer:
        port = int(env["BASE_URL"].rsplit(":", 1)[1])
        app_server = AppServer(create_app(Settings.from_env({**env, **overrides})), port).start()
        localstripe.register_webhook(f"{app_server.base}/webhooks/stripe")
        started.append(app_server)
        return app_server

    yield start
    for app_server in started:
        app_server.stop()


@pytest.fixture
def browser_client(server: AppServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base, timeout=30, follow_redirects=True) as client:
        yield client


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        import json

        return json.loads(self.out)


@pytest.fixture
def cli(env: dict[str, str], settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run `python -m links …` in-process with the test's environment."""
    from cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def run(*args: str) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = in_thread(main, list(args))
            except SystemExit as exc:  # argparse usage errors
                code = int(exc.code or 0)
        return CliResult(code, out.getvalue(), err.getvalue())

    return run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Browser tests last: Playwright's sync API keeps an event loop running on the main thread for
    the rest of the session, and many integration tests call asyncio.run there."""
    items.sort(key=lambda item: "tests/browser/" in str(item.path))


def pytest_report_header() -> list[str]:
    url = os.environ.get("TEST_POSTGRES_URL")
    return [f"postgres: {url or 'not set (SQLite only)'}"]
