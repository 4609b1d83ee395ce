"""The edit step the daemon and the HTTP API call: the edit pipeline behind two locks.

The daemon only needs "write this fact into the served model and tell me the outcome" and
"revert edit N". Every edit goes through kbsync.pipeline.EditPipeline (check, method,
retain-set regression check, crash-safe commit).

Two locks, always taken in this order: `edit_lock` serialises everything that changes what is
served (edits, reverts, store syncs, cache warming) for its whole duration; `model_lock` guards
the weights themselves. The HTTP server takes only `model_lock` to generate. An edit takes
`model_lock` per phase (check, method, regression check, push; see EditPipeline.edit_fact) and
every phase leaves the weights as it found them (methods train in place and restore), so a
request sees the weights before an edit or after it, never half-edited, and waits at most for
the phase in progress. `model_lock` is granted first come, first served: with a plain RLock a
request could lose the race to each queued edit in turn and wait for all of them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kbsync.audit.log import AuditLog
from kbsync.audit.models import Edit
from kbsync.config import Settings
from kbsync.errors import KbsyncError
from kbsync.facts import Fact, render
from kbsync.pipeline import EditOutcome, EditPipeline, default_actor
from kbsync.store import DeltaStore

log = logging.getLogger("kbsync.daemon")


@dataclass
class EditSummary:
    """What one edit attempt did, as the API and the daemon report it: its audit row id (None for a dry run),
    status, answers and reasons (kbsync.pipeline.EditOutcome is the whole outcome: probes, retain checks)."""

    status: str
    edit_id: int | None = None
    before: str = ""
    after: str = ""
    reasons: list[str] = field(default_factory=list)
    method: str = ""
    # Methods of the fallback list tried first, each rejected: {"id", "method", "reasons"}.
    earlier_attempts: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, row: Edit, dry_run: bool = False, earlier: list[dict[str, Any]] | None = None) -> EditSummary:
        """From an audit row (a dry run's row is never saved, so it has no id) and the earlier attempts' data."""
        return cls(row.status, None if dry_run else row.id, row.before_answer or "", row.after_answer or "",
                   list(row.reasons or []), row.method or "", list(earlier or []))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON answers."""
        return dataclasses.asdict(self)


class ModelLock:
    """A re-entrant lock granted in arrival order (FIFO): the served weights' lock.

    threading.RLock wakes no waiter in particular, so a thread that releases and re-takes it at
    once (an edit between its phases, the next queued edit) can win again and again.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[object] = deque()
        self._owner: int | None = None
        self._depth = 0

    def acquire(self) -> None:
        """Wait for every earlier caller, then hold it (again, for its holder: re-entrant)."""
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            turn = object()
            self._queue.append(turn)
            try:
                while self._owner is not None or self._queue[0] is not turn:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: give up the place in the queue
                self._queue.remove(turn)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._owner, self._depth = me, 1

    def release(self) -> None:
        """Release once; the next in line gets it when the holder's last release is done."""
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a ModelLock this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Exclusive:
    """Both of an engine's locks, in order (re-usable: warm_retain enters it once per chunk)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __enter__(self) -> None:
        self.engine.edit_lock.acquire()
        try:
            self.engine.model_lock.acquire()
        except BaseException:
            self.engine.edit_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        self.engine.model_lock.release()
        self.engine.edit_lock.release()


class Engine:
    """EditPipeline under an edit lock, sharing a per-phase model lock with the server; per-request method options."""

    def __init__(self, pipeline: EditPipeline) -> None:
        self.pipeline = pipeline
        self.edit_lock = threading.RLock()
        self.model_lock = ModelLock()
        # The pipeline takes the model lock around each phase of an edit that touches the weights.
        pipeline.model_lock = self.model_lock
        self.exclusive = _Exclusive(self)

    @property
    def adapter(self) -> Any:
        """The pipeline's live adapter (base weights + applied deltas)."""
        return self.pipeline.adapter

    @classmethod
    def load(cls, settings: Settings, audit: AuditLog, store: DeltaStore, adapter: Any = None) -> Engine:
        """Build the pipeline and let it load the served model (repair, verify, base + applied deltas)."""
        settings = copy.deepcopy(settings)
        # The daemon's own method settings, when given, override [editor] for the edits it makes.
        if settings.daemon.method:
            settings.editor.method = settings.daemon.method
        settings.editor.options = {**settings.editor.options, **settings.daemon.method_options}
        pipeline = EditPipeline(settings, adapter=adapter, audit=audit, store=store)
        pipeline.load_served_model()
        for line in pipeline.repairs:
            log.warning("reconcile: %s", line)
        return cls(pipeline)

    def edit(self, fact: Fact, target: str, *, method: str | None = None, force: bool = False,
             dry_run: bool = False, source: str = "daemon", actor: str = "", kb_revision: str = "",
             options: dict[str, Any] | None = None, batch: str = "") -> EditSummary:
        """Write target as the fact's object into the served model."""
        with self.edit_lock, self._options(options):
            out = self.pipeline.edit_fact(fact, target, method=method, force=force, dry_run=dry_run,
                                          source=source, actor=actor or default_actor(), kb_revision=kb_revision,
                                          batch=batch)
        return EditSummary.of(out.edit, dry_run, out.earlier_attempts())

    def edit_prompt(self, prompt: str, target: str, *, method: str | None = None, force: bool = False,
                    dry_run: bool = False, source: str = "api", actor: str = "",
                    options: dict[str, Any] | None = None, batch: str = "", subject: str = "") -> EditSummary:
        """Make the served model answer target to a raw prompt (subject: the entity it names, if given)."""
        with self.edit_lock, self._options(options):
            out = self.pipeline.edit_fact(prompt, target, method=method, force=force, dry_run=dry_run,
                                          source=source, actor=actor or default_actor(), batch=batch,
                                          subject=subject)
        return EditSummary.of(out.edit, dry_run, out.earlier_attempts())

    def edit_batch(self, facts: list[Fact], *, method: str | None = None, source: str = "daemon", actor: str = "",
                   batch: str = "", single: Any = None) -> list[Any]:
        """Facts (each to its own object) as one update (kbsync.batch_edit); per fact an EditSummary, or single(i)'s result."""
        from kbsync.batch import BatchItem
        from kbsync.batch_edit import edit_batch

        items = [BatchItem(n + 1, f, f.object.label) for n, f in enumerate(facts)]
        with self.edit_lock:
            out = edit_batch(self.pipeline, items, method=method, source=source, actor=actor or default_actor(),
                             batch=batch, single=single)
        return [EditSummary.of(o.edit, False, o.earlier_attempts()) if isinstance(o, EditOutcome) else o
                for o in out.outcomes]

    @contextlib.contextmanager
    def _options(self, options: dict[str, Any] | None) -> Iterator[None]:
        """Per-request method options over the pipeline's [editor].options (it reads them per edit)."""
        editor = self.pipeline.settings.editor
        saved = dict(editor.options)
        editor.options = {**saved, **(options or {})}
        try:
            yield
        finally:
            editor.options = saved

    def warm(self, stop: threading.Event | None = None) -> int:
        """Precompute the next regression check's base side, a chunk at a time under both locks."""
        # Chunks of 4: a request or a poll waits for one chunk at most (16 were 8 s of SmolLM2 on a core).
        return self.pipeline.warm_retain(chunk=4, lock=self.exclusive, stop=stop)

    def record_failure(self, fact: Fact, reason: str, *, method: str = "", source: str = "daemon", actor: str = "",
                       kb_revision: str = "") -> EditSummary:
        """Audit an edit of fact that raised before the pipeline wrote a row: a 'failed' row with the reason."""
        try:
            prompts = render(fact)
            question, claim = prompts.question, prompts.claim
        except KbsyncError:  # the row must still be written; the fact's own fields say what it was
            question = claim = ""
        row = Edit(subject_id=fact.subject.id, subject_label=fact.subject.label, property=fact.property,
                   object_id=fact.object.id, object_label=fact.object.label, question=question, claim=claim,
                   source=source, actor=actor or default_actor(), method=method or self.pipeline.settings.editor.method,
                   kb_revision=kb_revision or fact.revision, status="failed", reasons=[reason])
        return EditSummary.of(self.pipeline.audit.record(row))

    def sync(self) -> list[str]:
        """Bring the served weights in step with the store (edits and reverts made by other processes)."""
        # No store lock: an applied row always has its delta file, so reading never sees half a commit,
        # and waiting here behind another process's edit would hold up every client.
        import torch

        with self.exclusive, torch.no_grad():  # a rebuild writes parameters that require grad in place
            return self.pipeline.load_served_model().sync(self.pipeline.audit, self.pipeline.store)

    def consolidate(self, without: tuple[int, ...] = (), *, actor: str = "", source: str = "api", reason: str = "",
                    dry_run: bool = False) -> dict[str, Any]:
        """The applied edits as one checked delta (kbsync.consolidate); generation waits one phase at a time."""
        with self.edit_lock:
            out = self.pipeline.consolidate(without, actor=actor or default_actor(), source=source, reason=reason,
                                            dry_run=dry_run)
        return out.to_dict()

    def revert(self, edit_id: int, *, actor: str = "", source: str = "api", reason: str = "") -> EditSummary:
        """Undo an applied edit in the audit log and the live model."""
        with self.exclusive:
            return EditSummary.of(self.pipeline.revert(edit_id, actor=actor or default_actor(), source=source,
                                                       reason=reason))
