"""POST …/colleague: the customer sends the invoice to a colleague (issue 13, links/colleagues.py).

The answer is the same page whether or not an email went out (a limit reached, a link no longer
live): it tells nothing about the address or the limits. A malformed address is the customer's typo
and is shown back to fix (400). A colleague's own link cannot send the invoice on (403).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from links import colleagues
from links.errors import LinkError
from plumbing.web import csrf_token, request_locale
from views.errors import InvalidLink
from views.render import render_page


async def send_to_colleague(request: Request, access: pages.LinkAccess) -> Response:
    form = await pages.checked_form(request, access.link_id)
    app = pages.services_of(request)
    page, _ = await app.pages.pay_page(access.link_id)
    if page is None:
        raise InvalidLink()
    locale = request_locale(request, page.customer.locale, app.settings.default_locale)
    context: dict[str, Any] = {"pay_path": access.path, "invoice": page.invoice, "locale": locale}
    if colleagues.is_colleague_link(page.link):
        return render_page(request, "colleague.html", state="not_allowed", status_code=403, **context)
    entered = form.get("email", "")
    try:
        recipient = colleagues.check_recipient(entered)
    except LinkError:
        csrf = csrf_token(request, app.settings, access.link_id)
        return render_page(request, "colleague.html", state="invalid", status_code=400, entered=entered[:320], csrf=csrf, **context)
    async with app.sessions.begin() as session:
        await colleagues.send_from_page(session, app.settings, access.link_id, recipient)
    app.outbox_wakeup.set()
    return render_page(request, "colleague.html", state="sent", **context)


from views import pages  # noqa: E402  (below: views.pages imports this module for its routes)
