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
large to parse whole (over `usage.WHOLE_PARSE_BYTES`) is not read for its id, so it is not
charged either; a response whose creating key was deleted since is claimed and charged to
nobody. When the tracker is lost (Redis), what is owed or claimed then is lost too, counted
as an uncharged response (`Quota.owe`, `Quota.claim`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson

from proxy.keys.keys import KeyRing, VirtualKey
from proxy.quota.quota import Quota
from proxy.record import Record

# How long a background response stays owed: OpenAI keeps one about ten minutes after it
# finished; a response may run for hours, and a day bounds what Redis holds.
OWED_SECONDS = 24 * 3600


def deferred_id(provider: str | None, response_id: str) -> str:
    """The tracker's name of a background response: its provider's, and its own id."""
    return f"response:{provider}:{response_id}"


async def owe_or_claim(
    quota: Quota,
    key: VirtualKey,
    record: Record,
    keys: KeyRing,
    on_claim: Callable[[VirtualKey], None],
) -> None:
    """Owe a queued background response to its key, or claim a finished one for its creator.

    Only for a record with a `stored` response (a background POST, a GET by id, a cancel).
    A claim notes the response's usage on this request's record, and calls `on_claim` with
    the key that created it: the settle charges that key. It runs after the answer went
    out, so a client that then closes its connection makes aiohttp cancel the handler
    (handler_cancellation): the step still runs to its end before the cancellation goes on,
    so a claim that took the response also charges it.
    """
    step = asyncio.ensure_future(_owe_or_claim(quota, key, record, keys, on_claim))
    try:
        await asyncio.shield(step)
    except asyncio.CancelledError:
        await step
        raise


async def _owe_or_claim(
    quota: Quota,
    key: VirtualKey,
    record: Record,
    keys: KeyRing,
    on_claim: Callable[[VirtualKey], None],
) -> None:
    stored = record.stored
    assert stored is not None
    name = deferred_id(record.provider, stored.id)
    if record.is_background:
        if stored.is_pending:
            origin = orjson.dumps([record.provider, record.model]).decode()
            await quota.owe(name, key, origin, OWED_SECONDS)
    elif stored.is_finished and stored.usage is not None:  # a GET by id, or a cancel
        owed = await quota.claim(name)
        if owed is None:
            return
        creator = keys.by_id(owed.key_id)
        if creator is None:
            return  # deleted since: nobody to charge
        provider, model = orjson.loads(owed.origin)
        record.saw_claim(provider, model, stored.usage)
        on_claim(creator)
