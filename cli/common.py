"""What every command group shares: the parser and its global options, the context a command runs
in, output (tables, JSON, progress) and how errors become one line and an exit code.

Exit codes: 0 ok, 1 user error (one line on stderr), 2 usage. With --json, results are JSON on
stdout and errors, warnings and problems are JSON lines on stderr (`{"error": …, "kind": …}`).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, NoReturn

from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from links.errors import LinkError
from payments.checkout import PaymentRefused
from payments.gateway import GatewayError
from plumbing.i18n import MoneyError
from plumbing.settings import ConfigError, Settings
from services import Services as Services  # re-exported: command modules type their handlers with it
from services import open_services

PROG = "python -m links"

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_USAGE = 2

SCHEMA_HINT = "is the schema up to date? run `python -m links migrate`"


class UserError(Exception):
    """Something the operator can fix; printed as one line on stderr, exit code 1."""


class UsageError(Exception):
    """The command line itself is wrong (argparse's error); exit code 2."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is raised, so that `main` prints it (as JSON with --json)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


# --- global options -----------------------------------------------------------------------------
#
# Defined once, accepted before or after any (sub)command: the top-level parser holds the defaults;
# every group and command parser repeats the option with SUPPRESS as its default, so a subcommand
# that was not given the option leaves the value parsed before it alone.

GLOBAL_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--json", {"action": "store_true", "default": False, "help": "print a machine-readable JSON result (and JSON errors)"}),
    ("--actor", {"default": None, "help": "who is acting, for the audit log (default: your OS user)"}),
)


def add_global_options(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    for flag, options in GLOBAL_OPTIONS:
        parser.add_argument(flag, **(options if top else {**options, "default": argparse.SUPPRESS}))


def json_requested(argv: Sequence[str]) -> bool:
    """Whether --json is on the command line, before it is parsed (a usage error is JSON too)."""
    options = argv[: list(argv).index("--")] if "--" in argv else argv
    return "--json" in options


# --- registering commands -------------------------------------------------------------------------

Subcommands = argparse._SubParsersAction  # what `add_subparsers` returns
AsyncHandler = Callable[["Context", Services], Awaitable[None]]
SyncHandler = Callable[["Context"], None]


def command_group(commands: Subcommands[Parser], name: str, help_text: str, *, metavar: str = "ACTION") -> Subcommands[Parser]:
    """A group such as `invoice`, whose commands are registered on what this returns."""
    parser = commands.add_parser(name, help=help_text, description=help_text)
    add_global_options(parser)
    return parser.add_subparsers(dest="command", required=True, metavar=metavar)


def command(
    commands: Subcommands[Parser],
    name: str,
    help_text: str,
    *,
    example: str,
    run: AsyncHandler | None = None,
    run_sync: SyncHandler | None = None,
) -> Parser:
    """One command with its help, an example shown by --help, and the function that runs it:
    `run(ctx, services)` with the container open, or `run_sync(ctx)` for commands that need none."""
    assert (run is None) != (run_sync is None)
    parser = commands.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_options(parser)
    parser.set_defaults(handler=run, sync_handler=run_sync)
    return parser


def parse_date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date (use YYYY-MM-DD)") from None


# --- the context of one command -------------------------------------------------------------------


@dataclass
class Context:
    settings: Settings
    args: argparse.Namespace
    console: Console

    @property
    def json(self) -> bool:
        return bool(self.args.json)

    @property
    def actor(self) -> str:
        return f"cli:{self.args.actor or _os_user()}"

    def warn(self, message: str) -> None:
        """Something went wrong that does not stop the command; stderr, JSON with --json."""
        _stderr_line(self.json, "warning", message, {"warning": message})

    def problem(self, message: str, **fields: Any) -> None:
        """One of several problems (e.g. a bad CSV row), like a compiler's line; stderr, JSON with --json."""
        _stderr_line(self.json, None, message, {"error": message, **fields})


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


# --- output ----------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def print_json(value: Any) -> None:
    print(json.dumps(jsonable(value), indent=2, ensure_ascii=False))


def emit(ctx: Context, result: dict[str, Any], human: Callable[[], None]) -> None:
    """The command's result: JSON on stdout with --json, otherwise what `human` prints."""
    if ctx.json:
        print_json(result)
    else:
        human()


def table(*columns: str | Column, show_lines: bool = False) -> Table:
    return Table(*columns, show_edge=False, header_style="bold", show_lines=show_lines)


def whole(header: str) -> Column:
    """A column whose values are never cut nor wrapped: invoice numbers, amounts, dates, statuses."""
    return Column(header, no_wrap=True)


def free(header: str) -> Column:
    """A column of free text (names, emails, notes): it wraps, and a long word (an email) folds onto the next line."""
    return Column(header, overflow="fold")


FREE_TEXT_MIN = 20  # narrower, an email or a note takes more lines than the row's figures: the table counts as too wide


def fits(out: Table, width: int) -> bool:
    """Whether every `whole` column shows in full within `width`, the free-text columns left at least
    FREE_TEXT_MIN wide. When a table is too wide rich shortens every column alike ("INV-000…",
    "€1,486.…"), so a command that can show its rows another way (fewer, taller columns) asks first."""
    padding = out.padding[1] + out.padding[3]
    needed = len(out.columns) - 1  # the rules between columns (tables here have no outer edge)
    for column in out.columns:
        lines = [line for cell in (column.header, *column.cells) for line in str(cell).splitlines()]
        widest = max((cell_len(line) for line in lines), default=0)
        needed += padding + (widest if column.no_wrap else min(widest, FREE_TEXT_MIN))
    return needed <= width


@contextmanager
def progress(ctx: Context, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal (on stderr); nothing when piped or with --json. Yields `advance(n)`."""
    if ctx.json or not sys.stderr.isatty():
        yield lambda n: None
        return
    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


async def sync_quietly(ctx: Context, sync: Callable[[], Awaitable[Any]]) -> None:
    """Refresh something from Stripe; if Stripe cannot be reached, say so and go on."""
    try:
        await sync()
    except GatewayError as exc:
        ctx.warn(f"could not refresh saved cards from Stripe ({exc}); the page shows the last known ones")


# --- running a command -----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; every error the operator can act on is one line and exit code 1."""
    as_json = bool(args.json)
    try:
        ctx = Context(Settings.from_env(), args, _console())
        if args.sync_handler is not None:
            args.sync_handler(ctx)
        else:
            asyncio.run(_run_with_services(ctx, args.handler))
    except ConfigError as exc:
        return fail(as_json, "configuration", str(exc))
    except (UserError, LinkError, MoneyError, PaymentRefused) as exc:
        return fail(as_json, "user", str(exc))
    except GatewayError as exc:
        return fail(as_json, "stripe", " ".join(str(exc).split()))
    except SQLAlchemyError as exc:
        # e.g. a database that was never migrated, or a value the database refuses: one line, no traceback.
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
        return fail(as_json, "database", reason, hint=None if isinstance(exc, IntegrityError) else SCHEMA_HINT)
    return EXIT_OK


PIPED_WIDTH = 240  # tables piped to a file or grep are not squeezed into 80 columns


def _console() -> Console:
    """Human output: the terminal's width on a terminal; wide when piped, so that rows stay whole."""
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else PIPED_WIDTH)


async def _run_with_services(ctx: Context, handler: AsyncHandler) -> None:
    async with open_services(ctx.settings) as services:
        await handler(ctx, services)


_HUMAN_PREFIX = {"configuration": "configuration error: ", "user": "error: ", "stripe": "error: Stripe: ", "database": "error: database: "}


def fail(as_json: bool, kind: str, message: str, *, hint: str | None = None) -> int:
    """Print the one-line error and return exit code 1."""
    human = _HUMAN_PREFIX[kind] + message + (f" ({hint})" if hint else "")
    record: dict[str, Any] = {"error": message, "kind": kind}
    if hint:
        record["hint"] = hint
    _stderr_line(as_json, None, human, record)
    return EXIT_USER_ERROR


def usage_error(exc: UsageError, as_json: bool) -> int:
    """argparse's usage message and exit code 2; with --json, one JSON line."""
    if as_json:
        record = {"error": exc.message, "kind": "usage", "usage": " ".join(exc.parser.format_usage().split())}
        print(json.dumps(record, ensure_ascii=False), file=sys.stderr)
    else:
        sys.stderr.write(exc.parser.format_usage())
        sys.stderr.write(f"{exc.parser.prog}: error: {exc.message}\n")
    return EXIT_USAGE


def _stderr_line(as_json: bool, label: str | None, message: str, record: dict[str, Any]) -> None:
    if as_json:
        print(json.dumps(jsonable(record), ensure_ascii=False), file=sys.stderr)
    else:
        print(f"{label}: {message}" if label else message, file=sys.stderr)
