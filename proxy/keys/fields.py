"""keys.json's fields: the names each level accepts, and the values several levels share.

A typo in keys.json must stop the start, not pass silently: a top-level `"provider"`
for `"providers"` would send traffic to the real provider instead of the intended
`base_url`. Every level of the file (the document, a provider, a key, its quota,
budget, targets, pool entries and routes) is checked by `check_fields`, against the
table below; each level's own parser then reads the values, with the parsers here for
what recurs (a real key, a base URL, a quota, model patterns). Every refusal is one
`KeysFileError` line naming the file, the key and the field, never a credential.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from yarl import URL

from proxy.quota.tracker import Budget, Limits
from proxy.record import REDACTED
from proxy.settings import MAX_BUDGET_USD, MAX_WINDOW_SECONDS


class KeysFileError(ValueError):
    """keys.json cannot be used; the message names the file, the key and the field.

    `problems`: every problem found in the file (each key and provider is checked even after
    one failed), the first being the message; the message says how many more there are.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems = tuple(problems) or (message,)
        more = len(self.problems) - 1
        if more:
            message += f" (and {more} more: python gateway.py --check lists every one)"
        super().__init__(message)


class UnknownField(KeysFileError):
    """A field no level of keys.json knows (a typo, most often): the admin API's 400."""


class UnknownProvider(KeysFileError):
    """A target names a provider neither built in nor declared: `provider`, the name (None
    when not a string). A declaration the file has but refused is said on its own."""

    def __init__(
        self, message: str, problems: Sequence[str] = (), provider: str | None = None
    ) -> None:
        super().__init__(message, problems)
        self.provider = provider


@dataclass(frozen=True, slots=True)
class Defaults:
    """The settings a key falls back to."""

    quota_enabled: bool
    requests: int
    tokens: int | None
    window_seconds: float
    budget: Budget | None = None  # BUDGET_USD and its window, for keys that name none
    budget_window_seconds: float = 2592000.0
    # Processes counting on their own (WORKERS other than 1 without REDIS_URL; 1: shared):
    # slots and team limits would then be multiplied by them, so keys.json is refused.
    unshared_workers: int = 1
    # OUTPUT_ALLOWANCE_TOKENS: what a request naming no output cap reserves (quota.py)
    output_allowance: int = 4096


# A cloud target's own fields (keys/clouds.py), wherever a target may be named.
CLOUD_FIELDS = frozenset(
    {
        "aws_access_key_id",
        "aws_access_key_id_env",
        "aws_secret_access_key",
        "aws_secret_access_key_env",
        "aws_session_token",
        "aws_session_token_env",
        "region",
        "project",
        "service_account_file",
        "service_account_json_env",
    }
)

# The fields each level of keys.json accepts, by the level's name in the error message.
FIELDS: Mapping[str, frozenset[str]] = {
    "top-level": frozenset({"providers", "virtual_keys", "teams"}),
    "team": frozenset({"quota", "budget", "max_in_flight", "queue_seconds", "created_at"}),
    "model quota": frozenset({"models", "requests", "tokens", "window_seconds"}),
    "provider": frozenset({"base_url", "auth", "api"}),
    "key": frozenset(
        {
            "provider",
            "api_key",
            "api_key_env",
            "api_keys",
            "balance",
            "model",
            "name",
            "quota",
            "allowed_models",
            "allow_client_secrets",
            "fallbacks",
            "routes",
            "budget",
            "stream_usage",
            "team",
            "max_in_flight",
            "queue_seconds",
            "model_quotas",
            "cache",
            "output_allowance",
            "created_at",
            "previous_key",
        }
    )
    | CLOUD_FIELDS,
    "cache": frozenset({"ttl_seconds", "scope"}),
    "quota": frozenset({"requests", "tokens", "window_seconds"}),
    "budget": frozenset({"usd", "window_seconds"}),
    "target": frozenset({"provider", "api_key", "api_key_env", "api_keys", "model", "balance"})
    | CLOUD_FIELDS,
    "pool entry": frozenset({"api_key", "api_key_env", "weight"}),
    "route": frozenset(
        {
            "models",
            "provider",
            "api_key",
            "api_key_env",
            "api_keys",
            "model",
            "fallbacks",
            "balance",
        }
    )
    | CLOUD_FIELDS,
}


# A provider's fields, and LiteLLM's name for base_url, as written on a key, a target or a
# route by someone who would set where its requests go there.
_PROVIDER_FIELDS = frozenset({"base_url", "api_base", "auth", "api"})


def check_fields(where: str, entry: Mapping[str, Any], level: str, prefix: str = "") -> None:
    """Refuse the first field `level` does not know. Raises KeysFileError.

    `where` starts the message ("keys.json: key 'alice'"); `prefix` names the field's
    parent ("quota." gives "quota.reqests"). The suggestion comes from difflib.
    """
    known = FIELDS[level]
    for name in entry:
        if name in known:
            continue
        if name in _PROVIDER_FIELDS and level in ("key", "target", "route"):
            field = "base_url" if name == "api_base" else name
            raise UnknownField(
                f"{where}: {f'{prefix}{name}'!r} is not a {level} field but a provider's field: give "
                f'it under "providers" ("providers": {{"my-server": {{"{field}": …}}}}) and '
                f'name that provider in "provider"'
            )
        close = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        fields = ", ".join(sorted(known))
        shown = repr(f"{prefix}{name}"[:80])  # repr: a newline in a name stays on one line
        raise UnknownField(f"{where}: {shown} is not a {level} field{hint}; known: {fields}")


def base_url(where: str, text: str) -> URL:
    """The provider's base URL; refused with credentials or a query, never echoing them."""
    if " " in text or not text.isprintable():
        # A pasted space would be sent encoded ('/v1%20/chat/completions'): a path no
        # provider serves, every request its 404.
        raise KeysFileError(
            f"{where}: base_url contains a space or a control character (a paste?); remove it"
        )
    try:
        url = URL(text)
    except ValueError:
        raise KeysFileError(f"{where}: base_url must be an http(s) URL") from None
    if url.user is not None or url.password is not None:
        # Upstream auth is the real key's job; a userinfo part would leak in every error.
        raise KeysFileError(
            f"{where}: base_url must not carry credentials (user:password@); "
            "put the real key in api_key or api_key_env"
        )
    if url.scheme not in ("http", "https") or not url.host:
        # Shown when it reads as a URL, less its query; else only by its length: it may be
        # the real key, put in the wrong field (never printed back, as for `provider`).
        if "://" in text:
            said = f", got {str(url.with_query(None).with_fragment(None))!r}"
        else:
            said = (
                f" such as http://127.0.0.1:11434/v1 ({len(text)} characters, not shown: a "
                "key itself goes in api_key)"
            )
        raise KeysFileError(f"{where}: base_url must be an http(s) URL{said}")
    if url.query_string or url.fragment:
        # The client's path and query are appended to base_url; a query here would break it.
        raise KeysFileError(f"{where}: base_url must have no query or fragment (after ? or #)")
    return url


def real_key(where: str, entry: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """The real key of an entry with exactly one of api_key and api_key_env. Raises KeysFileError."""
    has_key, has_env = "api_key" in entry, "api_key_env" in entry
    if has_key == has_env:
        raise KeysFileError(f"{where}: set exactly one of api_key and api_key_env")
    if has_key:
        value = entry["api_key"]
        if not isinstance(value, str) or not value.strip():
            raise KeysFileError(f"{where}: api_key must be a non-empty string")
        if value.strip() == REDACTED:
            raise KeysFileError(redacted(where, "api_key"))
        named = _REFERENCE.fullmatch(value.strip())
        if named is not None:
            variable = next(group for group in named.groups() if group)
            raise KeysFileError(
                f"{where}: api_key names the variable {variable}, and keys.json expands no "
                f'variables: write "api_key_env": "{variable}" in its place'
            )
        return _header_safe(where, "api_key", value.strip())
    variable = entry["api_key_env"]
    if not isinstance(variable, str) or not variable:
        raise KeysFileError(f"{where}: api_key_env must name an environment variable")
    value = environ.get(variable, "").strip()
    if not value:
        if _VARIABLE.fullmatch(variable) is None:  # the key itself, put in the wrong field?
            raise KeysFileError(
                f"{where}: api_key_env takes the name of an environment variable (such as "
                f"OPENAI_API_KEY), and no variable is named so ({len(variable)} characters, not "
                "shown: a key itself goes in api_key)"
            )
        raise KeysFileError(f"{where}: api_key_env {variable} is not set")
    return _header_safe(where, f"api_key_env {variable}", value)


def redacted(where: str, field: str) -> str:
    """Why a secret field holding what an export writes in its place is refused: a gateway
    restored from an export made without the real keys would send it as the key."""
    return (
        f"{where}: {field} is '{REDACTED}', as GET /admin/export writes it unless asked with "
        "include_real_keys=true: put the real key back (or name its variable in "
        f"{field}_env)"
    )


# An environment variable written as a shell or compose file would ("${NAME}", "$NAME") or
# as LiteLLM's config does ("os.environ/NAME"): no real key has this shape.
_REFERENCE = re.compile(
    r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)|os\.environ/([A-Za-z_][A-Za-z0-9_]*)"
)

# What api_key_env is shown as when its variable is unset: a name of an environment
# variable's shape, short. Anything else may be a real key put in the wrong field (an
# OpenAI or Anthropic key holds dashes; a Google one is 39 characters), never printed back.
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")

# A control character (C0, DEL or C1) or a Unicode line break: in a real key, which goes
# into a header, CR or LF would fail every request; in a name, which goes into log lines,
# metrics and messages, a NUL or a line break would garble them (orjson writes NEL, U+2028
# and U+2029 into a log line as they are, and str.splitlines() breaks the line there). The
# one rule for both (the admin API's names: keys.edits).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# The longest key or team name, in keys.json and through the admin API: a name is written
# into every log line of its key and labels every metric series of it.
MAX_NAME_CHARS = 200


def has_control(value: str) -> bool:
    """Whether `value` holds a control character (NUL to US, DEL, the C1 controls) or a
    Unicode line or paragraph separator."""
    return _CONTROL.search(value) is not None


# An Authorization header's schemes, as a real key pasted with its header's value starts.
_SCHEMES = frozenset({"bearer", "basic", "token"})


def _header_safe(where: str, source: str, value: str) -> str:
    if has_control(value):
        raise KeysFileError(f"{where}: {source} contains a control character (a line break?)")
    scheme, space, _ = value.partition(" ")
    if space and scheme.lower() in _SCHEMES:  # "Bearer sk-..." pasted whole
        raise KeysFileError(
            f"{where}: {source} starts with an authorization scheme ('Bearer ' pasted with the "
            "key?): put the key alone, the gateway adds the header's scheme"
        )
    if not value.isascii():
        try:  # a variable's bytes that are not UTF-8 come as lone surrogates (os.environ)
            value.encode()
        except UnicodeEncodeError:
            raise KeysFileError(
                f"{where}: {source} holds bytes that are not UTF-8 text (a file saved in "
                "another encoding?)"
            ) from None
    return value


def limits(where: str, quota: Any, defaults: Defaults) -> Limits | None:
    """A key's quota merged with the defaults; None when quotas are off. Raises KeysFileError."""
    if quota is None:
        quota = {}
    if not isinstance(quota, dict):
        raise KeysFileError(f"{where}: quota must be an object (requests, tokens, window_seconds)")
    check_fields(where, quota, "quota", "quota.")
    if not defaults.quota_enabled:
        return None
    requests = quota.get("requests", defaults.requests)
    tokens = quota.get("tokens", defaults.tokens)
    window = quota.get("window_seconds", defaults.window_seconds)
    if not positive_int(requests):
        raise KeysFileError(f"{where}: quota.requests must be a positive integer")
    if tokens is not None and not positive_int(tokens):
        raise KeysFileError(f"{where}: quota.tokens must be a positive integer or null")
    if not window_length(window):
        raise KeysFileError(f"{where}: quota.window_seconds must be {WINDOW_LENGTH}")
    return Limits(requests=requests, tokens=tokens, window_seconds=float(window))


def budget(where: str, entry: Mapping[str, Any], defaults: Defaults) -> Budget | None:
    """A key's budget, the default one when it names none; null: none. Raises KeysFileError."""
    if "budget" not in entry:
        return defaults.budget
    budget = entry["budget"]
    if budget is None:
        return None
    if not isinstance(budget, dict):
        raise KeysFileError(f"{where}: budget must be an object (usd, window_seconds)")
    check_fields(where, budget, "budget", "budget.")
    usd = budget.get("usd")
    window = budget.get("window_seconds", defaults.budget_window_seconds)
    if not positive_number(usd) or usd > MAX_BUDGET_USD:
        raise KeysFileError(
            f"{where}: budget.usd must be a positive number of dollars, at most {MAX_BUDGET_USD}"
        )
    if not window_length(window):
        raise KeysFileError(f"{where}: budget.window_seconds must be {WINDOW_LENGTH}")
    if defaults.unshared_workers != 1:  # only QUOTA_ENABLED=false lets such workers start
        raise KeysFileError(
            f"{where}: a budget with WORKERS other than 1 needs REDIS_URL: each worker would "
            "count its own spend, multiplying the budget"
        )
    return Budget(usd=float(usd), window_seconds=float(window))


def output_allowance(where: str, entry: Mapping[str, Any], defaults: Defaults) -> int:
    """The output tokens a request of the key that names no cap reserves: keys.json's
    `output_allowance`, else OUTPUT_ALLOWANCE_TOKENS. Raises KeysFileError."""
    allowance = entry.get("output_allowance", defaults.output_allowance)
    if not positive_int(allowance):
        raise KeysFileError(
            f"{where}: output_allowance must be a positive number of tokens (what a request "
            f"that names no max_tokens reserves), got {str(allowance)[:40]!r}"
        )
    return allowance


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """A key's response cache: how long an answer is kept, and who shares it.

    `scope`: keys naming the same scope read each other's entries; None: the key's own.
    """

    ttl_seconds: float
    scope: str | None = None


# A scope name is part of the operator's vocabulary: short, printable, no surprises in Redis.
_SCOPE = re.compile(r"[A-Za-z0-9._:-]{1,100}")


def cache(where: str, entry: Mapping[str, Any]) -> CachePolicy | None:
    """A key's cache: `{"ttl_seconds": N, "scope"?: name}`; absent: none. Raises KeysFileError."""
    if "cache" not in entry or entry["cache"] is None:
        return None
    policy = entry["cache"]
    if not isinstance(policy, dict):
        raise KeysFileError(f"{where}: cache must be an object (ttl_seconds, scope)")
    check_fields(where, policy, "cache", "cache.")
    ttl: Any = policy.get("ttl_seconds")
    if not window_length(ttl):  # Redis refuses a PX past its range: nothing would be stored
        raise KeysFileError(f"{where}: cache.ttl_seconds must be {WINDOW_LENGTH}")
    scope = policy.get("scope")
    if scope is not None and not (isinstance(scope, str) and _SCOPE.fullmatch(scope)):
        raise KeysFileError(
            f"{where}: cache.scope must be a name of 1 to 100 letters, digits or . _ : -"
        )
    return CachePolicy(ttl_seconds=float(ttl), scope=scope)


def positive_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def positive_number(value: object) -> TypeGuard[float]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return 0 < value < float("inf")


WINDOW_LENGTH = f"a positive number of seconds, at most {MAX_WINDOW_SECONDS} (ten years)"


def window_length(value: object) -> TypeGuard[float]:
    """A quota's or a budget's `window_seconds`: positive, and at most MAX_WINDOW_SECONDS."""
    return positive_number(value) and value <= MAX_WINDOW_SECONDS


def model_name(where: str, field: str, value: str) -> None:
    """Refuse a model name or pattern with a space at an end or a control character (a
    paste): it matches no request's model, so a route or a model quota would silently never
    apply, and a target's model would be sent as it is, for the provider's 404. Raises
    KeysFileError."""
    if value != value.strip() or has_control(value):
        raise KeysFileError(
            f"{where}: {field}: {value[:80]!r} has a space at an end or a control character "
            "(a paste?): remove it"
        )


def patterns(where: str, patterns: Any) -> re.Pattern[str] | None:
    """Shell-style model patterns as one compiled alternation; None: any model."""
    if patterns is None:
        return None
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise KeysFileError(f"{where}: allowed_models must be a list of model name patterns")
    for pattern in patterns:
        model_name(where, "allowed_models", pattern)
    # Shell-style patterns, compiled once into one alternation.
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
