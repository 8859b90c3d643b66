"""Batches are charged to the key that made them, once, when a retrieval first sees them ended.

A POST that makes a batch (OpenAI /v1/batches, Anthropic /v1/messages/batches) is charged
nothing (the answer says nothing of tokens yet), and the batch is remembered as owed by its
key, by its id alone (`Quota.owe`, for OWED_SECONDS). The first GET of the batch (or
cancel) whose answer shows it ended, by whichever key (OpenAI and Anthropic let every key of
an account see it), claims it (`Quota.claim`: exactly once, across every process sharing
Redis): the key that made it is charged what it used, in every scope it counts in, and the
key that looked nothing for it. What it used: the batch's own `usage` when it reports one
with its model (OpenAI batches made since September 2025), else what its output says, read
by the gateway itself: a GET of the output file (OpenAI) or of the results (Anthropic),
sent with the real key that answered the retrieval, read as it arrives (`batches.Output`:
one line held at a time, each silence bounded by STREAM_IDLE_TIMEOUT), summed by model and
priced at each model's batch price (`Prices.cost(is_batch=True)`). When that read fails (no
answer, an error status, a cut), the batch is owed again by its maker, so the next
retrieval tries again; nothing is charged meanwhile.

The step runs once the retrieval's answer has gone out (the exchange, before its sinks):
the retrieval's record shows the usage and cost (its log line, metrics), and the settle
charges them to the maker (`on_claim`). A client that leaves meanwhile does not stop it (as
`background.owe_or_claim`).

Not done: a batch never retrieved through the gateway, or first retrieved after
OWED_SECONDS, is never charged, nor one whose maker was deleted since; a list of batches
does not claim the batches it shows; output lines over `batches.MAX_LINE_BYTES` are
skipped (a warning says how many); while they run, batches reserve nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.encodings import CorruptBody, Decoder, UnsupportedEncoding
from proxy.keys.keys import KeyRing, VirtualKey
from proxy.quota.quota import Quota
from proxy.record import Batch, Record, Usage
from proxy.upstream.failover import Failover
from proxy.upstream.signing import SigningFailed
from proxy.usage.batches import Output, output_tail
from proxy.usage.pricing import Prices
from proxy.usage.provider_usage import added

log = logging.getLogger("llm_gateway")

# How long a key owes a batch: OpenAI's batches run up to 24 hours (Anthropic's too) and
# their results stay 30 days (29 at Anthropic); a week bounds what the tracker holds.
OWED_SECONDS = 7 * 24 * 3600
# The client's headers that go with the gateway's own GET of the output: those that choose
# the account and the API version (OpenAI-Organization, OpenAI-Project, anthropic-*).
_PASSED = ("openai-", "anthropic-")


def deferred_id(provider: str | None, batch_id: str) -> str:
    """The tracker's name of a batch: its provider's, and its own id."""
    return f"batch:{provider}:{batch_id}"


class OutputUnread(Exception):
    """The batch's output could not be read whole: it stays owed."""


class BatchCharges:
    """Owes batches to the keys that made them, and charges each once when seen ended."""

    def __init__(
        self,
        *,
        quota: Quota,
        prices: Prices,
        failover: Failover,
        keys: KeyRing,
        idle_seconds: float,
    ) -> None:
        self._quota = quota
        self._prices = prices
        self._failover = failover
        self._keys = keys
        self._idle_seconds = idle_seconds

    async def settle(
        self,
        key: VirtualKey,
        record: Record,
        headers: CIMultiDictProxy[str],
        query: str,
        on_claim: Callable[[VirtualKey], None],
    ) -> None:
        """Owe a batch just made, or claim one seen ended for the key that made it.

        Only for a record with a `batch`. A claim notes what the batch used on this
        request's record and calls `on_claim` with the key that made it: the settle charges
        that key. `headers` and `query`: the retrieval's (its account's headers, and Azure's
        api-version, go with the read of the output). Runs after the answer went out (the
        exchange runs it to its end, also when the client leaves meanwhile)."""
        batch = record.batch
        assert batch is not None
        name = deferred_id(record.provider, batch.id)
        if batch.is_new:
            if not batch.is_finished:
                origin = orjson.dumps([record.provider]).decode()
                await self._quota.owe(name, key, origin, OWED_SECONDS)
            return
        if not batch.is_finished:
            return
        owed = await self._quota.claim(name)
        if owed is None:
            return  # charged already, or never owed
        creator = self._keys.by_id(owed.key_id)
        if creator is None:
            return  # deleted since: nobody to charge
        (provider,) = orjson.loads(owed.origin)
        try:
            by_model = await self._used(key, record, batch, headers, query)
        except OutputUnread as unread:
            log.warning("batch %s: its output was not read (%s); owed still", batch.id, unread)
            await self._quota.owe(name, creator, owed.origin, OWED_SECONDS)
            return
        self._charge(record, provider, by_model)
        on_claim(creator)

    async def _used(
        self,
        key: VirtualKey,
        record: Record,
        batch: Batch,
        headers: CIMultiDictProxy[str],
        query: str,
    ) -> dict[str | None, Usage]:
        """What the batch used, by model: its own usage, else its output's. Raises OutputUnread."""
        if batch.usage is not None and batch.model is not None:
            return {batch.model: batch.usage}
        tail = output_tail(batch)
        if tail is None:
            return {}  # ended with no output: nothing ran (it failed, or all its requests did)
        if record.target is None or not record.attempts:
            raise OutputUnread("no target answered the retrieval")
        serving = key.plans.serving(record.target, record.attempts[-1].key)
        if serving is None:
            raise OutputUnread("the key's target changed since")
        target, credential = serving
        passed = CIMultiDict((k, v) for k, v in headers.items() if k.lower().startswith(_PASSED))
        output = Output(batch.dialect)
        try:
            async with self._failover.fetch(
                target, credential, tail, query, CIMultiDictProxy(passed), record.request_id
            ) as reply:
                if reply.status != 200:
                    raise OutputUnread(f"its output answered {reply.status}")
                await self._read(
                    reply.content.readany, reply.headers.get("content-encoding"), output
                )
        except (TimeoutError, aiohttp.ClientError, SigningFailed) as error:
            raise OutputUnread(error.__class__.__name__) from None
        by_model = output.end()
        if output.skipped:
            log.warning("batch %s: %d output lines too long to read", batch.id, output.skipped)
        return by_model

    async def _read(
        self, readany: Callable[[], Awaitable[bytes]], coding: str | None, output: Output
    ) -> None:
        """The whole body into `output`, decoded; each silence bounded by the idle timeout."""
        try:
            decoder = Decoder(coding, output.feed)
        except UnsupportedEncoding:
            raise OutputUnread(f"its output came in {coding}") from None
        feed = output.feed if decoder.is_identity else decoder.feed
        idle = self._idle_seconds
        while True:
            async with asyncio.timeout(idle):
                chunk = await readany()
            if not chunk:
                break
            try:
                feed(chunk)
            except CorruptBody:
                raise OutputUnread("its output's coding was corrupt") from None
        if not decoder.is_complete:
            raise OutputUnread("its output was cut short")

    def _charge(self, record: Record, provider: str, by_model: dict[str | None, Usage]) -> None:
        """The batch's usage and cost become this request's (the sinks charge them)."""
        total, cost = Usage(), None
        for model, usage in by_model.items():
            total = added(total, usage)
            priced = self._prices.cost(provider, model, usage, is_batch=True)
            if priced is not None:
                cost = priced if cost is None else cost + priced
        models = [model for model in by_model if model is not None]
        record.saw_batch_charge(provider, models[0] if len(models) == 1 else None, total, cost)
