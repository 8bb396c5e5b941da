"""Languages, money and dates: Babel catalogs and formatting shared by pages, emails and the CLI."""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
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


# The currencies Stripe can charge: its "Supported presentment currencies", https://docs.stripe.com/currencies#presentment-currencies
# (checked 2026-11-24). The page draws that list with a script, so text copies of it lack it; this is the list as
# public transcriptions of the page give it (for a German account, and a later one that adds XCG).
# Babel knows every ISO 4217 code, also those no one can pay in: XXX (no currency), XAU (gold), XTS (testing), XDR, fund
# codes such as USN or CHE. Stripe refuses them, and the customer would get an invoice they cannot pay.
STRIPE_CURRENCIES = frozenset(
    """
    usd aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bif bmd bnd bob brl bsd bwp byn bzd cad cdf chf clp cny
    cop crc cve czk djf dkk dop dzd egp etb eur fjd fkp gbp gel gip gmd gnf gtq gyd hkd hnl htg huf idr ils inr isk jmd
    jpy kes kgs khr kmf krw kyd kzt lak lbp lkr lrd lsl mad mdl mga mkd mmk mnt mop mur mvr mwk mxn myr mzn nad ngn nio
    nok npr nzd pab pen pgk php pkr pln pyg qar ron rsd rub rwf sar sbd scr sek sgd shp sle sos srd std szl thb tjs top
    try ttd twd tzs uah ugx uyu uzs vnd vuv wst xaf xcd xcg xof xpf yer zar zmw
    """.split()
)
# Stripe's zero-decimal currencies (same page): every other one is sent to Stripe in hundredths. UGX is on that list,
# but the page's "Special cases" say it is still sent in hundredths, like ISK.
STRIPE_ZERO_DECIMAL = frozenset("bif clp djf gnf jpy kmf krw mga pyg rwf vnd vuv xaf xof xpf".split())


def check_currency(currency: str) -> str:
    """Return the currency in Stripe's lower-case form, or raise MoneyError. Only currencies Stripe can charge, and
    only those whose minor unit (Babel's, which our amounts use) is the one Stripe expects: for ALL, ISK or UGX Babel
    counts whole units and Stripe hundredths, so an invoice for 100 ALL would be charged 1.00 ALL."""
    code = currency.strip().upper()
    if len(code) != 3 or not is_currency(code):
        raise MoneyError(f"unknown currency {currency!r} (use an ISO 4217 code such as EUR)")
    if code.lower() not in STRIPE_CURRENCIES:
        raise MoneyError(f"currency {code} cannot be charged with Stripe (use a currency Stripe supports, such as EUR)")
    if (currency_digits(code) == 0) != (code.lower() in STRIPE_ZERO_DECIMAL):
        raise MoneyError(f"currency {code} is not supported: Stripe counts it in other units than Paylink does")
    return code.lower()


# What the README promises for an amount: ASCII digits with an optional decimal point (a minus only to say why it is
# refused). Decimal() alone also reads "1_000", "1e2", " Infinity" and other scripts' digits ("١٢٠").
_AMOUNT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def to_minor_units(amount: str, currency: str) -> int:
    """'120.50' EUR -> 12050; rejects anything but plain digits, more decimals than the currency has, zero and negatives."""
    code = check_currency(currency)
    digits = currency_digits(code)
    try:
        text = amount.strip()
    except AttributeError:
        raise MoneyError(f"amount {amount!r} is not a number") from None
    if not _AMOUNT.fullmatch(text):
        example = "120.50" if digits else "1200"
        raise MoneyError(f"amount {amount!r} is not a number (write digits and an optional decimal point, e.g. {example})")
    value = Decimal(text)
    if value <= 0:
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
