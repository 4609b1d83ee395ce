"""A batch of facts as one update: every proposal made on the same model, judged together, each committed as its own row.

`kbsync edit --batch FILE` (without a daemon) and the daemon (the changes one poll finds,
Engine.edit_batch) hand their facts here. Singles would each re-check the
model the previous one left; here the configured method proposes every fact on the model as the
batch found it, the proposals are summed and judged once: each fact's own probes with all of them
applied (one batched generation per prompt style), and one retain check of the sum. A fact whose
probes fail is left out and the rest judged again without it; the facts left out, and every fact
when the sum breaks the retain limits, go through the ordinary single edit (the fallback methods,
each attempt audited). Accepted facts are committed one by one, each its own audit row and delta
(revertible alone), all carrying the batch id and `metrics.joint` (the facts judged together).

Proposals on one state suit methods whose edits of different subjects do not interact (the gated
default: each vector fires only at its subject) and are what MEMIT's batch update assumes; facts
of one subject in one batch are judged together, so an interaction shows up as a failed probe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from editor.delta import Delta
from editor.methods import canonical
from kbsync.audit.models import BASE_FINGERPRINT
from kbsync.check import run_probes
from kbsync.errors import KbsyncError
from kbsync.retain import measure


# Reasons of a rejection that are the fact's own (its probes with the batch applied), not the batch's.
OWN = ("the edit did not take", "paraphrase accuracy")


@dataclass
class BatchOutcome:
    """Per item of the batch (in order), its EditOutcome; which were judged jointly; seconds."""

    outcomes: list[Any] = field(default_factory=list)
    joint: list[int] = field(default_factory=list)
    seconds: float = 0.0


def edit_batch(pipeline: Any, items: Sequence[Any], *, method: str | None = None, force: bool = False,
               dry_run: bool = False, actor: str = "", batch: str = "", source: str = "cli",
               single: Callable[[int], Any] | None = None) -> BatchOutcome:
    """Edit every item (kbsync.batch.BatchItem) as one update where it can, as a single edit where it cannot.

    single(i), when given, edits item i the single way instead of pipeline.edit_fact (the daemon's,
    which records a failure as an owed change instead of raising); its result is item i's outcome.
    """
    from kbsync.pipeline import EditOutcome, _checks, audited_meta, default_actor

    start = time.perf_counter()
    served = pipeline.load_served_model()
    adapter, lock = served.adapter, pipeline.model_lock
    name = canonical(method or pipeline.settings.editor.method)
    actor = actor or default_actor()
    done: dict[int, Any] = {}
    joint: list[int] = []
    with pipeline.store.lock():
        with lock:
            synced = served.sync(pipeline.audit, pipeline.store)
        targets = {i: pipeline._target(it.what, it.target, source, actor, "", name, batch, it.subject)
                   for i, it in enumerate(items)}
        before = {}
        with lock:
            for i, t in targets.items():
                before[i] = run_probes(adapter, t.probes, t.aliases, t.claim_prefix)
        todo = []
        for i, t in targets.items():
            t.row.before_answer = before[i][0].prediction
            if before[i][0].ok:  # nothing to do, as a single edit would record it
                t.row.status, t.row.after_answer = "noop", before[i][0].prediction
                t.row.reasons = [f"the model already answers {before[i][0].prediction!r}"]
                out = EditOutcome(t.row, before[i], dry_run=dry_run, repairs=pipeline.repairs, synced=synced)
                if not dry_run:
                    out.edit = pipeline.audit.record(t.row)
                done[i] = out
            else:
                todo.append(i)
        proposals: dict[int, Any] = {}
        try:
            with lock:
                editor = pipeline.method(name)
        except KbsyncError:
            todo = []  # the method cannot run here: every fact goes the single way (fallbacks, audited)
        for i in todo:
            targets[i].request.original = before[i][0].prediction
            try:
                with lock:
                    result = editor.propose(targets[i].request)
            except KbsyncError:
                continue  # this fact (a prompt with no subject for a gated edit): the single way
            if result.success:
                proposals[i] = result
        # Judge the sum; leave out facts whose own probes fail, and judge the rest again.
        while proposals:
            total = Delta.sum([r.delta for r in proposals.values()])
            slots = {targets[i].exclude_key for i in proposals} - {None}
            prompts = {targets[i].request.prompt for i in proposals if targets[i].exclude_key is None}
            checked = pipeline._retain_items(slots, prompts)
            with lock:
                base = pipeline.retain_cache.get(adapter, checked)
                retain = measure(adapter, checked, base, total, pipeline.settings.regression.tie_margin)
                total.apply(adapter.model)
                try:
                    after = {i: run_probes(adapter, targets[i].probes, targets[i].aliases, targets[i].claim_prefix)
                             for i in proposals}
                finally:
                    total.remove(adapter.model)
            for i, r in proposals.items():
                pipeline._judge(targets[i].row, after[i], retain, r, force)
            failing = [i for i in proposals if targets[i].row.status != "applied"]
            if not failing:
                break
            if any(not reason.startswith(OWN) for i in failing for reason in targets[i].row.reasons):
                proposals = {}  # the sum breaks a shared limit (retain, an applied edit undone): all go single
                break
            proposals = {i: r for i, r in proposals.items() if i not in failing}
        joint = sorted(proposals)
        for i in joint:
            t, r = targets[i], proposals[i]
            t.row.metrics.update({BASE_FINGERPRINT: served.base_fingerprint, "joint": len(joint),
                                  "seconds": {"batch": round(time.perf_counter() - start, 3)}})
            t.row.metrics.update(audited_meta(r.delta.meta))  # as a single edit's row records them
            out = EditOutcome(t.row, before[i], after[i], retain, dry_run=dry_run, repairs=pipeline.repairs,
                              synced=synced)
            if not dry_run:
                r.delta.meta.update({"fact": t.row.question, "target": t.row.object_label, "method": name,
                                     BASE_FINGERPRINT: served.base_fingerprint})
                out.edit = pipeline.store.commit(pipeline.audit, t.row, r.delta, _checks(before[i], after[i], retain))
                with lock:
                    served.push(r.delta, out.edit.id)
            done[i] = out
    for i, it in enumerate(items):  # the rest, one at a time with the fallback methods
        if i not in done:
            done[i] = single(i) if single is not None else pipeline.edit_fact(
                it.what, it.target, method=method, force=force, dry_run=dry_run, source=source, actor=actor,
                batch=batch, subject=it.subject)
    return BatchOutcome([done[i] for i in range(len(items))], joint, time.perf_counter() - start)
