"""Line items, tax and totals: the rounding rule finance can check by hand."""

from __future__ import annotations

from decimal import Decimal

import pytest

from links.errors import LinkError
from links.lines import LineItem, check_lines, lines_of, parse_item, totals


class TestTotals:
    """Per line, half-up, then summed: the page, the PDF and the charge agree to the cent."""

    def test_three_lines_two_rates(self) -> None:
        lines = [parse_item("Consulting|3|400.00|19", "eur"), parse_item("Travel|1|85.50|7", "eur"), parse_item("Fee|1|10.00|", "eur")]
        result = totals(lines)
        assert result.subtotal == 120000 + 8550 + 1000
        assert result.taxes == [(Decimal("7"), 599), (Decimal("19"), 22800)]  # 85.50 x 7 % = 5.985 -> 5.99 (half-up)
        assert result.total == 129550 + 599 + 22800

    def test_half_up_per_line(self) -> None:
        line = LineItem("x", Decimal("1"), 5, Decimal("10"))  # 0.05 x 10 % = 0.005 -> 0.01
        assert (line.net, line.tax) == (5, 1)
        quarter = LineItem("y", Decimal("0.5"), 1, None)  # 0.5 minor unit -> 1
        assert quarter.net == 1

    def test_a_plain_amount_is_one_untaxed_line(self) -> None:
        [line] = lines_of(None, description="Annual service", amount_due=12050)
        assert (line.description, line.net, line.tax) == ("Annual service", 12050, 0)

    def test_round_trip_through_json(self) -> None:
        line = parse_item("Consulting|2.5|400.00|19", "eur")
        assert LineItem.from_json(line.to_json()) == line


class TestRefusals:
    """Bad items and totals Stripe cannot charge are refused with one clear line."""

    @pytest.mark.parametrize(
        "spec",
        [
            "Consulting|3",
            "|1|10.00|",
            "X|0|10.00|",
            "X|-1|10.00|",
            "X|abc|10.00|",
            "X|1|10.001|",
            "X|1|10.00|101",
            "X|1|10.00|abc",
            "X|1|0|",
        ],
    )
    def test_bad_item(self, spec: str) -> None:
        with pytest.raises(LinkError):
            parse_item(spec, "eur")

    def test_below_stripes_minimum_names_it(self) -> None:
        with pytest.raises(LinkError, match=r"minimum charge of 0\.50 EUR"):
            check_lines([parse_item("Tiny|1|0.49|", "eur")], "eur")
        with pytest.raises(LinkError, match=r"0\.30 GBP"):
            check_lines([parse_item("Tiny|1|0.29|", "gbp")], "gbp")
        with pytest.raises(LinkError, match="50 JPY"):
            check_lines([parse_item("Tiny|1|49|", "jpy")], "jpy")
        assert check_lines([parse_item("Ok|1|0.50|", "eur")], "eur").total == 50
