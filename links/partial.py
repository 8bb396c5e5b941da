"""Part payments: how much of an invoice's balance a customer may pay at once (issue 13). Pure rules.

Finance sets them per invoice (`invoice create --allow-partial [--min-amount A | --min-percent P]
[--deposit-percent D]`, or PARTIAL_PAYMENTS_DEFAULT). The rules, in order:

- The full balance (amount_due - amount_paid) is always allowed, and nothing above it ever is.
- Without part payments, the balance is the only amount.
- Deposit: while nothing is paid yet, a payment is at least deposit_percent of amount_due.
- Minimum: a part payment is at least min_partial_amount, or min_partial_percent of amount_due.
- Stripe: no charge below its minimum for the currency (links/lines.py), and a part payment never
  leaves a balance that Stripe could not charge (0 < rest < its minimum).
When a minimum is larger than the balance, the balance itself is the one amount allowed.
Percentages of amount_due are rounded up to the minor unit (30 % of 10.01 is 3.01), so "at least 30 %"
always holds.

The amount a customer types is read strictly: digits, optionally a point and at most the currency's
decimals ("12.50"; "12" too). "12,50", "1,000.00", "€12", "1e3" are refused with a message that says
how to write it. Refusals carry a translatable message (N_) and the amounts it names (minor units),
formatted by whoever shows it, in the reader's language.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from links.lines import MINIMUM_CHARGE
from links.models import Invoice
from plumbing.i18n import N_, currency_digits


@dataclass(frozen=True)
class PartRules:
    allow_partial: bool = False
    min_amount: int | None = None  # minor units
    min_percent: int | None = None  # whole percent of amount_due
    deposit_percent: int | None = None  # whole percent of amount_due, while nothing is paid


class AmountRefused(Exception):
    """An amount the rules do not allow; `message` is a msgid (N_) with %(name)s for each amount."""

    def __init__(self, message: str, **amounts: int) -> None:
        super().__init__(message)
        self.message = message
        self.amounts: dict[str, int] = dict(amounts)


@dataclass(frozen=True)
class Allowed:
    """What may be paid now: any amount from `minimum` to `maximum` (the balance), except amounts
    that would leave a rest below `least_rest`; `maximum` itself always."""

    minimum: int
    maximum: int
    least_rest: int = 1
    deposit: bool = False  # the minimum is the deposit
    choices: bool = field(init=False)  # whether there is anything to choose besides the balance

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", self.minimum < self.maximum and self.maximum - self.minimum >= self.least_rest)

    @property
    def largest_part(self) -> int:
        """The largest amount below the balance that may be paid."""
        return self.maximum - self.least_rest


def stripe_minimum(currency: str) -> int:
    return MINIMUM_CHARGE.get(currency.lower(), 1)


def percent_of(amount: int, percent: int) -> int:
    """`percent` % of `amount`, rounded up to the minor unit."""
    return -(-amount * percent // 100)


def balance_of(amount_due: int, amount_paid: int) -> int:
    return max(amount_due - amount_paid, 0)


def allowed(amount_due: int, amount_paid: int, rules: PartRules, currency: str) -> Allowed:
    """The amounts the customer may pay now (see the module's rules)."""
    balance = balance_of(amount_due, amount_paid)
    if not rules.allow_partial or balance == 0:
        return Allowed(balance, balance)
    floor = stripe_minimum(currency)
    deposit = False
    if amount_paid <= 0 and rules.deposit_percent:
        deposit_amount = percent_of(amount_due, rules.deposit_percent)
        if deposit_amount > floor:
            floor, deposit = deposit_amount, True
    if rules.min_amount:
        floor = max(floor, rules.min_amount)
    if rules.min_percent:
        floor = max(floor, percent_of(amount_due, rules.min_percent))
    if floor >= balance:
        return Allowed(balance, balance)
    return Allowed(floor, balance, least_rest=stripe_minimum(currency), deposit=deposit)


def check_amount(amount: int, amount_due: int, amount_paid: int, rules: PartRules, currency: str) -> int:
    """`amount` (minor units) if the rules allow paying it now, else AmountRefused."""
    window = allowed(amount_due, amount_paid, rules, currency)
    if window.maximum <= 0:
        raise AmountRefused(N_("There is nothing left to pay on this invoice."))
    if amount == window.maximum:
        return amount
    if amount > window.maximum:
        raise AmountRefused(N_("That is more than the balance of %(balance)s."), balance=window.maximum)
    if not window.choices:
        raise AmountRefused(N_("This invoice can only be paid in full: please pay %(balance)s."), balance=window.maximum)
    if amount < window.minimum:
        if window.deposit:
            raise AmountRefused(N_("The first payment is a deposit of at least %(minimum)s."), minimum=window.minimum)
        raise AmountRefused(N_("The smallest amount you can pay is %(minimum)s."), minimum=window.minimum)
    if window.maximum - amount < window.least_rest:
        raise AmountRefused(
            N_("That would leave less than %(rest)s to pay later: pay %(balance)s, or at most %(largest)s."),
            rest=window.least_rest,
            balance=window.maximum,
            largest=window.largest_part,
        )
    return amount


# Thousands grouped the way some language writes them ("1.234,56", "1,234.56", "1 234,56", "1'234.56").
_GROUPED = re.compile(r"[0-9]{1,3}(?:[.,'\s][0-9]{3})+(?:[.,][0-9]+)?")


def parse_amount(text: str, currency: str) -> int:
    """A typed amount in major units -> minor units, strictly; AmountRefused otherwise. The decimal sign
    may be a point or a comma ("12.50" or "12,50": the pay page shows amounts as "12,50 €" in German,
    Spanish and French); thousands separators are refused, never guessed ("1.234" is 1234 in German)."""
    digits: int = currency_digits(currency)
    text = text.strip()
    pattern = r"[0-9]{1,9}" + (rf"(?:[.,][0-9]{{1,{digits}}})?" if digits else "")
    if not re.fullmatch(pattern, text):
        if _GROUPED.fullmatch(text):
            if digits:
                raise AmountRefused(N_("Please write the amount without thousands separators: for example 1234.50."))
            raise AmountRefused(N_("Please write the amount in whole digits, for example 1200."))
        if digits:
            raise AmountRefused(N_("Please write the amount in digits, for example 12.50."))
        raise AmountRefused(N_("Please write the amount in whole digits, for example 1200."))
    whole, _, fraction = text.replace(",", ".").partition(".")
    scale: int = 10**digits
    return int(whole) * scale + int(fraction.ljust(digits, "0") or 0)


def resolve_amount(text: str | None, amount_due: int, amount_paid: int, rules: PartRules, currency: str) -> int:
    """The amount to charge: the balance when nothing was typed, else the typed amount checked."""
    if text is None or not text.strip():
        balance = balance_of(amount_due, amount_paid)
        if balance <= 0:
            raise AmountRefused(N_("There is nothing left to pay on this invoice."))
        return balance
    return check_amount(parse_amount(text, currency), amount_due, amount_paid, rules, currency)


def rules_of(invoice: Invoice) -> PartRules:
    """The rules stored on an invoice row."""
    return PartRules(bool(invoice.allow_partial), invoice.min_partial_amount, invoice.min_partial_percent, invoice.deposit_percent)


def allowed_for(invoice: Invoice) -> Allowed:
    return allowed(invoice.amount_due, invoice.amount_paid, rules_of(invoice), invoice.currency)


def amount_for(invoice: Invoice, text: str | None) -> int:
    """The amount to charge on `invoice` for what the customer typed (None: the balance)."""
    return resolve_amount(text, invoice.amount_due, invoice.amount_paid, rules_of(invoice), invoice.currency)
