"""Payday: everyone opens their pay link at once. The real app vs. bare Starlette, with wrk.

    .venv/bin/python load/payday.py [--runs 3] [--n 10000] [--duration 10] [--database both|sqlite|postgres]
                                    [--py-spy /path/to/py-spy] [--keep]

Goals (issue 15), each a ratio to bare Starlette serving a same-size prebuilt page on the same route
shape, measured in the same run, one uvicorn worker each, wrk -t1 -c32:
- GET /pay/l/<link hex> with the link's cookie (what GET /pay/<token> hands over to: a 303 that sets
  the cookie `pl_<link hex>`; views/pages.py), valid, rendered, open recorded: >= 0.25x bare and
  p99 <= 10 ms, on SQLite and on PostgreSQL, over N distinct links and over one link hit repeatedly.
- GET /pay/<forged token> (rejected before any database query): >= 0.8x bare.

Each run, for each database (a SQLite file; a PostgreSQL database created on 127.0.0.1:5432, or
BENCH_POSTGRES_URL, and dropped at the end), filled once in bulk SQL with N verified customers, each
with a saved Visa 4242 and an open invoice whose link was sent (load/_common.py seed_payday):
1. the app runs as the Procfile runs it (`uvicorn --factory app:create_app`, 1 worker, no access log);
   checked first: /pay/<token> answers 303 with the cookie, the page with the cookie is 200 and shows
   the card, a forged token is 404; 20 random links' pages (before the load) and 50 (after it) must
   each show the card and their own invoice's number;
2. wrk warms it up (2 s), then measures the N distinct links (random path + cookie pairs, a Lua
   script; most links are opened for the first time during it, each rendered then), one link hit
   repeatedly, the handoff GET /pay/<token> of the N links (303; a figure without a goal), then every
   link's page is opened once more (so that every page is kept) and the N links are measured again
   ("distinct, all kept": a figure without a goal, what a request costs once its page is rendered:
   the difference is the first opens' rendering), and the forged token, --duration seconds each;
3. the app is stopped (SIGINT: it writes the opens it still holds), and the database must hold at
   least one open per page wrk counted (sum of open_count); on PostgreSQL, the database's transaction
   counter during the forged run shows that forged links cost no query;
4. bare Starlette (load/_serve.py --bare) serves the page and the forged answer the app sent, byte for
   byte, with the same statuses, on /pay/l/{link_hex} and /pay/{token}; wrk measures it the same way.

A run takes ~(12 x duration + 65) s with both databases. Exit 1 on a missed check (a failed request,
a lost open, a forged request that reached the database), not on a missed goal.

Earlier findings (2026-11-23, before issue 15; 1,000 links, SQLite, 2 vCPU box): the app served
~850-890 req/s (wrk -c32 p50 36 ms) against ~31,000 req/s bare: 0.03x. Time went to Jinja rendering
of pay.html with its gettext calls (~0.3 ms a page), Starlette/uvicorn per-request work, the read
(~0.1-0.2 ms) and the background flush of the open log. 0.25x of bare is ~0.13 ms a request: less
than rendering pay.html alone, so the goal needs rendered pages cached (with the per-request nonce
and CSRF token put in at send time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from _common import (
    Goal,
    SeededLink,
    Server,
    Wrk,
    app_command,
    bench_env,
    db_scalar,
    ensure_wrk,
    forged_token,
    free_port,
    fresh_database,
    postgres_transactions,
    print_py_spy,
    py_spy_wrapper,
    repeat,
    run_wrk,
    seed_payday,
    serve_command,
    summarise,
    workdir,
    write_requests,
)

CONNECTIONS = 32
WARMUP_SECONDS = 2.0
STATS_FLUSH_SECONDS = 11.0
LOCALES = (None, "de", "fr", "es")  # payday in four languages (None: the default, English)


@dataclass
class Backend:
    name: str  # "sqlite" | "postgres"
    url: str
    links: list[SeededLink]
    distinct: Path  # wrk request files
    one: Path
    forged: Path
    handoff: Path


@dataclass
class Captured:
    page: Path  # what the app sent for a valid link, kept for the bare app
    forged: Path
    forged_status: int
    forged_headers: Path  # the app's answer headers for it (JSON): bare sends them too, in a second measurement


def open_sum(url: str) -> int:
    return db_scalar(url, "SELECT coalesce(sum(open_count), 0) FROM payment_links")


def check_app(base: str, link: SeededLink, forged: str, work: Path) -> Captured:
    """The handoff, the page and the forged link behave as payday expects, before anything is measured."""
    handoff = httpx.get(f"{base}/pay/{link.token}", timeout=10)
    cookie = handoff.headers.get("set-cookie", "")
    if handoff.status_code != 303 or handoff.headers.get("location") != link.page_path or f"pl_{link.link_id.hex}=" not in cookie:
        raise SystemExit(f"GET /pay/<token> is not the handoff payday expects: {handoff.status_code} {handoff.headers}")
    page = httpx.get(f"{base}{link.page_path}", headers={"cookie": link.cookie}, timeout=10)
    if page.status_code != 200 or "4242" not in page.text:
        raise SystemExit(f"the pay page is not what payday expects: {page.status_code}\n{page.text[:500]}")
    bad = httpx.get(f"{base}/pay/{forged}", timeout=10)
    if bad.status_code != 404:
        raise SystemExit(f"a forged link answered {bad.status_code}, not 404")
    captured = Captured(work / "page.html", work / "forged.html", bad.status_code, work / "forged-headers.json")
    captured.page.write_bytes(page.content)
    captured.forged.write_bytes(bad.content)
    captured.forged_headers.write_text(json.dumps(list(bad.headers.multi_items())))
    return captured


def wrong_pages(base: str, links: list[SeededLink], sample: int) -> list[str]:
    """Pages of a random sample of links that are not 200, do not offer the card or show another invoice
    (a page cache keyed wrongly would show one)."""
    wrong = []
    with httpx.Client(base_url=base, timeout=10) as client:
        for link in random.sample(links, min(sample, len(links))):
            page = client.get(link.page_path, headers={"cookie": link.cookie})
            if page.status_code != 200 or "4242" not in page.text or link.number not in page.text:
                wrong.append(f"{link.page_path}: {page.status_code}, card {'4242' in page.text}, {link.number} {link.number in page.text}")
    return wrong


async def _open_all(base: str, links: list[SeededLink]) -> int:
    limit = asyncio.Semaphore(CONNECTIONS)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def one(link: SeededLink) -> bool:
            async with limit:
                page = await client.get(link.page_path, headers={"cookie": link.cookie})
                return page.status_code == 200

        return sum(await asyncio.gather(*map(one, links)))


def open_every_page(base: str, links: list[SeededLink]) -> int:
    """Every link's page once (CONNECTIONS at a time): afterwards the app keeps every page. How many
    answered 200 (each an open)."""
    return asyncio.run(_open_all(base, links))


def valid_run(w: Wrk) -> list[str]:
    return [f"{w.non2xx} non-2xx, {w.errors} socket errors"] if w.non2xx or w.errors else []


def measure_app(
    backend: Backend, work: Path, duration: float, py_spy: str | None, run: int
) -> tuple[dict[str, float], Captured, list[str]]:
    port = free_port()
    env = bench_env(backend.url, app_port=port)
    spy = work / f"app-{backend.name}-{run}.pyspy.txt"
    wrapper = py_spy_wrapper(py_spy, spy) if py_spy else None
    problems: list[str] = []
    before = open_sum(backend.url)
    with Server(app_command(port), env, port, work / f"app-{backend.name}-{run}.log", wrapper=wrapper) as app:
        app.wait_ready()
        captured = check_app(app.base, backend.links[0], forged_token(backend.links[0].token), work)
        problems += [f"{backend.name} before the load: {p}" for p in wrong_pages(app.base, backend.links, 20)]
        warm = run_wrk(app.base, backend.distinct, WARMUP_SECONDS, CONNECTIONS)
        distinct = run_wrk(app.base, backend.distinct, duration, CONNECTIONS)
        one = run_wrk(app.base, backend.one, duration, CONNECTIONS)
        handoff = run_wrk(app.base, backend.handoff, duration, CONNECTIONS)
        # After the figures with goals (its 10,000 opens and their writes would be measured with them).
        every = open_every_page(app.base, backend.links)
        if every != len(backend.links):
            problems.append(f"{backend.name}: {len(backend.links) - every} pages were not 200 when every link was opened")
        kept = run_wrk(app.base, backend.distinct, duration, CONNECTIONS)
        problems += [f"{backend.name} after the load: {p}" for p in wrong_pages(app.base, backend.links, 50)]
        xacts = 0
        if backend.name == "postgres":
            # pg_stat_database is flushed by a busy backend about once a second, by one gone idle up to
            # PGSTAT_IDLE_INTERVAL (10 s) later: let the writes of the runs before land first.
            time.sleep(STATS_FLUSH_SECONDS)
            xacts = postgres_transactions(backend.url)
        forged = run_wrk(app.base, backend.forged, duration, CONNECTIONS)
        if backend.name == "postgres":
            time.sleep(STATS_FLUSH_SECONDS)
            xacts = postgres_transactions(backend.url) - xacts
        errors = app.server_errors()
    if py_spy:
        print_py_spy(spy)
    for label, w in (("warm-up", warm), ("distinct", distinct), ("distinct, all kept", kept), ("one link", one), ("handoff", handoff)):
        problems += [f"{backend.name} {label}: {p}" for p in valid_run(w)]
    if forged.errors or forged.non2xx != forged.requests:
        problems.append(f"{backend.name} forged: {forged.requests - forged.non2xx} answered 2xx/3xx, {forged.errors} socket errors")
    if errors:
        problems.append(f"{backend.name}: {errors} server errors logged (see {work})")
    served = 1 + 20 + 50 + every + warm.ok + distinct.ok + kept.ok + one.ok  # with the pages of check_app and wrong_pages
    recorded = open_sum(backend.url) - before
    if recorded < served:
        problems.append(f"{backend.name}: {served - recorded:,} opens LOST ({recorded:,} recorded for {served:,} pages wrk counted)")
    figures = {
        f"{backend.name} distinct req/s": distinct.rps,
        f"{backend.name} distinct p99 ms": distinct.p99_ms,
        f"{backend.name} distinct, all kept req/s": kept.rps,
        f"{backend.name} distinct, all kept p99 ms": kept.p99_ms,
        f"{backend.name} one link req/s": one.rps,
        f"{backend.name} one link p99 ms": one.p99_ms,
        f"{backend.name} handoff (303) req/s": handoff.rps,
        f"{backend.name} handoff (303) p99 ms": handoff.p99_ms,
        f"{backend.name} forged req/s": forged.rps,
        f"{backend.name} forged p99 ms": forged.p99_ms,
        f"{backend.name} opens recorded - pages counted": float(recorded - served),
    }
    if backend.name == "postgres":
        figures["postgres transactions during forged run"] = float(xacts)
        if xacts > forged.requests / 100:
            problems.append(f"postgres: {xacts} transactions during {forged.requests:,} forged requests: forged links reach the database")
    return figures, captured, problems


def measure_bare(captured: Captured, backend: Backend, work: Path, duration: float, run: int) -> dict[str, float]:
    port = free_port()
    args = ["--bare", "--page", str(captured.page), "--forged-page", str(captured.forged), "--forged-status", str(captured.forged_status)]
    with Server(serve_command(port, *args), {}, port, work / f"bare-{run}.log") as bare:
        bare.wait_ready()
        run_wrk(bare.base, backend.distinct, WARMUP_SECONDS, CONNECTIONS)
        page = run_wrk(bare.base, backend.distinct, duration, CONNECTIONS)
        forged = run_wrk(bare.base, backend.forged, duration, CONNECTIONS)
    port = free_port()
    with Server(serve_command(port, *args, "--forged-headers", str(captured.forged_headers)), {}, port, work / f"bare-h-{run}.log") as bare:
        bare.wait_ready()
        run_wrk(bare.base, backend.forged, WARMUP_SECONDS, CONNECTIONS)
        headed = run_wrk(bare.base, backend.forged, duration, CONNECTIONS)
    return {
        "bare page req/s": page.rps,
        "bare page p99 ms": page.p99_ms,
        "bare forged req/s": forged.rps,
        "bare forged with the app's headers req/s": headed.rps,
    }


def prepare(name: str, url: str, n: int, work: Path) -> Backend:
    started = time.perf_counter()
    links = seed_payday(url, n, locales=LOCALES)
    print(f"{name}: {n:,} customers, cards, invoices and sent links written in {time.perf_counter() - started:.1f} s", flush=True)
    forged = forged_token(links[0].token)
    return Backend(
        name,
        url,
        links,
        write_requests(work / f"{name}-distinct.txt", [(link.page_path, link.cookie) for link in links]),
        write_requests(work / f"{name}-one.txt", [(links[0].page_path, links[0].cookie)]),
        write_requests(work / f"{name}-forged.txt", [(f"/pay/{forged}", "")]),
        write_requests(work / f"{name}-handoff.txt", [(f"/pay/{link.token}", "") for link in links]),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="measure this many times; figures as min/median/max (default 3)")
    parser.add_argument("--n", type=int, default=10_000, help="customers, each with a card and a sent link (default 10000)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of wrk load per measurement (default 10)")
    parser.add_argument("--database", choices=("both", "sqlite", "postgres"), default="both")
    parser.add_argument("--py-spy", metavar="PY_SPY", help="path of a py-spy binary: sample the app and print a summary per run")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (databases, request files, logs)")
    args = parser.parse_args()
    ensure_wrk()
    names = ("sqlite", "postgres") if args.database == "both" else (args.database,)
    problems: list[str] = []
    with workdir("payday", keep=args.keep) as work, fresh_database(names[0], work) as first_url:
        # The second database is opened inside the first so both are dropped whatever happens.
        with fresh_database(names[-1], work) if len(names) > 1 else contextlib.nullcontext(first_url) as last_url:
            backends = [prepare(names[0], first_url, args.n, work)]
            if len(names) > 1:
                backends.append(prepare(names[1], last_url, args.n, work))

            def one_run(run: int) -> dict[str, float]:
                figures: dict[str, float] = {}
                captured: Captured | None = None
                for backend in backends:
                    measured, got, found = measure_app(backend, work, args.duration, args.py_spy, run)
                    figures.update(measured)
                    problems.extend(found)
                    captured = captured or got
                    print(f"   {backend.name}: {measured[f'{backend.name} distinct req/s']:,.0f} req/s distinct", flush=True)
                assert captured is not None
                bare = measure_bare(captured, backends[0], work, args.duration, run)
                figures.update(bare)
                for backend in backends:
                    for kind in ("distinct", "distinct, all kept", "one link"):
                        figures[f"{backend.name} {kind} / bare"] = figures[f"{backend.name} {kind} req/s"] / bare["bare page req/s"]
                    figures[f"{backend.name} forged / bare"] = figures[f"{backend.name} forged req/s"] / bare["bare forged req/s"]
                    headed = bare["bare forged with the app's headers req/s"]
                    figures[f"{backend.name} forged / bare with the app's headers"] = figures[f"{backend.name} forged req/s"] / headed
                figures["page bytes"] = float(captured.page.stat().st_size)
                return figures

            runs = repeat(max(1, args.runs), one_run)
    goals: list[Goal] = []
    for name in names:
        for kind in ("distinct", "one link"):
            goals.append(Goal(f"{name} {kind} / bare", ">=", 0.25, "valid link, rendered, open recorded"))
            goals.append(Goal(f"{name} {kind} p99 ms", "<=", 10.0))
        goals.append(Goal(f"{name} forged / bare", ">=", 0.8, "no database query"))
    ok = summarise(
        f"payday: GET /pay/l/<link> with its cookie, {args.n:,} distinct links and one link; GET /pay/<forged>; "
        f"one uvicorn worker each, wrk -t1 -c{CONNECTIONS}, {args.duration:g} s each",
        runs,
        goals,
        notes=[
            "bare = Starlette serving the app's own page (and its forged-link answer) byte for byte, same routes, same run",
            "distinct, all kept = the N links again once every page was rendered (no goal): the difference from "
            "distinct is what the first opens' rendering costs",
            "bare with the app's headers = the same forged answer with the app's security and request-id headers too "
            "(what the headers cost, apart from the app's code; no goal)",
            "opens recorded - pages counted >= 0: every page wrk counted left an open in the database (wrk leaves out requests "
            "in flight when it stops, so a few more is normal)",
        ],
    )
    for problem in problems:
        print(f"  CHECK FAILED: {problem}")
    print(f"  goals: {'all PASS' if ok else 'some MISS'}; checks: {'all passed' if not problems else f'{len(problems)} FAILED'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
