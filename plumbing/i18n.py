"""Languages, money and dates: Babel catalogs and formatting shared by pages, emails and the CLI."""

from __future__ import annotations

from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from functools import cache, lru_cache
from pathlib import Path

from babel import Locale, UnknownLocaleError
from babel.dates import format_date as babel_format_date
from babel.numbers import format_currency, get_currency_precision, is_currency
from babel.support import NullTranslations, Translations

LOCALES_DIR = Path(__file__).resolve().parent.parent / "locales"
SUPPORTED_LOCALES = ("en", "de", "fr", "es")
DEFAULT_LOCALE = "en"
LOCALE_NAMES = {"en": "English", "de": "Deutsch", "fr": "Français", "es": "Español"}


def N_(message: str) -> str:
    """Mark a string for translation where it is defined; it is translated where it is shown."""
    return message


# Messages Stripe sends in English that customers commonly see, so that the catalogs carry them.
STRIPE_MESSAGES = (
    N_("Your card was declined."),
    N_("The provided PaymentMethod has failed authentication."),
    N_("Your card has insufficient funds."),
    N_("Your card has expired."),
    N_("Your card's security code is incorrect."),
)


class MoneyError(ValueError):
    """An amount or currency a person typed is not valid; the message says why in one line."""


def normalize_locale(value: str | None, default: str = DEFAULT_LOCALE) -> str:
    """The supported language closest to `value` ("de-AT" -> "de"), else the default."""
    if value:
        language = value.replace("-", "_").split("_")[0].lower()
        if language in SUPPORTED_LOCALES:
            return language
    return default


def negotiate_locale(accept_language: str | None, default: str = DEFAULT_LOCALE) -> str:
    """Pick a supported language from an Accept-Language header, by its q-values."""
    if not accept_language:
        return default
    choices: list[tuple[float, int, str]] = []
    for index, part in enumerate(accept_language.split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        choices.append((-quality, index, tag.strip()))
    for negative_quality, _, tag in sorted(choices):
        language = normalize_locale(tag, default="")
        if language and negative_quality < 0:
            return language
    return default


@cache
def translations(locale: str) -> NullTranslations:
    return Translations.load(str(LOCALES_DIR), [locale], domain="messages")


def currency_digits(currency: str) -> int:
    return int(get_currency_precision(currency.upper()))


def check_currency(currency: str) -> str:
    """Return the currency in Stripe's lower-case form, or raise MoneyError."""
    code = currency.strip().upper()
    if len(code) != 3 or not is_currency(code):
        raise MoneyError(f"unknown currency {currency!r} (use an ISO 4217 code such as EUR)")
    return code.lower()


def to_minor_units(amount: str, currency: str) -> int:
    """'120.50' EUR -> 12050; rejects more decimals than the currency has, zero and negatives."""
    code = check_currency(currency)
    digits = currency_digits(code)
    try:
        value = Decimal(amount.strip())
    except (InvalidOperation, AttributeError):
        raise MoneyError(f"amount {amount!r} is not a number") from None
    if not value.is_finite() or value <= 0:
        raise MoneyError(f"amount {amount!r} must be greater than zero")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > digits:
        raise MoneyError(f"amount {amount!r} has more than {digits} decimals for {code.upper()}")
    if value >= Decimal(10) ** 12:
        raise MoneyError(f"amount {amount!r} is larger than a single card payment allows")
    minor = int((value * (10**digits)).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    if minor > 99_999_999:  # Stripe's limit for a single charge in most currencies
        raise MoneyError(f"amount {amount!r} is larger than a single card payment allows")
    return minor


def from_minor_units(minor: int, currency: str) -> Decimal:
    return Decimal(minor).scaleb(-currency_digits(currency))


@lru_cache(maxsize=8192)  # bulk emails format the same few amounts many times
def format_money(minor: int, currency: str, locale: str = DEFAULT_LOCALE) -> str:
    """12050 EUR in 'de' -> '120,50 €'; 1200 JPY in 'en' -> '¥1,200'."""
    return str(format_currency(from_minor_units(minor, currency), currency.upper(), locale=_babel_locale(locale)))


def format_day(value: date | datetime | None, locale: str = DEFAULT_LOCALE) -> str:
    if value is None:
        return ""
    return _format_day(value.date() if isinstance(value, datetime) else value, locale)


@lru_cache(maxsize=4096)
def _format_day(value: date, locale: str) -> str:
    return str(babel_format_date(value, format="long", locale=_babel_locale(locale)))


@lru_cache(maxsize=64)
def _babel_locale(locale: str) -> Locale:
    try:
        return Locale.parse(locale.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        return Locale.parse(DEFAULT_LOCALE)
