"""Settings: one frozen dataclass, read once from flags and the environment.

Each setting is declared once, as a field of `Settings`: its name (the field's, upper-cased,
is the environment variable), its type, its default as the operator would write it, the
parser that reads its text and its help. `SETTINGS`, the flags, `--help` and the README's
table all come from those fields. A flag beats the environment variable, which beats the
default. A bad value raises `SettingError` naming the variable and saying, in the parser's
own words, what is wrong with it; the entry point turns it into one line on stderr and exit
code 2. Only this module reads the environment (and `keys.py`, for `api_key_env`).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar, overload

T = TypeVar("T")
# The longest quota, budget or lockout window, here and in keys.json. Longer ones were taken and
# broke the first 429 they gave (its retry-after-ms overflowed from 1.8e305 s, a budget's
# "frees up at" date from 1e17 s); no limit needs more than ten years.
MAX_WINDOW_SECONDS = 10 * 365 * 86400
# The largest budget, here and in keys.json: a trillion dollars. Larger ones were taken and
# every request of their keys answered 500 ($1e308 in micro-dollars overflows a float; past
# 2**63 micro-dollars, a Redis counter).
MAX_BUDGET_USD = 1_000_000_000_000
# ADMIN_TOKEN and KEYS_STORE_SECRET shorter than this draw a warning at start: what the
# admin API asks of a virtual key it is given.
MIN_SECRET_CHARS = 20
# The most gateway processes WORKERS may ask for. A larger count was taken and the start ate
# memory by the gigabyte (the workers' shared arrays, 8 bytes each, zeroed at once) instead
# of refusing; a process per core is the most that helps.
MAX_WORKERS = 1024
# Probes go to a provider with a real key: more than one a second per target would spend its
# rate limit (and fill its logs) to learn nothing a second later would not.
MIN_PROBE_INTERVAL_SECONDS = 1.0


class SettingError(ValueError):
    """A setting with a value the gateway cannot use."""


def _refuse(expected: str, text: str) -> NoReturn:
    raise ValueError(f"must be {expected}, got {text!r}")


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    _refuse("true or false", text)


def _whole(text: str, lowest: int, highest: int, expected: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        _refuse(expected, text)
    if not lowest <= value <= highest:
        _refuse(expected, text)
    return value


def _positive_int(text: str) -> int:
    return _whole(text, 1, 2**63 - 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _whole(text, 0, 2**63 - 1, "a non-negative integer")


def _workers(text: str) -> int:
    return _whole(
        text, 0, MAX_WORKERS, f"a number of processes from 0 to {MAX_WORKERS} (0: one per core)"
    )


def _port(text: str) -> int:
    return _whole(text, 0, 65535, "a port number (0-65535)")


def _real(text: str, is_allowed: Callable[[float], bool], expected: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        _refuse(expected, text)
    if math.isnan(value) or math.isinf(value) or not is_allowed(value):
        _refuse(expected, text)
    return value


def _positive_seconds(text: str) -> float:
    return _real(text, lambda value: value > 0, "a positive number of seconds")


def _window_seconds(text: str) -> float:
    return _real(
        text,
        lambda value: 0 < value <= MAX_WINDOW_SECONDS,
        f"a positive number of seconds, at most {MAX_WINDOW_SECONDS} (ten years)",
    )


def _non_negative_seconds(text: str) -> float:
    return _real(text, lambda value: value >= 0, "a non-negative number of seconds")


def _probe_interval(text: str) -> float:
    return _real(
        text,
        lambda value: value == 0 or value >= MIN_PROBE_INTERVAL_SECONDS,
        f"0 (no probes) or at least {MIN_PROBE_INTERVAL_SECONDS:g} second",
    )


def _positive_dollars(text: str) -> float:
    return _real(
        text,
        lambda value: 0 < value <= MAX_BUDGET_USD,
        f"a positive number of dollars, at most {MAX_BUDGET_USD}",
    )


def _ratio(text: str) -> float:
    return _real(text, lambda value: 0 <= value <= 1, "a number from 0 to 1")


def _text(text: str) -> str:
    if not text.strip():
        _refuse("text", text)
    return text.strip()


def _addresses(text: str) -> str:
    """SERVER_HOST: one address or several separated by commas; commas alone listen nowhere."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        _refuse("an address, such as 0.0.0.0, or several separated by commas", text)
    for part in parts:  # an IPv6 address holds two colons or more; host:port, one
        if "/" in part or part.startswith("[") or part.count(":") == 1:
            _refuse(
                "an address alone, such as 0.0.0.0 or :: (no scheme, no port: SERVER_PORT)", text
            )
    return text.strip()


def _optional_text(text: str) -> str | None:
    return text.strip() or None


# A header name is a token (RFC 9110 §5.1, §5.6.2).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _header_name(text: str) -> str | None:
    name = text.strip()
    if name and not _TOKEN.fullmatch(name):
        _refuse("a header name (letters, digits and -, like x-session-id)", text)
    return name or None


# Any scheme (RFC 3986: redis+sentinel, redis-sentinel, Redis): each is quoted in a refusal.
_PASSWORD_IN_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/]*:)[^@/]*@")
_PASSWORD_IN_QUERY = re.compile(r"([?&]password=)[^&]*")


def masked_redis_url(url: str) -> str:
    """The URL with its password (user info or ?password=) replaced by ***, fit for an error line."""
    return _PASSWORD_IN_QUERY.sub(r"\1***", _PASSWORD_IN_USERINFO.sub(r"\1***@", url))


def _redis_url(text: str) -> str | None:
    url = text.strip()
    if not url:
        return None
    expected = "a URL starting with redis://, rediss:// or unix://"
    if url.startswith(("redis://", "rediss://", "unix://")):
        try:  # .port raises for a port that is not 0-65535; urlsplit for a broken [IPv6] host
            urllib.parse.urlsplit(url).port  # noqa: B018
            return url
        except ValueError as error:
            expected = f"a URL like redis://host:6379/0 ({error})"
    _refuse(expected, masked_redis_url(text))


def _origins(text: str) -> tuple[str, ...] | None:
    origins = tuple(dict.fromkeys(part.strip().rstrip("/") for part in text.split(",")))
    origins = tuple(origin for origin in origins if origin)
    for origin in origins:
        scheme, _, host = origin.partition("://")
        if origin != "*" and (scheme not in ("http", "https") or not host or "/" in host):
            raise ValueError(
                f"{origin!r} is not an origin (a scheme and a host, like https://app.example.com)"
            )
    return origins or None


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def _networks(text: str) -> Networks | None:
    """Comma-separated addresses or CIDRs: 10.0.0.0/8, 192.168.1.7, fd00::/8."""
    networks = []
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(
                f"{part!r} is not an address or a CIDR network (like 10.0.0.0/8)"
            ) from None
    return tuple(networks) or None


def _keys_store(text: str) -> str:
    value = text.strip().lower()
    if value not in ("file", "redis"):
        _refuse("file or redis", text)
    return value


def _redis_error_policy(text: str) -> str:
    value = text.strip().lower()
    if value not in ("allow", "deny"):
        _refuse("allow or deny", text)
    return value


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting as the command line, `--help` and the README show it."""

    field: str
    default: str | None  # as text, parsed like a value from the environment; None: unset
    parse: Callable[[str], object]
    help: str
    secret: bool = False  # kept out of the repr, and better out of the command line

    @property
    def variable(self) -> str:
        return self.field.upper()

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


@overload
def setting(default: str, parse: Callable[[str], T], help: str, *, secret: bool = ...) -> T: ...
@overload
def setting(
    default: None, parse: Callable[[str], T], help: str, *, secret: bool = ...
) -> T | None: ...
def setting(
    default: str | None, parse: Callable[[str], object], help: str, *, secret: bool = False
) -> Any:
    """A field of `Settings` that is a setting: its default as text (parsed by `parse`, so
    the README's default and the field's cannot differ; None: unset), its parser and help.
    A secret stays out of the dataclass's repr."""
    value = None if default is None else parse(default)
    declared = Setting("", default, parse, help, secret)
    return field(default=value, repr=not secret, metadata={"setting": declared})


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the gateway, parsed and checked."""

    server_host: str = setting(
        "0.0.0.0",
        _addresses,
        "address to listen on; several separated by commas (0.0.0.0,:: for IPv4 and IPv6: "
        ":: alone is IPv6 only)",
    )
    server_port: int = setting("8080", _port, "port to listen on")
    keys_file_path: str = setting("keys.json", _text, "the virtual key file")
    prices_file: str | None = setting(
        None,
        _text,
        "price overrides (USD per million tokens) for self-hosted or negotiated models "
        "(unset: genai-prices' bundled prices only)",
    )
    quota_enabled: bool = setting("true", _boolean, "enforce quotas at all")
    quota_limit: int = setting("100", _positive_int, "default requests per window per virtual key")
    quota_tokens: int | None = setting(
        None, _positive_int, "default tokens per window per virtual key (unset: no token limit)"
    )
    quota_window_seconds: float = setting(
        "3600", _window_seconds, "default length of the sliding window, in seconds"
    )
    budget_usd: float | None = setting(
        None,
        _positive_dollars,
        "default spending cap per virtual key, in US dollars (unset: no budget)",
    )
    budget_window_seconds: float = setting(
        "2592000",
        _window_seconds,
        "default sliding window of a budget, in seconds (2592000: 30 days)",
    )
    output_allowance_tokens: int = setting(
        "4096",
        _positive_int,
        "output tokens a request that names no cap (max_tokens, max_output_tokens...) "
        "reserves against a token limit or a budget while it runs; keys.json's "
        "output_allowance per key",
    )
    request_timeout: float = setting(
        "600",
        _positive_seconds,
        "seconds for the provider to connect and send its response headers",
    )
    stream_idle_timeout: float = setting(
        "300", _positive_seconds, "seconds allowed between two chunks of a response body"
    )
    realtime_idle_timeout: float = setting(
        "300",
        _positive_seconds,
        "seconds a WebSocket session may pass without a frame either way before it is closed",
    )
    realtime_max_session_seconds: float = setting(
        "3600",
        _positive_seconds,
        "longest a WebSocket session may last before the gateway closes it",
    )
    max_body_bytes: int = setting("10485760", _positive_int, "larger request bodies get 413")
    log_to_file: bool = setting(
        "false", _boolean, "write the interaction log to LOG_FILE_PATH (false: to stdout)"
    )
    log_file_path: str = setting(
        "interactions.jsonl", _text, "the interaction log file, when LOG_TO_FILE is true"
    )
    log_bodies: bool = setting(
        "false", _boolean, "also log request and response bodies (streams as the assembled text)"
    )
    shutdown_grace_seconds: float = setting(
        "30",
        _non_negative_seconds,
        "how long in-flight requests and streams may finish after SIGTERM",
    )
    redis_url: str | None = setting(
        None,
        _redis_url,
        "share quota and usage state through this Redis (unset: in-process only)",
        secret=True,
    )
    quota_on_redis_error: str = setting(
        "allow",
        _redis_error_policy,
        "when Redis is lost while serving: allow requests through, or deny them with 503",
    )
    cache_max_bytes: int = setting(
        "268435456",
        _positive_int,
        "bytes the in-memory response cache may hold, least recently used out first "
        "(268435456: 256 MiB; keys.json's cache turns it on per key)",
    )
    cache_max_entry_bytes: int = setting(
        "2097152",
        _positive_int,
        "the largest answer the response cache keeps, in memory or in Redis (2097152: 2 MiB)",
    )
    metrics_token: str | None = setting(
        None,
        _optional_text,
        "when set, /metrics needs 'Authorization: Bearer <token>' (unset: open)",
        secret=True,
    )
    auth_failure_limit: int = setting(
        "20",
        _positive_int,
        "failed authentications one client address may make per window with keys that "
        "begin alike before they get 429, counted by each gateway process (valid keys are "
        "still served)",
    )
    auth_failure_window_seconds: float = setting(
        "60",
        _window_seconds,
        "the window of AUTH_FAILURE_LIMIT, and how long an address is then refused",
    )
    trusted_proxies: Networks | None = setting(
        None,
        _networks,
        "addresses or CIDRs of the proxies in front (an ingress, a load balancer) whose "
        "X-Forwarded-For names the client, for the lockout and its log lines (unset: the "
        "connection's address is the client's)",
    )
    retry_attempts: int = setting(
        "0",
        _non_negative_int,
        "extra attempts on one target after a retryable failure (fallbacks and pool keys "
        "are tried regardless, a pool's next key at once)",
    )
    retry_max_wait_seconds: float = setting(
        "10",
        _non_negative_seconds,
        "the longest single wait before a retry; a provider asking for longer is not waited for",
    )
    retry_deadline_seconds: float = setting(
        "60", _positive_seconds, "no new attempt (retry or fallback) starts after this long"
    )
    breaker_failures: int = setting(
        "3", _positive_int, "a target's breaker opens after this many failures in a row"
    )
    breaker_error_ratio: float = setting(
        "0.5",
        _ratio,
        "... or when this share of its attempts in BREAKER_WINDOW_SECONDS failed (0: off)",
    )
    breaker_min_requests: int = setting(
        "20", _positive_int, "the error ratio counts only over at least this many attempts"
    )
    breaker_window_seconds: float = setting(
        "60", _positive_seconds, "the window of the error ratio, in seconds"
    )
    breaker_cooldown_seconds: float = setting(
        "30", _positive_seconds, "an open breaker lets one probe through after this long"
    )
    probe_interval_seconds: float = setting(
        "0",
        _probe_interval,
        "every this many seconds (at least 1), a target whose breaker is open is probed with "
        "GET .../models, which generates nothing, and closes on success (0: no probes; a "
        "client's request is the probe after the cooldown)",
    )
    pool_sticky_header: str | None = setting(
        None,
        _header_name,
        "a request header naming the conversation a pool keeps on one key, when the body names "
        "none (prompt_cache_key, metadata.user_id); unset: the body's only",
    )
    max_connections: int = setting(
        "1024",
        _positive_int,
        "open client connections per gateway process; past it a new one takes an idle "
        "keep-alive one's place, or gets 503 and is closed",
    )
    client_header_timeout: float = setting(
        "30",
        _positive_seconds,
        "seconds a client connection may stay idle, or take to send a request's headers, "
        "before it is closed",
    )
    client_body_timeout: float = setting(
        "60",
        _positive_seconds,
        "seconds a client may stay silent while it sends a request's body, before a 408 "
        "and the connection closed",
    )
    workers: int = setting(
        "1",
        _workers,
        "gateway processes sharing the port, at most 1024 (0: one per usable core, a "
        "container's CPU limit counted; over 1 needs REDIS_URL)",
    )
    keys_file_watch: bool = setting(
        "false",
        _boolean,
        "reload the keys file within seconds of it changing on disk (SIGHUP always reloads)",
    )
    keys_store: str = setting(
        "file",
        _keys_store,
        "where the admin API writes keys: file (keys.json, rewritten atomically) or redis "
        "(shared by every instance under REDIS_URL; keys.json imported when it is empty)",
    )
    keys_store_secret: str | None = setting(
        None,
        _optional_text,
        "with KEYS_STORE=redis: encrypts the keys at rest in Redis (the same on every instance)",
        secret=True,
    )
    admin_token: str | None = setting(
        None,
        _optional_text,
        "bearer token for the /admin endpoints: keys, teams, reload (unset: no admin endpoints)",
        secret=True,
    )
    cors_allowed_origins: tuple[str, ...] | None = setting(
        None,
        _origins,
        "comma-separated origins browsers may call from, or * (unset: no CORS headers)",
    )
    cors_allow_credentials: bool = setting(
        "false",
        _boolean,
        "let browsers send cookies and HTTP auth cross-origin (refused with * as an origin)",
    )
    # The OpenTelemetry SDK's own variables (OTEL_*, the non-empty ones) as given: they turn
    # traces on and configure them (proxy/tracing.py). Not rows of SETTINGS: the SDK names them.
    otel: Mapping[str, str] = field(default_factory=dict, repr=False)  # headers may hold a token
    # The outbound proxy variables as curl and requests read them (`outbound_proxies`):
    # "http", "https", "all" (a proxy URL each) and "no" (NO_PROXY). Not rows of SETTINGS: their
    # names are everyone's. Out of the repr: a proxy URL may hold a user and password.
    proxies: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], argv: Sequence[str] = ()) -> Settings:
        """Flags beat the environment, which beats the defaults; empty counts as unset.

        Raises SettingError.
        """
        flags = vars(parser().parse_args(list(argv)))
        values: dict[str, Any] = {}
        for row in SETTINGS:
            raw = flags.get(row.field)
            source = row.flag
            if raw is None:
                raw, source = environ.get(row.variable), row.variable
            if raw is None or not raw.strip():
                raw = row.default  # an empty variable is an unset one (as compose passes them)
            if raw is None:
                values[row.field] = None
                continue
            try:
                values[row.field] = row.parse(raw)
            except ValueError as error:  # the parser's own words say what is wrong
                raise SettingError(f"{source}: {error}") from None
        values["otel"] = {
            name: value.strip()
            for name, value in environ.items()
            if name.startswith("OTEL_") and value.strip()
        }
        values["proxies"] = outbound_proxies(environ)
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
        if self.workers != 1 and self.budget_usd is not None and self.redis_url is None:
            raise SettingError(
                "WORKERS other than 1 needs REDIS_URL while BUDGET_USD is set (budgets stay "
                "with QUOTA_ENABLED=false): each worker would count its own spend, multiplying "
                "every budget by the worker count"
            )
        if self.keys_store == "redis" and (self.redis_url is None or not self.keys_store_secret):
            raise SettingError(
                "KEYS_STORE=redis needs REDIS_URL (where the keys live) and KEYS_STORE_SECRET "
                "(what encrypts them there)"
            )
        if self.cors_allow_credentials and "*" in (self.cors_allowed_origins or ()):
            raise SettingError(
                "CORS_ALLOW_CREDENTIALS=true cannot go with CORS_ALLOWED_ORIGINS=*: "
                "list the origins that may send credentials"
            )
        if self.is_tracing_on:
            check_otel(self.otel)
        for scheme in PROXIED_SCHEMES:
            if scheme in self.proxies:
                check_proxy_url(scheme, self.proxies[scheme])

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
        return self.workers or usable_cores()


# Where a Linux process reads its cgroup's CPU limit (a container's `--cpus`, Kubernetes'
# `resources.limits.cpu`): cgroup v2's cpu.max, else v1's cpu.cfs_quota_us.
CGROUP = Path("/sys/fs/cgroup")


def usable_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process can use, for WORKERS=0: the CPUs its affinity allows, fewer
    when its cgroup's CPU quota allows less (rounded up). os.cpu_count() counts the host's:
    a container limited to 2 CPUs on a 64-core node ran 64 workers, each with its share of
    memory and Redis connections, fighting over 2 cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS: no affinity, no cgroups
        return os.cpu_count() or 1
    quota = _cpu_quota(cgroup)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def _cpu_quota(cgroup: Path) -> float | None:
    """CPUs' worth of time the cgroup may use per period; None: no limit (or none read)."""
    try:
        limit, per = (cgroup / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(per)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


# Every setting, in the order of the fields, each named after its field.
SETTINGS: tuple[Setting, ...] = tuple(
    dataclasses.replace(declared.metadata["setting"], field=declared.name)
    for declared in dataclasses.fields(Settings)
    if "setting" in declared.metadata
)


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
# Seconds, read as a float; milliseconds and counts, which the SDK takes as whole numbers of
# at least 1 (tracing reads them so); the SDK's defaults for the queue and its batches.
_OTEL_SECONDS = ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
_OTEL_WHOLE = (
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
)
_OTEL_QUEUE, _OTEL_BATCH = 2048, 512


# The schemes whose proxy variable is read (HTTP_PROXY, HTTPS_PROXY, and ALL_PROXY for both).
PROXIED_SCHEMES = ("http", "https", "all")


def outbound_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """The proxy variables as `urllib.request.getproxies_environment` reads them (and curl,
    requests, httpx): `<scheme>_proxy` in either case, the lowercase name winning; an empty
    one is unset. Only http, https, all and no are kept; HTTP_PROXY is ignored when
    REQUEST_METHOD is set (a CGI request's header could set it: httpoxy)."""
    found: dict[str, str] = {}
    for name, value in environ.items():
        lowered = name.lower()
        if lowered != name and lowered.endswith("_proxy") and value.strip():
            found[lowered[:-6]] = value.strip()
    if "REQUEST_METHOD" in environ:
        found.pop("http", None)
    for name, value in environ.items():
        if name.islower() and name.endswith("_proxy"):
            if value.strip():
                found[name[:-6]] = value.strip()
            else:
                found.pop(name[:-6], None)
    return {scheme: found[scheme] for scheme in (*PROXIED_SCHEMES, "no") if scheme in found}


def check_proxy_url(scheme: str, url: str) -> None:
    """A proxy the wire can use: http://[user:password@]host[:port] (no scheme: http, as
    curl reads it). The message names the variable and the host, never a password.

    Raises SettingError.
    """
    variable = f"{scheme.upper()}_PROXY"
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    try:
        host, _port = parts.hostname, parts.port
    except ValueError:
        raise SettingError(f"{variable}: the port is not a number from 0 to 65535") from None
    if parts.scheme.lower() != "http":
        raise SettingError(
            f"{variable}: the gateway speaks to an outbound proxy in plain HTTP only "
            f"(http://host:port, then CONNECT for https), got a {parts.scheme}:// URL"
        )
    if not host:
        raise SettingError(f"{variable}: must be a proxy URL such as http://proxy.corp:3128")


def check_otel(otel: Mapping[str, str]) -> None:
    """Refuse OTEL_* values the gateway's tracing cannot honour. Raises SettingError."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if name in otel:
            if otel[name] != "http/protobuf":
                raise SettingError(f"{name} must be http/protobuf, got {otel[name]!r}")
            break
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        if name in otel and not _is_http_url(otel[name]):
            # Taken as it is, a URL without its scheme fails every export, not the start.
            shown = otel[name].rpartition("@")[2]  # never a user:password@ part
            raise SettingError(
                f"{name} must be an http(s) URL, like http://collector:4318, got {shown!r}"
            )
    sampler = otel.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").lower()
    if sampler not in OTEL_SAMPLERS:
        raise SettingError(f"OTEL_TRACES_SAMPLER must be one of {', '.join(OTEL_SAMPLERS)}")
    # The gateway reads and sends W3C trace context (a baggage header passes as it is): a
    # caller's B3 or X-Ray headers would be ignored, each request the root of a new trace.
    propagators = {name.strip().lower() for name in otel.get("OTEL_PROPAGATORS", "").split(",")}
    if not propagators <= {"", "tracecontext", "baggage"}:
        raise SettingError(
            "OTEL_PROPAGATORS may name tracecontext and baggage only (the gateway continues "
            f"and passes W3C trace context), got {otel['OTEL_PROPAGATORS']!r}"
        )
    for name in ("OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"):
        if otel.get(name, "none").lower() not in ("none", "gzip", "deflate"):
            raise SettingError(f"{name} must be none, gzip or deflate, got {otel[name]!r}")
    if not 0 <= _otel_number(otel, "OTEL_TRACES_SAMPLER_ARG", 1) <= 1:
        raise SettingError(
            "OTEL_TRACES_SAMPLER_ARG must be a number from 0 to 1 (the share of traces "
            f"sampled), got {otel['OTEL_TRACES_SAMPLER_ARG']!r}"
        )
    for name in _OTEL_SECONDS:
        if not _otel_number(otel, name, 1) > 0:
            raise SettingError(f"{name} must be a positive number, got {otel[name]!r}")
    for name in _OTEL_WHOLE:
        if not _otel_number(otel, name, 1) >= 1:
            raise SettingError(f"{name} must be a whole number, at least 1, got {otel[name]!r}")
    queue = int(_otel_number(otel, "OTEL_BSP_MAX_QUEUE_SIZE", _OTEL_QUEUE))
    batch = int(_otel_number(otel, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", _OTEL_BATCH))
    if batch > queue:  # the SDK's own refusal, a traceback once the app builds its tracing
        raise SettingError(
            f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE ({batch}) must not exceed OTEL_BSP_MAX_QUEUE_SIZE "
            f"({queue})"
        )


def _otel_number(otel: Mapping[str, str], name: str, default: float) -> float:
    """The variable as a number, `default` when unset; NaN (which every bound refuses) when
    it is not one, or not finite."""
    try:
        value = float(otel.get(name, default))
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def _is_http_url(text: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 (raises for a port that is not 0-65535)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


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
        "A flag beats the variable, which beats the default. "
        "gateway.py --check [KEYS_FILE] [flags]: check the settings and the keys file "
        "(KEYS_FILE_PATH unless given) without starting; every problem is one line on stderr, "
        "exit code 2 if there is any, 0 when the gateway would start.",
    )
    for row in SETTINGS:
        default = "unset" if row.default is None else row.default
        cli.add_argument(
            row.flag,
            dest=row.field,
            metavar=row.variable,
            default=None,
            help=f"{row.help} [env {row.variable}, default {default}]",
        )
    return cli
