"""`report …` (usage, aging) and `audit`: read-only views for finance."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from datetime import date, datetime
from html import escape
from pathlib import Path
from typing import Any

from cli.common import Context, Parser, Services, Subcommands, command, command_group, emit, table
from payments.reports import AGING_BUCKETS, USAGE_SERIES, Usage, aging, audit_entries, usage
from plumbing.db import utcnow
from plumbing.i18n import format_money


def register(commands: Subcommands[Parser]) -> None:
    report = command_group(commands, "report", "usage and aging reports", metavar="REPORT")
    p = command(
        report,
        "usage",
        "Opens, pay attempts, payments, emails and the servers' CPU and p95 latency by hour of day and day of month, with the peak hour.",
        example="python -m links report usage --days 90",
        run=report_usage,
    )
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--html", metavar="FILE", help="also write one self-contained HTML page with charts (no external requests)")
    command(
        report,
        "aging",
        "Open invoices by days overdue, with totals per currency.",
        example="python -m links report aging",
        run=report_aging,
    )

    p = command(
        commands,
        "audit",
        "Show the audit trail: who did what, when.",
        example="python -m links audit --invoice INV-000001",
        run=show_audit,
    )
    p.add_argument("--invoice", help="only entries about this invoice number")
    p.add_argument("--limit", type=int, default=200)


async def report_usage(ctx: Context, services: Services) -> None:
    now = utcnow()
    async with services.readers() as session:
        report = await usage(session, ctx.args.days, now)
    peak = report.peak_hour()
    busiest = report.busiest_days()
    record = {
        "days": report.days,
        "by_hour_utc": report.by_hour,
        "by_day_of_month": report.by_day,
        "peak_hour_utc": peak,
        "system_by_hour_utc": [asdict(h) for h in report.system],
        "system_samples": report.samples,
        "busiest_days_of_month": [{"day": d, "opens": n} for d, n in busiest],
    }
    if ctx.args.html:
        await asyncio.to_thread(Path(ctx.args.html).write_text, usage_page(report, now), encoding="utf-8")
        record["html"] = str(ctx.args.html)

    def human() -> None:
        ctx.console.print(f"Usage over the last {report.days} days (hours in UTC)")
        ctx.console.print(_hour_table(report))
        if busiest:
            days = ", ".join(f"day {d} ({n})" for d, n in busiest)
            ctx.console.print(f"Busiest days of the month for link opens: {days}.")
        ctx.console.print(peak_sentence(report))
        if ctx.args.html:
            ctx.console.print(f"Wrote {ctx.args.html}")

    emit(ctx, record, human)


def peak_sentence(report: Usage) -> str:
    """`Peak hour for link opens: 09:00-09:59 UTC (3 opens). Then: CPU …, p95 latency ….`"""
    peak = report.peak_hour()
    if peak is None:
        return "No link opens in this period."
    line = f"Peak hour for link opens: {peak:02d}:00-{peak:02d}:59 UTC ({report.by_hour['opens'][peak]} opens)."
    system = report.system[peak] if report.system else None
    if system is None or system.cpu_percent is None:
        return line + " No system usage was sampled in that hour."
    then = f" Then: CPU {system.cpu_percent:.0f}% of a core on average (busiest sample {system.cpu_percent_max:.0f}%)"
    if system.p95_ms is not None:
        then += f", p95 latency under {system.p95_ms:.0f} ms over {system.requests} requests"
    return line + then + "."


def _hour_table(report: Usage) -> Any:
    """One row per hour with activity; runs of quiet hours collapse into one row."""
    out = table("Hour (UTC)", "Opens", "", "Attempts", "Payments", "Emails", "CPU %", "p95 ms")
    top = max(report.by_hour["opens"]) or 1
    quiet_from: int | None = None

    def close_quiet(until: int) -> None:
        if quiet_from is not None:
            span = f"{quiet_from:02d}:00-{until:02d}:59"
            out.add_row(span, "", "[dim]quiet[/dim]", "", "", "", "", "")

    for hour in range(24):
        counts = [report.by_hour[name][hour] for name in USAGE_SERIES]
        system = report.system[hour] if report.system else None
        if not any(counts) and (system is None or not system.requests):
            quiet_from = hour if quiet_from is None else quiet_from
            continue
        close_quiet(hour - 1)
        quiet_from = None
        opens, attempts, paid, emails = counts
        cpu = f"{system.cpu_percent:.0f}" if system and system.cpu_percent is not None else "-"
        p95 = f"{system.p95_ms:.0f}" if system and system.p95_ms is not None else "-"
        bar = "█" * max(1, round(opens / top * 20)) if opens else ""
        out.add_row(f"{hour:02d}:00", str(opens), bar, str(attempts), str(paid), str(emails), cpu, p95)
    close_quiet(23)
    return out


# --- the HTML page: one file, no external requests, plain inline SVG ----------------------------------


def usage_page(report: Usage, now: datetime) -> str:
    """A self-contained page for finance and operators: opens and payments per hour with CPU
    overlaid, the peak named, the busiest days of the month."""
    peak = report.peak_hour()
    busiest = report.busiest_days()
    days_text = ", ".join(f"day {d} ({n} opens)" for d, n in busiest) or "no link opens yet"
    rows = []
    for hour in range(24):
        system = report.system[hour] if report.system else None
        counts = [report.by_hour[name][hour] for name in USAGE_SERIES]
        if not any(counts) and (system is None or not system.requests):
            continue
        cpu = f"{system.cpu_percent:.0f}%" if system and system.cpu_percent is not None else "–"
        p95 = f"{system.p95_ms:.0f} ms" if system and system.p95_ms is not None else "–"
        mem = f"{system.rss_bytes_max / 1048576:.0f} MB" if system and system.rss_bytes_max else "–"
        cells = "".join(f"<td>{c}</td>" for c in counts)
        marker = ' class="peak"' if hour == peak else ""
        rows.append(f"<tr{marker}><th scope=row>{hour:02d}:00</th>{cells}<td>{cpu}</td><td>{p95}</td><td>{mem}</td></tr>")
    table_html = "\n".join(rows) or '<tr><td colspan="8">No activity in this period.</td></tr>'
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Paylink usage: last {report.days} days</title>
<style>
body {{ font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2933;
  margin: 2rem auto; max-width: 64rem; padding: 0 1rem; }}
h1 {{ font-size: 1.6rem; margin-bottom: .25rem; }}
.sub {{ color: #52606d; margin-top: 0; }}
.peak-box {{ background: #fff8e1; border-left: 6px solid #f59f00; padding: .75rem 1rem; font-size: 1.15rem; margin: 1.25rem 0; }}
figure {{ margin: 1.5rem 0; }}
figcaption {{ font-weight: 600; margin-bottom: .5rem; }}
svg {{ width: 100%; height: auto; display: block; }}
.legend span {{ display: inline-block; margin-right: 1.25rem; font-size: .9rem; }}
.sw {{ display: inline-block; width: .9rem; height: .9rem; vertical-align: -2px; margin-right: .3rem; border-radius: 2px; }}
table {{ border-collapse: collapse; width: 100%; font-size: .9rem; }}
th, td {{ padding: .3rem .5rem; text-align: right; border-bottom: 1px solid #e4e7eb; }}
th:first-child {{ text-align: left; }}
tr.peak {{ background: #fff8e1; font-weight: 600; }}
</style>
</head>
<body>
<h1>When are customers paying, and were we slow then?</h1>
<p class="sub">Last {report.days} days, hours in UTC. Generated {now:%Y-%m-%d %H:%M} UTC from {report.samples} system usage samples.</p>
<p class="peak-box" id="peak">{escape(peak_sentence(report))}</p>
<figure>
<figcaption>Link opens and payments per hour of day, with CPU</figcaption>
<p class="legend"><span><i class="sw" style="background:#3b82f6"></i>Link opens</span>
<span><i class="sw" style="background:#16a34a"></i>Payments</span>
<span><i class="sw" style="background:#f59f00"></i>CPU (% of a core, right axis)</span></p>
{_hours_svg(report, peak)}
</figure>
<figure>
<figcaption>Busiest days of the month</figcaption>
<p>{escape(days_text)}</p>
{_days_svg(report, busiest)}
</figure>
<h2>Hour by hour</h2>
<table>
<thead><tr><th scope=col>Hour</th><th scope=col>Opens</th><th scope=col>Pay attempts</th><th scope=col>Payments</th>
<th scope=col>Emails sent</th><th scope=col>CPU</th><th scope=col>p95 latency</th><th scope=col>Memory</th></tr></thead>
<tbody>
{table_html}
</tbody>
</table>
<p class="sub">Quiet hours (no opens, payments, emails or requests) are left out of the table.
CPU is the web processes' average; p95 latency is an upper bound from a bucketed histogram.</p>
</body>
</html>
"""


def _nice_max(value: float) -> float:
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000, 25000, 50000, 100000):
        if value <= step:
            return float(step)
    return float(value)


def _hours_svg(report: Usage, peak: int | None) -> str:
    width, height, left, right, top, bottom = 960, 320, 48, 52, 16, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    opens, paid = report.by_hour["opens"], report.by_hour["payments"]
    ymax = _nice_max(max([*opens, *paid, 1]))
    cpu = [h.cpu_percent for h in report.system] if report.system else [None] * 24
    cmax = _nice_max(max([c for c in cpu if c is not None] + [1.0]))
    slot = plot_w / 24
    bar = slot * 0.36
    parts = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-labelledby="hours-title">',
        '<title id="hours-title">Opens and payments by hour</title>',
    ]
    for i in range(5):  # grid and left axis
        y = top + plot_h - plot_h * i / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e7eb"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="#52606d">{ymax * i / 4:g}</text>')
        parts.append(f'<text x="{width - right + 6}" y="{y + 4:.1f}" font-size="11" fill="#b45309">{cmax * i / 4:g}%</text>')
    if peak is not None:
        x = left + slot * peak
        parts.append(f'<rect x="{x:.1f}" y="{top}" width="{slot:.1f}" height="{plot_h}" fill="#fff3bf"/>')
        parts.append(
            f'<text x="{x + slot / 2:.1f}" y="{top + 12}" font-size="12" text-anchor="middle" font-weight="700" fill="#b45309">peak</text>'
        )
    for hour in range(24):
        x = left + slot * hour + slot * 0.12
        for offset, value, colour, name in ((0.0, opens[hour], "#3b82f6", "opens"), (bar, paid[hour], "#16a34a", "payments")):
            h = plot_h * value / ymax
            parts.append(
                f'<rect x="{x + offset:.1f}" y="{top + plot_h - h:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{colour}">'
                f"<title>{hour:02d}:00 {value} {name}</title></rect>"
            )
        if hour % 2 == 0:
            label_x = left + slot * hour + slot / 2
            parts.append(f'<text x="{label_x:.1f}" y="{height - 14}" font-size="11" text-anchor="middle" fill="#52606d">{hour:02d}h</text>')
    points = [(left + slot * h + slot / 2, top + plot_h - plot_h * c / cmax) for h, c in enumerate(cpu) if c is not None]
    if points:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#f59f00" stroke-width="2.5"/>')
        parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="#f59f00"/>' for x, y in points)
    parts.append("</svg>")
    return "\n".join(parts)


def _days_svg(report: Usage, busiest: list[tuple[int, int]]) -> str:
    width, height, left, top, bottom = 960, 200, 48, 16, 32
    plot_w, plot_h = width - left - 16, height - top - bottom
    opens, paid = report.by_day["opens"], report.by_day["payments"]
    ymax = _nice_max(max([*opens, *paid, 1]))
    slot = plot_w / 31
    top_days = {d for d, _ in busiest}
    parts = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-labelledby="days-title">',
        '<title id="days-title">Opens by day of the month</title>',
    ]
    parts.append(f'<line x1="{left}" x2="{width - 16}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#9aa5b1"/>')
    for index in range(31):
        day = index + 1
        h = plot_h * opens[index] / ymax
        x = left + slot * index + slot * 0.15
        colour = "#1d4ed8" if day in top_days else "#93c5fd"
        parts.append(
            f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" fill="{colour}">'
            f"<title>day {day}: {opens[index]} opens, {paid[index]} payments</title></rect>"
        )
        if day in top_days:
            label_y = top + plot_h - h - 4
            parts.append(
                f'<text x="{x + slot * 0.35:.1f}" y="{label_y:.1f}" font-size="11" text-anchor="middle" fill="#1d4ed8">'
                f"{opens[index]}</text>"
            )
        parts.append(f'<text x="{x + slot * 0.35:.1f}" y="{height - 12}" font-size="10" text-anchor="middle" fill="#52606d">{day}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


async def report_aging(ctx: Context, services: Services) -> None:
    async with services.readers() as session:
        buckets = await aging(session, date.today())
    record = {
        bucket: {cur: {"count": n, "total": t, "total_formatted": format_money(t, cur)} for cur, (n, t) in row.items()}
        for bucket, row in buckets.items()
    }

    def human() -> None:
        out = table("Overdue", "Currency", "Invoices", "Outstanding")
        for name, _, _ in AGING_BUCKETS:
            for currency, (count, total) in sorted(buckets[name].items()):
                out.add_row(name, currency.upper(), str(count), format_money(total, currency))
        ctx.console.print(out)

    emit(ctx, record, human)


async def show_audit(ctx: Context, services: Services) -> None:
    async with services.readers() as session:
        entries = await audit_entries(session, ctx.args.invoice, ctx.args.limit)
    record = {"entries": [{"at": e.at, "actor": e.actor, "action": e.action, "subject": e.subject, "details": e.details} for e in entries]}

    def human() -> None:
        out = table("When (UTC)", "Who", "What", "Subject", "Details")
        for e in entries:
            details = ", ".join(f"{k}={v}" for k, v in (e.details or {}).items())
            out.add_row(f"{e.at:%Y-%m-%d %H:%M:%S}", e.actor, e.action, e.subject, details)
        ctx.console.print(out)

    emit(ctx, record, human)
