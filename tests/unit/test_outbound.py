"""The outbound request's body: a target's `model` swapped in, every other byte as sent."""

from __future__ import annotations

import orjson

from proxy.upstream.outbound import swap_model


def test_only_the_top_level_model_is_swapped_and_every_other_byte_stays() -> None:
    raw = b'{"messages":[{"role":"user","content":"{\\"model\\": \\"x\\"}"}],"metadata":{"model":"m"}, "model" : "gpt-4o"}'
    assert swap_model(raw, "gpt-4o-mini") == raw.replace(b'"gpt-4o"', b'"gpt-4o-mini"')


def test_a_body_naming_model_twice_runs_the_targets_model_whichever_the_provider_reads() -> None:
    """Before, only the first was swapped, and a provider's parser reads the last: a client
    ran any model on a target that forces one (a cheap route, a fallback)."""
    raw = b'{"messages":[{"role":"user","content":"hi"}],"model":"a","model":"o1-pro"}'
    swapped = swap_model(raw, "gpt-4o-mini")
    assert orjson.loads(swapped)["model"] == "gpt-4o-mini"
    assert (
        swapped
        == b'{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o-mini","model":"gpt-4o-mini"}'
    )


def test_a_model_key_spelt_with_an_escape_is_swapped_too() -> None:
    raw = b'{"mod\\u0065l":"o1-pro","messages":[{"role":"user","content":"hi"}]}'
    assert orjson.loads(swap_model(raw, "gpt-4o-mini"))["model"] == "gpt-4o-mini"


def test_a_body_without_a_string_model_is_left_as_it_is() -> None:
    for raw in (b'{"messages":[]}', b'{"model":null}', b"not json", b""):
        assert swap_model(raw, "gpt-4o-mini") is raw
