"""The edit step the daemon and the API call: one small interface over the edit pipeline.

The daemon only needs "write this fact into the served model and tell me the outcome" and
"revert edit N". PipelineEngine forwards to kbsync.pipeline.EditPipeline when it is
installed; BuiltinEngine is a minimal stand-in (check, edit method, commit to the delta
store and audit log, apply to the live model) without the pipeline's regression checks.
Both run every edit under one lock that the HTTP server also takes to generate, so a
client never reads a model in the middle of an edit.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import getpass
import importlib.util
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kbsync.audit.log import AuditLog
from kbsync.audit.models import Edit
from kbsync.config import Settings
from kbsync.errors import BadInput, KbsyncError
from kbsync.facts import Entity, Fact, render
from kbsync.match import match
from kbsync.store import DeltaStore

log = logging.getLogger("kbsync.daemon")


@dataclass
class EditOutcome:
    """What one edit attempt did: its audit row id (None for a dry run) and status."""

    status: str
    edit_id: int | None = None
    before: str = ""
    after: str = ""
    reasons: list[str] = field(default_factory=list)
    method: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON answers."""
        return dataclasses.asdict(self)


class EditEngine(Protocol):
    """What the daemon needs from the edit side."""

    adapter: Any
    lock: threading.RLock

    def edit(self, fact: Fact, target: str, *, method: str | None = None, force: bool = False,
             dry_run: bool = False, source: str = "daemon", actor: str = "", kb_revision: str = "",
             options: dict[str, Any] | None = None) -> EditOutcome:
        """Write target as the fact's object into the served model."""

    def edit_prompt(self, prompt: str, target: str, *, method: str | None = None, force: bool = False,
                    dry_run: bool = False, source: str = "api", actor: str = "",
                    options: dict[str, Any] | None = None) -> EditOutcome:
        """Make the served model answer target to a raw prompt."""

    def revert(self, edit_id: int, *, actor: str = "", source: str = "api") -> EditOutcome:
        """Undo an applied edit in the audit log and the live model."""


def default_actor() -> str:
    """The local user name, for audit rows written on a user's behalf."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def with_target(fact: Fact, target: str) -> Fact:
    """The fact with its object replaced by target (kept as is when the label already matches)."""
    target = " ".join(target.split())
    if not target:
        raise BadInput("empty edit target")
    if fact.object.label == target:
        return fact
    return dataclasses.replace(fact, object=Entity("", target))


class BuiltinEngine:
    """Check -> edit method -> delta store commit -> live model, under one lock (no regression checks)."""

    def __init__(self, settings: Settings, adapter: Any, audit: AuditLog, store: DeltaStore,
                 lock: threading.RLock | None = None) -> None:
        self.settings = settings
        self.adapter = adapter
        self.audit = audit
        self.store = store
        self.lock = lock or threading.RLock()
        # Base values of every parameter a delta touched: revert rebuilds from them exactly.
        self._base: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, settings: Settings, audit: AuditLog, store: DeltaStore, adapter: Any = None) -> BuiltinEngine:
        """Load the served model (unless given), repair a crashed edit, and stack the applied deltas."""
        if adapter is None:
            from adapters.loading import load_adapter

            adapter = load_adapter(settings)
        engine = cls(settings, adapter, audit, store)
        for line in store.reconcile(audit):
            log.warning("reconcile: %s", line)
        engine._rebuild()
        return engine

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.adapter.model.named_parameters())

    @torch.no_grad()
    def _add(self, tensors: dict[str, torch.Tensor]) -> None:
        params = self._params()
        for name, t in tensors.items():
            if name not in params or params[name].shape != t.shape:
                raise KbsyncError(f"delta does not fit the served model (parameter {name})")
            if name not in self._base:
                self._base[name] = params[name].detach().clone()
            params[name].add_(t.to(params[name].dtype))

    @torch.no_grad()
    def _rebuild(self) -> None:
        """Base weights plus the applied deltas, in sequence order, checksums verified."""
        params = self._params()
        for name, t in self._base.items():
            params[name].copy_(t)
        for edit in self.store.verify(self.audit):
            self._add(self.store.load(edit).tensors)

    def _method_name(self, method: str | None) -> str:
        return method or self.settings.daemon.method or self.settings.editor.method

    def _run(self, prompt: str, target: str, row: Edit, *, method: str | None, force: bool, dry_run: bool,
             options: dict[str, Any] | None = None, aliases: tuple[str, ...] = (), claim_prefix: str = "",
             paraphrases: tuple[str, ...] = ()) -> EditOutcome:
        from editor.methods import EditRequest, make_method

        name = self._method_name(method)
        with self.lock:
            before = self.adapter.predict([prompt])[0]
            row.before_answer, row.method = before, name
            if match(before, target, aliases, claim_prefix).ok and not force:
                row.after_answer, row.status = before, "noop"
                row.reasons = ["the model already answers the target"]
                return self._finish(row, dry_run)
            configured = ({**getattr(self.settings.editor, "options", {}), **self.settings.daemon.method_options}
                          if name == self._method_name(None) else {})
            options = {**configured, **(options or {})}
            result = make_method(name, self.adapter, **options).edit(EditRequest(
                prompt=prompt, target=target, original=before, paraphrases=paraphrases,
                aliases=aliases, claim_prefix=claim_prefix))
            row.after_answer = result.prediction
            row.metrics = {"steps": result.steps, "seconds": round(result.seconds, 3), "delta_norm": result.delta.norm()}
            if not result.success and not force:
                row.status, row.reasons = "rejected", [f"the prediction did not flip ({result.prediction!r})"]
                return self._finish(row, dry_run)
            row.forced = force and not result.success
            if dry_run:
                row.status = "applied"
                return self._finish(row, dry_run)
            row.parent_fingerprint = self.adapter.fingerprint()
            # Audit row + delta file first (crash-safe protocol), then the live model.
            done = self.store.commit(self.audit, row, result.delta)
            self._add(result.delta.tensors)
            return EditOutcome(done.status, done.id, before, row.after_answer, list(done.reasons), name)

    def _finish(self, row: Edit, dry_run: bool) -> EditOutcome:
        if not dry_run:
            row = self.audit.record(row)
        return EditOutcome(row.status, None if dry_run else row.id, row.before_answer, row.after_answer,
                           list(row.reasons), row.method)

    def edit(self, fact: Fact, target: str, *, method: str | None = None, force: bool = False,
             dry_run: bool = False, source: str = "daemon", actor: str = "", kb_revision: str = "",
             options: dict[str, Any] | None = None) -> EditOutcome:
        """Write target as the fact's object into the served model (noop when it already answers it)."""
        fact = with_target(fact, target)
        prompts = render(fact)
        row = Edit(actor=actor or default_actor(), source=source, subject_id=fact.subject.id,
                   subject_label=fact.subject.label, property=fact.property, object_id=fact.object.id,
                   object_label=fact.object.label, question=prompts.question, claim=prompts.claim,
                   kb_revision=kb_revision or fact.revision)
        return self._run(prompts.question, prompts.target, row, method=method, force=force, dry_run=dry_run,
                         options=options, aliases=prompts.aliases, claim_prefix=prompts.claim_prefix,
                         paraphrases=prompts.paraphrases)

    def edit_prompt(self, prompt: str, target: str, *, method: str | None = None, force: bool = False,
                    dry_run: bool = False, source: str = "api", actor: str = "",
                    options: dict[str, Any] | None = None) -> EditOutcome:
        """Make the served model answer target to a raw prompt."""
        prompt, target = prompt.strip(), " ".join(target.split())
        if not prompt or not target:
            raise BadInput("a prompt edit needs a non-empty prompt and target")
        row = Edit(actor=actor or default_actor(), source=source, object_label=target, question=prompt)
        return self._run(prompt, target, row, method=method, force=force, dry_run=dry_run, options=options)

    def revert(self, edit_id: int, *, actor: str = "", source: str = "api") -> EditOutcome:
        """Mark the edit reverted and rebuild the live model from base weights + the remaining deltas."""
        with self.lock, self.store.lock():
            row = self.audit.mark_reverted(edit_id, actor or default_actor(), source=source)
            self._rebuild()
        return EditOutcome(row.status, row.id, row.before_answer, row.after_answer, list(row.reasons), "revert")


def _outcome(result: Any) -> EditOutcome:
    """An EditOutcome from whatever the pipeline returns (an Edit row or a result holding one)."""
    row = getattr(result, "edit", None) or getattr(result, "row", None) or result
    status = getattr(row, "status", None) or getattr(result, "status", None) or "unknown"
    return EditOutcome(
        status=str(status), edit_id=getattr(row, "id", None),
        before=str(getattr(row, "before_answer", getattr(result, "before", "")) or ""),
        after=str(getattr(row, "after_answer", getattr(result, "after", "")) or ""),
        reasons=list(getattr(row, "reasons", None) or getattr(result, "reasons", None) or []),
        method=str(getattr(row, "method", "") or ""),
    )


class PipelineEngine:
    """kbsync.pipeline.EditPipeline behind the daemon's interface, under the shared lock."""

    def __init__(self, pipeline: Any, lock: threading.RLock | None = None) -> None:
        self.pipeline = pipeline
        self.lock = lock or threading.RLock()

    @property
    def adapter(self) -> Any:
        """The pipeline's live adapter (base weights + applied deltas)."""
        return self.pipeline.adapter

    @classmethod
    def load(cls, settings: Settings, audit: AuditLog, store: DeltaStore, adapter: Any = None) -> PipelineEngine:
        """Build the pipeline and let it load the served model (repair, verify, base + applied deltas)."""
        from kbsync.pipeline import EditPipeline

        settings = copy.deepcopy(settings)
        # The daemon's own method settings, when given, override [editor] for the edits it makes.
        if settings.daemon.method:
            settings.editor.method = settings.daemon.method
        if settings.daemon.method_options and hasattr(settings.editor, "options"):
            settings.editor.options = {**settings.editor.options, **settings.daemon.method_options}
        pipeline = EditPipeline(settings, adapter=adapter, audit=audit, store=store)
        pipeline.load_served_model()
        for line in getattr(pipeline, "repairs", []):
            log.warning("reconcile: %s", line)
        return cls(pipeline)

    def edit(self, fact: Fact, target: str, *, method: str | None = None, force: bool = False,
             dry_run: bool = False, source: str = "daemon", actor: str = "", kb_revision: str = "",
             options: dict[str, Any] | None = None) -> EditOutcome:
        """EditPipeline.edit_fact under the lock."""
        with self.lock, self._options(options):
            return _outcome(self.pipeline.edit_fact(
                fact, target, method=method, force=force, dry_run=dry_run, source=source,
                actor=actor or default_actor(), kb_revision=kb_revision))

    def edit_prompt(self, prompt: str, target: str, *, method: str | None = None, force: bool = False,
                    dry_run: bool = False, source: str = "api", actor: str = "",
                    options: dict[str, Any] | None = None) -> EditOutcome:
        """EditPipeline.edit_fact with a raw prompt, under the lock."""
        with self.lock, self._options(options):
            return _outcome(self.pipeline.edit_fact(prompt, target, method=method, force=force, dry_run=dry_run,
                                                    source=source, actor=actor or default_actor()))

    @contextlib.contextmanager
    def _options(self, options: dict[str, Any] | None) -> Iterator[None]:
        """Per-request method options over the pipeline's [editor].options (it reads them per edit)."""
        editor = self.pipeline.settings.editor
        saved = dict(getattr(editor, "options", {}))
        if options:
            editor.options = {**saved, **options}
        try:
            yield
        finally:
            if options:
                editor.options = saved

    def revert(self, edit_id: int, *, actor: str = "", source: str = "api") -> EditOutcome:
        """EditPipeline.revert under the lock."""
        with self.lock:
            return _outcome(self.pipeline.revert(edit_id, actor=actor or default_actor(), source=source))


def pipeline_available() -> bool:
    """Whether kbsync.pipeline (the full edit pipeline) is installed."""
    return importlib.util.find_spec("kbsync.pipeline") is not None


def load_engine(settings: Settings, audit: AuditLog, store: DeltaStore, adapter: Any = None) -> EditEngine:
    """The configured engine: "pipeline", "builtin", or "auto" (the pipeline when installed)."""
    kind = settings.daemon.engine
    if kind not in ("auto", "pipeline", "builtin"):
        raise BadInput(f"unknown daemon.engine {kind!r}; use auto, pipeline or builtin")
    if kind == "pipeline" or (kind == "auto" and pipeline_available()):
        return PipelineEngine.load(settings, audit, store, adapter)
    return BuiltinEngine.load(settings, audit, store, adapter)
