"""The worker process: `python -m emails.worker` sends queued email and queues due reminders.

A composition root (the only module of `emails` that may import the rest of the project): it
opens the services and runs `services.run_worker` (the outbox loop, with the invoicing code's
policy for dead messages, and the reminder schedule) until SIGTERM or SIGINT, which finish the
email in hand first. `--once` sends what is due now, prints what happened and exits.
With WORKER_METRICS_PORT set it serves GET /metrics on that port (the same metrics as the web app's
/metrics, METRICS_TOKEN included when set); its system usage is sampled like the web's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import services
from emails import sender
from plumbing import metrics
from plumbing.logs import configure_logging
from plumbing.settings import ConfigError, Settings

log = logging.getLogger("paylink.worker")


async def _main(settings: Settings, once: bool) -> int:
    async with services.open_services(settings) as opened:
        if once:
            report = await sender.run_once(
                opened.sessions, settings, on_dead=services.dead_letter_hook(settings), attach=services.attachment_hook(opened)
            )
            print(f"sent {report.sent}, retrying {report.retrying}, dead {report.dead}")
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)  # finish the current email, then exit
        server = None
        if settings.worker_metrics_port is not None:
            await opened.outbox_gauges.refresh()  # the first scrape reads the loop's database through this
            token = str(settings.metrics_token) if settings.metrics_token is not None else None
            server = metrics.serve_in_thread(settings.worker_metrics_port, opened.outbox_gauges, token=token)
            log.info("worker.metrics port=%d", settings.worker_metrics_port)
        log.info("worker started")
        try:
            await services.run_worker(opened, stop)
        finally:
            if server is not None:
                await asyncio.to_thread(server.shutdown)
            metrics.process_exited()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emails.worker", description="Send queued emails from the outbox and queue reminders.")
    parser.add_argument("--once", action="store_true", help="send what is due now and exit")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    configure_logging("INFO", settings.log_format)  # log calls only queue; a thread writes them
    try:
        return asyncio.run(_main(settings, args.once))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
