"""The finance CLI, `python -m links …`: a composition root, one module per command group.

Each group module registers its commands (parser, help, example) and runs them with the services
container open; it parses, calls services and prints, and never runs SQL of its own. Global options
(`--json`, `--actor`) work before or after the command. Exit codes: 0 ok, 1 user error (one line on
stderr), 2 usage.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cli import customers, invoices, links, migrate, money, outbox, reminders, reports, transfer
from cli.common import PROG, Parser, UsageError, add_global_options, json_requested, run, usage_error

# In the order `--help` lists them.
GROUPS = (customers, invoices, links, reminders, money, outbox, transfer, reports, migrate)


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Paylink finance desk.")
    add_global_options(parser, top=True)
    commands = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(arguments)
    except UsageError as exc:
        return usage_error(exc, json_requested(arguments))
    return run(args)
