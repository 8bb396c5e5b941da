"""Payday, as customers live it: open the emailed link, look, pay with the saved card, look again.

Run by load/bench_locust.py (which starts localstripe, the app and fills the database), or by hand
against a running app whose customers are listed in a file, one JSON object a line
({"token": ..., "link": "<link id hex>", "payment_method": "pm_...", "address": "10.0.0.1"}):

    PAYDAY_CUSTOMERS=/path/to/customers.jsonl .venv/bin/locust -f load/locustfile.py --headless -u 200 -r 50 -t 60s \\
        --host http://127.0.0.1:8000

Each simulated customer takes the next customer of the file (one link each), then:
1. GET /pay/<token>: the handoff (303 to /pay/l/<link>, the token goes into the link's cookie);
2. GET /pay/l/<link>: the page, with the saved card offered (checked: "4242" on the page);
3. thinks, then POST /pay/l/<link> with the page's CSRF token and the saved card: the app claims the
   attempt, creates and confirms the PaymentIntent on Stripe (localstripe), answers 303 to the page;
   Stripe then sends payment_intent.succeeded to the webhook, and the receipt is queued;
4. keeps opening the page now and then (the paid page), as customers do to check.
Think time: PAYDAY_WAIT seconds, "MIN,MAX" (default "1,2"). The page's figures are the requests named
"/pay/l/[link] (page)". Only 127.0.0.1 is allowed. Each customer comes from an address of its own
("address", sent as X-Forwarded-For, which the app believes from 127.0.0.1 when uvicorn runs with
--proxy-headers, as in the Procfile), as customers behind a load balancer do: the brakes count per
client address, and 200 customers on one address would trip them.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from locust import FastHttpUser, between, events, task
from locust.env import Environment

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def _load_customers() -> list[dict[str, str]]:
    source = os.environ.get("PAYDAY_CUSTOMERS")
    if not source:
        raise SystemExit("set PAYDAY_CUSTOMERS to a file with one customer (JSON) per line (load/bench_locust.py writes one)")
    customers = [json.loads(line) for line in Path(source).read_text().splitlines() if line.strip()]
    if not customers:
        raise SystemExit(f"no customers in {source}")
    return customers


CUSTOMERS = _load_customers()
_next_customer = itertools.cycle(CUSTOMERS)
WAIT_MIN, WAIT_MAX = (float(x) for x in os.environ.get("PAYDAY_WAIT", "1,2").split(","))


@events.init.add_listener
def _only_local(environment: Environment, **_: object) -> None:
    host = urlsplit(environment.host or "").hostname
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"payday load only goes to 127.0.0.1, not {host!r} (give --host http://127.0.0.1:PORT)")


class PaydayCustomer(FastHttpUser):
    wait_time = between(WAIT_MIN, WAIT_MAX)

    def on_start(self) -> None:
        self.customer = next(_next_customer)
        self.page_path = f"/pay/l/{self.customer['link']}"
        self.paid = False
        self.headers = {"X-Forwarded-For": self.customer.get("address", "127.0.0.1")}
        with self.client.get(
            f"/pay/{self.customer['token']}",
            name="/pay/[token] (handoff)",
            headers=self.headers,
            allow_redirects=False,
            catch_response=True,
        ) as response:
            if response.status_code != 303 or response.headers.get("location") != self.page_path:
                response.failure(f"handoff answered {response.status_code} to {response.headers.get('location')}")

    def open_page(self) -> str:
        with self.client.get(self.page_path, name="/pay/l/[link] (page)", headers=self.headers, catch_response=True) as response:
            text = response.text or ""
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
            elif not self.paid and "4242" not in text:
                response.failure("the page does not offer the saved card")
            return text

    @task
    def payday(self) -> None:
        page = self.open_page()
        if self.paid:
            return
        csrf = CSRF.search(page)
        if not csrf:
            return  # already reported as a failure by open_page
        self.wait()  # the customer reads the page before pressing Pay
        form = {"csrf": csrf.group(1), "payment_method": self.customer["payment_method"]}
        headers = {**self.headers, "Origin": self.host or "", "Content-Type": "application/x-www-form-urlencoded"}
        with self.client.post(
            self.page_path, data=urlencode(form), headers=headers, name="/pay/l/[link] (pay)", allow_redirects=False, catch_response=True
        ) as response:
            if response.status_code == 303:
                self.paid = True
            else:
                response.failure(f"pay answered {response.status_code}: {(response.text or '')[:200]}")
