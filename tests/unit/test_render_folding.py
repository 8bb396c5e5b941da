"""Folded templates (plumbing/folding.py) render byte for byte what jinja2's own compilation renders.

Every page template and every email template, in every language, in the states the views render
them in, once with a folding Renderer and once with `fold=False` (jinja2 as it is: runtime gettext,
`escape`). Values carry HTML, quotes, "%" and "%(x)s" so that escaping and formatting are covered,
and error messages are the real msgids the views pass (translated at run time, never folded).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
import pytest
from jinja2 import meta, nodes
from markupsafe import Markup

import emails.messages as messages
from emails.messages import AllocationFact, FactLine, InvoiceFacts
from plumbing.folding import FoldingEnvironment, TranslationFolder, escape_text, split_format
from plumbing.i18n import LOCALE_NAMES, SUPPORTED_LOCALES
from plumbing.rendering import ROOT, Brand, Renderer

TEMPLATES = ROOT / "templates"
# Messages the views pass as `error` (views/errors.py), translated at run time with the card's name.
CARD_DECLINED = "Your bank declined the payment with %(card)s."
AUTHENTICATION_STOPPED = "You stopped your bank's confirmation for %(card)s."
NOT_ABANDONED = "We could not stop your bank's confirmation. Please try again in a moment."
YOUR_CARD = "your card"
EVIL = 'O\'Neil & <Sons> "100%" %(x)s'

BRANDS = {
    "plain": Brand("Acme GmbH", ("Hauptstr. 1", "10115 Berlin"), None, None, None, None, "#0b5cad", None),
    "full": Brand(
        EVIL, ("<b>1 Main St</b>", "Springfield"), "DE123 & <456>", "help@acme.test", "+49 30 1234-5", "ap@acme.test", "#123abc", "x"
    ),
}


def ns(**values: Any) -> SimpleNamespace:
    return SimpleNamespace(**values)


def invoice(status: str = "open", *, paid: int = 0, refunded: int = 0, notes: str | None = EVIL, due: bool = True) -> SimpleNamespace:
    return ns(
        number="INV-000042",
        status=status,
        amount_due=53655,
        amount_paid=paid,
        amount_refunded=refunded,
        currency="eur",
        created_at=datetime(2026, 11, 2, 9, 30, tzinfo=UTC),
        due_date=date(2026, 12, 1) if due else None,
        paid_at=datetime(2026, 11, 20, 10, 0, tzinfo=UTC) if status != "open" else None,
        notes=notes,
    )


CUSTOMERS = [
    ns(
        name=EVIL,
        email="ann@example.com",
        address_line1="Street <1>",
        address_line2="c/o & co",
        postal_code="10115",
        city="Berlin",
        country="DE",
    ),
    ns(name="Ann Lee", email="ann@example.com", address_line1=None, address_line2=None, postal_code=None, city=None, country=None),
]
LINES = [
    ns(description="Beratung <November>", quantity=Decimal("2.5"), unit_amount=10000, tax_percent=Decimal("19"), net=25000),
    ns(description="Reise & Spesen", quantity="1", unit_amount=28655, tax_percent=None, net=28655),
    ns(description="Bücher", quantity=3, unit_amount=1000, tax_percent=Decimal("7.5"), net=3000),
]
SUMS = ns(subtotal=56655, taxes=[(Decimal("19"), 4750), (Decimal("7.5"), 225)], total=61630)
CARDS = {
    0: [],
    1: [ns(brand="visa", last4="4242", exp_month=4, exp_year=2031, payment_method_id="pm_1", is_default=True)],
    2: [
        ns(brand="visa", last4="4242", exp_month=4, exp_year=2031, payment_method_id="pm_1", is_default=True),
        ns(brand="master<card>", last4="3184", exp_month=None, exp_year=None, payment_method_id="pm_2", is_default=False),
    ],
}
PARTS = [
    ns(paid_at=datetime(2026, 11, 3, tzinfo=UTC), amount=10000, receipt_number="R-2026-0001", total=30000),
    ns(paid_at=None, amount=5000, receipt_number=None, total=30000),
]
OPEN = [ns(number="INV-000042", due_date=date(2026, 12, 1), balance=43655), ns(number="INV-000043", due_date=None, balance=1000)]


def options(kind: str) -> SimpleNamespace | None:
    if kind == "none":
        return None
    window = ns(choices=kind != "plain", deposit=kind == "deposit", minimum=5000, largest_part=40000, maximum=43655)
    return ns(
        balance=43655,
        paid_parts=PARTS if kind in ("parts", "all") else [],
        allowed=window,
        offers_pay_all=kind == "all",
        pay_all_total=44655,
        open_invoices=OPEN,
        allocation=[("INV-000042", 20000), ("INV-000043", 10000)] if kind == "all" else [],
    )


def base(brand: str, languages: bool) -> dict[str, Any]:
    merchant = BRANDS[brand].name
    context: dict[str, Any] = {
        "request": None,
        "csp_nonce": "nonce<1>",
        "merchant": merchant,
        "identity": BRANDS[brand],
        "logo_path": "/brand/logo" if brand == "full" else None,
        "languages": LOCALE_NAMES if languages else {},
    }
    return context


def page(**extra: Any) -> dict[str, Any]:
    return {"pay_path": "/pay/l/abc", "customer": CUSTOMERS[0], "lines": LINES, "sums": SUMS, "link": ns(recipient_email=None), **extra}


def page_contexts() -> Iterator[tuple[str, dict[str, Any]]]:
    """(template, context) for each page and the states the views render it in."""
    errors = [None, CARD_DECLINED, AUTHENTICATION_STOPPED, NOT_ABANDONED, YOUR_CARD]
    for cards, opts, error, needs_action, colleague in itertools.product(
        CARDS, ("none", "plain", "deposit", "parts", "all"), errors, (False, True), (False, True)
    ):
        if colleague and cards:
            continue  # a colleague's link never shows the customer's cards
        yield (
            "pay.html",
            page(
                invoice=invoice("partially_paid" if opts == "parts" else "open", paid=10000 if opts == "parts" else 0),
                options=options(opts),
                cards=CARDS[cards],
                csrf="csrf&1",
                needs_action=needs_action,
                error=error,
                error_card="Visa •••• 4242" if error == CARD_DECLINED else None,
                chosen_card="pm_2" if cards == 2 and error else None,
                publishable_key="pk_test_<x>",
                stripe_js_url="https://js.stripe.com/v3/",
                link=ns(recipient_email="ap@example.com" if colleague else None),
                customer=CUSTOMERS[cards % 2],
            ),
        )
    for status, refunded, opts, last4 in itertools.product(
        ("paid", "refunded", "partially_refunded"), (0, 500), ("none", "parts", "all"), (None, "4242")
    ):
        yield (
            "paid.html",
            page(
                invoice=invoice(status, paid=53655, refunded=refunded),
                options=options(opts),
                brand="visa",
                last4=last4,
                paid_at=datetime(2026, 11, 20, tzinfo=UTC),
            ),
        )
    yield (
        "paid.html",
        page(
            invoice=invoice("paid", paid=53655, notes=None, due=False),
            options=None,
            brand=None,
            last4="1",
            paid_at=None,
            customer=CUSTOMERS[1],
        ),
    )
    yield "processing.html", page(invoice=invoice("processing"), options=None, csrf="c", charging=30000)
    yield "void.html", page(invoice=invoice("void"), options=None)
    yield "revoked.html", page(invoice=invoice("open"), options=None)
    yield (
        "authenticate.html",
        page(invoice=invoice("open"), client_secret="pi_1_secret_<2>", charging=30000, publishable_key="pk", stripe_js_url="s", csrf="c"),
    )
    for reason in ("form", "origin", "404", "no_receipt", "500", "other"):
        yield "error.html", {"reason": reason, "invoice": invoice(), "pay_path": "/pay/l/abc"}
        yield "error.html", {"reason": reason, "invoice": invoice()}
    yield "expired.html", {"token": "t<1>", "csrf": "c"}
    yield "expired.html", {"pay_path": "/pay/l/abc", "csrf": "c", "invoice": invoice()}
    yield "invalid_link.html", {}
    yield "invalid_link.html", {"reason": "handoff"}
    for state in ("confirm", "done", "expired", "gone"):
        yield "verify.html", {"state": state, "customer": CUSTOMERS[0], "csrf": "c"}
    yield "too_many.html", {}
    yield "renewed.html", {"pay_path": "/pay/l/abc"}
    for state in ("removed", "default", "in_use", "unavailable", "not_here", "unknown"):
        yield "cards.html", {"state": state, "card": CARDS[2][1], "pay_path": "/pay/l/abc"}
    for state in ("not_allowed", "invalid", "sent"):
        yield "colleague.html", {"state": state, "invoice": invoice(), "pay_path": "/pay/l/abc", "csrf": "c", "entered": "a@b<c>"}
    for kind, status in itertools.product(("invoice", "receipt"), ("open", "paid", "refunded")):
        for allocation in ([], [("INV-000042", 20000), ("INV-000043", 10000)]):
            receipt = ns(
                number="R-2026-0007" if allocation else None,
                paid_at=datetime(2026, 11, 20, 10, 5, tzinfo=UTC),
                brand="visa" if allocation else None,
                last4="4242",
                amount=30000,
                currency="eur",
                balance_after=23655 if allocation else 0,
                allocation=allocation,
                share=20000 if allocation else None,
            )
            yield (
                f"documents/{kind}.html",
                {
                    "logo": "data:image/png;base64,AAAA" if allocation else None,
                    "doc": ns(issued_on=date(2026, 11, 2)),
                    "invoice": invoice(status, paid=30000 if status != "open" else 0, refunded=100 if status == "refunded" else 0),
                    "customer": CUSTOMERS[len(allocation) % 2],
                    "lines": LINES,
                    "sums": SUMS,
                    "receipt": receipt,
                    "footer_css": Markup('"Acme \\3c GmbH"'),  # what payments/documents.css_string makes
                },
            )


def page_names() -> set[str]:
    """Every template a view renders: the partials (_*.html) and the layout are in each of them."""
    return {name for name in jinja2.FileSystemLoader(TEMPLATES).list_templates() if not Path(name).name.startswith("_")} - {"base.html"}


CASES = list(page_contexts())


@pytest.fixture(scope="module")
def renderers() -> tuple[Renderer, Renderer]:
    return Renderer(TEMPLATES), Renderer(TEMPLATES, fold=False)


def test_every_page_template_is_covered() -> None:
    assert {name for name, _ in CASES} == page_names()


@pytest.mark.parametrize("locale", SUPPORTED_LOCALES)
@pytest.mark.parametrize("brand", sorted(BRANDS))
def test_folded_pages_are_byte_identical(renderers: tuple[Renderer, Renderer], locale: str, brand: str) -> None:
    folded, plain = renderers
    for index, (name, context) in enumerate(CASES):
        full = {**base(brand, languages=index % 2 == 0), **context}
        expected = plain.render(name, locale, **full)
        assert folded.render(name, locale, **full) == expected, f"{name} #{index} in {locale}"


@pytest.mark.parametrize("locale", SUPPORTED_LOCALES)
def test_folded_pages_are_translated(renderers: tuple[Renderer, Renderer], locale: str) -> None:
    """A folded page is in its language (the comparison above would also pass if neither were)."""
    folded, _ = renderers
    html = folded.render("too_many.html", locale, **base("plain", languages=True))
    expected = {"en": "Too many attempts", "de": "Zu viele Versuche", "fr": "Trop de tentatives", "es": "Demasiados intentos"}[locale]
    assert f"<h1>{expected}</h1>" in html


def test_the_hot_page_is_folded(renderers: tuple[Renderer, Renderer]) -> None:
    """pay.html compiles to no runtime gettext for its literal messages (only `_(error, ...)` is left: a
    refusal's, and a failed payment's three ways of naming the card)."""
    folded, plain = renderers
    for renderer, calls in ((folded, 4), (plain, None)):
        environment = renderer.environment("de")
        source, _, _ = environment.loader.get_source(environment, "pay.html")  # type: ignore[union-attr]
        code = environment.compile(source, "pay.html", raw=True)
        if calls is None:
            assert code.count("context.call((undefined(name='_')") > 20
        else:
            assert code.count("context.call((undefined(name='_')") == calls
            assert "escape(" not in code.replace("escape_text(", "")


def test_parsed_templates_keep_what_the_page_cache_reads(renderers: tuple[Renderer, Renderer]) -> None:
    """views/page_cache.py decides from `environment.parse()` which pages may be kept: a folded tree reads
    the same variables (but the catalog's `_`), the same attributes and the same templates."""
    folded, plain = (renderer.environment("de") for renderer in renderers)
    for name in plain.list_templates():
        source, _, _ = plain.loader.get_source(plain, name)  # type: ignore[union-attr]
        trees = [folded.parse(source), plain.parse(source)]
        variables = [meta.find_undeclared_variables(tree) - {"_", "gettext"} for tree in trees]
        attributes = [sorted(node.attr for node in tree.find_all(nodes.Getattr)) for tree in trees]
        included = [sorted(map(str, meta.find_referenced_templates(tree))) for tree in trees]
        assert variables[0] == variables[1] and attributes[0] == attributes[1] and included[0] == included[1], name


# --- emails share the Renderer: the same comparison, through emails/messages.py ------------------------

FACTS = [
    InvoiceFacts(EVIL, "Ann <Lee>", "INV-7", "Beratung <November> 100%", 12050, "eur", date(2026, 12, 15)),
    InvoiceFacts(
        "Acme GmbH", "Ann Lee", "INV-8", "Consulting", 61630, "eur", date(2026, 12, 15), issued_on=date(2026, 11, 2),
        lines=(FactLine("Beratung & Co", "2.5", 10000, "19", 25000), FactLine("Reise", "1", 28655, None, 28655)),
        subtotal=53655, taxes=(("19", 4750),), notes="Danke <3", overdue_since=date(2026, 12, 16), amount_paid=10000, balance=51630,
    ),
]  # fmt: skip
WHEN = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)


def email_messages(locale: str) -> Iterator[Any]:
    for facts in FACTS:
        yield messages.invoice_message(facts, "https://pay.example.com/pay/a&b", WHEN, locale)
        for kind in ("new_link", "reminder"):
            yield messages.invoice_message(facts, "https://pay.example.com/pay/x", WHEN, locale, kind=kind)
        yield messages.invoice_void_message(facts, locale)
        for asked in (False, True):
            yield messages.colleague_message(facts, "https://pay.example.com/pay/c", WHEN, locale, asked_by_customer=asked)
        yield messages.receipt_message(
            facts,
            amount_paid=12050,
            brand="visa",
            last4="4242",
            paid_at=WHEN,
            link_url=None,
            locale=locale,
            balance=500,
            receipt_number="R-1",
            allocation=(AllocationFact("INV-7", 10000, 0), AllocationFact("INV-8", 2050, 500)),
        )
        yield messages.receipt_message(
            facts, amount_paid=12050, brand=None, last4=None, paid_at=WHEN, link_url="https://p/x", locale=locale
        )
    yield messages.verification_message(EVIL, "Ann <Lee>", "https://pay.example.com/verify/v", WHEN, locale)
    yield messages.finance_alert_message(EVIL, "Dead <letters>", ["one & two", "100%"])


@pytest.mark.parametrize("locale", SUPPORTED_LOCALES)
@pytest.mark.parametrize("brand", sorted(BRANDS))
def test_folded_emails_are_byte_identical(monkeypatch: pytest.MonkeyPatch, locale: str, brand: str) -> None:
    directory = ROOT / "emails" / "templates"
    results = []
    for fold in (True, False):
        renderer = Renderer(directory, fold=fold)
        renderer.set_globals(identity=BRANDS[brand])
        monkeypatch.setattr(messages, "emails", renderer)
        results.append([(m.subject, m.text, m.html) for m in email_messages(locale)])
    assert results[0] == results[1]


# --- the folding itself, on templates made for it -------------------------------------------------------


def environment(fold: bool, catalog: dict[str, str], **options: Any) -> jinja2.Environment:
    env = FoldingEnvironment(extensions=["jinja2.ext.i18n"], autoescape=True, undefined=jinja2.StrictUndefined, **options)
    env.install_gettext_callables(lambda s: catalog.get(s, s), lambda s, p, n: s if n == 1 else p, newstyle=True)  # type: ignore[attr-defined]
    if fold:
        env.fold(lambda s: catalog.get(s, s))
    return env


SOURCES = [
    '{{ _("100%% sure") }}|{{ _("plain") }}|{{ gettext("x") }}',
    '{{ _("Hi %(name)s, %(n)02d%%", name=who, n=3) }}|{{ _("Hi %(name)s", name=who) ~ "!" }}',
    '{{ _("%(a)s and %(a)s", a=who) }}|{{ _("%(a)s only", a=who, b=missing_is_fine) if false else "" }}',
    '{% autoescape false %}{{ _("Hi %(name)s", name=who) }}{% endautoescape %}|'
    '{% autoescape flag %}{{ _("Hi %(name)s", name=who) }}{% endautoescape %}',
    '{% trans name=who %}Hi {{ name }}, 100%{% endtrans %}|{% set x = _("plain") %}{{ x }}|{{ _(dynamic, name=who) }}',
    '{% macro m(v) %}{{ _("Hi %(name)s", name=v) }}{% endmacro %}{{ m(who) }}{{ m(who)|length }}|'
    '{% set b %}{{ _("plain") }}{% endset %}{{ b }}',
    '{% filter upper %}{{ _("Hi %(name)s", name=who) }}{% endfilter %}|{{ _("Hi %(name)s", name=_("plain")) }}',
]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("catalog", [{}, {"plain": "schlicht <b>", "Hi %(name)s": "Hallo %(name)s & <i>", "100%% sure": "100%% sicher"}])
def test_folding_edge_cases(source: str, catalog: dict[str, str]) -> None:
    context = {"who": "<Ann & Bob>", "flag": True, "dynamic": "Dyn %(name)s", "false": False, "missing_is_fine": 1}
    assert environment(True, catalog).from_string(source).render(context) == environment(False, catalog).from_string(source).render(context)


def test_a_template_that_binds_gettext_is_left_alone() -> None:
    source = '{% set _ = upper %}{{ _("plain") }}'
    env = environment(True, {"plain": "schlicht"})
    assert env.from_string(source).render(upper=str.upper) == "PLAIN"


def test_a_message_the_runtime_fails_on_still_fails() -> None:
    """A placeholder without a value, a stray "%": not folded, so the page fails as it did."""
    catalog = {"x": "needs %(value)s", "y": "50% off", "z": "all 100%"}
    for msgid, error in (("x", KeyError), ("y", TypeError), ("z", ValueError)):
        for fold in (True, False):
            with pytest.raises(error):
                environment(fold, catalog).from_string(f'{{{{ _("{msgid}") }}}}').render()


def test_split_format() -> None:
    assert split_format("Pay %(amount)s (100%%)") == ["Pay ", "amount", " (100%)"]
    assert split_format("%%(x)s") == ["%(x)s"]
    assert split_format("%(a)s%(b)s") == ["", "a", "", "b", ""]
    assert split_format("%(month)02d") is None
    assert split_format("50% off") is None
    assert split_format("plain") == ["plain"]


def test_escape_text_is_escape_as_text() -> None:
    for value in ("<a & 'b'>", Markup("<b>"), 42, 1.5, None, Decimal("2.50"), ns(__html__=lambda: "<i>")):
        assert escape_text(value) == str(Markup.escape(value))
        assert type(escape_text(value)) is str


def test_folder_without_splitting_keeps_the_format() -> None:
    env = environment(False, {})
    tree = TranslationFolder(lambda s: s, split_output=False).fold(env.parse('{{ _("Hi %(name)s", name=who) }}'))
    assert "%" in repr(tree) and "Mod" in repr(tree)
