"""Bulk import of invoices from CSV: every row validated first, then written in short chunks.

Columns (header row required): email,name,amount,currency,description,due_date,number,locale
(due_date, number and locale may be empty or absent), and optionally notes and the line-item
columns item_description,item_quantity,item_unit_amount,item_tax_percent. A row with an item is one
line of its invoice; rows sharing a number are one invoice, and must repeat its invoice-level
columns (email, name, amount, currency, description, due_date, locale, notes) identically, else the
row is bad. With items, amount may be empty (it is their total; if given it must match).
item_quantity defaults to 1, item_tax_percent may be empty (no tax). A bad row of an itemised
invoice makes every row of it bad: an invoice is never imported with a line missing. Due dates in
the past and totals below Stripe's minimum charge are bad rows.

A row without a number gets the next number of the invoice sequence (INV-000042), and a key derived
from its contents (IMP-…) by which it is found again, so importing the same file twice creates
nothing twice either way.

Writing (`import_rows`): one transaction per chunk of CHUNK_ROWS rows, so that a large file never
holds SQLite's write lock for long (a webhook waits at most about one chunk). To the user it stays
all or nothing: every row carries the import's batch id (ImportBatch), its emails are queued held
(next attempt at HOLD_UNTIL) and released in one short final transaction that also marks the batch
done; if anything fails, what the earlier chunks wrote is deleted again, by the batch id, and its
invoice numbers go back to the sequence. A run that died without undoing itself (kill -9) is undone
by the next import once its heartbeat is older than STALE_IMPORT. Until it is done, its invoices are
not imported: importing them again is refused while that run may be alive, and once it is stale the
new import undoes it first and writes them itself (check_against_database), so that nothing an import
reports as imported is ever undone.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, exists, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql import ColumnElement

from emails import outbox
from emails.models import OutboxMessage
from links.customers import check_locale, check_name, new_customer, normalize_email
from links.errors import LinkError
from links.invoices import (
    allocate_invoice_numbers,
    check_due_date,
    check_invoice_number,
    check_notes,
    default_part_rules,
    flush_new_invoices,
    format_invoice_number,
    give_back_invoice_numbers,
    new_invoice,
)
from links.issuing import IssuedLink, issue_link
from links.lines import LineItem, check_lines, lines_json, make_item, plain_line
from links.models import Customer, ImportBatch, ImportStatus, Invoice, LinkOpen, LinkRequest, PaymentLink, ReminderSent
from links.verification import request_verification
from plumbing import audit
from plumbing.db import chunked, utcnow
from plumbing.i18n import MoneyError, check_currency, format_money, to_minor_units
from plumbing.settings import Settings

log = logging.getLogger("paylink.import")

REQUIRED = ("email", "name", "amount", "currency", "description")  # `amount` may give way to the item columns
OPTIONAL = ("due_date", "number", "locale", "notes")
ITEM_COLUMNS = ("item_description", "item_quantity", "item_unit_amount", "item_tax_percent")
MAX_ROWS = 100_000
CHUNK_ROWS = 500  # rows per write transaction: well under a second of SQLite's write lock
# The next attempt of an unfinished import's emails: never due until the import releases them.
HOLD_UNTIL = datetime(9999, 1, 1, tzinfo=UTC)
# An import whose chunks stopped this long ago died without undoing itself: the next import undoes it.
STALE_IMPORT = timedelta(minutes=10)


class ImportError_(Exception):
    """The file itself cannot be read (not CSV, missing columns); one clear line."""


@dataclass(frozen=True)
class ImportRow:
    """One invoice to import: one CSV row, or the rows sharing its number when they carry items."""

    line: int  # its first line in the file
    email: str
    name: str
    amount: int  # the total of its lines (what gets charged)
    currency: str
    description: str
    due_date: date | None
    number: str | None  # None: the next number of the invoice sequence, given when it is written
    locale: str | None
    import_key: str | None  # for a row without a number: how a second import of it is recognised
    lines: tuple[LineItem, ...] = ()  # empty: one untaxed line for `amount`
    notes: str | None = None
    source_lines: tuple[int, ...] = ()  # every line of the file it came from

    @property
    def file_lines(self) -> tuple[int, ...]:
        return self.source_lines or (self.line,)


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


@dataclass
class ImportReport:
    rows: int = 0
    bad: list[BadRow] = field(default_factory=list)
    created_invoices: int = 0
    created_customers: int = 0
    already_imported: int = 0
    emailed: int = 0
    held: int = 0
    held_reasons: dict[str, int] = field(default_factory=dict)  # why emails were held, how many each
    expire_before_due: int = 0  # links issued that expire before their invoice's due date
    ttl_days_needed: int = 0  # the --ttl-days that would have covered every due date
    written: bool = False


def derived_key(email: str, amount: int, currency: str, description: str, due: date | None, lines: Sequence[LineItem] = ()) -> str:
    """What identifies a row without a number across imports (it used to be its number). A row with
    an item adds it to the digest; a plain row's key is what it always was."""
    text = f"{email}|{amount}|{currency}|{description}|{due or ''}"
    if lines:
        text += "|" + json.dumps(lines_json(lines), sort_keys=True)
    return f"IMP-{hashlib.sha256(text.encode()).hexdigest()[:12].upper()}"


def parse_csv(text: str, *, today: date | None = None) -> tuple[list[ImportRow], list[BadRow]]:
    """Validate every row and group the rows of each invoice. Line numbers are those of the file
    (the header is line 1). Returns the invoices to import and the bad rows."""
    try:
        return _parse(text, today or utcnow().date())
    except csv.Error as exc:
        raise ImportError_(f"not a readable CSV file: {exc}") from None


@dataclass(frozen=True)
class _Row:
    """One CSV row, checked on its own."""

    line: int
    email: str
    name: str
    amount: int | None  # None: not given (a row with an item)
    currency: str
    description: str
    due_date: date | None
    number: str | None
    locale: str | None
    notes: str | None
    item: LineItem | None

    def invoice_level(self) -> dict[str, object]:
        """The columns every row of one invoice must agree on."""
        return {
            "email": self.email, "name": self.name, "amount": self.amount, "currency": self.currency, "description": self.description,
            "due_date": self.due_date, "locale": self.locale, "notes": self.notes,
        }  # fmt: skip


def _parse(text: str, today: date) -> tuple[list[ImportRow], list[BadRow]]:
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    has_items = any(c in header for c in ITEM_COLUMNS)
    missing = [c for c in REQUIRED if c not in header and not (c == "amount" and has_items)]
    if missing:
        first_line = text.lstrip("\ufeff").split("\n", 1)[0]
        if ";" in first_line and "," not in first_line:  # a spreadsheet set to a language that writes 1,5 saves with ";"
            raise ImportError_("the columns are separated by ';': save the file as CSV with commas (e.g. \"CSV UTF-8 (comma delimited)\")")
        raise ImportError_(f"the header row lacks the column(s): {', '.join(missing)} (expected {','.join(REQUIRED + OPTIONAL)})")
    if has_items and not {"item_description", "item_unit_amount"} <= set(header):
        raise ImportError_(f"line items need at least the columns item_description and item_unit_amount (all: {','.join(ITEM_COLUMNS)})")
    reader.fieldnames = header
    bad: list[BadRow] = []
    order: list[list[_Row]] = []  # invoices in file order, each its rows
    by_number: dict[str, list[_Row]] = {}
    spoiled: dict[str, int] = {}  # itemised invoices with a bad row: number -> the first bad line
    for index, raw in enumerate(reader):
        line = reader.line_num  # a quoted cell may span lines: report where the row ends, as a spreadsheet shows it
        if index >= MAX_ROWS:
            raise ImportError_(f"the file has more than {MAX_ROWS} rows; split it")
        values = {k: (v or "").strip() for k, v in raw.items() if k is not None}
        itemised = any(values.get(c) for c in ITEM_COLUMNS)
        if raw.get(None):
            bad.append(BadRow(line, "more fields than columns in the header"))
            if itemised and values.get("number"):
                spoiled.setdefault(values["number"], line)
            continue
        if not any(values.values()):
            continue  # a blank line
        row, reason = _validate(line, values, today)
        if row is None:
            bad.append(BadRow(line, reason or "invalid row"))
            if itemised and values.get("number"):
                spoiled.setdefault(values["number"], line)
            continue
        if row.number is None:
            order.append([row])
            continue
        rows = by_number.get(row.number)
        if rows is None:
            by_number[row.number] = rows = [row]
            order.append(rows)
            continue
        first = rows[0]
        if first.item is None or row.item is None:
            bad.append(BadRow(line, f"invoice number {row.number} is also on line {first.line}"))
            if first.item is not None or row.item is not None:
                spoiled.setdefault(row.number, line)
            continue
        ours, theirs = row.invoice_level(), first.invoice_level()
        differ = [column for column in ours if ours[column] != theirs[column]]
        if differ:
            bad.append(
                BadRow(
                    line,
                    f"invoice {row.number}: {', '.join(differ)} differ(s) from line {first.line}; "
                    "every row of one invoice must repeat its invoice columns",
                )
            )
            spoiled.setdefault(row.number, line)
            continue
        rows.append(row)
    invoices: list[ImportRow] = []
    seen_keys: dict[str, int] = {}
    for rows in order:
        first = rows[0]
        source = tuple(r.line for r in rows)
        if first.number is not None and first.number in spoiled:
            reason = f"invoice {first.number} has a bad row on line {spoiled[first.number]}; none of its rows is imported"
            bad += [BadRow(n, reason) for n in source]
            continue
        invoice, reason = _invoice(rows)
        if invoice is None:
            bad += [BadRow(n, reason or "invalid invoice") for n in source]
            continue
        if invoice.import_key is not None and invoice.import_key in seen_keys:
            bad.append(
                BadRow(
                    first.line,
                    f"the same invoice (email, amount, currency, description, due date) is also on line {seen_keys[invoice.import_key]}; "
                    "if it is there twice by mistake, remove one; if they are two invoices, give each its own number",
                )
            )
            continue
        if invoice.import_key is not None:
            seen_keys[invoice.import_key] = first.line
        invoices.append(invoice)
    return invoices, sorted(bad, key=lambda b: b.line)


def _validate(line: int, v: dict[str, str], today: date) -> tuple[_Row | None, str | None]:
    try:
        email = normalize_email(v.get("email", ""))
    except LinkError as exc:
        return None, str(exc)
    if not v.get("name"):
        return None, "name is empty"
    try:
        name = check_name(v["name"])
    except LinkError as exc:
        return None, str(exc)
    if not v.get("description"):
        return None, "description is empty"
    itemised = any(v.get(c) for c in ITEM_COLUMNS)
    try:
        currency = check_currency(v.get("currency", ""))
        amount = to_minor_units(v.get("amount", ""), currency) if v.get("amount") or not itemised else None
    except MoneyError as exc:
        return None, str(exc)
    item: LineItem | None = None
    if itemised:
        if not v.get("item_description"):
            return None, "item_description is empty (a row with item columns is one line item)"
        try:
            item = make_item(
                v["item_description"], v.get("item_quantity") or "1", v.get("item_unit_amount", ""), v.get("item_tax_percent", ""), currency
            )
        except LinkError as exc:
            return None, f"item: {exc}"
    due: date | None = None
    if v.get("due_date"):
        try:
            due = date.fromisoformat(v["due_date"])
        except ValueError:
            return None, f"due_date {v['due_date']!r} is not a date (use YYYY-MM-DD)"
    try:
        check_due_date(due, today=today)
        locale = check_locale(v.get("locale") or None)
        number = check_invoice_number(v["number"]) if v.get("number") else None
        notes = check_notes(v.get("notes") or None)
    except LinkError as exc:
        return None, str(exc)
    return _Row(line, email, name, amount, currency, v["description"], due, number, locale, notes, item), None


def _invoice(rows: list[_Row]) -> tuple[ImportRow | None, str | None]:
    """The invoice of one row, or of the rows sharing a number: its lines checked (Stripe's minimum
    charge, at most MAX_LINES) and a given amount matched against their total."""
    first = rows[0]
    lines = tuple(r.item for r in rows if r.item is not None)
    prefix = f"invoice {first.number}: " if first.number and len(rows) > 1 else ""
    try:
        if lines:
            total = check_lines(lines, first.currency).total
            if first.amount is not None and first.amount != total:
                return None, (
                    f"{prefix}amount {format_money(first.amount, first.currency)} is not the total of its items, "
                    f"{format_money(total, first.currency)} (leave amount empty, or correct it)"
                )
        else:
            assert first.amount is not None
            total = check_lines([plain_line(first.description, first.amount)], first.currency).total
    except LinkError as exc:
        return None, f"{prefix}{exc}"
    key = None if first.number else derived_key(first.email, total, first.currency, first.description, first.due_date, lines)
    invoice = ImportRow(
        first.line, first.email, first.name, total, first.currency, first.description, first.due_date, first.number, first.locale,
        key, lines, first.notes, tuple(r.line for r in rows),
    )  # fmt: skip
    return invoice, None


async def check_against_database(session: AsyncSession, rows: list[ImportRow]) -> tuple[list[ImportRow], list[ImportRow], list[BadRow]]:
    """Split rows into new ones, ones already imported (same number, same invoice; or, without a
    number, the same contents) and conflicts.

    Only a finished import counts: an invoice of an import still `writing` is deleted again if that
    import fails (undo_import). If it has been silent for STALE_IMPORT it died, and its rows are new:
    import_rows undoes it before writing them. Until then it may be alive (another clerk importing the
    same file, a chunk being written): ImportInProgress, and nothing is written."""
    existing: dict[str, tuple[tuple[str, int, str], uuid.UUID | None]] = {}
    for chunk in chunked([r.number for r in rows if r.number is not None]):
        result = await session.execute(
            select(Invoice.number, Customer.email, Invoice.amount_due, Invoice.currency, Invoice.import_batch_id)
            .join(Customer, Customer.id == Invoice.customer_id)
            .where(Invoice.number.in_(chunk))
        )
        existing.update({n: ((e, a, c), b) for n, e, a, c, b in result})
    known_keys: dict[str, uuid.UUID | None] = {}
    for chunk in chunked([r.import_key for r in rows if r.import_key is not None]):
        keyed = await session.execute(select(Invoice.import_key, Invoice.import_batch_id).where(Invoice.import_key.in_(chunk)))
        known_keys.update({k: b for k, b in keyed if k is not None})
    batch_ids = {b for _, b in existing.values() if b is not None} | {b for b in known_keys.values() if b is not None}
    unfinished: dict[uuid.UUID, ImportBatch] = {}
    for ids in chunked(sorted(batch_ids)):
        found = await session.execute(select(ImportBatch).where(ImportBatch.id.in_(ids), ImportBatch.status == ImportStatus.WRITING))
        unfinished.update({batch.id: batch for batch in found.scalars()})
    now = utcnow()
    new: list[ImportRow] = []
    done: list[ImportRow] = []
    bad: list[BadRow] = []
    waiting: dict[uuid.UUID, int] = {}  # an unfinished import that may be alive: how many of the rows it holds
    for row in rows:
        if row.number is None:
            key = row.import_key or ""
            matched, same, batch_id = key in known_keys, True, known_keys.get(key)  # the key is its contents
        else:
            invoice, batch_id = existing.get(row.number, (None, None))
            matched, same = invoice is not None, invoice == (row.email, row.amount, row.currency)
        batch = unfinished.get(batch_id) if batch_id is not None else None
        if batch is not None and batch.heartbeat_at > now - STALE_IMPORT:
            waiting[batch.id] = waiting.get(batch.id, 0) + 1
        elif batch is not None or not matched:
            new.append(row)  # (an invoice of a dead import goes with it: import_rows undoes it before writing)
        elif same:
            done.append(row)
        else:
            bad += [BadRow(line, f"invoice number {row.number} is already used by a different invoice") for line in row.file_lines]
    if waiting:
        raise ImportInProgress.of([unfinished[b] for b in waiting], sum(waiting.values()), now=now)
    return new, done, bad


class ImportInProgress(LinkError):
    """Rows of the file belong to an import still being written, or one that died and is not undone
    yet: they are not imported, and cannot be imported again until that import ends either way."""

    @classmethod
    def of(cls, batches: list[ImportBatch], rows: int, *, now: datetime) -> ImportInProgress:
        batch = max(batches, key=lambda b: b.heartbeat_at)  # the last to give a sign of life: the last to be undone
        silent = max(int((now - batch.heartbeat_at).total_seconds()), 0)
        silence = f"{silent // 60} min" if silent >= 60 else f"{silent} s"
        others = f" (and {len(batches) - 1} other import(s))" if len(batches) > 1 else ""
        return cls(
            f"{rows} of these invoices belong to an import that is still being written, or was interrupted: batch {batch.id} "
            f"of {batch.source} by {batch.actor}{others}, last sign of life {silence} ago. "
            "If it is running, let it finish, then import again; if it was interrupted, import again after "
            f"{(batch.heartbeat_at + STALE_IMPORT):%H:%M} UTC: it is undone first, then every row is written. Nothing was imported"
        )


class ImportAborted(LinkError):
    """The batch was undone under its writer (it had been silent for STALE_IMPORT)."""


class ImportFailed(LinkError):
    """Writing failed part-way; what was written has been undone. One line for the operator."""


async def import_rows(
    sessions: async_sessionmaker[AsyncSession],
    readers: async_sessionmaker[AsyncSession],
    settings: Settings,
    rows: Sequence[ImportRow],
    *,
    actor: str,
    source: str,
    send: bool,
    verified: bool,
    report: ImportReport,
    progress: Callable[[int], None] = lambda n: None,
    chunk_rows: int = CHUNK_ROWS,
    ttl_days: int | None = None,
) -> uuid.UUID:
    """Create customers (matched case-insensitively by email) and invoices, chunk by chunk; issue
    links and queue their emails if asked, held until the last chunk is written. All or nothing:
    a failure undoes what the earlier chunks wrote. Returns the import's batch id."""
    for undone in await undo_stale_imports(sessions, settings):
        log.warning("import.undone_stale batch=%s", undone)
    batch_id = await _start_batch(sessions, rows, actor=actor, source=source)
    try:
        numbers = await _allocate_numbers(sessions, batch_id, rows)
        customers = await _existing_customers(readers, sorted({r.email for r in rows}))
        issued: list[IssuedLink] = []
        for start in range(0, len(rows), chunk_rows):
            chunk = rows[start : start + chunk_rows]
            try:
                issued += await _write_chunk(
                    sessions, settings, batch_id, chunk, numbers, customers, actor=actor, send=send, verified=verified, report=report,
                    ttl_days=ttl_days,
                )  # fmt: skip
            except SQLAlchemyError as exc:  # e.g. a customer or number created by someone else meanwhile
                reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
                raise ImportFailed(f"lines {chunk[0].line}-{chunk[-1].line} could not be written ({reason})") from None
            progress(len(chunk))
        report.created_invoices = len(rows)
        report.emailed = sum(1 for i in issued if i.emailed)
        report.held = sum(1 for i in issued if not i.emailed)
        await _finish_batch(sessions, batch_id, actor=actor, report=report)
    except BaseException as exc:  # Ctrl-C too: leave nothing behind
        reason = " ".join(str(exc).split())[:500] or type(exc).__name__
        try:
            await undo_import(sessions, settings, batch_id, reason=reason, actor=actor)
        except Exception:
            log.exception("import.undo_failed batch=%s (the next import undoes it)", batch_id)
        report.created_invoices = report.created_customers = report.emailed = report.held = 0
        report.held_reasons, report.expire_before_due, report.ttl_days_needed = {}, 0, 0
        if isinstance(exc, LinkError):  # one line for the operator
            raise ImportFailed(f"{exc}; nothing was imported") from None
        raise
    return batch_id


async def _start_batch(sessions: async_sessionmaker[AsyncSession], rows: Sequence[ImportRow], *, actor: str, source: str) -> uuid.UUID:
    async with sessions.begin() as session:
        batch = ImportBatch(id=uuid.uuid4(), status=ImportStatus.WRITING, actor=actor[:200], source=source[-500:], rows=len(rows))
        session.add(batch)
        return batch.id


async def _allocate_numbers(sessions: async_sessionmaker[AsyncSession], batch_id: uuid.UUID, rows: Sequence[ImportRow]) -> dict[int, str]:
    """Numbers for the rows without one, in file order, taken in one short transaction and kept on
    the batch, so that a failed import can give them back."""
    unnumbered = [r.line for r in rows if r.number is None]
    if not unnumbered:
        return {}
    async with sessions.begin() as session:
        allocation = await allocate_invoice_numbers(session, len(unnumbered))
        await session.execute(
            update(ImportBatch).where(ImportBatch.id == batch_id).values(first_number=allocation.first, last_number=allocation.last)
        )
    return dict(zip(unnumbered, allocation.numbers, strict=True))


async def _existing_customers(readers: async_sessionmaker[AsyncSession], emails: list[str]) -> dict[str, Customer]:
    customers: dict[str, Customer] = {}
    async with readers() as session:
        for chunk in chunked(emails):
            found = await session.execute(select(Customer).where(Customer.email.in_(chunk)))
            customers.update({c.email: c for c in found.scalars()})
    return customers


async def _write_chunk(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    batch_id: uuid.UUID,
    rows: Sequence[ImportRow],
    numbers: dict[int, str],
    customers: dict[str, Customer],
    *,
    actor: str,
    send: bool,
    verified: bool,
    report: ImportReport,
    ttl_days: int | None = None,
) -> list[IssuedLink]:
    """One short transaction. Everything is built (and every email rendered) before the first
    statement, so the write lock is held only while the rows are inserted."""
    now = utcnow()
    checked_on = now.date() - timedelta(days=1)  # due dates were checked when the file was read, maybe before midnight
    async with sessions.begin() as session:
        created: list[Customer] = []
        for row in rows:
            if row.email not in customers:
                customer = new_customer(
                    email=row.email,
                    name=row.name,
                    locale=row.locale,
                    verified_by=f"attested by {actor} (import)" if verified else None,
                    now=now,
                    import_batch_id=batch_id,
                )
                session.add(customer)
                customers[row.email] = customer
                created.append(customer)
        if send and not verified:
            for customer in created:  # their invoices are held until they confirm the address
                request_verification(session, settings, customer, actor=actor)
        invoices: list[tuple[Invoice, Customer]] = []
        for row in rows:
            customer = customers[row.email]
            invoice = new_invoice(
                customer_id=customer.id,
                number=row.number or numbers[row.line],
                currency=row.currency,
                amount_due=row.amount,
                lines=row.lines or None,
                notes=row.notes,
                description=row.description,
                due_date=row.due_date,
                import_key=row.import_key,
                import_batch_id=batch_id,
                today=checked_on,
                part_rules=default_part_rules(settings),  # PARTIAL_PAYMENTS_DEFAULT
            )
            session.add(invoice)
            invoices.append((invoice, customer))
        issued = (
            [await issue_link(session, settings, invoice=i, customer=c, actor=actor, ttl_days=ttl_days, audited=False) for i, c in invoices]
            if send
            else []
        )
        for (invoice, _), link in zip(invoices, issued, strict=False):  # no links without --send
            if link.held_reason:
                report.held_reasons[link.held_reason] = report.held_reasons.get(link.held_reason, 0) + 1
            if invoice.due_date is not None and link.expires_at.date() < invoice.due_date:
                report.expire_before_due += 1
                report.ttl_days_needed = max(report.ttl_days_needed, (invoice.due_date - now.date()).days + 1)
        for message in session.new:
            if isinstance(message, OutboxMessage):
                message.next_attempt_at = HOLD_UNTIL  # released with the last chunk
        # The first statement of the transaction: the write lock is taken here. Customers and
        # invoices first (links and emails refer to them; the unit of work does not know that).
        later = [obj for obj in session.new if not isinstance(obj, (Customer, Invoice))]
        for obj in later:
            session.expunge(obj)
        await flush_new_invoices(session, [invoice.number for invoice, _ in invoices])
        session.add_all(later)
        await session.flush()
        await _still_writing(session, batch_id, heartbeat_at=utcnow())
    report.created_customers += len(created)
    return issued


async def _still_writing(session: AsyncSession, batch_id: uuid.UUID, **values: Any) -> None:
    """Update the batch if it is still being written; ImportAborted if it is not: a run paused longer
    than STALE_IMPORT (Ctrl-Z, a frozen machine) was undone meanwhile as dead, and must not go on to
    report its rows imported (its earlier chunks are gone)."""
    result = await session.execute(
        update(ImportBatch).where(ImportBatch.id == batch_id, ImportBatch.status == ImportStatus.WRITING).values(**values)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        raise ImportAborted(f"this import was silent for over {int(STALE_IMPORT.total_seconds() // 60)} min and was undone meanwhile")


async def _finish_batch(sessions: async_sessionmaker[AsyncSession], batch_id: uuid.UUID, *, actor: str, report: ImportReport) -> None:
    """The short final transaction: release the held emails, mark the batch done, audit the import."""
    async with sessions.begin() as session:
        await session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.next_attempt_at == HOLD_UNTIL, _batch_messages(batch_id))
            .values(next_attempt_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        await _still_writing(session, batch_id, status=ImportStatus.DONE, finished_at=utcnow(), heartbeat_at=utcnow())
        audit.record(
            session,
            actor,
            "import",
            "invoices",
            batch=str(batch_id),
            created=report.created_invoices,
            customers=report.created_customers,
            emailed=report.emailed,
            held=report.held,
        )


def _batch_messages(batch_id: uuid.UUID) -> ColumnElement[bool]:
    """The batch's outbox rows: its invoices' emails, and the confirmation requests to its new customers."""
    return or_(
        OutboxMessage.invoice_id.in_(select(Invoice.id).where(Invoice.import_batch_id == batch_id)),
        and_(
            OutboxMessage.invoice_id.is_(None),
            OutboxMessage.recipient.in_(select(Customer.email).where(Customer.import_batch_id == batch_id)),
        ),
    )


async def undo_import(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, batch_id: uuid.UUID, *, reason: str, actor: str
) -> None:
    """The compensating transaction: delete what the batch's chunks wrote, give its invoice numbers
    back (or, if someone took a number since, tell finance which ones stay unused), mark it aborted."""
    async with sessions.begin() as session:
        batch = await session.get(ImportBatch, batch_id, with_for_update=True)
        if batch is None or batch.status != ImportStatus.WRITING:
            return
        invoices = select(Invoice.id).where(Invoice.import_batch_id == batch_id)
        links = select(PaymentLink.id).where(PaymentLink.invoice_id.in_(invoices))
        unsent = {"synchronize_session": False}
        await session.execute(
            delete(OutboxMessage)
            .where(
                or_(
                    OutboxMessage.invoice_id.in_(invoices),
                    and_(OutboxMessage.next_attempt_at == HOLD_UNTIL, _batch_messages(batch_id)),
                )
            )
            .execution_options(**unsent)
        )
        await session.execute(delete(LinkOpen).where(LinkOpen.link_id.in_(links)).execution_options(**unsent))
        await session.execute(delete(LinkRequest).where(LinkRequest.invoice_id.in_(invoices)).execution_options(**unsent))
        await session.execute(delete(ReminderSent).where(ReminderSent.invoice_id.in_(invoices)).execution_options(**unsent))
        await session.execute(delete(PaymentLink).where(PaymentLink.invoice_id.in_(invoices)).execution_options(**unsent))
        await session.execute(delete(Invoice).where(Invoice.import_batch_id == batch_id).execution_options(**unsent))
        still_used = exists().where(Invoice.customer_id == Customer.id)
        await session.execute(delete(Customer).where(Customer.import_batch_id == batch_id, ~still_used).execution_options(**unsent))
        if batch.first_number is not None and batch.last_number is not None:
            if not await give_back_invoice_numbers(session, batch.first_number, batch.last_number):
                _report_unused_numbers(session, settings, batch, reason, actor)
        batch.status = ImportStatus.ABORTED
        batch.finished_at = utcnow()
        batch.error = reason[:2000]
        audit.record(session, actor, "import.undone", "invoices", batch=str(batch_id), source=batch.source, reason=reason[:300])


def _report_unused_numbers(session: AsyncSession, settings: Settings, batch: ImportBatch, reason: str, actor: str) -> None:
    """Someone numbered an invoice after the import took its numbers: they cannot go back (that
    would hand out a number twice), so finance hears which ones stay unused, and why."""
    assert batch.first_number is not None and batch.last_number is not None
    first, last = format_invoice_number(batch.first_number), format_invoice_number(batch.last_number)
    unused = f"{first} to {last}"
    audit.record(session, actor, "invoice.numbers_unused", "invoices", batch=str(batch.id), first=first, last=last)
    lines = [
        f"Invoice numbers {unused} were taken by an import that failed, and are not used.",
        "Other invoices were numbered meanwhile, so they could not be given back.",
        f"Reason the import failed: {reason[:300]}",
    ]
    outbox.alert_finance(session, settings, "Invoice numbers left unused by a failed import", lines)


async def undo_stale_imports(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> list[uuid.UUID]:
    """Undo imports that died part-way (no chunk for STALE_IMPORT) without undoing themselves."""
    cutoff = utcnow() - STALE_IMPORT
    async with sessions() as session:
        stale = list(
            (
                await session.execute(
                    select(ImportBatch.id).where(ImportBatch.status == ImportStatus.WRITING, ImportBatch.heartbeat_at < cutoff)
                )
            ).scalars()
        )
    for batch_id in stale:
        await undo_import(sessions, settings, batch_id, reason="the import stopped part-way (process ended)", actor="import")
    return stale
