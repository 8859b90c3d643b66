"""Probes that cost nothing: a target whose breaker is open is asked `GET <base_url>/models`.

With PROBE_INTERVAL_SECONDS > 0 the app runs one task (`running`) that, every interval,
finds the targets whose breaker is not closed and sends each one probe: a request that
generates nothing (`GET …/models`, the model list every OpenAI-style and Anthropic API
serves), with one of the target's real keys as its provider expects it (`Authorization:
Bearer`, `x-api-key` with `anthropic-version`, `api-key`, ...). Its answer, told to the
breaker through its own verbs:

    2xx                                       succeeded: the breaker closes, traffic returns
    unreachable, no answer within the timeout,
    408, 500, 502, 503, 504, 529              failed: open for another cooldown
    any other status (401, 403, 404, 429...)  nothing: about the key or the path, not the
                                              target; the cooldown runs on and a client's
                                              request is the half-open probe, as without probes

So a target that recovered takes traffic back without a client's request being the one to
find out, and one that did not never costs a client an attempt.

What it never does: send more than one probe per target and interval (targets that share
an origin and a real key, as "openai" and "openai/gpt-4o" of one key do, share one probe,
whose answer goes to each of their breakers; a pool's keys take turns, a resting key
skipped); overlap rounds (the next interval starts when a round has ended); pass through
the quota, the log, the usage or the cache (a probe is no client's request: it is counted
only in `on_probed`, the metric `llm_gateway_probes_total{target,result}`); or say a key
anywhere (a failure's words name the provider and its host, as the attempt loop's do).
Signed clouds (bedrock, vertex) are not probed: their model lists live on another host
(bedrock's control plane) or another API version (Vertex's publisher models), under other
permissions than the inference the target is given; their breakers close by a client's
request after the cooldown, as without probes. Probes live in each worker process, like the
breakers they feed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress

import aiohttp
from yarl import URL

from proxy.upstream.breaker import Breakers
from proxy.upstream.described import described, out_of_files, where
from proxy.upstream.failover import RETRYABLE
from proxy.upstream.providers import upstream_url
from proxy.upstream.targets import Credential, Target
from proxy.upstream.wire import Wire

OK, FAILED, INCONCLUSIVE = "ok", "failed", "inconclusive"
# A model list answers in well under a second; a probe never waits longer than this (nor
# than REQUEST_TIMEOUT), so a provider that hangs holds one round that long at most.
PROBE_TIMEOUT_SECONDS = 10.0
FAILING = RETRYABLE - {429}  # what the breaker counts as the target failing


class Probe:
    """One GET of a model list: its URL and headers, and the targets whose breaker it feeds."""

    __slots__ = ("headers", "target", "targets", "url")

    def __init__(self, target: Target, credential: Credential) -> None:
        provider = target.provider
        self.target = target  # the first whose breaker it feeds: how failures name it
        self.url: URL = upstream_url(provider, "models", "")
        self.headers = {
            **provider.default_headers,
            **provider.credential_headers(credential.api_key),
        }
        self.targets: list[str] = []

    def __repr__(self) -> str:  # never the headers: they carry the key
        return f"Probe({self.url}, {self.targets})"


class Probes:
    """Probes the targets whose breaker is open, every `interval_seconds` (see the module)."""

    def __init__(
        self,
        *,
        breakers: Breakers,
        targets: Callable[[], Iterable[Target]],
        interval_seconds: float,
        timeout_seconds: float = PROBE_TIMEOUT_SECONDS,
        on_probed: Callable[[str, str], None] = lambda target, result: None,
    ) -> None:
        """`targets`: every target of every key, as the keys in force have them (a reload
        included). `on_probed(target, result)`: told each result, "ok", "failed" or
        "inconclusive", once per target a probe answered for."""
        self._breakers = breakers
        self._targets = targets
        self._interval = interval_seconds
        self._timeout = min(timeout_seconds, PROBE_TIMEOUT_SECONDS)
        self._on_probed = on_probed
        self._task: asyncio.Task[None] | None = None
        self._rounds_started = self._rounds_ended = 0
        self._turn = 0  # rounds that probed something: which of a pool's keys is next
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    @asynccontextmanager
    async def running(self, wire: Wire) -> AsyncIterator[None]:
        """Probe through `wire` while inside (nothing when the interval is 0); on the way out
        the task is cancelled, a probe in flight with it, and awaited."""
        if self._interval <= 0:
            yield
            return
        self._task = asyncio.create_task(self._run(wire), name="probes")
        try:
            yield
        finally:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            for _, waiter in self._waiting:
                waiter.cancel()

    async def round_ended(self) -> None:
        """Wait until a round that starts after this call has ended (tests wait on this)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append((self._rounds_started + 1, waiter))
        await waiter

    async def _run(self, wire: Wire) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self._rounds_started += 1
            await self.probe_round(wire)
            self._rounds_ended += 1
            ended, waiting = self._rounds_ended, self._waiting
            self._waiting = [(at, waiter) for at, waiter in waiting if at > ended]
            for at, waiter in waiting:
                if at <= ended and not waiter.done():
                    waiter.set_result(None)

    async def probe_round(self, wire: Wire) -> None:
        """One probe for each target whose breaker is not closed, all at once."""
        names = self._breakers.not_closed()
        if not names:
            return
        probes = self._plan(frozenset(names))
        self._turn += 1
        await asyncio.gather(*(self._send(wire, probe) for probe in probes))

    def _plan(self, names: frozenset[str]) -> list[Probe]:
        """The probes of one round: per target name one of its keys (in turn by round, a
        resting one skipped), and one probe per distinct URL and key."""
        now = self._breakers.clock()
        candidates: dict[str, dict[tuple[str, str], tuple[Target, Credential]]] = {}
        for target in self._targets():
            if target.name not in names or target.provider.signing:
                continue
            found = candidates.setdefault(target.name, {})
            for credential in target.pool.credentials:
                if credential.signer is None and credential.resting_until <= now:
                    identity = (
                        str(upstream_url(target.provider, "models", "")),
                        credential.api_key,
                    )
                    found.setdefault(identity, (target, credential))
        probes: dict[tuple[str, str], Probe] = {}
        for name, found in candidates.items():
            if not found:
                continue
            identities = sorted(found)  # the same order every round, so keys take turns
            identity = identities[self._turn % len(identities)]
            probe = probes.get(identity)
            if probe is None:
                probe = probes[identity] = Probe(*found[identity])
            probe.targets.append(name)
        return list(probes.values())

    async def _send(self, wire: Wire, probe: Probe) -> None:
        """One probe, its answer told to each of its targets' breakers."""
        whose = where(probe.target)
        try:
            async with asyncio.timeout(self._timeout):
                reply = await wire.request("GET", probe.url, probe.headers, None)
            reply.close()  # the status is all a probe needs; the body is left unread
        except TimeoutError:
            self._tell(
                probe, FAILED, f"probe: {whose} sent no answer within {self._timeout:g} seconds"
            )
        except aiohttp.ClientError as error:
            if out_of_files(error) is not None:  # the gateway's own want, not the target's
                self._tell(probe, INCONCLUSIVE, "")
            else:
                self._tell(probe, FAILED, f"probe: {whose}: {described(error)}")
        else:
            if 200 <= reply.status < 300:
                self._tell(probe, OK, "")
            elif reply.status in FAILING:
                self._tell(probe, FAILED, f"probe: {reply.status} from {whose}")
            else:
                self._tell(probe, INCONCLUSIVE, "")

    def _tell(self, probe: Probe, result: str, why: str) -> None:
        breakers = self._breakers
        for name in probe.targets:
            if breakers.is_closed(name):
                continue  # closed meanwhile by a client's request: that answer is newer
            if result == OK:
                breakers[name].succeeded(breakers.clock())
            elif result == FAILED:
                breakers[name].failed(breakers.clock(), why)
            self._on_probed(name, result)
