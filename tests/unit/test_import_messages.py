"""What the import says about a file a spreadsheet saved in another way than expected (links/importer.py)."""

from __future__ import annotations

from datetime import date

import pytest

from links.importer import ImportError_, parse_csv

TODAY = date(2026, 11, 24)


def test_a_semicolon_separated_file_is_named_as_such() -> None:
    # What a spreadsheet set to German (or French, or Spanish) saves as "CSV".
    text = "email;name;amount;currency;description\nann@example.com;Ann Lee;12,50;eur;Consulting\n"
    with pytest.raises(ImportError_, match="separated by ';': save the file as CSV with commas"):
        parse_csv(text, today=TODAY)


def test_the_same_row_twice_says_to_remove_one_or_number_them() -> None:
    row = "ann@example.com,Ann Lee,12.50,eur,Consulting\n"
    _, bad = parse_csv("email,name,amount,currency,description\n" + row + row, today=TODAY)
    [problem] = bad
    assert problem.line == 3 and "also on line 2" in problem.reason
    assert "if it is there twice by mistake, remove one" in problem.reason
