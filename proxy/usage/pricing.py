"""Prices: what a request's usage cost in USD, each token kind at its own rate.

The rates come from genai-prices (pinned in requirements.txt), from the data bundled in the
installed package: nothing is fetched at run time (its `UpdatePrices` is never started, and
the bundled snapshot is read directly, not through the library's process-wide hook). A
local overrides file (PRICES_FILE) prices what the library does not know or prices
differently: self-hosted models, negotiated rates. Its shape, per provider (the names of
keys.json) and model (the name the client sends, or "*" for every model of the provider):

    {"openai": {"gpt-4o": {"input_mtok": 2.0, "output_mtok": 8.0, "cache_read_mtok": 1.0}},
     "local": {"*": {"input_mtok": 0, "output_mtok": 0}}}

Rates are USD per million tokens (`requests_kcount`: per thousand requests; `input_mchars`:
per million characters; `input_audio_hours`, `audio_hours`: per hour), named as genai-prices
names them (`PRICE_KEYS`). An override replaces the library's whole price for
that model.

How a cost is computed: the library's data decides the rates (model matching, dated price
changes, tiers by prompt size); this module does the arithmetic for the gateway's fixed
token kinds, because the library's generic `calc_price` costs hundreds of µs a call
(bench/pricing.py: 370-720 µs on a loaded 2-core machine; this, under 10 µs). The
arithmetic is the library's: a part (cache reads, cache writes, input audio, images and
video; reasoning, output audio, images and video) is priced at its own rate when the model has one, else at its total's rate,
and the rest of each total at the plain input or output rate; Anthropic's 1-hour cache
writes are a part of the cache writes, at their own rate (`cache_write_1h_mtok`) where the
model has one, a server-side fallback's declined attempts and the advisor tool's
sub-inferences (`apart`) at their own model's price, and the Realtime API's cached audio and
images parts of both the cache reads and the input audio or images, at their own rates (`cache_audio_read_mtok`,
`cache_image_read_mtok`; else as cache reads). A test checks the figures against `genai_prices.calc_price`. Endpoints
priced by other units are priced by them where the data has a rate: speech's input
characters (`input_mchars`: tts-1), a transcription's audio seconds (`input_audio_hours`,
else `audio_hours`: whisper-1); a usage that counts characters or seconds its model's price
has no rate for is unpriced (None), not free. Web searches (Anthropic's server-side ones,
the Responses API's web_search tool calls, Gemini's grounding with Google Search) are priced
per thousand (`web_searches_kcount`); a model without that rate does not bill them (as the
library), and Google's free allowances of grounded prompts (per account, per day or month)
are not known here: every grounded prompt or query is charged. What is not done: a cost for a model without a price (None, never a
made-up number), images by count, size and quality (the data has no such price: GPT image
models are priced by the tokens they report, their image parts at the image rates), speech
by audio tokens (the API reports none unless streamed as SSE), the Responses API's
image_generation tool (its `tool_usage.image_gen` tokens are the image model's), an
Anthropic compaction's sampling priced on its own (its tokens join the message's: at the
request's model, and for a long-context tier by the sum of their prompts, where Anthropic
decides each sampling's tier by its own).

Work done in a batch (OpenAI batches, Anthropic message batches) is priced at the
library's batch variant of the model's price (`"processing": "batch"`: half the usual
rates for OpenAI's and Anthropic's current models) where it has one; a model without one
is priced at its usual rates, and so is a model the overrides file prices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from proxy.keys.fields import has_control
from proxy.keys.keys import shown_name, written_twice
from proxy.record import MODEL_CHARS, Usage
from proxy.settings import SettingError

# Each rate a price may carry, named as in genai-prices; the part it prices, if any.
PRICE_KEYS = (
    "input_mtok",
    "output_mtok",
    "cache_read_mtok",
    "cache_write_mtok",
    "cache_write_1h_mtok",
    "cache_audio_read_mtok",
    "cache_image_read_mtok",
    "input_audio_mtok",
    "output_audio_mtok",
    "output_reasoning_mtok",
    "requests_kcount",
    "input_image_mtok",
    "output_image_mtok",
    "input_mchars",
    "input_audio_hours",
    "audio_hours",
    "web_searches_kcount",
    "input_video_mtok",
    "output_video_mtok",
)
# Rates that price a request's tokens: per token, or per request (tokens then free); a
# price with none of them (a model priced by the hour) cannot price tokens.
_TOKEN_RATES = frozenset(("input_mtok", "output_mtok", "requests_kcount"))
# The parts of a prompt and of a completion with rates of their own: (price key, Usage
# field), in the order their costs are added up.
_INPUT_PARTS = (
    ("cache_read_mtok", "cache_read_tokens"),
    ("cache_write_mtok", "cache_write_tokens"),
    ("input_audio_mtok", "input_audio_tokens"),
    ("input_image_mtok", "input_image_tokens"),
    ("input_video_mtok", "input_video_tokens"),
)
_OUTPUT_PARTS = (
    ("output_reasoning_mtok", "reasoning_tokens"),
    ("output_audio_mtok", "output_audio_tokens"),
    ("output_image_mtok", "output_image_tokens"),
    ("output_video_mtok", "output_video_tokens"),
)
# Within the cache writes, the 1-hour ones, at a rate of their own where the price has one.
_CACHE_WRITE = "cache_write_tokens"
# Within both the cache reads and the input audio or images, the Realtime API's cached audio
# and images: (Usage field, price key, the other part it is in).
_CACHE_READ = "cache_read_tokens"
_CACHED_PARTS = (
    ("cache_audio_read_tokens", "cache_audio_read_mtok", "input_audio_tokens"),
    ("cache_image_read_tokens", "cache_image_read_mtok", "input_image_tokens"),
)
_HOUR_SECONDS = 3600
# Clouds whose path names the deployment that ran (Bedrock's `global.`/`us.` inference
# profiles are priced apart; a cloud target swaps no model) while the answer names only
# Anthropic's model: the path's model is priced first, the answered one where it has no price
# (an inference profile's ARN).
_PATH_PRICED = frozenset(("bedrock", "vertex"))
# The gateway's provider names where genai-prices calls the provider differently.
_LIBRARY_PROVIDER = {"gemini": "google"}
# Models looked up in the library are remembered, up to this many (a client names any model).
_REMEMBERED_MODELS = 4096
_MTOK = 1_000_000
# The library's price context of work done in a batch (its `price_variants`).
_BATCH = {"processing": "batch"}
# OpenAI service tiers billed at the usual price (the library's price without a variant).
_USUAL_TIERS = frozenset((None, "default", "auto"))
# Anthropic's fast mode (the answer's `usage.speed`), and the library's price context for it.
_FAST = "fast"
_FAST_MODE: dict[str, str | None] = {"speed": _FAST}


# The highest rate PRICES_FILE takes (dollars per million tokens, per thousand requests, per
# hour of audio): far above any provider's, and low enough that no usage prices to inf (a
# log line's "cost_usd":inf is no JSON).
MAX_RATE = 1_000_000


class PricesFileError(SettingError):
    """A PRICES_FILE the gateway cannot use. `problems`: every problem found (each provider
    and model is checked even after one failed), the first being the message."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        self.problems = problems or (message,)
        more = len(self.problems) - 1
        if more:
            message += f" (and {more} more: python gateway.py --check lists every one)"
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Rate:
    """One rate: a base, and higher rates once the prompt passes a size (tiers)."""

    base: float
    tiers: tuple[tuple[int, float], ...] = ()  # (prompt tokens above which, rate), ascending

    def at(self, prompt_tokens: int) -> float:
        if not self.tiers:  # most rates
            return self.base
        # A cliff, as the providers bill: past a tier's start, every token pays its rate.
        for start, rate in reversed(self.tiers):
            if prompt_tokens > start:
                return rate
        return self.base


@dataclass(frozen=True, slots=True)
class Price:
    """A model's rates, by genai-prices price key; a missing part falls back to its total's."""

    rates: Mapping[str, Rate]
    # Worked out once from `rates` (a price prices every request of its model): the parts
    # of the prompt and of the completion it has a rate for, as (Usage field, rate), in the
    # order they are added up; the plain rates; whether it can price tokens at all.
    input_parts: tuple[tuple[str, Rate], ...] = field(init=False, repr=False, compare=False)
    output_parts: tuple[tuple[str, Rate], ...] = field(init=False, repr=False, compare=False)
    plain: tuple[Rate | None, Rate | None, Rate | None] = field(
        init=False, repr=False, compare=False
    )
    prices_tokens: bool = field(init=False, repr=False, compare=False)
    # 1-hour cache writes (a part of the cache writes), cached audio and images (of the
    # cache reads and the input audio or images: `_CACHED_PARTS` with their rates) and web
    # searches (per thousand).
    write_1h: Rate | None = field(init=False, repr=False, compare=False)
    cached_parts: tuple[tuple[str, Rate | None, str], ...] = field(
        init=False, repr=False, compare=False
    )
    searches: Rate | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rates = self.rates
        derived = {
            "input_parts": _parts(rates, _INPUT_PARTS),
            "output_parts": _parts(rates, _OUTPUT_PARTS),
            "plain": (
                rates.get("input_mtok"),
                rates.get("output_mtok"),
                rates.get("requests_kcount"),
            ),
            "prices_tokens": bool(rates.keys() & _TOKEN_RATES),
            "write_1h": rates.get("cache_write_1h_mtok"),
            "cached_parts": tuple(
                (name, rates.get(key), within) for name, key, within in _CACHED_PARTS
            ),
            "searches": rates.get("web_searches_kcount"),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def cost(self, usage: Usage) -> float | None:
        """USD for `usage`; None when it counts something this price has no rate for
        (tokens of a model priced by the hour, the characters of a model priced by token)."""
        units = self._units(usage) if usage.input_characters or usage.input_audio_seconds else 0.0
        if units is None or (usage.total_tokens and not self.prices_tokens):
            return None
        prompt = usage.prompt_tokens
        total = 0.0
        # The part left at the plain input rate is what no priced part took.
        plain_input = prompt
        # 1-hour cache writes at their rate, where the price has one; else as the others.
        one_hour, write_1h = usage.cache_write_1h_tokens, self.write_1h
        if one_hour and write_1h is not None:
            total += one_hour * write_1h.at(prompt)
            plain_input -= one_hour
        else:
            one_hour = 0
        # Cached audio and images (the Realtime API's) are parts of both the cache reads and
        # the input audio or images: at their rate where the price has one (they leave
        # both), else cache reads. `taken`: what they take from those other parts.
        taken: dict[str, int] | None = None
        for name, rate, within in self.cached_parts:
            count = getattr(usage, name)
            if count:
                taken = taken or {}
                taken[within] = count
                if rate is not None:
                    total += count * rate.at(prompt)
                    plain_input -= count
                    taken[_CACHE_READ] = taken.get(_CACHE_READ, 0) + count
        for name, part in self.input_parts:
            count = getattr(usage, name)
            if one_hour and name == _CACHE_WRITE:
                count -= one_hour
            if taken is not None:
                count = max(0, count - taken.get(name, 0))
            if count:
                total += count * part.at(prompt)
                plain_input -= count
        plain_output = usage.completion_tokens
        for name, part in self.output_parts:
            count = getattr(usage, name)
            if count:
                total += count * part.at(prompt)
                plain_output -= count
        plain_in, plain_out, requests = self.plain
        # A provider's parts may overlap: never below 0.
        if plain_in is not None and plain_input > 0:
            total += plain_input * plain_in.at(prompt)
        if plain_out is not None and plain_output > 0:
            total += plain_output * plain_out.at(prompt)
        total = total / _MTOK + units
        if requests is not None:
            total += requests.at(prompt) / 1000
        searches = self.searches
        if usage.web_searches and searches is not None:  # no rate: not billed, as the library
            total += usage.web_searches * searches.at(prompt) / 1000
        return total

    def _units(self, usage: Usage) -> float | None:
        """USD for the characters and audio seconds counted; None when one has no rate."""
        total = 0.0
        if usage.input_characters:
            chars = self.rates.get("input_mchars")
            if chars is None:
                return None
            total += usage.input_characters * chars.base / _MTOK
        if usage.input_audio_seconds:
            hours = self.rates.get("input_audio_hours") or self.rates.get("audio_hours")
            if hours is None:
                return None
            total += usage.input_audio_seconds * hours.base / _HOUR_SECONDS
        return total


class Prices:
    """Prices of every model: the overrides file first, then genai-prices' bundled data."""

    __slots__ = ("_converted", "_library", "_models", "_overrides")

    def __init__(self, overrides: Mapping[tuple[str, str], Price]) -> None:
        from genai_prices.data import providers  # large: loaded at start, not at import

        self._library = providers
        self._overrides = overrides
        # (provider, model) → (its ModelInfo or None, and its rates when they never change:
        # a model whose data names no dated or time-of-day price is converted once).
        self._models: dict[tuple[str, str], tuple[Any, Price | None, bool]] = {}
        # id(ModelPrice) → (that ModelPrice, its rates): bounded by the data's prices.
        self._converted: dict[int, tuple[Any, Price | None]] = {}

    @classmethod
    def load(cls, path: str | None) -> Prices:
        """The prices, with the overrides in `path` when given. Raises PricesFileError."""
        return cls(_overrides(path) if path else {})

    def cost(
        self,
        provider: str | None,
        model: str | None,
        usage: Usage | None,
        answered: str | None = None,
        is_batch: bool = False,
        service_tier: str | None = None,
        speed: str | None = None,
        apart: tuple[tuple[str, Usage], ...] = (),
    ) -> float | None:
        """USD for `usage` of `model` at `provider`; None when unpriced (or no usage).

        `answered`: the model the provider says answered (a dated version, or another model
        when a fallback target swapped it): the library prices that one first; the overrides
        file is keyed by the name the client sent. On a cloud (`_PATH_PRICED`) the model
        in the path is priced first, `answered` only when it has no price. A request naming no model (a Responses
        request of a stored prompt, whose model answers) is priced as `answered`, by both.
        `is_batch`: work of a batch, at the library's batch price where it has one (else its
        usual price); an override's rates stand for batches too.
        `service_tier`: the OpenAI tier that served it, at the library's price for that tier
        where it has one ("priority" above, "flex" below the usual); overrides stand for all.
        `speed`: Anthropic's speed that served it, "fast" (fast mode) at the library's fast
        price where it has one; overrides stand for all.
        `apart`: parts of `usage` billed at another model's rates (a server-side fallback's
        declined attempts, the advisor's sub-inferences): each at its model's usual price
        where it has one (else with the rest), the rest as above.
        """
        model = model or answered
        if usage is None or provider is None or model is None:
            return None
        if apart:
            parts = 0.0
            for part_model, part in apart:
                cost = self.cost(provider, part_model, part)
                if cost is not None:
                    parts += cost
                    usage = _less(usage, part)
            rest = self.cost(provider, model, usage, answered, is_batch, service_tier, speed)
            return None if rest is None else rest + parts
        price = None
        if self._overrides:
            price = (
                self._overrides.get((provider, model))
                or self._overrides.get((provider, answered or model))
                or self._overrides.get((provider, "*"))
            )
        variant = None
        if service_tier not in _USUAL_TIERS:
            variant = {"service_tier": service_tier}
        elif speed == _FAST:
            variant = _FAST_MODE
        if price is None and provider in _PATH_PRICED:
            price = self._library_price(provider, model, is_batch, variant)
        if price is None and answered is not None and answered != model:
            price = self._library_price(provider, answered, is_batch, variant)
        if price is None and provider not in _PATH_PRICED:
            price = self._library_price(provider, model, is_batch, variant)
        return None if price is None else price.cost(usage)

    def overridden_providers(self) -> set[str]:
        """The provider names the overrides file prices."""
        return {provider for provider, _ in self._overrides}

    def knows(self, provider: str, model: str | None) -> bool:
        """True when requests to `provider` for `model` can be priced; for `model` None
        (whatever model a request names), when the provider has any price at all."""
        if model is not None:
            return (
                (provider, model) in self._overrides
                or (provider, "*") in self._overrides
                or self._library_price(provider, model) is not None
            )
        if any(named == provider for named, _ in self._overrides):
            return True
        return self._library_provider(provider) is not None

    def _library_price(
        self,
        provider: str,
        model: str,
        is_batch: bool = False,
        variant: dict[str, str | None] | None = None,
    ) -> Price | None:
        if len(model) > MODEL_CHARS:
            # No model the library prices (its longest name is a third as long), and neither
            # looked up nor remembered: a client's name of megabytes would be held here and
            # matched against every pattern of the data. A request's charge names its model
            # cut to MODEL_CHARS already (`record.shown`).
            return None
        key = (provider, model)
        known = self._models.get(key)
        if known is None:
            known = self._remember(provider, model)
            if len(self._models) >= _REMEMBERED_MODELS:
                self._models.clear()
            self._models[key] = known
        model_info, fixed, is_fixed = known
        if model_info is None:
            return None
        if is_batch:  # a variant resolves to a new object each time: converted each time
            return _from_library(model_info.get_prices(datetime.now(tz=UTC), _BATCH))
        if variant is not None:  # likewise: a tier's or fast mode's (the rare answer not usual)
            return _from_library(model_info.get_prices(datetime.now(tz=UTC), variant))
        if is_fixed:
            return fixed
        # A model's price may change on a date the data knows: resolve it for now. The
        # library hands back the same object until then, so each is converted once.
        model_price = model_info.get_prices(datetime.now(tz=UTC))
        converted = self._converted.get(id(model_price))
        if converted is None or converted[0] is not model_price:
            converted = self._converted[id(model_price)] = (model_price, _from_library(model_price))
        return converted[1]

    def _remember(self, provider: str, model: str) -> tuple[Any, Price | None, bool]:
        """The model's ModelInfo (None: unknown), its rates, and whether they never change."""
        from genai_prices.types import ModelPrice

        model_info = self._find(provider, model)
        if model_info is not None and isinstance(model_info.prices, ModelPrice):
            return model_info, _from_library(model_info.prices), True  # one price, no dates
        return model_info, None, False

    def _find(self, provider: str, model: str) -> Any:
        """genai-prices' ModelInfo for the model, or None."""
        library_provider = self._library_provider(provider)
        if library_provider is None:
            return None
        return library_provider.find_model(model, all_providers=self._library)

    def _library_provider(self, provider: str) -> Any:
        """genai-prices' provider for keys.json's provider name, or None."""
        from genai_prices.data_snapshot import find_provider_by_id

        return find_provider_by_id(self._library, _LIBRARY_PROVIDER.get(provider, provider))


def _less(usage: Usage, part: Usage) -> Usage:
    """`usage` without `part` (one within it), kind by kind; never below 0."""
    counts = (
        usage.estimated
        if kind.name == "estimated"
        else max(getattr(usage, kind.name) - getattr(part, kind.name), 0)
        for kind in fields(Usage)
    )
    return Usage(*counts)


def _parts(
    rates: Mapping[str, Rate], parts: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, Rate], ...]:
    """(Usage field, rate) of each part in `parts` (price key, Usage field) that has a rate."""
    return tuple((name, rates[key]) for key, name in parts if key in rates)


def _from_library(model_price: Any) -> Price | None:
    """The rates of a library price; None when it has none the gateway counts."""
    from genai_prices.types import TieredPrices

    rates: dict[str, Rate] = {}
    for key in PRICE_KEYS:
        value = getattr(model_price, key, None)
        if isinstance(value, TieredPrices):
            tiers = tuple((tier.start, float(tier.price)) for tier in value.tiers)
            rates[key] = Rate(float(value.base), tiers)
        elif isinstance(value, Decimal):
            rates[key] = Rate(float(value))
    if not rates.keys() - {"requests_kcount", "web_searches_kcount"}:
        return None
    return Price(rates)


def _overrides(path: str) -> dict[tuple[str, str], Price]:
    try:
        with open(path, "rb") as file:  # editors may add a BOM, as to keys.json
            text = file.read().removeprefix(b"\xef\xbb\xbf")
        document = orjson.loads(text)
    except OSError as error:
        raise PricesFileError(f"PRICES_FILE {path} cannot be read: {error.strerror}") from None
    except orjson.JSONDecodeError as error:
        raise PricesFileError(f"PRICES_FILE {path} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise PricesFileError(f"PRICES_FILE {path} must be an object of provider → models")
    problems: list[str] = []  # each one said: a start names the first, --check every one
    prices: dict[tuple[str, str], Price] = {}
    try:
        _refuse_repeats(path, text)
    except PricesFileError as error:
        problems.append(str(error))
    for provider, models in document.items():
        try:
            _matchable(path, "provider", provider)
        except PricesFileError as error:
            problems.append(str(error))
        if not isinstance(models, dict) or not models:
            problems.append(
                f"PRICES_FILE {path}: provider {shown_name(provider)} must be an object of model → "
                "rates"
            )
            continue
        for model, rates in models.items():
            try:
                _matchable(path, "model", model)
                prices[(provider, model)] = _price(path, provider, model, rates)
            except PricesFileError as error:
                problems.append(str(error))
    if problems:
        raise PricesFileError(problems[0], tuple(problems))
    return prices


def _matchable(path: str, what: str, name: str) -> None:
    """Refuse a provider or model name no request can match: empty, with a space at an end
    or a control character (a paste), a model written as a shell pattern (keys.json's
    allowed_models take them; here only '*' alone): its price would silently never apply."""
    if not name or name != name.strip() or has_control(name):
        raise PricesFileError(
            f"PRICES_FILE {path}: {what} {shown_name(name)} is empty or has a space at an end "
            "or a control character (a paste?): it would match no request"
        )
    if what == "model" and name != "*" and any(char in name for char in "*?["):
        raise PricesFileError(
            f"PRICES_FILE {path}: model {shown_name(name)} is a pattern, and it would match no "
            "request: a model is named exactly as the client sends it, or '*' for every model "
            "of the provider"
        )


def _refuse_repeats(path: str, text: bytes) -> None:
    """Refuse a name written twice in one object: JSON keeps the last silently, so a model
    priced again further down (or a rate set twice) would take a price nobody read."""
    try:
        twice = written_twice(text)
    except RecursionError:
        raise PricesFileError(f"PRICES_FILE {path} is nested too deeply") from None
    if twice is not None:
        raise PricesFileError(
            f"PRICES_FILE {path}: {shown_name(twice)} is written twice in one object (JSON "
            "keeps only the last): keep one"
        )


def _price(path: str, provider: str, model: str, rates: object) -> Price:
    # Names quoted as repr, cut short: a line break in one stays in the one line.
    where = f"PRICES_FILE {path}: {shown_name(provider)} model {shown_name(model)}"
    if not isinstance(rates, dict) or not rates:
        raise PricesFileError(f"{where} must be an object of rates (e.g. input_mtok)")
    parsed: dict[str, Rate] = {}
    for name, value in rates.items():
        if name not in PRICE_KEYS:
            raise PricesFileError(
                f"{where}: unknown rate {shown_name(name)} (known: {', '.join(PRICE_KEYS)})"
            )
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or not 0 <= value <= MAX_RATE:
            raise PricesFileError(
                f"{where}: {name} must be a non-negative number, at most {MAX_RATE}, got {repr(value)[:40]}"
            )
        parsed[name] = Rate(float(value))
    return Price(parsed)
