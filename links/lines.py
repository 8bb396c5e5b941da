"""Line items, tax and totals of an invoice, in integer minor units.

The rounding rule, stated once: each line's net amount (quantity x unit amount) and each line's tax
(net x rate) are rounded to the currency's minor unit half-up (0.5 goes away from zero), per line;
the invoice's subtotal, tax per rate and total are sums of those rounded figures, so the PDF, the
page, the email and the charge always add up to the same total, to the cent.

Stored on the invoice as `line_items` (JSON, one dict per line, see `LineItem.to_json`); an invoice
made with a plain `--amount` has one line with no tax.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from links.errors import LinkError
from plumbing.i18n import MoneyError, currency_digits, to_minor_units

MAX_LINES = 100
MAX_QUANTITY = Decimal("1000000")

# Stripe's minimum charge amounts, in minor units, for the currencies Paylink is likely to meet.
# Source: https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts (read 2026-11-23).
# A currency not listed here is checked against the equivalent of USD 0.50 by Stripe itself;
# Paylink refuses only what it knows Stripe would refuse.
MINIMUM_CHARGE: dict[str, int] = {
    "usd": 50,
    "aed": 200,
    "aud": 50,
    "bgn": 100,
    "brl": 50,
    "cad": 50,
    "chf": 50,
    "czk": 1500,
    "dkk": 250,
    "eur": 50,
    "gbp": 30,
    "hkd": 400,
    "huf": 17500,
    "inr": 50,
    "jpy": 50,
    "mxn": 1000,
    "myr": 200,
    "nok": 300,
    "nzd": 50,
    "pln": 200,
    "ron": 200,
    "sek": 300,
    "sgd": 50,
    "thb": 1000,
}


@dataclass(frozen=True)
class LineItem:
    description: str
    quantity: Decimal
    unit_amount: int  # minor units
    tax_percent: Decimal | None  # None: no tax on this line

    @property
    def net(self) -> int:
        return _round_half_up(self.quantity * self.unit_amount)

    @property
    def tax(self) -> int:
        if self.tax_percent is None:
            return 0
        return _round_half_up(Decimal(self.net) * self.tax_percent / 100)

    @property
    def total(self) -> int:
        return self.net + self.tax

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "quantity": str(self.quantity),
            "unit_amount": self.unit_amount,
            "tax_percent": None if self.tax_percent is None else str(self.tax_percent),
            "net": self.net,
            "tax": self.tax,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LineItem:
        tax = data.get("tax_percent")
        return cls(
            str(data["description"]), Decimal(str(data["quantity"])), int(data["unit_amount"]), None if tax is None else Decimal(str(tax))
        )


@dataclass(frozen=True)
class Totals:
    subtotal: int
    taxes: list[tuple[Decimal, int]]  # (rate in percent, tax at that rate), by rate
    total: int

    @property
    def tax_total(self) -> int:
        return sum(amount for _, amount in self.taxes)


def _round_half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def totals(lines: Sequence[LineItem]) -> Totals:
    by_rate: dict[Decimal, int] = {}
    for line in lines:
        if line.tax_percent is not None:
            by_rate[line.tax_percent] = by_rate.get(line.tax_percent, 0) + line.tax
    subtotal = sum(line.net for line in lines)
    return Totals(subtotal, sorted(by_rate.items()), subtotal + sum(by_rate.values()))


def lines_of(stored: Iterable[dict[str, Any]] | None, *, description: str, amount_due: int) -> list[LineItem]:
    """The invoice's lines; an invoice stored before line items existed is one untaxed line."""
    if stored:
        return [LineItem.from_json(item) for item in stored]
    return [LineItem(description, Decimal(1), amount_due, None)]


def parse_item(spec: str, currency: str) -> LineItem:
    """'Consulting|3|400.00|19' -> a line (description, quantity, unit amount in major units, tax % or empty)."""
    parts = spec.split("|")
    if len(parts) not in (3, 4):
        raise LinkError(f"item {spec!r}: use DESCRIPTION|QUANTITY|UNIT_AMOUNT|TAX_PERCENT (tax may be empty)")
    description, quantity_text, unit_text = (p.strip() for p in parts[:3])
    tax_text = parts[3].strip() if len(parts) == 4 else ""
    return make_item(description, quantity_text, unit_text, tax_text, currency)


def make_item(description: str, quantity_text: str, unit_text: str, tax_text: str, currency: str) -> LineItem:
    if not description or len(description) > 500 or any(ord(c) < 32 for c in description):
        raise LinkError("an item needs a one-line description of at most 500 characters")
    try:
        quantity = Decimal(quantity_text)
    except InvalidOperation:
        raise LinkError(f"item quantity {quantity_text!r} is not a number") from None
    if not quantity.is_finite() or quantity <= 0 or quantity > MAX_QUANTITY or -int(quantity.as_tuple().exponent) > 4:
        raise LinkError(f"item quantity {quantity_text!r} must be above 0, at most {MAX_QUANTITY}, with at most 4 decimals")
    try:
        unit = to_minor_units(unit_text, currency)
    except MoneyError as exc:
        raise LinkError(f"item unit amount: {exc}") from None
    tax: Decimal | None = None
    if tax_text:
        try:
            tax = Decimal(tax_text.rstrip("%").strip())
        except InvalidOperation:
            raise LinkError(f"item tax {tax_text!r} is not a percentage") from None
        if not tax.is_finite() or tax < 0 or tax > 100 or -int(tax.as_tuple().exponent) > 3:
            raise LinkError(f"item tax {tax_text!r} must be between 0 and 100 %")
        tax = _plain(tax)
    return LineItem(description, _plain(quantity), unit, tax)


def _plain(value: Decimal) -> Decimal:
    """2.50 -> 2.5, 3.0 -> 3, 100 -> 100 (never 1E+2): how a quantity or rate is stored and shown."""
    return value.quantize(Decimal(1)) if value == value.to_integral_value() else value.normalize()


def plain_line(description: str, amount: int) -> LineItem:
    """An invoice made with a plain amount: one untaxed line of quantity 1."""
    return LineItem(description.strip(), Decimal(1), amount, None)


def lines_json(lines: Sequence[LineItem]) -> list[dict[str, Any]]:
    """What `Invoice.line_items` stores."""
    return [line.to_json() for line in lines]


def rate_text(rate: Decimal) -> str:
    """A tax rate for staff (CLI): '19 %', '7.5 %'."""
    return f"{_plain(rate)} %"


def check_lines(lines: Sequence[LineItem], currency: str) -> Totals:
    """The totals of a new invoice's lines, or LinkError: no lines, too many, or a total Stripe
    cannot charge (below its minimum for the currency, or above a single charge's maximum)."""
    if not lines:
        raise LinkError("an invoice needs at least one line")
    if len(lines) > MAX_LINES:
        raise LinkError(f"an invoice has at most {MAX_LINES} lines")
    result = totals(lines)
    minimum = MINIMUM_CHARGE.get(currency.lower())
    if minimum is not None and result.total < minimum:
        shown = Decimal(minimum).scaleb(-currency_digits(currency))
        raise LinkError(f"the total is below Stripe's minimum charge of {shown} {currency.upper()}")
    if result.total > 99_999_999:
        raise LinkError("the total is larger than a single card payment allows")
    return result
