"""Configuration: one frozen Settings object read from the environment (and an optional .env)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from starlette.config import Config, Environ
from starlette.datastructures import CommaSeparatedStrings, Secret

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./var/paylink.db"
SMTP_TLS_MODES = ("none", "starttls", "tls")


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
    reminder_days_before_due: int
    reminder_days_before_expiry: int
    reminder_interval_seconds: float

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
        except (KeyError, ValueError) as exc:
            raise ConfigError(str(exc).strip("'\"")) from None

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
            mail_from=config("MAIL_FROM", default="Paylink <billing@localhost>"),
            reply_to=config("MAIL_REPLY_TO", default=None),
            merchant_name=config("MERCHANT_NAME", default="Paylink Demo Ltd"),
            finance_email=config("FINANCE_EMAIL", default=None),
            default_locale=config("DEFAULT_LOCALE", default="en"),
            outbox_in_process=config("OUTBOX_IN_PROCESS", cast=bool, default=False),
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
            reminder_days_before_due=_positive(config, "REMINDER_DAYS_BEFORE_DUE", 3),
            reminder_days_before_expiry=_positive(config, "REMINDER_DAYS_BEFORE_EXPIRY", 3),
            reminder_interval_seconds=config("REMINDER_INTERVAL_SECONDS", cast=float, default=3600.0),
        )


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
