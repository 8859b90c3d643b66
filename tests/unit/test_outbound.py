"""The outbound request's body: a target's `model` swapped in, every other byte as sent."""

from __future__ import annotations

import orjson

from proxy.upstream.outbound import model_in_path, swap_model, swap_model_within, swap_query_model


def test_only_the_top_level_model_is_swapped_and_every_other_byte_stays() -> None:
    raw = b'{"messages":[{"role":"user","content":"{\\"model\\": \\"x\\"}"}],"metadata":{"model":"m"}, "model" : "gpt-4o"}'
    assert swap_model(raw, "gpt-4o-mini") == raw.replace(b'"gpt-4o"', b'"gpt-4o-mini"')


def test_a_body_naming_model_twice_runs_the_targets_model_whichever_the_provider_reads() -> None:
    """Before, only the first was swapped, and a provider's parser reads the last: a client
    ran any model on a target that forces one (a cheap route, a fallback)."""
    raw = b'{"messages":[{"role":"user","content":"hi"}],"model":"a","model":"o1-pro"}'
    swapped = swap_model(raw, "gpt-4o-mini")
    assert orjson.loads(swapped)["model"] == "gpt-4o-mini"
    assert (
        swapped
        == b'{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o-mini","model":"gpt-4o-mini"}'
    )


def test_a_model_key_spelt_with_an_escape_is_swapped_too() -> None:
    raw = b'{"mod\\u0065l":"o1-pro","messages":[{"role":"user","content":"hi"}]}'
    assert orjson.loads(swap_model(raw, "gpt-4o-mini"))["model"] == "gpt-4o-mini"


def test_a_body_without_a_string_model_is_left_as_it_is() -> None:
    for raw in (b'{"messages":[]}', b'{"model":null}', b"not json", b""):
        assert swap_model(raw, "gpt-4o-mini") is raw


def test_a_model_config_objects_own_id_is_swapped_and_every_other_byte_stays() -> None:
    """Anthropic's managed agents take `model` as an object, its `id` the model: only that
    `id` is the target's (each of them, should it be named twice), beside a string `model`."""
    raw = b'{"model" : { "id":"a", "effort":{"id":"x"}, "mod\\u0065l":"m", "i\\u0064": "b"}, "id": "c", "model":"d"}'
    swapped = swap_model(raw, "pinned")
    assert swapped == raw.replace(b'"a"', b'"pinned"').replace(b'"b"', b'"pinned"').replace(
        b'"d"', b'"pinned"'
    )
    for body in (b'{"model": {"effort": "high"}}', b'{"model": {"id": null}}', b'{"model": {'):
        assert swap_model(body, "pinned") is body


def test_each_model_of_a_message_batchs_requests_is_swapped_and_nothing_else() -> None:
    raw = (
        b'{"requests": [1, "{\\"params\\": {", {"params": "model"}, [{"params": {"model": "z"}}],'
        b' {"custom_id": "model", "params": {"tools": [{"model": "t"}], "model": "a"}},'
        b' {"params": {"model": "b", "metadata": {"model": "m"}}}], "model": "c"}'
    )
    swapped = swap_model(raw, "pinned")
    pinned = raw.replace(b'"a"', b'"pinned"').replace(b'"b"', b'"pinned"')
    assert swapped == pinned.replace(b'"c"', b'"pinned"')
    escaped = b'{"r\\u0065quests": [{"params": {"model": "a"}}]}'
    assert swap_model(escaped, "pinned") == escaped.replace(b'"a"', b'"pinned"')
    for body in (b'{"requests": {"params": {"model": "a"}}}', b'{"requests": [{"params": {'):
        assert swap_model(body, "pinned") is body


def test_a_multipart_forms_model_field_is_swapped_and_every_other_byte_stays() -> None:
    raw = (
        b"preamble\r\n--B\r\n"
        b'Content-Disposition: form-data; name="file"; filename="model.jsonl"\r\n'
        b"Content-Type: application/jsonl\r\n\r\n"
        b'{"model": "in-a-file"}\r\n--B\r\n'
        b"content-disposition: form-data; name=model\r\n\r\n"
        b"whisper-1\r\n--B\r\n"
        b'Content-Disposition: form-data; name="prompt"\r\n\r\n'
        b"model\r\n--B--\r\n"
    )
    swapped = swap_model(raw, "pinned", 'multipart/form-data; boundary="B"')
    assert swapped == raw.replace(b"whisper-1", b"pinned")


def test_a_url_encoded_forms_model_fields_are_swapped() -> None:
    raw = b"prompt=model%3Dx&mod%65l=dall-e-2;n=1&model=b"
    swapped = swap_model(raw, "pinned/v 2", "application/x-www-form-urlencoded")
    assert swapped == b"prompt=model%3Dx&mod%65l=pinned%2Fv%202;n=1&model=pinned%2Fv%202"


def test_json_labelled_a_form_is_swapped_as_json_and_a_form_without_model_stays() -> None:
    raw = b' {"model": "gpt-4o", "input": "x"}'
    assert swap_model(raw, "pinned", "application/x-www-form-urlencoded") == raw.replace(
        b"gpt-4o", b"pinned"
    )
    for body, content_type in (
        (b"prompt=x&n=1", "application/x-www-form-urlencoded"),
        (
            b'--B\r\nContent-Disposition: form-data; name="file"\r\n\r\nx\r\n--B--',
            "multipart/form-data; boundary=B",
        ),
        (b"--B\r\n", "multipart/form-data; boundary=B"),
        (b"model=x", "text/plain"),
    ):
        assert swap_model(body, "pinned", content_type) is body


def test_a_members_own_model_is_swapped_within_it_and_nothing_else() -> None:
    raw = b'{"model": "a", "response" : {"tools": [{"model": "t"}], "model": "o1-pro"}, "x": {}}'
    swapped = swap_model_within(raw, "response", "pinned")
    assert swapped == raw.replace(b'"o1-pro"', b'"pinned"')
    for body in (b'{"response": "model"}', b'{"response": {"input": "hi"}}', b'{"response":'):
        assert swap_model_within(body, "response", "pinned") is body


def test_json_after_a_byte_order_mark_is_swapped_as_json() -> None:
    raw = b'\xef\xbb\xbf {"model": "gpt-4o"}'
    assert swap_model(raw, "pinned", "application/json") == raw.replace(b"gpt-4o", b"pinned")


def test_the_model_a_path_names_is_replaced_where_the_provider_reads_it_there() -> None:
    for tail, expected in (
        (
            "openai/deployments/prod/chat/completions",
            "openai/deployments/pin%2Fv2/chat/completions",
        ),
        ("engines/davinci/completions", "engines/pin%2Fv2/completions"),
        ("models/gemini-2.5-pro:generateContent", "models/pin%2Fv2:generateContent"),
        (
            "projects/p/locations/l/publishers/google/models/gemini:streamGenerateContent",
            "projects/p/locations/l/publishers/google/models/pin%2Fv2:streamGenerateContent",
        ),
    ):
        assert model_in_path(tail, "pin/v2") == expected
    for tail in (
        "chat/completions",
        "deployments/depl_1/run",  # Anthropic's managed agents: an id, not a model
        "openai/deployments",
        "models/gpt-4o",
        "models",
        "engines/davinci",
        "tunedModels/t1:generateContent",
    ):
        assert model_in_path(tail, "pin/v2") == tail


def test_a_querys_model_and_azures_deployment_are_swapped_and_nothing_else() -> None:
    query = "api-version=2025-04-01-preview&deployment=gpt-realtime&x=model&model=a"
    assert swap_query_model(query, "pin/v2") == (
        "api-version=2025-04-01-preview&deployment=pin%2Fv2&x=model&model=pin%2Fv2"
    )
    assert swap_query_model("intent=transcription", "pin") == "intent=transcription"


def test_a_model_named_in_another_case_is_swapped_as_go_reads_it() -> None:
    """Go's encoding/json (Ollama, LocalAI) reads a name in any case as the field."""
    raw = b'{"Model": "a", "MODEL": "b", "modeL": "c", "models": "d", "input": "Model"}'
    pinned = raw.replace(b'"a"', b'"pinned"').replace(b'"b"', b'"pinned"')
    assert swap_model(raw, "pinned") == pinned.replace(b'"c"', b'"pinned"')


def test_a_batch_requests_own_model_is_swapped_as_a_resource_where_so_named() -> None:
    """Gemini's batchEmbedContents: each request names the path's model, `models/<model>`;
    a top-level `model` so spelt is any provider's and gets the target's model as it is."""
    raw = b'{"requests": [{"model": "models/a"}, {"model": "b"}], "model": "models/c"}'
    swapped = swap_model(raw, "pinned")
    assert (
        swapped
        == b'{"requests": [{"model": "models/pinned"}, {"model": "pinned"}], "model": "pinned"}'
    )


def test_strings_full_of_escapes_hide_no_model_and_end_where_json_ends_them() -> None:
    # The scanner's strings end at their own closing quote however many escaped quotes and
    # backslashes they hold: a "model" inside one is text, never the body's model.
    tricky = ["\\", '"', '\\"', '"model": "x"', '\\\\"model\\\\"', "\n\t\u2028", "é\\u0022"]
    for text in tricky:
        document = {"messages": [{"content": text}], "model": "gpt-4o", "note": {"model": text}}
        swapped = swap_model(orjson.dumps(document), "pinned")
        assert orjson.loads(swapped) == {**document, "model": "pinned"}, text
