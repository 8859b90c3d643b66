"""Running the gateway: one process, or WORKERS processes sharing one port.

With several workers, each is a forked copy with its own event loop and its own socket on
the same port (SO_REUSEPORT: the kernel spreads connections). The parent only supervises:
it forwards SIGTERM/SIGINT once to every worker, waits while they drain, and exits with
the first failure's code. Workers run in their own process group, so a Ctrl-C in a
terminal reaches them once, through the parent, and not twice; a worker whose parent
died drains and exits by itself. Their metrics meet in one
directory (prometheus-client's multiprocess mode), so `/metrics` on any worker reports
the sum; quotas meet in Redis (settings refuse several workers without it).
"""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from types import FrameType

from aiohttp import web

from proxy.app import build_app
from proxy.keys import KeyRing
from proxy.metrics import forget_worker
from proxy.settings import Settings


class CannotListen(Exception):
    """The port is taken or the address is not ours: a refusal to start, not a crash."""


def serve(settings: Settings, app: web.Application, reuse_port: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then drain for SHUTDOWN_GRACE_SECONDS. Raises CannotListen."""
    try:
        web.run_app(
            app,
            host=settings.server_host,
            port=settings.server_port,
            shutdown_timeout=settings.shutdown_grace_seconds,
            handler_cancellation=True,  # a client that leaves cancels its upstream request
            access_log=None,  # the interaction log is the access log
            reuse_port=reuse_port or None,
            print=lambda banner: print(
                "llm-gateway listening on "
                + listening_on(banner, settings)
                + (f" (worker {os.getpid()})" if reuse_port else ""),
                flush=True,
            ),
            loop=new_event_loop(),
        )
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise CannotListen(
                f"port {settings.server_port} on {settings.server_host} is already in use: "
                "stop what holds it, or choose another with SERVER_PORT or --server-port"
            ) from None
        if error.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise CannotListen(
                f"cannot listen on {settings.server_host}:{settings.server_port}: {error.strerror}"
            ) from None
        raise


def listening_on(banner: str, settings: Settings) -> str:
    """The addresses aiohttp's banner names (the real port, also for SERVER_PORT=0)."""
    addresses = re.findall(r"https?://\S+", banner)
    return ", ".join(addresses) or f"http://{settings.server_host}:{settings.server_port}"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(settings: Settings, key_ring: KeyRing) -> int:
    """Serve in this process, or supervise WORKERS processes. The exit code."""
    if settings.worker_count == 1:
        serve(settings, build_app(settings, key_ring))
        return 0
    return supervise(settings, key_ring)


def supervise(settings: Settings, key_ring: KeyRing) -> int:
    """Fork the workers, forward the stop signal once, wait for every one of them."""
    chosen = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = chosen or tempfile.mkdtemp(prefix="llm-gateway-metrics-")
    _empty(metrics_dir)  # files of an earlier run would be summed in
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_work, args=(settings, key_ring, metrics_dir), name=f"worker-{n}")
        for n in range(settings.worker_count)
    ]
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            for worker in workers:
                if worker.pid is not None and worker.is_alive():
                    os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for worker in workers:
        worker.start()
    code = 0
    try:
        while any(worker.is_alive() for worker in workers):
            for worker in workers:
                if worker.exitcode not in (None, 0) and not stopping:
                    code = code or worker.exitcode
                    stop(signal.SIGTERM, None)  # one worker failed: stop the others
            time.sleep(0.1)
    finally:
        for worker in workers:
            worker.join()
            if worker.pid is not None:
                forget_worker(metrics_dir, worker.pid)
        if not chosen:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    failures = [worker.exitcode for worker in workers if worker.exitcode]
    return code or (failures[0] if failures else 0)


def _work(settings: Settings, key_ring: KeyRing, metrics_dir: str) -> None:
    os.setpgrp()  # signals come through the parent, once
    threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        serve(settings, build_app(settings, key_ring, metrics_dir), reuse_port=True)
    except CannotListen as error:
        print(f"llm-gateway: {error}", flush=True, file=sys.stderr)
        raise SystemExit(2) from None


def _stop_when_orphaned(parent: int) -> None:
    """A worker whose parent died (even by SIGKILL) drains and exits instead of lingering."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _empty(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))
