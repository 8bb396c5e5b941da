"""POST …/cards/remove and …/cards/default: the customer's saved cards, from their own pay page
(issue 13, payments/cards.py). Only the link's customer's saved cards; never from a colleague's link;
audited; Stripe first (detach, default payment method), then our profiles.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from links.models import InvoiceStatus
from payments import cards, payers
from payments.gateway import GatewayError, GatewayUnavailable
from plumbing.web import request_locale
from views.errors import InvalidLink
from views.render import render_page

CardAction = Callable[..., Awaitable[cards.CardChange]]


async def remove_saved_card(request: Request, access: pages.LinkAccess) -> Response:
    return await _change_card(request, access, cards.remove_card, "removed")


async def make_default_card(request: Request, access: pages.LinkAccess) -> Response:
    return await _change_card(request, access, cards.make_default_card, "default")


async def _change_card(request: Request, access: pages.LinkAccess, action: CardAction, done: str) -> Response:
    form = await pages.checked_form(request, access.link_id)
    app = pages.services_of(request)
    page, receipt = await app.pages.pay_page(access.link_id)
    if page is None:
        raise InvalidLink()
    if page.link.revoked_at is not None or page.invoice.status == InvoiceStatus.VOID:
        return pages.render_pay_state(request, access, page, receipt=receipt)  # the revoked or void page
    locale = request_locale(request, page.customer.locale, app.settings.default_locale)
    context: dict[str, Any] = {"pay_path": access.path, "locale": locale}
    if not payers.uses_saved_cards(page.link):
        return render_page(request, "cards.html", state="not_here", status_code=403, **context)
    try:
        change = await action(app.sessions, app.gateway, page.customer.id, form.get("card", "")[:255], actor="link")
    except cards.UnknownCard:
        return render_page(request, "cards.html", state="unknown", status_code=404, **context)
    except cards.CardInUse:
        return render_page(request, "cards.html", state="in_use", status_code=409, **context)
    except GatewayUnavailable:
        return render_page(request, "cards.html", state="unavailable", status_code=503, **context)
    except GatewayError:
        return render_page(request, "cards.html", state="unavailable", status_code=502, **context)
    return render_page(request, "cards.html", state=done, card=change, **context)


from views import pages  # noqa: E402  (below: views.pages imports this module for its routes)
