"""Virtual keys: load and check keys.json once, then look a presented key up.

Everything is resolved at load: providers joined with their overrides, real keys read
(`api_key_env` from the environment), quotas merged with the defaults, model patterns
compiled. A bad file raises `KeysFileError` naming the file, the key's name and the
field. `VirtualKey` keeps the virtual and the real key out of its `repr`; logs, metrics
and errors only ever see `name` (the key masked, unless keys.json names it).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from yarl import URL

from proxy.errors import GatewayError
from proxy.providers import AUTH_STYLES, BUILTINS, Provider
from proxy.tracker import Limits


class KeysFileError(ValueError):
    """keys.json cannot be used; the message names the file, the key and the field."""


@dataclass(frozen=True, slots=True)
class VirtualKey:
    """A client's key, resolved: where it goes, with which real key, under which limits."""

    secret: str = field(repr=False)
    name: str
    id: str  # a digest of the secret: the tracker's handle, shared across processes
    provider: Provider
    api_key: str = field(repr=False)
    limits: Limits | None  # None: quotas off
    allowed_models: re.Pattern[str] | None = None  # None: any model

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or self.allowed_models.fullmatch(model) is not None


def masked(secret: str) -> str:
    """First 6 characters, `…`, last 4; short keys show less, never the whole key."""
    if len(secret) >= 12:
        return f"{secret[:6]}…{secret[-4:]}"
    if len(secret) >= 6:
        return f"{secret[:2]}…"
    return "…"


@dataclass(frozen=True, slots=True)
class Defaults:
    """The settings a key falls back to."""

    quota_enabled: bool
    requests: int
    tokens: int | None
    window_seconds: float


class KeyRing:
    """The loaded keys, looked up by the key a client presents."""

    def __init__(self, keys: Mapping[str, VirtualKey]) -> None:
        self._keys = dict(keys)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, headers: Mapping[str, str]) -> VirtualKey:
        """The key named by the request's headers. Raises 401."""
        secret = presented(headers)
        if not secret:
            raise GatewayError(
                401,
                "invalid_api_key",
                "No virtual key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
            )
        key = self._keys.get(secret)
        if key is None:
            raise GatewayError(
                401,
                "invalid_api_key",
                "Virtual key not found in the gateway's keys file. "
                "Check the key, or ask the gateway's operator to add it.",
            )
        return key

    def key_counts(self) -> dict[str, int]:
        """Provider name → number of keys, for /health."""
        counts: dict[str, int] = {}
        for key in self._keys.values():
            counts[key.provider.name] = counts.get(key.provider.name, 0) + 1
        return counts

    @classmethod
    def load(cls, path: str, environ: Mapping[str, str], defaults: Defaults) -> KeyRing:
        """Read and check keys.json. Raises KeysFileError."""
        try:
            with open(path, "rb") as file:
                raw = file.read()
        except FileNotFoundError:
            raise KeysFileError(
                f"{path}: no such file. Create it from keys.example.json "
                f"(cp keys.example.json {path}) or set KEYS_FILE_PATH"
            ) from None
        except OSError as error:
            raise KeysFileError(f"{path}: cannot be read ({error.strerror})") from None
        try:
            document = orjson.loads(raw.removeprefix(b"\xef\xbb\xbf"))  # editors may add a BOM
        except orjson.JSONDecodeError as error:
            raise KeysFileError(f"{path}: not valid JSON ({error})") from None
        return cls(_parse(path, document, environ, defaults))


def presented(headers: Mapping[str, str]) -> str | None:
    """The first credential present: Authorization Bearer, x-api-key, api-key, x-goog-api-key."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for name in ("x-api-key", "api-key", "x-goog-api-key"):
        value = headers.get(name)
        if value and value.strip():
            return value.strip()
    return None


def _parse(
    path: str, document: Any, environ: Mapping[str, str], defaults: Defaults
) -> dict[str, VirtualKey]:
    if not isinstance(document, dict):
        raise KeysFileError(f"{path}: must be a JSON object with 'virtual_keys'")
    providers = _providers(path, document.get("providers", {}))
    entries = document.get("virtual_keys")
    if not isinstance(entries, dict):
        raise KeysFileError(f"{path}: 'virtual_keys' must be an object of key → settings")
    keys: dict[str, VirtualKey] = {}
    names: set[str] = set()
    for secret, entry in entries.items():
        key = _key(path, secret, entry, providers, environ, defaults)
        if key.name in names:
            raise KeysFileError(f"{path}: key '{key.name}': name is used by another key")
        names.add(key.name)
        keys[secret] = key
    return keys


def _providers(path: str, section: Any) -> dict[str, Provider]:
    if not isinstance(section, dict):
        raise KeysFileError(f"{path}: 'providers' must be an object of name → settings")
    providers = dict(BUILTINS)
    for name, entry in section.items():
        where = f"{path}: provider '{name}'"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: must be an object with base_url and auth")
        builtin = BUILTINS.get(name)
        base_url = entry.get("base_url", str(builtin.base_url) if builtin else None)
        if not isinstance(base_url, str) or not base_url:
            raise KeysFileError(f"{where}: base_url must be an http(s) URL")
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise KeysFileError(f"{where}: base_url must be an http(s) URL, got {base_url!r}")
        auth = entry.get("auth", builtin.auth if builtin else "bearer")
        if auth not in AUTH_STYLES:
            raise KeysFileError(f"{where}: auth must be one of {', '.join(AUTH_STYLES)}")
        extra = builtin.default_headers if builtin else {}
        providers[name] = Provider(name, url, auth, extra)
    return providers


def _key(
    path: str,
    secret: str,
    entry: Any,
    providers: Mapping[str, Provider],
    environ: Mapping[str, str],
    defaults: Defaults,
) -> VirtualKey:
    if not isinstance(entry, dict):
        raise KeysFileError(f"{path}: key '{masked(secret)}': must be an object")
    name = entry.get("name", masked(secret))
    if not isinstance(name, str) or not name.strip():
        raise KeysFileError(f"{path}: key '{masked(secret)}': name must be a non-empty string")
    where = f"{path}: key '{name}'"
    if not secret.strip() or secret != secret.strip():
        raise KeysFileError(f"{where}: the virtual key must be non-empty, without spaces")
    provider = providers.get(entry.get("provider"))  # type: ignore[arg-type]
    if provider is None:
        known = ", ".join(sorted(providers))
        raise KeysFileError(
            f"{where}: provider {entry.get('provider')!r} is unknown (known: {known})"
        )
    if not provider.base_url.host:
        raise KeysFileError(f"{where}: provider '{provider.name}' needs a base_url in 'providers'")
    return VirtualKey(
        secret=secret,
        name=name,
        id=hashlib.sha256(secret.encode()).hexdigest()[:24],
        provider=provider,
        api_key=_real_key(where, entry, environ),
        limits=_limits(where, entry.get("quota"), defaults),
        allowed_models=_patterns(where, entry.get("allowed_models")),
    )


def _real_key(where: str, entry: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    has_key, has_env = "api_key" in entry, "api_key_env" in entry
    if has_key == has_env:
        raise KeysFileError(f"{where}: set exactly one of api_key and api_key_env")
    if has_key:
        value = entry["api_key"]
        if not isinstance(value, str) or not value.strip():
            raise KeysFileError(f"{where}: api_key must be a non-empty string")
        return value.strip()
    variable = entry["api_key_env"]
    if not isinstance(variable, str) or not variable:
        raise KeysFileError(f"{where}: api_key_env must name an environment variable")
    value = environ.get(variable, "").strip()
    if not value:
        raise KeysFileError(f"{where}: api_key_env {variable} is not set")
    return value


def _limits(where: str, quota: Any, defaults: Defaults) -> Limits | None:
    if not defaults.quota_enabled:
        return None
    if quota is None:
        quota = {}
    if not isinstance(quota, dict):
        raise KeysFileError(f"{where}: quota must be an object (requests, tokens, window_seconds)")
    for field_name in quota:
        if field_name not in ("requests", "tokens", "window_seconds"):
            raise KeysFileError(f"{where}: quota.{field_name} is not a quota field")
    requests = quota.get("requests", defaults.requests)
    tokens = quota.get("tokens", defaults.tokens)
    window = quota.get("window_seconds", defaults.window_seconds)
    if not _positive(requests, integer=True):
        raise KeysFileError(f"{where}: quota.requests must be a positive integer")
    if tokens is not None and not _positive(tokens, integer=True):
        raise KeysFileError(f"{where}: quota.tokens must be a positive integer or null")
    if not _positive(window, integer=False):
        raise KeysFileError(f"{where}: quota.window_seconds must be a positive number")
    return Limits(requests=requests, tokens=tokens, window_seconds=float(window))


def _positive(value: Any, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return 0 < value < float("inf")


def _patterns(where: str, patterns: Any) -> re.Pattern[str] | None:
    if patterns is None:
        return None
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise KeysFileError(f"{where}: allowed_models must be a list of model name patterns")
    # Shell-style patterns, compiled once into one alternation.
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
