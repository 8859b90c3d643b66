"""Background Responses: charged once, when a GET through the gateway finds them finished.

A POST /v1/responses with `"background": true` answers at once, `queued` (or
`in_progress`) with `usage: null`; the tokens come later, in the GET /v1/responses/{id}
that returns the response finished (`completed`, `incomplete`, `failed`, `cancelled`) with
its real usage. So the POST is charged nothing, and its key is remembered to owe the
response (`Quota.owe`, in the tracker, for OWED_SECONDS); the first GET by the same key
that finds it finished with a usage claims it (`Quota.claim`: exactly once, across every
process sharing Redis) and is charged that usage, priced for the POST's provider and
model, as any request is (the exchange's settle: this step runs first, then the sinks). Any other GET is charged nothing, as before:
polled again, fetched by another key, or never owed. A cancel (POST
/v1/responses/{id}/cancel) claims it the same way, when its answer carries a usage: so a
response cancelled and then fetched is charged once. A background request that streams
is charged by its `response.completed`, which carries the usage; a stream cut before it
(the client left: the response runs on, to be resumed by `GET ...?stream=true`) is owed
like a queued answer, charged nothing then and its whole usage when fetched finished.

The step runs once the answer has gone out (the exchange): a client could in principle poll
before its key is marked as owing the response, but its poll must first reach the provider
and back, while the mark is one Redis write already sent; a response that early is still
queued anyway.

Not done: a response never fetched through the gateway (its owner reads it by webhook,
or after OWED_SECONDS) is never charged; a JSON answer too large to parse whole (over
`usage.WHOLE_PARSE_BYTES`) is not read for its id, so it is not charged either. When the
tracker is lost (Redis), what is owed or claimed then is lost too, counted as an
uncharged response (`Quota.owe`, `Quota.claim`).
"""

from __future__ import annotations

import asyncio

import orjson

from proxy.keys.keys import VirtualKey
from proxy.quota.quota import Quota
from proxy.record import Record

# How long a key owes a background response: OpenAI keeps one about ten minutes after it
# finished; a response may run for hours, and a day bounds what Redis holds.
OWED_SECONDS = 24 * 3600


async def owe_or_claim(quota: Quota, key: VirtualKey, record: Record) -> None:
    """Owe a queued background response to its key, or charge a finished one to this GET.

    Only for a record with a `stored` response (a background POST, a GET by id, a cancel).
    It runs after the answer went out, so a client that then closes its connection makes
    aiohttp cancel the handler (handler_cancellation): the step still runs to its end
    before the cancellation goes on, so a claim that took the response also charges it.
    """
    step = asyncio.ensure_future(_owe_or_claim(quota, key, record))
    try:
        await asyncio.shield(step)
    except asyncio.CancelledError:
        await step
        raise


async def _owe_or_claim(quota: Quota, key: VirtualKey, record: Record) -> None:
    stored = record.stored
    assert stored is not None
    if record.is_background:
        if stored.is_pending:
            origin = orjson.dumps([record.provider, record.model]).decode()
            await quota.owe(key, stored.id, origin, OWED_SECONDS)
    elif stored.is_finished and stored.usage is not None:  # a GET by id, or a cancel
        claimed = await quota.claim(key, stored.id)
        if claimed is not None:
            provider, model = orjson.loads(claimed)
            record.saw_claim(provider, model, stored.usage)
