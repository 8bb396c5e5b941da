"""Payday with Locust: 200 customers open their link, pay with their saved card, and look again.

    .venv/bin/python load/bench_locust.py [--runs 3] [--users 200] [--spawn-rate 50] [--duration 60] [--wait 1,2]
                                          [--database sqlite|postgres] [--keep]

Goals (issue 15): the Locust payday scenario (open -> pay with saved card -> webhook -> receipt
queued), 200 users: 0 failures, p95 <= 100 ms and p99 <= 250 ms for the page.

Each run: localstripe starts (`python -m localstripe --from-scratch`, its pickled store in the work
directory, as tests/harness.py starts it); one Stripe customer per user with a card 4242 attached is
created through the Stripe SDK; a fresh database (SQLite file, or PostgreSQL on 127.0.0.1:5432 /
BENCH_POSTGRES_URL, dropped at the end) gets those customers, their saved cards and an open invoice
each with a sent link (load/_common.py seed_payday); the app runs as the Procfile runs it (1 worker,
--proxy-headers as in the Procfile: each simulated customer sends an address of its own in
X-Forwarded-For, as behind a load balancer, so the brakes count per customer; POSTS_PER_CLIENT_MINUTE
high in case the proxy headers are not believed) and localstripe's
webhooks are pointed at it. Locust (headless, load/locustfile.py) runs --users customers for
--duration seconds. Each pays once (one PaymentIntent each: localstripe pickles its whole store on
every write, so payments are kept to one per user). Afterwards, within 30 s: every customer who
pressed Pay has a paid invoice, a succeeded payment, the payment_intent.succeeded webhook recorded,
and one receipt queued.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from _common import (
    LOAD,
    ROOT,
    STRIPE_SECRET,
    WEBHOOK_SECRET,
    Goal,
    Server,
    app_command,
    bench_env,
    db_scalar,
    free_port,
    fresh_database,
    repeat,
    seed_payday,
    summarise,
    workdir,
)

PAGE = "/pay/l/[link] (page)"


def start_localstripe(work: Path) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "localstripe", "--port", str(port), "--from-scratch"]
    server = Server(command, {"TMPDIR": str(work)}, port, work / "localstripe.log")
    server.wait_ready("/js.stripe.com/v3/")
    return server


def stripe_customers(base: str, users: int) -> list[tuple[str, str]]:
    """One Stripe customer with a card 4242 attached (its default) per user, through the SDK."""
    import stripe

    client = stripe.StripeClient(STRIPE_SECRET, base_addresses={"api": base}, max_network_retries=0)  # type: ignore[arg-type]

    def one(i: int) -> tuple[str, str]:
        customer = client.v1.customers.create({"email": f"locust{i}@example.com", "name": f"Payday Customer {i}"})
        card = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}
        pm = client.v1.payment_methods.create({"type": "card", "card": card})  # type: ignore[typeddict-item]
        client.v1.payment_methods.attach(pm.id, {"customer": customer.id})
        client.v1.customers.update(customer.id, {"invoice_settings": {"default_payment_method": pm.id}})
        return customer.id, pm.id

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(users)))


def run_locust(host: str, customers: Path, work: Path, args: argparse.Namespace, run: int) -> tuple[dict[str, dict[str, str]], str]:
    prefix = work / f"locust-{run}"
    command = [
        str(Path(sys.executable).with_name("locust")), "-f", str(LOAD / "locustfile.py"), "--headless",
        "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration}s", "--host", host,
        "--only-summary", "--csv", str(prefix), "--loglevel", "WARNING", "--exit-code-on-error", "0", "--stop-timeout", "10",
    ]  # fmt: skip
    env = {**os.environ, "PAYDAY_CUSTOMERS": str(customers), "PAYDAY_WAIT": args.wait}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.duration + 120, cwd=ROOT)
    stats_file = Path(f"{prefix}_stats.csv")
    if result.returncode != 0 or not stats_file.exists():
        raise RuntimeError(f"locust failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    with stats_file.open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    failures = Path(f"{prefix}_failures.csv")
    return rows, failures.read_text() if failures.exists() else ""


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()  # type: ignore[no-any-return]


def one_run(args: argparse.Namespace, work: Path, run: int, problems: list[str]) -> dict[str, float]:
    here = work / f"run-{run}"
    here.mkdir()
    stripe = start_localstripe(here)
    try:
        started = time.perf_counter()
        cards = stripe_customers(stripe.base, args.users)
        print(f"   {args.users} Stripe customers with a card in {time.perf_counter() - started:.1f} s", flush=True)
        with fresh_database(args.database, here) as url:
            links = seed_payday(url, args.users, prefix="locust", cards=cards)
            customers = here / "customers.jsonl"
            customers.write_text(
                "".join(
                    json.dumps(
                        {"token": link.token, "link": link.link_id.hex, "payment_method": pm, "address": f"10.0.{i // 250}.{i % 250 + 1}"}
                    )
                    + "\n"
                    for i, (link, (_, pm)) in enumerate(zip(links, cards, strict=True))
                )
            )
            port = free_port()
            env = bench_env(
                url,
                app_port=port,
                STRIPE_API_BASE=stripe.base,
                STRIPE_JS_URL=f"{stripe.base}/js.stripe.com/v3/",
                STRIPE_TIMEOUT_SECONDS="20",
                POSTS_PER_CLIENT_MINUTE="1000000",
                PROMETHEUS_MULTIPROC_DIR=tempfile.mkdtemp(dir=here),
            )
            with Server(app_command(port), env, port, here / "app.log") as app:
                app.wait_ready()
                httpx.post(
                    f"{stripe.base}/_config/webhooks/paylink",
                    data={"url": f"{app.base}/webhooks/stripe", "secret": WEBHOOK_SECRET},
                    timeout=10,
                ).raise_for_status()
                rows, failures = run_locust(app.base, customers, here, args, run)
                paid = int(rows.get("/pay/l/[link] (pay)", {}).get("Request Count", 0)) - int(
                    rows.get("/pay/l/[link] (pay)", {}).get("Failure Count", 0)
                )

                def settled() -> bool:
                    webhooks = db_scalar(
                        url, "SELECT count(*) FROM webhook_events WHERE type = 'payment_intent.succeeded' AND processed_at IS NOT NULL"
                    )
                    return webhooks >= max(paid, db_scalar(url, "SELECT count(*) FROM invoices WHERE status = 'paid'"))

                webhooks_in = wait_for(settled, 30)
                errors = app.server_errors()
            counts = {
                "invoices paid": db_scalar(url, "SELECT count(*) FROM invoices WHERE status = 'paid'"),
                "payments succeeded": db_scalar(url, "SELECT count(*) FROM payments WHERE status = 'succeeded'"),
                "webhooks payment_intent.succeeded": db_scalar(
                    url, "SELECT count(*) FROM webhook_events WHERE type = 'payment_intent.succeeded' AND processed_at IS NOT NULL"
                ),
                "receipts queued": db_scalar(url, "SELECT count(*) FROM outbox WHERE kind = 'receipt'"),
            }
    finally:
        stripe.stop()
    total = rows["Aggregated"]
    page = rows.get(PAGE, {})
    # A pay POST still in flight when locust stops is paid but not counted by locust: at least `paid`.
    if not webhooks_in or len(set(counts.values())) != 1 or counts["invoices paid"] < paid:
        problems.append(f"run {run + 1}: {paid} customers saw their payment go through (POST 303), but {counts}")
    if int(total["Failure Count"]):
        problems.append(f"run {run + 1}: {total['Failure Count']} failures:\n{failures[-1500:]}")
    if errors:
        problems.append(f"run {run + 1}: {errors} server errors logged by the app")
    print(f"   locust: {total['Request Count']} requests, {total['Failure Count']} failures, {paid} paid (POST 303); {counts}", flush=True)

    def figure(row: dict[str, str], column: str) -> float:
        value = row.get(column, "")
        return float(value) if value not in ("", "N/A") else float("nan")

    return {
        "failures": float(total["Failure Count"]),
        "requests": float(total["Request Count"]),
        "req/s (all)": figure(total, "Requests/s"),
        "customers who paid": float(paid),
        "page requests": figure(page, "Request Count"),
        "page p50 ms": figure(page, "50%"),
        "page p95 ms": figure(page, "95%"),
        "page p99 ms": figure(page, "99%"),
        "pay POST p50 ms": figure(rows.get("/pay/l/[link] (pay)", {}), "50%"),
        "pay POST p95 ms": figure(rows.get("/pay/l/[link] (pay)", {}), "95%"),
        "handoff p95 ms": figure(rows.get("/pay/[token] (handoff)", {}), "95%"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="measure this many times; figures as min/median/max (default 3)")
    parser.add_argument("--users", type=int, default=200, help="simulated customers, one link and one payment each (default 200)")
    parser.add_argument("--spawn-rate", type=float, default=50, help="customers started per second (default 50)")
    parser.add_argument("--duration", type=int, default=60, help="seconds of load (default 60)")
    parser.add_argument("--wait", default="1,2", help="think time between a customer's steps, MIN,MAX seconds (default 1,2)")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (locust CSVs, logs, localstripe store)")
    args = parser.parse_args()
    problems: list[str] = []
    with workdir("locust", keep=args.keep) as work:
        runs = repeat(max(1, args.runs), lambda run: one_run(args, work, run, problems))
    ok = summarise(
        f"locust payday: {args.users} customers (open -> pay with saved card -> webhook -> receipt queued), "
        f"{args.duration} s, think time {args.wait} s, {args.database}, 1 uvicorn worker, localstripe",
        runs,
        [
            Goal("failures", "<=", 0, "every request of every customer"),
            Goal("page p95 ms", "<=", 100.0, "GET /pay/l/<link>"),
            Goal("page p99 ms", "<=", 250.0, "GET /pay/l/<link>"),
        ],
        notes=[
            "locust's percentiles are rounded (2 significant digits above 100 ms)",
            "pay POST latency is mostly localstripe's: it pickles its whole store after every write, one request at a time",
        ],
    )
    for problem in problems:
        print(f"  CHECK FAILED: {problem}")
    print(f"  goals: {'all PASS' if ok else 'some MISS'}; checks: {'all passed' if not problems else f'{len(problems)} FAILED'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
