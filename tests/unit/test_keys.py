"""keys.json: the seed format, overrides, real keys from the environment, refusals."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.errors import GatewayError
from proxy.keys.fields import check_fields
from proxy.keys.keys import Defaults, KeyRing, KeysFileError, masked

DEFAULTS = Defaults(quota_enabled=True, requests=100, tokens=None, window_seconds=3600.0)


def load(
    tmp_path: Path,
    document: Any,
    environ: dict[str, str] | None = None,
    defaults: Defaults = DEFAULTS,
) -> KeyRing:
    path = tmp_path / "keys.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return KeyRing.load(str(path), environ or {}, defaults)


def test_the_seed_format_loads_unchanged(tmp_path: Path) -> None:
    ring = load(
        tmp_path,
        {
            "virtual_keys": {
                "vk_user1_openai": {"provider": "openai", "api_key": "sk-real-openai-key"}
            }
        },
    )
    key = ring.authenticate(CIMultiDict({"Authorization": "Bearer vk_user1_openai"}))
    assert (
        key.provider.name == "openai" and str(key.provider.base_url) == "https://api.openai.com/v1"
    )
    assert key.api_key == "sk-real-openai-key"
    assert key.name == masked("vk_user1_openai") == "vk_u…05c4fa"
    assert key.limits is not None and key.limits.requests == 100 and key.limits.tokens is None


def test_no_secret_is_in_a_keys_repr(tmp_path: Path) -> None:
    ring = load(
        tmp_path,
        {
            "virtual_keys": {
                "vk_user1_openai": {"provider": "openai", "api_key": "sk-real-openai-key"}
            }
        },
    )
    text = repr(list(ring))
    assert "vk_user1_openai" not in text and "sk-real-openai-key" not in text


def test_masking_shows_at_most_four_characters_and_a_short_hash() -> None:
    assert masked("vk_user2_anthropic") == "vk_u…e2722b"
    for secret in ("a", "ab", "abc1234", "abcdefghijk", "abcdefghijkl", "abcdefghijklmnop"):
        shown, _, digest = masked(secret).partition("…")
        assert len(shown) <= 4 and secret.startswith(shown) and len(digest) == 6
        assert len(shown) <= len(secret) // 3  # never most of a short key
    # The hash tells apart keys that share their first characters.
    assert masked("vk_alice_0000000") != masked("vk_alice_0000001")


@pytest.mark.parametrize("header", ["Authorization", "x-api-key", "api-key", "x-goog-api-key"])
def test_a_key_is_read_from_each_credential_header(tmp_path: Path, header: str) -> None:
    ring = load(
        tmp_path, {"virtual_keys": {"vk_a_1234567890": {"provider": "openai", "api_key": "sk-x"}}}
    )
    value = "Bearer vk_a_1234567890" if header == "Authorization" else "vk_a_1234567890"
    assert ring.authenticate(CIMultiDict({header: value})).api_key == "sk-x"


def test_the_first_present_credential_header_wins(tmp_path: Path) -> None:
    ring = load(
        tmp_path, {"virtual_keys": {"vk_a_1234567890": {"provider": "openai", "api_key": "sk-x"}}}
    )
    with pytest.raises(GatewayError):
        ring.authenticate(
            CIMultiDict({"Authorization": "Bearer vk_wrong_000000", "x-api-key": "vk_a_1234567890"})
        )


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer "},
        {"x-api-key": "vk_nope_1234567"},
    ],
)
def test_missing_or_unknown_keys_get_401(tmp_path: Path, headers: dict[str, str]) -> None:
    ring = load(
        tmp_path, {"virtual_keys": {"vk_a_1234567890": {"provider": "openai", "api_key": "sk-x"}}}
    )
    with pytest.raises(GatewayError) as refused:
        ring.authenticate(CIMultiDict(headers))
    assert refused.value.status == 401 and "vk_nope" not in refused.value.message


def test_overrides_custom_providers_env_keys_quotas_and_patterns(tmp_path: Path) -> None:
    ring = load(
        tmp_path,
        {
            "providers": {
                "openai": {"base_url": "http://127.0.0.1:9/v1"},
                "local-vllm": {"base_url": "http://10.0.0.5:8000/v1", "auth": "none"},
                "azure": {"base_url": "https://res.openai.azure.com/openai"},
            },
            "virtual_keys": {
                "vk_one_12345678": {"provider": "openai", "api_key": "sk-1"},
                "vk_two_12345678": {
                    "provider": "anthropic",
                    "api_key_env": "ANTHROPIC_API_KEY",
                    "name": "user2",
                    "quota": {"requests": 1000, "tokens": 200000, "window_seconds": 60},
                    "allowed_models": ["claude-3-5-haiku-*", "claude-sonnet-4-*"],
                },
                "vk_three_1234567": {"provider": "local-vllm", "api_key": "unused", "name": "vllm"},
                "vk_four_12345678": {"provider": "azure", "api_key": "az-1", "name": "az"},
                "vk_five_12345678": {"provider": "gemini", "api_key": "g-1", "name": "gem"},
            },
        },
        environ={"ANTHROPIC_API_KEY": "sk-ant-from-env"},
    )
    by_name = {key.name: key for key in ring}
    assert str(by_name[masked("vk_one_12345678")].provider.base_url) == "http://127.0.0.1:9/v1"
    two = by_name["user2"]
    assert two.api_key == "sk-ant-from-env" and two.provider.auth == "x-api-key"
    assert two.limits is not None and (
        two.limits.requests,
        two.limits.tokens,
        two.limits.window_seconds,
    ) == (1000, 200000, 60.0)
    assert two.allows("claude-3-5-haiku-20241022") and two.allows("claude-sonnet-4-5")
    assert not two.allows("claude-opus-4-1") and not two.allows("xclaude-3-5-haiku-1")
    assert by_name["vllm"].provider.auth == "none"
    assert by_name["az"].provider.credential_headers("az-1") == {"api-key": "az-1"}
    assert by_name["gem"].provider.base_url.host == "generativelanguage.googleapis.com"
    assert ring.key_counts() == {
        "openai": 1,
        "anthropic": 1,
        "local-vllm": 1,
        "azure": 1,
        "gemini": 1,
    }


def test_quotas_off_means_no_limits(tmp_path: Path) -> None:
    off = Defaults(quota_enabled=False, requests=100, tokens=None, window_seconds=3600.0)
    ring = load(
        tmp_path,
        {
            "virtual_keys": {
                "vk_a_1234567890": {
                    "provider": "openai",
                    "api_key": "sk-x",
                    "quota": {"requests": 5},
                }
            }
        },
        defaults=off,
    )
    assert next(iter(ring)).limits is None


@pytest.mark.parametrize(
    ("document", "environ", "says"),
    [
        ("{not json", {}, "not valid JSON"),
        ("[]", {}, "must be a JSON object"),
        ({"virtual_keys": []}, {}, "'virtual_keys' must be an object"),
        (
            {
                "virtual_keys": {
                    "vk_a_123456789": {"provider": "nope", "api_key": "x", "name": "alice"}
                }
            },
            {},
            "key 'alice': provider 'nope' is unknown",
        ),
        (
            {"virtual_keys": {"vk_a_123456789": {"provider": "openai", "name": "alice"}}},
            {},
            "key 'alice': set exactly one of api_key and api_key_env",
        ),
        (
            {
                "virtual_keys": {
                    "vk_a_123456789": {
                        "provider": "openai",
                        "name": "alice",
                        "api_key": "x",
                        "api_key_env": "Y",
                    }
                }
            },
            {},
            "key 'alice': set exactly one",
        ),
        (
            {
                "virtual_keys": {
                    "vk_a_123456789": {
                        "provider": "openai",
                        "name": "alice",
                        "api_key_env": "MISSING_KEY",
                    }
                }
            },
            {},
            "key 'alice': api_key_env MISSING_KEY is not set",
        ),
        (
            {
                "virtual_keys": {
                    "vk_a_123456789": {
                        "provider": "openai",
                        "name": "alice",
                        "api_key": "x",
                        "quota": {"requests": -1},
                    }
                }
            },
            {},
            "key 'alice': quota.requests",
        ),
        (
            {
                "virtual_keys": {
                    "vk_a_123456789": {
                        "provider": "openai",
                        "name": "alice",
                        "api_key": "x",
                        "allowed_models": "gpt-*",
                    }
                }
            },
            {},
            "key 'alice': allowed_models",
        ),
        (
            {
                "virtual_keys": {
                    "vk_a_123456789": {
                        "provider": "openai",
                        "name": "alice",
                        "api_key": "x",
                        "allow_client_secrets": "yes",
                    }
                }
            },
            {},
            "key 'alice': allow_client_secrets must be true or false",
        ),
        (
            {
                "virtual_keys": {
                    "vk_a_123456789": {
                        "provider": "openai",
                        "name": "alice",
                        "api_key": "x",
                        "allow_client_secrets": True,
                        "allowed_models": ["gpt-4o-mini"],
                    }
                }
            },
            {},
            "key 'alice': allow_client_secrets cannot go with allowed_models",
        ),
        (
            {
                "virtual_keys": {
                    "vk_a_123456789": {"provider": "azure", "name": "alice", "api_key": "x"}
                }
            },
            {},
            "key 'alice': provider 'azure' needs a base_url",
        ),
        (
            {"providers": {"x": {"base_url": "ftp://h"}}, "virtual_keys": {}},
            {},
            "provider 'x': base_url must be an http(s) URL",
        ),
        (
            {"providers": {"x": {"base_url": "http://h", "auth": "cookie"}}, "virtual_keys": {}},
            {},
            "provider 'x': auth must be one of",
        ),
        (
            {
                "virtual_keys": {
                    "vk_a_123456789": {"provider": "openai", "api_key": "x", "name": "same"},
                    "vk_b_123456789": {"provider": "openai", "api_key": "y", "name": "same"},
                }
            },
            {},
            "key 'same': name is used",
        ),
    ],
)
def test_a_bad_keys_file_is_refused_naming_file_key_and_field(
    tmp_path: Path, document: Any, environ: dict[str, str], says: str
) -> None:
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, document, environ)
    message = str(refused.value)
    assert message.startswith(str(tmp_path / "keys.json")) and says in message
    assert "\n" not in message


def test_a_missing_keys_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match="keys.example.json"):
        KeyRing.load(str(tmp_path / "absent.json"), {}, DEFAULTS)


def test_a_keys_file_saved_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(
            {"virtual_keys": {"vk_bom_123456789": {"provider": "openai", "api_key": "sk-x"}}}
        ).encode()
    )
    assert len(KeyRing.load(str(path), {}, DEFAULTS)) == 1


@pytest.mark.parametrize(
    ("document", "says"),
    [
        (
            {"provider": {"openai": {"base_url": "http://127.0.0.1:9/v1"}}, "virtual_keys": {}},
            "'provider' is not a top-level field (did you mean 'providers'?)",
        ),
        (
            {
                "providers": {"openai": {"baseurl": "http://127.0.0.1:9/v1"}},
                "virtual_keys": {"vk_a_123456789": {"provider": "openai", "api_key": "x"}},
            },
            "provider 'openai': 'baseurl' is not a provider field (did you mean 'base_url'?)",
        ),
        (
            {
                "virtual_keys": {
                    "vk_a_123456789": {
                        "provider": "openai",
                        "api_key": "x",
                        "name": "alice",
                        "qouta": {"requests": 5},
                    }
                }
            },
            "key 'alice': 'qouta' is not a key field (did you mean 'quota'?)",
        ),
        (
            {
                "virtual_keys": {
                    "vk_a_123456789": {
                        "provider": "openai",
                        "api_key": "x",
                        "name": "alice",
                        "quota": {"reqests": 5},
                    }
                }
            },
            "key 'alice': 'quota.reqests' is not a quota field (did you mean 'quota.requests'?)",
        ),
        (
            {
                "virtual_keys": {
                    "vk_a_123456789": {
                        "provider": "openai",
                        "api_key": "x",
                        "name": "alice",
                        "colour": "blue",
                    }
                }
            },
            "key 'alice': 'colour' is not a key field; known: ",
        ),
    ],
)
def test_an_unknown_field_at_any_level_is_refused_with_a_suggestion(
    tmp_path: Path, document: Any, says: str
) -> None:
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, document)
    message = str(refused.value)
    assert message.startswith(str(tmp_path / "keys.json")) and says in message, message
    assert "\n" not in message


@pytest.mark.parametrize("field", ["base_url", "api_base", "auth"])
def test_a_providers_field_written_on_a_key_says_where_it_goes(tmp_path: Path, field: str) -> None:
    # {"provider": "openai", "api_key": ..., "base_url": "http://10.0.0.5:8000/v1"} (LiteLLM's
    # config puts api_base beside each model) was refused with the key fields' list alone:
    # base_url is in none of them, and nothing said it goes under "providers".
    entry = {"provider": "openai", "api_key": "x", "name": "alice", field: "http://h:8000/v1"}
    routed = {"name": "bob", "routes": [{"models": ["*"], "provider": "openai", "api_key": "y"}]}
    routed["routes"][0][field] = "http://h:8000/v1"
    for name, document in [
        ("key 'alice'", {"virtual_keys": {"vk_a_123456789": entry}}),
        ("key 'bob'", {"virtual_keys": {"vk_b_123456789": routed}}),
    ]:
        with pytest.raises(KeysFileError) as refused:
            load(tmp_path, document)
        message = str(refused.value)
        assert f"{name}: " in message and "did you mean" not in message, message
        assert 'a provider\'s field: give it under "providers"' in message, message
        assert "\n" not in message


def test_a_typo_in_quota_is_refused_even_with_quotas_off(tmp_path: Path) -> None:
    off = Defaults(quota_enabled=False, requests=100, tokens=None, window_seconds=3600.0)
    document = {
        "virtual_keys": {
            "vk_a_123456789": {"provider": "openai", "api_key": "x", "quota": {"token": 5}}
        }
    }
    with pytest.raises(KeysFileError, match="did you mean 'quota.tokens'"):
        load(tmp_path, document, defaults=off)


def test_every_field_of_this_rounds_format_passes_the_check() -> None:
    levels = {
        "top-level": ["providers", "virtual_keys"],
        "provider": ["base_url", "auth", "api"],
        "key": [
            "provider", "api_key", "api_key_env", "api_keys", "model", "name", "quota",
            "allowed_models", "fallbacks", "routes", "budget", "stream_usage",
        ],
        "quota": ["requests", "tokens", "window_seconds"],
        "budget": ["usd", "window_seconds"],
        "target": ["provider", "api_key", "api_key_env", "api_keys", "model"],
        "pool entry": ["api_key", "api_key_env", "weight"],
        "route": [
            "models", "provider", "api_key", "api_key_env", "api_keys", "model", "fallbacks",
        ],
    }  # fmt: skip
    for level, names in levels.items():
        check_fields("keys.json: somewhere", dict.fromkeys(names), level)
        with pytest.raises(KeysFileError, match=f"'nope' is not a {level} field"):
            check_fields("keys.json: somewhere", {"nope": 1}, level)


def test_an_empty_virtual_keys_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match="'virtual_keys' is empty"):
        load(tmp_path, {"virtual_keys": {}})


@pytest.mark.parametrize(
    ("base_url", "says"),
    [
        ("http://admin:hunter2@127.0.0.1:9/v1", "must not carry credentials"),
        ("https://user@api.example.com/v1", "must not carry credentials"),
        ("http://127.0.0.1:9/v1?api-version=1", "no query"),
        ("http://127.0.0.1:9/v1#x", "no query or fragment"),
        # the real key put in the wrong field, and a URL that is not http(s) with a query
        ("hunter2-sk-real-0123456789abcdef", "must be an http(s) URL such as http://"),
        ("ftp://127.0.0.1/v1?key=hunter2", "must be an http(s) URL, got 'ftp://127.0.0.1/v1'"),
    ],
)
def test_a_base_url_with_credentials_or_a_query_is_refused_without_echoing_it(
    tmp_path: Path, base_url: str, says: str
) -> None:
    document = {
        "providers": {"openai": {"base_url": base_url}},
        "virtual_keys": {"vk_a_123456789": {"provider": "openai", "api_key": "x"}},
    }
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, document)
    message = str(refused.value)
    assert says in message and "hunter2" not in message and "admin" not in message
    assert "user@" not in message


@pytest.mark.parametrize(
    "base_url",
    [
        "https://api.groq.com/openai/v1 ",  # pasted with a trailing space
        " https://api.groq.com/openai/v1",
        "https://api.groq.com/openai/v1\t",
        "https://api.groq.com/open ai/v1",
        "http://127.0.0.1:11434/v1\n",
    ],
)
def test_a_base_url_with_a_space_is_refused_not_sent_to_a_path_no_provider_serves(
    tmp_path: Path, base_url: str
) -> None:
    # A trailing space became '/openai/v1%20/chat/completions' upstream: every request a
    # provider's 404, while the file loaded and `--check` said the gateway would start.
    document = {
        "providers": {"groq": {"base_url": base_url}},
        "virtual_keys": {"vk_a_123456789": {"provider": "groq", "api_key": "x", "name": "a"}},
    }
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, document)
    assert "provider 'groq': base_url contains a space" in refused.value.problems[0]


@pytest.mark.parametrize(
    ("declared", "says"),
    [
        ({"auth": "bearer"}, "provider 'groq': base_url is missing"),
        ({"base_url": None}, "provider 'groq': base_url is missing"),
        (
            {"base_url": "https://api.groq.com/openai/v1", "auth": "Bearer"},
            "provider 'groq': auth must be one of bearer, x-api-key, api-key, x-goog-api-key, "
            "none (in lowercase: 'bearer')",
        ),
        (
            {"base_url": "https://api.groq.com/openai/v1", "api": "OpenAI"},
            "provider 'groq': api must be one of openai, anthropic, bedrock, vertex "
            "(in lowercase: 'openai')",
        ),
    ],
)
def test_a_bad_provider_declaration_says_what_to_write(
    tmp_path: Path, declared: dict[str, Any], says: str
) -> None:
    # A declaration without base_url was told "base_url must be an http(s) URL", as if one
    # were there; "Bearer" was told the list holding "bearer". A value that is not one of
    # them is not echoed: it may be the real key, put in the wrong field.
    document = {
        "providers": {"groq": declared},
        "virtual_keys": {"vk_a_123456789": {"provider": "groq", "api_key": "x", "name": "a"}},
    }
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, document)
    assert says in refused.value.problems[0], refused.value.problems


def test_an_auth_that_is_no_style_is_not_echoed(tmp_path: Path) -> None:
    document = {
        "providers": {"groq": {"base_url": "https://h/v1", "auth": "Bearer gsk_secret_123"}},
        "virtual_keys": {"vk_a_123456789": {"provider": "groq", "api_key": "x", "name": "a"}},
    }
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, document)
    assert "gsk_secret" not in str(refused.value.problems)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "a provider's name must be a non-empty string"),
        ("  ", "a provider's name must be a non-empty string"),
        ("gro\nq", "provider 'gro\\nq': name contains a control character"),
    ],
)
def test_a_provider_name_that_is_empty_or_holds_a_control_character_is_refused(
    tmp_path: Path, name: str, says: str
) -> None:
    # "" served as a provider named nothing in logs and metrics; a line break in a name
    # split --check's one line per problem in two.
    document = {
        "providers": {name: {"base_url": "ftp://x"}},
        "virtual_keys": {"vk_a_123456789": {"provider": name, "api_key": "x", "name": "a"}},
    }
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, document)
    assert says in refused.value.problems[0], refused.value.problems
    assert all("\n" not in problem for problem in refused.value.problems)


def test_a_key_of_a_refused_provider_declaration_is_not_also_called_unknown(
    tmp_path: Path,
) -> None:
    # The declaration's own problem is the one to fix; "provider 'groq' is unknown (known:
    # ...)" on top sent the reader looking for a misspelt name that was spelt right.
    document = {
        "providers": {"groq": {"base_url": "https://api.groq.com/openai/v1", "auth": "Bearer"}},
        "virtual_keys": {
            "vk_a_123456789": {"provider": "groq", "api_key": "x", "name": "a"},
            "vk_b_123456789": {
                "provider": "openai",
                "api_key": "y",
                "name": "b",
                "fallbacks": [{"provider": "groq", "api_key": "z"}],
            },
            "vk_c_123456789": {"provider": "grok", "api_key": "w", "name": "c"},
        },
    }
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, document)
    problems = refused.value.problems
    assert len(problems) == 2, problems
    assert "provider 'groq': auth must be one of" in problems[0]
    assert "key 'c': provider 'grok' is unknown" in problems[1]


@pytest.mark.parametrize("real", ["sk-abc\r\nX-Evil: 1", "sk-abc\ndef", "sk-\x00x"])
def test_a_real_key_with_a_control_character_is_refused(tmp_path: Path, real: str) -> None:
    document = {"virtual_keys": {"vk_a_123456789": {"provider": "openai", "api_key": real}}}
    with pytest.raises(KeysFileError, match="api_key contains a control character") as refused:
        load(tmp_path, document)
    assert "sk-abc" not in str(refused.value)
    with pytest.raises(KeysFileError, match="api_key_env REAL contains a control character"):
        env_document = {
            "virtual_keys": {"vk_a_123456789": {"provider": "openai", "api_key_env": "REAL"}}
        }
        load(tmp_path, env_document, environ={"REAL": real})


@pytest.mark.parametrize("real", ["Bearer sk-abc0123456789", "bearer  sk-abc0123456789"])
def test_a_real_key_pasted_with_its_scheme_is_refused(tmp_path: Path, real: str) -> None:
    # "Bearer sk-..." pasted whole was sent as 'Authorization: Bearer Bearer sk-...': every
    # request the provider's 401, and the start said nothing.
    document = {"virtual_keys": {"vk_a_123456789": {"provider": "openai", "api_key": real}}}
    with pytest.raises(
        KeysFileError, match="api_key starts with an authorization scheme"
    ) as refused:
        load(tmp_path, document)
    assert "sk-abc" not in str(refused.value)
    env_document = {"virtual_keys": {"vk_a_123456789": {"provider": "openai", "api_key_env": "R"}}}
    with pytest.raises(KeysFileError, match="api_key_env R starts with an authorization scheme"):
        load(tmp_path, env_document, environ={"R": real})
    # A dummy key of a provider without auth may be any text.
    for dummy in ("not used", "token", "bearer"):
        document["virtual_keys"]["vk_a_123456789"]["api_key"] = dummy
        assert len(load(tmp_path, document)) == 1


@pytest.mark.parametrize(
    "reference", ["${OPENAI_API_KEY}", "$OPENAI_API_KEY", "os.environ/OPENAI_API_KEY"]
)
def test_an_api_key_naming_a_variable_is_refused_pointing_to_api_key_env(
    tmp_path: Path, reference: str
) -> None:
    # "api_key": "${OPENAI_API_KEY}" (compose's habit; os.environ/... is LiteLLM's) was
    # loaded as the key itself: the start said nothing, and every request of the key got the
    # provider's 401 for the text '${OPENAI_API_KEY}'. keys.json expands no variables.
    document = {
        "virtual_keys": {
            "vk_a_123456789": {"provider": "openai", "api_key": reference, "name": "alice"}
        }
    }
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, document, environ={"OPENAI_API_KEY": "sk-real-0123456789"})
    message = str(refused.value)
    assert "key 'alice'" in message and "api_key names the variable OPENAI_API_KEY" in message
    assert '"api_key_env": "OPENAI_API_KEY"' in message and "sk-real" not in message
    # A real key holding a '$' later on is a key.
    document["virtual_keys"]["vk_a_123456789"]["api_key"] = "sk-abc$def0123456789"
    assert len(load(tmp_path, document)) == 1


def test_a_real_key_from_an_environment_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    # os.environ hands REAL=$'sk-abc\xffdef...' over as "sk-abc\udcffdef...": it was loaded,
    # and every request of the key was then a 500 (its echo search encoded it).
    document = {"virtual_keys": {"vk_a_123456789": {"provider": "openai", "api_key_env": "REAL"}}}
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, document, environ={"REAL": "sk-abc\udcffdefghijklmnop"})
    assert "api_key_env REAL holds bytes that are not UTF-8 text" in str(refused.value)
    assert "sk-abc" not in str(refused.value)
    assert load(tmp_path, document, environ={"REAL": "sk-abcdefghijklmnop"})


def test_every_real_key_of_pools_fallbacks_and_routes_is_known_for_redaction(
    tmp_path: Path,
) -> None:
    ring = load(
        tmp_path,
        {
            "virtual_keys": {
                "vk_a_123456789": {
                    "provider": "openai",
                    "api_keys": [{"api_key": "sk-pool-1"}, {"api_key": "sk-pool-2"}],
                    "fallbacks": [{"provider": "gemini", "api_key": "sk-ant-fallback"}],
                    "routes": [
                        {"models": ["claude-*"], "provider": "anthropic", "api_key": "sk-route"}
                    ],
                },
                "vk_b_123456789": {"provider": "openai", "api_key": "sk-plain"},
            }
        },
    )
    assert ring.real_keys() == {"sk-pool-1", "sk-pool-2", "sk-ant-fallback", "sk-route", "sk-plain"}


@pytest.mark.parametrize("allowance", [0, -5, 1.5, "4096", True, None])
def test_an_output_allowance_that_is_not_a_positive_number_of_tokens_is_refused(
    tmp_path: Path, allowance: Any
) -> None:
    entry = {
        "provider": "openai",
        "api_key": "sk-x",
        "name": "agent",
        "output_allowance": allowance,
    }
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, {"virtual_keys": {"vk_agent_123456789": entry}})
    message = str(refused.value)
    assert "key 'agent': output_allowance must be a positive number of tokens" in message


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"quota": {"window_seconds": 1e308}}, "quota.window_seconds"),
        ({"budget": {"usd": 5, "window_seconds": 1e17}}, "budget.window_seconds"),
        (
            {"model_quotas": [{"models": ["gpt-*"], "requests": 5, "window_seconds": 1e308}]},
            "model_quotas[0].window_seconds",
        ),
    ],
)
def test_a_window_longer_than_ten_years_is_refused(
    tmp_path: Path, entry: dict[str, Any], field: str
) -> None:
    # Such windows loaded, and the first 429 they gave was a 500 (retry-after-ms overflowed;
    # a budget's "frees up at" date did from 1e17 seconds).
    key = {"provider": "openai", "api_key": "sk-x", "name": "agent", **entry}
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, {"virtual_keys": {"vk_agent_123456789": key}})
    assert (
        f"key 'agent': {field} must be a positive number of seconds, at most 315360000 "
        "(ten years)" in str(refused.value)
    )


def test_a_cache_ttl_longer_than_ten_years_is_refused(tmp_path: Path) -> None:
    # Such a ttl loaded, and with REDIS_URL nothing was ever stored (Redis refuses the PX)
    # while each store counted as a lost Redis in llm_gateway_redis_errors_total.
    key = {"provider": "openai", "api_key": "sk-x", "name": "agent", "cache": {"ttl_seconds": 1e20}}
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, {"virtual_keys": {"vk_agent_123456789": key}})
    assert (
        "key 'agent': cache.ttl_seconds must be a positive number of seconds, at most 315360000 "
        "(ten years)" in str(refused.value)
    )


def test_a_teams_window_longer_than_ten_years_is_refused(tmp_path: Path) -> None:
    document = {
        "teams": {"ml": {"quota": {"requests": 5, "window_seconds": 1e308}}},
        "virtual_keys": {
            "vk_agent_123456789": {"provider": "openai", "api_key": "x", "team": "ml"}
        },
    }
    with pytest.raises(
        KeysFileError,
        match=r"quota.window_seconds must be a positive number of seconds, at most 315360000",
    ):
        load(tmp_path, document)


def test_a_keys_output_allowance_is_its_own_else_the_setting(tmp_path: Path) -> None:
    document = {
        "virtual_keys": {
            "vk_own_123456789": {"provider": "openai", "api_key": "x", "output_allowance": 512},
            "vk_default_1234567": {"provider": "openai", "api_key": "y"},
        }
    }
    defaults = Defaults(
        quota_enabled=True, requests=100, tokens=None, window_seconds=3600.0, output_allowance=900
    )
    ring = load(tmp_path, document, defaults=defaults)
    allowances = {key.secret: key.output_allowance for key in ring}
    assert allowances == {"vk_own_123456789": 512, "vk_default_1234567": 900}


@pytest.mark.parametrize(
    "name",
    [
        "team\x00a",
        "two\nlines",
        "tab\there",
        "esc\x1b[31m",
        "del\x7f",
        # Line breaks to Unicode: orjson writes them into a log line as they are, and a
        # reader splitting lines as Python's str.splitlines() does gets the line in two.
        "next\x85line",
        "line\u2028separator",
        "paragraph\u2029separator",
        "csi\x9b31m",
    ],
)
def test_a_key_or_team_name_with_a_control_character_is_refused(tmp_path: Path, name: str) -> None:
    """As the admin API refuses it (keys.edits): a name goes into log lines and metrics."""
    key = {"vk_a_123456789": {"provider": "openai", "api_key": "sk-a", "name": name}}
    with pytest.raises(KeysFileError, match="name contains a control character") as refused:
        load(tmp_path, {"virtual_keys": key})
    assert name not in str(refused.value)
    teams = {"teams": {name: {}}, "virtual_keys": {"vk_a_123456789": {"api_key": "sk-a"}}}
    with pytest.raises(KeysFileError, match="team name contains a control character"):
        load(tmp_path, teams)
    accented = {"vk_a_123456789": {"provider": "openai", "api_key": "sk-a", "name": "équipe a"}}
    assert [key.name for key in load(tmp_path, {"virtual_keys": accented})] == ["équipe a"]


def test_a_virtual_key_written_twice_is_refused_without_showing_it(tmp_path: Path) -> None:
    # An entry copied for a new user with its key left unchanged: JSON keeps the last one
    # only, so the first user's clients would be served, and counted, as the second.
    secret = "vk_copied_entry_0123456789"
    text = (
        '{"virtual_keys": {\n'
        f'  "{secret}": {{"provider": "openai", "api_key": "sk-a", "name": "alice"}},\n'
        f'  "{secret}": {{"provider": "openai", "api_key": "sk-b", "name": "bob"}}\n'
        "}}"
    )
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, text)
    message = str(refused.value)
    assert f"key '{masked(secret)}'" in message and "written twice" in message, message
    assert secret not in message


def test_a_field_written_twice_in_one_entry_is_refused(tmp_path: Path) -> None:
    text = (
        '{"virtual_keys": {"vk_a_123456789abc": {"provider": "openai", "api_key": "sk-a",'
        ' "name": "alice", "quota": {"requests": 10}, "quota": {"tokens": 500}}}}'
    )
    with pytest.raises(KeysFileError, match="'quota' is written twice"):
        load(tmp_path, text)


def test_a_file_nested_too_deep_to_check_is_refused_in_one_line(tmp_path: Path) -> None:
    # orjson reads 1,000 levels; the check for names written twice must not end in a traceback
    # (Python 3.11's parser stops short of them: "nested too deeply"; 3.12's reads them, and the
    # stray field is what is refused)
    text = '{"virtual_keys": {}, "x": ' + "[" * 1000 + "]" * 1000 + "}"
    with pytest.raises(KeysFileError, match="nested too deeply|'x' is not a top-level field"):
        load(tmp_path, text)


@pytest.mark.parametrize(
    "misplaced",
    [
        "sk-proj-Abc123def456ghi789jkl012mno345pqr678stu901",
        "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q",  # letters, digits, _: a valid name's shape
        "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789",
    ],
)
@pytest.mark.parametrize("field", ["api_key_env", "provider"])
def test_a_real_key_put_in_the_wrong_field_is_not_printed_back(
    tmp_path: Path, misplaced: str, field: str
) -> None:
    # "api_key_env": "<the key itself>" is a common slip: its "is not set" went to stderr
    # (and the admin API's 422) with the whole key in it; so did "provider": "<key>".
    entry = {"provider": "openai", "name": "alice", "api_key_env": "OPENAI_KEY", field: misplaced}
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, {"virtual_keys": {"vk_a_123456789": entry}}, environ={"OPENAI_KEY": "sk-x"})
    assert misplaced not in str(refused.value)
    assert misplaced[:16] not in str(refused.value)
    assert field in str(refused.value)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        # A model_quotas group that never matched: gpt-4o's own limit silently off.
        (
            {"model_quotas": [{"models": ["gpt-4o "], "requests": 5}]},
            "model_quotas[0].models: 'gpt-4o ' has a space at an end or a control character",
        ),
        # A route that never matched: gpt-4o silently went to the key's own provider.
        (
            {"routes": [{"models": [" gpt-4o"], "provider": "azure", "api_key": "az-1"}]},
            "routes[0].models: ' gpt-4o' has a space at an end or a control character",
        ),
        # Every gpt-4o request 403 model_not_allowed, though the file allows it.
        (
            {"allowed_models": ["gpt-4o\t"]},
            "allowed_models: 'gpt-4o\\t' has a space at an end or a control character",
        ),
        # Sent upstream as it is: every request the provider's 404 model_not_found.
        (
            {"model": "gpt-4o-mini "},
            "model: 'gpt-4o-mini ' has a space at an end or a control character",
        ),
    ],
)
def test_a_model_name_or_pattern_padded_with_spaces_is_refused_not_left_unmatched(
    tmp_path: Path, entry: dict[str, Any], says: str
) -> None:
    document = {
        "providers": {"azure": {"base_url": "https://example.openai.azure.com/openai/v1"}},
        "virtual_keys": {
            "vk_a_123456789": {"provider": "openai", "api_key": "sk-a", "name": "a", **entry}
        },
    }
    with pytest.raises(KeysFileError, match=re.escape(says)):
        load(tmp_path, document)
    inner = {"models": ["gpt-4o", "o3 mini"], "requests": 5}  # a space inside is a name's own
    document["virtual_keys"]["vk_a_123456789"] = {
        "provider": "openai",
        "api_key": "sk-a",
        "model_quotas": [inner],
        "allowed_models": ["gpt-4o", "o3 mini"],
    }
    assert len(load(tmp_path, document)) == 1


@pytest.mark.parametrize("usd", [1e308, 2**63, 1_000_000_000_001])
def test_a_budget_past_a_trillion_dollars_is_refused(tmp_path: Path, usd: float) -> None:
    # $1e308 (meant as "no cap") loaded, and every request of its key answered 500: its
    # micro-dollars overflowed a float (and past 2**63 they would a Redis counter).
    key = {"provider": "openai", "api_key": "sk-x", "name": "agent", "budget": {"usd": usd}}
    with pytest.raises(
        KeysFileError,
        match="budget.usd must be a positive number of dollars, at most 1000000000000",
    ):
        load(tmp_path, {"virtual_keys": {"vk_agent_123456789": key}})
    team = {
        "teams": {"t": {"budget": {"usd": usd}}},
        "virtual_keys": {"vk_agent_123456789": {**key, "budget": None, "team": "t"}},
    }
    with pytest.raises(KeysFileError, match="team 't': budget.usd must be"):
        load(tmp_path, team)


def test_a_key_or_team_name_longer_than_the_admin_api_takes_is_refused(tmp_path: Path) -> None:
    # The admin API refuses a name over 200 characters; keys.json took one of any length,
    # written into every log line of the key and every metric series it labels.
    long = "n" * 201
    key = {"provider": "openai", "api_key": "sk-a", "name": long}
    with pytest.raises(KeysFileError, match="name must be at most 200 characters") as refused:
        load(tmp_path, {"virtual_keys": {"vk_a_123456789": key}})
    assert long not in str(refused.value)
    teams = {"teams": {long: {}}, "virtual_keys": {"vk_a_123456789": {**key, "name": "a"}}}
    with pytest.raises(
        KeysFileError, match="a team name must be at most 200 characters"
    ) as refused:
        load(tmp_path, teams)
    assert long not in str(refused.value)
    key["name"] = "n" * 200
    teams = {
        "teams": {"t" * 200: {}},
        "virtual_keys": {"vk_a_123456789": {**key, "team": "t" * 200}},
    }
    assert len(load(tmp_path, teams)) == 1


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        # An Azure key given a region expecting a regional endpoint: silently ignored.
        (
            {"provider": "azure", "api_key": "az-1", "region": "eastus"},
            "region does not apply to provider 'azure'",
        ),
        (
            {"provider": "openai", "api_key": "sk-a", "aws_secret_access_key": "x"},
            "aws_secret_access_key does not apply to provider 'openai'",
        ),
        (
            {
                "provider": "bedrock",
                "region": "us-east-1",
                "aws_access_key_id": "AKIA0",
                "aws_secret_access_key": "s",
                "project": "my-project",
            },
            "project does not apply to provider 'bedrock'",
        ),
        (
            {
                "provider": "openai",
                "api_key": "sk-a",
                "fallbacks": [{"provider": "openai", "api_key": "sk-b", "project": "p"}],
            },
            "fallbacks[0].project does not apply to provider 'openai'",
        ),
    ],
)
def test_a_cloud_field_on_a_target_that_does_not_read_it_is_refused(
    tmp_path: Path, entry: dict[str, Any], says: str
) -> None:
    document = {
        "providers": {"azure": {"base_url": "https://example.openai.azure.com/openai/v1"}},
        "virtual_keys": {"vk_a_123456789": {"name": "a", **entry}},
    }
    with pytest.raises(KeysFileError, match=re.escape(says)):
        load(tmp_path, document)


@pytest.mark.parametrize(
    "secret", ["vk\x1b[31m_0123456789", "v\u2028k_0123456789", "vk_0123\n456789"]
)
def test_a_virtual_key_with_a_control_character_is_refused_without_showing_it(
    tmp_path: Path, secret: str
) -> None:
    # An unnamed key appears as its first 4 characters and a hash: an escape or a line
    # break among them went into every log line and metric of the key (and no client can
    # send such a key in a header anyway).
    key = {secret: {"provider": "openai", "api_key": "sk-a"}}
    with pytest.raises(
        KeysFileError, match="the virtual key contains a control character"
    ) as refused:
        load(tmp_path, {"virtual_keys": key})
    assert secret[:4] not in str(refused.value)


@pytest.mark.parametrize("name", ["alice ", " alice", "alice\u00a0"])
def test_a_key_or_team_name_with_a_space_at_an_end_is_refused(tmp_path: Path, name: str) -> None:
    # Taken as written, 'alice ' was another name than 'alice': shown alike in the log and
    # the metrics, and PATCH /admin/keys/alice answered 404 'No key is named alice'.
    key = {"provider": "openai", "api_key": "sk-a", "name": name}
    with pytest.raises(KeysFileError, match="has a space at an end") as refused:
        load(tmp_path, {"virtual_keys": {"vk_a_123456789": key}})
    assert f"name {name!r}" in str(refused.value)  # as the admin API's path names it
    teams = {"teams": {name: {}}, "virtual_keys": {"vk_a_123456789": {**key, "name": "a"}}}
    with pytest.raises(KeysFileError, match="a team name has a space at an end"):
        load(tmp_path, teams)


@pytest.mark.parametrize("named", ["own virtual key", "another virtual key", "a real key"])
def test_a_name_that_is_a_key_is_refused_without_showing_it(tmp_path: Path, named: str) -> None:
    # A key named with its virtual key (as if the name were the key's id) was taken, and every
    # log line of it carried the full key in its "key" field; so did a name that is a real key.
    own, other, real = "vk_alice_0123456789abcdef", "vk_bob_0123456789abcdef", "sk-a" * 6
    name = {"own virtual key": own, "another virtual key": other, "a real key": real}[named]
    keys = {
        own: {"provider": "openai", "api_key": real, "name": name},
        other: {"provider": "openai", "api_key": "sk-b" * 6, "name": "bob"},
    }
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, {"virtual_keys": keys})
    message = str(refused.value)
    assert f"key '{masked(own)}': name is a key of the file" in message, message
    assert own not in message and other not in message and real not in message
    assert "\n" not in message


@pytest.mark.parametrize("named", ["a virtual key", "a hashed virtual key", "a real key"])
def test_a_team_named_with_a_key_is_refused_without_showing_it(tmp_path: Path, named: str) -> None:
    # A team's name is written in every log line of its keys and in the team label of
    # llm_gateway_team_requests_in_flight and llm_gateway_limit_refusals_total: a team named
    # with a virtual or a real key of the file put that key, whole, on /metrics and in the log.
    own, other, real = "vk_alice_0123456789abcdef", "vk_bob_0123456789abcdef", "sk-a" * 6
    name = {"a virtual key": other, "a hashed virtual key": own, "a real key": real}[named]
    hashed = "sha256:" + hashlib.sha256(own.encode()).hexdigest()
    keys = {
        hashed: {"provider": "openai", "api_key": real, "name": "alice", "team": name},
        other: {"provider": "openai", "api_key": "sk-b" * 6, "name": "bob"},
    }
    document = {"teams": {name: {"max_in_flight": 2}}, "virtual_keys": keys}
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, document)
    message = str(refused.value)
    assert f"team '{masked(name)}': name is a key of the file" in message, message
    assert own not in message and other not in message and real not in message
    # The key store of an older version's Redis leaves the team out, and its keys with it.
    ring = KeyRing.from_document("redis", document, "0", {}, DEFAULTS, leave_out=True)
    assert name not in ring.teams and ring.key_for(other).name == "bob"
    with pytest.raises(GatewayError):
        ring.key_for(own)  # alice, of the team left out
    for why in ring.left_out.values():
        assert own not in why and other not in why and real not in why
    assert sorted(kind for kind, _ in ring.left_out) == ["key", "team"]


def test_secrets_inside_longer_texts_are_found_but_placeholders_mask_no_word() -> None:
    # A real key glued to a model (`gpt-4o:<key>`) is found inside it; a placeholder real
    # key of a local server (`EMPTY`) would mask ordinary words, so it is found only whole.
    real, own = "sk-proj-" + "r" * 24, "vk_glued_" + "v" * 16
    keys = {
        own: {"provider": "openai", "api_key": real, "name": "alice"},
        "vk_local_" + "l" * 16: {"provider": "openai", "api_key": "EMPTY", "name": "local"},
    }
    ring = KeyRing.from_document("keys.json", {"virtual_keys": keys}, "0", {}, DEFAULTS)
    texts = [f"gpt-4o:{real}", f"a {own}!", "EMPTY-model", "EMPTY", "short"]
    found = dict(ring.secrets_inside(texts))
    assert found == {real: "[redacted]", own: masked(own), "EMPTY": "[redacted]"}
    assert ring.secrets_inside(texts) == ring.secrets_inside(texts)  # the same, remembered


@pytest.mark.parametrize("named", ["a virtual key", "a hashed virtual key", "a real key"])
def test_a_cache_scope_that_is_a_key_is_refused_without_showing_it(
    tmp_path: Path, named: str
) -> None:
    # A key's cache scope is shown on /usage (to every key of the scope) and by GET
    # /admin/keys: a scope written as a virtual or a real key of the file showed that key whole.
    own, other, real = "vk_alice_0123456789abcdef", "vk_bob_0123456789abcdef", "sk-a" * 6
    scope = {"a virtual key": other, "a hashed virtual key": own, "a real key": real}[named]
    hashed = "sha256:" + hashlib.sha256(own.encode()).hexdigest()
    cache = {"ttl_seconds": 60, "scope": scope}
    keys = {
        hashed: {"provider": "openai", "api_key": real, "name": "alice"},
        other: {"provider": "openai", "api_key": "sk-b" * 6, "name": "bob", "cache": cache},
    }
    document = {"virtual_keys": keys}
    with pytest.raises(KeysFileError) as refused:
        load(tmp_path, document)
    message = str(refused.value)
    assert "key 'bob': cache.scope is a key of the file" in message, message
    assert own not in message and other not in message and real not in message
    # The key store of an older version's Redis leaves the key out; the others serve.
    ring = KeyRing.from_document("redis", document, "0", {}, DEFAULTS, leave_out=True)
    assert ring.key_for(own).name == "alice"
    with pytest.raises(GatewayError):
        ring.key_for(other)
    for why in ring.left_out.values():
        assert own not in why and other not in why and real not in why
    assert [kind for kind, _ in ring.left_out] == ["key"]
