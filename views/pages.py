"""Every customer-facing route of a link: /pay/{token} (the emailed address), /pay/l/{link id hex}
(the page and its forms) and /verify/{token}. Views are thin: they check the link and the form,
call a service, pick a page.

Link handoff. The emailed link /pay/<token> carries the link's bearer token. GET /pay/<token>
verifies it in memory (a forged one never reaches the database), hands it to the cookie
`pl_<link id hex>` (HttpOnly, SameSite=Lax so that it is sent on the redirect of a navigation that
started in a webmail, Secure over https, Path=/pay/l/<link id hex> so that it reaches that page and
the forms under it and nothing else) and answers 303 to /pay/l/<link id hex>: the token leaves the
address bar, the history, bookmarks and screenshots. That page is served when the cookie holds a
valid token for that link; otherwise (another browser or device, a scanner that keeps no cookies, a
forged cookie) it asks to open the link from the email (404). The emailed link works on any device:
opening it there hands over again. Every form posts under /pay/l/<link id hex>/…; the old routes
under /pay/<token>/… keep working for tabs opened before, and move them over to the cookie.

The hot path (GET /pay/l/<link>): the cookie's token is verified in memory, then one read loads
link, invoice, customer, live payment and saved cards; the open is counted in memory and written in
the background. Stripe is never called on GET: mail scanners prefetch links, so GET changes nothing
a customer would notice (the handoff sets a cookie in the client, nothing on the server; a scanner
that follows the redirect with its cookies sees the same page, one without sees "open the link from
your email"). Only POST moves money.

Documents (GET …/invoice.pdf, …/receipt.pdf, under the cookie's path and the token's): safe GETs with
the page's link checks (a forged or expired link gets its page, never a PDF), rendered by WeasyPrint
on a thread pool of its own (payments/documents.py), in the page's language, `no-store` like every
page, as an attachment named after the invoice number. A receipt of an invoice that is not paid is a
404 page. GET /brand/logo and /favicon.ico serve the merchant's logo from our own origin.

Every POST is checked in this order: the link (token or cookie), where it came from (Origin or
Referer: 403), the client address's POST brake (429), the form's size and its CSRF token, bound to
the link and to this browser (400). Brakes on SetupIntents and failed payments answer 429 as well.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from links import customers, fresh_links, verification
from links.lines import lines_of, totals
from links.models import InvoiceStatus
from links.opens import OpenRecorder
from links.partial import balance_of
from payments import abandon, brakes, checkout, documents, payers
from payments.gateway import GatewayError, GatewayUnavailable, StripeGateway
from payments.models import Payment, PaymentStatus
from payments.page_reader import PageReader, PageRows, PayPage, Receipt, latest_payment_id, load_pay_page
from plumbing.i18n import N_, format_money, normalize_locale
from plumbing.rendering import pages, read_logo
from plumbing.settings import Settings
from plumbing.signing import TokenClaims, TokenExpired, TokenInvalid, pay_signer, verify_signer
from plumbing.web import client_key, csrf_token, csrf_valid, is_https, posted_from_our_pages, request_locale, small_form
from views import cards as card_views
from views import colleague as colleague_views
from views.errors import (
    AUTHENTICATION_STOPPED,
    JSON_ERROR,
    NOT_ABANDONED,
    BadForm,
    CrossOrigin,
    ExpiredLink,
    InvalidLink,
    NoReceipt,
    OpenFromEmail,
    TooManyAttempts,
    VerificationGone,
    card_failure_message,
)
from views.page_cache import FAST_ROWS, page_cache_of
from views.render import render_page

log = logging.getLogger("paylink.pages")
SETUP_INTENT_ID = re.compile(r"seti_[A-Za-z0-9]{1,250}")
LINK_HEX = re.compile(r"[0-9a-f]{32}")
LINK_COOKIE_PREFIX = "pl_"
# The cookie outlives its token by a day, so that a page left open past the link's expiry still
# offers "email me a new link" instead of "open the link from your email".
LINK_COOKIE_GRACE = timedelta(days=1)


class PageServices(Protocol):
    """What these views use of the container (services.Services provides it)."""

    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    readers: async_sessionmaker[AsyncSession]
    gateway: StripeGateway
    pages: PageReader
    replica_pages: PageReader  # `pages` on DATABASE_READ_URL, if set (see _page_reader)
    opens: OpenRecorder
    outbox_wakeup: asyncio.Event


def services_of(request: Request) -> PageServices:
    return request.state.services  # type: ignore[no-any-return]


# --- which link a request is about: the token in the address, or the link's cookie ----------------


@dataclass(frozen=True)
class LinkAccess:
    link_id: uuid.UUID
    token: str  # verified: ours, for this link
    expires_at: datetime
    path: str  # where the link's page and forms live: /pay/l/<hex> (or /pay/<token> for an expired token)
    from_address: bool = False  # the token came in the URL: hand it over to the cookie on the answer
    expired: bool = False  # a genuine token whose time is up (only for routes that accept one: `expired_ok`)


def link_path(link_id: uuid.UUID) -> str:
    return f"/pay/l/{link_id.hex}"


def link_cookie_name(link_id: uuid.UUID) -> str:
    return f"{LINK_COOKIE_PREFIX}{link_id.hex}"


def _expired(request: Request, settings: Settings, access: LinkAccess) -> ExpiredLink:
    """The expired page of a genuine token; its handler shows the receipt instead when the invoice
    has one (views/errors.py), so that an old link (the receipt email's, say) still shows it."""
    return ExpiredLink(
        receipt_page=lambda page, receipt: render_pay_state(request, access, page, receipt=receipt),
        pay_path=access.path,
        csrf=csrf_token(request, settings, access.link_id),
        link_id=access.link_id,
    )


def _token_access(request: Request, *, expired_ok: bool = False) -> LinkAccess:
    """The link of /pay/<token>/…; a bad token raises before any database query, an expired one
    shows the expired page, or the receipt of a paid invoice (unless `expired_ok`: asking for a fresh
    link, or a document, whose handler decides)."""
    settings = services_of(request).settings
    token = request.path_params["token"]
    try:
        claims = pay_signer(settings).verify(token)
    except TokenExpired as expired:
        access = LinkAccess(expired.subject_id, token, expired.expired_at, f"/pay/{token}", expired=True)
        if not expired_ok:
            raise _expired(request, settings, access) from None
        return access
    except TokenInvalid:
        raise InvalidLink() from None
    return LinkAccess(claims.subject_id, token, claims.expires_at, link_path(claims.subject_id), from_address=True)


def _cookie_access(request: Request, *, expired_ok: bool = False) -> LinkAccess:
    """The link of /pay/l/<hex>/…, when this browser holds its token in the link's cookie."""
    settings = services_of(request).settings
    link_hex = request.path_params["link_hex"]
    token = request.cookies.get(f"{LINK_COOKIE_PREFIX}{link_hex}") if LINK_HEX.fullmatch(link_hex) else None
    if not token:
        raise OpenFromEmail()
    try:
        claims: TokenClaims | TokenExpired = pay_signer(settings).verify(token)
    except TokenExpired as expired:
        claims = expired
    except TokenInvalid:
        raise OpenFromEmail() from None
    if claims.subject_id.hex != link_hex:  # a valid token, but for another link
        raise OpenFromEmail()
    if isinstance(claims, TokenExpired):
        access = LinkAccess(claims.subject_id, token, claims.expired_at, link_path(claims.subject_id), expired=True)
        if not expired_ok:
            raise _expired(request, settings, access)
        return access
    return LinkAccess(claims.subject_id, token, claims.expires_at, link_path(claims.subject_id))


def _hand_over(response: Response, settings: Settings, access: LinkAccess) -> None:
    """Put the link's token into its cookie (the token in the address is then no longer needed)."""
    lifetime = access.expires_at - datetime.now(UTC) + LINK_COOKIE_GRACE
    response.set_cookie(
        link_cookie_name(access.link_id),
        access.token,
        max_age=max(int(lifetime.total_seconds()), 0),
        path=access.path,
        secure=is_https(settings),
        httponly=True,
        samesite="lax",
    )


# --- the read replica (DATABASE_READ_URL): a page never shows "pay" because the replica lags --------
#
# A form that may change a link's money state (pay, check status, and every other POST under the link)
# writes on the primary, and its answer sets a short-lived cookie scoped to the link's path: while the
# browser holds it, its reads of that link (the page, the status poll) go to the primary too. It works
# across workers and machines (the browser carries it) and needs nothing shared. Every other GET reads
# the replica. A forged cookie only moves that browser's reads to the primary.

PRIMARY_COOKIE = "pl_primary"
PRIMARY_READ_SECONDS = 120  # far longer than a healthy replica lags


def _read_primary_next(response: Response, app: PageServices, access: LinkAccess) -> None:
    if app.replica_pages is not app.pages:
        secure = is_https(app.settings)
        path = link_path(access.link_id)
        response.set_cookie(PRIMARY_COOKIE, "1", max_age=PRIMARY_READ_SECONDS, path=path, secure=secure, httponly=True, samesite="lax")


def _page_reader(request: Request) -> PageReader:
    """The replica for a GET, the primary for a POST and right after this browser posted a form of the link."""
    app = services_of(request)
    if request.method in ("GET", "HEAD") and PRIMARY_COOKIE not in request.cookies:
        return app.replica_pages
    return app.pages


Handler = Callable[[Request, LinkAccess], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


def _endpoint(
    handler: Handler,
    access_of: Callable[..., LinkAccess],
    *,
    expired_ok: bool = False,
    json_error: str | None = None,
    json_if_asked: bool = False,
) -> Endpoint:
    """An endpoint that finds the link (token or cookie), then runs `handler`. Errors answer as pages,
    or in JSON with `json_error` (always, or only when the client asks for JSON: `json_if_asked`)."""

    async def endpoint(request: Request) -> Response:
        if json_error and (not json_if_asked or "application/json" in request.headers.get("accept", "")):
            request.scope[JSON_ERROR] = json_error
        access = access_of(request, expired_ok=expired_ok)
        try:
            response = await handler(request, access)
        except brakes.TooManyAttempts as exc:
            raise TooManyAttempts(exc.retry_after_seconds) from None
        if access.from_address:
            _hand_over(response, services_of(request).settings, access)
        if request.method == "POST":
            _read_primary_next(response, services_of(request), access)
        return response

    endpoint.__name__ = handler.__name__
    return endpoint


def _link_routes(
    suffix: str,
    handler: Handler,
    methods: list[str],
    name: str,
    *,
    expired_ok: bool = False,
    json_error: str | None = None,
    json_if_asked: bool = False,
) -> tuple[Route, Route]:
    """The route under /pay/l/<link id hex> (the cookie) and the same under /pay/<token> (old tabs)."""
    options: dict[str, Any] = {"expired_ok": expired_ok, "json_error": json_error, "json_if_asked": json_if_asked}
    return (
        Route(f"/pay/l/{{link_hex}}{suffix}", _endpoint(handler, _cookie_access, **options), methods=methods, name=f"{name}_l"),
        Route(f"/pay/{{token}}{suffix}", _endpoint(handler, _token_access, **options), methods=methods, name=name),
    )


# --- checks shared by every POST --------------------------------------------------------------------


async def checked_form(request: Request, subject_id: uuid.UUID) -> dict[str, str]:
    """The posted form, after checking where it came from (403), the client address's POST brake
    (429), its size and its CSRF token, bound to this link (or address) and to this browser (400)."""
    app = services_of(request)
    if not posted_from_our_pages(request, app.settings.base_url):
        raise CrossOrigin()
    try:
        await brakes.take(app.sessions, app.settings, brakes.posts_per_client(app.settings, client_key(request, app.settings)))
    except brakes.TooManyAttempts as exc:
        raise TooManyAttempts(exc.retry_after_seconds) from None
    form = await small_form(request)
    if form is None or not csrf_valid(request, app.settings, subject_id, form.get("csrf")):
        raise BadForm()
    return form


async def _read_page(request: Request, link_id: uuid.UUID) -> tuple[PayPage, Receipt | None]:
    page, receipt = await _page_reader(request).pay_page(link_id)
    if page is None:
        raise InvalidLink()
    return page, receipt


# --- GET /pay/{token} (the handoff), GET /pay/l/{link} (the page) and the page's states -------------


async def hand_off(request: Request, access: LinkAccess) -> Response:
    """GET /pay/{token}: the token goes into the link's cookie (see `_endpoint`), the browser to the page."""
    query = request.url.query
    return RedirectResponse(f"{access.path}?{query}" if query else access.path, status_code=303)


async def pay_page(request: Request, access: LinkAccess) -> Response:
    """The hot path: one read, then the page this data renders to, rendered once per state and
    language (views/page_cache.py: the key is the data just read, so it is never stale)."""
    rows: PageRows | None = request.scope.get(FAST_ROWS)
    if rows is not None:
        # The hot path read these rows for this link and keys the page by them: render the page of
        # these very rows (a read now could see a later state: its page would be kept under their key).
        page, receipt = _page_reader(request).page_of(rows), None
        if page.link.id != access.link_id:
            raise InvalidLink()
    else:
        page, receipt = await _read_page(request, access.link_id)
    if request.method == "GET":
        services_of(request).opens.record(page.link.id)
    locale = request_locale(request, page.customer.locale, services_of(request).settings.default_locale)
    render = functools.partial(render_pay_state, request, access, page, receipt=receipt)
    return page_cache_of(request).answer(request, (access.path, locale, page, receipt), render)


def _lines_context(page: PayPage) -> dict[str, Any]:
    """The invoice's lines and totals (links/lines.py), as the page shows them."""
    invoice = page.invoice
    lines = lines_of(invoice.line_items, description=invoice.description, amount_due=invoice.amount_due)
    return {"lines": lines, "sums": totals(lines)}


def render_pay_state(
    request: Request,
    access: LinkAccess,
    page: PayPage,
    *,
    receipt: Receipt | None = None,
    error: str | None = None,
    error_card: str | None = None,
    avoid_card: str | None = None,
    refusal: checkout.PaymentRefused | None = None,
    typed_amount: str | None = None,
    status_code: int = 200,
) -> Response:
    """The page for the link's state: void, receipt, withdrawn, confirming, or the pay form.

    A paid invoice's link always shows the receipt, also when finance withdrew the link afterwards
    (the receipt email links to it). `error` is a message to show (a translatable msgid; with
    `error_card`, the card it names); `avoid_card` is a card that just failed: another is preselected.
    `refusal`: a request refused before anything reached the card (an amount outside the rules), told
    in the page's language with `typed_amount` (what the customer wrote) back in its field."""
    settings = services_of(request).settings
    locale = request_locale(request, page.customer.locale, settings.default_locale)
    invoice = page.invoice
    if refusal is not None:
        error = _refusal(locale, refusal)
    context: dict[str, Any] = {
        "pay_path": access.path,
        "invoice": invoice,
        "customer": page.customer,
        "link": page.link,
        "options": page.options,  # balance, part payments, pay-all, what was paid (payments/page_reader.PayOptions)
        **_lines_context(page),
    }
    if invoice.status == InvoiceStatus.VOID:  # before "revoked": voiding also revokes the links
        return render_page(request, "void.html", locale=locale, status_code=410, **context)
    if invoice.status in InvoiceStatus.HAS_RECEIPT:  # before "revoked": the receipt outlives the link
        brand, last4, paid_at = receipt or (None, None, None)
        if page.link.recipient_email is not None:  # a colleague's link never shows which card the customer paid with
            brand = last4 = None
        return render_page(request, "paid.html", locale=locale, brand=brand, last4=last4, paid_at=paid_at or invoice.paid_at, **context)
    if page.link.revoked_at is not None:
        return render_page(request, "revoked.html", locale=locale, status_code=410, **context)
    live = page.live_payment
    if invoice.status == InvoiceStatus.PROCESSING or (live is not None and live.status in PaymentStatus.IN_FLIGHT):
        csrf = csrf_token(request, settings, page.link.id)
        return render_page(request, "processing.html", locale=locale, charging=_charging(page), csrf=csrf, **context)
    return render_page(
        request,
        "pay.html",
        locale=locale,
        status_code=status_code,
        cards=page.cards if payers.uses_saved_cards(page.link) else [],  # a colleague's link: never the customer's cards
        csrf=csrf_token(request, settings, page.link.id),
        needs_action=live is not None and live.status == PaymentStatus.REQUIRES_ACTION,
        error=error,
        error_card=error_card,
        refused=refusal is not None,
        typed_amount=typed_amount if refusal is not None else None,
        chosen_card=next((c.payment_method_id for c in page.cards if c.payment_method_id != avoid_card), None),
        publishable_key=settings.stripe_publishable_key,
        stripe_js_url=settings.stripe_js_url,
        **context,
    )


async def _remember_locale(request: Request, access: LinkAccess) -> None:
    """Keep the language this customer reads the page in for their emails, if finance set none (only
    when it is not the default: nothing to write then)."""
    settings = services_of(request).settings
    locale = request_locale(request, None, settings.default_locale)
    if locale != normalize_locale(settings.default_locale):
        async with services_of(request).sessions.begin() as session:
            await customers.remember_locale(session, settings, access.link_id, locale)


def _charging(page: PayPage) -> int:
    """What the live attempt charges (a part, the balance or a pay-all total), else the balance."""
    live = page.live_payment
    return live.amount if live is not None else balance_of(page.invoice.amount_due, page.invoice.amount_paid)


async def _show(
    request: Request,
    access: LinkAccess,
    *,
    error: str | None = None,
    status_code: int,
    payment_id: uuid.UUID | None = None,
    refusal: checkout.PaymentRefused | None = None,
    typed_amount: str | None = None,
) -> Response:
    """The page again, with a message (a declined card, a refused request).

    A failed payment (402; `payment_id`, else the link's latest attempt) is told in our words from its
    failure code, naming the card, never in Stripe's raw text (kept in the database for finance), and
    another card is preselected."""
    if status_code == 402:
        failed = await _attempt(request, access, payment_id)
        code = failed.failure_code if failed is not None and failed.status == PaymentStatus.FAILED else None
        return await _show_attempt(request, access, failed, card_failure_message(code), status_code)
    page, _ = await _read_page(request, access.link_id)
    return render_pay_state(request, access, page, error=error, refusal=refusal, typed_amount=typed_amount, status_code=status_code)


async def _attempt(request: Request, access: LinkAccess, payment_id: uuid.UUID | None) -> Payment | None:
    """A payment attempt of the link's invoice (by default its latest), read from the primary."""
    async with services_of(request).sessions() as session:
        if payment_id is None:
            payment_id = await latest_payment_id(session, access.link_id)
        return await session.get(Payment, payment_id) if payment_id is not None else None


async def _show_attempt(request: Request, access: LinkAccess, attempt: Payment | None, message: str, status_code: int) -> Response:
    """The page with `message` about `attempt`'s card (named in it), and another card preselected."""
    page, _ = await _read_page(request, access.link_id)
    card = f"{(attempt.brand or 'card').title()} •••• {attempt.last4}" if attempt is not None and attempt.last4 else None
    avoid = attempt.stripe_payment_method_id if attempt is not None else None
    return render_pay_state(request, access, page, error=message, error_card=card, avoid_card=avoid, status_code=status_code)


async def _authenticate(request: Request, access: LinkAccess, client_secret: str) -> Response:
    """The 3-D Secure page: Stripe.js finishes the bank's check, then the page posts to /status."""
    app = services_of(request)
    async with app.readers() as session:
        page = await load_pay_page(session, access.link_id)
    if page is None:
        raise InvalidLink()
    return render_page(
        request,
        "authenticate.html",
        locale=request_locale(request, page.customer.locale, app.settings.default_locale),
        pay_path=access.path,
        invoice=page.invoice,
        customer=page.customer,
        **_lines_context(page),
        charging=_charging(page),  # what the bank is asked to confirm: this attempt's amount
        client_secret=client_secret,
        publishable_key=app.settings.stripe_publishable_key,
        stripe_js_url=app.settings.stripe_js_url,
        csrf=csrf_token(request, app.settings, access.link_id),
    )


# --- POST …: pay ---------------------------------------------------------------------------------------


async def pay(request: Request, access: LinkAccess) -> Response:
    form = await checked_form(request, access.link_id)
    app = services_of(request)
    await _remember_locale(request, access)  # before the charge: the receipt email follows in this language
    client = client_key(request, app.settings)
    setup_intent = form.get("setup_intent", "")
    try:
        choice = _pay_choice(form)  # what to pay: the balance, a part (`amount`), or every open invoice (`scope=all`)
        if setup_intent:
            if not SETUP_INTENT_ID.fullmatch(setup_intent):
                return await _show(request, access, error=checkout.NEW_CARD_NOT_CONFIRMED, status_code=400)
            outcome = await checkout.pay_with_new_card(
                app.sessions,
                app.gateway,
                app.settings,
                link_id=access.link_id,
                setup_intent_id=setup_intent,
                save=form.get("save_card") == "1",
                client=client,
                **choice,
            )
        else:
            outcome = await checkout.pay_with_saved_profile(
                app.sessions,
                app.gateway,
                app.settings,
                link_id=access.link_id,
                payment_method_id=form.get("payment_method", ""),
                client=client,
                **choice,
            )
    except checkout.PaymentRefused as exc:
        return await _show(request, access, refusal=exc, typed_amount=form.get("amount", "").strip()[:16] or None, status_code=409)
    except GatewayUnavailable:
        return await _show(request, access, error=checkout.GATEWAY_DOWN, status_code=503)
    except GatewayError:
        return await _show(request, access, error=checkout.NEW_CARD_NOT_CONFIRMED, status_code=400)
    app.outbox_wakeup.set()
    log.info("payment.attempt payment=%s status=%s", outcome.payment_id, outcome.status)
    if outcome.status == PaymentStatus.REQUIRES_ACTION and outcome.client_secret:
        return await _authenticate(request, access, outcome.client_secret)
    if outcome.status == PaymentStatus.FAILED:
        return await _show(request, access, error=outcome.error_message or checkout.NOT_COMPLETED, status_code=402)
    return RedirectResponse(access.path, status_code=303)


def _pay_choice(form: Any) -> dict[str, Any]:
    """The pay form's choice (templates/_pay_options.html): `pay_choice` full (or none: the main
    button) | part | all, with `amount` (major units) for a part and `all_total` (minor units, the
    total the page showed) for all. A bare `amount` from a form without the choice (`offers_part`) is a
    part too. An amount typed on our form and then the main button (or Enter) is refused as unclear.
    The server checks everything else (payments/checkout.py)."""
    pay_choice = form.get("pay_choice", "")
    amount = form.get("amount", "").strip()
    if pay_choice == "all" or form.get("scope") == "all":
        shown = form.get("all_total", "")
        return {"scope": checkout.SCOPE_ALL, "expected_total": int(shown) if re.fullmatch(r"[0-9]{1,12}", shown) else None}
    if pay_choice == "part":
        return {"amount": amount[:64] or "?"}  # nothing typed: the rules' parser says how to write it
    if amount and form.get("offers_part"):
        raise checkout.PaymentRefused(AMOUNT_UNCLEAR)
    return {"amount": amount[:64]} if amount and not pay_choice else {}


AMOUNT_UNCLEAR = N_("You typed an amount: press “Pay this amount” to pay it, or clear it to pay the whole balance.")


def _refusal(locale: str, exc: checkout.PaymentRefused) -> str:
    """A refusal in the page's language, with its amounts formatted for it (a translated message,
    which the page's own `_()` leaves as it is)."""
    params: dict[str, str] = {k: format_money(v, exc.currency or "eur", locale) for k, v in exc.amounts.items()}
    return pages.gettext(locale, str(exc), **params, **exc.texts).replace("%", "%%")


async def start_new_card(request: Request, access: LinkAccess) -> Response:
    """POST …/setup: a SetupIntent client secret for Stripe's card element (JSON)."""
    await checked_form(request, access.link_id)
    app = services_of(request)
    try:
        client_secret = await checkout.start_new_card(
            app.sessions, app.gateway, app.settings, link_id=access.link_id, client=client_key(request, app.settings)
        )
    except checkout.PaymentRefused as exc:
        return JSONResponse({"error": _translated(request, str(exc))}, status_code=409)
    except GatewayError:
        return JSONResponse({"error": _translated(request, checkout.GATEWAY_DOWN)}, status_code=503)
    return JSONResponse({"client_secret": client_secret})


def _translated(request: Request, message: str) -> str:
    settings = services_of(request).settings
    return pages.gettext(request_locale(request, None, settings.default_locale), message)


async def refresh_status(request: Request, access: LinkAccess) -> Response:
    """POST …/status: ask Stripe about the invoice's latest payment (after 3-D Secure, or while it is
    processing) and show where it stands. With `another_card=1` (the customer gives up on the bank's
    check to pay with another card): the waiting attempt is canceled first (payments/abandon.py)."""
    form = await checked_form(request, access.link_id)
    app = services_of(request)
    if form.get("another_card") == "1":
        return await _pay_with_another_card(request, access)
    async with app.readers() as session:
        payment_id = await latest_payment_id(session, access.link_id)
    if payment_id is not None:
        outcome = await checkout.settle_payment(app.sessions, app.gateway, app.settings, payment_id, actor="link")
        app.outbox_wakeup.set()
        if outcome.status == PaymentStatus.REQUIRES_ACTION and outcome.client_secret:
            return await _authenticate(request, access, outcome.client_secret)
        if outcome.status == PaymentStatus.FAILED:
            return await _show(request, access, error=outcome.error_message, status_code=402, payment_id=outcome.payment_id)
    return RedirectResponse(access.path, status_code=303)


async def _pay_with_another_card(request: Request, access: LinkAccess) -> Response:
    """Cancel the attempt that waits for the bank, then the pay form with another card preselected."""
    app = services_of(request)
    try:
        abandoned = await abandon.abandon_authentication(app.sessions, app.gateway, app.settings, link_id=access.link_id)
    except GatewayUnavailable:
        return await _show(request, access, error=checkout.GATEWAY_DOWN, status_code=503)
    except GatewayError:
        return await _show(request, access, error=NOT_ABANDONED, status_code=409)
    if abandoned is None or abandoned.status != PaymentStatus.CANCELED:
        return RedirectResponse(access.path, status_code=303)  # nothing waited, or it went through meanwhile
    attempt = await _attempt(request, access, abandoned.payment_id)
    return await _show_attempt(request, access, attempt, AUTHENTICATION_STOPPED, 200)


async def status_json(request: Request, access: LinkAccess) -> Response:
    """GET …/status: where the invoice stands, from our database (the processing page polls)."""
    page, _ = await _read_page(request, access.link_id)  # the same cheap read as the page
    live = page.live_payment
    return JSONResponse({"invoice_status": page.invoice.status, "payment_status": live.status if live else None})


async def request_fresh_link(request: Request, access: LinkAccess) -> Response:
    """POST …/renew from the expired page: a fresh link goes to the address on file.

    The answer is the same whether or not an email went out (rate limit, paid, unknown)."""
    app = services_of(request)
    await checked_form(request, access.link_id)
    await _remember_locale(request, access)
    async with app.sessions.begin() as session:
        await fresh_links.request_fresh_link(session, app.settings, access.link_id)
    app.outbox_wakeup.set()
    # In the language of the page it was asked from (the customer's stored one; a colleague's own).
    page, _ = await _read_page(request, access.link_id)
    stored = page.customer.locale if page.link.recipient_email is None else None
    return render_page(request, "renewed.html", locale=request_locale(request, stored, app.settings.default_locale), pay_path=access.path)


# --- GET …/invoice.pdf, …/receipt.pdf, /brand/logo, /favicon.ico ------------------------------------


async def invoice_pdf(request: Request, access: LinkAccess) -> Response:
    return await _document(request, access, "invoice")


RECEIPT_NUMBER = re.compile(r"[A-Za-z0-9-]{1,32}")  # ?number= of …/receipt.pdf (RCT-000123)


async def receipt_pdf(request: Request, access: LinkAccess) -> Response:
    """A paid invoice's receipt (its latest payment's); with `?number=RCT-…` that receipt of the invoice,
    paid or not yet in full (a part payment's, linked from the page's list of what was paid)."""
    number = request.query_params.get("number")
    if number is not None and not RECEIPT_NUMBER.fullmatch(number):
        number = ""  # no receipt has it: the "no receipt" page, as for a number of another invoice
    return await _document(request, access, "receipt", number=number)


async def _document(request: Request, access: LinkAccess, kind: documents.DocumentKind, *, number: str | None = None) -> Response:
    """The invoice or receipt as a PDF: the same link checks as the page; a void invoice, a withdrawn
    or an expired link shows its page instead, as the page itself would, except that a paid invoice's
    documents are served however old or withdrawn the link (its receipt email links here). A part
    payment's receipt (`number`) is there while the rest is still due, under the same checks."""
    app = services_of(request)
    async with app.readers() as session:
        document = await documents.link_document(session, access.link_id, receipt_number=number)
    if document is None or document.link is None:
        raise InvalidLink()
    invoice = document.invoice
    if invoice.status not in InvoiceStatus.HAS_RECEIPT:  # a paid invoice's documents outlive its links
        if access.expired:
            raise _expired(request, app.settings, access)
        if invoice.status == InvoiceStatus.VOID or document.link.revoked_at is not None:
            page, receipt = await _read_page(request, access.link_id)
            return render_pay_state(request, access, page, receipt=receipt)
    if kind == "receipt" and (document.receipt is None or (number is None and invoice.status not in InvoiceStatus.HAS_RECEIPT)):
        raise NoReceipt(pay_path=access.path, invoice=invoice)
    if document.link.recipient_email is not None and document.receipt is not None:
        # A colleague's link never shows which card the customer paid with (the receipt's "Paid with").
        document = dataclasses.replace(document, receipt=dataclasses.replace(document.receipt, brand=None, last4=None))
    locale = request_locale(request, document.customer.locale, app.settings.default_locale)
    pdf = await documents.render_document(app.settings, kind, document, locale)
    name = documents.filename(kind, document, numbered=number is not None)
    return Response(pdf, media_type=documents.PDF, headers={"Content-Disposition": f'attachment; filename="{name}"'})


LOGO_MAX_AGE = 7 * 24 * 3600
# The default favicon: the brand colour's square with a white "P" (SVG; every current browser takes it).
DEFAULT_ICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="6" fill="{color}"/>'
    '<path d="M11 8h7a6 6 0 0 1 0 12h-3v5h-4zm4 4v4h3a2 2 0 0 0 0-4z" fill="#fff"/></svg>'
)


async def brand_logo(request: Request) -> Response:
    """GET /brand/logo: MERCHANT_LOGO_PATH from our own origin (no third party sees the customer)."""
    settings = services_of(request).settings
    if settings.merchant_logo_path is None:
        raise InvalidLink()
    logo = read_logo(settings.merchant_logo_path)
    return Response(logo.data, media_type=logo.content_type, headers=_long_cache())


async def favicon(request: Request) -> Response:
    """GET /favicon.ico: the logo, or a default icon in the brand colour."""
    settings = services_of(request).settings
    if settings.merchant_logo_path is not None:
        logo = read_logo(settings.merchant_logo_path)
        return Response(logo.data, media_type=logo.content_type, headers=_long_cache())
    icon = DEFAULT_ICON.format(color=settings.merchant_brand_color)
    return Response(icon, media_type="image/svg+xml", headers=_long_cache())


def _long_cache() -> dict[str, str]:
    # Not a customer's data: cacheable (the security middleware keeps an explicit Cache-Control).
    return {"Cache-Control": f"public, max-age={LOGO_MAX_AGE}"}


# --- /verify/{token} ------------------------------------------------------------------------------------


def _verification_id(request: Request) -> uuid.UUID:
    try:
        return verify_signer(services_of(request).settings).verify(request.path_params["token"]).subject_id
    except TokenExpired:
        raise VerificationGone("expired") from None
    except TokenInvalid:
        raise InvalidLink() from None


async def verify_page(request: Request) -> Response:
    """GET /verify/{token}: a button to confirm (GET changes nothing: mail scanners prefetch links)."""
    verification_id = _verification_id(request)
    app = services_of(request)
    async with app.readers() as session:
        customer = await verification.find_verification(session, verification_id)
    if customer is None:
        raise VerificationGone("replaced")
    locale = request_locale(request, customer.locale, app.settings.default_locale)
    state = "done" if customer.email_verified_at else "confirm"
    return render_page(
        request, "verify.html", locale=locale, state=state, customer=customer, csrf=csrf_token(request, app.settings, verification_id)
    )


async def confirm_verification(request: Request) -> Response:
    """POST /verify/{token}: the address is confirmed; invoices held for it are sent."""
    verification_id = _verification_id(request)
    await checked_form(request, verification_id)
    app = services_of(request)
    async with app.sessions.begin() as session:
        customer = await verification.confirm_verification(session, app.settings, verification_id)
    if customer is None:
        raise VerificationGone("replaced")
    app.outbox_wakeup.set()
    locale = request_locale(request, customer.locale, app.settings.default_locale)
    return render_page(request, "verify.html", locale=locale, state="done", customer=customer)


# /pay/l/… first: "/pay/l/<hex>" must never be taken for "/pay/<token>/<action>".
_pay = _link_routes("", pay, ["POST"], "pay")
_setup = _link_routes("/setup", start_new_card, ["POST"], "pay_new_card", json_error="invalid_request", json_if_asked=True)
_refresh = _link_routes("/status", refresh_status, ["POST"], "pay_status_refresh")
_status = _link_routes("/status", status_json, ["GET"], "pay_status", json_error="invalid_link")
_renew = _link_routes("/renew", request_fresh_link, ["POST"], "pay_renew", expired_ok=True)
_invoice_pdf = _link_routes("/invoice.pdf", invoice_pdf, ["GET", "HEAD"], "pay_invoice_pdf", expired_ok=True)  # see _document
_receipt_pdf = _link_routes("/receipt.pdf", receipt_pdf, ["GET", "HEAD"], "pay_receipt_pdf", expired_ok=True)
_colleague = _link_routes("/colleague", colleague_views.send_to_colleague, ["POST"], "pay_colleague")
_card_remove = _link_routes("/cards/remove", card_views.remove_saved_card, ["POST"], "pay_card_remove")
_card_default = _link_routes("/cards/default", card_views.make_default_card, ["POST"], "pay_card_default")
_LINK_ROUTES = (_pay, _setup, _refresh, _status, _renew, _invoice_pdf, _receipt_pdf, _colleague, _card_remove, _card_default)

routes = [
    Route("/pay/l/{link_hex}", _endpoint(pay_page, _cookie_access), methods=["GET", "HEAD"], name="pay_page"),
    *(pair[0] for pair in _LINK_ROUTES),
    Route("/pay/{token}", _endpoint(hand_off, _token_access), methods=["GET", "HEAD"], name="pay_handoff"),
    *(pair[1] for pair in _LINK_ROUTES),
    Route("/verify/{token}", verify_page, methods=["GET", "HEAD"], name="verify_page"),
    Route("/verify/{token}", confirm_verification, methods=["POST"], name="verify_confirm"),
    Route("/brand/logo", brand_logo, methods=["GET", "HEAD"], name="brand_logo"),
    Route("/favicon.ico", favicon, methods=["GET", "HEAD"], name="favicon"),
]
