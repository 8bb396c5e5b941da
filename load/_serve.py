"""Serve the real app (from the environment) or a bare Starlette app with one prebuilt page, under uvicorn.

Used by the benchmarks as a subprocess:
`python load/_serve.py --port P [--bare [--page PAGE.html] [--forged-page PAGE.html --forged-status 404]] [--profile OUT.prof]`.
One worker, uvloop + httptools when installed (uvicorn's "auto"), no access log, no Server header (as the
Procfile runs the app). SIGINT stops it cleanly, after which a cProfile dump (if asked for) is written.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
from pathlib import Path
from typing import Any

import uvicorn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def bare_app(page: Path | None, forged_page: Path | None = None, forged_status: int = 404, forged_headers: Path | None = None) -> Any:
    """Starlette with the app's route shapes and no database: the pay page (/pay/l/{link_hex}) answers with a
    prebuilt body, /pay/{token} with another (what the app answers a forged token: --forged-page), the
    webhook endpoint verifies the signature exactly as the app does (stripe SDK) and acknowledges."""
    import json
    import os

    import stripe
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    body = page.read_bytes() if page else b"<!doctype html><title>bare</title>"
    # --forged-headers: the app's own answer headers (a JSON list of [name, value]) on the forged page too,
    # to tell what those headers cost from what the app's code costs.
    extra = [(k.encode(), v.encode()) for k, v in json.loads(forged_headers.read_text())] if forged_headers else []
    extra = [(k, v) for k, v in extra if k not in (b"content-length", b"content-type", b"date", b"server")]
    forged_body = forged_page.read_bytes() if forged_page else body
    token_status = forged_status if forged_page else 200
    secret = os.environ.get("STRIPE_WEBHOOK_SECRET", "")

    async def pay_page(request: Request) -> Response:
        return HTMLResponse(body)

    async def token_page(request: Request) -> Response:
        response = HTMLResponse(forged_body, status_code=token_status)
        response.raw_headers.extend(extra)
        return response

    async def webhook(request: Request) -> Response:
        payload = await request.body()
        try:
            stripe.WebhookSignature.verify_header(payload.decode(), request.headers.get("stripe-signature", ""), secret, 300)
        except stripe.SignatureVerificationError:
            return PlainTextResponse("invalid signature", status_code=400)
        event = json.loads(payload)
        return JSONResponse({"received": True, "id": event["id"]})

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/pay/l/{link_hex}", pay_page, methods=["GET", "HEAD"]),
            Route("/pay/{token}", token_page, methods=["GET", "HEAD"]),
            Route("/webhooks/stripe", webhook, methods=["POST"]),
            Route("/health", health),
        ]
    )


def memoise_pay_page_read() -> None:
    """What-if for payday.py: what the pay page would serve if its read cost nothing (first read per link hits the DB)."""
    from payments import page_reader

    real = page_reader.pay_page_sync
    cache: dict[Any, Any] = {}

    def pay_page_sync(session: Any, link_id: Any) -> Any:
        if link_id not in cache:
            cache[link_id] = real(session, link_id)
        return cache[link_id]

    page_reader.pay_page_sync = pay_page_sync  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bare", action="store_true", help="serve a bare Starlette app (no database) instead of the real one")
    parser.add_argument("--page", type=Path, help="with --bare: the prebuilt page served at /pay/l/{link_hex}")
    parser.add_argument("--forged-page", type=Path, help="with --bare: the prebuilt page served at /pay/{token}")
    parser.add_argument("--forged-status", type=int, default=404, help="with --bare: the status of --forged-page (default 404)")
    parser.add_argument("--forged-headers", type=Path, help="with --bare: JSON [[name, value], ...] sent with --forged-page too")
    parser.add_argument(
        "--cached-read",
        action="store_true",
        help="what-if: the real app, but the pay page's database read is memoised per link (its cost drops to ~0)",
    )
    parser.add_argument("--profile", type=Path, help="write cProfile stats of the server's event loop thread here")
    args = parser.parse_args()
    if args.bare:
        app = bare_app(args.page, args.forged_page, args.forged_status, args.forged_headers)
    else:
        from app import create_app

        if args.cached_read:
            memoise_pay_page_read()
        app = create_app()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="on", workers=1, server_header=False
    )
    server = uvicorn.Server(config)
    profiler = cProfile.Profile() if args.profile else None
    try:
        if profiler is not None:
            profiler.runcall(server.run)
        else:
            server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT it captured once it has shut down cleanly
    finally:
        if profiler is not None:
            profiler.dump_stats(str(args.profile))


if __name__ == "__main__":
    main()
