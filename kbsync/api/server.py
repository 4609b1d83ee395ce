"""The API server: the FastAPI app (kbsync.api.app) on uvicorn, in a background thread of the daemon.

Why FastAPI: the request shapes are pydantic models (pydantic is already how the audit rows are
typed), which gives schema validation and the OpenAPI document (/openapi.json) from one
definition, and it runs on uvicorn, a maintained ASGI server. Endpoints are plain functions that
uvicorn runs in a thread pool: generation takes the engine's FIFO model lock exactly as before.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

from kbsync.api.errors import TooLarge, Unauthorized, UnknownModel
from kbsync.audit.log import AuditLog
from kbsync.config import ServeConfig
from kbsync.edit_engine import Engine
from kbsync.errors import BadInput
from kbsync.facts import Fact

log = logging.getLogger("kbsync.api")

MAX_BODY = 1 << 20
FactResolver = Callable[[str, str], Fact]


def _corpus_fact(pid: str, subject: str) -> Fact:
    from kbsync.corpus import resolve

    return resolve(pid, subject)


class ApiServer:
    """The daemon's HTTP API on host:port (0 picks a free port) around an edit engine and audit log."""

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
        self.max_body = MAX_BODY
        # Bound now, so the port is known (and taken) before start(); uvicorn serves on this socket.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as e:
            self._socket.close()
            raise BadInput(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self._address = self._socket.getsockname()[:2]  # still known after stop()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        """The bound address."""
        return str(self._address[0])

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked)."""
        return int(self._address[1])

    @property
    def url(self) -> str:
        """Base URL of the API."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def model_id(self) -> str:
        """The served model's id in /v1/models: its directory's name."""
        name = str(getattr(self.engine.adapter, "name", "") or "model")
        return PurePath(name).name or name

    def start(self) -> ApiServer:
        """Serve in a background thread; returns once uvicorn accepts connections."""
        import uvicorn

        from kbsync.api.app import build_app

        config = uvicorn.Config(build_app(self), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, server_header=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="kbsync-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise BadInput(f"the API server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop accepting requests, let those in flight finish (5 s at most) and close the socket."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._socket.close()

    # --- what the routes share ----------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Liveness and a summary of what is served."""
        adapter = self.engine.adapter
        return {"status": "ok", "model": getattr(adapter, "name", ""), "family": getattr(adapter, "family", ""),
                **self.status()}

    def check_model(self, model: str | None) -> None:
        """UnknownModel unless model is absent or names the served model (its id or its full name)."""
        if model is not None and model not in (self.model_id, getattr(self.engine.adapter, "name", None)):
            raise UnknownModel(f"the model '{model}' does not exist here; this daemon serves '{self.model_id}' "
                               "(GET /v1/models)")

    def check_text(self, text: str, what: str, limit: int, setting: str) -> str:
        """text unless it is longer than limit characters (TooLarge naming the setting)."""
        if len(text) > limit:
            raise TooLarge(f"{what} has {len(text)} characters; the limit is {limit} (serve.{setting})")
        return text

    def check_max_tokens(self, value: int | None) -> int | None:
        """The request's max_tokens within serve.max_tokens (None: the configured answer length)."""
        limit = self.limits.max_tokens
        if value is not None and value > limit:
            raise BadInput(f"'max_tokens' is {value}; the limit is {limit} (serve.max_tokens)")
        return value

    def generate(self, prompts: list[str], question: bool, max_tokens: int | None = None) -> tuple[list[str], int, int]:
        """(answers, prompt tokens, completion tokens) from the live model, under the model lock."""
        adapter = self.engine.adapter
        with self.engine.model_lock:
            # Per request, under the lock: edits and other requests see the configured value.
            saved = adapter.max_new_tokens
            adapter.max_new_tokens = max_tokens or saved
            try:
                texts = adapter.predict(prompts, question=question)
            finally:
                adapter.max_new_tokens = saved
        return texts, *self._usage(prompts, texts, question)

    def _usage(self, prompts: list[str], texts: list[str], question: bool) -> tuple[int, int]:
        """Token counts as the model saw them: the rendered prompts (chat template included) and the answers."""
        adapter = self.engine.adapter
        tok = adapter.tokenizer
        render = getattr(adapter, "render", None)
        shown = [render(p, question) if render else p for p in prompts]
        count = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for s in shown)
        return count, sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)

    def authorise(self, header: str | None) -> None:
        """Unauthorized unless an Authorization header carries the token (constant-time compare)."""
        ok = bool(header) and header.startswith("Bearer ") and hmac.compare_digest(
            header[len("Bearer "):].strip().encode(), self.token.encode())
        if not ok:
            raise Unauthorized("this endpoint needs 'Authorization: Bearer <token>' (see daemon.token)")
