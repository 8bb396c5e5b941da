"""The access log's rows of a link's opens (links/opens.py): one per minute, dated by its first open."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from links.opens import _log_rows

LINK = uuid.uuid4()
NINE = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


def test_one_row_per_minute_counting_every_open() -> None:
    times = [NINE + timedelta(seconds=s) for s in (1, 2, 2, 59.9, 60, 61, 3_600)]
    assert _log_rows(LINK, times) == [
        {"link_id": LINK, "opened_at": NINE + timedelta(seconds=1), "opens": 4},
        {"link_id": LINK, "opened_at": NINE + timedelta(seconds=60), "opens": 2},
        {"link_id": LINK, "opened_at": NINE + timedelta(hours=1), "opens": 1},
    ]


def test_put_back_opens_out_of_order_keep_the_first_time() -> None:
    # A failed flush puts its opens back after the newer ones counted meanwhile.
    times = [NINE + timedelta(seconds=30), NINE + timedelta(seconds=31), NINE + timedelta(seconds=5)]
    assert _log_rows(LINK, times) == [{"link_id": LINK, "opened_at": NINE + timedelta(seconds=5), "opens": 3}]


def test_no_opens_no_rows() -> None:
    assert _log_rows(LINK, []) == []
