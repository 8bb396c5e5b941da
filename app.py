"""The Starlette application: routes, middleware and a lifespan that owns the engine and clients.

`uvicorn app:app` serves it; `create_app(settings)` builds one for tests and the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from db import create_engine, create_session_factory, is_sqlite, migrate, reader_engine
from emails.worker import run_forever
from i18n import negotiate_locale
from links.opens import OpenRecorder
from links.pagereader import PageReader
from links.views import routes as link_routes
from payments.gateway import StripeGateway
from payments.views import routes as payment_routes
from payments.webhooks import WebhookWriter
from rendering import emails, pages
from settings import ConfigError, Settings
from web import AccessLog, BodySizeLimit, Paylink, SecurityHeaders, origin_of

ROOT = Path(__file__).resolve().parent
MAX_REQUEST_BYTES = 512 * 1024  # the largest Stripe event is far smaller; our forms are tiny
log = logging.getLogger("paylink")


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


def _error_page(request: Request, status_code: int) -> Response:
    locale = negotiate_locale(request.headers.get("accept-language"))
    merchant = request.app.state.merchant_name
    html = pages.render(
        "error.html",
        locale,
        request=request,
        csp_nonce=request.scope.get("csp_nonce", ""),
        merchant=merchant,
        languages={},
        reason=str(status_code),
    )
    return Response(html, status_code=status_code, media_type="text/html")


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error_page(request, exc.status_code)


async def server_error(request: Request, exc: Exception) -> Response:
    # The traceback goes to the log; the customer sees a friendly page that leaks nothing.
    return _error_page(request, 500)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Paylink]]:
        if is_sqlite(settings.database_url):
            await migrate(settings.database_url)  # an embedded database migrates itself on start
        pages.warm()  # templates are compiled once, before the first customer arrives
        emails.warm()
        engine = create_engine(settings.database_url)
        sessions = create_session_factory(engine)
        readers = create_session_factory(reader_engine(engine))
        context = Paylink(
            settings=settings,
            engine=engine,
            sessions=sessions,
            readers=readers,
            gateway=StripeGateway(settings),
            opens=OpenRecorder(sessions),
            pages=PageReader(settings.database_url, readers),
            webhooks=WebhookWriter(settings, sessions),
        )
        context.webhooks.start()
        opens = asyncio.create_task(context.opens.run(), name="opens")
        outbox_stop = asyncio.Event()
        tasks = [opens]
        if settings.outbox_in_process:
            tasks.append(asyncio.create_task(run_forever(sessions, settings, context.outbox_wakeup, outbox_stop), name="outbox"))
        try:
            yield {"paylink": context}
        finally:
            # Ask the background work to finish (the last opens are written, the current email
            # is recorded), and only cancel what does not stop in time.
            context.opens.stop()
            outbox_stop.set()
            context.outbox_wakeup.set()
            _, late = await asyncio.wait(tasks, timeout=10)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await context.webhooks.close()
            context.pages.close()
            await engine.dispose()

    stripe_origins = [origin_of(settings.stripe_js_url)]
    if settings.stripe_api_base:
        stripe_origins.append(origin_of(settings.stripe_api_base))
    else:
        stripe_origins += ["https://api.stripe.com", "https://hooks.stripe.com"]
    app = Starlette(
        routes=[
            *link_routes,
            *payment_routes,
            Route("/health", health),
            Mount("/static", app=StaticFiles(directory=ROOT / "static"), name="static"),
        ],
        middleware=[
            Middleware(AccessLog),
            Middleware(BodySizeLimit, max_bytes=MAX_REQUEST_BYTES),
            Middleware(SecurityHeaders, stripe_origins=stripe_origins, hsts=settings.base_url.startswith("https://")),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.merchant_name = settings.merchant_name
    return app


def _app_from_env() -> Starlette:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return create_app()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def __getattr__(name: str) -> Starlette:
    # `uvicorn app:app` reads the environment only when the app is asked for, so importing this
    # module (tests, tools) needs no configuration.
    if name == "app":
        return _app_from_env()
    raise AttributeError(name)
