"""`import` and `export`: invoices in from a CSV file, out for accounting."""

from __future__ import annotations

import asyncio
import csv
import sys
from pathlib import Path
from typing import Any

from cli.common import Context, Parser, Services, Subcommands, UserError, command, emit, jsonable, parse_date, print_json, progress
from links import importer
from payments.reports import EXPORT_COLUMNS, export_rows, spreadsheet_safe


def register(commands: Subcommands[Parser]) -> None:
    p = command(
        commands,
        "import",
        "Import invoices from a CSV file; every row is checked first, nothing is written if any is bad. Line items: "
        "the columns item_description,item_quantity,item_unit_amount,item_tax_percent, one row per line, rows sharing a "
        "number are one invoice (repeating its other columns). Due dates in the past and totals below Stripe's minimum "
        "charge are bad rows.",
        example="python -m links import samples/invoices.csv --send",
        run=import_csv,
    )
    p.add_argument(
        "file",
        help="CSV with the header email,name,amount,currency,description,due_date,number,locale "
        "[,notes,item_description,item_quantity,item_unit_amount,item_tax_percent]",
    )
    p.add_argument("--send", action="store_true", help="issue links and queue the invoice emails")
    p.add_argument("--ttl-days", type=int, help="with --send: how long the links work (default LINK_TTL_DAYS)")
    p.add_argument("--skip-bad", action="store_true", help="import the good rows even if some are bad")
    p.add_argument("--verified", action="store_true", help="finance attests the new customers' addresses (audited)")

    p = command(
        commands,
        "export",
        "Export invoices with payments and link activity for accounting (CSV or JSON on stdout).",
        example="python -m links export --since 2026-01-01 --format csv > invoices.csv",
        run=export,
    )
    p.add_argument("--since", type=parse_date, help="only invoices created on or after this date, YYYY-MM-DD")
    p.add_argument("--format", choices=["csv", "json"], default="csv")


async def import_csv(ctx: Context, services: Services) -> None:
    a = ctx.args
    try:
        text = await asyncio.to_thread(Path(a.file).read_text, encoding="utf-8-sig")
    except UnicodeDecodeError as exc:  # e.g. Excel's "CSV" in Windows-1252
        line = exc.object[: exc.start].count(b"\n") + 1
        raise UserError(f'cannot read {a.file}: it is not UTF-8 (line {line} is not): save it as "CSV UTF-8" and import it again') from None
    except OSError as exc:
        raise UserError(f"cannot read {a.file}: {exc}") from None
    try:
        rows, bad = importer.parse_csv(text)
    except importer.ImportError_ as exc:
        raise UserError(f"{a.file}: {exc}") from None
    if a.ttl_days is not None and not a.send:
        raise UserError("--ttl-days is the lifetime of the links --send issues; add --send")
    report = importer.ImportReport(rows=sum(len(r.file_lines) for r in rows) + len(bad))
    async with services.readers() as session:
        new, done, conflicts = await importer.check_against_database(session, rows)
    report.bad = sorted(bad + conflicts, key=lambda b: b.line)
    report.already_imported = len(done)
    if not report.bad or a.skip_bad:  # otherwise: everything validated, nothing written
        # Written in short transactions (chunks), all or nothing: see links/importer.py.
        with progress(ctx, len(new), "Importing") as advance:
            await importer.import_rows(
                services.sessions,
                services.readers,
                ctx.settings,
                new,
                actor=ctx.actor,
                source=str(a.file),
                send=a.send,
                verified=a.verified,
                report=report,
                progress=advance,
                ttl_days=a.ttl_days,
            )
        report.written = True
    record = {
        "rows": report.rows, "written": report.written, "created_invoices": report.created_invoices,
        "created_customers": report.created_customers, "already_imported": report.already_imported,
        "emailed": report.emailed, "held": report.held, "held_reasons": report.held_reasons,
        "bad_rows": [{"line": b.line, "reason": b.reason} for b in report.bad],
    }  # fmt: skip
    notes = _held_notes(report, verified=a.verified) + _expiry_notes(report)
    if notes:
        record["notes"] = notes
    for b in report.bad:
        ctx.problem(f"{a.file}:{b.line}: {b.reason}", file=a.file, line=b.line, reason=b.reason)
    for note in _expiry_notes(report):
        ctx.warn(note)
    emit(ctx, record, lambda: _print_import(ctx, report, _held_notes(report, verified=a.verified)))
    if report.bad and not a.skip_bad:
        raise UserError(f"{len(report.bad)} bad row(s); nothing was imported (fix them, or use --skip-bad to import the rest)")


def _print_import(ctx: Context, report: importer.ImportReport, notes: list[str]) -> None:
    if not report.written:
        return
    ctx.console.print(
        f"Imported {report.created_invoices} invoice(s) and {report.created_customers} new customer(s); "
        f"{report.already_imported} already imported; {report.emailed} emailed, {report.held} held; {len(report.bad)} bad row(s) skipped."
    )
    for note in notes:
        ctx.console.print(note)


def _held_notes(report: importer.ImportReport, *, verified: bool) -> list[str]:
    """Why invoice emails were held, and what to do about it: one line per reason."""
    notes = []
    for reason, count in sorted(report.held_reasons.items()):
        if reason == "email address not verified":
            notes.append(
                f"{count} invoice email(s) held: the address is not verified. They go out by themselves when the customer "
                "confirms the address (new customers were just sent a confirmation email; to send one again: "
                "python -m links customer verify EMAIL). If finance already knows the addresses are right, import with "
                "--verified instead."
                if not verified
                else f"{count} invoice email(s) held: the customer's address is not verified (an existing customer); "
                "send the confirmation with: python -m links customer verify EMAIL"
            )
        elif reason.startswith("email undeliverable"):
            notes.append(
                f"{count} invoice email(s) held: {reason}. Correct the address (python -m links customer update EMAIL --email NEW), "
                "then python -m links link resend NUMBER."
            )
        else:
            notes.append(f"{count} invoice email(s) held: {reason}.")
    return notes


def _expiry_notes(report: importer.ImportReport) -> list[str]:
    if not report.expire_before_due:
        return []
    fix = (
        f"or import with --ttl-days {report.ttl_days_needed}"
        if report.ttl_days_needed <= 365
        else "and send more as they lapse (a link lasts at most 365 days)"
    )
    return [
        f"{report.expire_before_due} link(s) expire before their invoice's due date: the link-expiry reminder will email fresh ones, {fix}"
    ]


async def export(ctx: Context, services: Services) -> None:
    async with services.readers() as session:
        rows = await export_rows(session, ctx.args.since)
    if ctx.args.format == "json" or ctx.json:
        print_json(rows)
        return
    # CSV is opened in spreadsheets: every text cell is neutralised against formula injection
    # (payments.reports.spreadsheet_safe), and every cell is quoted, so that no value (a line break
    # or a comma in a description) can start a new cell or row. JSON, read by programs, stays exact.
    writer = csv.DictWriter(sys.stdout, fieldnames=EXPORT_COLUMNS, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writeheader()
    with progress(ctx, len(rows), "Exporting") as advance:
        for row in rows:
            writer.writerow({k: _csv_cell(v) for k, v in row.items()})
            advance(1)


def _csv_cell(value: Any) -> Any:
    """One CSV cell; a list (one value per payment, e.g. payment_intents) is joined with "; ", oldest first."""
    if isinstance(value, list):
        value = "; ".join("" if v is None else str(jsonable(v)) for v in value)
    return spreadsheet_safe(jsonable(value)) if value is not None else ""
