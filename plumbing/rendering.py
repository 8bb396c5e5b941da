"""Jinja2 environments, one per language, shared by the pages and the emails.

Each language gets its own environment with its gettext catalog installed, so templates are
compiled once per language and rendering never swaps global state between requests. Being compiled
per language, they have that language's translations folded in (plumbing/folding.py): the
uncached pay page renders several times faster, with the same bytes.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from babel import Locale
from babel.numbers import format_decimal, format_percent

from plumbing.folding import FoldingEnvironment, catalog_gettext
from plumbing.i18n import SUPPORTED_LOCALES, format_day, format_money, normalize_locale, translations
from plumbing.settings import Settings, logo_kind

ROOT = Path(__file__).resolve().parent.parent


class Renderer:
    """`fold`: compile each language's templates for speed, its translations folded in (plumbing/folding.py);
    the output is the same either way (`fold=False` is jinja2 as it is, for the tests that compare)."""

    def __init__(self, directory: Path, *, fold: bool = True) -> None:
        self._directory = directory
        self._fold = fold
        self._env = lru_cache(maxsize=None)(self._build)
        self._globals: dict[str, Any] = {"identity": None}
        self._built: list[jinja2.Environment] = []

    def _build(self, locale: str) -> jinja2.Environment:
        env = FoldingEnvironment(
            loader=jinja2.FileSystemLoader(self._directory),
            # HTML templates (pages, the HTML part of emails) escape everything; .txt parts are plain text.
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=True, default=False),
            extensions=["jinja2.ext.i18n"],
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.StrictUndefined,
            # Compiled once (warm() at start) and never checked again: no stat() of every template on
            # every render. A changed template takes a restart, as a release does.
            auto_reload=False,
        )
        env.policies["ext.i18n.trimmed"] = True  # {% trans %} blocks collapse whitespace, as babel.cfg extracts them
        catalog = translations(locale)
        env.install_gettext_translations(catalog, newstyle=True)  # type: ignore[attr-defined]
        if self._fold:
            env.fold(catalog_gettext(catalog))

        def money(minor: int, currency: str) -> str:
            return format_money(minor, currency, locale)

        def day(value: date | datetime | None) -> str:
            return format_day(value, locale)

        def country(code: str | None) -> str:
            return country_name(code, locale)

        def number(value: Decimal | str | int) -> str:
            return format_number(str(value), locale)

        def percent(value: Decimal | str | int) -> str:
            return format_rate(str(value), locale)

        env.filters["money"] = money
        env.filters["day"] = day
        env.filters["country"] = country
        env.filters["number"] = number
        env.filters["percent"] = percent
        env.globals["locale"] = locale
        env.globals.update(self._globals)
        self._built.append(env)
        return env

    def set_globals(self, **values: Any) -> None:
        """Values every template of every language sees (e.g. `identity`, the merchant's identity)."""
        self._globals.update(values)
        for env in self._built:
            env.globals.update(values)

    def warm(self) -> None:
        """Compile every template for every language now, at start-up, not on a customer's request."""
        for locale in SUPPORTED_LOCALES:
            env = self.environment(locale)
            for name in env.list_templates():
                env.get_template(name)

    def environment(self, locale: str) -> jinja2.Environment:
        return self._env(normalize_locale(locale))

    def render(self, name: str, locale: str, **context: Any) -> str:
        return self.environment(locale).get_template(name).render(**context)

    def gettext(self, locale: str, message: str, **params: Any) -> str:
        text = translations(normalize_locale(locale)).gettext(message)
        return text % params if params else text


# Keyed by the text the value is written as, not by the value: Decimal("1.0") == Decimal("1") but the
# two may be written differently, and the same text always makes the same Decimal and the same output.
@lru_cache(maxsize=4096)  # every page shows each line's quantity and tax rate, mostly the same few
def format_number(text: str, locale: str) -> str:
    """'1234.5' in 'de' -> '1.234,5' (Babel's decimal format for the language)."""
    return str(format_decimal(Decimal(text), locale=locale))


@lru_cache(maxsize=1024)
def format_rate(text: str, locale: str) -> str:
    """'19' in 'fr' -> '19 %' (a percentage, as many decimals as it has)."""
    return str(format_percent(Decimal(text) / 100, locale=locale, decimal_quantization=False))


pages = Renderer(ROOT / "templates")
emails = Renderer(ROOT / "emails" / "templates")


def country_name(code: str | None, locale: str) -> str:
    """'DE' in 'fr' -> 'Allemagne' (Babel's territory names); an unknown code is shown as it is."""
    if not code:
        return ""
    return str(_territories(normalize_locale(locale)).get(code.strip().upper(), code))


@lru_cache(maxsize=8)
def _territories(locale: str) -> dict[str, str]:
    return dict(Locale.parse(locale).territories)


# --- the merchant's identity, as pages, emails and PDFs show it -----------------------------------------

LOGO_PATH = "/brand/logo"


@dataclass(frozen=True)
class Brand:
    """Who the customer deals with: legal name, address, tax id, how to reach them, logo, colour."""

    name: str
    address: tuple[str, ...]
    tax_id: str | None
    support_email: str | None
    support_phone: str | None
    reply_to: str | None
    color: str
    logo_url: str | None  # absolute (emails): BASE_URL + /brand/logo; pages use LOGO_PATH

    @property
    def has_logo(self) -> bool:
        return self.logo_url is not None

    @property
    def phone_uri(self) -> str:
        return "tel:" + "".join(c for c in (self.support_phone or "") if c.isdigit() or c == "+")


def brand_of(settings: Settings) -> Brand:
    return _brand(settings)


@lru_cache(maxsize=16)
def _brand(settings: Settings) -> Brand:
    return Brand(
        name=settings.merchant_name,
        address=settings.merchant_address,
        tax_id=settings.merchant_tax_id,
        support_email=settings.merchant_support_email,
        support_phone=settings.merchant_support_phone,
        reply_to=settings.reply_to,
        color=settings.merchant_brand_color,
        logo_url=f"{settings.base_url}{LOGO_PATH}" if settings.merchant_logo_path else None,
    )


@dataclass(frozen=True)
class Logo:
    data: bytes
    content_type: str  # image/png or image/svg+xml

    @property
    def data_uri(self) -> str:
        return f"data:{self.content_type};base64,{base64.b64encode(self.data).decode()}"


@lru_cache(maxsize=8)
def read_logo(path: Path) -> Logo:
    """The logo file (checked at start by Settings), read once."""
    data = path.read_bytes()
    return Logo(data, "image/png" if logo_kind(data) == "png" else "image/svg+xml")


def use_brand(settings: Settings) -> None:
    """Emails show the merchant's identity in their layout: make it a global of the email templates.
    The outbox sender calls this before it renders (one merchant per deployment)."""
    emails.set_globals(identity=brand_of(settings))
