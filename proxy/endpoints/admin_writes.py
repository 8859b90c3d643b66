"""The admin API's writes: keys and teams created, changed, rotated and deleted at run time,
and the whole set exported as keys.json.

    POST   /admin/keys                 201 {"name", "key", ...}: the key, shown this once
    PATCH  /admin/keys/{name}          200: the fields set (null removes one)
    DELETE /admin/keys/{name}          204: refused from now on, on every process
    POST   /admin/keys/{name}/rotate   201 {"name", "key", "previous_key_expires_at"}
    POST, PATCH, DELETE /admin/teams[/{name}]   alike
    GET    /admin/export[?include_real_keys=true]

Each change goes through the key store (`keys.store`), which checks the result with the
loader the start uses: a bad value is 422 `invalid_key_settings` with the loader's line,
an unknown field 400 (the same code) naming it, a name that exists 409, a store that cannot be written 409 saying so. Bodies
over MAX_BODY_BYTES get 413. Every change that took writes an audit line to the
interaction log: who (a digest of the admin token), what, which name and which fields,
never a value (a real key could be one).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import orjson
from aiohttp import web

from proxy import errors
from proxy.encodings import content_coding, decode_body
from proxy.errors import GatewayError
from proxy.keys import edits
from proxy.keys.credentials import sent
from proxy.keys.edits import EditRefused
from proxy.keys.fields import KeysFileError, UnknownField
from proxy.keys.keys import shown_name, written_twice
from proxy.keys.store import Edit, KeyStore, StoreReadOnly, StoreUnavailable

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")

MAX_BODY_BYTES = 64 * 1024  # a key's entry, generously: not a place for bulk uploads


class AdminWrites:
    """The write endpoints over a key store; `audit` takes each change's line."""

    def __init__(
        self,
        store: KeyStore,
        token: str,
        audit: Callable[[dict[str, Any]], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._who = "admin-token:" + hashlib.sha256(sent(token)).hexdigest()[:12]
        self._audit = audit
        self._clock = clock

    def add_routes(self, router: web.UrlDispatcher, wrap: Callable[[Handler], Handler]) -> None:
        router.add_post("/admin/keys", wrap(self.create_key))
        router.add_patch("/admin/keys/{name}", wrap(self.change_key))
        router.add_delete("/admin/keys/{name}", wrap(self.delete_key))
        router.add_post("/admin/keys/{name}/rotate", wrap(self.rotate_key))
        router.add_post("/admin/teams", wrap(self.create_team))
        router.add_patch("/admin/teams/{name}", wrap(self.change_team))
        router.add_delete("/admin/teams/{name}", wrap(self.delete_team))
        router.add_get("/admin/export", wrap(self.export))

    async def create_key(self, request: web.Request) -> web.Response:
        body = await _body(request)
        now = self._clock()
        name = str(body.get("name"))  # checked by the edit, before anything is written
        secret = await self._change(
            lambda document: edits.create_key(document, body, now), "key.create", name, body
        )
        return _json({"name": name, "key": secret}, 201)

    async def change_key(self, request: web.Request) -> web.Response:
        name, body = request.match_info["name"], await _body(request)
        await self._change(
            partial(edits.change_key, name=name, body=body), "key.change", name, body
        )
        return _json({"name": name, "changed": sorted(body)})

    async def delete_key(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await self._change(partial(edits.delete_key, name=name), "key.delete", name)
        return web.Response(status=204)

    async def rotate_key(self, request: web.Request) -> web.Response:
        name, body = request.match_info["name"], await _body(request)
        now = self._clock()
        secret = await self._change(
            lambda document: edits.rotate_key(document, name, body, now),
            "key.rotate",
            name,
            {"grace_seconds": body.get("grace_seconds")},
        )
        grace = float(body["grace_seconds"])
        expires = edits.stamp(now + grace) if grace > 0 else None
        return _json({"name": name, "key": secret, "previous_key_expires_at": expires}, 201)

    async def create_team(self, request: web.Request) -> web.Response:
        body = await _body(request)
        now = self._clock()
        name = str(body.get("name"))  # checked by the edit, before anything is written
        await self._change(
            lambda document: edits.create_team(document, body, now), "team.create", name, body
        )
        return _json({"name": name}, 201)

    async def change_team(self, request: web.Request) -> web.Response:
        name, body = request.match_info["name"], await _body(request)
        await self._change(
            partial(edits.change_team, name=name, body=body), "team.change", name, body
        )
        return _json({"name": name, "changed": sorted(body)})

    async def delete_team(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await self._change(partial(edits.delete_team, name=name), "team.delete", name)
        return web.Response(status=204)

    async def export(self, request: web.Request) -> web.Response:
        with_real_keys = _include_real_keys(request)
        document = edits.exported(await self._store.document(), with_real_keys)
        if with_real_keys:
            self._log("keys.export", "*", {"include_real_keys": True})
        return _json(document)

    async def _change(
        self,
        edit: Edit[T],
        action: str,
        name: str,
        body: dict[str, Any] | None = None,
    ) -> T:
        """Make the change in the store and audit it, to the end even when the client leaves
        meanwhile (aiohttp then cancels the handler: handler_cancellation). keys.json is
        written in a thread that a cancellation cannot stop; cut short after it, the keys
        written would not be swapped in, no other worker told and no audit line written."""

        async def change() -> T:
            result = await self._store.change(edit)
            self._log(action, name, body)
            return result

        task = asyncio.ensure_future(change())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # refused or not, nobody is left to answer
                await asyncio.shield(task)
            raise

    def _log(self, action: str, name: str, body: dict[str, Any] | None = None) -> None:
        fields = sorted(field for field in (body or {}) if field not in ("key", "name"))
        self._audit({"who": self._who, "action": action, "name": name, "fields": fields})


def _include_real_keys(request: web.Request) -> bool:
    """The export's one parameter, `include_real_keys`: true or false (1 or 0). Raises
    EditRefused for another parameter or value: a redacted export taken for the backup that
    was asked for would restore every key with '[redacted]' as its real key."""
    said = [value.lower() for name, value in request.query.items() if name == "include_real_keys"]
    if len(said) != len(request.query) or len(said) > 1 or not set(said) <= _SAID:
        raise EditRefused(
            400,
            "invalid_request",
            "GET /admin/export reads one parameter, include_real_keys=true or false (1 or 0).",
        )
    return bool(said) and said[0] in ("1", "true")


_SAID = frozenset({"1", "true", "0", "false", ""})


def refusals(handler: Handler) -> Handler:
    """Each refusal of the store or the edit as an answer in the OpenAI dialect."""

    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except EditRefused as refused:
            error = GatewayError(refused.status, refused.code, refused.message)
        except UnknownField as unknown:
            error = GatewayError(400, "invalid_key_settings", str(unknown))
        except KeysFileError as invalid:
            error = GatewayError(422, "invalid_key_settings", str(invalid))
        except StoreReadOnly as read_only:
            error = GatewayError(409, "keys_store_read_only", str(read_only))
        except StoreUnavailable as lost:
            error = GatewayError(503, "keys_store_unavailable", str(lost))
        return errors.render(error, request.path)

    return answer


async def _body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, at most MAX_BODY_BYTES. Raises EditRefused."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise EditRefused(
            413, "request_too_large", f"Admin bodies are limited to {MAX_BODY_BYTES} bytes."
        )
    raw = bytearray()
    while chunk := await request.content.readany():  # a read gives what came so far only
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise EditRefused(
                413, "request_too_large", f"Admin bodies are limited to {MAX_BODY_BYTES} bytes."
            )
    coding = content_coding(request.headers)  # every line of it, as the provider reads them
    if coding:  # as a proxied body is read (a client compressing its requests): bounded
        try:
            raw = bytearray(decode_body(bytes(raw), coding, MAX_BODY_BYTES))
        except GatewayError as error:  # 400 not what it says, 413 too large, 415 unknown
            raise EditRefused(error.status, error.code, str(error)) from None
    text = bytes(raw) or b"{}"
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError as error:  # what and where, never the body's text
        raise EditRefused(400, "invalid_json", f"The body is not valid JSON: {error}.") from None
    if not isinstance(body, dict):
        raise EditRefused(400, "invalid_json", "The body must be a JSON object.")
    try:  # as in keys.json: JSON keeps the last silently, not the value the operator read
        twice = written_twice(text)
    except RecursionError:
        raise EditRefused(400, "invalid_json", "The body is nested too deeply.") from None
    if twice is not None:
        raise EditRefused(
            400,
            "invalid_json",
            f"{shown_name(twice)} is written twice in one object of the body (JSON keeps only "
            "the last): keep one",
        )
    return body


def _json(document: Any, status: int = 200) -> web.Response:
    """An answer that may carry a key (a new virtual key, an export's real keys): no cache,
    a browser's or a proxy's, may keep it."""
    return web.Response(
        status=status,
        body=orjson.dumps(document),
        content_type="application/json",
        headers={"cache-control": "no-store"},
    )
