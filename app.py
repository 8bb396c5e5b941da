"""The web app's composition root: routes, middleware, exception handlers and a lifespan that opens
the container (services.py) once.

Run it with `uvicorn --factory app:create_app` (it reads the environment); tests and the demo call
`create_app(settings)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from payments.views import routes as webhook_routes
from plumbing import metrics
from plumbing.db import is_sqlite, migrate
from plumbing.logs import configure_logging
from plumbing.rendering import emails, pages
from plumbing.settings import ConfigError, Settings
from plumbing.web import (
    REQUEST_ID_SCOPE,
    SECURITY_HEADERS,
    AccessLog,
    BodySizeLimit,
    SecurityHeaders,
    SecurityPolicy,
    origin_of,
    templated_path,
)
from services import Services, open_services, readiness, run_worker
from views.errors import PageError, render_page_error
from views.hot_path import HotPath
from views.page_cache import PageCache
from views.pages import routes as page_routes
from views.render import render_page

ROOT = Path(__file__).resolve().parent
MAX_REQUEST_BYTES = 512 * 1024  # the largest Stripe event is far smaller; our forms are tiny
log = logging.getLogger("paylink")


async def health_live(request: Request) -> Response:
    """The process answers (GET /health/live, and GET /health as before)."""
    return JSONResponse({"status": "ok"})


async def health_ready(request: Request) -> Response:
    """The process can serve: database reachable and migrated, outbox not stuck (else 503 and why).
    This is the check a load balancer uses."""
    ready, body = await readiness(request.state.services)
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics (only routed when METRICS_TOKEN is set): needs `Authorization: Bearer <token>`."""
    services: Services = request.state.services
    token = services.settings.metrics_token
    if token is None or not metrics.bearer_ok(request.headers.get("authorization"), str(token)):
        return PlainTextResponse("unauthorized", status_code=401, headers={"WWW-Authenticate": "Bearer"})
    await services.outbox_gauges.refresh()
    # On a thread: with N workers (multiprocess mode) it reads and merges every worker's files, which
    # took long enough to show in the pages' p99 when it ran on the event loop.
    body, content_type = await asyncio.to_thread(metrics.exposition, services.outbox_gauges)
    return Response(body, media_type=content_type)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    response = render_page(request, "error.html", status_code=exc.status_code, languages={}, reason=str(exc.status_code))
    response.headers.update(exc.headers or {})  # a 405's Allow
    return response


async def server_error(request: Request, exc: Exception) -> Response:
    # The traceback goes to the log; the customer sees a friendly page that leaks nothing. Starlette
    # runs this outside the middleware, so the security headers are added here.
    response = render_page(request, "error.html", status_code=500, languages={}, reason="500")
    for name, value in request.scope.get(SECURITY_HEADERS, []):
        response.headers[name.decode()] = value.decode()
    if REQUEST_ID_SCOPE in request.scope:
        response.headers["x-request-id"] = request.scope[REQUEST_ID_SCOPE]
    return response


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up before its body arrived: nobody is there to answer, and nothing went wrong."""
    log.info("request.client_disconnected method=%s path=%s", request.method, templated_path(request.url.path))
    return Response(status_code=400)


def create_app(settings: Settings | None = None) -> Starlette:
    """The app for `settings`, or for the environment (one clear line and exit 1 if a setting is bad)."""
    own_process = settings is None  # `uvicorn --factory app:create_app`: the process is the app's alone
    if settings is None:
        try:
            settings = Settings.from_env()
        except ConfigError as exc:
            print(f"configuration error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        # Log calls only queue the record; a thread writes it (key=value text, or JSON lines).
        configure_logging(os.environ.get("LOG_LEVEL", "INFO"), settings.log_format)
    configured: Settings = settings

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Services]]:
        if is_sqlite(configured.database_url):
            await migrate(configured.database_url)  # an embedded database migrates itself on start
        pages.warm()  # templates are compiled once, before the first customer arrives
        emails.warm()
        try:
            async with open_services(configured, background=True) as services, _in_process_worker(services):
                if own_process:  # (not inside a test runner's process, which starts many apps)
                    settle_heap()
                yield {"services": services}
        finally:
            metrics.process_exited()

    stripe_origins = [origin_of(configured.stripe_js_url)]
    if configured.stripe_api_base:
        stripe_origins.append(origin_of(configured.stripe_api_base))
    else:
        stripe_origins += ["https://api.stripe.com", "https://hooks.stripe.com"]
    policy = SecurityPolicy(stripe_origins=stripe_origins, hsts=configured.base_url.startswith("https://"))
    app = Starlette(
        routes=[
            *page_routes,
            *webhook_routes,
            Route("/health", health_live),
            Route("/health/live", health_live),
            Route("/health/ready", health_ready),
            # Without METRICS_TOKEN there is no /metrics at all (404): never public by accident.
            *([Route("/metrics", metrics_endpoint)] if configured.metrics_token is not None else []),
            Mount("/static", app=StaticFiles(directory=ROOT / "static"), name="static"),
        ],
        middleware=[
            # Payday's two requests, answered from the page cache before the rest (views/hot_path.py).
            Middleware(HotPath, settings=configured, policy=policy),
            Middleware(AccessLog),
            # Outside the size limit, so that its 413 carries the security headers too.
            Middleware(SecurityHeaders, policy=policy),
            Middleware(BodySizeLimit, max_bytes=MAX_REQUEST_BYTES),
        ],
        exception_handlers={
            PageError: render_page_error,
            ClientDisconnect: client_gone,
            HTTPException: http_error,
            Exception: server_error,
        },
        lifespan=lifespan,
    )
    # Starlette would redirect /pay/l/<link>/ to a URL built from the Host header, which the client
    # chooses: a path that differs by a trailing slash is not found, like any other.
    app.router.redirect_slashes = False
    app.state.settings = configured
    app.state.page_cache = PageCache(configured)  # the pay page's renders (views/page_cache.py)
    return app


GC_YOUNG_THRESHOLD = 5_000  # Python's default is 700


def settle_heap() -> None:
    """After start-up (modules, compiled templates, engines: objects that live as long as the process),
    move everything to the permanent generation, so that the collector never walks it again: a full
    collection of that heap stalled the event loop ~100 ms now and then (the p99). Young collections
    run less often (each still about a millisecond)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


@contextlib.asynccontextmanager
async def _in_process_worker(services: Services) -> AsyncIterator[None]:
    """With OUTBOX_IN_PROCESS (the demo, the tests) the app also runs the worker's loops."""
    if not services.settings.outbox_in_process:
        yield
        return
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(services, stop, sample_usage=False), name="worker")
    try:
        yield
    finally:
        # Ask the loops to finish the email in hand, and only cancel what does not stop in time.
        stop.set()
        services.outbox_wakeup.set()
        done, _ = await asyncio.wait([task], timeout=10)
        if not done:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
