"""The fake provider's batches: OpenAI's files and /batches, Anthropic's message batches.

Mounted by `tests/support/fake_provider.py` (its middleware records and steers these too):

    POST /files (multipart: purpose, file)         keeps the file; a file object (Anthropic's
                                                   metadata for an anthropic-version request)
    GET, DELETE /files[/{id}]                      Anthropic's list, metadata and delete
    POST /uploads {filename, purpose, bytes, ...}  an Upload `pending`
    POST /uploads/{id}/parts (multipart: data)     keeps the part; an upload part object
    POST /uploads/{id}/complete {part_ids}         the parts joined in that order into a file,
                                                   the Upload `completed` with it
    POST /batches {input_file_id, endpoint, ...}   runs every line of the input file at once,
                                                   and answers the batch `validating`
    GET /batches/{id}                              `in_progress` for its first `polls` GETs,
                                                   then `completed` with its output_file_id
    POST /batches/{id}/cancel                      `cancelled` (every request had run), its output
    GET /files/{id}/content                        the output: one JSON line per request,
                                                   `response.body` a chat completion with usage
    POST /messages/batches {requests: [...]}       runs them; the batch `in_progress`
    GET /messages/batches/{id}                     `in_progress` for `polls` GETs, then `ended`
    POST /messages/batches/{id}/cancel             `canceling`; later GETs find it `ended`
    GET /messages/batches/{id}/results             one JSON line per request, `succeeded` with
                                                   its message and usage

Headers of the POST that makes a batch steer it: x-fake-polls: N (GETs that find it still
running, default 0), x-fake-chunks: N (each request's completion tokens, default 3),
x-fake-batch-usage: 1 (OpenAI: the batch object carries its own `usage` and `model`, as
batches made since September 2025 do), x-fake-batch-errors: N (the first N requests fail:
no usage), x-fake-output-fails: N (the first N reads of its output answer 500). A request's prompt tokens are the words of its messages, as elsewhere. Outputs
go out in OUTPUT_CHUNK_BYTES pieces, so a line spans several. What each batch used is in
`app[FAKE_BATCHES]`.
"""

from __future__ import annotations

import gzip
import io
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multipart import MultipartParser, parse_options_header  # type: ignore[import-untyped]

OUTPUT_CHUNK_BYTES = 97


@dataclass(slots=True)
class FakeBatch:
    """One batch: its object as last answered, its output lines, and what it used."""

    document: dict[str, Any]
    output: bytes
    polls: int
    is_anthropic: bool
    # model -> [prompt tokens, completion tokens] of the requests that ran
    used: dict[str, list[int]] = field(default_factory=dict)
    # reads of its output still to fail (x-fake-output-fails)
    failing_reads: int = 0

    @property
    def tokens(self) -> int:
        return sum(sum(pair) for pair in self.used.values())


@dataclass(slots=True)
class BatchesState:
    files: dict[str, bytes] = field(default_factory=dict)
    # Anthropic's files: id -> (filename, mime type)
    names: dict[str, tuple[str, str]] = field(default_factory=dict)
    # upload id -> its Upload object, and part id -> (upload id, the part's bytes)
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)
    parts: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    batches: dict[str, FakeBatch] = field(default_factory=dict)


FAKE_BATCHES = web.AppKey("fake_batches", BatchesState)


def install(app: web.Application) -> None:
    app[FAKE_BATCHES] = BatchesState()
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/files", upload)
        app.router.add_get(f"{prefix}/files", list_files)
        app.router.add_get(f"{prefix}/files/{{file_id}}", file_metadata)
        app.router.add_delete(f"{prefix}/files/{{file_id}}", delete_file)
        app.router.add_get(f"{prefix}/files/{{file_id}}/content", file_content)
        app.router.add_post(f"{prefix}/uploads", begin_upload)
        app.router.add_post(f"{prefix}/uploads/{{upload_id}}/parts", upload_part)
        app.router.add_post(f"{prefix}/uploads/{{upload_id}}/complete", complete_upload)
        app.router.add_post(f"{prefix}/batches", make_openai)
        app.router.add_get(f"{prefix}/batches/{{batch_id}}", see)
        app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel", cancel)
        app.router.add_post(f"{prefix}/messages/batches", make_anthropic)
        app.router.add_get(f"{prefix}/messages/batches/{{batch_id}}", see)
        app.router.add_post(f"{prefix}/messages/batches/{{batch_id}}/cancel", cancel)
        app.router.add_get(f"{prefix}/messages/batches/{{batch_id}}/results", results)


def answer(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def not_found(what: str) -> web.Response:
    error = {"message": f"No such {what}", "type": "invalid_request_error"}
    return answer({"error": error}, 404)


def words(value: object) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(map(words, value))
    if isinstance(value, dict):
        return words(value.get("content")) + words(value.get("text"))
    return 0


def steering(request: web.Request) -> tuple[int, int, int]:
    """Polls, completion tokens per request, failing requests."""
    headers = request.headers
    return (
        int(headers.get("x-fake-polls", "0")),
        int(headers.get("x-fake-chunks", "3")),
        int(headers.get("x-fake-batch-errors", "0")),
    )


def failing_reads(request: web.Request) -> int:
    return int(request.headers.get("x-fake-output-fails", "0"))


async def upload(request: web.Request) -> web.Response:
    body = await request.read()
    _, options = parse_options_header(request.headers["content-type"])
    parts = {part.name: part for part in MultipartParser(io.BytesIO(body), options["boundary"])}
    content = parts["file"].raw
    if is_anthropic_files(request):  # Anthropic's Files API: the file alone, no purpose
        file_id = f"file_{uuid.uuid4().hex[:24]}"
        request.app[FAKE_BATCHES].files[file_id] = content
        state = request.app[FAKE_BATCHES]
        state.names[file_id] = (parts["file"].filename, parts["file"].content_type)
        return answer(anthropic_file(state, file_id))
    file_id = f"file-{uuid.uuid4().hex[:24]}"
    request.app[FAKE_BATCHES].files[file_id] = content
    return answer(file_object(file_id, content, parts["file"].filename, parts["purpose"].value))


def is_anthropic_files(request: web.Request) -> bool:
    """Anthropic's SDK sends anthropic-version (and anthropic-beta: files-api-...)."""
    return "anthropic-version" in request.headers


def anthropic_file(state: BatchesState, file_id: str) -> dict[str, Any]:
    """Anthropic's file metadata."""
    filename, mime_type = state.names.get(file_id, ("output.jsonl", "application/jsonl"))
    return {
        "id": file_id,
        "type": "file",
        "filename": filename,
        "mime_type": mime_type,
        "size_bytes": len(state.files[file_id]),
        "created_at": "2026-01-01T00:00:00Z",
        "downloadable": False,
    }


async def list_files(request: web.Request) -> web.Response:
    """Anthropic's page of files (`limit`, `after_id`, `before_id`)."""
    state = request.app[FAKE_BATCHES]
    ids = list(state.names)
    after = request.query.get("after_id")
    if after in ids:
        ids = ids[ids.index(after) + 1 :]
    limit = int(request.query.get("limit", "20"))
    page = ids[:limit]
    return answer(
        {
            "data": [anthropic_file(state, file_id) for file_id in page],
            "has_more": len(ids) > limit,
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
        }
    )


async def file_metadata(request: web.Request) -> web.Response:
    state, file_id = request.app[FAKE_BATCHES], request.match_info["file_id"]
    if file_id not in state.files:
        return not_found("file")
    return answer(anthropic_file(state, file_id))


async def delete_file(request: web.Request) -> web.Response:
    state, file_id = request.app[FAKE_BATCHES], request.match_info["file_id"]
    if state.files.pop(file_id, None) is None:
        return not_found("file")
    state.names.pop(file_id, None)
    return answer({"id": file_id, "type": "file_deleted"})


def file_object(file_id: str, content: bytes, filename: str, purpose: str) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": len(content),
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
    }


async def begin_upload(request: web.Request) -> web.Response:
    sent = orjson.loads(await request.read())
    upload_id = f"upload_{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    document = {
        "id": upload_id,
        "object": "upload",
        "bytes": sent["bytes"],
        "created_at": created,
        "expires_at": created + 3600,
        "filename": sent["filename"],
        "purpose": sent["purpose"],
        "status": "pending",
        "file": None,
    }
    request.app[FAKE_BATCHES].uploads[upload_id] = document
    return answer(document)


async def upload_part(request: web.Request) -> web.Response:
    state, upload_id = request.app[FAKE_BATCHES], request.match_info["upload_id"]
    if upload_id not in state.uploads:
        return not_found("upload")
    body = await request.read()
    _, options = parse_options_header(request.headers["content-type"])
    parts = {part.name: part for part in MultipartParser(io.BytesIO(body), options["boundary"])}
    part_id = f"part_{uuid.uuid4().hex[:24]}"
    state.parts[part_id] = (upload_id, parts["data"].raw)
    return answer(
        {
            "id": part_id,
            "object": "upload.part",
            "created_at": int(time.time()),
            "upload_id": upload_id,
        }
    )


async def complete_upload(request: web.Request) -> web.Response:
    state, upload_id = request.app[FAKE_BATCHES], request.match_info["upload_id"]
    document = state.uploads.get(upload_id)
    if document is None:
        return not_found("upload")
    sent = orjson.loads(await request.read())
    content = b"".join(state.parts[part_id][1] for part_id in sent["part_ids"])
    file_id = f"file-{uuid.uuid4().hex[:24]}"
    state.files[file_id] = content
    document["status"] = "completed"
    document["file"] = file_object(file_id, content, document["filename"], document["purpose"])
    return answer(document)


async def file_content(request: web.Request) -> web.StreamResponse:
    state = request.app[FAKE_BATCHES]
    file_id = request.match_info["file_id"]
    content = state.files.get(file_id)
    if content is None:
        return not_found("file")
    for batch in state.batches.values():
        if batch.document.get("_output") == file_id and batch.failing_reads > 0:
            batch.failing_reads -= 1
            return answer({"error": {"message": "fake failure", "type": "server_error"}}, 500)
    return await in_pieces(request, content, "application/octet-stream")


async def in_pieces(request: web.Request, content: bytes, content_type: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": content_type})
    await response.prepare(request)
    for start in range(0, len(content), OUTPUT_CHUNK_BYTES):
        await response.write(content[start : start + OUTPUT_CHUNK_BYTES])
    await response.write_eof()
    return response


def chat_completion(model: str, prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "tok " * completion},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


async def make_openai(request: web.Request) -> web.Response:
    sent = orjson.loads(await request.read())
    state = request.app[FAKE_BATCHES]
    lines = state.files.get(sent.get("input_file_id", ""))
    if lines is None:
        return not_found("file")
    polls, completion, errors = steering(request)
    batch_id = f"batch_{uuid.uuid4().hex[:24]}"
    used: dict[str, list[int]] = {}
    output = []
    for index, line in enumerate(lines.splitlines()):
        item = orjson.loads(line)
        model, prompt = item["body"]["model"], max(1, words(item["body"].get("messages")))
        line_id = f"batch_req_{uuid.uuid4().hex[:16]}"
        if index < errors:
            error = {"code": "invalid_request", "message": "fake failure"}
            output.append({"id": line_id, "custom_id": item["custom_id"], "error": error})
            continue
        counted = used.setdefault(model, [0, 0])
        counted[0] += prompt
        counted[1] += completion
        response = {
            "status_code": 200,
            "request_id": f"req_{uuid.uuid4().hex[:16]}",
            "body": chat_completion(model, prompt, completion),
        }
        output.append(
            {"id": line_id, "custom_id": item["custom_id"], "response": response, "error": None}
        )
    output_id = f"file-{uuid.uuid4().hex[:24]}"
    state.files[output_id] = b"".join(orjson.dumps(line) + b"\n" for line in output)
    document: dict[str, Any] = {
        "id": batch_id,
        "object": "batch",
        "endpoint": sent.get("endpoint"),
        "errors": None,
        "input_file_id": sent["input_file_id"],
        "completion_window": sent.get("completion_window", "24h"),
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": int(time.time()),
        "request_counts": {"total": len(output), "completed": 0, "failed": 0},
        "metadata": sent.get("metadata"),
        "usage": None,
    }
    batch = FakeBatch(dict(document), b"", polls, False, used, failing_reads(request))
    batch.document["_output"] = output_id
    batch.document["_with_usage"] = request.headers.get("x-fake-batch-usage") == "1"
    state.batches[batch_id] = batch
    return answer(document)


async def make_anthropic(request: web.Request) -> web.Response:
    sent = orjson.loads(await request.read())
    polls, completion, errors = steering(request)
    batch_id = f"msgbatch_{uuid.uuid4().hex[:24]}"
    used: dict[str, list[int]] = {}
    output = []
    for index, item in enumerate(sent.get("requests") or []):
        params = item["params"]
        model, prompt = params["model"], max(1, words(params.get("messages")))
        if index < errors:
            error = {"type": "error", "error": {"type": "invalid_request_error", "message": "x"}}
            output.append(
                {"custom_id": item["custom_id"], "result": {"type": "errored", "error": error}}
            )
            continue
        counted = used.setdefault(model, [0, 0])
        counted[0] += prompt
        counted[1] += completion
        message = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "tok " * completion}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": prompt,
                "output_tokens": completion,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        output.append(
            {"custom_id": item["custom_id"], "result": {"type": "succeeded", "message": message}}
        )
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    count = len(output)
    document = {
        "id": batch_id,
        "type": "message_batch",
        "processing_status": "in_progress",
        "request_counts": {
            "processing": count,
            "succeeded": 0,
            "errored": 0,
            "canceled": 0,
            "expired": 0,
        },
        "ended_at": None,
        "created_at": now,
        "expires_at": now,
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": None,
    }
    body = b"".join(orjson.dumps(line) + b"\n" for line in output)
    state = request.app[FAKE_BATCHES]
    state.batches[batch_id] = FakeBatch(document, body, polls, True, used, failing_reads(request))
    return answer(document)


def ended(request: web.Request, batch: FakeBatch) -> dict[str, Any]:
    """The batch's object once every request ran."""
    document = batch.document
    if batch.is_anthropic:
        succeeded = sum(1 for line in batch.output.splitlines() if b'"succeeded"' in line)
        document["processing_status"] = "ended"
        document["ended_at"] = document["created_at"]
        document["request_counts"] = {
            "processing": 0,
            "succeeded": succeeded,
            "errored": batch.output.count(b"\n") - succeeded,
            "canceled": 0,
            "expired": 0,
        }
        base = f"{request.scheme}://{request.host}{request.path.split('/messages/')[0]}"
        document["results_url"] = f"{base}/messages/batches/{document['id']}/results"
        return document
    if document["status"] not in ("cancelled", "completed"):
        document["status"] = "completed"
    document["output_file_id"] = document["_output"]
    document["completed_at"] = int(time.time())
    if document["_with_usage"]:
        (model, (prompt, completion)), *_ = batch.used.items()
        document["model"] = model
        document["usage"] = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
    return document


def shown(document: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in document.items() if not name.startswith("_")}


async def see(request: web.Request) -> web.StreamResponse:
    batch = request.app[FAKE_BATCHES].batches.get(request.match_info["batch_id"])
    if batch is None:
        return not_found("batch")
    if batch.polls > 0:
        batch.polls -= 1
        running = "in_progress"
        if batch.is_anthropic:
            batch.document["processing_status"] = running
        elif batch.document["status"] == "validating":
            batch.document["status"] = running
        return answer(shown(batch.document))
    document = shown(ended(request, batch))
    if batch.is_anthropic and request.headers.get("x-fake-encoding") == "gzip":
        return await gzipped(request, document)
    return answer(document)


async def gzipped(request: web.Request, payload: object) -> web.StreamResponse:
    """JSON gzip-compressed, in two chunks, without a Content-Length."""
    body = gzip.compress(orjson.dumps(payload), mtime=0)
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    await response.write_eof(body[len(body) // 2 :])
    return response


async def cancel(request: web.Request) -> web.Response:
    batch = request.app[FAKE_BATCHES].batches.get(request.match_info["batch_id"])
    if batch is None:
        return not_found("batch")
    if batch.is_anthropic:
        batch.document["processing_status"] = "canceling"
        batch.document["cancel_initiated_at"] = batch.document["created_at"]
        batch.polls = 0
        return answer(shown(batch.document))
    batch.document["status"] = "cancelled"
    return answer(shown(ended(request, batch)))


async def results(request: web.Request) -> web.StreamResponse:
    batch = request.app[FAKE_BATCHES].batches.get(request.match_info["batch_id"])
    if batch is None or not batch.is_anthropic:
        return not_found("batch")
    if batch.document["processing_status"] != "ended":
        return answer({"type": "error", "error": {"type": "invalid_request_error"}}, 400)
    if batch.failing_reads > 0:
        batch.failing_reads -= 1
        return answer({"type": "error", "error": {"type": "api_error", "message": "x"}}, 500)
    return await in_pieces(request, batch.output, "application/binary")
