"""Serve the real app (from the environment) or a bare Starlette app with one prebuilt page, under uvicorn.

Used by the benchmarks as a subprocess: `python load/_serve.py --port P [--bare PAGE.html] [--profile OUT.prof]`.
One worker, uvloop + httptools when installed (uvicorn's "auto"), no access log. SIGINT stops it cleanly,
after which a cProfile dump (if asked for) is written.
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


def bare_app(page: Path) -> Any:
    """Starlette with the same route shape as the pay page, answering with a prebuilt body."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, PlainTextResponse, Response
    from starlette.routing import Route

    body = page.read_bytes()

    async def pay_page(request: Request) -> Response:
        return HTMLResponse(body)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/pay/{token}", pay_page, methods=["GET", "HEAD"]), Route("/health", health)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bare", type=Path, help="serve this file at /pay/{token} from a bare Starlette app")
    parser.add_argument("--profile", type=Path, help="write cProfile stats of the server's event loop thread here")
    args = parser.parse_args()
    if args.bare:
        app = bare_app(args.bare)
    else:
        from app import create_app

        app = create_app()
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, lifespan="on", workers=1)
    server = uvicorn.Server(config)
    if args.profile:
        profiler = cProfile.Profile()
        try:
            profiler.runcall(server.run)  # uvicorn re-raises the captured SIGINT once it has shut down
        except KeyboardInterrupt:
            pass
        finally:
            profiler.dump_stats(str(args.profile))
    else:
        server.run()


if __name__ == "__main__":
    main()
