"""`reconcile`: ask Stripe for the truth about every unfinished payment and missed event, and cancel
orphan PaymentIntents (created for an attempt that will never confirm them)."""

from __future__ import annotations

from cli.common import Context, Parser, Services, Subcommands, command, emit
from payments.reconcile import reconcile as reconcile_with_stripe


def register(commands: Subcommands[Parser]) -> None:
    command(
        commands,
        "reconcile",
        "Ask Stripe for the truth about every unfinished payment and missed event; cancel orphan PaymentIntents.",
        example="python -m links reconcile --json",
        run=reconcile,
    )


async def reconcile(ctx: Context, services: Services) -> None:
    report = await reconcile_with_stripe(services.sessions, services.gateway, ctx.settings)
    record = {
        "checked_payments": report.checked,
        "events_applied": report.events_applied,
        "orphans_canceled": report.orphans_canceled,
        "imports_undone": report.imports_undone,
        "changes": report.changes,
    }

    def human() -> None:
        ctx.console.print(
            f"Checked {report.checked} payment(s), applied {report.events_applied} missed event(s), "
            f"canceled {report.orphans_canceled} orphan PaymentIntent(s)."
        )
        for batch in report.imports_undone:
            ctx.console.print(f"  undid import {batch}: it stopped part-way; nothing of it is left")
        for change in report.changes:
            what = f"payment {change['payment']}" if change["payment"] else "invoice"
            if change.get("intent"):
                what = f"orphan PaymentIntent {change['intent']} of payment {change['payment']}"
            ctx.console.print(f"  {change['invoice']}: {what} {change['from']} -> {change['to']}")
        if not report.changes:
            ctx.console.print("Nothing changed: our records match Stripe.")

    emit(ctx, record, human)
