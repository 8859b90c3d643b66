"""The request as it goes to one target: URL, headers and body, built once per target.

The body is the client's bytes, except where the target names its own `model`: then the
top-level `model` value is replaced in place and every other byte stays as sent (a
compressed upload is inflated for that, and goes up uncompressed): a JSON body's `model`
member (of a model config object, where Anthropic's managed agents take one, its `id`, beside
its `effort`, `speed`, ...; in a batch, each request's: an Anthropic message batch's
`params.model`, Gemini's batchEmbedContents' `model`), or a form's `model` field (a multipart
upload: transcriptions, image edits; a url-encoded form); and the model a path names where
the provider reads it there (Azure's deployments, Gemini's native API: `model_in_path`).
Headers come from `providers.forwarded_headers`; each attempt only sets the credential of the
pool key it uses, or, for a cloud, signs the request as it will go (`signing`). A Vertex
target's path names its own project and region in place of the client's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus

import orjson
from multidict import CIMultiDict, CIMultiDictProxy
from multipart import parse_options_header  # type: ignore[import-untyped]  # no type hints
from yarl import URL

from proxy.encodings import decode_body
from proxy.upstream.providers import forwarded_headers
from proxy.upstream.targets import Credential, Target

# The next byte that matters to the scanner: a string, or a nesting bracket.
_NEXT = re.compile(rb'["{}\[\]]')
# The rest of a JSON string after its opening quote, through the closing quote: runs of plain
# bytes taken whole between escapes (an alternation tried at each byte took 3.5 times as long:
# 3.0 against 0.8 ms to swap the model of a 33 KB chat).
_STRING_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SPACE = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which Python's json.loads skips
# A url-encoded form's fields, with the separators between them (python-multipart, under
# Starlette and FastAPI servers, splits at ';' as well as '&': named.py reads them so).
_FORM_FIELDS = re.compile(rb"([&;])")
# A query string's parameters (aiohttp, and Python's parse_qsl since 3.10, split at '&' only).
_QUERY_FIELDS = re.compile(rb"(&)")
# The fields that name the model: a form's, and a query's (Azure's Realtime: `deployment`).
_FORM_NAMES, _QUERY_NAMES = frozenset(("model",)), frozenset(("model", "deployment"))
# A value's bytes in a body: where it starts, where it ends.
Span = tuple[int, int]
_OPEN_OBJECT, _OPEN_ARRAY = 0x7B, 0x5B  # "{", "["
# What a body holding a message batch's requests has among its bytes (`_model_spans`).
_REQUESTS, _ESCAPE = b'"requests"', b"\\u"
_RESOURCE = b"models/"  # how Gemini's bodies name a model: as its resource


@dataclass(slots=True)
class Outbound:
    """One target's request; `use` sets the pool key for the next attempt."""

    target: Target
    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes

    async def use(self, credential: Credential) -> None:
        """Set `credential` for the next attempt. Raises SigningFailed (a cloud's)."""
        signer = credential.signer
        if signer is None:
            self.use_key(credential)
        else:
            await signer.sign(self.method, self.url, self.headers, self.body)

    def use_key(self, credential: Credential) -> None:
        """`use` for a credential without a signer (a real key): set at once, no coroutine."""
        self.target.provider.set_credential(self.headers, credential.api_key)


def build(
    target: Target,
    method: str,
    incoming: CIMultiDictProxy[str],
    tail: str,
    query: str,
    body: bytes,
    request_id: str,
    max_body_bytes: int,
) -> Outbound:
    """The request for `target`. Raises 400/413/415 only when a model swap must read the body."""
    provider = target.provider
    # The key is set by each attempt (`use`), for the pool key it uses.
    headers = forwarded_headers(provider, incoming)
    headers["x-request-id"] = request_id
    if target.model is not None and method == "POST":
        tail = model_in_path(tail, target.model)
    if target.model is not None and body and method == "POST":
        # every line: two are one list ("gzip, gzip"), as the peek and the provider read them
        encoding = ", ".join(incoming.getall("content-encoding", ()))
        plain = decode_body(body, encoding, max_body_bytes)
        swapped = swap_model(plain, target.model, incoming.get("content-type", ""))
        if swapped is not plain:
            body = swapped
            headers.popall("content-encoding", None)
    if target.project_path is not None:
        tail = in_project(tail, target.project_path)
    return Outbound(target, method, provider.url(tail, query), headers, body)


def in_project(tail: str, project_path: str) -> str:
    """`projects/<p>/locations/<r>[/rest]` as `<project_path>[/rest]`, `projects/<p>[/rest]`
    as the target's project's: the token goes to no project a client names. Another tail
    as it is."""
    segments = tail.split("/", 4)
    if segments[0] != "projects" or len(segments) < 2:
        return tail
    if len(segments) >= 4 and segments[2] == "locations":
        return "/".join((project_path, *segments[4:]))
    project = project_path.split("/", 2)[:2]  # projects/<the target's>
    return "/".join((*project, *segments[2:]))


def model_in_path(tail: str, model: str) -> str:
    """`tail` with the model its path names replaced by `model`, where the provider reads
    it there and not in the body: Azure's deployments API (`openai/deployments/<name>/…`),
    OpenAI's legacy engines (`engines/<name>/…`), Gemini's native API (`…models/<name>:<method>`).
    Another tail as it is."""
    if "deployments/" not in tail and "engines/" not in tail and "models/" not in tail:
        return tail
    segments, named = tail.split("/"), quote(model, safe="")
    if len(segments) > 3 and segments[0] == "openai" and segments[1] == "deployments":
        segments[2] = named
    elif len(segments) > 2 and segments[0] == "engines":
        segments[1] = named
    elif len(segments) > 1 and segments[-2] == "models" and ":" in segments[-1]:
        segments[-1] = f"{named}:{segments[-1].rpartition(':')[2]}"
    else:
        return tail
    return "/".join(segments)


def swap_model(body: bytes, model: str, content_type: str = "") -> bytes:
    """`body` with its top-level "model" replaced; `body` itself when it has none.

    A JSON object (whatever its Content-Type: `curl -d` labels JSON a form) has every
    top-level "model" member replaced, however its name is spelt (`"mod\\u0065l"`, `"Model"`):
    a body naming it twice runs the target's model whichever of them the provider reads. Any
    other body of a form type has each of its `model` fields replaced."""
    if body.lstrip().removeprefix(_BOM).lstrip()[:1] == b"{":  # as Python's json reads it
        return _swap_json(body, model)
    media_type, options = parse_options_header(content_type)
    if media_type == "multipart/form-data" and options.get("boundary"):
        return _swap_multipart(body, options["boundary"].encode("latin-1"), model.encode())
    if media_type == "application/x-www-form-urlencoded":
        return _swap_urlencoded(body, model)
    return body


def swap_query_model(query: str, model: str) -> str:
    """A raw query string with each `model` (and `deployment`) parameter's value replaced (a
    WebSocket session names its model there: Realtime's `?model=`, Azure's `?deployment=`);
    every other byte as sent."""
    if "model" not in query and "deployment" not in query:
        return query
    return _swap_urlencoded(query.encode(), model, _QUERY_FIELDS, _QUERY_NAMES).decode()


def swap_model_within(body: bytes, member: str, model: str) -> bytes:
    """`body` (a JSON object) with the top-level "model" of its object member `member`
    replaced, as `swap_model` does; `body` itself when it has none."""
    objects = [span for span in _member_values(body, member)[1] if body[span[0]] == _OPEN_OBJECT]
    if not objects:
        return body
    start, end = objects[-1]  # the last one, as most parsers read a name given twice
    inner = body[start:end]
    swapped = _swap_json(inner, model)
    return body if swapped is inner else body[:start] + swapped + body[end:]


def _swap_json(body: bytes, model: str) -> bytes:
    spans = _model_spans(body)
    if not spans:
        return body
    value = orjson.dumps(model)
    resource = b'"' + _RESOURCE + value[1:]
    kept, parts = 0, list[bytes]()
    for start, end, is_resource in spans:
        parts += (body[kept:start], resource if is_resource else value)
        kept = end
    parts.append(body[kept:])
    return b"".join(parts)


def _model_spans(body: bytes) -> list[tuple[int, int, bool]]:
    """Where a JSON object names the model it runs, in order, each with whether it is to be
    named as a resource: its top-level `model` strings, the `id` of a model config object
    there (Anthropic's managed agents), and those of each request in a batch (`requests`):
    its own (Gemini's batchEmbedContents, which must name the path's model, as a resource,
    `models/<model>`, where the client did) or its `params`' (an Anthropic message batch)."""
    strings, holders = _member_values(body, "model")
    for start, end in holders:
        if body[start] == _OPEN_OBJECT:
            strings += _within(_member_values(body[start:end], "id")[0], start)
    spans = [(start, end, False) for start, end in strings]
    if _REQUESTS in body or _ESCAPE in body:  # (a name may be spelt with escapes)
        for start, end in _member_values(body, "requests")[1]:
            if body[start] != _OPEN_ARRAY:
                continue
            for item_start, item_end in _array_objects(body[start:end]):
                at = start + item_start
                item = body[at : start + item_end]
                for own_start, own_end in _within(_member_values(item, "model")[0], at):
                    is_resource = body.startswith(_RESOURCE, own_start + 1)
                    spans.append((own_start, own_end, is_resource))
                for params_start, params_end in _member_values(item, "params")[1]:
                    if item[params_start] == _OPEN_OBJECT:
                        params = item[params_start:params_end]
                        found = _member_values(params, "model")[0]
                        spans += ((a, b, False) for a, b in _within(found, at + params_start))
    return sorted(spans)


def _within(spans: list[Span], offset: int) -> list[Span]:
    """Spans found in a slice of the body, as spans of the body (the slice at `offset`)."""
    return [(start + offset, end + offset) for start, end in spans]


def _swap_multipart(body: bytes, boundary: bytes, model: bytes) -> bytes:
    """The content of each part named `model` replaced (RFC 7578 framing: CRLF lines)."""
    delimiter, spans = b"--" + boundary, []
    position = body.find(delimiter)
    while position >= 0 and not body.startswith(b"--", position + len(delimiter)):
        line_end = body.find(b"\r\n", position)
        head_end = body.find(b"\r\n\r\n", line_end) if line_end >= 0 else -1
        if head_end < 0:
            break
        content_end = body.find(b"\r\n" + delimiter, head_end + 4)
        if content_end < 0:
            break
        if _names_model(body[line_end + 2 : head_end]):
            spans.append((head_end + 4, content_end))
        position = content_end + 2
    return _replaced(body, spans, model) if spans else body


def _names_model(head: bytes) -> bool:
    """A part's head whose Content-Disposition names the field `model`."""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition":
            _, options = parse_options_header(value.decode("latin-1"))
            return bool(options.get("name") == "model")
    return False


def _swap_urlencoded(
    body: bytes,
    model: str,
    separators: re.Pattern[bytes] = _FORM_FIELDS,
    names: frozenset[str] = _FORM_NAMES,
) -> bytes:
    """The value of each field of `names` replaced; every other byte as sent."""
    fields = separators.split(body)
    value = quote(model, safe="").encode()
    swapped = False
    for at, field in enumerate(fields):
        name, equals, _ = field.partition(b"=")
        if equals and unquote_plus(name.decode("utf-8", "replace")) in names:
            fields[at], swapped = name + b"=" + value, True
    return b"".join(fields) if swapped else body


def _replaced(body: bytes, spans: list[tuple[int, int]], value: bytes) -> bytes:
    kept, parts = 0, list[bytes]()
    for start, end in spans:
        parts += (body[kept:start], value)
        kept = end
    parts.append(body[kept:])
    return b"".join(parts)


def _member_values(body: bytes, name: str) -> tuple[list[Span], list[Span]]:
    """The byte spans of the values of `name` in the top-level object: its strings, and its
    objects and arrays (any other value is left to the provider)."""
    strings: list[Span] = []
    containers: list[Span] = []
    plain, depth, position, size = f'"{name}"'.encode(), 0, 0, len(body)
    opened = -1  # where the object or array value being skipped opened (depth 2), else -1
    while (found := _NEXT.search(body, position)) is not None:
        at = found.start()
        char = body[at]
        if char != 0x22:  # a bracket
            depth += 1 if char in b"{[" else -1
            position = at + 1
            if opened >= 0 and depth == 1:
                containers.append((opened, position))
                opened = -1
            continue
        string_end = _string_end(body, at)
        if string_end is None:
            break
        position = string_end
        value = _member_value(body, at, string_end, depth, plain, name)
        if value is None or value >= size:
            continue
        if body[value] in b"{[":  # its end is where the depth comes back to 1
            opened = value
            continue
        if body[value] != 0x22:
            continue  # neither a string nor a container: leave it to the provider
        value_end = _string_end(body, value)
        if value_end is None:
            break
        strings.append((value, value_end))
        position = value_end
    return strings, containers


def _array_objects(array: bytes) -> list[Span]:
    """The byte spans of the objects directly in a JSON array (`array` opens with `[`)."""
    objects: list[Span] = []
    depth, position, opened = 0, 0, -1
    while (found := _NEXT.search(array, position)) is not None:
        at = found.start()
        char = array[at]
        if char == 0x22:  # a string: skipped whole
            string_end = _string_end(array, at)
            if string_end is None:
                break
            position = string_end
            continue
        position = at + 1
        if char in b"{[":
            if depth == 1 and char == _OPEN_OBJECT:
                opened = at
            depth += 1
            continue
        depth -= 1
        if depth == 1 and opened >= 0:
            objects.append((opened, position))
            opened = -1
        elif depth <= 0:
            break
    return objects


def _member_value(
    body: bytes, at: int, string_end: int, depth: int, plain: bytes, name: str
) -> int | None:
    """Where the value of the member whose name is the string at `at` (to `string_end`)
    starts, when that member is `name`'s in the top-level object (`depth` 1); else None (a
    string value that happens to read `name`, or one deeper down)."""
    if depth != 1 or not _is_name(body[at:string_end], plain, name):
        return None
    colon = _skip_space(body, string_end)
    if body[colon : colon + 1] != b":":
        return None
    return _skip_space(body, colon + 1)


def _is_name(quoted: bytes, plain: bytes, name: str) -> bool:
    """A JSON string (quotes included) reads `name` as the most lenient parser reads a name:
    as `plain`, in another case (Go's encoding/json, under Ollama and LocalAI, folds it:
    "Model", "MODEL", the Kelvin sign as k, the long s as s), or spelt with escapes."""
    if quoted == plain:
        return True
    size = len(quoted)
    if size == len(plain) and quoted.lower() == plain:
        return True
    # A name is at most 6 bytes a letter (an escape): a longer string is no name, not decoded.
    if size > 6 * len(name) + 2 or (b"\\" not in quoted and quoted.isascii()):
        return False
    try:
        return bool(orjson.loads(quoted).casefold() == name)
    except orjson.JSONDecodeError:
        return False


def _string_end(body: bytes, quote: int) -> int | None:
    match = _STRING_REST.match(body, quote + 1)
    return None if match is None else match.end()


def _skip_space(body: bytes, position: int) -> int:
    while position < len(body) and body[position] in _SPACE:
        position += 1
    return position
