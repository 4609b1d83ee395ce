"""Request bodies of the daemon's API, validated by schema (pydantic): OpenAI's completion and chat
shapes, and the edit log's edit and revert.

OpenAI clients send sampling parameters this server does not use (temperature, top_p, n, ...):
the completion shapes accept and ignore them, as OpenAI-compatible servers do. The edit shapes
are the project's own and refuse unknown fields, so a misspelt option is an error, not a no-op.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class _OpenAI(BaseModel):
    model_config = ConfigDict(extra="allow")

    # The served model's id (GET /v1/models); absent means the served model.
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    stream: StrictBool = False


class CompletionRequest(_OpenAI):
    """POST /v1/completions: continue each prompt."""

    prompt: StrictStr | list[StrictStr]


class Message(BaseModel):
    """One chat message; content as text (OpenAI's list-of-parts form is refused by the route)."""

    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatRequest(_OpenAI):
    """POST /v1/chat/completions: answer the last user message."""

    messages: list[Message] = Field(min_length=1)
    # OpenAI's newer name for max_tokens.
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class EditBody(BaseModel):
    """POST /edits: a fact phrase ("capital of Namibia") or a raw prompt, and the new target."""

    model_config = ConfigDict(extra="forbid")

    phrase: StrictStr | None = None
    prompt: StrictStr | None = None
    # With a prompt: the entity it names (it must occur in it), where gated and locate-and-edit methods edit.
    subject: StrictStr = ""
    target: StrictStr
    method: StrictStr | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    force: StrictBool = False
    dry_run: StrictBool = False
    actor: StrictStr | None = None
    kb_revision: StrictStr = ""
    # Links the rows of one `kbsync edit --batch` (metrics["batch"]): 1-32 lower-case hex digits.
    batch: StrictStr = ""


class ConsolidateBody(BaseModel):
    """POST /consolidate: edits to leave out (reverted with it), whether to only judge, who and why."""

    model_config = ConfigDict(extra="forbid")

    without: list[StrictInt] = Field(default_factory=list)
    dry_run: StrictBool = False
    actor: StrictStr | None = None
    reason: StrictStr = ""


class RevertBody(BaseModel):
    """POST /edits/{id}/revert: who reverts and why (both recorded)."""

    model_config = ConfigDict(extra="forbid")

    actor: StrictStr | None = None
    reason: StrictStr = ""
