"""The record: what one request leaves behind, whatever its fate.

The exchange begins exactly one `Record` per request, writes its ending (`end`) once, and
settles it into the sinks: prices, the tracker, breakers, metrics, the log, traces. Every
other step reports what it learned through a method named for the fact (`saw_model`,
`add_attempt`, `saw_answer`, ...), never the ending. A record only ever holds a key's
*name* (masked by default), never the virtual or the real key, and a model as fit for a
log line (`shown`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import StrEnum
from random import getrandbits

# Status recorded when the client left before the response was complete (as nginx and Caddy).
CLIENT_CLOSED = 499
# The cancellation message of a request the gateway itself cut when its shutdown grace
# period ran out (runtime.server): logged as the gateway's cut, never as the client's 499.
GRACE_OVER = "cut by the gateway at the end of its shutdown grace period"
GRACE_OVER_STATUS = 503
# How a real key is shown wherever the gateway writes one it found: the log line, its bodies,
# a metric, the admin API's export.
REDACTED = "[redacted]"
# The `error` of an answer whose provider sent an error, followed by its type in brackets.
ANSWER_ERROR = "the provider sent an error in its answer"
UNTYPED_ERROR = f"{ANSWER_ERROR} (unknown)"  # its body names none (as reading.note_error)

# A client's own x-request-id is kept when it is printable ASCII of sane length; anything
# else (control bytes, non-UTF-8, a megabyte) would poison headers and log lines.
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}")
# A model as logged: clients choose it, so control characters go and the length is bounded;
# so do the lone surrogates a header's bytes that are not UTF-8 are held as (a provider's
# request id), which no JSON line can hold.
MODEL_CHARS = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def dollars(usd: float) -> str:
    """US dollars as a person writes them, to a millionth of a micro-dollar, no trailing
    zeros: 0.00000195, 0.5, 50 (never 1e-05 nor 1.9499999999999995e-06). Also a JSON number."""
    text = f"{usd:.12f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def cut_by_gateway(cancel: BaseException) -> bool:
    """Whether a handler's cancellation is the gateway's cut at the end of the grace."""
    return cancel.args == (GRACE_OVER,)


def own_request_id(presented: str | None) -> str:
    """The client's x-request-id when it is sane, else a fresh one."""
    if presented is None or not _REQUEST_ID.fullmatch(presented):
        # 32 hex digits of 128 random bits, as os.urandom(16).hex() gave, without its getrandom
        # syscall (~3 us a request under load). Unique, not secret: `random` seeds itself
        # from os.urandom at start and again in each forked worker (os.register_at_fork).
        return f"{getrandbits(128):032x}"
    return presented


def shown(model: str | None) -> str | None:
    """A model name as a client sent it, fit for a log line: no control characters, bounded."""
    if model is None:
        return None
    if len(model) <= MODEL_CHARS and model.isprintable():  # no control character: as sent
        return model
    model = _CONTROL.sub("\ufffd", model[: MODEL_CHARS + 1])
    return model if len(model) <= MODEL_CHARS else model[:MODEL_CHARS] + "…"


class Outcome(StrEnum):
    """How a request (or one upstream attempt) ended; set once, read by health, metrics, the log."""

    ANSWERED = "answered"  # the provider answered, and its whole body went through
    REFUSED = "refused"  # the gateway answered itself: 400, 401, 403, 413, 429, ...
    UNREACHABLE = "unreachable"  # no connection, or closed before the response headers
    TIMEOUT = "timeout"  # no response headers within REQUEST_TIMEOUT, or a silent body
    BROKEN = "broken"  # the provider cut its body short
    CLIENT_LEFT = "client_left"  # the client went away, or stopped reading
    SHUTDOWN = "shutdown"  # the gateway cut it: its shutdown grace period ran out
    INTERNAL = "internal"  # a bug in the gateway


class Cached(StrEnum):
    """What the response cache did for a request of a key with a cache (the log's `cache`)."""

    HIT = "hit"  # answered from a stored answer (or an identical request's, in flight)
    MISS = "miss"  # looked up, not found: went upstream, its answer may be stored
    BYPASS = "bypass"  # not looked up: not cacheable, or the client said no-cache / no-store


# Outcomes that are the provider's failure (breakers, health, upstream error metrics).
PROVIDER_FAILURES = frozenset((Outcome.UNREACHABLE, Outcome.TIMEOUT, Outcome.BROKEN))
# Endings after which what the provider did is known: its whole answer, or nothing sent
# (a refusal), or a gateway bug (not charged more than what it read).
_KNOWN_ENDINGS = frozenset((None, Outcome.ANSWERED, Outcome.REFUSED, Outcome.INTERNAL))


# Attempt and Usage are values, never changed once built, but not `frozen`: they are built
# for every request (an attempt, two usages), and a frozen dataclass's __init__ sets each
# field through object.__setattr__, about five times the cost of a plain one (Usage's 12
# fields: ~1.5 us against ~0.3). unsafe_hash keeps them hashable by value, as frozen did.
@dataclass(slots=True, unsafe_hash=True)
class Attempt:
    """One try on one target: its name, the key's label in its pool, and how it went."""

    target: str
    provider: str
    key: str  # the real key's label in the pool (e.g. "openai#2"), never the key
    status: int | None  # the provider's status; None when it never answered
    outcome: Outcome  # ANSWERED, UNREACHABLE, TIMEOUT; CLIENT_LEFT or SHUTDOWN while awaited
    error: str | None  # why it got no answer, in words
    ms: float
    # The status a 200 stream stood for, its first event an error (overloaded: 529...)
    stood_for: int | None = None

    @property
    def reason(self) -> str:
        """Why another attempt followed, as a bounded label: the status (or the one a stream's
        first-event error stood for), or how it failed."""
        status = self.status if self.stood_for is None else self.stood_for
        return str(status) if status is not None else self.outcome.value

    def as_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "key": self.key,
            "status": self.status,
            "error": self.error,
            "ms": round(self.ms, 1),
        }


# The largest count a log line writes: the largest integer every JSON reader keeps exact (and
# the tracker's clamp). A provider's count past it (-1 wrapped as an unsigned 64-bit integer)
# would not fit INT64 columns, nor, summed into total_tokens, the JSON encoder: the line lost.
MAX_LOGGED_COUNT = 2**53
# The counts of a Usage a log line shows only when there are some, in the line's order.
_SHOWN_WHEN_SOME = (
    "input_image_tokens",
    "output_image_tokens",
    "input_characters",
    "input_audio_seconds",
    "cache_write_1h_tokens",
    "web_searches",
    "cache_audio_read_tokens",
    "cache_image_read_tokens",
    "input_video_tokens",
    "output_video_tokens",
)


@dataclass(slots=True, unsafe_hash=True)  # a value, not frozen: see Attempt
class Usage:
    """Token counts of one response; `estimated` when the provider reported none.

    `prompt_tokens` and `completion_tokens` are totals: every other count is a part of one
    of them (cache reads and writes and input audio of the prompt; reasoning and output
    audio of the completion), kept apart because each kind has its own price. The image
    parts (GPT image models' input and output image tokens), the units of endpoints
    priced otherwise (the characters of speech's input, the seconds of a transcription's
    audio), Anthropic's 1-hour cache writes (a part of the cache writes, at a rate of their
    own), its server-side web searches (a count, priced per thousand) and the Realtime API's
    cached audio and images (parts of both the cache reads and the input audio or images, at
    rates of their own) and Gemini's video (input and output parts) are zero
    elsewhere, and left out of the log line then; the tracker's totals by kind
    (`quota.tracker.KINDS`) keep the kinds before them.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    input_audio_tokens: int = 0
    reasoning_tokens: int = 0
    output_audio_tokens: int = 0
    input_image_tokens: int = 0
    output_image_tokens: int = 0
    input_characters: int = 0
    input_audio_seconds: float = 0.0
    cache_write_1h_tokens: int = 0
    web_searches: int = 0
    cache_audio_read_tokens: int = 0
    cache_image_read_tokens: int = 0
    input_video_tokens: int = 0
    output_video_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int | float | bool]:
        line: dict[str, int | float | bool] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "input_audio_tokens": self.input_audio_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "output_audio_tokens": self.output_audio_tokens,
        }
        # The counts the log line shows only when there are some, in this order.
        for name in _SHOWN_WHEN_SOME:
            value = getattr(self, name)
            if value:
                line[name] = value
        line["estimated"] = self.estimated
        if max(line.values()) > MAX_LOGGED_COUNT:  # a provider's count that wrapped around
            return {  # each of its own type: seconds stay a float
                name: value if value <= MAX_LOGGED_COUNT else type(value)(MAX_LOGGED_COUNT)
                for name, value in line.items()
            }
        return line


# The statuses of a Responses API object: still running, or finished for good.
PENDING = frozenset(("queued", "in_progress"))
FINISHED = frozenset(("completed", "incomplete", "failed", "cancelled"))


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A Responses API object as the provider answered it: its id, status and usage.

    Read only where a background response's charge is decided (`background.py`).
    """

    id: str
    status: str | None
    usage: Usage | None  # what it reports; None while it runs

    @property
    def is_pending(self) -> bool:
        return self.status in PENDING

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch as the provider answered it (OpenAI /v1/batches, Anthropic message batches).

    Read only where a batch's charge is decided (`usage.batch_charges`).
    """

    id: str
    dialect: str  # "openai" or "anthropic": how its output is read
    is_new: bool  # the answer to the POST that made it
    is_finished: bool  # ended for good: what it produced is final
    output_file_id: str | None = None  # OpenAI: where its results are; Anthropic: unused
    usage: Usage | None = None  # its own usage, when it reports one (newer OpenAI batches)
    model: str | None = None  # the model it ran, when it says (OpenAI)


@dataclass(slots=True)
class Record:
    """One request's facts, each reported by the step that learned it; its ending, by the exchange."""

    request_id: str
    method: str
    path: str
    timestamp: float = field(default_factory=time.time)  # wall clock, for the log line
    started: float = field(default_factory=time.perf_counter)  # monotonic, for durations
    key: str | None = None  # the key's name, never the key itself
    team: str | None = None  # the key's team when it ran (keys.json's `team`); None: none
    provider: str | None = None
    model: str | None = None
    is_stream: bool = False
    # A POST /v1/responses with "background": true: it answers queued (or streams).
    is_background: bool = False
    status: int = 0
    ttft_ms: float | None = None
    duration_ms: float | None = None
    # Time spent awaiting the provider (connect, headers, body reads); None: never asked.
    upstream_ms: float | None = None
    usage: Usage | None = None
    outcome: Outcome | None = None  # set once, by `end`
    error: str | None = None  # why, in words, when it did not simply answer
    # The type or code of an error the provider sent inside its answer (a stream's error
    # event, under a 200): the `error` of an answer that otherwise ended well.
    answer_error_kind: str | None = None
    # The status that error stands for when it says the target failed of the moment
    # (overloaded 529, a server error 500: `first_event.target_failure`), for the upstream
    # errors metric and the target's breaker; None: no such error.
    failed_in_answer: int | None = None
    target: str | None = None  # the target that answered (or was tried last)
    target_model: str | None = None  # the model that target swaps in; None: the body's own
    # Which of it: its name, or the pool key's label ("openai#2", never the key) in a pool.
    member: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    # What the usage cost in USD (pricing.py); None when unpriced or without usage.
    cost_usd: float | None = None
    # Only kept with LOG_BODIES: the request as sent, the response as text (a stream assembled).
    request_body: bytes | None = None
    request_type: str | None = None  # its Content-Type, for the log to show a form, or bytes
    response_text: str | None = None
    # The client's own key, and its mask, for the log to mask in those bodies (`hide`).
    hidden: tuple[str, str] | None = None
    # The model the provider says answered (the usage tap reads it), for traces; None: unsaid.
    response_model: str | None = None
    # The OpenAI service tier the provider says served it ("priority", "flex"), for pricing.
    service_tier: str | None = None
    # Anthropic's speed that served it ("fast": fast mode, at its own rates), for pricing.
    speed: str | None = None
    # Parts of the usage billed at another model's rates: (that model, its usage), within
    # `usage` (a server-side fallback's declined attempts, the advisor's sub-inferences).
    apart: tuple[tuple[str, Usage], ...] = ()
    # The provider's own id of the request (its support asks for it); None: none said.
    provider_request_id: str | None = None
    # The Responses API object answered, for a background POST or a GET by id; else None.
    stored: StoredResponse | None = None
    # The batch answered, for a POST that made one, a GET of one, a cancel; else None.
    batch: Batch | None = None
    # A batch seen ended was charged here: its usage and cost (priced at batch prices).
    is_batch_charge: bool = False
    # A cache hit replayed an answer priced when it was given (`cost_usd`); False: not a
    # hit, or its entry was stored before its price was kept (priced as any request).
    is_priced_replay: bool = False
    # A WebSocket session's frames each way and how it ended (realtime/); else None.
    websocket: dict[str, object] | None = None
    # What the response cache did; None: the key has no cache.
    cache: Cached | None = None
    # A request was written upstream and its answer never came (timed out, cut before its
    # headers, or its client left meanwhile): the provider may be at work on it.
    is_unanswered: bool = False
    # The status of an answer the client was sent whole (a stream up to its last event)
    # before its body's end came: a client that leaves then was answered, not cut.
    whole_answer_status: int | None = None

    @classmethod
    def begin(cls, request_id: str | None, method: str, path: str) -> Record:
        request_id = own_request_id(request_id)
        if not path.isascii():  # a path may carry undecodable bytes as surrogates
            path = path.encode("utf-8", "replace").decode("utf-8")
        return cls(request_id, method[:32], path[:2048])  # by position: keywords cost more

    def took_own_request_id(self) -> None:
        """The client's x-request-id held a key: the gateway's own id instead, in the answer's
        headers, upstream and in the log."""
        self.request_id = own_request_id(None)

    def end(self, status: int, outcome: Outcome, why: str | None = None) -> None:
        """How the request ended: written once, by the exchange (errors carry their outcome)."""
        assert self.outcome is None, f"the record of {self.request_id} already ended"
        self.status, self.outcome = status, outcome
        if why is None and self.answer_error_kind is not None:
            why = f"{ANSWER_ERROR} ({self.answer_error_kind})"
        self.error = why
        if self.error is None and status >= 400:
            # The provider's error answer whose body names no type (a proxy's HTML page, an
            # empty body, FastAPI's `detail`): an error all the same, as SPEC's `error` says.
            self.error = UNTYPED_ERROR

    def saw_key(self, name: str, provider: str, team: str | None = None) -> None:
        """The key authenticated (its name, never the key), its first provider and its team."""
        self.key, self.provider, self.team = name, provider, team

    def saw_model(
        self, model: str | None, is_stream: bool = False, is_background: bool = False
    ) -> None:
        """The model the request names (kept as `shown`), and whether it asks for a stream
        or a background Response."""
        self.model, self.is_stream, self.is_background = shown(model), is_stream, is_background

    def saw_event_stream(self) -> None:
        """The answer is an event stream (or newline-delimited JSON), though no body asked for
        one in `"stream": true` (a stored Response fetched with `?stream=true`, a
        transcription's form field, Ollama's native API, which streams by default)."""
        self.is_stream = True

    def saw_provider_request_id(self, request_id: str | None, secrets: Collection[str]) -> None:
        """The provider's own id of the request (OpenAI's x-request-id, Anthropic's
        request-id): the client's x-request-id is the gateway's. Not kept when it holds one
        of `secrets`, the request's real keys (a provider reflecting the credentials it was
        sent, as it drops from the client's headers: `providers.downstream_headers`)."""
        if request_id is not None:
            for secret in secrets:  # a loop, not any(): no generator on every request
                if secret in request_id:
                    request_id = None
                    break
        self.provider_request_id = shown(request_id)

    def saw_request_body(self, body: bytes, content_type: str | None) -> None:
        """The body as sent, and its Content-Type (LOG_BODIES only)."""
        self.request_body, self.request_type = body, content_type

    def saw_target(
        self, target: str, provider: str, member: str | None = None, model: str | None = None
    ) -> None:
        """An attempt goes to this target (`member`: the pool key's label, else the target's
        name; `model`: the one it swaps in, None: the body's): the last one tried is the one
        that answered."""
        self.target, self.provider, self.member = target, provider, member or target
        self.target_model = model

    def add_attempt(self, attempt: Attempt) -> None:
        """One try on one target ended: answered, or failed and why."""
        self.attempts.append(attempt)

    def saw_unanswered(self) -> None:
        """A request went to the provider and its answer never came: it may still run there."""
        self.is_unanswered = True

    def saw_whole_answer_sent(self, status: int) -> None:
        """The client was sent the answer's last event (only the body's end is to come)."""
        self.whole_answer_status = status

    def saw_answer(
        self,
        usage: Usage | None,
        response_model: str | None = None,
        stored: StoredResponse | None = None,
        text: str | None = None,
        batch: Batch | None = None,
        error_kind: str | None = None,
        service_tier: str | None = None,
        speed: str | None = None,
        apart: tuple[tuple[str, Usage], ...] = (),
    ) -> None:
        """What the provider's answer said: its usage, the model that answered, the Responses
        object or the batch it holds, (LOG_BODIES only) its text, the type of an error
        it sent inside the answer, the service tier and speed that served it, and the parts
        of its usage billed at another model's rates."""
        self.usage, self.response_model, self.stored = usage, response_model, stored
        self.service_tier, self.speed, self.apart = service_tier, speed, apart
        self.response_text, self.batch = text, batch
        if error_kind is not None:
            self.answer_error_kind = error_kind

    def saw_failure_in_answer(self, status: int) -> None:
        """The provider's error inside its 200 answer said the target failed (`status`: what
        it stands for), after content a stream's error event such as `overloaded_error`."""
        self.failed_in_answer = status

    def saw_session(
        self, usage: Usage | None, tally: dict[str, object], model: str | None = None
    ) -> None:
        """A WebSocket session ended: its summed usage, its frames and how it ended, and the
        model the provider says it ran, the session's model when its request named none (a
        call's sideband, a Live session); never one the client names in its frames."""
        self.usage, self.websocket = usage, tally
        if self.model is None and model is not None:
            self.model = shown(model)

    def saw_claim(self, provider: str | None, model: str | None, usage: Usage) -> None:
        """This request claimed a background Response (whichever key made it): that response's
        usage is shown here, priced for the provider and model of the request that made it,
        and charged to the key that made it."""
        self.provider, self.model, self.usage = provider, model, usage

    def saw_batch_charge(
        self, provider: str, model: str | None, usage: Usage, cost_usd: float | None
    ) -> None:
        """This request claimed a batch owed by its key: what the batch used is charged here,
        already priced (by model, at batch prices); `model` None: it ran several."""
        self.provider, self.model, self.usage = provider, model, usage
        self.cost_usd, self.is_batch_charge = cost_usd, True

    def saw_replay(self, provider: str, cost_usd: float | None) -> None:
        """A cache hit: its stored answer came from `provider` (a route's, a fallback's) and
        cost `cost_usd` (what the hit would have cost: its tier and parts as they were)."""
        self.provider, self.cost_usd, self.is_priced_replay = provider, cost_usd, True

    def saw_reserved(self, usage: Usage) -> None:
        """The provider may have done the work and nothing of it is known (`is_work_unknown`):
        the request's reservation stands for its usage."""
        self.usage = usage

    def saw_cache(self, cached: Cached) -> None:
        """What the response cache did: a hit, a miss, or not looked up."""
        self.cache = cached

    def priced(self, cost_usd: float | None) -> None:
        """What the usage cost (the price sink); None when unpriced or without usage."""
        self.cost_usd = cost_usd

    @property
    def is_session(self) -> bool:
        """True for a WebSocket session that opened (answered 101, whoever ended it)."""
        return self.websocket is not None

    @property
    def spent_usage(self) -> Usage | None:
        """The usage that was spent: none for a cache hit, whose `usage` is the stored answer's."""
        return None if self.cache is Cached.HIT else self.usage

    @property
    def is_work_unknown(self) -> bool:
        """The provider may have worked on the request and none of its output is known: it
        was sent and ended without a whole answer (timed out, cut, its client left), and no
        usage came, nor a generated token (only the prompt's estimate). Not a background
        response still running (its stream cut): it is owed, and charged when claimed."""
        if self.outcome in _KNOWN_ENDINGS:
            return False
        if self.stored is not None and self.stored.is_pending:
            return False  # a background response running on is owed: its claim charges it
        usage = self.usage
        if usage is None:
            return self.is_unanswered
        return usage.estimated and usage.completion_tokens == 0

    @property
    def upstream_failed(self) -> bool:
        """True when the provider failed: unreachable, timed out, or cut its body."""
        return self.outcome in PROVIDER_FAILURES

    def mark_first_byte(self, at: float | None = None) -> None:
        """The provider's first body byte came (`at`, perf_counter; None: now)."""
        if self.ttft_ms is None:
            self.ttft_ms = ((time.perf_counter() if at is None else at) - self.started) * 1000.0

    def waited_upstream(self, since: float) -> float:
        """Add the time since `since` (perf_counter) to the wait on the provider; that time, ms."""
        waited = (time.perf_counter() - since) * 1000.0
        self.upstream_ms = waited if self.upstream_ms is None else self.upstream_ms + waited
        return waited

    def finish(self) -> None:
        self.duration_ms = (time.perf_counter() - self.started) * 1000.0

    def written(self) -> list[str]:
        """What the client wrote that the log shows as sent, where a key may be pasted, whole
        or glued to other letters: the path's segments, the model."""
        names = self.path.split("/")
        if self.model is not None:
            names.append(self.model)
        return names

    def ids(self) -> list[str]:
        """The request ids the log shows, where a key may be pasted whole: the client's
        x-request-id, and the provider's, which a server answering with the x-request-id it
        was sent names as the client did."""
        if self.provider_request_id is None:
            return [self.request_id]
        return [self.request_id, self.provider_request_id]

    def hide(self, secret: str, mask: str) -> None:
        """`secret` (the client's own key, which it named in its path, its model, its
        x-request-id or, logged with LOG_BODIES, its body) kept only as `mask` in what the
        log, the metrics and the traces read."""
        self.hide_named(secret, mask)
        if self.request_body is not None or self.response_text is not None:
            # LOG_BODIES: masked where the body is written as a JSON value, any escape of
            # the key decoded (`Logbook`, on its writer thread).
            self.hidden = (secret, mask)

    def hide_named(self, secret: str, mask: str) -> None:
        """`secret` kept only as `mask` in the path, the model, the request ids and the error
        (not in logged bodies: `hide`)."""
        if secret in self.request_id:
            self.request_id = self.request_id.replace(secret, mask)
        if self.provider_request_id is not None and secret in self.provider_request_id:
            self.provider_request_id = self.provider_request_id.replace(secret, mask)
        if secret in self.path:
            self.path = self.path.replace(secret, mask)
        if self.model is not None and secret in self.model:
            self.model = self.model.replace(secret, mask)
        if self.response_model is not None and secret in self.response_model:
            self.response_model = self.response_model.replace(secret, mask)
        if self.error is not None and secret in self.error:
            self.error = self.error.replace(secret, mask)

    @property
    def overhead_ms(self) -> float | None:
        """The gateway's own share of the duration: the time not spent awaiting the provider."""
        if self.duration_ms is None or self.upstream_ms is None:
            return None
        return max(0.0, self.duration_ms - self.upstream_ms)
