"""One fact into the served model: check, edit, regression-check, commit (or reject), all audited.

Used by `kbsync edit` and by the daemon (``EditPipeline(settings).edit_fact(fact,
source="daemon", kb_revision=...)``). Every edit runs under the delta store's lock, after
bringing the live model in step with the store, so edits from several processes stack in
one order and each is checked against the model it will actually be added to.
"""

from __future__ import annotations

import getpass
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from editor.methods import EditMethod, EditRequest, MethodContext, canonical, make_method, method_class
from kbsync.audit.log import AuditLog
from kbsync.audit.models import BASE_FINGERPRINT, CONSOLIDATES, Edit, EditCheck
from kbsync.check import Probe, ProbeResult, probes, run_probes
from kbsync.config import Settings
from kbsync.corpus import FactTable, default_fact_table, fact_from_phrase  # noqa: F401  (re-exported for callers)
from kbsync.errors import BadInput, KbsyncError
from kbsync.facts import Entity, Fact, default_relations, render
from kbsync.match import match, normalise
from kbsync.retain import BaseCache, RetainReport, check_dict, is_question, measure, sample_retain
from kbsync.served import ServedModel
from kbsync.store import DeltaStore

# At most this many of the subject's other facts are kept (EditRequest.keep): each costs the
# target-vector optimisation one more prompt per step.
KEEP_MAX = 6


def default_actor() -> str:
    """$USER, or the login name, for the audit record."""
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


@dataclass
class EditOutcome:
    """What an edit did: the audit row (unsaved on --dry-run), the probes before/after, retain metrics."""

    edit: Edit
    before: list[ProbeResult]
    after: list[ProbeResult] = field(default_factory=list)
    retain: RetainReport | None = None
    timings: dict[str, float] = field(default_factory=dict)
    dry_run: bool = False
    repairs: list[str] = field(default_factory=list)
    # Changes other processes made to the store since the model was loaded, taken in before this edit
    # ("applied edit 9", "rebuilt from base without edit(s) 3"): normal concurrency, not repairs.
    synced: list[str] = field(default_factory=list)
    # Rejected attempts of earlier methods of the fallback list, in order (each its own audit row).
    earlier: list[Edit] = field(default_factory=list)

    @property
    def status(self) -> str:
        """applied | rejected | noop (what it would have been, on a dry run)."""
        return self.edit.status

    def earlier_attempts(self) -> list[dict[str, Any]]:
        """The rejected earlier attempts as plain data: id (None on a dry run: never saved), method, reasons."""
        return [{"id": e.id, "method": e.method, "reasons": list(e.reasons or [])} for e in self.earlier]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json."""
        return {
            "id": self.edit.id, "status": self.status, "dry_run": self.dry_run, "forced": self.edit.forced,
            "reasons": list(self.edit.reasons), "method": self.edit.method,
            "earlier_attempts": self.earlier_attempts(),
            "fact": {"subject": self.edit.subject_label, "property": self.edit.property,
                     "object": self.edit.object_label, "question": self.edit.question},
            "before": [r.to_dict() for r in self.before], "after": [r.to_dict() for r in self.after],
            "metrics": self.edit.metrics, "thresholds": self.edit.thresholds,
            "changed_retain": [check_dict(c) for c in (self.retain.changed() if self.retain else [])],
            "delta_path": self.edit.delta_path, "delta_sha256": self.edit.delta_sha256,
            "timings": self.timings, "repairs": self.repairs, "synced": self.synced,
        }


@dataclass(frozen=True)
class _Target:
    """What is being edited, in the shape both the fact and the raw-prompt forms reduce to."""

    probes: list[Probe]
    request: EditRequest
    row: Edit
    exclude_key: tuple[str, str] | None
    aliases: tuple[str, ...]
    claim_prefix: str


# What a method's delta says about how it was made that a reviewer reads in the row (kbsync show):
# a gated edit's scope (the texts it fires on) and, where a method tried more than once, each attempt.
AUDITED_META = ("fires_on", "attempts")


def audited_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The keys of a delta's meta that its audit row records (AUDITED_META)."""
    return {k: meta[k] for k in AUDITED_META if k in meta}


class EditPipeline:
    """Check, edit, regression-check and commit facts into the served model; revert edits."""

    def __init__(self, settings: Settings, adapter: Any = None, audit: AuditLog | None = None,
                 store: DeltaStore | None = None, table: FactTable | None = None) -> None:
        self.settings = settings
        # Open the audit log first: a database that does not answer fails before any model work.
        self.audit = audit or AuditLog.open(settings.store.db_url)
        self.store = store or DeltaStore.for_settings(settings)
        self.table = table
        self._adapter = adapter
        self._served: ServedModel | None = None
        # Retain items' pre-edit answers and base scores per served-weights fingerprint (memory + disk).
        self.retain_cache = BaseCache(settings.store.data_path / "retain-cache")
        self.repairs: list[str] = []
        # Methods are created once per served model and options (KE loads its editor, AlphaEdit its
        # statistics), and follow the served model's deltas as its listeners.
        self._methods: dict[tuple[str, str], EditMethod] = {}
        # Taken around each phase of an edit that reads or changes the weights (the server's
        # generation lock when an Engine runs the pipeline; nothing for a lone CLI process).
        self.model_lock: Any = nullcontext()

    def close(self) -> None:
        """Release the audit log's connections."""
        self.audit.close()

    # --- the served model -----------------------------------------------------------------

    def load_served_model(self) -> ServedModel:
        """Repair what a crash left, verify every applied delta, then base weights + deltas in order."""
        if self._served is None:
            self.repairs += self.store.reconcile(self.audit)
            # Missing or tampered deltas stop the load here (DeltaError names the edit).
            self.store.verify(self.audit)
            if self._adapter is None:
                from adapters import load_adapter

                self._adapter = load_adapter(self.settings)
            served = ServedModel(self._adapter)
            with self.store.lock():
                served.sync(self.audit, self.store)
            self._served = served
        return self._served

    def _applied(self) -> list[Edit]:
        """The applied edits of the served base model, in stacking order (other models' rows share the log)."""
        return self.audit.applied_in_order(self.load_served_model().base_fingerprint)

    @property
    def adapter(self) -> Any:
        """The live adapter (loaded with its applied deltas on first use)."""
        return self.load_served_model().adapter

    # --- editing ---------------------------------------------------------------------------

    def _target(self, fact: Fact | str, target: str | None, source: str, actor: str, kb_revision: str,
                method: str, batch: str = "", subject: str = "") -> _Target:
        tgt = self._target_of(fact, target, source, actor, kb_revision, method, subject)
        if batch:
            tgt.row.metrics["batch"] = batch
        return tgt

    def _target_of(self, fact: Fact | str, target: str | None, source: str, actor: str, kb_revision: str,
                   method: str, subject: str = "") -> _Target:
        if isinstance(fact, Fact):
            if target is not None and normalise(target) != normalise(fact.object.label):
                fact = Fact(fact.subject, fact.property, Entity("", target.strip()), fact.revision)
            if not fact.object.label.strip():
                raise BadInput("empty target: say what the new answer is")
            prompts = render(fact)
            row = Edit(subject_id=fact.subject.id, subject_label=fact.subject.label, property=fact.property,
                       object_id=fact.object.id, object_label=fact.object.label, question=prompts.question,
                       claim=prompts.claim, source=source, actor=actor, method=method,
                       kb_revision=kb_revision or fact.revision)
            items = probes(self.adapter, prompts)
            question = items[0].question
            styled = question and self.adapter.answer_style(self.settings.editor.answer_style) == "claim"
            request = EditRequest(items[0].prompt, items[0].expected, question=question,
                                  paraphrases=prompts.paraphrases if question else (),
                                  aliases=prompts.aliases, claim_prefix=prompts.claim_prefix,
                                  answer=prompts.claim if styled else "", subject=fact.subject.label,
                                  keep=self._keep(fact, question))
            return _Target(items, request, row, fact.key, prompts.aliases, prompts.claim_prefix)
        prompt, target = (fact or "").strip(), (target or "").strip()
        if not prompt:
            raise BadInput("empty prompt: give the text the model should complete")
        if not target:
            raise BadInput("empty target: say what the new answer is")
        subject = subject.strip()
        if subject and subject not in prompt:
            raise BadInput(f"subject {subject!r} does not occur in the prompt {prompt!r}")
        q = is_question(prompt)
        row = Edit(question=prompt, object_label=target, source=source, actor=actor, method=method,
                   kb_revision=kb_revision, subject_label=subject)
        return _Target([Probe("question" if q else "prompt", prompt, target, question=q)],
                       EditRequest(prompt, target, question=q, subject=subject), row, None, (), "")

    def _keep(self, fact: Fact, question: bool) -> tuple[str, ...]:
        """The subject's other facts in the fact table, asked as the edit is (question or claim): their answers must stay."""
        others = [f for f in (self.table or default_fact_table()).about(fact.subject.id) if f.property != fact.property]
        asked = [render(f).question if question else render(f).claim_prefix for f in others[:KEEP_MAX]]
        return tuple(dict.fromkeys(asked))

    def edit_fact(self, fact: Fact | str, target: str | None = None, *, method: str | None = None,
                  force: bool = False, dry_run: bool = False, source: str = "cli", actor: str = "",
                  kb_revision: str = "", batch: str = "", subject: str = "") -> EditOutcome:
        """Write one fact (or a raw prompt -> target) into the served model.

        fact: a Fact (its object is the new answer unless target is given), or a raw prompt
        string with target required. method: a registered edit method (default: settings).
        force: commit even if the regression check fails (recorded). dry_run: everything but
        the commit; nothing is written. batch: the id linking the rows of one batch (recorded as
        metrics["batch"]). subject: with a raw prompt, the entity it names (it must occur in it;
        locate-and-edit and gated methods read and write the model there). Returns the outcome; its edit has status 'applied', 'rejected' or
        'noop'. Raises KbsyncError subclasses for bad input, before writing.
        """
        timings: dict[str, float] = {}
        clock = _Clock(timings)
        with clock("load"):
            served = self.load_served_model()
        adapter = served.adapter
        # Record the canonical method name ("ft" is an alias of "ft-layer").
        name = canonical(method or self.settings.editor.method)
        actor = actor or default_actor()
        tgt = self._target(fact, target, source, actor, kb_revision, name, batch, subject)
        row = tgt.row
        # Each `with self.model_lock` block is a phase: it finds the weights base + applied deltas
        # and leaves them so (methods train in place and restore; the candidate delta is taken off
        # again), so between phases the server may answer from them. Only the edit's own push
        # changes them, and other edits, reverts and syncs wait for this one (the store lock, and
        # the Engine's edit lock in the daemon).
        with self.store.lock():
            with self.model_lock:
                synced = served.sync(self.audit, self.store)
                with clock("check"):
                    before = run_probes(adapter, tgt.probes, tgt.aliases, tgt.claim_prefix)
            row.before_answer = before[0].prediction
            outcome = EditOutcome(row, before, timings=timings, dry_run=dry_run, repairs=self.repairs, synced=synced)
            if before[0].ok:
                row.status, row.after_answer = "noop", before[0].prediction
                row.reasons = [f"the model already answers {before[0].prediction!r}"]
                if not dry_run:
                    outcome.edit = self.audit.record(row)
                return outcome
            items = self._retain_items(tgt.exclude_key, "" if tgt.exclude_key else tgt.request.prompt)
            # An explicit method is tried alone; the configured one may fall back to the next of
            # [editor] fallback when its proposal is rejected or it cannot run (each attempt audited).
            names = [name] if method else list(dict.fromkeys([name, *map(canonical, self.settings.editor.fallback)]))
            for n in names:
                method_class(n)  # an unknown name is a one-line error before any work, not when reached
            for i, attempt in enumerate(names):
                if i:  # a row of its own for the next method's attempt
                    tgt = self._target(fact, target, source, actor, kb_revision, attempt, batch, subject)
                    tgt.row.before_answer = before[0].prediction
                    outcome = EditOutcome(tgt.row, before, timings=timings, dry_run=dry_run, repairs=self.repairs,
                                          synced=synced, earlier=[*outcome.earlier, outcome.edit])
                fallback = names[i + 1] if i + 1 < len(names) else None
                self._attempt(attempt, tgt, outcome, items, clock, force, dry_run, fallback)
                if outcome.status != "rejected":
                    break
        return outcome

    def _attempt(self, name: str, tgt: _Target, outcome: EditOutcome, items: list[Any], clock: Any, force: bool,
                 dry_run: bool, fallback: str | None = None) -> None:
        """One method's proposal for the target, regression-checked, judged and (unless dry_run) committed or recorded.

        With a fallback method to try next, a method that cannot run (no trained editor, missing
        statistics, a subject it cannot find) is recorded as a rejected attempt instead of raising.
        """
        served = self.load_served_model()
        adapter, row, before, reg = served.adapter, tgt.row, outcome.before, self.settings.regression
        timings = outcome.timings
        try:
            with self.model_lock:
                # Before anything is written: fails with one line (e.g. no trained KnowledgeEditor).
                # A method's first use may compute statistics on the base weights (as_base).
                editor = self.method(name)
                row.parent_fingerprint = adapter.fingerprint()
                with clock("regression"):
                    base = self.retain_cache.get(adapter, items)
            with self.model_lock, clock("edit"):
                tgt.request.original = before[0].prediction
                result = editor.propose(tgt.request)
        except KbsyncError as e:
            if fallback is None:
                raise
            row.status, row.reasons = "rejected", [f"method {name} cannot edit: {e}", f"falling back to {fallback}"]
            if not dry_run:
                outcome.edit = self.audit.record(row)
            return
        if "shrink_seconds" in result.info:  # its own phase in the timings (edit_latency.py)
            timings["shrink"] = timings.get("shrink", 0.0) + result.info["shrink_seconds"]
            timings["edit"] -= result.info["shrink_seconds"]
        with self.model_lock, clock("regression"):
            retain = measure(adapter, items, base, result.delta, reg.tie_margin)
            result.delta.apply(adapter.model)
            try:
                after = run_probes(adapter, tgt.probes, tgt.aliases, tgt.claim_prefix)
            finally:
                result.delta.remove(adapter.model)
        outcome.after, outcome.retain = after, retain
        self._judge(row, after, retain, result, force)
        if row.status == "rejected" and fallback is not None:
            row.reasons = [*row.reasons, f"falling back to {fallback}"]
        # Which base model the edit was made (and judged) on; its delta carries it too.
        row.metrics[BASE_FINGERPRINT] = served.base_fingerprint
        row.metrics.update(audited_meta(result.delta.meta))
        # Wall seconds per phase so far, every attempt of this edit included: what the change cost to serve.
        row.metrics["seconds"] = {k: round(v, 3) for k, v in timings.items()}
        checks = _checks(before, after, retain)
        if dry_run:
            return
        with clock("commit"):
            if row.status == "applied":
                # ServedModel refuses to stack the delta on any other base model (check_fits).
                result.delta.meta.update({"fact": row.question, "target": row.object_label, "method": name,
                                          BASE_FINGERPRINT: served.base_fingerprint})
                outcome.edit = self.store.commit(self.audit, row, result.delta, checks)
                # Until this push, the server answers as before the edit (as if asked just before it).
                with self.model_lock:
                    served.push(result.delta, outcome.edit.id)
            else:
                outcome.edit = self.audit.record(row, checks)

    def _judge(self, row: Edit, after: list[ProbeResult], retain: RetainReport, result: Any, force: bool) -> None:
        """Fill metrics, thresholds, reasons and status (applied / rejected / forced)."""
        reg = self.settings.regression
        paraphrases = [r for r in after if r.kind == "paraphrase"]
        para_acc = sum(r.ok for r in paraphrases) / len(paraphrases) if paraphrases else None
        m = retain.summary()
        row.after_answer = after[0].prediction
        row.metrics = {**row.metrics, **m, "paraphrase_accuracy": para_acc, "flipped": after[0].ok,
                       "edit_steps": result.steps, "edit_seconds": result.seconds,
                       "delta_norm": result.delta.norm(), "delta_scale": result.info.get("scale", 1.0)}
        row.thresholds = {"max_mean_kl": reg.max_mean_kl, "max_kl": reg.max_kl, "min_unchanged": reg.min_unchanged,
                          "min_paraphrase_accuracy": reg.min_paraphrase_accuracy, "tie_margin": reg.tie_margin,
                          "keep_applied": reg.keep_applied}
        reasons = []
        if not after[0].ok:
            reasons.append(f"the edit did not take: the model answers {after[0].prediction!r}")
        reasons += retain.broken_limits(reg)
        if para_acc is not None and para_acc < reg.min_paraphrase_accuracy:
            reasons.append(f"paraphrase accuracy {para_acc:.1%} < {reg.min_paraphrase_accuracy:.1%}")
        if reg.keep_applied and (undone := self._undone(retain)):
            reasons.append("undoes applied " + ", ".join(undone))
        row.reasons = reasons
        row.forced = bool(reasons) and force
        if row.forced:
            row.reasons = [*reasons, f"forced by {row.actor or 'unknown'} despite the above"]
        row.status = "applied" if not reasons or force else "rejected"

    def _undone(self, retain: RetainReport) -> list[str]:
        """Applied edits whose answer held before the candidate delta (match rules) and not with it."""
        applied = {f"edit:{e.id}": e for e in self._applied()}
        out = []
        for c in retain.checks:
            e = applied.get(c.item.origin)
            # An answer regenerated for a changed item; "" when it was not (then it no longer holds).
            if e is not None and not c.unchanged and match(c.before, e.object_label).ok and not match(c.after, e.object_label).ok:
                out.append(f"edit {e.id} ({c.before!r} -> {c.after!r})")
        return out

    def method(self, name: str) -> EditMethod:
        """The prepared method for the served model under the current [editor] settings (created once)."""
        ed = self.settings.editor
        defaults = {"loop": ed.loop, "shrink": ed.shrink, "preserve": ed.preserve}
        options = method_options(ed.options, name, (name, ed.method, *ed.fallback))
        key = (canonical(name), repr(sorted({**defaults, **options}.items())))
        if key not in self._methods:
            served = self.load_served_model()
            context = MethodContext(self.settings.store.data_path, self.settings.store.cache_path,
                                    served.base_fingerprint, served.as_base)
            made = make_method(name, served.adapter, context, defaults, **options)
            served.add_listener(made)
            self._methods[key] = made
        return self._methods[key]

    # --- retain cache ------------------------------------------------------------------------

    def _retain_items(self, exclude_key: Any = None, exclude_prompt: Any = "") -> list[Any]:
        """The configured retain sample for the served state, minus the slot(s) or prompt(s) being edited."""
        reg = self.settings.regression
        return sample_retain(self.table or default_fact_table(), self._applied(), reg.retain_size,
                             reg.seed, exclude_key, exclude_prompt, default_relations())

    def warm_retain(self, chunk: int = 16, lock: Any = None, stop: Any = None) -> int:
        """Fill the retain cache for the current served weights, so the next edit's check starts warm.

        The next edit samples the same set minus its own slot, so the generic sample (nothing
        excluded) covers all but one item. Works in chunks, each under `lock` (the server's
        model lock) when given, so clients are not held up for the whole pass; stops early when
        `stop` (an Event) is set or the weights change under it. Returns the items computed.
        """
        adapter = self.adapter
        items = self._retain_items()
        done = 0
        fingerprint = None
        for i in range(0, len(items), chunk):
            if stop is not None and stop.is_set():
                break
            with lock if lock is not None else nullcontext():
                now = adapter.fingerprint()
                if fingerprint is not None and now != fingerprint:
                    break  # an edit landed in between: this pass is stale
                fingerprint = now
                misses = self.retain_cache.misses
                self.retain_cache.get(adapter, items[i:i + chunk])
                done += self.retain_cache.misses - misses
        return done

    # --- consolidation -----------------------------------------------------------------------

    def consolidate(self, without: tuple[int, ...] = (), **kwargs: Any) -> Any:
        """The applied edits (minus `without`) as one checked delta; see kbsync.consolidate.consolidate."""
        from kbsync.consolidate import consolidate

        return consolidate(self, without, **kwargs)

    # --- revert ----------------------------------------------------------------------------

    def revert(self, edit_id: int, *, actor: str = "", source: str = "cli", reason: str = "") -> Edit:
        """Take an applied edit out of the served model (the live one too, if loaded); returns the revert row.

        Every delta the model without the edit stacks is loaded, checksum-verified and (when the
        model is loaded) checked to fit before the row is marked, so a revert that cannot be
        carried out changes nothing and fails with one line. The undone edit's delta file stays
        in the store for the record; it no longer stacks (nor is it needed to take it out).
        """
        from editor.delta import DeltaError

        with self.store.lock():
            orig = self.audit.get(edit_id)
            if orig.status not in ("applied", "consolidation"):
                raise BadInput(f"edit {edit_id} is {orig.status}; only applied edits can be reverted")
            # The stack the edit belongs to: its own base model's (several may share the log).
            base = orig.metrics.get(BASE_FINGERPRINT)
            folded = self.audit.consolidation(base) if base else None
            if folded is not None and edit_id in folded.metrics.get(CONSOLIDATES, []):
                return self._revert_consolidated(orig, folded, actor, source, reason)
            served = self._served
            if served is not None and base not in (None, served.base_fingerprint):
                served = None  # another model's edit: the served weights do not hold it
            keep = self.audit.stack_in_order(base, leaving=edit_id)
            deltas = []
            try:
                for e in keep:
                    delta = self.store.load(e)
                    if served is not None:
                        # What push() would refuse half-way through the rebuild, refused before it starts.
                        served.check_fits(delta, e.id)
                        deltas.append((e.id, delta))  # with no model loaded, only verified: not held in memory
            except DeltaError as err:
                raise DeltaError(f"cannot revert edit {edit_id}: the model without it stacks {err}; "
                                 "nothing was changed") from None
            row = self.audit.mark_reverted(edit_id, actor or default_actor(), source, reason)
            if served is not None:
                served.reset()
                for kept_id, delta in deltas:
                    served.push(delta, kept_id)
        return row


    def _revert_consolidated(self, orig: Edit, folded: Edit, actor: str, source: str, reason: str) -> Edit:
        """Revert an edit the active consolidation stands for: consolidate again without it (checked)."""
        if self.load_served_model().base_fingerprint != orig.metrics.get(BASE_FINGERPRINT):
            raise BadInput(f"edit {orig.id} is consolidated into edit {folded.id} of another base model; "
                           "revert it from a process serving that model")
        out = self.consolidate((orig.id,), actor=actor or default_actor(), source=source, reason=reason,
                               wait=self.store.lock_timeout)
        if out.status != "consolidation":
            raise BadInput(f"cannot revert edit {orig.id}: consolidating without it was rejected (edit {out.edit.id}: "
                           f"{'; '.join(out.edit.reasons)}); revert consolidation {folded.id} first, then the edit")
        return self.audit.get(self.audit.get(orig.id).reverted_by)


def method_options(options: dict[str, Any], name: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """[editor.options] for one method: the flat keys it has, then its own table ([editor.options.ft-layer]).

    Flat keys serve every method of the chain (the method and its fallbacks), each taking those it
    has; a flat key that no method of the chain has is an error (a typo must not pass silently).
    """
    import dataclasses

    from editor.methods import method_class

    cls, _ = method_class(name)
    flat = {k: v for k, v in options.items() if not isinstance(v, dict)}
    known = {f.name for f in dataclasses.fields(cls.options_cls)}
    if chain:
        anywhere = set().union(*({f.name for f in dataclasses.fields(method_class(m)[0].options_cls)} for m in chain))
        unknown = sorted(set(flat) - anywhere)
        if unknown:
            raise BadInput(f"unknown option(s) {', '.join(unknown)} in [editor.options]: no method of "
                           f"{', '.join(chain)} has them")
        flat = {k: v for k, v in flat.items() if k in known}
    return {**flat, **options.get(cls.name, {})}


def _checks(before: list[ProbeResult], after: list[ProbeResult], retain: RetainReport) -> list[EditCheck]:
    """Audit rows: one per paraphrase probe and one per retain item."""
    rows = [EditCheck(kind="paraphrase", prompt=a.prompt, expected=a.expected, before=b.prediction,
                      after=a.prediction, ok=a.ok) for b, a in zip(before, after) if a.kind == "paraphrase"]
    rows += [EditCheck(kind="retain", prompt=c.item.prompt, expected=c.before, before=c.before, after=c.after,
                       kl=c.kl, ok=c.unchanged) for c in retain.checks]
    return rows


class _Clock:
    """Accumulates wall seconds per phase into a dict."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start
