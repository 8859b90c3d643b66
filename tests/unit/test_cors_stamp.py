"""relay.cors's stamp: the exposed headers of an answer, remembered per name within a bound."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.relay import cors
from proxy.relay.cors import Cors


def _stamped(gate: Cors, names: list[str]) -> str | None:
    request = make_mocked_request("POST", "/v1/chat/completions", headers={"Origin": "https://a"})
    response = web.StreamResponse(headers={name: "1" for name in names})
    gate.stamp(request, response)
    return response.headers.get("access-control-expose-headers")


def test_an_answer_exposes_its_exposed_headers_lower_cased_and_sorted_every_time() -> None:
    gate = Cors(["https://a"])
    names = ["X-RateLimit-Remaining-Tokens", "Content-Type", "x-request-id", "Retry-After"]
    expected = "retry-after, x-ratelimit-remaining-tokens, x-request-id"
    assert _stamped(gate, names) == expected
    assert _stamped(gate, names) == expected  # from the names remembered
    assert _stamped(gate, ["cf-ray", "openai-version"]) is None


def test_the_names_remembered_are_bounded() -> None:
    gate = Cors(["https://a"])
    many = [f"x-ratelimit-{n}" for n in range(cors.KNOWN_NAMES + 10)]
    for start in range(0, len(many), 30):
        assert _stamped(gate, many[start : start + 30]) == ", ".join(
            sorted(many[start : start + 30])
        )
    assert len(gate._exposed_as) == cors.KNOWN_NAMES
