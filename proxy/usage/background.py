"""Background Responses: charged to the key that created them, once, when any key fetches them.

A POST /v1/responses with `"background": true` answers at once, `queued` (or
`in_progress`) with `usage: null`; the tokens come later, in the GET /v1/responses/{id}
that returns the response finished (`completed`, `incomplete`, `failed`, `cancelled`) with
its real usage. So the POST is charged nothing, and the response is remembered as owed by
its key (`Quota.owe`, in the tracker, for OWED_SECONDS), by its id alone. The first GET
that finds it finished with a usage, by whichever key (OpenAI lets every key of a project
fetch it), claims it (`Quota.claim`: exactly once, across every process sharing Redis):
the key that created it is charged that usage, priced for the POST's provider and model,
in every scope it counts in (its own, its team's, its model group's); the key that fetched
it is charged nothing for it. The fetching request's log line shows the usage and its cost,
and the metrics count them, as for any request; nothing of the creating key is shown there.
Any other GET is charged nothing, as before: polled again, or never owed. A cancel (POST
/v1/responses/{id}/cancel) claims it the same way, when its answer carries a usage: so a
response cancelled and then fetched is charged once.

A background request that streams is charged by its `response.completed`, which carries the
usage. A stream cut before it (the client left, or the connection broke: the response runs
on, to be resumed by `GET ...?stream=true`) is charged at once what it delivered (the
prompt's estimate plus every token streamed, as any cut generation), and owed the rest:
what the finished response reports minus what was charged, never less than nothing
(`remainder`), when it is claimed.

The ids owed are namespaced by provider (`deferred_id`): a response fetched through a key of
another provider, which cannot be the same response, never claims one.

The step runs once the answer has gone out (the exchange): a client could in principle poll
before the response is marked owed, but its poll must first reach the provider and back,
while the mark is one Redis write already sent; a response that early is still queued
anyway.

Not done: a response never fetched through the gateway (its owner reads it by webhook,
or after OWED_SECONDS) is never charged beyond what its stream delivered; a JSON answer too
large to parse whole (over `usage.WHOLE_PARSE_BYTES`) whose id or status is not within its
first `usage.HEAD_BYTES` is not claimed either; a response whose creating key was deleted since is claimed and charged to
nobody. When the tracker is lost (Redis), what is owed or claimed then is lost too, counted
as an uncharged response (`Quota.owe`, `Quota.claim`).
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from proxy.keys.keys import KeyRing, VirtualKey
from proxy.quota.quota import Quota, charged
from proxy.quota.tracker import KINDS, NOTHING, Charge
from proxy.record import Record, Usage
from proxy.usage.pricing import Prices

# How long a background response stays owed: OpenAI keeps one about ten minutes after it
# finished; a response may run for hours, and a day bounds what Redis holds.
OWED_SECONDS = 24 * 3600
# The parts of each total, each kept within what is left of its total (`remainder`).
_PROMPT_PARTS = (
    "cache_read_tokens",
    "cache_write_tokens",
    "input_audio_tokens",
    "input_image_tokens",
)
_COMPLETION_PARTS = ("reasoning_tokens", "output_audio_tokens", "output_image_tokens")


def deferred_id(provider: str | None, response_id: str) -> str:
    """The tracker's name of a background response: its provider's, and its own id."""
    return f"response:{provider}:{response_id}"


async def owe_or_claim(
    quota: Quota,
    key: VirtualKey,
    record: Record,
    keys: KeyRing,
    prices: Prices,
    on_claim: Callable[[VirtualKey], None],
) -> None:
    """Owe a running background response to its key, or claim a finished one for its creator.

    Only for a record with a `stored` response (a background POST, a GET by id, a cancel).
    An owed response remembers what its own request is charged (a stream cut short: what
    it delivered, priced by `prices`). A claim notes on this request's record what is left
    to charge of the response's usage, and calls `on_claim` with the key that created it:
    the settle charges that key. It runs after the answer went out (the exchange runs it
    to its end, also when the client leaves meanwhile).
    """
    stored = record.stored
    assert stored is not None
    name = deferred_id(record.provider, stored.id)
    if record.is_background:
        if stored.is_pending:
            origin = orjson.dumps([record.provider, record.model]).decode()
            usage = record.usage  # a stream cut short: what it delivered; queued: None
            spent = NOTHING
            if usage is not None:
                cost = prices.cost(record.provider, record.model, usage, record.response_model)
                spent = charged(usage, cost)
            await quota.owe(name, key, origin, OWED_SECONDS, spent)
    elif stored.is_finished and stored.usage is not None:  # a GET by id, or a cancel
        owed = await quota.claim(name)
        if owed is None:
            return
        creator = keys.by_id(owed.key_id)
        if creator is None:
            return  # deleted since: nobody to charge
        provider, model = orjson.loads(owed.origin)
        record.saw_claim(provider, model, remainder(stored.usage, owed.charged))
        on_claim(creator)


def remainder(finished: Usage, spent: Charge) -> Usage:
    """What is left to charge of a finished response's usage once `spent` was charged for it.

    Its total is the finished total less the tokens already charged, never below zero: a
    prompt or completion charged beyond its count takes the excess from the other. Each
    part (cache reads, reasoning, ...) is what the finished usage has beyond the part
    charged, kept within what is left of its total. Nothing charged: the usage itself.
    """
    if spent.tokens == 0 and not any(spent.kinds):
        return finished
    already = dict(zip(KINDS, spent.kinds, strict=True))
    prompt = finished.prompt_tokens - already["prompt_tokens"]
    completion = finished.completion_tokens - already["completion_tokens"]
    if prompt < 0:
        prompt, completion = 0, max(0, completion + prompt)
    elif completion < 0:
        prompt, completion = max(0, prompt + completion), 0
    parts = {
        **_parts(finished, already, _PROMPT_PARTS, prompt),
        **_parts(finished, already, _COMPLETION_PARTS, completion),
    }
    return Usage(
        prompt,
        completion,
        estimated=True,
        input_characters=finished.input_characters,  # units no estimate charges
        input_audio_seconds=finished.input_audio_seconds,
        cache_write_1h_tokens=min(finished.cache_write_1h_tokens, parts["cache_write_tokens"]),
        web_searches=finished.web_searches,
        **parts,
    )


def _parts(
    finished: Usage, already: dict[str, int], names: tuple[str, ...], total: int
) -> dict[str, int]:
    left, parts = total, {}
    for name in names:
        part = min(left, max(0, getattr(finished, name) - already.get(name, 0)))
        parts[name] = part
        left -= part
    return parts
