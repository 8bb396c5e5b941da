"""What the PDFs are called: a receipt of one part of several carries its own number."""

from __future__ import annotations

from typing import Any, cast

from links.models import Invoice
from payments.documents import Document, ReceiptFacts, _one_of_several, filename


def document(amount_due: int, paid: int | None, number: str | None = "RCT-000002") -> Document:
    receipt = ReceiptFacts(number, None, paid, "eur", "visa", "4242") if paid is not None else None
    invoice = Invoice(number="INV-000002", amount_due=amount_due)
    return Document(invoice, cast(Any, None), None, [], cast(Any, None), cast(Any, None), receipt)


def test_a_part_s_receipt_is_named_by_its_number() -> None:
    part = document(142800, 42840)
    assert _one_of_several(part) and filename("receipt", part, numbered=_one_of_several(part)) == "INV-000002-receipt-RCT-000002.pdf"


def test_a_whole_payment_s_receipt_keeps_the_plain_name() -> None:
    whole = document(142800, 142800)
    assert not _one_of_several(whole) and filename("receipt", whole, numbered=_one_of_several(whole)) == "INV-000002-receipt.pdf"
    assert filename("invoice", whole) == "INV-000002.pdf"
    assert not _one_of_several(document(142800, None))
