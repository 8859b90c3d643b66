"""Every mistake at once: the settings and keys.json checked without starting.

`python gateway.py --check [keys.json]` reads what a start would read and lists every
problem, one line each, instead of stopping at the first: each setting is parsed on its own,
keys.json is read through (each key and provider checked even after one failed), then the
prices file, the log file and Redis. Warnings (the gateway would start, but someone probably
meant something else) are the same lines a start prints.
"""

from __future__ import annotations

import dataclasses
import difflib
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from proxy.keys.advice import endpoint_paths, placeholders, provider_keys, short_keys
from proxy.keys.fields import KeysFileError
from proxy.keys.keys import KeyRing, VirtualKey
from proxy.settings import MIN_SECRET_CHARS, SETTINGS, SettingError, Settings, parser
from proxy.usage.pricing import Prices, PricesFileError

# An unknown variable this close to a setting's name (difflib's ratio) is probably a typo.
LOOKALIKE_RATIO = 0.85
# An OTLP export timeout this long (seconds) is most likely milliseconds, as the spec has it.
OTEL_TIMEOUT_SUSPECT_SECONDS = 1000.0
# Files a gateway process holds besides its connections: the listening socket, the log,
# Redis, the event loop's own, a keys.json being read.
OWN_OPEN_FILES = 32


@dataclass(slots=True)
class Findings:
    """What a check found: problems stop a start, warnings do not."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    settings: Settings | None = None
    key_ring: KeyRing | None = None


def check(
    argv: Sequence[str],
    environ: Mapping[str, str],
    keys_file: str | None,
    start_checks: Sequence[Callable[[Settings], None]] = (),
) -> Findings:
    """Everything a start would check, every problem found. `keys_file` overrides
    KEYS_FILE_PATH; `start_checks` are the entry point's own (log file, Redis)."""
    found = Findings()
    environ = dict(environ)
    if keys_file is not None:
        environ["KEYS_FILE_PATH"] = keys_file
    found.settings = _settings(argv, environ, found.problems)
    settings = found.settings or _fallback(environ)
    prices = None
    try:
        prices = Prices.load(settings.prices_file)
    except PricesFileError as error:
        found.problems.extend(error.problems)
    try:
        found.key_ring = load(settings, environ)
    except KeysFileError as error:
        found.problems.extend(error.problems)
    if found.settings is not None:
        for start_check in start_checks:
            try:
                start_check(found.settings)
            except SettingError as error:
                found.problems.append(str(error))
    found.warnings = warnings(settings, found.key_ring, prices, environ, argv)
    if found.settings is not None and not found.problems:
        store_findings(found.settings, environ, found)
    return found


def store_findings(settings: Settings, environ: Mapping[str, str], found: Findings) -> None:
    """With KEYS_STORE=redis, the keys the store holds (a start takes them, not keys.json's):
    a document this secret cannot read is a problem; each key or team this version leaves
    out (one an older version stored) a warning."""
    if settings.keys_store != "redis" or settings.redis_url is None:
        return
    from redis.exceptions import RedisError

    from proxy.app import parse_keys
    from proxy.keys.redis_store import stored_document
    from proxy.keys.store import encoded

    try:
        document = stored_document(settings.redis_url, settings.keys_store_secret or "")
        if document is None:
            return  # an empty store: the start imports keys.json, checked above
        ring = parse_keys(settings, environ, time.time, document, encoded(document)[1])
    except KeysFileError as error:
        found.problems.extend(error.problems)
        return
    except RedisError:
        return  # said by the start's own Redis check
    found.warnings += [
        f"{why}: would be left out (change or delete it through the admin API)"
        for why in sorted(ring.left_out.values())
    ]


def warnings(
    settings: Settings,
    key_ring: KeyRing | None,
    prices: Prices | None,
    environ: Mapping[str, str],
    argv: Sequence[str] = (),
) -> list[str]:
    """What a start says before serving: lookalike variables, keys that look like mistakes,
    secrets on the command line (`argv`: the flags)."""
    said = lookalikes(environ) + ignored_settings(settings) + short_secrets(settings)
    said += secrets_in_flags(argv)
    said += otel_timeouts_in_milliseconds(settings)
    said += too_few_open_files(settings, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    if key_ring is not None:
        said += placeholders(key_ring, settings.keys_file_path)
        said += short_keys(key_ring, settings.keys_file_path)
        said += provider_keys(key_ring, settings.keys_file_path)
        said += endpoint_paths(key_ring, settings.keys_file_path)
        if prices is not None:
            said += unpriced_budgets(key_ring, prices, settings)
            said += misnamed_prices(key_ring, prices, settings)
    return said


def too_few_open_files(settings: Settings, hard_limit: int) -> list[str]:
    """A line when the hard limit on open files (the soft one is raised to it at start) is
    below what MAX_CONNECTIONS needs: a client's socket and a provider's per connection, and
    the process's own. Past it, new connections are refused (503 too_many_open_files, or
    closed unanswered once a provider's socket took the last descriptor), and providers
    cannot be reached (503 too_many_open_files)."""
    needed = 2 * settings.max_connections + OWN_OPEN_FILES
    if hard_limit == resource.RLIM_INFINITY or hard_limit >= needed:
        return []
    return [
        f"the limit on open files is {hard_limit} (ulimit -Hn), below the {needed} that "
        f"MAX_CONNECTIONS={settings.max_connections} needs (two sockets a connection): past "
        f"about {max(0, hard_limit - OWN_OPEN_FILES) // 2} connections, new ones are refused "
        "and providers cannot be reached; raise it (docker run --ulimit "
        "nofile=…, systemd's LimitNOFILE, Kubernetes: the node's container runtime) or "
        "lower MAX_CONNECTIONS"
    ]


def otel_timeouts_in_milliseconds(settings: Settings) -> list[str]:
    """A line for an OTLP export timeout that reads as milliseconds (1000 and up), as the
    OpenTelemetry specification writes it: the Python SDK, and so the gateway, reads seconds,
    so a collector that hangs would hold each export that long, its spans dropped meanwhile."""
    if not settings.is_tracing_on:
        return []
    said = []
    for name in ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"):
        given = settings.otel.get(name)
        if given is not None and float(given) >= OTEL_TIMEOUT_SUSPECT_SECONDS:
            seconds = float(given)
            said.append(
                f"{name}={given} is read in seconds (as the OpenTelemetry Python SDK reads it), "
                f"not milliseconds: a collector that hangs would hold each export "
                f"{seconds / 3600:.1f} hours; for {seconds / 1000:g} seconds write "
                f"{seconds / 1000:g}"
            )
    return said


def ignored_settings(settings: Settings) -> list[str]:
    """A line for each setting given that takes no effect as the others are set: a secret for
    keys Redis does not keep. (Not LOG_FILE_PATH without LOG_TO_FILE: the image sets it for
    whoever turns the file on.)"""
    if settings.keys_store_secret is not None and settings.keys_store != "redis":
        return [
            "KEYS_STORE_SECRET is ignored: it encrypts the keys only with KEYS_STORE=redis "
            "(keys.json is the store)"
        ]
    return []


def secrets_in_flags(argv: Sequence[str]) -> list[str]:
    """A line for each secret given as a flag (a Redis URL only when it holds a password):
    every local user reads a process's command line (`ps`, /proc/<pid>/cmdline), and so do
    process listings in monitoring and crash reports. Never the value itself."""
    try:
        flags = vars(parser().parse_args(list(argv)))
    except SettingError:
        return []  # said as a problem
    said = []
    for row in SETTINGS:
        given = flags.get(row.field)
        if not row.secret or not given or not given.strip():
            continue
        if row.field == "redis_url" and not urlsplit(given.strip()).password:
            continue
        said.append(
            f"{row.flag} shows its value in the command line, which every local user can read "
            f"(ps, /proc/<pid>/cmdline): set the environment variable {row.variable} instead"
        )
    return said


def short_secrets(settings: Settings) -> list[str]:
    """A line for ADMIN_TOKEN and for KEYS_STORE_SECRET when one is short enough to guess
    offline: the token exports every real key and each audit line shows a digest of it; a
    dump of Redis lets anyone try secrets against the encrypted keys."""
    said = []
    recipe = "make a strong one with: openssl rand -hex 32"
    token, secret = settings.admin_token, settings.keys_store_secret
    if token is not None and len(token) < MIN_SECRET_CHARS:
        said.append(
            f"ADMIN_TOKEN has fewer than {MIN_SECRET_CHARS} characters: it exports every real "
            f"key, and each audit line shows a digest of it, so it can be guessed; {recipe}"
        )
    if settings.keys_store == "redis" and secret is not None and len(secret) < MIN_SECRET_CHARS:
        said.append(
            f"KEYS_STORE_SECRET has fewer than {MIN_SECRET_CHARS} characters: a dump of Redis "
            f"lets anyone try secrets offline against the real keys it encrypts; {recipe}"
        )
    return said


def load(settings: Settings, environ: Mapping[str, str]) -> KeyRing:
    from proxy.app import load_keys  # the app's own defaults for keys.json's quotas

    return load_keys(settings, environ)


def _settings(
    argv: Sequence[str], environ: Mapping[str, str], problems: list[str]
) -> Settings | None:
    """The settings, or None; each bad value and each bad combination is added to `problems`."""
    try:
        flags = vars(parser().parse_args(list(argv)))
    except SettingError as error:
        problems.append(str(error))
        return None
    before = len(problems)
    for row in SETTINGS:
        raw, source = flags.get(row.field), row.flag
        if raw is None:
            raw, source = environ.get(row.variable), row.variable
        if raw is None or not raw.strip():
            continue
        try:
            row.parse(raw)
        except ValueError as error:
            problems.append(f"{source}: {error}")
    if len(problems) > before:
        return None  # the combinations are checked once every value reads
    try:
        return Settings.from_env(environ, argv)
    except SettingError as error:
        problems.append(str(error))
        return None


def _fallback(environ: Mapping[str, str]) -> Settings:
    """What the file checks need when the settings do not read: keys.json, PRICES_FILE (a
    bad setting hides neither's problems) and the defaults."""
    path = environ.get("KEYS_FILE_PATH", "").strip()
    fallback = Settings(keys_file_path=path) if path else Settings()
    return dataclasses.replace(fallback, prices_file=environ.get("PRICES_FILE", "").strip() or None)


def lookalikes(environ: Mapping[str, str]) -> list[str]:
    """One line per environment variable that is not a setting but nearly spells one."""
    known = [row.variable for row in SETTINGS]
    said = []
    for name in sorted(environ):
        if name in known or name.upper().startswith("OTEL_"):
            continue  # OTEL_*: the OpenTelemetry SDK's own, read by it
        if not name.isupper():  # quota_limit: a setting in the wrong case, or another's
            close = [name.upper()] if name.upper() in known else []
        else:
            close = difflib.get_close_matches(name, known, n=1, cutoff=LOOKALIKE_RATIO)
            close = close or _cut_short(name, known)
        if close:
            said.append(
                f"{name} is not a setting and is ignored: did you mean {' or '.join(close)}?"
            )
    return said


def _cut_short(name: str, known: Sequence[str]) -> list[str]:
    """The settings `name` begins at a '_' of theirs, when it has one itself (LOG_FILE:
    LOG_FILE_PATH; KEYS_FILE: KEYS_FILE_PATH and KEYS_FILE_WATCH): too short for the spelling
    check, and no setting's first word alone (LOG, SERVER), which other programs use."""
    if "_" not in name:
        return []
    return [variable for variable in known if variable.startswith(name + "_")]


def unpriced_budgets(key_ring: KeyRing, prices: Prices, settings: Settings) -> list[str]:
    """One line per key with a budget that can send requests to a provider (or a target's
    model) without a price: what it spends there is not counted against the budget."""
    said = []
    for key in key_ring:
        if not _has_budget(key):
            continue
        unpriced = sorted(
            {
                target.name
                for target in key.plans.every_target()
                if not prices.knows(target.provider.name, target.model)
            }
        )
        if unpriced:
            where = settings.prices_file or "PRICES_FILE"
            said.append(
                f"{settings.keys_file_path}: key '{key.name}' has a budget, but "
                f"{', '.join(unpriced)} has no price: its spend there counts nothing against "
                f"the budget; give it one in {where} (docs/quotas-and-money.md)"
            )
    return said


def misnamed_prices(key_ring: KeyRing, prices: Prices, settings: Settings) -> list[str]:
    """One line per provider PRICES_FILE prices that no key uses but whose name is close to
    one a key uses (a typo: it prices nothing, and that provider's requests go unpriced).
    A name close to none is another file's business (a prices file shared by deployments)."""
    used = sorted({target.provider.name for key in key_ring for target in key.plans.every_target()})
    said = []
    for name in sorted(prices.overridden_providers() - set(used)):
        close = difflib.get_close_matches(name, used, n=1, cutoff=LOOKALIKE_RATIO)
        if close:
            said.append(
                f"PRICES_FILE {settings.prices_file}: provider '{name}' is no provider of "
                f"{settings.keys_file_path} and prices nothing: did you mean '{close[0]}'?"
            )
    return said


def _has_budget(key: VirtualKey) -> bool:
    return key.budget is not None or (key.team is not None and key.team.scope.budget is not None)
