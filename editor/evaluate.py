"""Evaluation harness: the paper's Table 1 columns for several edit methods in one run.

Success is reported two ways for generative models: `success_em` is exact match (kbsync's
match rules) of the greedy answer, `success_tf` is token-level accuracy of the new target
under teacher forcing (the convention of EasyEdit's published tables). Retain accuracy, the
same two ways: `retain_acc`, the whole greedy answer (up to max_new_tokens) to each retain
prompt unchanged up to case, punctuation and articles; `retain_tf`, the share of that
prompt's answer tokens whose argmax under teacher forcing is unchanged (EasyEdit's locality),
which counts each changed position once instead of the whole answer as changed (a completion
prompt's answer runs on for max_new_tokens past the fact).
Performance deterioration: 1 - acc(theta')/acc(theta), acc = greedy answers matching the gold
answers of GOLD held-out pairs under the match rules. `known_gold` picks pairs the unedited model
answers correctly, so acc(theta) = 1 and deterioration is the share of known answers an edit
breaks; on pairs the model mostly gets wrong (SmolLM2-135M completes 3 of CounterFact's first 50
locality prompts correctly) the ratio is one or two answers' noise.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from adapters.base import row_kl
from adapters.gates import gated, restoring
from editor.data import EditRecord
from editor.delta import Delta
from editor.methods import PRESERVE, SHRINK, MethodContext, make_method
from kbsync.errors import BadInput
from kbsync.match import match, normalise

# Gold (prompt, answer) pairs for performance deterioration, asked after every edit.
GOLD = 50


@dataclass
class MethodScores:
    """Per-method means over the evaluated edits."""

    method: str
    n: int = 0
    success_em: list[float] = field(default_factory=list)
    success_tf: list[float] = field(default_factory=list)
    retain_acc: list[float] = field(default_factory=list)
    retain_tf: list[float] = field(default_factory=list)
    equiv_em: list[float] = field(default_factory=list)
    equiv_tf: list[float] = field(default_factory=list)
    gold_acc: list[float] = field(default_factory=list)
    retain_kl: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    loops: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)

    def summary(self, base_gold_acc: float) -> dict[str, float]:
        """Means, and performance deterioration 1 - acc(theta')/acc(theta) on the gold set."""
        mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
        gold = mean(self.gold_acc)
        return {
            "method": self.method, "n": self.n,
            "success_em": mean(self.success_em), "success_tf": mean(self.success_tf),
            "retain_acc": mean(self.retain_acc), "retain_tf": mean(self.retain_tf),
            "equiv_em": mean(self.equiv_em), "equiv_tf": mean(self.equiv_tf),
            "deterioration": (1 - gold / base_gold_acc) if base_gold_acc > 0 else float("nan"),
            "retain_kl": mean(self.retain_kl), "latency_s": mean(self.latency), "steps": mean(self.loops),
            "scale": mean(self.scale),
        }


def _em(adapter: Any, prompts: list[str], target: str, question: bool, claim_prefix: str = "") -> list[float]:
    return [float(match(p, target, (), claim_prefix).ok) for p in adapter.predict(prompts, question=question)]


@torch.no_grad()
def _gold_accuracy(adapter: Any, gold: list[tuple[str, str]], question: bool) -> float:
    # Greedy answers under the match rules: a chat model answers "The capital of Peru is Lima.",
    # whose teacher-forced accuracy on the bare gold "Lima" is 0 before any edit.
    if not gold:
        return float("nan")
    preds = adapter.predict([p for p, _ in gold], question=question)
    return sum(match(pred, a).ok for pred, (_, a) in zip(preds, gold)) / len(gold)


def _score(adapter: Any, method: Any, r: EditRecord, scores: MethodScores, gold: list[tuple[str, str]],
           base_retain: list[str], question: bool) -> None:
    """Edit one record on the unedited model, append its scores, and take the edit back."""
    result = method.propose(r.request())
    result.delta.apply(adapter.model)
    try:
        scores.n += 1
        scores.latency.append(result.seconds)
        scores.loops.append(result.steps)
        scores.scale.append(result.info.get("scale", 1.0))
        scores.success_em += _em(adapter, [r.prompt], r.target, r.question, r.claim_prefix)
        tb = adapter.encode([r.prompt], [r.taught], question=r.question)
        scores.success_tf.append(float(adapter.token_accuracy(tb)[0]))
        if r.paraphrases:
            scores.equiv_em += _em(adapter, r.paraphrases, r.target, r.question, r.claim_prefix)
            pb = adapter.encode(r.paraphrases, [r.taught] * len(r.paraphrases), question=r.question)
            scores.equiv_tf += adapter.token_accuracy(pb).tolist()
        if r.retain:
            after = adapter.predict([p for p, _ in r.retain], question=r.question)
            # Same answer up to case, punctuation and articles ("Lima," vs "Lima.").
            scores.retain_acc += [float(normalise(a) == normalise(b)) for a, b in zip(after, base_retain)]
        scores.gold_acc.append(_gold_accuracy(adapter, gold, question))
    finally:
        result.delta.remove(adapter.model)
    if r.retain:
        with torch.no_grad():
            rb = adapter.encode([p for p, _ in r.retain], [a for _, a in r.retain], question=r.question)
            base_logp, mask = adapter.log_probs(rb)
            params = {n: p.detach() + result.delta.tensors[n] for n, p in adapter.model.named_parameters()
                      if n in result.delta.tensors}
            with gated(adapter.model, result.delta.gates):
                new_logp, _ = adapter.log_probs(rb, params)  # one edited pass for both the KL and TF
            rows_of = mask.nonzero()[:, 0]
            scores.retain_kl += row_kl(base_logp[mask], new_logp[mask], rows_of, len(r.retain)).tolist()
            same = (base_logp.argmax(-1) == new_logp.argmax(-1)) & mask
            scores.retain_tf += (same.sum(1) / mask.sum(1).clamp(min=1)).tolist()


def known_gold(adapter: Any, pairs: list[tuple[str, str]], n: int, question: bool, chunk: int = 32,
               scan: int = 40) -> list[tuple[str, str]]:
    """The first n (prompt, answer) pairs whose greedy answer from the unedited model matches.

    Asked chunk by chunk, among at most scan * n pairs (a model that knows almost none of them
    would otherwise be asked the whole data file); may return fewer than n.
    """
    out: list[tuple[str, str]] = []
    pairs = pairs[:scan * n]
    for i in range(0, len(pairs), chunk):
        if len(out) >= n:
            break
        part = pairs[i:i + chunk]
        preds = adapter.predict([p for p, _ in part], question=question)
        out += [pair for pair, pred in zip(part, preds) if match(pred, pair[1]).ok]
    return out[:n]


def base_method(name: str) -> str:
    """A method name without its +shrink / +preserve suffixes."""
    while name.endswith((SHRINK, PRESERVE)):
        name = name.removesuffix(SHRINK).removesuffix(PRESERVE)
    return name


def options_for(options: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """The options given for a method name, looked up without its +shrink / +preserve suffixes."""
    return dict(options.get(base_method(name), {}))


def evaluate(adapter: Any, records: list[EditRecord], methods: list[str], options: dict[str, dict[str, Any]] | None = None,
             gold: list[tuple[str, str]] | None = None, on_edit: Callable[[str, int], None] | None = None,
             on_row: Callable[[list[dict[str, float]], dict[str, Any]], None] | None = None,
             resume: dict[str, Any] | None = None, context: MethodContext | None = None) -> list[dict[str, float]]:
    """Edit every record with every method (each edit alone on the unedited model) and score it.

    Records are the outer loop, so every method has been scored on the same records at any
    moment. After each record on_row gets every method's row over the records so far and the
    run's state (per-edit scores and the unedited gold accuracy); `resume=` that state skips the
    records it covers and carries on, so a run of hours can stop and continue.
    """
    options = options or {}
    question = records[0].question if records else True
    gold = gold if gold is not None else [pair for r in records for pair in r.retain][:GOLD]
    made = [make_method(name, adapter, context, **options_for(options, name)) for name in methods]
    if resume:
        base_gold = float(resume["base_gold"])
        scores = [MethodScores(**s) for s in resume["scores"]]
        if [s.method for s in scores] != list(methods) or len({s.n for s in scores}) != 1:
            raise ValueError("resume: the state is of other methods, or of methods at different records")
    else:
        base_gold = _gold_accuracy(adapter, gold, question)
        scores = [MethodScores(name) for name in methods]
    done = scores[0].n if scores else 0
    for i, r in enumerate(records[done:], start=done):
        # The unedited model's own top-1 answers on the record's retain prompts.
        base_retain = adapter.predict([p for p, _ in r.retain], question=r.question) if r.retain else []
        for name, method, s in zip(methods, made, scores):
            _score(adapter, method, r, s, gold, base_retain, question)
            if on_edit:
                on_edit(name, i)
        if on_row:
            on_row([s.summary(base_gold) for s in scores], {"base_gold": base_gold, "scores": [asdict(s) for s in scores]})
    return [s.summary(base_gold) for s in scores]


def _answers(adapter: Any, prompts: list[str], question: bool, chunk: int = 32) -> list[str]:
    """The model's greedy answer to every prompt, asked chunk by chunk (a stacked run's retain set can be large)."""
    return [a for i in range(0, len(prompts), chunk) for a in adapter.predict(prompts[i:i + chunk], question=question)]


def _answer_argmax(adapter: Any, pairs: list[tuple[str, str]], question: bool, chunk: int = 32) -> list[torch.Tensor]:
    """Per pair, the argmax token at each answer position under teacher forcing (chunked: full-vocab logits)."""
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, len(pairs), chunk):
            part = pairs[i:i + chunk]
            logits, _, mask = adapter.answer_logits(adapter.encode([p for p, _ in part], [a for _, a in part], question))
            out += [row[m] for row, m in zip(logits.argmax(-1), mask)]
    return out


@dataclass
class SequentialBaseline:
    """What a stacked run is scored against, computed once on the unedited model for every method."""

    records: list[EditRecord]
    retain: list[tuple[str, str]]
    base_answers: list[str]
    base_tokens: list[torch.Tensor]
    gold: list[tuple[str, str]]
    base_gold: float

    @property
    def question(self) -> bool:
        """Whether the records are questions (chat) rather than completions."""
        return self.records[0].question if self.records else True


def sequential_baseline(adapter: Any, records: list[EditRecord], gold: list[tuple[str, str]] | None = None) -> SequentialBaseline:
    """The unedited model's answers to the retain prompts no record edits, and its gold accuracy."""
    question = records[0].question if records else True
    edited = {p for r in records for p in (r.prompt, *r.paraphrases)}
    retain = list(dict.fromkeys(pair for r in records for pair in r.retain if pair[0] not in edited))
    gold = [pair for pair in (gold if gold is not None else retain[:GOLD]) if pair[0] not in edited]
    base_answers = _answers(adapter, [p for p, _ in retain], question)
    base_tokens = _answer_argmax(adapter, list(zip([p for p, _ in retain], base_answers)), question)
    return SequentialBaseline(records, retain, base_answers, base_tokens, gold, _gold_accuracy(adapter, gold, question))


def score_stack(adapter: Any, base: SequentialBaseline, done: list[EditRecord]) -> dict[str, float]:
    """The stacked model now: edits so far still answered (each prompt at its last edit), paraphrases, retain, gold."""
    question = base.question
    last = {r.prompt: r for r in done}
    kept = [_em(adapter, [r.prompt], r.target, r.question, r.claim_prefix)[0] for r in last.values()]
    equiv = [x for r in last.values() if r.paraphrases for x in _em(adapter, r.paraphrases, r.target, r.question, r.claim_prefix)]
    edited = {p for r in done for p in (r.prompt, *r.paraphrases)}
    keep = [i for i, (p, _) in enumerate(base.retain) if p not in edited]
    after = _answers(adapter, [base.retain[i][0] for i in keep], question)
    after_tokens = _answer_argmax(adapter, [(base.retain[i][0], base.base_answers[i]) for i in keep], question)
    gold_acc = _gold_accuracy(adapter, base.gold, question)
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    return {
        "kept_em": mean(kept), "equiv_em": mean(equiv),
        "retain_acc": mean([float(normalise(a) == normalise(base.base_answers[i])) for a, i in zip(after, keep)]),
        "retain_tf": mean([float((a == base.base_tokens[i]).float().mean()) for a, i in zip(after_tokens, keep)
                           if len(base.base_tokens[i])]),
        "deterioration": (1 - gold_acc / base.base_gold) if base.base_gold > 0 else float("nan"),
    }


def run_sequential(adapter: Any, method: Any, base: SequentialBaseline, name: str = "",
                   on_edit: Callable[[str, int], None] | None = None, checkpoints: tuple[int, ...] = (),
                   state_dir: Path | None = None, consolidate_every: int = 0) -> dict[str, Any]:
    """One prepared method's edits stacked in order, scored against `base`; the weights restored bit for bit after.

    checkpoints: edit counts after which the stacked model is scored as at the end (the row's
    "curve"). state_dir: every applied delta and the per-edit results are saved there, and a
    run that finds them replays the deltas (through the method's on_applied) and carries on
    from the next edit, so a run of hours can stop at any edit. consolidate_every: after every
    that many edits, the base weights are put back and every fact so far written at once
    (the method's joint(), from the target vectors its deltas kept), as a daemon consolidates.
    """
    name = name or method.name
    if consolidate_every:
        _can_consolidate(name, method)
    targets: dict[str, torch.Tensor] = {}  # prompt -> its last edit's target vector
    params = dict(adapter.model.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"made": [], "seconds": [], "bytes": [], "curve": []}
    log = state_dir / "state.json" if state_dir else None
    if log is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        if log.exists():
            state = json.loads(log.read_text())
    with restoring(adapter.model):  # gates the run's deltas added go with them
        try:
            for i, r in enumerate(base.records):
                if i < len(state["made"]):  # done in an earlier run: replay its delta
                    delta = Delta.load(state_dir / f"{i:05d}.safetensors")
                else:
                    now = adapter.predict([r.prompt], question=r.question)[0]
                    result = method.propose(r.request(original=now))
                    delta = result.delta
                for n in delta.tensors:
                    saved.setdefault(n, params[n].detach().clone())
                delta.apply(adapter.model)
                method.on_applied(i, delta)  # as the served model tells its methods
                if consolidate_every:
                    if hasattr(method, "joint"):
                        targets[r.prompt] = _target_of(delta, method)
                    if (i + 1) % consolidate_every == 0:
                        _consolidate(adapter, method, base.records[:i + 1], targets, saved,
                                     state_dir / f"joint-{i + 1:05d}.safetensors" if state_dir else None)
                if i < len(state["made"]):
                    continue
                state["made"] += _em(adapter, [r.prompt], r.target, r.question, r.claim_prefix)
                state["seconds"].append(result.seconds)
                state["bytes"].append(delta.nbytes())
                if i + 1 in checkpoints and i + 1 < len(base.records):
                    state["curve"].append({"edits": i + 1, **score_stack(adapter, base, base.records[:i + 1])})
                if log is not None:
                    delta.save(state_dir / f"{i:05d}.safetensors")
                    tmp = log.with_suffix(".tmp")
                    tmp.write_text(json.dumps(state))
                    os.replace(tmp, log)  # the delta first: a state that lists an edit always has its file
                if on_edit:
                    on_edit(name, i)
            end = score_stack(adapter, base, base.records)
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    params[n].copy_(w)
            method.on_reset()
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    return {
        "method": name, "n": len(base.records), "success_em": mean(state["made"]), **end,
        "latency_s": mean(state["seconds"]), "bytes_per_edit": mean(state["bytes"]), "retain_n": len(base.retain),
        "gold_n": len(base.gold), "curve": [*state["curve"], {"edits": len(base.records), **end}],
    }


def _can_consolidate(name: str, method: Any) -> None:
    """BadInput unless the method can write many facts at once (a joint write from kept target vectors, or a retraining)."""
    if not hasattr(method, "joint") and not hasattr(method, "retrain"):
        raise BadInput(f"method {name} cannot consolidate (no joint write or retraining); "
                       "consolidate_every needs memit, alphaedit or a fine-tuning method")


def _target_of(delta: Delta, method: Any) -> torch.Tensor:
    """The target vector an applied locate-and-edit delta kept in its extras, [d]."""
    z = method.kept_target(delta)
    if z is None:
        raise BadInput(f"a {method.name} delta without its target vector cannot be consolidated")
    return z


def _consolidate(adapter: Any, method: Any, done: list[EditRecord], targets: dict[str, torch.Tensor],
                 base_weights: dict[str, torch.Tensor], path: Path | None) -> None:
    """Base weights back, then every prompt's last edit written at once (loaded from path when a run replays):
    a joint write of the kept target vectors, or (fine-tuning) the base weights trained on all the facts."""
    params = dict(adapter.model.named_parameters())
    with torch.no_grad():
        for n, w in base_weights.items():
            params[n].copy_(w)
    method.on_reset()
    if path is not None and path.exists():
        joint = Delta.load(path)
    else:
        last = {r.prompt: r for r in done}
        requests = [r.request() for r in last.values()]
        if hasattr(method, "joint"):
            joint = method.joint(requests, torch.stack([targets[p] for p in last]))
        else:
            joint = method.retrain(requests)
        if path is not None:
            joint.save(path)
    for n in joint.tensors:
        base_weights.setdefault(n, params[n].detach().clone())
    joint.apply(adapter.model)
    method.on_applied(-1, joint)


def evaluate_sequential(adapter: Any, records: list[EditRecord], methods: list[str],
                        options: dict[str, dict[str, Any]] | None = None, gold: list[tuple[str, str]] | None = None,
                        on_edit: Callable[[str, int], None] | None = None,
                        context: MethodContext | None = None, checkpoints: tuple[int, ...] = (),
                        state_dir: Path | None = None, consolidate_every: int = 0) -> list[dict[str, float]]:
    """Each method's edits applied one after another, as the daemon stacks them, then scored against the unedited model.

    Every edit is proposed on the model as edited so far, conditioned on its answer then.
    success_em: the edit's prompt answers its target right after it; kept_em: it still does
    after the last edit (a prompt edited again later counts only at its last edit); equiv_em:
    the final edits' paraphrases at the end; retain_acc / retain_tf: the records' retain
    prompts (those no record edits) answered as by the unedited model, whole answer / per
    token; deterioration on the gold set at the end. The model is restored bit for bit after
    each method. checkpoints, state_dir (one folder per method inside) and consolidate_every are
    run_sequential's.
    """
    options = options or {}
    made = [make_method(name, adapter, context, **options_for(options, name)) for name in methods]
    if consolidate_every:  # before any method runs, not after the first of a run of hours
        for name, method in zip(methods, made):
            _can_consolidate(name, method)
    base = sequential_baseline(adapter, records, gold)
    return [run_sequential(adapter, method, base, name, on_edit, checkpoints,
                           state_dir / slug(name) if state_dir else None, consolidate_every)
            for name, method in zip(methods, made)]


def slug(name: str) -> str:
    """A method or configuration name as a folder name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
