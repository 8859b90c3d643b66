"""Settings: one frozen dataclass, read once from flags and the environment.

`SETTINGS` is the single table of every setting (name, default, parser, help); the flags,
`--help` and the README's table all come from it. A flag beats the environment variable,
which beats the default. A bad value raises `SettingError` naming the variable; the entry
point turns it into one line on stderr and exit code 2. Only this module reads the
environment (and `keys.py`, for `api_key_env`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn


class SettingError(ValueError):
    """A setting with a value the gateway cannot use."""


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _positive_int(text: str) -> int:
    value = int(text.strip())
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text.strip())
    if value < 0:
        raise ValueError("must be a non-negative integer")
    return value


def _port(text: str) -> int:
    value = int(text.strip())
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number (0-65535)")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text.strip())
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _positive_dollars(text: str) -> float:
    value = float(text.strip())
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of dollars")
    return value


def _non_negative_seconds(text: str) -> float:
    value = float(text.strip())
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a non-negative number of seconds")
    return value


def _ratio(text: str) -> float:
    value = float(text.strip())
    if not 0 <= value <= 1:
        raise ValueError("must be a number from 0 to 1")
    return value


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _optional_text(text: str) -> str | None:
    return text.strip() or None


def _redis_url(text: str) -> str | None:
    url = text.strip()
    if not url:
        return None
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return url


def _origins(text: str) -> tuple[str, ...] | None:
    origins = tuple(dict.fromkeys(part.strip().rstrip("/") for part in text.split(",")))
    origins = tuple(origin for origin in origins if origin)
    for origin in origins:
        scheme, _, host = origin.partition("://")
        if origin != "*" and (scheme not in ("http", "https") or not host or "/" in host):
            raise ValueError(f"{origin!r} is not an origin")
    return origins or None


def _redis_error_policy(text: str) -> str:
    value = text.strip().lower()
    if value not in ("allow", "deny"):
        raise ValueError("must be allow or deny")
    return value


@dataclass(frozen=True, slots=True)
class Setting:
    """One row of the settings table."""

    variable: str
    default: str | None  # as text, parsed like a value from the environment; None: unset
    parse: Callable[[str], Any]
    help: str
    expects: str  # what the error message says a value must be

    @property
    def field(self) -> str:
        return self.variable.lower()

    @property
    def flag(self) -> str:
        return "--" + self.variable.lower().replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("SERVER_HOST", "0.0.0.0", _text, "address to listen on", "a host name or address"),
    Setting("SERVER_PORT", "8080", _port, "port to listen on", "a port number (0-65535)"),
    Setting("KEYS_FILE_PATH", "keys.json", _text, "the virtual key file", "a file path"),
    Setting(
        "PRICES_FILE",
        None,
        _text,
        "price overrides (USD per million tokens) for self-hosted or negotiated models "
        "(unset: genai-prices' bundled prices only)",
        "a file path",
    ),
    Setting("QUOTA_ENABLED", "true", _boolean, "enforce quotas at all", "true or false"),
    Setting(
        "QUOTA_LIMIT",
        "100",
        _positive_int,
        "default requests per window per virtual key",
        "a positive integer",
    ),
    Setting(
        "QUOTA_TOKENS",
        None,
        _positive_int,
        "default tokens per window per virtual key (unset: no token limit)",
        "a positive integer",
    ),
    Setting(
        "QUOTA_WINDOW_SECONDS",
        "3600",
        _positive_seconds,
        "default length of the sliding window, in seconds",
        "a positive number of seconds",
    ),
    Setting(
        "BUDGET_USD",
        None,
        _positive_dollars,
        "default spending cap per virtual key, in US dollars (unset: no budget)",
        "a positive number of dollars",
    ),
    Setting(
        "BUDGET_WINDOW_SECONDS",
        "2592000",
        _positive_seconds,
        "default sliding window of a budget, in seconds (2592000: 30 days)",
        "a positive number of seconds",
    ),
    Setting(
        "REQUEST_TIMEOUT",
        "600",
        _positive_seconds,
        "seconds for the provider to connect and send its response headers",
        "a positive number of seconds",
    ),
    Setting(
        "STREAM_IDLE_TIMEOUT",
        "300",
        _positive_seconds,
        "seconds allowed between two chunks of a response body",
        "a positive number of seconds",
    ),
    Setting(
        "REALTIME_IDLE_TIMEOUT",
        "300",
        _positive_seconds,
        "seconds a WebSocket session may pass without a frame either way before it is closed",
        "a positive number of seconds",
    ),
    Setting(
        "REALTIME_MAX_SESSION_SECONDS",
        "3600",
        _positive_seconds,
        "longest a WebSocket session may last before the gateway closes it",
        "a positive number of seconds",
    ),
    Setting(
        "MAX_BODY_BYTES",
        "10485760",
        _positive_int,
        "larger request bodies get 413",
        "a positive integer",
    ),
    Setting(
        "LOG_TO_FILE",
        "false",
        _boolean,
        "write the interaction log to LOG_FILE_PATH (false: to stdout)",
        "true or false",
    ),
    Setting(
        "LOG_FILE_PATH",
        "interactions.jsonl",
        _text,
        "the interaction log file, when LOG_TO_FILE is true",
        "a file path",
    ),
    Setting(
        "LOG_BODIES",
        "false",
        _boolean,
        "also log request and response bodies (streams as the assembled text)",
        "true or false",
    ),
    Setting(
        "SHUTDOWN_GRACE_SECONDS",
        "30",
        _non_negative_seconds,
        "how long in-flight requests and streams may finish after SIGTERM",
        "a non-negative number of seconds",
    ),
    Setting(
        "REDIS_URL",
        None,
        _redis_url,
        "share quota and usage state through this Redis (unset: in-process only)",
        "a redis:// URL",
    ),
    Setting(
        "QUOTA_ON_REDIS_ERROR",
        "allow",
        _redis_error_policy,
        "when Redis is lost while serving: allow requests through, or deny them with 503",
        "allow or deny",
    ),
    Setting(
        "METRICS_TOKEN",
        None,
        _optional_text,
        "when set, /metrics needs 'Authorization: Bearer <token>' (unset: open)",
        "a token",
    ),
    Setting(
        "AUTH_FAILURE_LIMIT",
        "20",
        _positive_int,
        "failed authentications one client address may make per window before it gets 429",
        "a positive integer",
    ),
    Setting(
        "AUTH_FAILURE_WINDOW_SECONDS",
        "60",
        _positive_seconds,
        "the window of AUTH_FAILURE_LIMIT, and how long an address is then refused",
        "a positive number of seconds",
    ),
    Setting(
        "RETRY_ATTEMPTS",
        "0",
        _non_negative_int,
        "extra attempts on one target after a retryable failure (fallbacks and pool keys "
        "are tried regardless)",
        "a non-negative integer",
    ),
    Setting(
        "RETRY_MAX_WAIT_SECONDS",
        "10",
        _non_negative_seconds,
        "the longest single wait before a retry; a provider asking for longer is not waited for",
        "a non-negative number of seconds",
    ),
    Setting(
        "RETRY_DEADLINE_SECONDS",
        "60",
        _positive_seconds,
        "no new attempt (retry or fallback) starts after this long",
        "a positive number of seconds",
    ),
    Setting(
        "BREAKER_FAILURES",
        "3",
        _positive_int,
        "a target's breaker opens after this many failures in a row",
        "a positive integer",
    ),
    Setting(
        "BREAKER_ERROR_RATIO",
        "0.5",
        _ratio,
        "... or when this share of its attempts in BREAKER_WINDOW_SECONDS failed (0: off)",
        "a number from 0 to 1",
    ),
    Setting(
        "BREAKER_MIN_REQUESTS",
        "20",
        _positive_int,
        "the error ratio counts only over at least this many attempts",
        "a positive integer",
    ),
    Setting(
        "BREAKER_WINDOW_SECONDS",
        "60",
        _positive_seconds,
        "the window of the error ratio, in seconds",
        "a positive number of seconds",
    ),
    Setting(
        "BREAKER_COOLDOWN_SECONDS",
        "30",
        _positive_seconds,
        "an open breaker lets one probe through after this long",
        "a positive number of seconds",
    ),
    Setting(
        "POOL_STICKY_HEADER",
        None,
        _optional_text,
        "a request header whose value keeps a client on one key of a pool (unset: no stickiness)",
        "a header name",
    ),
    Setting(
        "MAX_CONNECTIONS",
        "1024",
        _positive_int,
        "open client connections per gateway process; past it a new one gets 503 and is closed",
        "a positive integer",
    ),
    Setting(
        "CLIENT_HEADER_TIMEOUT",
        "30",
        _positive_seconds,
        "seconds a client connection may stay idle, or take to send a request's headers, "
        "before it is closed",
        "a positive number of seconds",
    ),
    Setting(
        "WORKERS",
        "1",
        _non_negative_int,
        "gateway processes sharing the port (0: one per core; over 1 needs REDIS_URL)",
        "a non-negative integer",
    ),
    Setting(
        "KEYS_FILE_WATCH",
        "false",
        _boolean,
        "reload the keys file within seconds of it changing on disk (SIGHUP always reloads)",
        "true or false",
    ),
    Setting(
        "ADMIN_TOKEN",
        None,
        _optional_text,
        "bearer token for /admin/keys and POST /admin/reload (unset: no admin endpoints)",
        "a token",
    ),
    Setting(
        "CORS_ALLOWED_ORIGINS",
        None,
        _origins,
        "comma-separated origins browsers may call from, or * (unset: no CORS headers)",
        "comma-separated origins like https://app.example.com, or *",
    ),
    Setting(
        "CORS_ALLOW_CREDENTIALS",
        "false",
        _boolean,
        "let browsers send cookies and HTTP auth cross-origin (refused with * as an origin)",
        "true or false",
    ),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the gateway, parsed and checked."""

    server_host: str = "0.0.0.0"
    server_port: int = 8080
    keys_file_path: str = "keys.json"
    prices_file: str | None = None
    quota_enabled: bool = True
    quota_limit: int = 100
    quota_tokens: int | None = None
    quota_window_seconds: float = 3600.0
    budget_usd: float | None = None
    budget_window_seconds: float = 2592000.0
    request_timeout: float = 600.0
    stream_idle_timeout: float = 300.0
    realtime_idle_timeout: float = 300.0
    realtime_max_session_seconds: float = 3600.0
    max_body_bytes: int = 10485760
    log_to_file: bool = False
    log_file_path: str = "interactions.jsonl"
    log_bodies: bool = False
    shutdown_grace_seconds: float = 30.0
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    quota_on_redis_error: str = "allow"
    metrics_token: str | None = field(default=None, repr=False)  # a secret
    auth_failure_limit: int = 20
    auth_failure_window_seconds: float = 60.0
    retry_attempts: int = 0
    retry_max_wait_seconds: float = 10.0
    retry_deadline_seconds: float = 60.0
    breaker_failures: int = 3
    breaker_error_ratio: float = 0.5
    breaker_min_requests: int = 20
    breaker_window_seconds: float = 60.0
    breaker_cooldown_seconds: float = 30.0
    pool_sticky_header: str | None = None
    max_connections: int = 1024
    client_header_timeout: float = 30.0
    workers: int = 1
    keys_file_watch: bool = False
    admin_token: str | None = field(default=None, repr=False)
    cors_allowed_origins: tuple[str, ...] | None = None
    cors_allow_credentials: bool = False
    # The OpenTelemetry SDK's own variables (OTEL_*, the non-empty ones) as given: they turn
    # traces on and configure them (proxy/tracing.py). Not rows of SETTINGS: the SDK names them.
    otel: Mapping[str, str] = field(default_factory=dict, repr=False)  # headers may hold a token

    @classmethod
    def from_env(cls, environ: Mapping[str, str], argv: Sequence[str] = ()) -> Settings:
        """Flags beat the environment, which beats the defaults; empty counts as unset.

        Raises SettingError.
        """
        flags = vars(parser().parse_args(list(argv)))
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = flags.get(setting.field)
            source = setting.flag
            if raw is None:
                raw, source = environ.get(setting.variable), setting.variable
            if raw is None or not raw.strip():
                raw = setting.default  # an empty variable is an unset one (as compose passes them)
            if raw is None:
                values[setting.field] = None
                continue
            try:
                values[setting.field] = setting.parse(raw)
            except ValueError:
                raise SettingError(f"{source} must be {setting.expects}, got {raw!r}") from None
        values["otel"] = {
            name: value.strip()
            for name, value in environ.items()
            if name.startswith("OTEL_") and value.strip()
        }
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse combinations that cannot work."""
        if self.workers != 1 and self.quota_enabled and self.redis_url is None:
            raise SettingError(
                "WORKERS other than 1 needs REDIS_URL while QUOTA_ENABLED is true: "
                "per-process counters would multiply every quota by the worker count"
            )
        if self.cors_allow_credentials and "*" in (self.cors_allowed_origins or ()):
            raise SettingError(
                "CORS_ALLOW_CREDENTIALS=true cannot go with CORS_ALLOWED_ORIGINS=*: "
                "list the origins that may send credentials"
            )
        if self.is_tracing_on:
            check_otel(self.otel)

    @property
    def is_tracing_on(self) -> bool:
        """True when the OTEL_* variables ask for traces: an OTLP endpoint or exporter is set.

        Raises SettingError for an exporter other than otlp or none.
        """
        if self.otel.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return False
        exporter = self.otel.get("OTEL_TRACES_EXPORTER", "").lower()
        if exporter not in ("", "otlp", "none"):
            raise SettingError(
                "OTEL_TRACES_EXPORTER must be otlp or none (the gateway exports OTLP over "
                f"HTTP), got {exporter!r}"
            )
        endpoint = self.otel.keys() & {
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        }
        return exporter == "otlp" or (exporter == "" and bool(endpoint))

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


# The OTEL_* values the gateway reads itself when tracing is on (proxy/tracing.py), checked
# at start like every setting; the SDK's other variables are its own business.
OTEL_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
_OTEL_NUMBERS = (
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
)


def check_otel(otel: Mapping[str, str]) -> None:
    """Refuse OTEL_* values the gateway's tracing cannot honour. Raises SettingError."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if name in otel:
            if otel[name] != "http/protobuf":
                raise SettingError(f"{name} must be http/protobuf, got {otel[name]!r}")
            break
    sampler = otel.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").lower()
    if sampler not in OTEL_SAMPLERS:
        raise SettingError(f"OTEL_TRACES_SAMPLER must be one of {', '.join(OTEL_SAMPLERS)}")
    for name in ("OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"):
        if otel.get(name, "none").lower() not in ("none", "gzip", "deflate"):
            raise SettingError(f"{name} must be none, gzip or deflate, got {otel[name]!r}")
    for name in _OTEL_NUMBERS:
        try:
            is_positive = float(otel.get(name, "1")) > 0
        except ValueError:
            is_positive = False
        if not is_positive:
            raise SettingError(f"{name} must be a positive number, got {otel[name]!r}")


class _Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line pointing to --help instead of the whole usage."""

    def error(self, message: str) -> NoReturn:
        raise SettingError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    """The command line: one flag per setting, each naming its variable and default."""
    cli = _Parser(
        prog="gateway.py",
        description="llm-gateway: a transparent reverse proxy for LLM APIs with virtual keys, "
        "quotas and an interaction log.",
        epilog="Every flag can also be set through the environment variable it names. "
        "A flag beats the variable, which beats the default.",
    )
    for setting in SETTINGS:
        default = "unset" if setting.default is None else setting.default
        cli.add_argument(
            setting.flag,
            dest=setting.field,
            metavar=setting.variable,
            default=None,
            help=f"{setting.help} [env {setting.variable}, default {default}]",
        )
    return cli
