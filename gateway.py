"""llm-gateway: flags and environment → Settings → keys → run the app.

Every refusal to start is one line on stderr naming the culprit, and exit code 2.
"""

from __future__ import annotations

import signal
import sys

# POSIX signals (SIGHUP, SIGTERM), fork and SO_REUSEPORT for WORKERS, resource limits: the
# gateway runs on Linux and macOS. On Windows one line says so, not a traceback from below.
if sys.platform == "win32":
    print(
        "llm-gateway runs on Linux and macOS; on Windows, run it in WSL or with Docker "
        "(docker compose up)",
        file=sys.stderr,
    )
    raise SystemExit(2)

# SIGHUP's default action ends the process: ignored before anything else runs (the imports
# below take most of a second), so a reload or a terminal's hang-up during the start
# cannot kill it. The app's reload handler takes SIGHUP over once it serves.
if __name__ == "__main__":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

# Python 3.11 or newer with requirements.txt installed (make run's .venv): a python3 that is
# older (Ubuntu 22.04's 3.10), or another than .venv's, says so in one line, not with an
# ImportError traceback from deep in proxy/.
if sys.version_info < (3, 11):  # noqa: UP036 (the check is for the Pythons ruff assumes away)
    version = ".".join(str(part) for part in sys.version_info[:3])
    print(f"llm-gateway needs Python 3.11 or newer; this is Python {version}", file=sys.stderr)
    raise SystemExit(2)

import logging  # noqa: E402
import os  # noqa: E402
from collections.abc import Sequence  # noqa: E402

try:
    from proxy.app import load_keys
    from proxy.keys.fields import KeysFileError
    from proxy.observe.logfile import check_appendable, file_mode, is_stdout
    from proxy.runtime.check import check, warnings
    from proxy.runtime.server import CannotListen
    from proxy.runtime.start_line import start_line
    from proxy.runtime.workers import EXIT_REFUSED, run, say
    from proxy.settings import SettingError, Settings, masked_redis_url
    from proxy.usage.pricing import Prices
except ModuleNotFoundError as missing:
    if missing.name is None or missing.name.split(".")[0] == "proxy":
        raise
    print(
        f"llm-gateway: {missing.name.split('.')[0]} is not installed for this Python "
        f"({sys.executable}): start the gateway with make run (it installs requirements.txt "
        "into .venv) or .venv/bin/python gateway.py, or pip install -r requirements.txt",
        file=sys.stderr,
    )
    raise SystemExit(2) from None


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if "--check" in argv:
        return check_only(argv)
    try:
        settings = Settings.from_env(os.environ, argv)
        key_ring = load_keys(settings, os.environ)
        check_log_file(settings)
        prices = Prices.load(settings.prices_file)  # a bad PRICES_FILE stops the start
        check_redis(settings)
        for warning in warnings(settings, key_ring, prices, os.environ, argv):
            say(f"warning: {warning}")
        # Beside the listening line: stdout, or stderr when stdout is the interaction log's.
        logged = settings.log_file_path if settings.log_to_file else None
        status = sys.stderr if is_stdout(logged) else sys.stdout
        print(start_line(settings, key_ring), file=status, flush=True)
        return run(settings, key_ring)
    except (SettingError, KeysFileError, CannotListen) as error:
        say(str(error))
        return EXIT_REFUSED


def check_only(argv: Sequence[str]) -> int:
    """--check [keys.json]: every problem of the settings and keys.json, one line each, without
    starting; exit code 2 when there is any, 0 when the gateway would start."""
    rest = list(argv)
    at = rest.index("--check")
    rest.pop(at)
    keys_file = rest.pop(at) if at < len(rest) and not rest[at].startswith("-") else None
    found = check(rest, os.environ, keys_file, (check_log_file, check_redis))
    for problem in found.problems:
        say(problem)
    for warning in found.warnings:
        say(f"warning: {warning}")
    if found.problems:
        count = len(found.problems)
        say(f"{count} problem{'' if count == 1 else 's'}: the gateway would not start")
        return EXIT_REFUSED
    assert found.settings is not None and found.key_ring is not None
    print(start_line(found.settings, found.key_ring).replace("starting", "would start"))
    return 0


def check_log_file(settings: Settings) -> None:
    """A log file that cannot be opened stops the start, not the first request."""
    if not settings.log_to_file:
        return
    try:
        check_appendable(settings.log_file_path, file_mode(settings.log_bodies))
    except OSError as error:
        raise SettingError(
            f"LOG_FILE_PATH {settings.log_file_path} cannot be opened for appending: "
            f"{error.strerror}"
        ) from None


def check_redis(settings: Settings) -> None:
    """A Redis that cannot be reached stops the start, not the first request."""
    if settings.redis_url is None:
        return
    from proxy.quota.redis_tracker import check
    from proxy.quota.tracker import TrackerUnavailable

    try:
        check(settings.redis_url)
    except (TrackerUnavailable, ValueError) as error:  # ValueError: redis-py refuses the URL
        shown = masked_redis_url(settings.redis_url)
        raise SettingError(f"REDIS_URL {shown}: {error}") from None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
