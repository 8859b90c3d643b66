"""keys.json targets, pools, fallbacks and routes parsed into upstream's Plans.

A key's entry names a provider and its real key (or a pool of keys), an optional model,
fallbacks tried in order, and routes chosen by the body's model. All of it is checked and
built once, at load, into the data that `upstream`'s one attempt loop walks.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Mapping
from typing import Any

from proxy.keys import fields
from proxy.keys.clouds import cloud_target, unread_cloud_field
from proxy.keys.fields import KeysFileError, UnknownProvider, check_fields, has_control
from proxy.upstream.providers import (
    API_DEFAULT_HEADERS,
    APIS,
    AUTH_STYLES,
    BUILTINS,
    Provider,
    searched,
)
from proxy.upstream.targets import (
    BALANCES,
    WEIGHTED,
    Credential,
    Plan,
    Plans,
    Pool,
    Route,
    Target,
)

MAX_WEIGHT = 1000


def parse_providers(path: str, section: Any) -> dict[str, Provider]:
    if not isinstance(section, dict):
        raise KeysFileError(f"{path}: 'providers' must be an object of name → settings")
    providers = dict(BUILTINS)
    for name, entry in section.items():
        if not name.strip():
            raise KeysFileError(f"{path}: a provider's name must be a non-empty string")
        if has_control(name):  # as a key's name: not quoted, it would garble the line
            raise KeysFileError(
                f"{path}: provider {name!r}: name contains a control character (a NUL, tab, "
                "line break or escape): a name must be printable text"
            )
        where = f"{path}: provider '{name}'"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: must be an object with base_url and auth")
        check_fields(where, entry, "provider")
        builtin = BUILTINS.get(name)
        base_url = entry.get("base_url", str(builtin.base_url) if builtin else None)
        if base_url is None or base_url == "":
            raise KeysFileError(
                f"{where}: base_url is missing (where its API is served, e.g. "
                "http://127.0.0.1:11434/v1)"
            )
        if not isinstance(base_url, str):
            raise KeysFileError(f"{where}: base_url must be an http(s) URL")
        url = fields.base_url(where, base_url)
        auth = entry.get("auth", builtin.auth if builtin else "bearer")
        if auth not in AUTH_STYLES:
            raise KeysFileError(f"{where}: auth must be {_one_of(AUTH_STYLES, auth)}")
        api = entry.get("api", builtin.api if builtin else "openai")
        if api not in APIS:
            raise KeysFileError(f"{where}: api must be {_one_of(APIS, api)}")
        extra = builtin.default_headers if builtin else API_DEFAULT_HEADERS.get(api, {})
        signing = builtin.signing if builtin else ""
        if signing:
            auth = "none"  # a cloud signs each request: no key header
        # A built-in's endpoints in each region stay (all of them: Vertex's global, us and eu,
        # Bedrock's control plane) unless the entry gives a base_url of its own (a private
        # endpoint, a test's fake): that one serves every region, and Bedrock's managed agents
        # too (`v1/...` under it, as under the anthropic SDK's own base_url).
        regional = builtin if builtin and "base_url" not in entry else None
        providers[name] = Provider(
            name,
            url,
            auth,
            extra,
            api,
            signing,
            regional.regional_url if regional else "",
            regional.region_urls if regional else {},
            regional.control_url if regional else "",
        )
    return providers


def _shown(given: object) -> str:
    """A provider name as a refusal quotes it: a long value (a real key put in the wrong
    field?) only by its length."""
    if isinstance(given, str) and len(given) > 32:
        return f"of {len(given)} characters (not shown)"
    return repr(given)


def _one_of(names: tuple[str, ...], given: object) -> str:
    """ "one of a, b, c", and the one meant when `given` is it in other letter cases. Nothing
    else given is echoed: a real key may have been put in the wrong field."""
    said = f"one of {', '.join(names)}"
    meant = given.lower() if isinstance(given, str) else None
    return f"{said} (in lowercase: {meant!r})" if meant in names else said


def parse_plans(
    key: str,
    entry: Mapping[str, Any],
    providers: Mapping[str, Provider],
    environ: Mapping[str, str],
) -> Plans:
    """A key's plans from its keys.json entry. Raises KeysFileError, starting with `key`.

    `environ`: where `api_key_env` and a cloud target's `…_env` fields are read.
    """
    own = None
    if "provider" in entry:
        own = _plan(key, entry, providers, environ, "")
    elif "fallbacks" in entry:
        raise KeysFileError(
            f"{key}: fallbacks needs the key's own provider (or put them in a route)"
        )
    raw_routes = entry.get("routes")
    if raw_routes is None:
        if own is None:
            raise KeysFileError(f"{key}: provider is missing (or give the key routes)")
        return Plans(own, served=_served(own, ()))
    if not isinstance(raw_routes, list) or not raw_routes:
        raise KeysFileError(f"{key}: routes must be a non-empty list of {{models, provider, ...}}")
    routes = []
    for index, raw in enumerate(raw_routes):
        at = f"routes[{index}]"
        if not isinstance(raw, dict):
            raise KeysFileError(f"{key}: {at} must be an object with models and a provider")
        check_fields(key, raw, "route", f"{at}.")
        patterns = raw.get("models")
        if not isinstance(patterns, list) or not patterns:
            raise KeysFileError(f"{key}: {at}.models must be a non-empty list of model patterns")
        if not all(isinstance(p, str) and p for p in patterns):
            raise KeysFileError(f"{key}: {at}.models must hold non-empty strings")
        for pattern in patterns:
            fields.model_name(key, f"{at}.models", pattern)
        plan = _plan(key, raw, providers, environ, f"{at}.")
        routes.append(Route(tuple(patterns), compile_patterns(patterns), plan))
    return Plans(own, tuple(routes), _served(own, routes))


def _served(own: Plan | None, routes: list[Route] | tuple[()]) -> str:
    """`Plans.served`: what answers a key's requests, in words the same in every process.

    Each target by its provider, base URL, model, project and account: a digest of its real
    keys (never a key), since a real key names the organization and project whose files,
    stored prompts and previous responses a request reads, as OpenAI-Organization and
    OpenAI-Project do (`lookup.ANSWER_HEADERS`)."""
    plans = [("*", own)] if own is not None else []
    plans += [(" ".join(route.patterns), route.plan) for route in routes]
    return "; ".join(
        f"{patterns} -> "
        + ", ".join(
            f"{t.provider.name} {t.provider.base_url} {t.model or ''} {t.project_path or ''} "
            + _account(t)
            for t in plan.targets
        )
        for patterns, plan in plans
    )


def _account(target: Target) -> str:
    """A digest of the target's real keys, in any order."""
    keys = sorted(credential.api_key for credential in target.pool.credentials)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]


def compile_patterns(patterns: list[str]) -> re.Pattern[str]:
    """Shell-style patterns as one compiled alternation."""
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def _plan(
    key: str,
    entry: Mapping[str, Any],
    providers: Mapping[str, Provider],
    environ: Mapping[str, str],
    where: str,
) -> Plan:
    first = _target(key, entry, providers, environ, where)
    targets = [first]
    fallbacks = entry.get("fallbacks", [])
    if not isinstance(fallbacks, list):
        raise KeysFileError(f"{key}: {where}fallbacks must be a list of targets")
    for index, raw in enumerate(fallbacks):
        at = f"{where}fallbacks[{index}]"
        if not isinstance(raw, dict):
            raise KeysFileError(f"{key}: {at} must be an object with a provider and a key")
        check_fields(key, raw, "target", f"{at}.")
        fallback = _target(key, raw, providers, environ, f"{at}.")
        if fallback.provider.api != first.provider.api:
            raise KeysFileError(
                f"{key}: {at}: provider '{fallback.provider.name}' speaks the {fallback.provider.api} "
                f"API but '{first.provider.name}' speaks the {first.provider.api} API; "
                "a fallback must speak the same API"
            )
        targets.append(fallback)
    credentials = [c for target in targets for c in target.pool.credentials]
    secrets = searched(c.api_key for c in credentials)  # placeholders left out
    signers = tuple(c.signer for c in credentials if c.signer is not None)
    return Plan(tuple(targets), secrets, _balance(key, entry, where), signers)


def _balance(key: str, entry: Mapping[str, Any], where: str) -> str:
    """How an entry chooses: its pool's keys, and (a key's or a route's) its targets."""
    balance = entry.get("balance", WEIGHTED)
    if balance not in BALANCES:
        raise KeysFileError(
            f"{key}: {where}balance must be one of {', '.join(map(repr, BALANCES))}"
        )
    return str(balance)


def _target(
    key: str,
    entry: Mapping[str, Any],
    providers: Mapping[str, Provider],
    environ: Mapping[str, str],
    where: str,
) -> Target:
    named = entry.get("provider")
    known = ", ".join(sorted(providers))
    if not isinstance(named, str):  # an object or a list cannot be looked up (nor shown)
        raise UnknownProvider(f"{key}: {where}provider must be a provider's name (known: {known})")
    provider = providers.get(named)
    if provider is None:
        raise UnknownProvider(
            f"{key}: {where}provider {_shown(named)} is unknown (known: {known})",
            provider=named if isinstance(named, str) else None,
        )
    if not provider.base_url.host:
        raise KeysFileError(
            f"{key}: {where}provider '{provider.name}' needs a base_url in 'providers'"
        )
    if provider.signing:
        name, regional, credential, project_path = cloud_target(
            f"{key}: {where}", entry, provider, environ
        )
        return Target(name, regional, Pool([credential]), None, project_path)
    unread_cloud_field(f"{key}: {where}", entry, provider)
    model = entry.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise KeysFileError(f"{key}: {where}model must be a non-empty string")
    if model is not None:
        fields.model_name(key, f"{where}model", model)
    name = provider.name if model is None else f"{provider.name}/{model}"
    return Target(name, provider, _pool(key, entry, environ, where, name), model)


def _pool(
    key: str, entry: Mapping[str, Any], environ: Mapping[str, str], where: str, name: str
) -> Pool:
    has_pool = "api_keys" in entry
    if has_pool and ("api_key" in entry or "api_key_env" in entry):
        raise KeysFileError(f"{key}: {where}set exactly one of api_key, api_key_env and api_keys")
    if not has_pool:
        return Pool([Credential(_real_key(key, entry, environ, where), f"{name}#1")])
    members = entry["api_keys"]
    if not isinstance(members, list) or not members:
        raise KeysFileError(
            f"{key}: {where}api_keys must be a non-empty list of {{api_key, weight}}"
        )
    credentials = []
    for index, member in enumerate(members):
        at = f"{where}api_keys[{index}]."
        if not isinstance(member, dict):
            raise KeysFileError(f"{key}: {at[:-1]} must be an object with api_key or api_key_env")
        check_fields(key, member, "pool entry", at)
        weight = member.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 < weight <= MAX_WEIGHT:
            raise KeysFileError(f"{key}: {at}weight must be an integer from 1 to {MAX_WEIGHT}")
        credentials.append(
            Credential(_real_key(key, member, environ, at), f"{name}#{index + 1}", weight)
        )
    return Pool(credentials, _balance(key, entry, where))


def _real_key(key: str, holder: Mapping[str, Any], environ: Mapping[str, str], at: str) -> str:
    """The real key of a target or a pool entry (`fields.real_key`), its messages naming `at`."""
    return fields.real_key(f"{key}: {at.rstrip('.')}" if at else key, holder, environ)
