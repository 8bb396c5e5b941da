"""Customers: the one factory, look-ups, details changes and the language we write to them in."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from links.errors import LinkError, NotFound
from links.models import Customer
from plumbing import audit
from plumbing.db import new_id, utcnow
from plumbing.i18n import normalize_locale
from plumbing.settings import Settings

# The billing address, shown prefilled on the pay page.
ADDRESS_FIELDS = ("address_line1", "address_line2", "postal_code", "city", "country")


def normalize_email(email: str) -> str:
    """Check the syntax (no DNS look-up) and return the address trimmed and lower-cased."""
    try:
        return str(validate_email(email.strip(), check_deliverability=False).normalized).lower()
    except EmailNotValidError as exc:
        raise LinkError(f"email address {email!r} is not valid: {exc}") from None


def check_address(values: Mapping[str, object]) -> dict[str, str]:
    """The address fields given (empty ones left out), trimmed; the country as a two-letter code."""
    address = {f: str(values[f]).strip() for f in ADDRESS_FIELDS if values.get(f)}
    if "country" in address:
        if len(address["country"]) != 2 or not address["country"].isalpha():
            raise LinkError("the country is a two-letter code, e.g. DE")
        address["country"] = address["country"].upper()
    return address


def new_customer(
    *,
    email: str,
    name: str,
    locale: str | None = None,
    stripe_customer_id: str | None = None,
    verified_by: str | None = None,
    address: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> Customer:
    """The one way a customer row is built (CLI, importer, services). `email` is already normalized
    (`normalize_email`); `verified_by` says who attested the address, None leaves it unverified."""
    if not name.strip():
        raise LinkError("a customer needs a name")
    if stripe_customer_id is not None and not stripe_customer_id.startswith("cus_"):
        raise LinkError(f"{stripe_customer_id!r} is not a Stripe customer id (cus_…)")
    return Customer(
        id=new_id(),
        email=email,
        name=name.strip(),
        locale=normalize_locale(locale) if locale else None,
        stripe_customer_id=stripe_customer_id,
        email_verified_at=(now or utcnow()) if verified_by else None,
        email_verified_by=verified_by,
        **check_address(address or {}),
    )


async def find_customer(session: AsyncSession, email: str) -> Customer:
    customer = (await session.execute(select(Customer).where(Customer.email == normalize_email(email)))).scalar_one_or_none()
    if customer is None:
        raise NotFound(f"no customer with email {email}")
    return customer


async def check_new_email(session: AsyncSession, email: str) -> str:
    """The address normalized, if no customer has it yet (ask before creating anything elsewhere)."""
    normalized = normalize_email(email)
    if (await session.execute(select(Customer.id).where(Customer.email == normalized))).first():
        raise LinkError(f"a customer with email {normalized} already exists")
    return normalized


async def add_customer(
    session: AsyncSession,
    *,
    email: str,
    name: str,
    actor: str,
    locale: str | None = None,
    stripe_customer_id: str | None = None,
    verified: bool = False,
    address: Mapping[str, str] | None = None,
) -> Customer:
    normalized = await check_new_email(session, email)
    customer = new_customer(
        email=normalized,
        name=name,
        locale=locale,
        stripe_customer_id=stripe_customer_id,
        verified_by=f"attested by {actor}" if verified else None,
        address=address,
    )
    session.add(customer)
    await session.flush()
    audit.record(session, actor, "customer.add", f"customer:{normalized}", verified=verified)
    if verified:
        audit.record(session, actor, "customer.verify_attest", f"customer:{normalized}")
    return customer


def update_customer(
    session: AsyncSession,
    customer: Customer,
    *,
    actor: str,
    name: str | None = None,
    locale: str | None = None,
    address: Mapping[str, str] | None = None,
) -> bool:
    """Change the name, language or billing address (an email change is `verification.change_email`).
    Returns whether anything was given; the change is audited."""
    fields = check_address(address or {})
    if name and not name.strip():
        raise LinkError("a customer needs a name")
    if name:
        customer.name = name.strip()
    if locale:
        customer.locale = normalize_locale(locale)
    for field_name, value in fields.items():
        setattr(customer, field_name, value)
    changed = bool(name or locale or fields)
    if changed:
        audit.record(session, actor, "customer.update", f"customer:{customer.email}", name=name, locale=locale, **fields)
    return changed


def customer_locale(settings: Settings, customer: Customer) -> str:
    return customer.locale or normalize_locale(settings.default_locale)
