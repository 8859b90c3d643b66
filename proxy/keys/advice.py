"""Warnings about a keys file that loads but looks like a mistake.

Refusals stop the start (keys.py); these only warn, one line each: the gateway can serve,
but someone probably meant something else.
"""

from __future__ import annotations

from proxy.keys.keys import KeyRing
from proxy.upstream.providers import Provider

# Every real key of keys.example.json holds the first: a keys.json copied and never filled
# in; the README's and the docs' keys.json end theirs with the second ("sk-…"), which no
# provider's key holds.
PLACEHOLDERS = ("replace-with-your", "…")


def placeholders(ring: KeyRing, path: str) -> list[str]:
    """One line naming every key that still holds a placeholder real key, or none."""
    named = sorted(
        {
            key.name
            for key in ring
            for target in key.plans.every_target()
            for credential in target.pool.credentials
            if any(placeholder in credential.api_key for placeholder in PLACEHOLDERS)
        }
    )
    if not named:
        return []
    return [
        f"{path}: {', '.join(repr(name) for name in named)} still "
        f"{'holds' if len(named) == 1 else 'hold'} a placeholder real key of "
        "keys.example.json or the docs ('sk-…'): the provider will refuse it. Put your "
        "provider keys in, or try "
        "the gateway without an account: make run FAKE=1"
    ]


# A virtual key is a password: under this many characters it can be guessed. The README's
# recipe makes one of 35 (vk_ and 24 random bytes).
STRONG_LENGTH = 20
STRONG_RECIPE = "python3 -c \"import secrets; print('vk_' + secrets.token_urlsafe(24))\""


def short_keys(ring: KeyRing, path: str) -> list[str]:
    """One line naming every key whose virtual key is short enough to guess, or none."""
    named = sorted(key.name for key in ring if len(key.secret) < STRONG_LENGTH)
    if not named:
        return []
    return [
        f"{path}: the virtual keys of {', '.join(repr(name) for name in named)} have fewer "
        f"than {STRONG_LENGTH} characters and can be guessed; make strong ones with "
        f"{STRONG_RECIPE}"
    ]


# How the providers' own keys begin (OpenAI's project, service account and admin keys,
# Anthropic's, Google's): a virtual key that begins so is a real key put in its place. A
# bare "sk-" is not one of them: LiteLLM's virtual keys, which clients keep, begin so.
PROVIDER_KEY_STARTS = ("sk-proj-", "sk-svcacct-", "sk-admin-", "sk-ant-", "AIza")


def provider_keys(ring: KeyRing, path: str) -> list[str]:
    """One line naming every key whose virtual key is a real key of the file, or begins as
    a provider's keys do, or none."""
    real = {
        credential.api_key
        for key in ring
        for target in key.plans.every_target()
        for credential in target.pool.credentials
    }
    named = sorted(
        key.name for key in ring if key.secret in real or key.secret.startswith(PROVIDER_KEY_STARTS)
    )
    if not named:
        return []
    return [
        f"{path}: the virtual {'key' if len(named) == 1 else 'keys'} of "
        f"{', '.join(repr(name) for name in named)} {'is' if len(named) == 1 else 'are'} a "
        "provider's key (pasted where the virtual key goes?): every client would hold it. The "
        "real key goes in api_key or api_key_env; give each client a virtual key of its own, "
        f"made with {STRONG_RECIPE}"
    ]


# The end of an endpoint's path: a base_url ending in one was pasted whole from a provider's
# page, and the client's path is added to it ('.../v1/chat/completions/chat/completions').
ENDPOINT_ENDS = ("/chat/completions", "/completions", "/embeddings", "/messages", "/responses")


def endpoint_paths(ring: KeyRing, path: str) -> list[str]:
    """One line per provider in use whose base_url ends with an endpoint's path, or stops
    short of its API's /v1 (`short_of_v1`), or none."""
    providers = {
        target.provider.name: target.provider for key in ring for target in key.plans.every_target()
    }
    lines = []
    for name, provider in sorted(providers.items()):
        url = str(provider.base_url).rstrip("/")
        end = next((end for end in ENDPOINT_ENDS if url.endswith(end)), None)
        if end is not None:
            lines.append(
                f"{path}: provider '{name}': base_url ends with '{end}', an endpoint's path: "
                f"the client's path is added to it ('...{end}/chat/completions'), which the "
                f"provider does not serve. Give the API's root: {url.removesuffix(end)}"
            )
        elif short_of_v1(provider):
            sent = "messages" if provider.api == "anthropic" else "chat/completions"
            lines.append(
                f"{path}: provider '{name}': base_url does not end with /v1: the client's path "
                f"after /v1/ is added to it ('{url}/{sent}'), which the provider does not "
                f"serve. Give the API's root: {url}/v1"
            )
    return lines


def short_of_v1(provider: Provider) -> bool:
    """Whether base_url stops short of the /v1 its API is under: an Anthropic API anywhere
    (the SDK's base_url, to which it adds /v1 itself), or OpenAI's at a server's root. A
    declared OpenAI-compatible provider at a root may be a server's own API (Ollama's)."""
    if provider.signing:
        return False  # a cloud's, signed: its base_url is the built-in's or a region's
    ends = provider.base_url.path.rstrip("/")
    if provider.api == "anthropic":
        return not ends.endswith("/v1")
    return provider.name == "openai" and ends == ""
