"""CSV import of N rows with links issued and emails queued, while the web app and the outbox worker run
and webhooks keep arriving.

    .venv/bin/python load/bench_import.py [--runs 3] [--n 10000] [--database both|sqlite|postgres] [--webhook-rate 50] [--keep]

Goals (issues 7 and 15): 10,000 rows in < 10 s with links issued and emails queued (the whole
`python -m links import FILE --send --verified` command: start-up, validation, writes) WHILE the outbox
worker (`python -m emails.worker`, sending to a local aiosmtpd sink) and the web app (`uvicorn --factory
app:create_app`, 1 worker) run; and webhooks keep being answered meanwhile (every one 200; our bound:
p99 <= 1 s during the import).

Each run, for each database (a fresh SQLite file; a PostgreSQL database created on 127.0.0.1:5432, or
BENCH_POSTGRES_URL, and dropped at the end): 3,000 "probe" invoices with live payments are seeded (as
load/bench_webhooks.py does); aiosmtpd (`python -m aiosmtpd -c aiosmtpd.handlers.Sink`), the worker
and the app start; a thread posts signed payment_intent.succeeded events for the probes at
--webhook-rate per second (2 s before the import, for a baseline, then throughout it); the import runs
as a subprocess and is timed. Then: every row's invoice, link and queued email must exist, every probe
answered must have paid its invoice once, and the figures are printed: import wall time, webhook
latency before and during the import (p50/p99/max), and how many emails the worker sent meanwhile.

Earlier (issue 11, SQLite, without the app and worker running): 9.2-13.2 s; with them running 14.4 s.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date, timedelta
from pathlib import Path

from _common import (
    ROOT,
    Goal,
    RawConnection,
    Server,
    app_command,
    bench_env,
    db_scalar,
    free_port,
    fresh_database,
    percentile,
    repeat,
    summarise,
    workdir,
)
from bench_webhooks import seed, sign, succeeded_event

DUE = (date.today() + timedelta(days=60)).isoformat()  # a due date in the future, whenever this runs
PROBES = 3000
GOAL_SECONDS = 10.0


def write_csv(path: Path, n: int) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["email", "name", "amount", "currency", "description", "due_date", "number", "locale"])
        for i in range(n):
            locale = ("en", "de", "fr", "es")[i % 4]
            writer.writerow([f"customer{i}@example.com", f"Customer {i}", f"{10 + i % 500}.{i % 100:02d}", "eur", "Annual service",
                             DUE, f"BENCH-{i:06d}", locale])  # fmt: skip


class WebhookProbe:
    """Posts one signed event at a time, --webhook-rate a second, on a keep-alive connection in a thread
    of its own; keeps each answer's latency with the time it was sent."""

    def __init__(self, port: int, events: list[tuple[bytes, str]], rate: float) -> None:
        self.port, self.events, self.interval = port, events, 1 / rate
        self.samples: list[tuple[float, float, int]] = []  # (sent at, latency s, status)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        connection = RawConnection("127.0.0.1", self.port)
        try:
            for payload, header in self.events:
                if self._stop.is_set():
                    break
                sent = time.perf_counter()
                try:
                    status, _ = await asyncio.wait_for(
                        connection.request(
                            "POST", "/webhooks/stripe", payload, {"stripe-signature": header, "content-type": "application/json"}
                        ),
                        30,
                    )
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                    status = -1
                    await connection.close()
                self.samples.append((sent, time.perf_counter() - sent, status))
                await asyncio.sleep(max(0.0, self.interval - (time.perf_counter() - sent)))
        finally:
            await connection.close()

    def start(self) -> WebhookProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def between(self, start: float, end: float) -> list[tuple[float, float, int]]:
        return [s for s in self.samples if start <= s[0] <= end]


def latency_figures(prefix: str, samples: list[tuple[float, float, int]]) -> dict[str, float]:
    lat = sorted(s[1] * 1000 for s in samples)
    return {
        f"{prefix} webhooks answered": float(len(samples)),
        f"{prefix} webhook p50 ms": percentile(lat, 50),
        f"{prefix} webhook p99 ms": percentile(lat, 99),
        f"{prefix} webhook max ms": lat[-1] if lat else float("nan"),
    }


def run_database(kind: str, args: argparse.Namespace, work: Path, run: int, problems: list[str]) -> dict[str, float]:
    here = work / f"{kind}-{run}"
    here.mkdir()
    with fresh_database(kind, here) as url:
        probes = asyncio.run(seed(url, PROBES, prefix="probe"))
        now = int(time.time())
        events = [sign(succeeded_event(i, row, now, prefix="probe"), now) for i, row in enumerate(probes)]
        smtp_port, app_port = free_port(), free_port()
        env = bench_env(url, app_port=app_port, smtp_port=smtp_port, PROMETHEUS_MULTIPROC_DIR=tempfile.mkdtemp(dir=here))
        csv_path = here / "invoices.csv"
        write_csv(csv_path, args.n)
        sink = Server([sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{smtp_port}", "-c", "aiosmtpd.handlers.Sink"],
                      {}, smtp_port, here / "smtp.log")  # fmt: skip
        worker = Server([sys.executable, "-m", "emails.worker"], env, 0, here / "worker.log")
        try:
            with Server(app_command(app_port), env, app_port, here / "app.log") as app:
                app.wait_ready()
                probe = WebhookProbe(app_port, events, args.webhook_rate).start()
                baseline_start = time.perf_counter()
                time.sleep(2.0)
                started = time.perf_counter()
                command = [sys.executable, "-m", "links", "import", str(csv_path), "--send", "--verified", "--json"]
                imported = subprocess.run(command, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
                elapsed = time.perf_counter() - started
                probe.stop()
                server_errors = app.server_errors()
        finally:
            worker.stop()
            sink.stop()
        if imported.returncode != 0:
            elapsed = float("inf")  # a failed import meets no goal
            problems.append(f"{kind} run {run + 1}: the import failed ({imported.returncode}): {imported.stderr[-1500:]}")
        invoices = db_scalar(url, "SELECT count(*) FROM invoices WHERE number LIKE 'BENCH-%'")
        links = db_scalar(url, "SELECT count(*) FROM payment_links")
        emails = db_scalar(url, "SELECT count(*) FROM outbox WHERE kind <> 'receipt'")
        sent = db_scalar(url, "SELECT count(*) FROM outbox WHERE kind <> 'receipt' AND status = 'sent'")
        answered = [s for s in probe.samples if s[2] == 200]
        paid = db_scalar(url, "SELECT count(*) FROM invoices WHERE number LIKE 'PROBE-%' AND status = 'paid'")
    if not invoices == links == emails == args.n:
        problems.append(f"{kind} run {run + 1}: {invoices} invoices, {links} links, {emails} emails for {args.n} rows")
    if len(answered) != len(probe.samples) or paid != len(answered):
        bad = len(probe.samples) - len(answered)
        problems.append(f"{kind} run {run + 1}: {bad} webhooks not answered 200; {paid} probe invoices paid for {len(answered)} answered")
    if server_errors:
        problems.append(f"{kind} run {run + 1}: {server_errors} server errors logged by the app")
    during = probe.between(started, started + elapsed)
    print(f"   {kind}: import {elapsed:.2f} s; {len(during)} webhooks answered during it; {sent:,} emails sent meanwhile", flush=True)
    return {
        f"{kind} import s": elapsed,
        f"{kind} rows/s": args.n / elapsed,
        f"{kind} emails sent by the worker meanwhile": float(sent),
        **latency_figures(f"{kind} before:", probe.between(baseline_start, started)),
        **latency_figures(f"{kind} during:", during),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="measure this many times; figures as min/median/max (default 3)")
    parser.add_argument("--n", type=int, default=10_000, help="CSV rows, one invoice each (default 10000)")
    parser.add_argument("--database", choices=("both", "sqlite", "postgres"), default="both")
    parser.add_argument("--webhook-rate", type=float, default=50.0, help="webhooks posted per second during the import (default 50)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (CSV, SQLite files, logs)")
    args = parser.parse_args()
    kinds = ("sqlite", "postgres") if args.database == "both" else (args.database,)
    problems: list[str] = []
    with workdir("import", keep=args.keep) as work:
        runs = repeat(
            max(1, args.runs), lambda run: {k: v for kind in kinds for k, v in run_database(kind, args, work, run, problems).items()}
        )
    goals = []
    for kind in kinds:
        goals.append(Goal(f"{kind} import s", "<", GOAL_SECONDS, f"{args.n:,} rows, links issued, emails queued, worker and app running"))
        goals.append(Goal(f"{kind} during: webhook p99 ms", "<=", 1000.0, "webhooks keep being answered (our bound)"))
    ok = summarise(
        f"import: {args.n:,} CSV rows with --send while the outbox worker and the app run, webhooks at {args.webhook_rate:g}/s",
        runs,
        goals,
        notes=["import s: the whole `python -m links import FILE --send --verified --json` command, start-up included"],
    )
    for problem in problems:
        print(f"  CHECK FAILED: {problem}")
    print(f"  goals: {'all PASS' if ok else 'some MISS'}; checks: {'all passed' if not problems else f'{len(problems)} FAILED'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
