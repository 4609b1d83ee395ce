"""Talk to a running kbsync daemon over its HTTP API (so `kbsync edit` needs no second model copy)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from kbsync.config import Settings
from kbsync.daemon import api_token, daemon_holding, health, read_state, running_pid
from kbsync.errors import BadInput, Busy, KbsyncError, NotFound


class DaemonError(KbsyncError):
    """The daemon could not be reached or failed a request."""


class DaemonClient:
    """A small JSON client for the daemon's API at url, with its bearer token."""

    def __init__(self, url: str, token: str = "", timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, auth: bool = False) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            if not self.token:
                raise DaemonError("no daemon API token: set daemon.token or run the daemon once to create one")
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read()).get("error", e.reason)
                msg = msg.get("message", e.reason) if isinstance(msg, dict) else msg  # OpenAI's error shape
            except (ValueError, AttributeError):
                msg = e.reason
            if e.code == 404:
                raise NotFound(msg) from None
            if e.code in (400, 413):  # 413: over one of the API's [serve] limits; the message names it
                raise BadInput(msg) from None
            if e.code == 409:  # an edit in flight: the same one line as without a daemon
                raise Busy(msg) from None
            raise DaemonError(f"daemon at {self.url}: HTTP {e.code}: {msg}") from None
        except (OSError, urllib.error.URLError) as e:
            raise DaemonError(f"cannot reach the daemon at {self.url}: {getattr(e, 'reason', e)}") from None

    def health(self) -> dict[str, Any]:
        """GET /health."""
        return self._call("GET", "/health")

    def edit(self, phrase: str | None = None, target: str = "", *, prompt: str | None = None,
             method: str | None = None, options: dict[str, Any] | None = None, force: bool = False,
             dry_run: bool = False, actor: str | None = None, batch: str = "", subject: str = "") -> dict[str, Any]:
        """POST /edits: apply an edit in the daemon's model; the outcome (status, edit_id, before, after, reasons)."""
        body: dict[str, Any] = {"target": target, "force": force, "dry_run": dry_run}
        if subject:
            body["subject"] = subject
        if phrase is not None:
            body["phrase"] = phrase
        elif prompt is not None:
            body["prompt"] = prompt
        else:
            raise BadInput("edit needs a phrase or a prompt")
        if method:
            body["method"] = method
        if options:
            body["options"] = options
        if batch:
            body["batch"] = batch
        if actor:
            body["actor"] = actor
        return self._call("POST", "/edits", body, auth=True)

    def revert(self, edit_id: int, actor: str | None = None, reason: str = "") -> dict[str, Any]:
        """POST /edits/<id>/revert: the outcome (status 'revert', edit_id of the revert row)."""
        body = {k: v for k, v in (("actor", actor), ("reason", reason)) if v}
        return self._call("POST", f"/edits/{edit_id}/revert", body, auth=True)

    def consolidate(self, without: list[int], dry_run: bool = False, actor: str | None = None,
                    reason: str = "") -> dict[str, Any]:
        """POST /consolidate: the consolidation's outcome (kbsync.consolidate.ConsolidationOutcome.to_dict)."""
        body: dict[str, Any] = {"without": without, "dry_run": dry_run, "reason": reason}
        if actor:
            body["actor"] = actor
        return self._call("POST", "/consolidate", body, auth=True)

    def edit_row(self, edit_id: int) -> dict[str, Any]:
        """GET /edits/<id>: one audit row."""
        return self._call("GET", f"/edits/{edit_id}")

    def edits(self, **filters: Any) -> list[dict[str, Any]]:
        """GET /edits with filters (limit, status, subject, property)."""
        q = "&".join(f"{k}={urllib.request.quote(str(v))}" for k, v in filters.items() if v is not None)
        return self._call("GET", "/edits" + (f"?{q}" if q else ""))["edits"]

    def ask(self, question: str) -> str:
        """The served model's answer to a question (POST /v1/chat/completions)."""
        out = self._call("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": question}]})
        return out["choices"][0]["message"]["content"]

    def complete(self, prompt: str) -> str:
        """The served model's continuation of a raw prompt (POST /v1/completions)."""
        return self._call("POST", "/v1/completions", {"prompt": prompt})["choices"][0]["text"]


class RemoteModel:
    """The daemon's served model as a predict-only adapter: what `kbsync check` needs, without a second copy."""

    def __init__(self, client: DaemonClient) -> None:
        self.client = client
        info = client.health()
        self.name, self.family = info.get("model", ""), info.get("family", "")

    def predict(self, prompts: list[str], question: bool = True) -> list[str]:
        """Questions through /v1/chat/completions, raw prompts (and claims) through /v1/completions."""
        return [self.client.ask(p) if question else self.client.complete(p) for p in prompts]


def running_daemon(settings: Settings, timeout: float = 600.0) -> DaemonClient | None:
    """A client for the daemon running over these settings' data directory, if one answers /health."""
    if running_pid(settings) is None:
        return None
    url = read_state(settings).get("url")
    if not url or health(url) is None:
        return None
    return DaemonClient(url, api_token(settings), timeout=timeout)


def edit_via_daemon(settings: Settings, what: Any, target: str | None, *, method: str | None = None,
                    options: dict[str, Any] | None = None, force: bool = False, dry_run: bool = False,
                    actor: str = "", batch: str = "", subject: str = "") -> dict[str, Any] | None:
    """For `kbsync edit`: apply the edit in the running daemon's model; None when no daemon runs.

    what is a Fact (its subject and property are sent as a phrase) or a raw prompt string.
    """
    client = running_daemon(settings)
    if client is None:
        return None
    import getpass

    from kbsync.facts import Fact, get_relation

    try:
        actor = actor or getpass.getuser()  # the audit row names the user, not the API
    except (KeyError, OSError):
        pass

    if isinstance(what, Fact):
        phrase = get_relation(what.property).phrases[0].format(subject=what.subject.label)
        return client.edit(phrase, target or what.object.label, method=method, options=options, force=force,
                           dry_run=dry_run, actor=actor or None, batch=batch)
    return client.edit(prompt=str(what), target=target or "", method=method, options=options, force=force,
                       dry_run=dry_run, actor=actor or None, batch=batch, subject=subject)


def revert_via_daemon(settings: Settings, edit_id: int, *, actor: str = "", reason: str = "") -> dict[str, Any] | None:
    """For `kbsync revert`: revert in the running daemon, whose model serves the edit; None when no daemon runs.

    The revert row comes back once the daemon's weights no longer hold the edit. A daemon that
    holds this data directory but does not answer is an error: reverting behind its back would
    leave it serving the edit.
    """
    client = _holding_daemon(settings)
    if client is None:
        return None
    out = client.revert(edit_id, actor=actor or _user() or None, reason=reason)
    return client.edit_row(int(out["edit_id"]))


def consolidate_via_daemon(settings: Settings, without: list[int], *, dry_run: bool = False, actor: str = "",
                           reason: str = "") -> dict[str, Any] | None:
    """For `kbsync consolidate`: consolidate in the running daemon, whose model serves the edits; None when none runs."""
    client = _holding_daemon(settings)
    if client is None:
        return None
    return client.consolidate(without, dry_run=dry_run, actor=actor or _user() or None, reason=reason)


def _holding_daemon(settings: Settings) -> DaemonClient | None:
    """The running daemon's client; None when none holds the data dir; DaemonError when one holds it but does not answer.

    For changes its served model must make itself (revert, consolidate): done behind its back, it
    would go on serving the old stack.
    """
    client = running_daemon(settings)
    if client is None:
        pid = daemon_holding(settings)
        if pid is not None:
            raise DaemonError(f"a kbsync daemon (pid {pid}) runs over {settings.store.data_path} but its API does "
                              "not answer (still starting?); retry, or stop it first")
    return client


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""
