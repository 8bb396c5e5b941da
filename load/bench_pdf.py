"""Benchmark: invoice and receipt PDFs per second (WeasyPrint, the same templates as GET …/invoice.pdf).

Renders a three-line invoice with two tax rates, and its receipt, with the merchant's logo, in the
four languages, on the PDF thread pool exactly as the app does (plumbing/pdf.py), for a few seconds;
prints PDFs/s as min/median/max over --runs runs (default 3). No database: the document's facts are built in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import repeat, summarise  # noqa: E402

from links.lines import make_item, totals  # noqa: E402
from payments.documents import Document, DocumentKind, ReceiptFacts, render_document  # noqa: E402
from plumbing.pdf import PDF_THREADS  # noqa: E402
from plumbing.settings import Settings  # noqa: E402

ENV = {
    "LINK_SECRET_KEYS": "bench-key-0123456789abcdef",
    "STRIPE_SECRET_KEY": "sk_test_bench",
    "STRIPE_PUBLISHABLE_KEY": "pk_test_bench",
    "STRIPE_WEBHOOK_SECRET": "whsec_bench",
    "MERCHANT_NAME": "Acme Consulting GmbH",
    "MERCHANT_ADDRESS": "Hauptstraße 5|10115 Berlin|Germany",
    "MERCHANT_TAX_ID": "DE123456789",
    "MERCHANT_SUPPORT_EMAIL": "help@acme.test",
    "MERCHANT_LOGO_PATH": str(ROOT / "samples" / "logo.svg"),
}


def document() -> Document:
    lines = [make_item(*spec.split("|"), "eur") for spec in ("Consulting|3|400.00|19", "Travel|1|85.50|7", "Printed report|2|12.25|19")]
    sums = totals(lines)
    now = datetime.now(UTC)
    invoice: Any = SimpleNamespace(
        number="INV-000001", currency="eur", amount_due=sums.total, amount_paid=sums.total, amount_refunded=0,
        notes="Thank you for your business.", due_date=now.date(), status="paid", created_at=now,
    )  # fmt: skip
    customer: Any = SimpleNamespace(
        name="Ann Lee", email="ann@example.com", address_line1="Friedrichstraße 1", address_line2=None,
        postal_code="10117", city="Berlin", country="DE", locale="de",
    )  # fmt: skip
    receipt = ReceiptFacts("RCT-000001", now, sums.total, "eur", "visa", "4242")
    return Document(invoice, customer, None, lines, sums, now.date(), receipt)


async def one_run(settings: Settings, seconds: float) -> float:
    doc = document()
    kinds: list[DocumentKind] = ["invoice", "receipt"]
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = [render_document(settings, kinds[i % 2], doc, ("en", "de", "fr", "es")[i % 4]) for i in range(done, done + PDF_THREADS * 2)]
        for pdf in await asyncio.gather(*batch):
            assert pdf.startswith(b"%PDF")
        done += len(batch)
    return done / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measure this many times; figures as min/median/max (default 3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    args = parser.parse_args()
    settings = Settings.from_env(ENV)
    asyncio.run(render_document(settings, "invoice", document(), "en"))  # warm up: fonts, templates
    runs = repeat(max(1, args.runs), lambda run: {"PDFs/s": asyncio.run(one_run(settings, args.seconds))})
    summarise(f"PDFs: invoice + receipt, 4 languages, PDF threads: {PDF_THREADS}, {args.seconds:g} s a run", runs, [])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
