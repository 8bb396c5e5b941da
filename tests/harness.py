"""Real components for the tests: localstripe, aiosmtpd, uvicorn, all on free ports of this machine."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import hashlib
import hmac
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import stripe
import uvicorn
from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_SECRET = "whsec_paylink_test_secret"
STRIPE_SECRET = "sk_test_paylink"
PAY_LINK = re.compile(r"https?://[^\s<>\"]+/pay/[A-Za-z0-9_.\-]+")
VERIFY_LINK = re.compile(r"https?://[^\s<>\"]+/verify/[A-Za-z0-9_.\-]+")

CARD_OK = "4242424242424242"
CARD_3DS = "4000002760003184"
CARD_DECLINED = "4000000000000341"


def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Run blocking code that starts its own event loop (asyncio.run) on a fresh thread.

    Playwright's sync API keeps an event loop running on the main thread, where asyncio.run
    refuses to start; a thread of its own works the same in every test."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = function(*args)
        except BaseException as exc:  # re-raised on the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


_ports = random.SystemRandom()  # (hypothesis seeds the module's own generator inside its tests)


def free_port() -> int:
    """A port nothing listens on. Under pytest-xdist each test process picks from a range of its own below
    the kernel's ephemeral ports (10,000 + 4,000 per process): a port one process was given cannot be given
    to the other before the server that asked for it binds it (the kernel's port 0 could)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit() and int(worker[2:]) < 5:
        low = 10_000 + 4_000 * int(worker[2:])
        for _ in range(200):
            port = _ports.randrange(low, low + 4_000)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- localstripe -------------------------------------------------------------------------------------


class LocalStripe:
    """localstripe as its own process, with its pickled store in a private temp directory."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "localstripe.log", "wb")
        env = dict(os.environ, TMPDIR=str(workdir))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "localstripe", "--port", str(self.port), "--from-scratch"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
        wait_until(self._answers, timeout=20, what="localstripe to start")
        self.client = stripe.StripeClient(STRIPE_SECRET, base_addresses={"api": self.base}, max_network_retries=0)  # type: ignore[arg-type]

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError("localstripe exited; see localstripe.log")
        try:
            return httpx.get(f"{self.base}/js.stripe.com/v3/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def register_webhook(self, url: str, secret: str = WEBHOOK_SECRET) -> None:
        response = httpx.post(f"{self.base}/_config/webhooks/paylink", data={"url": url, "secret": secret}, timeout=5)
        response.raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()

    # Test data, made through the real SDK the way a merchant's other systems would.

    def customer_with_cards(self, email: str, name: str, *cards: str) -> tuple[str, list[str]]:
        customer = self.client.v1.customers.create({"email": email, "name": name})
        pm_ids = [self.add_card(customer.id, number) for number in cards]
        if pm_ids:
            self.client.v1.customers.update(customer.id, {"invoice_settings": {"default_payment_method": pm_ids[0]}})
        return customer.id, pm_ids

    def add_card(self, customer_id: str, number: str) -> str:
        pm = self.client.v1.payment_methods.create(
            {"type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"}}  # type: ignore[typeddict-item]
        )
        self.client.v1.payment_methods.attach(pm.id, {"customer": customer_id})
        return str(pm.id)

    def payment_intents_for(self, customer_id: str) -> list[Any]:
        intents = self.client.v1.payment_intents.list({"limit": 100})
        return [pi for pi in intents.auto_paging_iter() if pi.customer == customer_id]


def signed_event(event: dict[str, Any], secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> tuple[bytes, str]:
    """A payload and Stripe-Signature header exactly as Stripe would send them."""
    payload = json.dumps(event).encode()
    t = int(time.time()) if timestamp is None else timestamp
    signature = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return payload, f"t={t},v1={signature}"


# --- SMTP --------------------------------------------------------------------------------------------


class Mailbox:
    """An aiosmtpd handler that keeps what it receives; `replies` scripts failures (e.g. '451 ...')."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.replies: deque[str] = deque()  # answers to DATA, e.g. "451 try later", "554 spam"
        self.rcpt_replies: deque[str] = deque()  # answers to RCPT TO, e.g. "550 5.1.1 no such user"
        self._lock = threading.Lock()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]) -> str:
        with self._lock:
            if self.rcpt_replies:
                return self.rcpt_replies.popleft()
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            if self.replies:
                return self.replies.popleft()
            message = email.message_from_bytes(envelope.content, policy=email.policy.default)
            self.messages.append(message)  # type: ignore[arg-type]
        return "250 Message accepted for delivery"

    def wait_for(self, count: int, timeout: float = 15.0) -> list[EmailMessage]:
        wait_until(lambda: len(self.messages) >= count, timeout=timeout, what=f"{count} email(s), have {len(self.messages)}")
        return list(self.messages)

    def to(self, recipient: str) -> list[EmailMessage]:
        return [m for m in self.messages if recipient in str(m["To"])]


class SmtpServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.mailbox = Mailbox()
        self.controller = Controller(self.mailbox, hostname="127.0.0.1", port=self.port)

    def start(self) -> SmtpServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller._thread is not None:
            self.controller.stop()


def text_part(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None, "email has no text part"
    return str(part.get_content())


def html_part(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None, "email has no html part"
    return str(part.get_content())


def pay_link_in(message: EmailMessage) -> str:
    match = PAY_LINK.search(text_part(message))
    assert match, "no payment link in the email's text part"
    return match.group(0)


# --- the app under uvicorn -----------------------------------------------------------------------------


class AppServer:
    """The real app under uvicorn in a thread, so localstripe's webhooks reach it over HTTP."""

    def __init__(self, app: Any, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", access_log=False, loop="asyncio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> AppServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=20, what="the app to start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


# --- a real network fault between us and Stripe ---------------------------------------------------------


def relay(handler: Any, target: str, body: bytes) -> None:
    """Forward the request a proxy's handler (http.server) received to `target`, and its answer back."""
    headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "content-length")}
    upstream = httpx.request(handler.command, target + handler.path, content=body, headers=headers, timeout=30)
    handler.send_response(upstream.status_code)
    for key, value in upstream.headers.items():
        if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
            handler.send_header(key, value)
    handler.send_header("content-length", str(len(upstream.content)))
    handler.end_headers()
    handler.wfile.write(upstream.content)


class StallingProxy:
    """An HTTP proxy in front of localstripe that never answers requests whose path matches `stall`.

    It makes a real timeout on the wire (the request never reaches Stripe), not a mocked one."""

    def __init__(self, target: str, stall: str) -> None:
        import http.server

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.stalled: list[str] = []
        proxy = self
        pattern = re.compile(stall)

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if pattern.search(self.path):
                    proxy.stalled.append(self.path)
                    time.sleep(5)  # longer than the client's timeout; the request is dropped
                    return
                relay(self, target, body)

            do_GET = do_POST = do_DELETE = _forward

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> StallingProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- databases ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """Create a uniquely named database on the server behind `admin_url`; drop it afterwards."""
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(admin_url)
    name = f"paylink_test_{uuid.uuid4().hex[:12]}"
    dsn = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    in_thread(asyncio.run, admin(f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        in_thread(asyncio.run, admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def db_execute(database_url: str, sql: str, **params: Any) -> None:
    """Change the database behind the app's back (only to set up a state, e.g. an expired link)."""
    from sqlalchemy import text

    from plumbing.db import create_engine

    async def run() -> None:
        engine = create_engine(database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(sql), params)
        finally:
            await engine.dispose()

    in_thread(asyncio.run, run())


def db_query(database_url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Read the app's database the way an operator would, on SQLite or PostgreSQL alike."""
    from sqlalchemy import text

    from plumbing.db import create_engine

    async def run() -> list[tuple[Any, ...]]:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as conn:
                return [tuple(row) for row in (await conn.execute(text(sql), params)).all()]
        finally:
            await engine.dispose()

    return in_thread(asyncio.run, run())  # type: ignore[no-any-return]


class MigratedTemplates:
    """Databases the migrations built once per test session, copied for each test: a SQLite file
    copied into place, a PostgreSQL database created with `CREATE DATABASE … TEMPLATE`. Running the
    migrations for every test cost 0.3-1 s each. The migrations themselves stay tested: the template
    is built by them, and tests/integration/test_finance_data.py runs them on a database of its own."""

    def __init__(self, directory: Path, postgres_admin_url: str | None) -> None:
        self._directory = directory
        self._postgres_admin_url = postgres_admin_url
        self._sqlite: Path | None = None
        self._postgres: str | None = None  # the template database's name
        self._lock = threading.Lock()

    def fill(self, database_url: str) -> None:
        """Make the (new, empty) database at `database_url` a migrated one."""
        from sqlalchemy.engine import make_url

        from plumbing.db import migrate_sync

        url = make_url(database_url)
        if url.get_backend_name() == "sqlite":
            target = Path(url.database or "")
            if target.exists():  # a test wrote to it before asking for settings: migrate it in place
                in_thread(migrate_sync, database_url)
                return
            import shutil

            shutil.copyfile(self._sqlite_template(), target)
            return
        template = self._postgres_template()
        name = url.database
        self._admin(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{template}' AND pid <> pg_backend_pid()",  # noqa: S608 (our own name)
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
            f'CREATE DATABASE "{name}" TEMPLATE "{template}"',
        )

    def _sqlite_template(self) -> Path:
        with self._lock:
            if self._sqlite is None:
                import sqlite3

                from plumbing.db import migrate_sync

                path = self._directory / "template.db"
                in_thread(migrate_sync, f"sqlite+aiosqlite:///{path}")
                with contextlib.closing(sqlite3.connect(path)) as conn:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file
                self._sqlite = path
            return self._sqlite

    def _postgres_template(self) -> str:
        from sqlalchemy.engine import make_url

        from plumbing.db import migrate_sync

        with self._lock:
            if self._postgres is None:
                assert self._postgres_admin_url, "TEST_POSTGRES_URL is not set"
                name = f"paylink_template_{uuid.uuid4().hex[:12]}"
                self._admin(f'CREATE DATABASE "{name}"')
                url = make_url(self._postgres_admin_url).set(database=name).render_as_string(hide_password=False)
                in_thread(migrate_sync, url)
                self._postgres = name
            return self._postgres

    def _admin(self, *statements: str) -> None:
        import asyncpg
        from sqlalchemy.engine import make_url

        assert self._postgres_admin_url
        dsn = make_url(self._postgres_admin_url).set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)

        async def run() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                for sql in statements:
                    await conn.execute(sql)
            finally:
                await conn.close()

        in_thread(asyncio.run, run())

    def close(self) -> None:
        if self._postgres is not None:
            self._admin(f'DROP DATABASE IF EXISTS "{self._postgres}" WITH (FORCE)')
