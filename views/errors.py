"""Bad links, expired links and bad forms are exceptions; one handler renders each as its page.

Views raise; they never return "a page or an error" for the caller to check.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from views.render import render_page


class PageError(Exception):
    """A request the page answers with another page (4xx): which template, what status, what context."""

    template = "error.html"
    status_code = 400

    def __init__(self, **context: Any) -> None:
        super().__init__(self.template)
        self.context = context


class InvalidLink(PageError):
    """Forged, tampered, truncated, retired or unknown: "open the link from your email"."""

    template = "invalid_link.html"
    status_code = 404


class ExpiredLink(PageError):
    """Ours, but its time is up: the page offers to email a fresh link."""

    template = "expired.html"
    status_code = 410


class BadForm(PageError):
    """A missing or stale CSRF token, a cross-site post, an oversized or malformed body."""

    template = "error.html"
    status_code = 400

    def __init__(self) -> None:
        super().__init__(reason="form")


class VerificationGone(PageError):
    """A verification link that expired, or was replaced by a newer request."""

    template = "verify.html"
    status_code = 410

    def __init__(self, state: str) -> None:
        super().__init__(state=state)


async def render_page_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PageError)
    json_error = request.scope.get("paylink.json")  # set by the routes that answer in JSON
    if json_error:
        return JSONResponse({"error": json_error}, status_code=exc.status_code)
    return render_page(request, exc.template, status_code=exc.status_code, **exc.context)
