"""Customers: the one factory, look-ups, details changes and the language we write to them in."""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from babel import Locale
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from links.errors import LinkError, NotFound
from links.models import Customer, Invoice, InvoiceStatus, PaymentLink
from plumbing import audit
from plumbing.db import new_id, utcnow
from plumbing.i18n import SUPPORTED_LOCALES, normalize_locale
from plumbing.settings import Settings

# The billing address, shown prefilled on the pay page, with the longest value each column holds.
ADDRESS_FIELDS = ("address_line1", "address_line2", "postal_code", "city", "country")
_ADDRESS_LIMITS = {"address_line1": 200, "address_line2": 200, "postal_code": 32, "city": 100, "country": 2}
_ADDRESS_LABELS = {"address_line1": "address line 1", "address_line2": "address line 2", "postal_code": "postal code", "city": "city"}
NAME_LIMIT = 200
# ISO 3166-1 alpha-2 codes (Babel's territories, without its groupings and private-use codes;
# XK, Kosovo, stays: Stripe accepts it).
_NOT_COUNTRIES = {"EU", "EZ", "UN", "QO", "XA", "XB", "ZZ"}
COUNTRIES = frozenset(
    code for code in map(str, Locale("en").territories) if len(code) == 2 and code.isalpha() and code not in _NOT_COUNTRIES
)
STRIPE_CUSTOMER_ID = re.compile(r"cus_[A-Za-z0-9_-]{1,251}")


def normalize_email(email: str) -> str:
    """Check the syntax (no DNS look-up) and return the address trimmed and lower-cased."""
    try:
        return str(validate_email(email.strip(), check_deliverability=False).normalized).lower()
    except EmailNotValidError as exc:
        raise LinkError(f"email address {email!r} is not valid: {exc}") from None


def _has_control_characters(value: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value)


def check_address(values: Mapping[str, object]) -> dict[str, str]:
    """The address fields given (empty ones left out), trimmed; the country as a two-letter code."""
    address = {f: str(values[f]).strip() for f in ADDRESS_FIELDS if values.get(f)}
    if "country" in address:
        if address["country"].upper() not in COUNTRIES:
            raise LinkError(f"country {address['country']!r} is not a two-letter ISO country code, e.g. DE")
        address["country"] = address["country"].upper()
    for name, value in address.items():
        label = _ADDRESS_LABELS.get(name, name)
        if len(value) > _ADDRESS_LIMITS[name]:
            raise LinkError(f"the {label} is longer than {_ADDRESS_LIMITS[name]} characters")
        if _has_control_characters(value):
            raise LinkError(f"the {label} cannot contain line breaks or control characters")
    return address


def check_name(name: str) -> str:
    """A customer's name, trimmed: 1 to 200 characters on one line."""
    name = name.strip()
    if not name:
        raise LinkError("a customer needs a name")
    if len(name) > NAME_LIMIT:
        raise LinkError(f"a customer's name is at most {NAME_LIMIT} characters")
    if _has_control_characters(name):
        raise LinkError("a customer's name cannot contain line breaks or control characters")
    return name


def check_locale(locale: str | None) -> str | None:
    """A supported language ("de-AT" -> "de"), None when not given; anything else is refused
    (it used to fall back to English without a word)."""
    if locale is None or not locale.strip():
        return None
    language = normalize_locale(locale.strip(), default="")
    if language not in SUPPORTED_LOCALES:
        raise LinkError(f"locale {locale!r} is not one of {', '.join(SUPPORTED_LOCALES)}")
    return language


def check_stripe_customer_id(value: str | None) -> str | None:
    if value is None:
        return None
    if not STRIPE_CUSTOMER_ID.fullmatch(value):
        raise LinkError(f"{value!r} is not a Stripe customer id (cus_…)")
    return value


@dataclass(frozen=True)
class CustomerDetails:
    """A new customer's details, every one checked: what `customer add` validates before it creates
    anything at Stripe, so that bad input never leaves an orphan customer there."""

    email: str  # normalized, and no customer has it yet
    name: str
    locale: str | None
    stripe_customer_id: str | None
    address: dict[str, str] = field(default_factory=dict)


async def check_new_customer(
    session: AsyncSession,
    *,
    email: str,
    name: str,
    locale: str | None = None,
    stripe_customer_id: str | None = None,
    address: Mapping[str, object] | None = None,
) -> CustomerDetails:
    """Validate everything about a new customer (raises LinkError with the first problem)."""
    details = CustomerDetails(
        email=normalize_email(email),
        name=check_name(name),
        locale=check_locale(locale),
        stripe_customer_id=check_stripe_customer_id(stripe_customer_id),
        address=check_address(address or {}),
    )
    await check_new_email(session, details.email)
    return details


def new_customer(
    *,
    email: str,
    name: str,
    locale: str | None = None,
    stripe_customer_id: str | None = None,
    verified_by: str | None = None,
    address: Mapping[str, str] | None = None,
    now: datetime | None = None,
    import_batch_id: uuid.UUID | None = None,
) -> Customer:
    """The one way a customer row is built (CLI, importer, services). `email` is already normalized
    (`normalize_email`); `verified_by` says who attested the address, None leaves it unverified."""
    return Customer(
        id=new_id(),
        email=email,
        name=check_name(name),
        locale=check_locale(locale),
        stripe_customer_id=check_stripe_customer_id(stripe_customer_id),
        email_verified_at=(now or utcnow()) if verified_by else None,
        email_verified_by=verified_by,
        import_batch_id=import_batch_id,
        **check_address(address or {}),
    )


async def find_customer(session: AsyncSession, email: str) -> Customer:
    customer = (await session.execute(select(Customer).where(Customer.email == normalize_email(email)))).scalar_one_or_none()
    if customer is None:
        raise NotFound(f"no customer with email {email}")
    return customer


@dataclass(frozen=True)
class CustomerSummary:
    customer: Customer
    invoices: int
    open_invoices: int


async def list_customers(session: AsyncSession, *, search: str | None = None) -> list[CustomerSummary]:
    """Customers by email, with how many invoices they have and how many are open; only those whose
    email or name contains `search` (case-insensitive), when given."""
    open_ = func.coalesce(func.sum(case((Invoice.status.in_(InvoiceStatus.PAYABLE), 1), else_=0)), 0)
    query = (
        select(Customer, func.count(Invoice.id), open_)
        .outerjoin(Invoice, Invoice.customer_id == Customer.id)
        .group_by(Customer.id)
        .order_by(Customer.email)
    )
    if search and search.strip():
        pattern = "%" + search.strip().lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = query.where(or_(Customer.email.like(pattern, escape="\\"), func.lower(Customer.name).like(pattern, escape="\\")))
    return [CustomerSummary(c, int(n), int(o)) for c, n, o in (await session.execute(query)).all()]


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
    if name is not None:
        customer.name = check_name(name)
    if locale:
        customer.locale = check_locale(locale)
    for field_name, value in fields.items():
        setattr(customer, field_name, value)
    changed = bool(name or locale or fields)
    if changed:
        audit.record(session, actor, "customer.update", f"customer:{customer.email}", name=name, locale=locale, **fields)
    return changed


def customer_locale(settings: Settings, customer: Customer) -> str:
    return customer.locale or normalize_locale(settings.default_locale)


async def remember_locale(session: AsyncSession, settings: Settings, link_id: uuid.UUID, locale: str) -> bool:
    """The language the customer reads their page in, kept for their emails (the receipt that follows,
    a fresh link), when finance set none and it is not the default anyway. Never from a colleague's
    link (the colleague's language is not the customer's), never over a language finance chose.
    Whether it was kept."""
    if locale == normalize_locale(settings.default_locale) or locale not in SUPPORTED_LOCALES:
        return False
    customer_id = (
        select(Invoice.customer_id)
        .join(PaymentLink, PaymentLink.invoice_id == Invoice.id)
        .where(PaymentLink.id == link_id, PaymentLink.recipient_email.is_(None))
        .scalar_subquery()
    )
    result = await session.execute(update(Customer).where(Customer.id == customer_id, Customer.locale.is_(None)).values(locale=locale))
    return bool(result.rowcount)  # type: ignore[attr-defined]
