"""`customer …`: add, show, verify and update customers."""

from __future__ import annotations

import argparse
from typing import Any

from cli.common import Context, Parser, Services, Subcommands, UserError, command, command_group, emit, sync_quietly, table
from links.customers import ADDRESS_FIELDS, add_customer, check_address, check_new_customer, find_customer, list_customers, update_customer
from links.models import Customer
from links.verification import change_email, request_verification
from payments import cards as card_service
from payments.cards import sync_profiles
from payments.gateway import GatewayError
from payments.models import PaymentProfile
from payments.queries import saved_cards


def register(commands: Subcommands[Parser]) -> None:
    customer = command_group(commands, "customer", "add and look up customers")

    p = command(
        customer,
        "add",
        "Add a customer (creates the Stripe customer unless --stripe-customer is given).",
        example='python -m links customer add --email ann@example.com --name "Ann Lee" --verified',
        run=add,
    )
    p.add_argument("--email", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--locale", help="language for pages and emails: en, de, fr, es")
    p.add_argument("--stripe-customer", help="an existing Stripe customer id (cus_…)")
    p.add_argument("--verified", action="store_true", help="finance attests the address (e.g. from the CRM); recorded in the audit log")
    _address_options(p)

    p = command(
        customer,
        "list",
        "List customers (by email) with their verification state and invoices; --search narrows to email or name.",
        example="python -m links customer list --search lee",
        run=list_,
    )
    p.add_argument("--search", help="only customers whose email or name contains this text (case-insensitive)")

    p = command(
        customer,
        "show",
        "Show a customer: billing address, verification state, saved cards, delivery problems.",
        example="python -m links customer show ann@example.com",
        run=show,
    )
    p.add_argument("email")

    p = command(
        customer,
        "cards",
        "List a customer's cards (refreshed from Stripe; a card attached twice is kept once): id, brand, last 4, expiry, default, saved.",
        example="python -m links customer cards ann@example.com",
        run=cards,
    )
    p.add_argument("email")

    p = command(
        customer,
        "remove-card",
        "Remove a saved card: detached at Stripe (never charged again) and no longer offered on the pay page.",
        example="python -m links customer remove-card ann@example.com pm_1AbC",
        run=remove_card,
    )
    p.add_argument("email")
    p.add_argument("payment_method", metavar="PM_ID", help="the card's payment method id (pm_…), from `customer cards`")

    p = command(
        customer,
        "verify",
        "Email the customer a link that confirms their address.",
        example="python -m links customer verify ann@example.com",
        run=verify,
    )
    p.add_argument("email")

    p = command(
        customer,
        "update",
        "Change a customer's name, language or email (a new email is re-verified).",
        example="python -m links customer update ann@example.com --email ann.lee@example.org",
        run=update,
    )
    p.add_argument("email", help="the customer's current email")
    p.add_argument("--email", dest="new_email", help="the new email address")
    p.add_argument("--name")
    p.add_argument("--locale")
    _address_options(p)


def _address_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address-line1", help="billing address, first line")
    parser.add_argument("--address-line2", help="billing address, second line")
    parser.add_argument("--postal-code")
    parser.add_argument("--city")
    parser.add_argument("--country", help="two-letter country code, e.g. DE")


def _address(args: argparse.Namespace) -> dict[str, str]:
    """The billing address options given (shown prefilled on the pay page), checked."""
    return check_address({field: getattr(args, field, None) for field in ADDRESS_FIELDS})


async def _delete_quietly(ctx: Context, services: Services, stripe_id: str) -> None:
    try:
        await services.gateway.delete_customer(stripe_id)
    except GatewayError as exc:
        ctx.warn(f"could not delete Stripe customer {stripe_id}, created for nothing ({exc}); delete it in the dashboard")


def customer_record(customer: Customer) -> dict[str, Any]:
    return {
        "id": str(customer.id),
        "email": customer.email,
        "name": customer.name,
        "locale": customer.locale,
        "verified": customer.email_verified_at is not None,
        "email_verified_at": customer.email_verified_at,
        "email_verified_by": customer.email_verified_by,
        "stripe_customer_id": customer.stripe_customer_id,
        "address": customer.address_lines,
        "email_undeliverable_at": customer.email_undeliverable_at,
        "email_undeliverable_reason": customer.email_undeliverable_reason,
        "created_at": customer.created_at,
    }


def _profile_record(profile: PaymentProfile) -> dict[str, Any]:
    return {
        "payment_method": profile.stripe_payment_method_id,
        "brand": profile.brand,
        "last4": profile.last4,
        "exp_month": profile.exp_month,
        "exp_year": profile.exp_year,
        "default": profile.is_default,
    }


async def add(ctx: Context, services: Services) -> None:
    a = ctx.args
    # Everything is checked before a Stripe customer is created, so bad input leaves nothing there.
    async with services.readers() as session:
        details = await check_new_customer(
            session,
            email=a.email,
            name=a.name,
            locale=a.locale,
            stripe_customer_id=a.stripe_customer,
            address={field: getattr(a, field, None) for field in ADDRESS_FIELDS},
        )
    created_at_stripe = details.stripe_customer_id is None
    stripe_id = details.stripe_customer_id or await services.gateway.create_customer(details.email, details.name)
    try:
        async with services.sessions.begin() as session:
            customer = await add_customer(
                session,
                email=details.email,
                name=details.name,
                actor=ctx.actor,
                locale=details.locale,
                stripe_customer_id=stripe_id,
                verified=a.verified,
                address=details.address,
            )
            if not a.verified:
                request_verification(session, ctx.settings, customer, actor=ctx.actor)
    except Exception:
        # e.g. the same email added a moment ago by someone else: take back what we made at Stripe.
        if created_at_stripe:
            await _delete_quietly(ctx, services, stripe_id)
        raise
    if stripe_id:
        await sync_quietly(ctx, lambda: sync_profiles(services.sessions, services.gateway, customer.id))
    state = "verified (attested)" if a.verified else "not verified yet: a confirmation email is on its way"
    emit(
        ctx,
        customer_record(customer),
        lambda: ctx.console.print(f"Added customer {customer.email}, {state}. Stripe customer {stripe_id}."),
    )


async def show(ctx: Context, services: Services) -> None:
    async with services.readers() as session:
        customer = await find_customer(session, ctx.args.email)
        profiles = await saved_cards(session, customer.id)
    record = customer_record(customer)
    record["payment_profiles"] = [_profile_record(p) for p in profiles]

    def human() -> None:
        out = table("Field", "Value")
        out.add_row("Email", customer.email)
        out.add_row("Name", customer.name)
        verified = (
            f"yes, {customer.email_verified_at:%Y-%m-%d %H:%M} UTC ({customer.email_verified_by})" if customer.email_verified_at else "no"
        )
        out.add_row("Verified", verified)
        if customer.email_undeliverable_at:
            out.add_row("Undeliverable", customer.email_undeliverable_reason or "yes")
        out.add_row("Address", ", ".join(customer.address_lines) or "-")
        out.add_row("Stripe customer", customer.stripe_customer_id or "-")
        out.add_row("Locale", customer.locale or "-")
        for p in profiles:
            expiry = f" exp {p.exp_month:02d}/{p.exp_year}" if p.exp_month and p.exp_year else ""
            out.add_row("Saved card", f"{p.brand.title()} •••• {p.last4}{expiry}{' (default)' if p.is_default else ''}")
        ctx.console.print(out)

    emit(ctx, record, human)


async def cards(ctx: Context, services: Services) -> None:
    async with services.readers() as session:
        customer = await find_customer(session, ctx.args.email)
    if customer.stripe_customer_id:
        await sync_quietly(ctx, lambda: sync_profiles(services.sessions, services.gateway, customer.id))
    async with services.readers() as session:
        profiles = await saved_cards(session, customer.id)
    records = [{**_profile_record(p), "id": p.stripe_payment_method_id, "saved": p.reusable} for p in profiles]

    def human() -> None:
        out = table("Id", "Brand", "Last 4", "Expires", "Default", "Saved")
        for p in profiles:
            expiry = f"{p.exp_month:02d}/{p.exp_year}" if p.exp_month and p.exp_year else "-"
            out.add_row(
                p.stripe_payment_method_id,
                p.brand.title(),
                p.last4,
                expiry,
                "yes" if p.is_default else "",
                "yes" if p.reusable else "no (this payment only)",
            )
        ctx.console.print(out)
        ctx.console.print(f"{len(profiles)} card(s) for {customer.email}.")

    emit(ctx, {"customer": customer.email, "cards": records}, human)


async def remove_card(ctx: Context, services: Services) -> None:
    async with services.readers() as session:
        customer = await find_customer(session, ctx.args.email)
    try:
        removed = await card_service.remove_card(services.sessions, services.gateway, customer.id, ctx.args.payment_method, actor=ctx.actor)
    except card_service.UnknownCard:
        raise UserError(
            f"{ctx.args.payment_method} is not a saved card of {customer.email} (see `customer cards {customer.email}`)"
        ) from None
    record = {"customer": customer.email, "removed": removed.payment_method_id, "brand": removed.brand, "last4": removed.last4}
    emit(
        ctx,
        record,
        lambda: ctx.console.print(
            f"Removed {removed.brand.title()} •••• {removed.last4} ({removed.payment_method_id}) of {customer.email}: detached at Stripe."
        ),
    )


async def list_(ctx: Context, services: Services) -> None:
    async with services.readers() as session:
        summaries = await list_customers(session, search=ctx.args.search)
    records = [{**customer_record(s.customer), "invoices": s.invoices, "open_invoices": s.open_invoices} for s in summaries]

    def human() -> None:
        out = table("Email", "Name", "Verified", "Locale", "Country", "Invoices", "Open", "Attention")
        for s in summaries:
            c = s.customer
            out.add_row(
                c.email,
                c.name,
                "yes" if c.email_verified_at else "no",
                c.locale or "-",
                c.country or "-",
                str(s.invoices),
                str(s.open_invoices),
                "email undeliverable" if c.email_undeliverable_at else "",
            )
        ctx.console.print(out)
        ctx.console.print(f"{len(summaries)} customer(s).")

    emit(ctx, {"customers": records}, human)


async def verify(ctx: Context, services: Services) -> None:
    async with services.sessions.begin() as session:
        customer = await find_customer(session, ctx.args.email)
        if customer.email_verified_at is not None:
            raise UserError(f"{customer.email} is already verified")
        request_verification(session, ctx.settings, customer, actor=ctx.actor)
    emit(ctx, customer_record(customer), lambda: ctx.console.print(f"Confirmation email queued for {customer.email}."))


async def update(ctx: Context, services: Services) -> None:
    a = ctx.args
    address = _address(a)
    async with services.sessions.begin() as session:
        customer = await find_customer(session, a.email)
        update_customer(session, customer, actor=ctx.actor, name=a.name, locale=a.locale, address=address)
        if a.new_email:
            await change_email(session, ctx.settings, customer, a.new_email, actor=ctx.actor)
    note = " The new address must be confirmed before anything is sent to it." if a.new_email else ""
    emit(ctx, customer_record(customer), lambda: ctx.console.print(f"Updated customer {customer.email}.{note}"))
