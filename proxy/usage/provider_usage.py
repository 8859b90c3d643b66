"""What a provider reports of a response's usage, read into the gateway's token kinds.

Each dialect declares where its usage object keeps each kind (`UsageFields`, in its own
module: `openai_chat`, `responses`, `anthropic`, `realtime_events`); `ProviderUsage` reads
objects by those fields. A stream may report several times (Anthropic's `message_start`,
then cumulative `message_delta`s): the last value of each field wins; nothing is summed.
Counts are non-negative integers; anything else (a bool, a float, a string) is not a count.

Anthropic's server-side compaction (a sampling of its own before the message) and its advisor
tool (a sub-inference of another model within it) are billed, but the top-level counts leave
them out: its usage's `iterations` list holds them (types "compaction", "advisor_message"), and
their counts are added to the kinds (the last list seen wins, as a field does). A list that
also names the message's own samplings ("message", "fallback_message") is the whole account:
its counts are summed in place of the top-level ones, which hold only an executor's first
sampling's input (its samplings after an advisor's call re-read the context, billed). Among
them, the attempts a server-side fallback left behind: when a model declines (a refusal) and a
fallback model answers within the request, the top-level counts are the answer's (the last
"fallback_message" iteration), and each attempt before it ("message", or an earlier
"fallback_message", of another model than the answer's: the answer's own samplings, split
around an advisor's, are the answer's) is billed when it wrote output before declining (one
declined before any output is waived). A declined attempt and the advisor's sub-inference are
billed at their own model's rates: `apart` lists them, with their model.

A total larger than prompt and completion together is output the completion left out:
Gemini's OpenAI-compatible API has counted a thinking model's thoughts in `total_tokens`
only. The completion charged is then the total less the prompt (OpenAI's own totals add up,
so nothing changes for it). Perplexity counts a deep research's reasoning beside the
completion and the total (`reasoning_tokens` at the usage's top level, billed): it is added
to the completion, as reasoning (a total that already counts it adds nothing more).

`last_usage` finds the usage object of a JSON body without parsing the whole body, and
`top_level_strings` the first string fields of a body's head.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import orjson

from proxy.record import MODEL_CHARS, Usage

# The gateway's token kinds, as the fields of a dialect's usage object map onto them.
PROMPT, COMPLETION = "prompt", "completion"
CACHE_READ, CACHE_WRITE = "cache_read", "cache_write"
INPUT_AUDIO, REASONING, OUTPUT_AUDIO = "input_audio", "reasoning", "output_audio"
INPUT_IMAGE, OUTPUT_IMAGE = "input_image", "output_image"
INPUT_VIDEO, OUTPUT_VIDEO = "input_video", "output_video"
CACHE_WRITE_1H, WEB_SEARCHES = "cache_write_1h", "web_searches"
# Parts of both the cache reads and the input audio or images (the Realtime API's).
CACHE_AUDIO_READ, CACHE_IMAGE_READ = "cache_audio_read", "cache_image_read"
# Reasoning counted beside the completion, not in it (Perplexity's top-level
# `reasoning_tokens`): added to the completion, and a part of it as reasoning.
REASONING_BESIDE = "reasoning_beside"
TOTAL = "total"  # read only to find output a completion count left out
_TOTALS = frozenset({PROMPT, COMPLETION})
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*')
# Braces outside strings, and strings whole (skipped, escapes and all).
_BRACES = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}]', re.DOTALL)
# ... and the rest of JSON's structure: brackets, colons, commas.
_STRUCTURE = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]:,]', re.DOTALL)


@dataclass(frozen=True, slots=True)
class UsageFields:
    """Where one dialect's usage object keeps each token kind."""

    counts: tuple[tuple[str, str], ...]  # (its field, our kind) at the object's top level
    details: tuple[tuple[str, str, str], ...] = ()  # (its details object, count there, kind)
    # Counts two objects deep: (its details object, the object there, count in it, kind).
    nested: tuple[tuple[str, str, str, str], ...] = ()
    # Counts in a list of objects, in the one a key names: (its list, that key, its value,
    # count there, kind); Bedrock Converse's `cacheDetails` [{"ttl": "1h", "inputTokens"}].
    listed: tuple[tuple[str, str, str, str, str], ...] = ()
    # Anthropic: cache reads and writes are beside the prompt's total, not parts of it.
    is_cache_beside_prompt: bool = False
    # Anthropic: the list of sampling iterations, and the types of those (in `counts`'
    # fields) the top-level counts leave out.
    iterations: str | None = None
    iterations_beside: frozenset[str] = frozenset()
    # The types of the message's own samplings: a list naming one is the whole account (every
    # billed iteration's counts summed, in place of the top-level ones, which leave out an
    # executor's samplings after its first, around an advisor's). Of those, the type of
    # the one that answered after the requested model declined (a server-side fallback): the
    # samplings before it of another model are attempts that declined, billed only when they
    # wrote output (`COMPLETION`).
    iterations_samplings: frozenset[str] = frozenset()
    iterations_served: str | None = None
    # The types of iterations beside them billed at their own model's rates when they name
    # one (the advisor's sub-inference), as a declined attempt is.
    iterations_apart: frozenset[str] = frozenset()
    # `details` by object, in their order: (its details object, ((count there, kind), ...)),
    # so each object is looked up once.
    grouped: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = field(init=False)

    def __post_init__(self) -> None:
        runs: list[tuple[str, list[tuple[str, str]]]] = []
        for details, name, kind in self.details:
            if not runs or runs[-1][0] != details:
                runs.append((details, []))
            runs[-1][1].append((name, kind))
        grouped = tuple((details, tuple(pairs)) for details, pairs in runs)
        object.__setattr__(self, "grouped", grouped)


class ProviderUsage:
    """The usage fields a response reported so far."""

    __slots__ = ("_added", "_apart", "_fields", "_is_cache_beside_prompt", "_is_whole", "_seconds")

    def __init__(self) -> None:
        self._fields: dict[str, int] = {}  # the last value seen of each kind
        self._added: dict[str, int] = {}  # what iterations beside them used (`iterations`)
        # `_added` is every billed sampling's, in place of the top-level counts (`iterations`
        # listed the message's own samplings).
        self._is_whole = False
        # Of those, the ones billed at their own model's rates: (its model, its counts).
        self._apart: tuple[tuple[str, dict[str, int]], ...] = ()
        self._is_cache_beside_prompt = False
        self._seconds: float | None = None  # the input audio's length (transcriptions)

    def read(self, usage: object, fields: UsageFields) -> None:
        """Take one usage object in a dialect's `fields` (anything else is ignored)."""
        if not isinstance(usage, dict):
            return
        found = self._fields
        for name, kind in fields.counts:
            value = usage.get(name)
            if _is_count(value):
                found[kind] = value  # type: ignore[assignment]
        for details, pairs in fields.grouped:
            inner = usage.get(details)
            if isinstance(inner, dict):
                for name, kind in pairs:
                    value = inner.get(name)
                    if _is_count(value):
                        found[kind] = value  # type: ignore[assignment]
        for details, middle, name, kind in fields.nested:
            inner = usage.get(details)
            if isinstance(inner, dict):
                innermost = inner.get(middle)
                if isinstance(innermost, dict):
                    value = innermost.get(name)
                    if _is_count(value):
                        found[kind] = value  # type: ignore[assignment]
        for details, key, value_named, name, kind in fields.listed:
            items = usage.get(details)
            for item in items if isinstance(items, list) else ():
                if isinstance(item, dict) and item.get(key) == value_named:
                    value = item.get(name)
                    if _is_count(value):
                        found[kind] = value  # type: ignore[assignment]
        if fields.iterations is not None:
            iterations = usage.get(fields.iterations)
            if isinstance(iterations, list):
                self._added, self._apart, self._is_whole = _iterated(iterations, fields)
        self._is_cache_beside_prompt = fields.is_cache_beside_prompt

    def read_seconds(self, seconds: object) -> None:
        """Take the input audio's length in seconds (anything else is ignored)."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            return
        if 0 <= seconds < math.inf:
            self._seconds = float(seconds)

    @property
    def is_reported(self) -> bool:
        """True when `usage()` has an answer: a total, or seconds, was reported."""
        return not self._fields.keys().isdisjoint(_TOTALS) or self._seconds is not None

    def clear(self) -> None:
        self._fields.clear()
        self._added, self._apart, self._is_whole = {}, (), False
        self._seconds = None

    def apart(self) -> tuple[tuple[str, Usage], ...]:
        """The parts of `usage()` billed at another model's rates than the answer's: (that
        model, its usage), each within `usage()`'s counts (a server-side fallback's declined
        attempts at the requested model's, the advisor's sub-inferences at the advisor's)."""
        if not self._apart or not self.is_reported:
            return ()
        beside = self._is_cache_beside_prompt
        return tuple((model, _usage_of(counts, beside)) for model, counts in self._apart)

    def usage(self) -> Usage | None:
        """The reported usage, every kind; None when neither a total nor seconds were."""
        fields = self._fields
        if fields.keys().isdisjoint(_TOTALS):
            if self._seconds is None:
                return None
            return Usage(input_audio_seconds=self._seconds)
        if self._is_whole:  # every billed sampling's counts, in place of the top-level ones
            fields = {**fields, **self._added}
        elif self._added:  # a compaction's or an advisor's counts, added to the message's
            fields = {kind: fields.get(kind, 0) + self._added.get(kind, 0) for kind in fields}
        return _usage_of(fields, self._is_cache_beside_prompt)


def _usage_of(fields: dict[str, int], is_cache_beside_prompt: bool) -> Usage:
    """The Usage of counts by kind (`is_cache_beside_prompt`: Anthropic's, whose prompt count
    leaves out the cache reads and writes)."""
    get = fields.get
    prompt, cache_read, cache_write = get(PROMPT, 0), get(CACHE_READ, 0), get(CACHE_WRITE, 0)
    if is_cache_beside_prompt:
        prompt += cache_read + cache_write
    beside = get(REASONING_BESIDE, 0)
    completion = get(COMPLETION, 0) + beside
    total = get(TOTAL, 0)
    if total > prompt + completion:  # thoughts counted beside the completion
        completion = total - prompt
    return Usage(  # by position, as Usage orders them: a call with keywords costs more
        prompt,
        completion,
        False,  # estimated
        cache_read,
        cache_write,
        get(INPUT_AUDIO, 0),
        get(REASONING, 0) + beside,
        get(OUTPUT_AUDIO, 0),
        get(INPUT_IMAGE, 0),
        get(OUTPUT_IMAGE, 0),
        0,  # input characters
        0.0,  # input audio seconds
        get(CACHE_WRITE_1H, 0),
        get(WEB_SEARCHES, 0),
        get(CACHE_AUDIO_READ, 0),
        get(CACHE_IMAGE_READ, 0),
        get(INPUT_VIDEO, 0),
        get(OUTPUT_VIDEO, 0),
    )


def added(total: Usage, more: Usage) -> Usage:
    """Two usages summed, kind by kind (a session's responses); estimated if either was."""
    return Usage(
        total.prompt_tokens + more.prompt_tokens,
        total.completion_tokens + more.completion_tokens,
        total.estimated or more.estimated,
        total.cache_read_tokens + more.cache_read_tokens,
        total.cache_write_tokens + more.cache_write_tokens,
        total.input_audio_tokens + more.input_audio_tokens,
        total.reasoning_tokens + more.reasoning_tokens,
        total.output_audio_tokens + more.output_audio_tokens,
        total.input_image_tokens + more.input_image_tokens,
        total.output_image_tokens + more.output_image_tokens,
        total.input_characters + more.input_characters,
        total.input_audio_seconds + more.input_audio_seconds,
        total.cache_write_1h_tokens + more.cache_write_1h_tokens,
        total.web_searches + more.web_searches,
        total.cache_audio_read_tokens + more.cache_audio_read_tokens,
        total.cache_image_read_tokens + more.cache_image_read_tokens,
        total.input_video_tokens + more.input_video_tokens,
        total.output_video_tokens + more.output_video_tokens,
    )


def last_usage(body: bytes | bytearray, key: re.Pattern[bytes] = _USAGE_KEY) -> object:
    """The object under the body's last `"usage"` key (or `key`'s: Gemini's
    `"usageMetadata"`), parsed alone; None if there is none.

    A quote inside a JSON string is escaped, so `"usage":` occurs only as a key; every
    provider puts the top-level usage after the content (where a tool's input may hold a
    `usage` key of its own), so the last one is the answer's.
    """
    keys = list(key.finditer(body))
    if not keys or body[keys[-1].end() : keys[-1].end() + 1] != b"{":
        return None  # none, or the last is null
    start, depth = keys[-1].end(), 0
    for token in _BRACES.finditer(body, start):
        if token.group() == b"{":
            depth += 1
        elif token.group() == b"}":
            depth -= 1
            if depth == 0:
                try:
                    return orjson.loads(body[start : token.end()])
                except orjson.JSONDecodeError:
                    return None
    return None  # cut short inside it


def _iterated(
    iterations: list[object], fields: UsageFields
) -> tuple[dict[str, int], tuple[tuple[str, dict[str, int]], ...], bool]:
    """What a usage's `iterations` say, summed by kind, and whether that is the whole account.

    A list naming the message's own samplings (`fields.iterations_samplings`) is the whole
    account: every iteration's counts, but for an attempt that declined before a server-side
    fallback answered (a sampling before the last of `fields.iterations_served`'s type, of
    another model) without writing any output, which is not billed. Else only the
    iterations of `fields.iterations_beside`'s types, which the top-level counts leave out.
    Also, each declined attempt and iteration of `fields.iterations_apart`'s types that
    names its model, with its own counts (billed at that model's rates)."""
    counts, samplings = fields.counts, fields.iterations_samplings
    served, served_model, is_whole = -1, None, False
    for index, iteration in enumerate(iterations):
        if isinstance(iteration, dict):
            kind_of = iteration.get("type")
            is_whole = is_whole or kind_of in samplings
            if kind_of == fields.iterations_served:
                served, served_model = index, iteration.get("model")
    summed: dict[str, int] = {}
    apart: list[tuple[str, dict[str, int]]] = []
    for index, iteration in enumerate(iterations):
        if not isinstance(iteration, dict):
            continue
        kind_of = iteration.get("type")
        # Before the answer, of another model (the answer's own model's samplings, split
        # around an advisor's, are the answer's).
        is_declined = (
            index < served
            and kind_of in samplings
            and (served_model is None or iteration.get("model") != served_model)
        )
        if is_declined and not _wrote(iteration, counts):
            continue  # declined before any output: not billed
        if not is_whole and kind_of not in fields.iterations_beside:
            continue
        own: dict[str, int] = {}
        for name, kind in counts:
            value = iteration.get(name)
            if _is_count(value):
                summed[kind] = summed.get(kind, 0) + value  # type: ignore[operator]
                own[kind] = own.get(kind, 0) + value  # type: ignore[operator]
        model = iteration.get("model")
        if (is_declined or kind_of in fields.iterations_apart) and isinstance(model, str):
            if 0 < len(model) <= MODEL_CHARS:
                apart.append((model, own))
    return summed, tuple(apart), is_whole


def _wrote(iteration: dict[str, object], counts: tuple[tuple[str, str], ...]) -> bool:
    """True when an attempt's counts say it wrote output (a declined attempt is billed then)."""
    return any(
        kind == COMPLETION and _is_count(value := iteration.get(name)) and value
        for name, kind in counts
    )


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0  # bool and float are not counts


def top_level_strings(head: bytes | bytearray, names: frozenset[str]) -> dict[str, str]:
    """The string values of the object's own keys among `names`, read from the `head` of a
    JSON body too large to parse whole (the first of each; nested objects' keys are not
    its own). A key whose value the head cuts off, or is no string, is left out."""
    found: dict[str, str] = {}
    if head.lstrip()[:1] != b"{":
        return found
    depth, key, is_key_next, is_value_next = 0, b"", False, False
    for token in _STRUCTURE.finditer(head):
        text = token.group()
        if text in (b"{", b"["):
            depth += 1
            is_key_next, is_value_next = depth == 1 and text == b"{", False
        elif text in (b"}", b"]"):
            depth -= 1
            is_key_next = is_value_next = False
        elif depth != 1:
            continue
        elif text == b",":
            is_key_next, is_value_next = True, False
        elif text == b":":
            is_value_next = not is_key_next
        elif is_key_next:
            key, is_key_next = text, False
        elif is_value_next:
            is_value_next = False
            try:
                name, value = orjson.loads(key), orjson.loads(text)
            except orjson.JSONDecodeError:
                continue
            if name in names and name not in found and isinstance(value, str):
                found[name] = value
                if len(found) == len(names):
                    break
    return found
