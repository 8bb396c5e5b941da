"""Jinja2 environments, one per language, shared by the pages and the emails.

Each language gets its own environment with its gettext catalog installed, so templates are
compiled once per language and rendering never swaps global state between requests.
"""

from __future__ import annotations

from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from plumbing.i18n import SUPPORTED_LOCALES, format_day, format_money, normalize_locale, translations

ROOT = Path(__file__).resolve().parent.parent


class Renderer:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._env = lru_cache(maxsize=None)(self._build)

    def _build(self, locale: str) -> jinja2.Environment:
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(self._directory),
            # HTML templates (pages, the HTML part of emails) escape everything; .txt parts are plain text.
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=True, default=False),
            extensions=["jinja2.ext.i18n"],
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.StrictUndefined,
        )
        env.policies["ext.i18n.trimmed"] = True  # {% trans %} blocks collapse whitespace, as babel.cfg extracts them
        env.install_gettext_translations(translations(locale), newstyle=True)  # type: ignore[attr-defined]

        def money(minor: int, currency: str) -> str:
            return format_money(minor, currency, locale)

        def day(value: date | datetime | None) -> str:
            return format_day(value, locale)

        env.filters["money"] = money
        env.filters["day"] = day
        env.globals["locale"] = locale
        return env

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


pages = Renderer(ROOT / "templates")
emails = Renderer(ROOT / "emails" / "templates")
