"""Credentials whose bytes are not UTF-8: compared, hashed and counted like any wrong one;
Google's `?key=` query parameter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from multidict import CIMultiDict

from proxy.errors import GatewayError
from proxy.keys.credentials import presents_token, with_query
from proxy.keys.hashed import hashed
from proxy.keys.keys import Defaults, KeyRing
from proxy.keys.lockout import Lockout

DEFAULTS = Defaults(quota_enabled=True, requests=100, tokens=None, window_seconds=3600.0)


def test_a_token_with_bytes_that_are_not_utf8_is_a_wrong_token_not_a_crash() -> None:
    # aiohttp decodes a header's bytes as UTF-8 with surrogateescape: a byte 0xff in
    # `Authorization: Bearer m\xfftok` reaches the gateway as the lone surrogate U+DCFF.
    headers = CIMultiDict({"Authorization": "Bearer m\udcfftok"})
    assert presents_token(headers, "mtok") is False
    assert presents_token(CIMultiDict({"Authorization": "Bearer mtok"}), "mtok") is True


def test_a_token_from_an_environment_that_is_not_utf8_is_still_compared() -> None:
    # os.environ decodes a variable's bytes the same way: ADMIN_TOKEN=$'a\xfftok'.
    token = "a\udcfftok"
    assert presents_token(CIMultiDict({"Authorization": f"Bearer {token}"}), token) is True
    assert presents_token(CIMultiDict({"Authorization": "Bearer atok"}), token) is False


def test_a_key_that_is_not_utf8_is_unknown_to_a_ring_of_hashed_keys(tmp_path: Path) -> None:
    # Every key the admin API makes is kept as its digest, so each key presented is hashed.
    path = tmp_path / "keys.json"
    entry = {"provider": "openai", "api_key": "sk-real", "name": "alice"}
    path.write_text(json.dumps({"virtual_keys": {hashed("vk_" + "a" * 30): entry}}))
    ring = KeyRing.load(str(path), {}, DEFAULTS)
    assert ring.authenticate(CIMultiDict({"x-api-key": "vk_" + "a" * 30})).name == "alice"
    with pytest.raises(GatewayError) as refused:
        ring.authenticate(CIMultiDict({"Authorization": "Bearer vk_\udcffguess"}))
    assert refused.value.status == 401


def test_a_locked_prefix_refuses_a_key_that_is_not_utf8_with_429() -> None:
    door = Lockout(failures=2, window_seconds=60.0, on_failure=lambda outcome: None)
    guess = "vk_\udcffguessguess"
    door.failed("10.0.0.1", guess + "1")
    door.failed("10.0.0.1", guess + "2")
    with pytest.raises(GatewayError) as refused:
        door.check("10.0.0.1", guess + "3")
    assert refused.value.status == 429
    door.accepted("10.0.0.1", guess + "4")  # as if some key were this (none can be)
    door.check("10.0.0.1", guess + "4")


def test_a_keys_store_secret_from_an_environment_that_is_not_utf8_makes_a_cipher() -> None:
    # KEYS_STORE_SECRET=$'s\xffcret' with KEYS_STORE=redis: the start ended in a traceback.
    from proxy.keys.redis_store import fernet

    token = fernet("s\udcffcret").encrypt(b"keys")
    assert fernet("s\udcffcret").decrypt(token) == b"keys"


@pytest.mark.parametrize(
    ("query", "credential", "forwarded"),
    [
        ("key=vk_a&alt=sse", "vk_a", "alt=sse"),
        ("alt=sse&%6Bey=vk_a", "vk_a", "alt=sse"),  # a name percent-encoded is the same name
        ("key=vk%2Ba&key=vk_b", "vk+a", ""),  # the first; none of them forwarded
        ("key=&alt=sse", None, "alt=sse"),
        ("keyword=x&monkey=y&api-version=1", None, "keyword=x&monkey=y&api-version=1"),
        ("", None, ""),
    ],
)
def test_a_key_query_parameter_is_a_credential_and_never_forwarded(
    query: str, credential: str | None, forwarded: str
) -> None:
    found, rest = with_query(CIMultiDict(), query)
    assert found.get("x-goog-api-key") == credential
    assert rest == forwarded


def test_a_key_header_comes_before_the_key_parameter() -> None:
    headers = CIMultiDict({"x-api-key": "vk_header"})
    found, rest = with_query(headers, "key=vk_query")
    assert found is headers and rest == ""
