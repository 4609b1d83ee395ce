"""`kbsync consolidate`: the served model's applied edits written again, from the base weights, as one delta.

A daemon that runs for months stacks thousands of deltas, each made on the model the ones before
it left. Consolidation recomputes them on the base model in one go: each method's edits are
handed to its `consolidate()` (locate-and-edit methods re-solve every fact jointly from the
target vectors their deltas kept; the others, gated edits included, add up exactly), and the
result is one delta that replaces the stack. It is judged like an edit, on the base model:

- every fact the stacked model answered (greedy answer, match rules; the newest edit of each
  prompt) must still be answered, and
- the retain set's table facts must stay within the regression limits, compared to the base
  model (the edited slots themselves are left out: they are meant to change).

Accepted, it is committed with the edit protocol (pending row, delta file, then one
transaction that makes it the active consolidation, supersedes the previous one and marks any
edit consolidated away as reverted), so a crash at any point leaves the previous state serving.
The individual rows stay 'applied' (the facts are still held) and keep their deltas; the
consolidation row lists them (metrics["consolidates"]). Reverting one of them is a consolidation
without it; reverting the consolidation row goes back to the individual deltas.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from editor.delta import Delta
from editor.methods import EditRequest, canonical
from kbsync.audit.models import BASE_FINGERPRINT, CONSOLIDATES, Edit
from kbsync.corpus import default_fact_table
from kbsync.errors import BadInput, Busy
from kbsync.match import match
from kbsync.retain import RetainReport, check_dict, is_question, measure, sample_retain

# Facts are probed (and retain items scored) in chunks, each under the model lock: a request waits
# for one chunk at most, however many edits the stack holds.
CHUNK = 16


class ConsolidationBusy(Busy):
    """An edit (or another consolidation) holds the delta store: consolidating now would race it."""


@dataclass(frozen=True)
class Held:
    """One fact the applied edits teach (the newest edit of its prompt) and whether a model answers it."""

    edit_id: int
    request: EditRequest


@dataclass
class ConsolidationOutcome:
    """What a consolidation did: its row (unsaved on a dry run), the facts it kept or lost, the retain check."""

    edit: Edit
    members: list[int]
    before: dict[int, str] = field(default_factory=dict)
    after: dict[int, str] = field(default_factory=dict)
    lost: list[int] = field(default_factory=list)
    retain: RetainReport | None = None
    dry_run: bool = False

    @property
    def status(self) -> str:
        """consolidation (applied) | rejected."""
        return self.edit.status

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json and the API."""
        return {"id": self.edit.id, "status": self.status, "dry_run": self.dry_run, "reasons": list(self.edit.reasons),
                "consolidates": self.members, "without": self.edit.metrics.get("without", []),
                "metrics": self.edit.metrics, "delta_path": self.edit.delta_path,
                "lost": [{"edit": i, "before": self.before[i], "after": self.after[i]} for i in self.lost],
                "changed_retain": [check_dict(c) for c in (self.retain.changed() if self.retain else [])]}


def request_of(edit: Edit, delta: Delta) -> EditRequest:
    """What the edit taught: the request its delta recorded, else the row's prompt and target."""
    raw = delta.meta.get("request")
    if isinstance(raw, dict):
        return EditRequest.from_dict(raw)
    return EditRequest(edit.question, edit.object_label, question=is_question(edit.question))


def answers(adapter: Any, facts: Sequence[Held], hold: Callable[[], AbstractContextManager[Any]]) -> dict[int, str]:
    """The model's greedy answer to each fact's prompt, a chunk at a time inside a fresh hold() (the model lock)."""
    out: dict[int, str] = {}
    for i in range(0, len(facts), CHUNK):
        with hold():
            for question in (True, False):
                group = [f for f in facts[i:i + CHUNK] if f.request.question == question]
                if group:
                    preds = adapter.predict([f.request.prompt for f in group], question=question)
                    out.update({f.edit_id: p for f, p in zip(group, preds)})
    return out


def holds(fact: Held, answer: str) -> bool:
    """Whether an answer is the fact's target under the match rules."""
    r = fact.request
    return match(answer, r.target, r.aliases, r.claim_prefix).ok


class Holds:
    """The model lock, timing each outermost hold: how long generation waited at most (metrics.longest_hold_s)."""

    def __init__(self, lock: Any) -> None:
        self.lock, self.longest, self._depth, self._since = lock, 0.0, 0, 0.0

    def __enter__(self) -> None:
        self.lock.__enter__()
        self._depth += 1
        if self._depth == 1:
            self._since = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.longest = max(self.longest, time.perf_counter() - self._since)
        self.lock.__exit__(*exc)


@contextmanager
def on_base(lock: Any, served: Any, delta: Delta | None = None) -> Iterator[None]:
    """The model lock, the base model (ServedModel.bare) and the candidate applied, for one chunk of work.

    Taken and given back per chunk, so generation waits for one chunk, not for a whole phase over
    every fact; apply/remove is bit-exact, so the served weights between chunks are the stack's.
    """
    with lock, served.bare():
        if delta is None:
            yield
            return
        delta.apply(served.adapter.model)
        try:
            yield
        finally:
            delta.remove(served.adapter.model)


def consolidate(pipeline: Any, without: Sequence[int] = (), *, actor: str = "", source: str = "cli",
                reason: str = "", dry_run: bool = False, wait: float = 0.0) -> ConsolidationOutcome:
    """Rewrite the served model's applied edits (minus `without`, which are reverted) as one checked delta.

    wait: seconds to wait for an edit in flight (the store lock); 0 refuses at once with
    ConsolidationBusy. Raises BadInput for an id that is not an applied edit of the served
    model and when there is nothing to consolidate; a rejected consolidation is recorded (its
    reasons say which facts it lost or which limit it broke) and changes nothing.
    """
    from kbsync.pipeline import _checks, _Clock, default_actor
    from kbsync.store import StoreLocked

    served = pipeline.load_served_model()
    adapter, audit, store, lock = served.adapter, pipeline.audit, pipeline.store, Holds(pipeline.model_lock)
    start = time.perf_counter()
    try:
        with store.lock(timeout=wait):
            with lock:
                synced = served.sync(audit, store)
            applied = pipeline._applied()
            ids = [e.id for e in applied]
            for w in without:
                if w not in ids:
                    raise BadInput(f"edit {w} is not an applied edit of the served model; nothing to consolidate it out of")
            members = [e for e in applied if e.id not in set(without)]
            if not members and not without:
                raise BadInput("nothing to consolidate: the served model has no applied edits")
            deltas = {e.id: store.load(e) for e in members}
            newest: dict[str, Held] = {}
            for e in members:
                fact = Held(e.id, request_of(e, deltas[e.id]))
                newest.pop(fact.request.prompt, None)
                newest[fact.request.prompt] = fact
            facts = list(newest.values())
            phases: dict[str, float] = {"deltas": time.perf_counter() - start}
            clock = _Clock(phases)
            with clock("stack_answers"):
                before = answers(adapter, facts, lambda: lock)
            with clock("solve"):
                delta = _solve(pipeline, lock, served, members, deltas)
            with clock("repair"):
                delta, repaired = _repair(pipeline, lock, served, delta, [f for f in facts if holds(f, before[f.edit_id])],
                                          {e.id: canonical(e.method) for e in members})
            with clock("judge"):
                outcome = _judge(pipeline, lock, served, delta, facts, before, members, without)
            outcome.edit.metrics["repaired"] = repaired
            row = outcome.edit
            row.actor, row.source = actor or default_actor(), source
            if reason:  # why a person (or the daemon's schedule) asked for it; its own reasons say why it was refused
                row.metrics["reason"] = reason
            row.metrics["seconds"] = round(time.perf_counter() - start, 3)
            row.metrics["phases"] = {k: round(v, 3) for k, v in phases.items()}
            # How long generation waited at most (one chunk of facts, one re-proposal, or one method's solve).
            row.metrics["longest_hold_s"] = round(lock.longest, 3)
            if synced:
                row.metrics["synced"] = synced
            outcome.dry_run = dry_run
            if dry_run:
                row.status = "consolidation" if row.status == "pending" else row.status  # what it would be
                return outcome
            checks = _checks([], [], outcome.retain) if outcome.retain else []  # the retain rows, as an edit's
            if row.status == "rejected":
                outcome.edit = audit.record(row, checks)
                return outcome
            delta.meta.update({"method": "consolidate", BASE_FINGERPRINT: served.base_fingerprint,
                               CONSOLIDATES: [e.id for e in members]})
            outcome.edit = store.commit(
                audit, row, delta, checks,
                finish=lambda rid, rel, sha: audit.finish_consolidation(rid, rel, sha, without, row.actor, source, reason))
            with lock:
                served.sync(audit, store)
            return outcome
    except StoreLocked:
        raise ConsolidationBusy(f"an edit is in flight in {store.root} (its store lock is held); "
                                "consolidate when it is done") from None


def _solve(pipeline: Any, lock: Any, served: Any, members: list[Edit], deltas: dict[int, Delta]) -> Delta:
    """Each method's share of the members consolidated by that method, on the base model, summed."""
    groups: dict[str, list[Delta]] = {}
    for e in members:
        groups.setdefault(canonical(e.method), []).append(deltas[e.id])
    try:
        with lock, served.bare():
            parts = [pipeline.method(name).consolidate(ds) for name, ds in groups.items()]
    finally:
        served.replay()  # a re-solve reset its method's applied-edit state to the base model's
    return Delta.sum(parts)


def _repair(pipeline: Any, lock: Any, served: Any, delta: Delta, held: list[Held], methods: dict[int, str]) -> tuple[Delta, list[int]]:
    """The candidate plus, for each fact the stack held and the candidate misses, that fact edited again on it.

    A kept target vector or gate was made on the stack it joined; on the consolidated model (a joint
    write moves other states too, and a gate's vector sat on the weights of the edits before it) a
    few facts can fall short. Each is proposed again by its own method with the candidate applied,
    and the proposals are added to the candidate. Returns the delta and the repaired edits' ids.
    """
    now = answers(served.adapter, held, lambda: on_base(lock, served, delta))
    missed = [f for f in held if not holds(f, now[f.edit_id])]
    fixes = []
    try:
        for f in missed:  # one proposal per hold: as long as one edit's method phase
            with on_base(lock, served, delta):
                method = pipeline.method(methods[f.edit_id])
                method.on_reset()
                method.on_applied(-1, delta)  # AlphaEdit: the candidate's keys are those to keep
                result = method.propose(f.request)
            if result.success:
                fixes.append((f.edit_id, result.delta))
    finally:
        served.replay()
    if not fixes:
        return delta, []
    out = Delta.sum([delta, *(d for _, d in fixes)])
    out.meta = dict(delta.meta)
    return out, [i for i, _ in fixes]


def _judge(pipeline: Any, lock: Any, served: Any, delta: Delta, facts: list[Held], before: dict[int, str],
           members: list[Edit], without: Sequence[int]) -> ConsolidationOutcome:
    """The candidate on the base model: facts the stack held still held, table facts within the limits."""
    reg, adapter = pipeline.settings.regression, served.adapter
    applied = pipeline._applied()
    # Table facts only: the edited slots (every applied edit's, those left out included) are meant to differ.
    items = [i for i in sample_retain(pipeline.table or default_fact_table(), applied, reg.retain_size + len(applied), reg.seed)
             if not i.origin.startswith("edit:")][:reg.retain_size]
    checks = []
    for i in range(0, len(items), CHUNK):
        with on_base(lock, served):
            chunk = items[i:i + CHUNK]
            checks += measure(adapter, chunk, pipeline.retain_cache.get(adapter, chunk), delta, reg.tie_margin).checks
    retain = RetainReport(checks)
    after = answers(adapter, facts, lambda: on_base(lock, served, delta))
    held = [f for f in facts if holds(f, before[f.edit_id])]
    lost = [f.edit_id for f in held if not holds(f, after[f.edit_id])]
    m = retain.summary()
    reasons = []
    if lost:
        shown = ", ".join(f"edit {i} ({before[i]!r} -> {after[i]!r})" for i in lost[:5])
        reasons.append(f"loses {len(lost)} of the {len(held)} facts the stack held: {shown}"
                       + (" ..." if len(lost) > 5 else ""))
    reasons += retain.broken_limits(reg)
    ids = [e.id for e in members]
    row = Edit(method="consolidate", status="rejected" if reasons else "pending", reasons=reasons,
               question=f"consolidation of {len(ids)} applied edit(s)" + (f" without {', '.join(map(str, without))}"
                                                                          if without else ""),
               metrics={CONSOLIDATES: ids, BASE_FINGERPRINT: served.base_fingerprint, "facts": len(facts),
                        "held_before": len(held), "held_after": sum(holds(f, after[f.edit_id]) for f in facts),
                        "lost": lost, **({"without": list(without)} if without else {}), **m,
                        "delta_bytes": delta.nbytes()},
               thresholds={"max_mean_kl": reg.max_mean_kl, "max_kl": reg.max_kl, "min_unchanged": reg.min_unchanged})
    return ConsolidationOutcome(row, ids, before, after, lost, retain)
