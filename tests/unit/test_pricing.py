"""Prices: each token kind at its own rate, as genai-prices prices it; overrides; no network."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import genai_prices
import pytest
from genai_prices import data_snapshot

from proxy.record import Usage
from proxy.usage.pricing import Price, Prices, PricesFileError, Rate


def library_cost(
    provider: str, model: str, usage: Usage, context: dict[str, str] | None = None
) -> float:
    """The figure genai-prices' own calc_price gives for the same token kinds."""
    counts = {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
        "input_audio_tokens": usage.input_audio_tokens,
        "output_audio_tokens": usage.output_audio_tokens,
        "output_reasoning_tokens": usage.reasoning_tokens,
        "input_image_tokens": usage.input_image_tokens,
        "output_image_tokens": usage.output_image_tokens,
        "cache_audio_read_tokens": usage.cache_audio_read_tokens,
        "cache_image_read_tokens": usage.cache_image_read_tokens,
        "input_video_tokens": usage.input_video_tokens,
        "output_video_tokens": usage.output_video_tokens,
        "input_characters": usage.input_characters,
        # The library asks for the whole too: all of a transcription's audio is input.
        "audio_seconds": usage.input_audio_seconds,
        "input_audio_seconds": usage.input_audio_seconds,
        "web_searches": usage.web_searches,
    }
    reported = genai_prices.Usage(**{name: count for name, count in counts.items() if count})
    price = genai_prices.calc_price(reported, model, provider_id=provider, price_context=context)
    return float(price.total_price)


@pytest.fixture(scope="module")
def prices() -> Prices:
    return Prices.load(None)


@pytest.mark.parametrize(
    ("provider", "model", "usage"),
    [
        ("openai", "gpt-4o-mini", Usage(1000, 100)),
        ("openai", "gpt-4o-mini", Usage(1000, 100, cache_read_tokens=600)),
        ("openai", "gpt-4o", Usage(5000, 700, cache_read_tokens=1024)),
        ("openai", "o3-mini", Usage(300, 2000, reasoning_tokens=1500)),
        ("openai", "o3-mini", Usage(3000, 20, cache_read_tokens=2048, reasoning_tokens=10)),
        ("openai", "gpt-audio", Usage(400, 500, input_audio_tokens=300)),
        (
            "openai",
            "gpt-audio-mini",
            Usage(400, 500, input_audio_tokens=300, output_audio_tokens=450),
        ),
        ("openai", "text-embedding-3-small", Usage(8000, 0)),
        # Realtime: cached audio and images are parts of both the cache reads and the input
        # audio or images, each at a rate of its own.
        *(
            (
                "openai",
                realtime,
                Usage(
                    1000,
                    100,
                    cache_read_tokens=800,
                    input_audio_tokens=700,
                    output_audio_tokens=80,
                    input_image_tokens=200,
                    cache_audio_read_tokens=600,
                    cache_image_read_tokens=150,
                ),
            )
            for realtime in ("gpt-realtime", "gpt-realtime-mini", "gpt-4o-realtime-preview")
        ),
        ("anthropic", "claude-3-5-haiku-latest", Usage(1110, 3, cache_read_tokens=1000)),
        (
            "anthropic",
            "claude-sonnet-4-5",
            Usage(1500, 90, cache_read_tokens=1000, cache_write_tokens=400),
        ),
        # Past 200k prompt tokens every token pays the higher tier (a cliff, as billed).
        (
            "anthropic",
            "claude-sonnet-4-5",
            Usage(250_000, 900, cache_read_tokens=100_000, cache_write_tokens=40_000),
        ),
        # Anthropic's 1-hour cache writes at their own rate (twice the input rate, against
        # 1.25x for 5-minute writes), and its server-side web searches per thousand.
        (
            "anthropic",
            "claude-sonnet-4-5",
            Usage(1500, 90, cache_write_tokens=400, cache_write_1h_tokens=300),
        ),
        (
            "anthropic",
            "claude-sonnet-4-5",
            Usage(250_000, 900, cache_write_tokens=40_000, cache_write_1h_tokens=40_000),
        ),
        ("anthropic", "claude-haiku-4-5", Usage(12_000, 700, web_searches=3)),
        (
            "anthropic",
            "claude-opus-4-1",
            Usage(
                9000,
                400,
                cache_read_tokens=5000,
                cache_write_tokens=2000,
                cache_write_1h_tokens=500,
                web_searches=2,
            ),
        ),
        ("google", "gemini-2.5-pro", Usage(300_000, 1000, cache_read_tokens=10)),
        # Gemini's modalities (`usageMetadata`'s details lists): an image model's output
        # images, a flash model's input audio and cached audio, at their own rates.
        ("google", "gemini-2.5-flash-image", Usage(7, 1300, output_image_tokens=1290)),
        ("google", "gemini-embedding-2", Usage(1000, 0, input_video_tokens=900)),
        ("google", "gemini-omni-flash-preview", Usage(10, 1000, output_video_tokens=990)),
        (
            "google",
            "gemini-embedding-2",
            Usage(1063, 0, input_audio_tokens=800, input_image_tokens=258),
        ),
        # Grounding with Google Search: per grounded prompt (2.5), per query (3 and later).
        ("google", "gemini-2.5-flash", Usage(40, 9, web_searches=1)),
        ("google", "gemini-3.1-pro-preview", Usage(40, 9, web_searches=3)),
        (
            "google",
            "gemini-2.5-flash",
            Usage(
                1040,
                50,
                cache_read_tokens=500,
                input_audio_tokens=640,
                cache_audio_read_tokens=400,
                input_image_tokens=300,
                cache_image_read_tokens=100,
            ),
        ),  # fmt: skip
        # Endpoints priced by other units: speech by characters, transcription by seconds.
        ("openai", "tts-1", Usage(input_characters=1234)),
        ("openai", "tts-1-hd", Usage(input_characters=4096)),
        ("openai", "whisper-1", Usage(input_audio_seconds=90.5)),
        ("openai", "gpt-4o-transcribe", Usage(120, 40, input_audio_tokens=110)),
        ("openai", "gpt-image-1", Usage(50, 4160)),
        # Image tokens are parts with rates of their own (gpt-image-1: input images only).
        ("openai", "gpt-image-1", Usage(1050, 4160, input_image_tokens=1000)),
        (
            "openai",
            "gpt-image-1.5",
            Usage(1050, 4200, input_image_tokens=1000, output_image_tokens=4160),
        ),
    ],
)
def test_each_token_kind_is_priced_as_genai_prices_prices_it(
    prices: Prices, provider: str, model: str, usage: Usage
) -> None:
    expected = library_cost(provider, model, usage)
    gateway_provider = "gemini" if provider == "google" else provider
    assert prices.cost(gateway_provider, model, usage) == pytest.approx(expected, rel=1e-12)
    assert expected > 0


@pytest.mark.parametrize(
    ("provider", "model", "usage"),
    [
        ("openai", "gpt-4o-mini", Usage(1000, 100, cache_read_tokens=600)),
        ("openai", "gpt-5-mini", Usage(3000, 900, cache_read_tokens=2048, reasoning_tokens=500)),
        ("anthropic", "claude-haiku-4-5", Usage(1500, 90, cache_read_tokens=1000)),
        (
            "anthropic",
            "claude-sonnet-4-5",
            Usage(250_000, 900, cache_read_tokens=100_000, cache_write_tokens=40_000),
        ),
    ],
)
def test_work_of_a_batch_is_priced_at_the_libraries_batch_price(
    prices: Prices, provider: str, model: str, usage: Usage
) -> None:
    expected = library_cost(provider, model, usage, {"processing": "batch"})
    assert prices.cost(provider, model, usage, is_batch=True) == pytest.approx(expected, rel=1e-12)
    usual = prices.cost(provider, model, usage)
    assert usual is not None and expected < usual


def test_a_batch_of_a_model_without_a_batch_price_is_priced_at_its_usual_price(
    prices: Prices, tmp_path: Path
) -> None:
    usage = Usage(1000, 100)
    assert prices.cost(
        "anthropic", "claude-3-5-haiku-latest", usage, is_batch=True
    ) == pytest.approx(prices.cost("anthropic", "claude-3-5-haiku-latest", usage), rel=1e-12)
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"openai": {"gpt-4o-mini": {"input_mtok": 1, "output_mtok": 2}}}))
    overridden = Prices.load(str(path))
    assert overridden.cost("openai", "gpt-4o-mini", usage, is_batch=True) == pytest.approx(
        overridden.cost("openai", "gpt-4o-mini", usage)
    )


def test_cached_and_reasoning_tokens_are_not_priced_at_the_full_rate(prices: Prices) -> None:
    plain = prices.cost("openai", "gpt-4o-mini", Usage(1000, 0))
    cached = prices.cost("openai", "gpt-4o-mini", Usage(1000, 0, cache_read_tokens=1000))
    assert plain is not None and cached is not None
    assert cached == pytest.approx(plain / 2)  # gpt-4o-mini: cache reads at half the input rate


def test_cached_audio_without_a_rate_of_its_own_is_priced_once_as_a_cache_read() -> None:
    """A price without `cache_audio_read_mtok` (an override) prices cached audio as the
    cache read it is, never again as input audio."""
    price = Price(
        {
            "input_mtok": Rate(4.0),
            "cache_read_mtok": Rate(0.4),
            "input_audio_mtok": Rate(32.0),
        }
    )
    usage = Usage(
        1000, 0, cache_read_tokens=800, input_audio_tokens=800, cache_audio_read_tokens=700
    )
    assert price.cost(usage) == pytest.approx((800 * 0.4 + 100 * 32.0 + 100 * 4.0) / 1e6)


def test_an_unknown_model_or_provider_has_no_price(prices: Prices) -> None:
    assert prices.cost("openai", "no-such-model-xyz", Usage(10, 10)) is None
    assert prices.cost("local", "llama-3-70b", Usage(10, 10)) is None
    assert prices.cost("openai", None, Usage(10, 10)) is None
    assert prices.cost("openai", "gpt-4o-mini", None) is None
    # Priced by the hour of audio only: no token rate, so no price rather than $0.
    assert prices.cost("openai", "gpt-live-1", Usage(10, 10)) is None


def test_many_distinct_model_names_keep_a_bounded_memory(prices: Prices) -> None:
    for index in range(10_000):
        assert prices.cost("openai", f"made-up-{index}", Usage(1, 1)) is None
    assert len(prices._models) <= 4097


def test_prices_are_never_fetched_over_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("pricing opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    prices = Prices.load(None)
    assert prices.cost("openai", "gpt-4o", Usage(100, 100)) is not None
    # The library's auto-updater installs its fetched data here; the gateway never starts it.
    assert data_snapshot._custom_snapshot is None


def write(path: Path, document: object) -> str:
    path.write_text(json.dumps(document))
    return str(path)


def test_overrides_replace_the_library_price_and_price_custom_providers(tmp_path: Path) -> None:
    path = write(
        tmp_path / "prices.json",
        {
            "openai": {"gpt-4o-mini": {"input_mtok": 1.0, "output_mtok": 2.0}},
            "local": {"*": {"input_mtok": 0.5, "output_mtok": 0, "cache_read_mtok": 0.1}},
        },
    )
    prices = Prices.load(path)
    usage = Usage(1_000_000, 1_000_000, cache_read_tokens=400_000)
    # No cache_read_mtok in the override: cache reads pay the input rate.
    assert prices.cost("openai", "gpt-4o-mini", usage) == pytest.approx(3.0)
    assert prices.cost("local", "anything", usage) == pytest.approx(0.3 + 0.04)
    assert prices.cost("openai", "gpt-4o", Usage(1, 1)) is not None  # the library still prices


@pytest.mark.parametrize(
    ("document", "says"),
    [
        ([], "must be an object of provider"),
        ({"openai": []}, "provider 'openai' must be an object"),
        ({"openai": {"m": {}}}, "'openai' model 'm' must be an object of rates"),
        ({"openai": {"m": {"input_per_token": 1}}}, "unknown rate 'input_per_token'"),
        ({"openai": {"m": {"input_mtok": -1}}}, "input_mtok must be a non-negative number"),
        ({"openai": {"m": {"input_mtok": "1"}}}, "input_mtok must be a non-negative number"),
        ({"openai": {"m": {"input_mtok": True}}}, "input_mtok must be a non-negative number"),
        # A cost of 12 tokens at $1e308 a million was inf, written into the log line as
        # "cost_usd":inf: a line no JSON reader parses.
        ({"openai": {"m": {"input_mtok": 1e308}}}, "input_mtok must be a non-negative number"),
        ({"openai": {"m": {"output_mtok": 1_000_001}}}, "at most 1000000, got 1000001"),
    ],
)
def test_a_bad_overrides_file_is_refused_naming_what_is_wrong(
    tmp_path: Path, document: object, says: str
) -> None:
    with pytest.raises(PricesFileError, match=says):
        Prices.load(write(tmp_path / "prices.json", document))


def test_the_model_that_answered_is_priced_and_overrides_keep_the_clients_name(
    prices: Prices, tmp_path: Path
) -> None:
    usage = Usage(1000, 100)
    haiku = library_cost("anthropic", "claude-3-5-haiku-latest", usage)
    # A fallback target swapped the model: the provider's answer names the one that ran.
    swapped = prices.cost("anthropic", "gpt-4o", usage, answered="claude-3-5-haiku-latest")
    assert swapped == pytest.approx(haiku)
    dated = prices.cost("openai", "gpt-4o-mini", usage, answered="gpt-4o-mini-2024-07-18")
    assert dated == pytest.approx(library_cost("openai", "gpt-4o-mini", usage))
    assert prices.cost("openai", "gpt-4o-mini", usage, answered="no-such-model") == (
        prices.cost("openai", "gpt-4o-mini", usage)
    )
    path = write(tmp_path / "prices.json", {"local": {"my-llama": {"input_mtok": 1e6}}})
    served = Prices.load(path).cost("local", "my-llama", usage, answered="/models/llama-70b")
    assert served == pytest.approx(1000.0)


def test_a_request_naming_no_model_is_priced_as_the_model_that_answered(
    prices: Prices, tmp_path: Path
) -> None:
    # A Responses request with a stored prompt names no model: the prompt's model answers.
    usage = Usage(1000, 100)
    answered = prices.cost("openai", None, usage, answered="gpt-4o-2024-08-06")
    assert answered == pytest.approx(library_cost("openai", "gpt-4o", usage))
    path = write(tmp_path / "prices.json", {"local": {"my-llama": {"input_mtok": 1e6}}})
    assert Prices.load(path).cost("local", None, usage, answered="my-llama") == pytest.approx(1000)
    assert prices.cost("openai", None, usage) is None  # nobody named a model


def test_a_unit_its_models_price_has_no_rate_for_is_unpriced_not_free(prices: Prices) -> None:
    # gpt-4o-mini-tts is priced by tokens; its speech is counted by characters: no cost.
    assert prices.cost("openai", "gpt-4o-mini-tts", Usage(input_characters=500)) is None
    assert prices.cost("openai", "gpt-4o-mini", Usage(input_audio_seconds=30.0)) is None
    assert prices.cost("openai", "whisper-1", Usage(100, 10)) is None  # priced by the hour
    # A per-request price still prices a request whatever its tokens.
    per_request = Prices({("local", "*"): Price({"requests_kcount": Rate(2.0)})})
    assert per_request.cost("local", "m", Usage(100, 10)) == pytest.approx(0.002)


def test_speech_and_transcription_are_priced_by_their_units(prices: Prices) -> None:
    assert prices.cost("openai", "tts-1", Usage(input_characters=1_000_000)) == pytest.approx(15.0)
    assert prices.cost("openai", "whisper-1", Usage(input_audio_seconds=3600)) == pytest.approx(
        0.36
    )


def test_the_overrides_file_prices_characters_and_audio_hours(tmp_path: Path) -> None:
    rates = {"speech": {"input_mchars": 10}, "stt": {"audio_hours": 0.6}}
    prices = Prices.load(write(tmp_path / "prices.json", {"local": rates}))
    assert prices.cost("local", "speech", Usage(input_characters=2000)) == pytest.approx(0.02)
    assert prices.cost("local", "stt", Usage(input_audio_seconds=60)) == pytest.approx(0.01)


def test_the_overrides_file_prices_hour_long_cache_writes_and_web_searches(
    tmp_path: Path,
) -> None:
    rates = {"input_mtok": 1, "output_mtok": 2, "cache_write_mtok": 1.25}
    hourly = {**rates, "cache_write_1h_mtok": 2, "web_searches_kcount": 10}
    prices = Prices.load(write(tmp_path / "prices.json", {"local": {"m": hourly, "n": rates}}))
    usage = Usage(
        1_000_000, 0, cache_write_tokens=500_000, cache_write_1h_tokens=200_000, web_searches=3
    )
    # 500k plain input at $1, 300k 5-minute writes at $1.25, 200k 1-hour at $2, 3 searches.
    assert prices.cost("local", "m", usage) == pytest.approx(0.5 + 0.375 + 0.4 + 0.03)
    # Without their rates: every write at the cache write rate, the searches unbilled.
    assert prices.cost("local", "n", usage) == pytest.approx(0.5 + 0.625)


def test_a_prices_file_saved_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    # Notepad and some editors save UTF-8 with a BOM: keys.json loads so, and the prices
    # file stopped the start, 'not valid JSON' for a file that reads as valid.
    path = tmp_path / "prices.json"
    document = {"local": {"*": {"input_mtok": 0.5, "output_mtok": 1.5}}}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(document).encode())
    prices = Prices.load(str(path))
    assert prices.cost("local", "llama", Usage(1_000_000, 1_000_000)) == pytest.approx(2.0)


def test_a_model_or_rate_written_twice_in_the_prices_file_is_refused(tmp_path: Path) -> None:
    # JSON keeps the last silently: a model priced again further down a long file (or a
    # rate set twice) was priced by whichever came last, not the one its editor read.
    path = tmp_path / "prices.json"
    for text, named in (
        ('{"local": {"m": {"input_mtok": 1}, "m": {"input_mtok": 0}}}', "'m'"),
        ('{"local": {"m": {"input_mtok": 1, "input_mtok": 0}}}', "'input_mtok'"),
    ):
        path.write_text(text)
        with pytest.raises(PricesFileError, match=f"{named} is written twice") as refused:
            Prices.load(str(path))
        assert str(path) in str(refused.value)


def test_the_highest_rate_prices_the_largest_usage_at_a_finite_cost(tmp_path: Path) -> None:
    rates = {name: 1_000_000 for name in ("input_mtok", "output_mtok", "cache_read_mtok")}
    prices = Prices.load(write(tmp_path / "prices.json", {"local": {"*": rates}}))
    cost = prices.cost("local", "m", Usage(2**63, 2**63, cache_read_tokens=2**62))
    assert cost is not None and math.isfinite(cost)


def test_a_refusal_of_the_prices_file_stays_on_one_line(tmp_path: Path) -> None:
    # A model or a rate named with a line break split the refusal, one line on stderr by
    # the rule, in two.
    for document in (
        {"local": {"llama\nx": {"input_mtok": -1}}},
        {"local": {"m": {"input\nmtok": 1}}},
        {"lo\ncal": []},
        {"local": {"m": {"input_mtok": ["x" * 1000]}}},
    ):
        with pytest.raises(PricesFileError) as refused:
            Prices.load(write(tmp_path / "prices.json", document))
        assert "\n" not in str(refused.value) and len(str(refused.value)) < 700


@pytest.mark.parametrize(
    "document",
    [
        {"openai": {"gpt-4o ": {"input_mtok": 1, "output_mtok": 1}}},
        {" local": {"*": {"input_mtok": 0, "output_mtok": 0}}},
        {"local": {"": {"input_mtok": 0, "output_mtok": 0}}},
    ],
)
def test_a_provider_or_model_name_padded_with_spaces_is_refused(
    tmp_path: Path, document: object
) -> None:
    # It matched no request: the override silently never applied (the library's price, or
    # none, was charged instead of the negotiated one).
    with pytest.raises(PricesFileError, match="has a space at an end or a control character"):
        Prices.load(write(tmp_path / "prices.json", document))


@pytest.mark.parametrize("model", ["claude-sonnet-4-*", "gpt-4o?", "gpt-[45]o"])
def test_a_model_written_as_a_pattern_is_refused(tmp_path: Path, model: str) -> None:
    # keys.json's allowed_models and routes take shell patterns; here a pattern was taken as
    # a model's exact name, matched no request, and the price silently never applied.
    document = {"anthropic": {model: {"input_mtok": 1, "output_mtok": 1}}}
    with pytest.raises(PricesFileError, match="is a pattern"):
        Prices.load(write(tmp_path / "prices.json", document))
