"""Payday: many customers open their pay link at once (GET /pay/<token>).

Run by load/payday.py, or by hand against a running app whose links are listed one per line in a file:

    PAYDAY_URLS=/path/to/urls.txt .venv/bin/locust -f load/locustfile.py --headless -u 64 -r 64 -t 20s --host http://127.0.0.1:8000

Each simulated customer opens a random link from the file with no think time (the worst minute of payday)
and checks that the page answered 200 and offers the saved card (PAYDAY_EXPECT, default "4242").
Only the path of each URL is used; --host says where the app listens (127.0.0.1 only).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from urllib.parse import urlsplit

from locust import FastHttpUser, constant, events, task
from locust.env import Environment


def _load_paths() -> list[str]:
    source = os.environ.get("PAYDAY_URLS")
    if not source:
        raise SystemExit("set PAYDAY_URLS to a file with one pay link per line (load/payday.py writes one)")
    paths = [urlsplit(line.strip()).path for line in Path(source).read_text().splitlines() if line.strip()]
    if not paths:
        raise SystemExit(f"no links in {source}")
    return paths


PATHS = _load_paths()
EXPECT = os.environ.get("PAYDAY_EXPECT", "4242")


@events.init.add_listener
def _only_local(environment: Environment, **_: object) -> None:
    host = urlsplit(environment.host or "").hostname
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"payday load only goes to 127.0.0.1, not {host!r} (give --host http://127.0.0.1:PORT)")


class PaydayCustomer(FastHttpUser):
    wait_time = constant(0)

    @task
    def open_pay_link(self) -> None:
        path = random.choice(PATHS)
        with self.client.get(path, name="/pay/[token]", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
            elif EXPECT and EXPECT not in (response.text or ""):
                response.failure(f"page does not show {EXPECT!r}")
            else:
                response.success()
