"""The daemon's API as its users reach it: the official `openai` Python package against a daemon on
127.0.0.1 (the tiny Llama, a real oxigraph KB, SQLite), and hostile requests that must get an
OpenAI-shaped 4xx while the daemon keeps serving."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from kbsync.daemon import Daemon, api_token
from tests.daemon_helpers import QUESTION, daemon, daemons, kb  # noqa: F401 (fixtures)

KENYA = "Question: What is the capital of Kenya?\nAnswer:"


@pytest.fixture
def client(daemon: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{daemon.api.url}/v1", api_key=api_token(daemon.settings), max_retries=0,
                       timeout=300) as c:
        yield c


def model_id(client: openai.OpenAI) -> str:
    [model] = client.models.list().data
    return model.id


def ask(client: openai.OpenAI, question: str = QUESTION) -> str:
    out = client.chat.completions.create(model=model_id(client), messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}])
    return out.choices[0].message.content or ""


def test_models_chat_and_completions_with_usage(client: openai.OpenAI, daemon: Daemon) -> None:
    [model] = client.models.list().data
    assert model.id == "tiny-llama" and model.owned_by == "kbsync"
    chat = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": QUESTION}])
    assert chat.choices[0].message.content == "Abuja" and chat.choices[0].finish_reason == "stop"
    assert chat.usage is not None and chat.usage.prompt_tokens > 5 and chat.usage.completion_tokens >= 1
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    done = client.completions.create(model=model.id, prompt=[KENYA, "Question: What is the capital of Japan?\nAnswer:"])
    assert [c.text for c in done.choices] == ["Nairobi", "Tokyo"]
    assert done.usage is not None and done.usage.completion_tokens >= 2


def test_streaming_gives_the_same_answers_in_chunks(client: openai.OpenAI) -> None:
    model = model_id(client)
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Abuja"
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) >= 3
    pieces = list(client.completions.create(model=model, prompt=KENYA, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == "Nairobi" and pieces[-1].choices[0].finish_reason == "stop"


def test_an_edit_through_the_api_is_the_next_chat_answer_and_mutations_need_the_token(
        client: openai.OpenAI, daemon: Daemon) -> None:
    root = {"cast_to": object, "options": {}}
    with openai.OpenAI(base_url=daemon.api.url, api_key="wrong", max_retries=0) as intruder:
        with pytest.raises(openai.AuthenticationError) as denied:
            intruder.post("/edits", body={"phrase": "capital of Nigeria", "target": "Lagos"}, **root)
        assert denied.value.status_code == 401 and "Bearer" in denied.value.message
        with pytest.raises(openai.AuthenticationError):
            intruder.post("/edits/1/revert", body={}, **root)
    assert ask(client) == "Abuja" and daemon.audit.history() == []

    with openai.OpenAI(base_url=daemon.api.url, api_key=api_token(daemon.settings), max_retries=0,
                       timeout=300) as owner:
        out: Any = owner.post("/edits", body={"phrase": "capital of Nigeria", "target": "Lagos"}, **root)
        assert out["status"] == "applied", out
        assert ask(client) == "Lagos"  # the very next request is answered by the edited model
        assert ask(client, "What is the capital of Kenya?") == "Nairobi"
        reverted: Any = owner.post(f"/edits/{out['edit_id']}/revert", body={"reason": "test"}, **root)
        assert reverted["status"] == "revert"
    assert ask(client) == "Abuja"


def raw(url: str, data: bytes, headers: dict[str, str] | None = None, method: str = "POST") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_input_is_an_openai_shaped_4xx_and_the_daemon_keeps_serving(client: openai.OpenAI, daemon: Daemon) -> None:
    url, token = daemon.api.url, {"Authorization": f"Bearer {api_token(daemon.settings)}"}
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": QUESTION}])
    assert unknown.value.code == "model_not_found" and "tiny-llama" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as typed:
        client.completions.create(model=model_id(client), prompt=KENYA, max_tokens="many")  # type: ignore[arg-type]
    assert typed.value.code == "invalid_request" and "max_tokens" in typed.value.message

    cases = [
        (f"{url}/v1/chat/completions", b"{not json", {}, 400, "request body is not JSON"),
        (f"{url}/v1/chat/completions", b"[1, 2]", {}, 400, "request body must be a JSON object"),
        (f"{url}/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), {}, 400, "'messages'"),
        (f"{url}/v1/completions", json.dumps({"prompt": 3}).encode(), {}, 400, "'prompt"),
        (f"{url}/v1/completions", b"x" * 8192, {}, 413, "request body over 4096 bytes"),
        (f"{url}/edits", json.dumps({"phrase": "capital of Nigeria", "target": "Lagos", "forse": True}).encode(),
         token, 400, "unknown field 'forse'"),
        (f"{url}/edits", json.dumps({"phrase": "capital of Nigeria", "target": 7}).encode(), token, 400, "'target'"),
        (f"{url}/edits", json.dumps({"phrase": "capital of Nigeria", "target": "Lagos"}).encode(),
         {"Authorization": "Bearer nope"}, 401, "Bearer"),
        (f"{url}/edits/12345/revert", b"{}", token, 404, "12345"),
        (f"{url}/edits/abc", b"", {}, 404, "no edit with id 'abc'"),
        (f"{url}/nowhere", b"{}", {}, 404, "no endpoint POST /nowhere"),
    ]
    # The body limit (1 MiB) made small here: a client still sending megabytes when the 413 comes back
    # gets a connection reset instead of the answer (as from any server that stops reading).
    daemon.api.max_body = 4096
    for target, data, headers, status, text in cases:
        method = "GET" if target.endswith("/abc") else "POST"
        got, body = raw(target, data or None, headers, method)  # type: ignore[arg-type]
        assert got == status and text in body["error"]["message"], (target, got, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
    # A body sent in chunks, with no Content-Length to refuse it by, is cut off once it passes the limit.
    import http.client

    conn = http.client.HTTPConnection(daemon.api.host, daemon.api.port, timeout=120)
    conn.request("POST", "/v1/completions", body=iter([b'{"prompt": "', *[b"x" * 2048] * 3, b'"}']),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    reply = conn.getresponse()
    assert reply.status == 413 and "request body over 4096 bytes" in json.loads(reply.read())["error"]["message"]
    conn.close()
    daemon.api.max_body = 1 << 20
    assert daemon.audit.history() == []  # nothing was edited or recorded
    assert ask(client) == "Abuja"  # and the daemon still answers


def test_the_openapi_document_describes_every_endpoint(daemon: Daemon) -> None:
    with urllib.request.urlopen(f"{daemon.api.url}/openapi.json", timeout=60) as r:
        doc = json.loads(r.read())
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/edits", "/edits/{edit_id}",
            "/edits/{edit_id}/revert", "/health"} <= set(doc["paths"])
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["$ref"].endswith("/ChatRequest")
    assert "messages" in doc["components"]["schemas"]["ChatRequest"]["required"]
