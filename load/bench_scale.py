"""Scale-out on PostgreSQL: the pay page served by 1, 2 and 4 uvicorn workers, and each worker's memory.

    .venv/bin/python load/bench_scale.py [--runs 3] [--n 10000] [--duration 10] [--workers 1,2,4]
                                         [--rss-workers 2] [--rss-requests 100000] [--rss-time-limit 600] [--keep]

Goals (issue 15): on PostgreSQL, 2 uvicorn workers serve >= 1.6x one worker on this 2-core machine
(the client, wrk -t1 -c32, included); the README's table shows 1, 2 and 4 workers. RSS per worker
<= 150 MB after 100,000 requests, and no growth.

A PostgreSQL database is created on 127.0.0.1:5432 (or BENCH_POSTGRES_URL) and dropped at the end,
filled in bulk SQL with N verified customers, each with a saved card and an open invoice whose link was
sent (load/_common.py seed_payday). For each worker count, the app runs as the Procfile runs it
(`uvicorn --factory app:create_app --workers N`, PROMETHEUS_MULTIPROC_DIR set to a fresh directory),
wrk warms it up for 2 s and then opens the N links at random (GET /pay/l/<link hex> with the link's
cookie) for --duration seconds. After it stops (SIGINT), every page wrk counted must have left an open
in the database, whichever worker served it.

Memory (the first run only, unless --rss-every-run): with --rss-workers workers, wrk runs in bursts
of 5 s until the server has answered --rss-requests requests per worker (100,000 each by default:
200,000 in all with 2 workers); every worker's resident memory (VmRSS) is read after the warm-up, at
20% and at 100% of them. Growth = RSS at 100% - RSS at 20%, per worker; the largest is printed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import (
    Goal,
    Server,
    app_command,
    bench_env,
    db_scalar,
    ensure_wrk,
    free_port,
    fresh_database,
    repeat,
    rss_mb,
    run_wrk,
    seed_payday,
    summarise,
    workdir,
    write_requests,
)

CONNECTIONS = 32
WARMUP_SECONDS = 2.0
BURST_SECONDS = 5.0


def open_sum(url: str) -> int:
    return db_scalar(url, "SELECT coalesce(sum(open_count), 0) FROM payment_links")


def start(url: str, workers: int, work: Path, label: str) -> Server:
    port = free_port()
    metrics_dir = tempfile.mkdtemp(prefix="metrics-", dir=work)
    env = bench_env(url, app_port=port, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    server = Server(app_command(port, workers), env, port, work / f"app-{label}.log")
    server.wait_ready()
    deadline = time.monotonic() + 60
    while workers > 1 and len(server.workers()) < workers and time.monotonic() < deadline:
        time.sleep(0.2)
    return server


def throughput(url: str, requests: Path, workers: int, duration: float, work: Path, run: int, problems: list[str]) -> dict[str, float]:
    before = open_sum(url)
    with start(url, workers, work, f"{workers}w-{run}") as server:
        warm = run_wrk(server.base, requests, WARMUP_SECONDS, CONNECTIONS)
        measured = run_wrk(server.base, requests, duration, CONNECTIONS)
        errors = server.server_errors()
    for label, w in (("warm-up", warm), ("measured", measured)):
        if w.non2xx or w.errors:
            problems.append(f"{workers} worker(s) {label}: {w.non2xx} non-2xx, {w.errors} socket errors")
    if errors:
        problems.append(f"{workers} worker(s): {errors} server errors logged")
    recorded, served = open_sum(url) - before, warm.ok + measured.ok
    if recorded < served:
        problems.append(f"{workers} worker(s): {served - recorded:,} opens LOST ({recorded:,} recorded for {served:,} pages)")
    return {f"{workers} worker req/s": measured.rps, f"{workers} worker p99 ms": measured.p99_ms}


def memory(url: str, requests: Path, workers: int, total: int, time_limit: float, work: Path, problems: list[str]) -> dict[str, float]:
    figures: dict[str, float] = {}
    with start(url, workers, work, f"rss-{workers}w") as server:
        answered = run_wrk(server.base, requests, WARMUP_SECONDS, CONNECTIONS).ok
        pids = server.workers()
        baseline = {pid: rss_mb(pid) for pid in pids}
        at_20: dict[int, float] = {}
        started = time.monotonic()
        while answered < total and time.monotonic() - started < time_limit:
            w = run_wrk(server.base, requests, BURST_SECONDS, CONNECTIONS)
            answered += w.ok
            if w.non2xx or w.errors:
                problems.append(f"memory phase: {w.non2xx} non-2xx, {w.errors} socket errors")
            if not at_20 and answered >= total // 5:
                at_20 = {pid: rss_mb(pid) for pid in pids}
        at_end = {pid: rss_mb(pid) for pid in pids}
        if server.workers() != pids:
            problems.append(f"memory phase: workers changed from {pids} to {server.workers()} (one restarted?)")
    if answered < total:
        problems.append(f"memory phase: only {answered:,} of {total:,} requests within {time_limit:.0f} s")
    at_20 = at_20 or at_end
    figures["rss requests answered (all workers)"] = float(answered)
    figures["rss per worker after warm-up MB (max)"] = max(baseline.values())
    figures["rss per worker at 20% MB (max)"] = max(at_20.values())
    figures["rss per worker at 100% MB (max)"] = max(at_end.values())
    figures["rss growth 20%->100% MB (max)"] = max(at_end[pid] - at_20[pid] for pid in pids)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="measure this many times; figures as min/median/max (default 3)")
    parser.add_argument("--n", type=int, default=10_000, help="customers, each with a card and a sent link (default 10000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of wrk load per worker count (default 10)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to measure (default 1,2,4)")
    parser.add_argument("--rss-workers", type=int, default=2, help="workers in the memory phase (default 2; 0: skip it)")
    parser.add_argument("--rss-requests", type=int, default=100_000, help="requests per worker in the memory phase (default 100000)")
    parser.add_argument("--rss-time-limit", type=float, default=600.0, help="stop the memory phase after this many seconds (default 600)")
    parser.add_argument("--rss-every-run", action="store_true", help="measure memory in every run, not only the first")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (request file, logs)")
    args = parser.parse_args()
    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    ensure_wrk()
    problems: list[str] = []
    with workdir("scale", keep=args.keep) as work, fresh_database("postgres", work) as url:
        started = time.perf_counter()
        links = seed_payday(url, args.n, locales=(None, "de", "fr", "es"))
        print(f"postgres: {args.n:,} customers, cards, invoices and sent links written in {time.perf_counter() - started:.1f} s")
        requests = write_requests(work / "distinct.txt", [(link.page_path, link.cookie) for link in links])

        def one_run(run: int) -> dict[str, float]:
            figures: dict[str, float] = {}
            for workers in counts:
                figures.update(throughput(url, requests, workers, args.duration, work, run, problems))
                print(f"   {workers} worker(s): {figures[f'{workers} worker req/s']:,.0f} req/s", flush=True)
            if 1 in counts and 2 in counts:
                figures["2 workers / 1 worker"] = figures["2 worker req/s"] / figures["1 worker req/s"]
            if 1 in counts and 4 in counts:
                figures["4 workers / 1 worker"] = figures["4 worker req/s"] / figures["1 worker req/s"]
            if args.rss_workers and (run == 0 or args.rss_every_run):
                total = args.rss_requests * args.rss_workers
                figures.update(memory(url, requests, args.rss_workers, total, args.rss_time_limit, work, problems))
            return figures

        runs = repeat(max(1, args.runs), one_run)
    goals = [Goal("2 workers / 1 worker", ">=", 1.6, "2 cores, wrk on the same machine")]
    if args.rss_workers:
        goals += [
            Goal("rss per worker at 100% MB (max)", "<=", 150.0, f"{args.rss_workers} workers, {args.rss_requests:,} requests each"),
            Goal("rss growth 20%->100% MB (max)", "<=", 5.0, "no growth (a few MB of allocator noise allowed)"),
        ]
    ok = summarise(
        f"scale-out: GET /pay/l/<link> on PostgreSQL, {args.n:,} links, uvicorn --workers {args.workers}, "
        f"wrk -t1 -c{CONNECTIONS}, {args.duration:g} s each",
        runs,
        goals,
        notes=["rss figures: the largest of the workers; memory is measured in the first run only unless --rss-every-run"],
    )
    for problem in problems:
        print(f"  CHECK FAILED: {problem}")
    print(f"  goals: {'all PASS' if ok else 'some MISS'}; checks: {'all passed' if not problems else f'{len(problems)} FAILED'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
