"""`make demo`: localstripe, a mail catcher and the app on this machine, and one invoice to pay.

Prints the payment link and where the emails are. Ctrl-C stops everything.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import stripe
from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var" / "demo"
MAIL_DIR = VAR / "mail"
PY = sys.executable


def port_or_free(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def wait_for(url: str, what: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{what} exited early; see {VAR}/*.log")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    sys.exit(f"{what} did not start within {timeout:.0f}s; see {VAR}/*.log")


class MailCatcher:
    """A local SMTP server: every message is saved as .eml and summarised on the terminal."""

    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        path = MAIL_DIR / f"{self.count:03d}.eml"
        path.write_bytes(envelope.content)
        body = message.get_body(preferencelist=("plain",))
        text = body.get_content() if body else ""  # type: ignore[union-attr]
        link = re.search(r"https?://\S+/(?:pay|verify)/[A-Za-z0-9._-]+", text)  # ours, not a URL in an invoice's text
        summary = f"\n📧 Mail to {message['To']}: {message['Subject']}\n   saved as {path}"
        print(summary + (f"\n   link: {link.group(0)}" if link else ""), flush=True)
        return "250 OK"


def main() -> int:
    shutil.rmtree(VAR, ignore_errors=True)
    MAIL_DIR.mkdir(parents=True)
    stripe_port, app_port, smtp_port = port_or_free(8420), port_or_free(8000), port_or_free(1025)
    stripe_base = f"http://127.0.0.1:{stripe_port}"
    base_url = f"http://127.0.0.1:{app_port}"
    env = dict(
        os.environ,
        DATABASE_URL=f"sqlite+aiosqlite:///{VAR / 'paylink.db'}",
        BASE_URL=base_url,
        LINK_SECRET_KEYS=secrets.token_urlsafe(32),
        STRIPE_SECRET_KEY="sk_test_demo",
        STRIPE_PUBLISHABLE_KEY="pk_test_demo",
        STRIPE_API_BASE=stripe_base,
        STRIPE_WEBHOOK_SECRET="whsec_" + secrets.token_urlsafe(24),
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(smtp_port),
        MAIL_FROM="billing@paylink.localhost",  # no display name: emails come from the legal name
        # A German merchant: the demo's invoices charge German VAT (19 % and 7 %).
        MERCHANT_NAME="Paylink Demo GmbH",
        MERCHANT_ADDRESS="Friedrichstraße 68|10117 Berlin|Germany",
        MERCHANT_TAX_ID="DE 123 456 789",
        MERCHANT_SUPPORT_EMAIL="accounts@paylink.localhost",
        MERCHANT_SUPPORT_PHONE="+49 30 1234 5678",
        MERCHANT_LOGO_PATH=str(ROOT / "samples" / "logo.svg"),
        MERCHANT_BRAND_COLOR="#0b5cad",
        INVOICE_PDF_ATTACH="true",
        FINANCE_EMAIL="finance@paylink.localhost",
        OUTBOX_IN_PROCESS="true",
        OUTBOX_POLL_SECONDS="1",
        TMPDIR=str(VAR),
    )
    children: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=open(VAR / log, "wb"), stderr=subprocess.STDOUT)
        children.append(process)
        return process

    catcher = Controller(MailCatcher(), hostname="127.0.0.1", port=smtp_port)
    try:
        print(f"Starting the sandbox payment processor (localstripe) on {stripe_base} …", flush=True)
        ls = start([PY, "-m", "localstripe", "--port", str(stripe_port), "--from-scratch"], "localstripe.log")
        wait_for(f"{stripe_base}/js.stripe.com/v3/", "localstripe", ls)
        catcher.start()
        print(f"Mail catcher listening on 127.0.0.1:{smtp_port}; emails are saved in {MAIL_DIR}", flush=True)
        subprocess.run([PY, "-m", "links", "migrate"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        web = start(
            [
                PY,
                "-m",
                "uvicorn",
                "--factory",
                "app:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(app_port),
                "--no-access-log",
                "--log-level",
                "info",
            ],
            "app.log",
        )
        wait_for(f"{base_url}/health", "the app", web)
        webhook = {"url": f"{base_url}/webhooks/stripe", "secret": env["STRIPE_WEBHOOK_SECRET"]}
        httpx.post(f"{stripe_base}/_config/webhooks/demo", data=webhook).raise_for_status()

        # A demo customer whose card is already saved in the sandbox processor.
        client = stripe.StripeClient("sk_test_demo", base_addresses={"api": stripe_base})  # type: ignore[arg-type]
        customer = client.v1.customers.create({"email": "ann@example.com", "name": "Ann Lee"})
        for number in ("4242424242424242", "4000002760003184"):
            card = {"number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"}
            pm = client.v1.payment_methods.create({"type": "card", "card": card})  # type: ignore[typeddict-item]
            client.v1.payment_methods.attach(pm.id, {"customer": customer.id})
            if number.startswith("4242"):
                client.v1.customers.update(customer.id, {"invoice_settings": {"default_payment_method": pm.id}})

        def cli(*args: str) -> str:
            return subprocess.run([PY, "-m", "links", *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout

        cli(
            "customer",
            "add",
            "--email",
            "ann@example.com",
            "--name",
            "Ann Lee",
            "--stripe-customer",
            customer.id,
            "--verified",
            "--address-line1",
            "Kastanienallee 12",
            "--postal-code",
            "10435",
            "--city",
            "Berlin",
            "--country",
            "DE",
        )
        created = cli(
            "invoice",
            "create",
            "--customer",
            "ann@example.com",
            "--item",
            "Consulting (hours)|3|120.00|19",
            "--item",
            "Workshop materials|1|45.00|7",
            "--item",
            "Travel (flat fee)|1|60.00|",
            "--currency",
            "eur",
            "--description",
            "Consulting, November",
            "--notes",
            "Thank you for your business. Payable within 30 days.",
            "--due",
            (date.today() + timedelta(days=21)).isoformat(),
            "--send",
            "--json",
        )
        # A second open invoice that may be paid in parts (a 30 % deposit first): either page then
        # offers "pay in full", "pay another amount" and "pay all" (issue 13).
        second = cli(
            "invoice",
            "create",
            "--customer",
            "ann@example.com",
            "--item",
            "Kitchen renovation|1|1200.00|19",
            "--currency",
            "eur",
            "--description",
            "Kitchen renovation",
            "--allow-partial",
            "--min-amount",
            "100.00",
            "--deposit-percent",
            "30",
            "--due",
            (date.today() + timedelta(days=28)).isoformat(),  # within the link's 30 days
            "--send",
            "--json",
        )
        import json

        invoice = json.loads(created)
        deposit_invoice = json.loads(second)
        print("\n" + "=" * 72)
        print(f"Demo invoice {invoice['number']} for Ann Lee: {invoice['amount_due_formatted']}")
        print(f"Open the payment link:\n\n  {invoice['link']['url']}\n")
        print("Ann has two saved cards: Visa 4242 pays at once; the 3184 card asks for 3-D Secure.")
        print(
            f"Her second invoice {deposit_invoice['number']} ({deposit_invoice['amount_due_formatted']}) may be paid in parts, "
            f"a 30 % deposit first:\n\n  {deposit_invoice['link']['url']}\n\nEither page also offers to pay both invoices in one charge."
        )
        print(f"Emails (invoice, receipt) appear below and in {MAIL_DIR}")
        print(
            f"Finance CLI against this demo, in another terminal:  set -a; . {VAR / 'env'}; set +a; .venv/bin/python -m links invoice list"
        )
        print("Press Ctrl-C to stop everything.")
        print("=" * 72, flush=True)
        shared = ("DATABASE_URL", "BASE_URL", "LINK_SECRET_KEYS", "STRIPE_SECRET_KEY", "STRIPE_PUBLISHABLE_KEY", "STRIPE_API_BASE",
                  "STRIPE_WEBHOOK_SECRET", "SMTP_HOST", "SMTP_PORT", "MAIL_FROM", "MERCHANT_NAME", "MERCHANT_ADDRESS", "MERCHANT_TAX_ID",
                  "MERCHANT_SUPPORT_EMAIL", "MERCHANT_SUPPORT_PHONE", "MERCHANT_LOGO_PATH", "INVOICE_PDF_ATTACH")  # fmt: skip
        (VAR / "env").write_text("".join(f"{k}={shlex.quote(env[k])}\n" for k in shared))
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(p.poll() is None for p in children):
            time.sleep(0.5)
        print(f"A demo process stopped unexpectedly; see the logs in {VAR}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopping …")
        return 0
    finally:
        for process in children:
            process.terminate()
        for process in children:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        try:
            catcher.stop()
        except AssertionError:
            pass


if __name__ == "__main__":
    sys.exit(main())
