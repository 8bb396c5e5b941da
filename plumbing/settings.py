"""Configuration: one frozen Settings object read from the environment (and an optional .env)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.config import Config, Environ
from starlette.datastructures import CommaSeparatedStrings, Secret

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./var/paylink.db"
SMTP_TLS_MODES = ("none", "starttls", "tls")
DEFAULT_BRAND_COLOR = "#0b5cad"


class ConfigError(Exception):
    """A setting is missing or malformed; the message is one line for the operator."""


@dataclass(frozen=True)
class Settings:
    database_url: str
    base_url: str
    link_secret_keys: tuple[Secret, ...]
    link_ttl_days: int
    stripe_secret_key: Secret
    stripe_publishable_key: str
    stripe_api_base: str | None
    stripe_js_url: str
    stripe_webhook_secret: Secret
    stripe_timeout_seconds: float
    stripe_max_network_retries: int
    stale_claim_seconds: float
    smtp_host: str
    smtp_port: int
    smtp_username: str | None
    smtp_password: Secret | None
    smtp_tls: str
    smtp_timeout_seconds: float
    mail_from: str
    reply_to: str | None
    merchant_name: str
    finance_email: str | None
    default_locale: str
    outbox_in_process: bool
    outbox_batch_size: int
    outbox_backoff_base_seconds: float
    outbox_backoff_max_seconds: float
    outbox_lease_seconds: float
    outbox_poll_seconds: float
    # Issue 11: brakes, mail that survives outages, retention (each documented in the README).
    outbox_give_up_after_hours: float
    outbox_keep_days: int
    link_opens_keep_days: int
    link_requests_keep_days: int
    pay_failed_attempts_per_invoice_hour: int
    setup_intents_per_link_day: int
    posts_per_client_minute: int
    reminder_schedule: tuple[int, ...]  # days relative to the due date (REMINDER_SCHEDULE), ascending
    reminder_days_before_expiry: int
    reminder_interval_seconds: float
    # Issue 14: operations (metrics, health, system usage, logs; each documented in the README).
    metrics_token: Secret | None
    worker_metrics_port: int | None
    usage_sample_seconds: float
    usage_keep_days: int
    log_format: str
    ready_outbox_stuck_minutes: float
    # Issue 12: the merchant's identity (pages, emails, PDFs; each documented in the README).
    merchant_address: tuple[str, ...] = ()  # MERCHANT_ADDRESS, lines separated by |
    merchant_tax_id: str | None = None
    merchant_support_email: str | None = None
    merchant_support_phone: str | None = None
    merchant_logo_path: Path | None = None  # a PNG or SVG file, checked at start
    merchant_brand_color: str = DEFAULT_BRAND_COLOR  # #rrggbb with AA contrast for white text
    invoice_pdf_attach: bool = False
    # Issue 13: paying your way (each documented in the README).
    partial_payments_default: bool = False  # PARTIAL_PAYMENTS_DEFAULT: new invoices allow part payments
    colleague_links_per_invoice_day: int = 3  # "send to a colleague" from the page, per invoice
    colleague_links_per_customer_day: int = 10  # … and per customer, over all their invoices
    # Issue 15: past one machine.
    database_read_url: str | None = None  # DATABASE_READ_URL: a read replica for page reads
    database_statement_cache: bool = True  # DATABASE_STATEMENT_CACHE=off behind PgBouncer (transaction mode)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting once; a missing or bad one raises ConfigError with one clear line."""
        env_file = ROOT / ".env"
        config = Config(
            env_file if environ is None and env_file.exists() else None,
            environ=Environ(dict(os.environ if environ is None else environ)),
        )
        try:
            return cls._read(config)
        except KeyError as exc:  # (its str() is the message in quotes)
            raise ConfigError(str(exc.args[0]) if exc.args else str(exc)) from None
        except ValueError as exc:  # (a message may end in a quote of its own: "... not 'red'")
            raise ConfigError(str(exc)) from None

    def __post_init__(self) -> None:
        # A claimed attempt without a PaymentIntent id is released after STALE_CLAIM_SECONDS; if
        # that came before the create call could have timed out (every retry included), a late
        # answer could race a second attempt. Stripe's own idempotency key is the second line.
        longest_create = self.stripe_timeout_seconds * (1 + self.stripe_max_network_retries)
        if self.stale_claim_seconds <= longest_create:
            raise ValueError(
                f"STALE_CLAIM_SECONDS ({self.stale_claim_seconds:g}) must be longer than STRIPE_TIMEOUT_SECONDS x "
                f"(1 + STRIPE_MAX_NETWORK_RETRIES) = {longest_create:g}"
            )

    @classmethod
    def _read(cls, config: Config) -> Settings:
        keys = config("LINK_SECRET_KEYS", cast=CommaSeparatedStrings)
        link_keys = tuple(Secret(k) for k in keys if k)
        if not link_keys:
            raise ValueError("LINK_SECRET_KEYS must list at least one key (newest first)")
        if any(len(str(k)) < 16 for k in link_keys):
            raise ValueError("LINK_SECRET_KEYS: every key must be at least 16 characters")
        smtp_tls = config("SMTP_TLS", default="none").lower()
        if smtp_tls not in SMTP_TLS_MODES:
            raise ValueError(f"SMTP_TLS must be one of {', '.join(SMTP_TLS_MODES)}, not {smtp_tls!r}")
        password = config("SMTP_PASSWORD", default=None)
        api_base = config("STRIPE_API_BASE", default=None)
        return cls(
            database_url=config("DATABASE_URL", default=DEFAULT_DATABASE_URL),
            base_url=config("BASE_URL", default="http://127.0.0.1:8000").rstrip("/"),
            link_secret_keys=link_keys,
            link_ttl_days=_positive(config, "LINK_TTL_DAYS", 30),
            stripe_secret_key=config("STRIPE_SECRET_KEY", cast=Secret),
            stripe_publishable_key=config("STRIPE_PUBLISHABLE_KEY"),
            stripe_api_base=api_base.rstrip("/") if api_base else None,
            stripe_js_url=config(
                "STRIPE_JS_URL",
                default=f"{api_base.rstrip('/')}/js.stripe.com/v3/" if api_base else "https://js.stripe.com/v3/",
            ),
            stripe_webhook_secret=config("STRIPE_WEBHOOK_SECRET", cast=Secret),
            stripe_timeout_seconds=config("STRIPE_TIMEOUT_SECONDS", cast=float, default=20.0),
            stripe_max_network_retries=config("STRIPE_MAX_NETWORK_RETRIES", cast=int, default=2),
            stale_claim_seconds=config("STALE_CLAIM_SECONDS", cast=float, default=120.0),
            smtp_host=config("SMTP_HOST", default="127.0.0.1"),
            smtp_port=config("SMTP_PORT", cast=int, default=25),
            smtp_username=config("SMTP_USERNAME", default=None),
            smtp_password=Secret(password) if password else None,
            smtp_tls=smtp_tls,
            smtp_timeout_seconds=config("SMTP_TIMEOUT_SECONDS", cast=float, default=30.0),
            mail_from=config("MAIL_FROM", default="billing@localhost"),  # no display name: the legal name is used
            reply_to=config("MAIL_REPLY_TO", default=None) or config("MERCHANT_SUPPORT_EMAIL", default=None),
            merchant_name=config("MERCHANT_NAME", default="Paylink Demo Ltd"),
            finance_email=config("FINANCE_EMAIL", default=None),
            default_locale=config("DEFAULT_LOCALE", default="en"),
            outbox_in_process=_on_off(config, "OUTBOX_IN_PROCESS", False),
            outbox_batch_size=_positive(config, "OUTBOX_BATCH_SIZE", 100),
            outbox_backoff_base_seconds=config("OUTBOX_BACKOFF_BASE_SECONDS", cast=float, default=30.0),
            outbox_backoff_max_seconds=config("OUTBOX_BACKOFF_MAX_SECONDS", cast=float, default=3600.0),
            outbox_lease_seconds=config("OUTBOX_LEASE_SECONDS", cast=float, default=120.0),
            outbox_poll_seconds=config("OUTBOX_POLL_SECONDS", cast=float, default=2.0),
            outbox_give_up_after_hours=_positive_float(config, "OUTBOX_GIVE_UP_AFTER_HOURS", 72.0),
            outbox_keep_days=_positive(config, "OUTBOX_KEEP_DAYS", 30),
            link_opens_keep_days=_positive(config, "LINK_OPENS_KEEP_DAYS", 400),
            link_requests_keep_days=_positive(config, "LINK_REQUESTS_KEEP_DAYS", 30),
            pay_failed_attempts_per_invoice_hour=_positive(config, "PAY_FAILED_ATTEMPTS_PER_INVOICE_HOUR", 5),
            setup_intents_per_link_day=_positive(config, "SETUP_INTENTS_PER_LINK_DAY", 10),
            posts_per_client_minute=_positive(config, "POSTS_PER_CLIENT_MINUTE", 30),
            reminder_schedule=_reminder_schedule(config),
            reminder_days_before_expiry=_positive(config, "REMINDER_DAYS_BEFORE_EXPIRY", 3),
            reminder_interval_seconds=config("REMINDER_INTERVAL_SECONDS", cast=float, default=3600.0),
            # Issue 14: operations.
            metrics_token=_metrics_token(config),
            worker_metrics_port=config("WORKER_METRICS_PORT", cast=int, default=None),
            usage_sample_seconds=_positive_float(config, "USAGE_SAMPLE_SECONDS", 60.0),
            usage_keep_days=_positive(config, "USAGE_KEEP_DAYS", 400),
            log_format=_log_format(config),
            ready_outbox_stuck_minutes=config("READY_OUTBOX_STUCK_MINUTES", cast=float, default=30.0),
            # Issue 13: paying your way.
            partial_payments_default=_on_off(config, "PARTIAL_PAYMENTS_DEFAULT", False),
            colleague_links_per_invoice_day=_positive(config, "COLLEAGUE_LINKS_PER_INVOICE_DAY", 3),
            colleague_links_per_customer_day=_positive(config, "COLLEAGUE_LINKS_PER_CUSTOMER_DAY", 10),
            # Issue 15: past one machine.
            database_read_url=config("DATABASE_READ_URL", default=None) or None,
            database_statement_cache=_on_off(config, "DATABASE_STATEMENT_CACHE", True),
            # Issue 12: the merchant's identity.
            **_merchant(config),
        )


DEFAULT_REMINDER_SCHEDULE = "-3,0,7,14"


def parse_reminder_schedule(text: str, name: str = "REMINDER_SCHEDULE") -> tuple[int, ...]:
    """'-3,0,7,14' -> (-3, 0, 7, 14): whole days relative to the due date (negative: before it),
    each between -365 and 365, no repeats; empty means no reminders about the due date."""
    days: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            day = int(part)
        except ValueError:
            raise ValueError(
                f"{name} must list whole days relative to the due date, not {text!r}; e.g. {DEFAULT_REMINDER_SCHEDULE}"
            ) from None
        if not -365 <= day <= 365:
            raise ValueError(f"{name}: {day} is more than a year from the due date")
        if day in days:
            raise ValueError(f"{name} lists {day} twice")
        days.append(day)
    return tuple(sorted(days))


def _reminder_schedule(config: Config) -> tuple[int, ...]:
    """REMINDER_SCHEDULE; the older REMINDER_DAYS_BEFORE_DUE=N still works and means REMINDER_SCHEDULE=-N."""
    schedule = config("REMINDER_SCHEDULE", default=None)
    before_due = config("REMINDER_DAYS_BEFORE_DUE", default=None)
    if schedule is not None and before_due is not None:
        raise ValueError("set REMINDER_SCHEDULE or the older REMINDER_DAYS_BEFORE_DUE, not both")
    if before_due is not None:
        return parse_reminder_schedule(f"-{_positive(config, 'REMINDER_DAYS_BEFORE_DUE', 3)}")
    return parse_reminder_schedule(DEFAULT_REMINDER_SCHEDULE if schedule is None else schedule)


ON_OFF = {"on": True, "true": True, "1": True, "yes": True, "off": False, "false": False, "0": False, "no": False}


def _on_off(config: Config, name: str, default: bool) -> bool:
    value = config(name, default=None)
    if value is None or value.strip() == "":
        return default
    try:
        return ON_OFF[value.strip().lower()]
    except KeyError:
        raise ValueError(f"{name} must be on or off, not {value!r}") from None


def _positive(config: Config, name: str, default: int) -> int:
    value = config(name, cast=int, default=default)
    if value <= 0:
        raise ValueError(f"{name} must be a positive whole number, not {value}")
    return int(value)


def _positive_float(config: Config, name: str, default: float) -> float:
    value = config(name, cast=float, default=default)
    if not value > 0:
        raise ValueError(f"{name} must be a positive number, not {value}")
    return float(value)


LOG_FORMATS = ("text", "json")


def _metrics_token(config: Config) -> Secret | None:
    token = config("METRICS_TOKEN", default=None)
    if not token:
        return None
    if len(token) < 16:
        raise ValueError("METRICS_TOKEN must be at least 16 characters (or unset, which turns /metrics off)")
    return Secret(token)


def _log_format(config: Config) -> str:
    value = str(config("LOG_FORMAT", default="text")).lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {value!r}")
    return value


# --- Issue 12: the merchant's identity -----------------------------------------------------------------

log = logging.getLogger("paylink.settings")
BRAND_COLOR = re.compile(r"#[0-9a-fA-F]{6}")
LOGO_MAX_BYTES = 512 * 1024


def _merchant(config: Config) -> dict[str, Any]:
    """MERCHANT_* and INVOICE_PDF_ATTACH: the legal name's address, tax id, support contact, logo and colour."""
    address = tuple(line.strip() for line in str(config("MERCHANT_ADDRESS", default="")).split("|") if line.strip())
    support_email = config("MERCHANT_SUPPORT_EMAIL", default=None) or None
    if support_email and ("@" not in support_email or any(c in support_email for c in " <>\r\n")):
        raise ValueError(f"MERCHANT_SUPPORT_EMAIL must be an email address, not {support_email!r}")
    logo = config("MERCHANT_LOGO_PATH", default=None)
    return {
        "merchant_address": address,
        "merchant_tax_id": config("MERCHANT_TAX_ID", default=None) or None,
        "merchant_support_email": support_email,
        "merchant_support_phone": config("MERCHANT_SUPPORT_PHONE", default=None) or None,
        "merchant_logo_path": check_logo(Path(logo)) if logo else None,
        "merchant_brand_color": brand_color(config("MERCHANT_BRAND_COLOR", default=None)),
        "invoice_pdf_attach": _on_off(config, "INVOICE_PDF_ATTACH", False),
    }


def logo_kind(data: bytes) -> str | None:
    """'png', 'svg' or None, from the file's content (not its name)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    head = data[:2048].lstrip().lower()
    if (head.startswith(b"<svg") or head.startswith(b"<?xml")) and b"<svg" in data[:4096].lower():
        return "svg"
    return None


def check_logo(path: Path) -> Path:
    """MERCHANT_LOGO_PATH: a readable PNG or SVG file of at most 512 KiB."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"MERCHANT_LOGO_PATH {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if len(data) > LOGO_MAX_BYTES:
        raise ValueError(f"MERCHANT_LOGO_PATH {str(path)!r} is larger than 512 KiB")
    if logo_kind(data) is None:
        raise ValueError(f"MERCHANT_LOGO_PATH {str(path)!r} is neither a PNG nor an SVG file")
    return path.resolve()


def contrast_with_white(color: str) -> float:
    """WCAG 2.x contrast ratio of white text on `color` (#rrggbb)."""

    def channel(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.04045 else float(((c + 0.055) / 1.055) ** 2.4)

    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    luminance = 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)
    return 1.05 / (luminance + 0.05)


def brand_color(value: str | None) -> str:
    """MERCHANT_BRAND_COLOR (#rrggbb; buttons carry white text on it): a malformed value stops the
    start; one too light for white text (below WCAG AA's 4.5:1) is replaced by the default, with a warning."""
    if not value:
        return DEFAULT_BRAND_COLOR
    if not BRAND_COLOR.fullmatch(value.strip()):
        raise ValueError(f"MERCHANT_BRAND_COLOR must be a colour like #0b5cad, not {value!r}")
    color = value.strip().lower()
    ratio = contrast_with_white(color)
    if ratio < 4.5:
        log.warning(
            "settings.brand_color_too_light color=%s contrast=%.2f: white text needs 4.5:1 (WCAG AA); using %s",
            color,
            ratio,
            DEFAULT_BRAND_COLOR,
        )
        return DEFAULT_BRAND_COLOR
    return color
