"""The routes: OpenAI-compatible completions from the live (edited) model, and the edit log.

GET  /health                         liveness, model name, daemon summary
GET  /v1/models                      the served model (OpenAI's list shape)
POST /v1/completions                 continue each prompt; stream: true for server-sent events
POST /v1/chat/completions            answer the last user message; stream: true for server-sent events
GET  /edits?limit&status&subject&property   audit rows, newest first
GET  /edits/{id}                     one audit row
POST /edits                          an edit (EditBody); bearer token
POST /edits/{id}/revert              undo an applied edit (RevertBody); bearer token
POST /consolidate                    the applied edits as one checked delta (ConsolidateBody); bearer token
GET  /openapi.json                   the schema of all of the above
GET  /, /review/{id}                 the review page (kbsync.api.review)

Generation takes the engine's model lock, which an edit holds per phase (kbsync.edit_engine), so a
request is answered from the weights before an edit or after it, never half-edited, and waits at
most for the edit phase in progress. A streamed answer is generated whole under the lock, then sent
as one chunk per token: the weights it came from are one state, and the chunks are OpenAI's, so
clients that stream work unchanged (the answers are a sentence; the wait is the generation's).
Each request is bounded by [serve]: prompts per request, prompt and target length, max_tokens
(413 or 400 naming the setting) and the body's size (413).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kbsync.api import errors, review
from kbsync.api.errors import TooLarge
from kbsync.api.schemas import ChatRequest, CompletionRequest, ConsolidateBody, EditBody, RevertBody
from kbsync.api.server import ApiServer
from kbsync.batch import check_batch_id
from kbsync.errors import BadInput
from kbsync.facts import parse_phrase

EditId = Annotated[int, Path(ge=1, le=2**31 - 1, description="An audit row's id")]


class BodyLimit:
    """ASGI middleware: counts requests; reads every body as JSON (no route takes a form, and `curl -d`
    or urllib send JSON labelled as one); refuses a body over max_body bytes with a 413, whether its
    Content-Length says so up front or a chunked body grows past it."""

    def __init__(self, app: ASGIApp, api: ApiServer) -> None:
        self.app, self.api = app, api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.api.requests += 1
        limit = self.api.max_body
        headers = dict(scope.get("headers") or [])
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if kind in (b"", b"application/x-www-form-urlencoded", b"text/plain"):
            headers[b"content-type"] = b"application/json"
            scope = {**scope, "headers": list(headers.items())}
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            response = errors.error_response(f"request body over {limit} bytes", 413, "request_too_large")
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"request body over {limit} bytes")
            return message

        await self.app(scope, limited, send)


def build_app(api: ApiServer) -> FastAPI:
    """The FastAPI app over one ApiServer's engine, audit log, token and limits."""
    app = FastAPI(title="kbsync", summary="A served model whose facts follow a knowledge base, with an audited edit log.",
                  version="1", docs_url=None, redoc_url=None)  # the docs pages load scripts from a CDN
    errors.install(app)
    app.add_middleware(BodyLimit, api=api)
    review.install(app, api)

    def token(authorization: Annotated[str | None, Header()] = None) -> None:
        api.authorise(authorization)

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness, the served model and the daemon's summary."""
        return api.health()

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        """The one model this daemon serves, in OpenAI's list shape."""
        return {"object": "list", "data": [{"id": api.model_id, "object": "model", "created": 0, "owned_by": "kbsync"}]}

    @app.post("/v1/completions", response_model=None)
    def completions(body: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        """The model's continuation of each prompt (OpenAI /v1/completions)."""
        api.check_model(body.model)
        single = isinstance(body.prompt, str)
        prompts = [body.prompt] if single else list(body.prompt)
        if not prompts or not all(prompts):
            raise BadInput("'prompt' must be a non-empty string or list of non-empty strings")
        lim = api.limits
        if len(prompts) > lim.max_prompts:
            raise TooLarge(f"'prompt' has {len(prompts)} prompts; the limit is {lim.max_prompts} per request "
                           "(serve.max_prompts)")
        for i, p in enumerate(prompts):
            api.check_text(p, "'prompt'" if single else f"prompt {i}", lim.max_prompt_chars, "max_prompt_chars")
        texts, used, made = api.generate(prompts, question=False, max_tokens=api.check_max_tokens(body.max_tokens))
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": api.model_id}
        if body.stream:
            return _sse(_completion_chunks(api, head, texts))
        return {**head, "choices": [{"index": i, "text": t, "finish_reason": "stop", "logprobs": None}
                                    for i, t in enumerate(texts)],
                "usage": _usage(used, made)}

    @app.post("/v1/chat/completions", response_model=None)
    def chat(body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        """The answer to the last user message, asked as a question (OpenAI /v1/chat/completions)."""
        api.check_model(body.model)
        users = [m.content for m in body.messages if m.role == "user"]
        if not users or not isinstance(users[-1], str) or not users[-1].strip():
            raise BadInput("'messages' needs a user message with text content")
        api.check_text(users[-1], "the last user message", api.limits.max_prompt_chars, "max_prompt_chars")
        # Facts are single questions: the adapter formats the last one (chat template or QA format).
        limit = api.check_max_tokens(body.max_completion_tokens or body.max_tokens)
        texts, used, made = api.generate([users[-1]], question=True, max_tokens=limit)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": api.model_id}
        if body.stream:
            return _sse(_chat_chunks(api, head, texts[0]))
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0]}, "finish_reason": "stop"}],
                "usage": _usage(used, made)}

    @app.get("/edits")
    def list_edits(limit: Annotated[int, Query(ge=1, le=1000)] = 50, status: str | None = None,
                   subject: str | None = None, property: str | None = None) -> dict[str, Any]:  # noqa: A002
        """Audit rows, newest first, filtered like `kbsync history`."""
        rows = api.audit.history(status=status, subject=subject, property=property, limit=limit)
        return {"edits": [r.as_json() for r in rows]}

    @app.get("/edits/{edit_id}")
    def get_edit(edit_id: EditId) -> dict[str, Any]:
        """One audit row."""
        return api.audit.get(edit_id).as_json()

    @app.post("/edits", dependencies=[Depends(token)])
    def create_edit(body: EditBody) -> dict[str, Any]:
        """Apply an edit through the engine: a fact phrase or a raw prompt, and a target."""
        if not body.target.strip():
            raise BadInput("'target' must be a non-empty string")
        lim = api.limits
        api.check_text(body.target, "'target'", lim.max_target_chars, "max_target_chars")
        for key in ("phrase", "prompt"):
            if getattr(body, key) is not None:
                api.check_text(getattr(body, key), f"'{key}'", lim.max_prompt_chars, "max_prompt_chars")
        opts = {"method": body.method or None, "force": body.force, "options": body.options,
                "dry_run": body.dry_run, "source": "api", "actor": body.actor or api.actor,
                "batch": check_batch_id(body.batch)}
        if body.subject and body.prompt is None:
            raise BadInput("'subject' goes with 'prompt' (a phrase names its subject itself)")
        if body.phrase is not None:
            pid, subject = parse_phrase(body.phrase)
            fact = api.resolve_fact(pid, subject)
            return api.engine.edit(fact, body.target, kb_revision=body.kb_revision, **opts).to_dict()
        if body.prompt is not None:
            return api.engine.edit_prompt(body.prompt, body.target, subject=body.subject, **opts).to_dict()
        raise BadInput("give 'phrase' (e.g. \"capital of Namibia\") or 'prompt', and 'target'")

    @app.post("/edits/{edit_id}/revert", dependencies=[Depends(token)])
    def revert(edit_id: EditId, body: RevertBody | None = None) -> dict[str, Any]:
        """Revert an applied edit (actor and reason recorded)."""
        body = body or RevertBody()
        return api.engine.revert(edit_id, actor=body.actor or api.actor, source="api", reason=body.reason).to_dict()

    @app.post("/consolidate", dependencies=[Depends(token)])
    def consolidate(body: ConsolidateBody | None = None) -> dict[str, Any]:
        """Rewrite the applied edits (minus body.without) from the base weights as one delta; the outcome."""
        body = body or ConsolidateBody()
        return api.engine.consolidate(tuple(body.without), actor=body.actor or api.actor, source="api",
                                      reason=body.reason, dry_run=body.dry_run)

    return app


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _pieces(api: ApiServer, text: str) -> list[str]:
    """text split at its tokens (each piece decoded on its own; their concatenation is text)."""
    tok = api.engine.adapter.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces, done = [], ""
    for i in range(1, len(ids) + 1):
        now = tok.decode(ids[:i])
        if now.startswith(done) and len(now) > len(done) and text.startswith(now):
            pieces.append(now[len(done):])
            done = now
    if done != text:  # a tokenizer that does not round-trip: send the rest as one piece
        pieces.append(text[len(done):])
    return pieces


def _completion_chunks(api: ApiServer, head: dict[str, Any], texts: list[str]) -> Iterator[dict[str, Any]]:
    for i, text in enumerate(texts):
        for piece in _pieces(api, text):
            yield {**head, "choices": [{"index": i, "text": piece, "finish_reason": None, "logprobs": None}]}
        yield {**head, "choices": [{"index": i, "text": "", "finish_reason": "stop", "logprobs": None}]}


def _chat_chunks(api: ApiServer, head: dict[str, Any], text: str) -> Iterator[dict[str, Any]]:
    chunk = {**head, "object": "chat.completion.chunk"}
    yield {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    for piece in _pieces(api, text):
        yield {**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
    yield {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}


def _sse(chunks: Iterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events as OpenAI sends them: one `data: {json}` per chunk, then `data: [DONE]`."""
    def events() -> Iterator[str]:
        for c in chunks:
            yield f"data: {json.dumps(c)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
