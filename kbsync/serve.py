"""The daemon's HTTP API: OpenAI-style completions from the live (edited) model, and the edit log.

GET  /health                  liveness, model name, daemon summary
POST /v1/completions          {"prompt": str | [str]} -> generated text (raw continuation)
POST /v1/chat/completions     {"messages": [...]} -> the model's answer to the last user message
GET  /edits[?limit&status&subject&property]   audit rows, newest first
GET  /edits/<id>              one audit row
POST /edits                   {"phrase", "target"} or {"prompt", "target"} (+ method, options, force, dry_run); token
POST /edits/<id>/revert       {"actor", "reason"} (optional): undo an applied edit; token

Generation takes the engine's model lock, which an edit holds per phase (kbsync.edit_engine),
so a request is answered from the weights before an edit or after it, never half-edited, and
waits at most for the edit phase in progress, in arrival order. Each request is bounded by
[serve] (kbsync.config.ServeConfig): prompts per request, prompt and target length, and
max_tokens; one over a limit is a 413 (too many or too long) or 400 (max_tokens) JSON error
naming the setting.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kbsync.audit.log import AuditLog
from kbsync.audit.models import Edit
from kbsync.config import ServeConfig
from kbsync.edit_engine import Engine
from kbsync.errors import BadInput, KbsyncError, NotFound
from kbsync.facts import Fact, parse_phrase

log = logging.getLogger("kbsync.serve")

MAX_BODY = 1 << 20
FactResolver = Callable[[str, str], Fact]


def edit_to_dict(row: Edit) -> dict[str, Any]:
    """An audit row as JSON-safe data."""
    return json.loads(row.model_dump_json())


class Unauthorized(KbsyncError):
    """A mutating request without the right bearer token."""


class TooLarge(BadInput):
    """A request over one of the [serve] limits (HTTP 413)."""


class ApiServer:
    """A ThreadingHTTPServer on host:port (0 picks a free port) around an edit engine and audit log."""

    def __init__(self, engine: Engine, audit: AuditLog, token: str, *, host: str = "127.0.0.1", port: int = 0,
                 resolve_fact: FactResolver | None = None, status: Callable[[], dict[str, Any]] | None = None,
                 actor: str = "api", limits: ServeConfig | None = None) -> None:
        if not token:
            raise BadInput("the API needs a token for its mutating endpoints")
        self.limits = limits or ServeConfig()
        self.engine = engine
        self.audit = audit
        self.token = token
        self.resolve_fact = resolve_fact or _corpus_fact
        self.status = status or (lambda: {})
        self.actor = actor
        self.requests = 0
        handler = type("Handler", (_Handler,), {"api": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        """The bound address."""
        return str(self.httpd.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked)."""
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL of the API."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> ApiServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kbsync-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting requests and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # Endpoint bodies: each returns (status, JSON-able body).
    def health(self) -> dict[str, Any]:
        """Liveness and a summary of what is served."""
        adapter = self.engine.adapter
        return {"status": "ok", "model": getattr(adapter, "name", ""), "family": getattr(adapter, "family", ""),
                **self.status()}

    def _generate(self, prompts: list[str], question: bool, max_tokens: int | None = None) -> list[str]:
        adapter = self.engine.adapter
        with self.engine.model_lock:
            # Per request, under the lock: edits and other requests see the configured value.
            saved = adapter.max_new_tokens
            adapter.max_new_tokens = max_tokens or saved
            try:
                return adapter.predict(prompts, question=question)
            finally:
                adapter.max_new_tokens = saved

    def _text(self, text: str, what: str, limit: int, setting: str) -> str:
        """text unless it is longer than limit characters (TooLarge naming the setting)."""
        if len(text) > limit:
            raise TooLarge(f"{what} has {len(text)} characters; the limit is {limit} (serve.{setting})")
        return text

    def _max_tokens(self, body: dict[str, Any]) -> int | None:
        """The request's max_tokens (None: absent or null, the configured default), within serve.max_tokens."""
        value = body.get("max_tokens")
        if value is None:
            return None
        limit = self.limits.max_tokens
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadInput(f"'max_tokens' must be a whole number from 1 to {limit} (serve.max_tokens), not {_shown(value)}")
        if value > limit:
            raise BadInput(f"'max_tokens' is {value}; the limit is {limit} (serve.max_tokens)")
        return value

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        """OpenAI /v1/completions: the model's continuation of each prompt."""
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise BadInput("'prompt' must be a non-empty string or list of strings")
        lim = self.limits
        if len(prompts) > lim.max_prompts:
            raise TooLarge(f"'prompt' has {len(prompts)} prompts; the limit is {lim.max_prompts} per request "
                           "(serve.max_prompts)")
        for i, p in enumerate(prompts):
            self._text(p, "'prompt'" if isinstance(prompt, str) else f"prompt {i}", lim.max_prompt_chars,
                       "max_prompt_chars")
        texts = self._generate(prompts, question=False, max_tokens=self._max_tokens(body))
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": getattr(self.engine.adapter, "name", ""),
                "choices": [{"index": i, "text": t, "finish_reason": "stop", "logprobs": None}
                            for i, t in enumerate(texts)]}

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """OpenAI /v1/chat/completions: the answer to the last user message, asked as a question."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadInput("'messages' must be a non-empty list")
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str) or not users[-1].strip():
            raise BadInput("'messages' needs a user message with text content")
        self._text(users[-1], "the last user message", self.limits.max_prompt_chars, "max_prompt_chars")
        # Facts are single questions: the adapter formats the last one (chat template or QA format).
        text = self._generate([users[-1]], question=True, max_tokens=self._max_tokens(body))[0]
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": getattr(self.engine.adapter, "name", ""),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}

    def list_edits(self, query: dict[str, list[str]]) -> dict[str, Any]:
        """Audit rows, newest first, filtered like `kbsync history`."""
        one = {k: v[-1] for k, v in query.items() if v}
        try:
            limit = int(one.get("limit", 50))
        except ValueError:
            raise BadInput("limit must be an integer") from None
        rows = self.audit.history(status=one.get("status"), subject=one.get("subject"),
                                  property=one.get("property"), limit=max(1, min(limit, 1000)))
        return {"edits": [edit_to_dict(r) for r in rows]}

    def create_edit(self, body: dict[str, Any]) -> dict[str, Any]:
        """Apply an edit through the engine: a fact phrase or a raw prompt, and a target."""
        target = body.get("target")
        if not isinstance(target, str) or not target.strip():
            raise BadInput("'target' must be a non-empty string")
        lim = self.limits
        self._text(target, "'target'", lim.max_target_chars, "max_target_chars")
        for key in ("phrase", "prompt"):
            if isinstance(body.get(key), str):
                self._text(body[key], f"'{key}'", lim.max_prompt_chars, "max_prompt_chars")
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise BadInput("'options' must be an object of method options, e.g. {\"lr\": 0.001}")
        opts = {"method": body.get("method") or None, "force": bool(body.get("force", False)), "options": options,
                "dry_run": bool(body.get("dry_run", False)), "source": "api",
                "actor": str(body.get("actor") or self.actor)}
        if isinstance(body.get("phrase"), str):
            pid, subject = parse_phrase(body["phrase"])
            fact = self.resolve_fact(pid, subject)
            outcome = self.engine.edit(fact, target, kb_revision=str(body.get("kb_revision", "")), **opts)
        elif isinstance(body.get("prompt"), str):
            outcome = self.engine.edit_prompt(body["prompt"], target, **opts)
        else:
            raise BadInput("give 'phrase' (e.g. \"capital of Namibia\") or 'prompt', and 'target'")
        return outcome.to_dict()

    def revert(self, edit_id: int, body: dict[str, Any]) -> dict[str, Any]:
        """Revert an applied edit (body: optional actor and reason, both recorded)."""
        return self.engine.revert(edit_id, actor=str(body.get("actor") or self.actor), source="api",
                                  reason=str(body.get("reason") or "")).to_dict()

    def authorised(self, header: str | None) -> bool:
        """Whether an Authorization header carries the token (constant-time compare)."""
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), self.token.encode())


def _corpus_fact(pid: str, subject: str) -> Fact:
    from kbsync.corpus import resolve

    return resolve(pid, subject)


class _Handler(BaseHTTPRequestHandler):
    api: ApiServer
    server_version = "kbsync"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise TooLarge(f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise BadInput("request body is not JSON") from None
        if not isinstance(body, dict):
            raise BadInput("request body must be a JSON object")
        return body

    def _dispatch(self, method: str) -> None:
        self.api.requests += 1
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        try:
            body = self._body() if method == "POST" else {}
            status, out = self._route(method, parts, body, parse_qs(url.query))
        except Unauthorized as e:
            status, out = HTTPStatus.UNAUTHORIZED, {"error": str(e)}
        except TooLarge as e:
            status, out = HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": str(e)}
        except NotFound as e:
            status, out = HTTPStatus.NOT_FOUND, {"error": str(e)}
        except KbsyncError as e:
            status, out = HTTPStatus.BAD_REQUEST, {"error": str(e)}
        except Exception as e:  # a bug must not kill the server thread; the log keeps the traceback
            log.exception("API %s %s failed", method, url.path)
            status, out = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(e).__name__}: {e}"}
        self._send(int(status), out)

    def _route(self, method: str, parts: list[str], body: dict[str, Any],
               query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        api = self.api
        if method == "GET" and parts == ["health"]:
            return 200, api.health()
        if method == "POST" and parts == ["v1", "completions"]:
            return 200, api.completions(body)
        if method == "POST" and parts == ["v1", "chat", "completions"]:
            return 200, api.chat(body)
        if parts[:1] == ["edits"]:
            if method == "GET" and len(parts) == 1:
                return 200, api.list_edits(query)
            edit_id = _edit_id(parts[1]) if len(parts) > 1 else None
            if method == "GET" and len(parts) == 2 and edit_id is not None:
                return 200, edit_to_dict(api.audit.get(edit_id))
            if method == "POST" and (len(parts) == 1 or (len(parts) == 3 and parts[2] == "revert")):
                if not api.authorised(self.headers.get("Authorization")):
                    raise Unauthorized("this endpoint needs 'Authorization: Bearer <token>' (see daemon.token)")
                if len(parts) == 1:
                    return 200, api.create_edit(body)
                assert edit_id is not None
                return 200, api.revert(edit_id, body)
        raise NotFound(f"no endpoint {method} /{'/'.join(parts)}")

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _edit_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise NotFound(f"no edit with id {text!r}") from None
