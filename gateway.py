"""llm-gateway: flags and environment → Settings → keys → run the app.

Every refusal to start is one line on stderr naming the culprit, and exit code 2.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sys
from collections.abc import Sequence

from aiohttp import web

from proxy.app import build_app, load_keys
from proxy.keys import KeysFileError
from proxy.settings import SettingError, Settings

EXIT_REFUSED = 2


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env(os.environ, argv)
        key_ring = load_keys(settings, os.environ)
        check_log_file(settings)
    except (SettingError, KeysFileError) as error:
        return refuse(str(error))
    try:
        serve(settings, build_app(settings, key_ring))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return refuse(
                f"port {settings.server_port} on {settings.server_host} is already in use: "
                "stop what holds it, or choose another with SERVER_PORT or --server-port"
            )
        if error.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            return refuse(f"cannot listen on {settings.server_host}:{settings.server_port}: {error.strerror}")
        raise
    return 0


def check_log_file(settings: Settings) -> None:
    """A log file that cannot be opened stops the start, not the first request."""
    if not settings.log_to_file:
        return
    try:
        with open(settings.log_file_path, "ab"):
            pass
    except OSError as error:
        raise SettingError(
            f"LOG_FILE_PATH {settings.log_file_path} cannot be opened for appending: {error.strerror}"
        ) from None


def serve(settings: Settings, app: web.Application) -> None:
    """Run until SIGTERM or SIGINT, then drain for SHUTDOWN_GRACE_SECONDS and exit."""
    web.run_app(
        app,
        host=settings.server_host,
        port=settings.server_port,
        shutdown_timeout=settings.shutdown_grace_seconds,
        handler_cancellation=True,  # a client that leaves cancels its upstream request
        access_log=None,  # the interaction log is the access log
        print=lambda *_: print(
            f"llm-gateway listening on http://{settings.server_host}:{settings.server_port}",
            flush=True,
        ),
        loop=new_event_loop(),
    )


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def refuse(message: str) -> int:
    print(f"llm-gateway: {message}", file=sys.stderr)
    return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
