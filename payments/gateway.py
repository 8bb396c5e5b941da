"""The Stripe gateway: the only module that imports `stripe`.

Every call here is valid for the real Stripe API *and* accepted by localstripe, the stateful
emulator the tests and the demo run against. localstripe rejects parameters it does not know, so
each call sends only what both accept (noted beside each call). Results come back as plain
dataclasses so that services never touch SDK objects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import stripe

from plumbing.settings import Settings

log = logging.getLogger("paylink.stripe")


class GatewayError(Exception):
    """Stripe refused the request (bad parameters, unknown object). Not the customer's fault."""


class GatewayUnavailable(GatewayError):
    """We could not hear Stripe's answer (timeout, connection error, 5xx, rate limit)."""


class CardDeclined(GatewayError):
    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class InvalidSignature(Exception):
    """A webhook whose Stripe-Signature does not verify (or is older than the tolerance)."""


@dataclass(frozen=True)
class CardSummary:
    payment_method_id: str
    brand: str
    last4: str
    exp_month: int | None
    exp_year: int | None
    customer_id: str | None = None
    fingerprint: str | None = None  # Stripe's: the same card number has the same one (de-duplication)


@dataclass(frozen=True)
class IntentSnapshot:
    """What Stripe says about a PaymentIntent right now."""

    id: str
    status: str
    amount: int
    currency: str
    customer_id: str | None
    payment_method_id: str | None
    client_secret: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    error_code: str | None = None
    error_message: str | None = None
    latest_charge_id: str | None = None


@dataclass(frozen=True)
class SetupSnapshot:
    id: str
    status: str
    customer_id: str | None
    payment_method_id: str | None
    client_secret: str | None


WEBHOOK_TOLERANCE_SECONDS = 300


def _plain(obj: Any) -> Any:
    """SDK objects become plain dicts (webhook payloads already are)."""
    to_dict = getattr(obj, "to_dict", None)
    return to_dict() if callable(to_dict) else obj


def card_summary(pm: Any) -> CardSummary:
    pm = _plain(pm)
    card = _get(pm, "card") or {}
    return CardSummary(
        payment_method_id=_get(pm, "id"),
        brand=str(_get(card, "brand") or "card"),
        last4=str(_get(card, "last4") or "????"),
        exp_month=_get(card, "exp_month"),
        exp_year=_get(card, "exp_year"),
        customer_id=_ref_id(_get(pm, "customer")),
        fingerprint=_get(card, "fingerprint") or None,
    )


def intent_snapshot(pi: Any) -> IntentSnapshot:
    """Build a snapshot from an SDK object or from a webhook's plain `data.object` dict."""
    pi = _plain(pi)
    error = _get(pi, "last_payment_error") or {}
    charge = _get(pi, "latest_charge")
    if charge is not None and not isinstance(charge, str):
        charge = _get(charge, "id")
    metadata = _get(pi, "metadata") or {}
    return IntentSnapshot(
        id=_get(pi, "id"),
        status=_get(pi, "status"),
        amount=int(_get(pi, "amount")),
        currency=str(_get(pi, "currency")).lower(),
        customer_id=_get(pi, "customer"),
        payment_method_id=_ref_id(_get(pi, "payment_method")),
        client_secret=_get(pi, "client_secret"),
        metadata={str(k): str(v) for k, v in dict(metadata).items()},
        error_code=failure_code(_get(error, "code"), _get(error, "decline_code")),
        error_message=_get(error, "message"),
        latest_charge_id=charge,
    )


def _signed_at(header: str) -> int:
    """The `t=` timestamp of a Stripe-Signature header (already verified by the SDK)."""
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            return int(value)
    return 0


def _ref_id(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return str(_get(value, "id"))


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None


class StripeGateway:
    def __init__(self, settings: Settings) -> None:
        base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
        self._client = stripe.StripeClient(
            str(settings.stripe_secret_key),
            base_addresses=base,  # type: ignore[arg-type]
            max_network_retries=settings.stripe_max_network_retries,
            http_client=stripe.HTTPXClient(timeout=settings.stripe_timeout_seconds),
        )
        self._webhook_secret = str(settings.stripe_webhook_secret)
        self._backoff = RateLimitBackoff.from_settings(settings)  # 429s (see `_call`)

    # --- customers and payment methods ---------------------------------------------------------

    async def create_customer(self, email: str, name: str) -> str:
        # localstripe accepts: name, email, description, phone, address, metadata, ...
        customer = await self._call(self._client.v1.customers.create_async, {"email": email, "name": name})
        return str(customer.id)

    async def delete_customer(self, customer_id: str) -> None:
        """Take back a customer created for nothing (our own write failed right after)."""
        # localstripe and Stripe: DELETE /v1/customers/{id}, no parameters.
        await self._call(self._client.v1.customers.delete_async, customer_id)

    async def default_payment_method(self, customer_id: str) -> str | None:
        customer = await self._call(self._client.v1.customers.retrieve_async, customer_id)
        settings = _get(_plain(customer), "invoice_settings") or {}
        return _ref_id(_get(settings, "default_payment_method"))

    async def list_cards(self, customer_id: str) -> list[CardSummary]:
        # localstripe requires both `customer` and `type=card`; Stripe accepts both.
        result = await self._call(self._client.v1.payment_methods.list_async, {"customer": customer_id, "type": "card", "limit": 100})
        return [card_summary(pm) for pm in result.data]

    async def retrieve_card(self, payment_method_id: str) -> CardSummary:
        pm = await self._call(self._client.v1.payment_methods.retrieve_async, payment_method_id)
        return card_summary(pm)

    async def attach_card(self, payment_method_id: str, customer_id: str) -> CardSummary:
        # localstripe accepts only `customer` here (as does Stripe for cards).
        pm = await self._call(self._client.v1.payment_methods.attach_async, payment_method_id, {"customer": customer_id})
        return card_summary(pm)

    async def detach_card(self, payment_method_id: str) -> None:
        # localstripe's detach takes no parameters beyond the id, like Stripe's.
        await self._call(self._client.v1.payment_methods.detach_async, payment_method_id)

    async def set_default_payment_method(self, customer_id: str, payment_method_id: str) -> None:
        await self._call(
            self._client.v1.customers.update_async,
            customer_id,
            {"invoice_settings": {"default_payment_method": payment_method_id}},
        )

    # --- payment intents -----------------------------------------------------------------------

    async def create_payment_intent(
        self,
        *,
        amount: int,
        currency: str,
        customer_id: str,
        payment_method_id: str,
        metadata: dict[str, str],
        idempotency_key: str,
    ) -> IntentSnapshot:
        # Only parameters localstripe knows: amount, currency, customer, payment_method, metadata,
        # payment_method_types. Not confirmed here: the id is committed first, then confirmed.
        # localstripe ignores Idempotency-Key; our database's unique attempt key is the first line.
        params: dict[str, Any] = {
            "amount": amount,
            "currency": currency,
            "customer": customer_id,
            "payment_method": payment_method_id,
            "payment_method_types": ["card"],
            "metadata": metadata,
        }
        pi = await self._call(self._client.v1.payment_intents.create_async, params, {"idempotency_key": idempotency_key})
        return intent_snapshot(pi)

    async def confirm_payment_intent(self, intent_id: str, idempotency_key: str) -> IntentSnapshot:
        """Confirm; a decline comes back as a snapshot carrying the error, not as an exception."""
        try:
            # localstripe's confirm takes no parameters beyond the id (the method is already set).
            pi = await self._call(self._client.v1.payment_intents.confirm_async, intent_id, None, {"idempotency_key": idempotency_key})
        except CardDeclined:
            return await self.retrieve_payment_intent(intent_id)
        return intent_snapshot(pi)

    async def cancel_payment_intent(self, intent_id: str) -> IntentSnapshot:
        # localstripe's cancel takes no parameters beyond the id; Stripe's cancellation_reason is optional.
        pi = await self._call(self._client.v1.payment_intents.cancel_async, intent_id)
        return intent_snapshot(pi)

    async def retrieve_payment_intent(self, intent_id: str) -> IntentSnapshot:
        pi = await self._call(self._client.v1.payment_intents.retrieve_async, intent_id)
        return intent_snapshot(pi)

    async def list_payment_intents(self, created_since: int, max_intents: int = 10_000) -> list[tuple[int, IntentSnapshot]]:
        """PaymentIntents created at or after `created_since` (Unix time), with their creation time.

        GET /v1/payment_intents with `limit` and `starting_after` only: localstripe accepts nothing
        else there (no `customer`, no `created`, and no search by metadata), and Stripe accepts it
        too, so the time window is applied here. Stripe lists newest first, so paging stops at the
        first page that ends before the window; localstripe lists oldest first, so it is read to the
        end (its stores are small)."""
        params: dict[str, Any] = {"limit": 100}
        found: list[tuple[int, IntentSnapshot]] = []
        seen = 0
        while seen < max_intents:
            page = await self._call(self._client.v1.payment_intents.list_async, dict(params))
            batch = [_plain(pi) for pi in page.data]
            seen += len(batch)
            created = [int(_get(pi, "created") or 0) for pi in batch]
            found += [(when, intent_snapshot(pi)) for when, pi in zip(created, batch, strict=True) if when >= created_since]
            if not page.has_more or not batch:
                break
            if created[0] > created[-1] and created[-1] < created_since:  # newest first, and past the window
                break
            params["starting_after"] = batch[-1]["id"]
        return found

    # --- new cards -----------------------------------------------------------------------------

    async def create_setup_intent(self, customer_id: str) -> SetupSnapshot:
        # localstripe accepts customer, usage, payment_method_types, metadata.
        seti = await self._call(
            self._client.v1.setup_intents.create_async,
            {"customer": customer_id, "usage": "off_session", "payment_method_types": ["card"]},
        )
        return self._setup_snapshot(seti)

    async def retrieve_setup_intent(self, setup_intent_id: str) -> SetupSnapshot:
        seti = await self._call(self._client.v1.setup_intents.retrieve_async, setup_intent_id)
        return self._setup_snapshot(seti)

    @staticmethod
    def _setup_snapshot(seti: Any) -> SetupSnapshot:
        seti = _plain(seti)
        return SetupSnapshot(
            id=str(seti["id"]),
            status=str(seti["status"]),
            customer_id=_ref_id(_get(seti, "customer")),
            payment_method_id=_ref_id(_get(seti, "payment_method")),
            client_secret=_get(seti, "client_secret"),
        )

    # --- events --------------------------------------------------------------------------------

    def parse_webhook(self, payload: bytes, signature: str | None) -> dict[str, Any]:
        """Verify Stripe-Signature before anything reads the body, then return the event as a dict."""
        try:
            stripe.WebhookSignature.verify_header(payload.decode("utf-8"), signature or "", self._webhook_secret, WEBHOOK_TOLERANCE_SECONDS)
            # The SDK refuses timestamps too far in the past only; a replay window must close both ways.
            if _signed_at(signature or "") > time.time() + WEBHOOK_TOLERANCE_SECONDS:
                raise ValueError("the signature's timestamp is too far in the future")
            event = json.loads(payload)
        except (stripe.SignatureVerificationError, UnicodeDecodeError, ValueError) as exc:
            raise InvalidSignature(str(exc)) from None
        if not isinstance(event, dict) or not isinstance(event.get("id"), str) or "type" not in event:
            raise InvalidSignature("payload is not a Stripe event")
        return event

    async def list_events(self, created_after: int | None, max_events: int = 10_000) -> list[dict[str, Any]]:
        """Events newer than `created_after`, oldest first (localstripe accepts created, limit, starting_after)."""
        params: dict[str, Any] = {"limit": 100}
        if created_after is not None:
            params["created"] = {"gt": created_after}
        events: list[dict[str, Any]] = []
        while len(events) < max_events:
            page = await self._call(self._client.v1.events.list_async, dict(params))
            batch = [_plain(e) for e in page.data]
            events += batch
            if not page.has_more or not batch:
                break
            params["starting_after"] = batch[-1]["id"]
        return sorted(events, key=lambda e: (e.get("created") or 0, e.get("id")))

    # --- plumbing ------------------------------------------------------------------------------

    async def _call(self, method: Any, *args: Any) -> Any:
        """One Stripe call, with Stripe's errors mapped to ours.

        A 429 (Stripe's rate limit: 100 requests/s per account in live mode, 25/s per endpoint, which
        payday reaches) is sent again after a jittered backoff while `RateLimitBackoff` allows: Stripe
        did not process it, and the same arguments (so the same idempotency key) go again. If it still
        fails, GatewayUnavailable: the pay POST then says "we are confirming your payment", never
        "failed". Timeouts, connection errors, 409s and 5xx are not retried here: the SDK already
        retries them STRIPE_MAX_NETWORK_RETRIES times with its own jittered backoff."""
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                return await method(*args)
            except stripe.RateLimitError as exc:
                delay = self._backoff.delay(attempt, time.monotonic() - started, exc.headers)
                if delay is None:
                    raise GatewayUnavailable(str(exc)) from None
                log.warning("stripe.rate_limited attempt=%d retry_in=%.2fs", attempt + 1, delay)
            except stripe.CardError as exc:
                error = exc.error
                raise CardDeclined(exc.user_message or str(exc), failure_code(exc.code, error.decline_code if error else None)) from None
            except (stripe.APIConnectionError, stripe.APIError) as exc:
                raise GatewayUnavailable(str(exc)) from None
            except stripe.StripeError as exc:
                if (exc.http_status or 0) >= 500:
                    raise GatewayUnavailable(str(exc)) from None
                raise GatewayError(exc.user_message or str(exc)) from None
            attempt += 1
            await asyncio.sleep(delay)


# A generator of our own: jitter must not depend on (or disturb) the global random state.
_jitter = random.Random()


@dataclass(frozen=True)
class RateLimitBackoff:
    """How `StripeGateway._call` waits out Stripe's 429s: at most `retries` more tries, each after
    min(cap, base x 2^n) seconds with jitter (half of it fixed, half random, so that the requests of a
    payday crowd spread out), and only while the time spent stays inside `window_seconds`.

    The window keeps a pay attempt's create call, backoff included, shorter than STALE_CLAIM_SECONDS:
    settings check that STALE_CLAIM_SECONDS exceeds the longest create without 429s (STRIPE_TIMEOUT_SECONDS
    x (1 + STRIPE_MAX_NETWORK_RETRIES)); the backoff may use at most half of what is left, and never
    more than 8 s, so a claim is never released while its create may still be answered."""

    window_seconds: float
    sdk_retries: int
    retries: int = 3
    base_seconds: float = 0.5
    cap_seconds: float = 4.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimitBackoff:
        longest_call = settings.stripe_timeout_seconds * (1 + settings.stripe_max_network_retries)
        window = max(0.0, min(RATE_LIMIT_WINDOW_SECONDS, (settings.stale_claim_seconds - longest_call) / 2))
        return cls(window_seconds=window, sdk_retries=settings.stripe_max_network_retries)

    def delay(self, attempt: int, elapsed: float, headers: Mapping[str, str] | None) -> float | None:
        """Seconds to wait before try `attempt + 2`, or None: give up now."""
        if attempt >= self.retries:
            return None
        if self.sdk_retries and (headers or {}).get("stripe-should-retry") == "true":
            return None  # the SDK honoured Stripe's advice and retried already
        step: float = min(self.cap_seconds, self.base_seconds * 2.0**attempt)
        wait = step / 2 + _jitter.uniform(0, step / 2)
        if elapsed + wait > self.window_seconds:
            return None
        return wait


RATE_LIMIT_WINDOW_SECONDS = 8.0


def failure_code(code: Any, decline_code: Any) -> Any:
    """Stripe's error code with the issuer's decline code, when there is one ("card_declined:insufficient_funds"),
    so that the page can say why and finance sees it; anything else is passed on as it came."""
    if isinstance(code, str) and isinstance(decline_code, str) and decline_code and decline_code != code:
        combined = f"{code}:{decline_code}"
        return combined if len(combined) <= 64 else code
    return code
