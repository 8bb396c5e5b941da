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

from i18n import format_day, format_money, normalize_locale, translations

ROOT = Path(__file__).resolve().parent


class Renderer:
    def __init__(self, directory: Path, *, autoescape: bool | Any = True) -> None:
        self._directory = directory
        self._autoescape = autoescape
        self._env = lru_cache(maxsize=None)(self._build)

    def _build(self, locale: str) -> jinja2.Environment:
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(self._directory),
            autoescape=self._autoescape,
            extensions=["jinja2.ext.i18n"],
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.StrictUndefined,
        )
        env.install_gettext_translations(translations(locale), newstyle=True)  # type: ignore[attr-defined]

        def money(minor: int, currency: str) -> str:
            return format_money(minor, currency, locale)

        def day(value: date | datetime | None) -> str:
            return format_day(value, locale)

        env.filters["money"] = money
        env.filters["day"] = day
        env.globals["locale"] = locale
        return env

    def environment(self, locale: str) -> jinja2.Environment:
        return self._env(normalize_locale(locale))

    def render(self, name: str, locale: str, **context: Any) -> str:
        return self.environment(locale).get_template(name).render(**context)

    def gettext(self, locale: str, message: str, **params: Any) -> str:
        text = translations(normalize_locale(locale)).gettext(message)
        return text % params if params else text


def email_autoescape(template_name: str | None) -> bool:
    return bool(template_name and template_name.endswith(".html"))


pages = Renderer(ROOT / "templates")
emails = Renderer(ROOT / "emails" / "templates", autoescape=email_autoescape)
