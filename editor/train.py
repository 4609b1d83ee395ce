"""Train the KnowledgeEditor hyper-network under a retain-set constraint (Lagrangian relaxation).

Objective (paper Sec. 4): minimise the new fact's loss at theta + dtheta over x-hat in P^x,
subject to C <= m, where C is the KL between the original and edited output distributions
on retain inputs (or ||dtheta||^2 for the C_L2 variant). The multiplier lam >= 0 is trained by
gradient ascent with its own learning rate; when validation success exceeds 90% the margin m
is multiplied by 0.8 until it reaches its floor.

Sequence training (TrainConfig.sequence > 0) trains the editor to compose: each step's edits are
made at the weights earlier edits of their stream left, and the loss also asks those earlier
edits to hold (Trainer.train_step).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from adapters.base import row_kl
from editor.data import EditRecord
from editor.hypernet import (HyperConfig, HyperNetwork, build_hypernet, condition_text, edit_gradients,
                             edited_weights, encode_conditions, load_editor, predict_delta, save_editor)


@dataclass
class TrainConfig:
    """Optimisation settings of the hyper-network."""

    steps: int = 1000
    batch: int = 8
    lr: float = 3e-4
    lagrange_lr: float = 1e-1
    lagrange_init: float = 0.0  # starting multiplier (the paper's code starts it at 1)
    batch_retain: bool = False  # also constrain the KL on the batch's other edit prompts (paper: the other batch inputs)
    margin: float = 1e-2
    margin_floor: float = 1e-3
    anneal: float = 0.8
    constraint: str = "kl"  # kl | l2
    paraphrases: bool = False  # KE + P^x: supervise the paraphrases too
    eval_every: int = 50
    eval_size: int = 32
    checkpoint_every: int = 100
    seed: int = 0
    # Train on sequences (RLEdit's setting, Li et al. ICML 2025): each of `batch` streams applies the
    # editor's own updates to the model, `sequence` edits in a row, so the editor learns updates that
    # hold where earlier ones already are. 0: the paper's objective, one edit on the unedited model.
    sequence: int = 0
    lookback: int = 4  # earlier edits of the stream whose (paraphrase) losses are re-scored each step
    discount: float = 0.9  # an earlier edit's loss counts discount ** (its age in edits)
    max_seconds: float = 0.0  # stop and checkpoint after this much wall time (0: run to `steps`)
    eval_sequence: int = 0  # validate stacking over this many validation edits (0: `sequence`'s length)
    # Project every predicted update onto the null space of preserved knowledge (editor/preserve.py,
    # AlphaEdit's projector) before it is scored, so the editor learns updates that survive it.
    preserve: bool = False
    preserve_tokens: int = 20000
    preserve_threshold: float = 1e-2


@dataclass
class Stream:
    """One sequence of edits during sequence training: the updates applied so far and their records."""

    applied: dict[str, torch.Tensor]
    history: list[EditRecord]


class RecordCache:
    """Per record, what stays fixed during training: tokenised batches (with the hidden states below
    the editable layers, adapter.with_prefix, so scoring runs only the layers an edit changes) and
    the unedited model's retain log-probs."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self._edit: dict[tuple[int, bool], dict[str, torch.Tensor]] = {}
        self._retain: dict[int, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}

    def edit_batch(self, record: EditRecord, paraphrases: bool) -> dict[str, torch.Tensor]:
        """The prompt (and paraphrases, if asked) with the new target; row 0 is the prompt itself."""
        key = (id(record), paraphrases)
        if key not in self._edit:
            prompts = [record.prompt] + (record.paraphrases if paraphrases else [])
            batch = self.adapter.encode(prompts, [record.taught] * len(prompts), question=record.question)
            self._edit[key] = self.adapter.with_prefix(batch)
        return self._edit[key]

    def gradient_batch(self, record: EditRecord, paraphrases: bool = False) -> dict[str, torch.Tensor]:
        """The prompt alone with the new target (the editor's gradient input): row 0 of the edit batch.

        Right padding and causal attention make the row's extra padding inert, so no second
        (prefix) forward pass is needed for it.
        """
        return {k: v[:1] if v.dim() else v for k, v in self.edit_batch(record, paraphrases).items()}

    @torch.no_grad()
    def retain(self, record: EditRecord) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The retain batch and the base model's answer_states on it (small: hidden states, not log-probs)."""
        if id(record) not in self._retain:
            rb = self.adapter.encode([p for p, _ in record.retain], [a for _, a in record.retain], question=record.question)
            rb = self.adapter.with_prefix(rb)
            self._retain[id(record)] = (rb, self.adapter.answer_states(rb)[0])
        return self._retain[id(record)]


def answer_kl(adapter: Any, batch: dict[str, torch.Tensor], base_states: torch.Tensor,
              params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example KL(base || edited) averaged over answer tokens, [B], from cached base answer_states."""
    states, _, rows = adapter.answer_states(batch, params)
    base_lp = torch.log_softmax(adapter.answer_head(base_states).float(), -1)
    new_lp = torch.log_softmax(adapter.answer_head(states).float(), -1)
    return row_kl(base_lp, new_lp, rows, batch["labels"].shape[0])


def lookback_loss(cache: RecordCache, earlier: list[tuple[EditRecord, int]], delta: dict[str, torch.Tensor],
                  cfg: TrainConfig, label_smoothing: float) -> torch.Tensor:
    """Sum over (record, age) of discount**age x its edit loss at the weights `delta` leaves, over the count."""
    params = edited_weights(cache.adapter, delta)
    losses = [cfg.discount ** age * cache.adapter.loss(cache.edit_batch(r, cfg.paraphrases), params=params,
                                                       label_smoothing=label_smoothing)
              for r, age in earlier]
    return torch.stack(losses).sum() / len(losses)


def record_losses(cache: RecordCache, record: EditRecord, delta: dict[str, torch.Tensor], cfg: TrainConfig,
                  label_smoothing: float, others: list[EditRecord] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(edit loss on x-hat in P^x, constraint C) for one record and its predicted delta.

    The KL runs over the record's retain pairs and, with cfg.batch_retain, over the other
    records' prompts in the batch with their original answers (each a different input).
    """
    adapter = cache.adapter
    params = edited_weights(adapter, delta)
    loss = adapter.loss(cache.edit_batch(record, cfg.paraphrases), params=params, label_smoothing=label_smoothing)
    if cfg.constraint == "l2":
        return loss, sum((d ** 2).sum() for d in delta.values())
    kls = []
    if record.retain:
        rb, base_states = cache.retain(record)
        kls.append(answer_kl(adapter, rb, base_states, params))
    if cfg.batch_retain and others:
        seen = {record.prompt} | {p for p, _ in record.retain}
        pairs = []
        for o in others:
            if o.prompt not in seen and o.original:
                seen.add(o.prompt)
                pairs.append((o.prompt, o.original))
        if pairs:
            ob = adapter.encode([p for p, _ in pairs], [a for _, a in pairs], question=record.question)
            with torch.no_grad():
                base_logp = adapter.log_probs(ob)[0]
            kls.append(adapter.kl(ob, base_logp, params=params))
    if not kls:
        return loss, torch.zeros((), device=loss.device)
    return loss, torch.cat(kls).mean()


Projection = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _same(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return tensors


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(1, len(xs))


def _scores(adapter: Any, records: list[EditRecord], params: dict[str, torch.Tensor]) -> tuple[list[float], list[float]]:
    """At params, per record: 1.0 if all its answer tokens are the argmax (teacher forcing); per record with retain pairs: their KL."""
    hits, kls = [], []
    for r in records:
        batch = adapter.encode([r.prompt], [r.taught], question=r.question)
        hits.append(float(adapter.token_accuracy(batch, params)[0] == 1.0))
        if r.retain:
            rb = adapter.encode([p for p, _ in r.retain], [a for _, a in r.retain], question=r.question)
            base_logp, _ = adapter.log_probs(rb)
            kls.append(float(adapter.kl(rb, base_logp, params).mean()))
    return hits, kls


@torch.no_grad()
def validate(net: HyperNetwork, adapter: Any, records: list[EditRecord], project: Projection = _same) -> dict[str, float]:
    """One application per record on the unedited model: success (all answer tokens argmax under teacher forcing) and retain KL."""
    hits, kls = [], []
    for r in records:
        h, k = _scores(adapter, [r], edited_weights(adapter, project(predict_delta(net, adapter, r.request())[0])))
        hits += h
        kls += k
    return {"success": _mean(hits), "retain_kl": _mean(kls)}


@torch.no_grad()
def validate_sequence(net: HyperNetwork, adapter: Any, records: list[EditRecord], project: Projection = _same) -> dict[str, float]:
    """The records edited one after another, each at the weights the earlier ones left.

    kept: the fraction whose prompt's answer is still the argmax under teacher forcing after the
    last; final_kl: the retain KL against the unedited model at the end.
    """
    applied: dict[str, torch.Tensor] = {}
    for r in records:
        step = project(predict_delta(net, adapter, r.request(), edited_weights(adapter, applied) if applied else None)[0])
        applied = {n: applied.get(n, 0) + d for n, d in step.items()}
    kept, kls = _scores(adapter, records, edited_weights(adapter, applied))
    return {"kept": _mean(kept), "final_kl": _mean(kls)}


class Trainer:
    """Owns the hyper-network, its optimiser, the multiplier and the margin; resumable from out_dir."""

    def __init__(self, adapter: Any, records: list[EditRecord], out_dir: str | Path,
                 cfg: TrainConfig | None = None, hyper: HyperConfig | None = None) -> None:
        self.adapter, self.cfg = adapter, cfg or TrainConfig()
        self.out = Path(out_dir)
        rng = random.Random(self.cfg.seed)
        records = list(records)
        rng.shuffle(records)
        n_val = min(self.cfg.eval_size, max(1, len(records) // 10))
        self.val, self.train = records[:n_val], records[n_val:] or records
        self.rng = rng
        torch.manual_seed(self.cfg.seed)
        for p in adapter.model.parameters():
            p.requires_grad_(False)
        state = self.out / "trainer.json"
        resuming = state.exists() and self.checkpoint.exists()
        self.net = self._saved_net(hyper) if resuming else build_hypernet(adapter, hyper)
        self.trainable = [p for p in self.net.parameters() if p.requires_grad]  # not the frozen embeddings
        self.opt = torch.optim.Adam(self.trainable, lr=self.cfg.lr)
        self.step, self.lam, self.margin = 0, self.cfg.lagrange_init, self.cfg.margin
        self.cache = RecordCache(adapter)
        self.project: Projection = _same
        if self.cfg.preserve:
            from editor.preserve import Preserver

            self.project = Preserver.for_training(adapter, self.cfg.preserve_tokens, self.cfg.preserve_threshold).project_tensors
        # Sequence training's streams start empty, also on resume (the applied updates are not saved).
        self.streams = [Stream({}, []) for _ in range(self.cfg.batch)] if self.cfg.sequence else []
        if resuming:
            self._resume(state)

    @property
    def checkpoint(self) -> Path:
        """The editor weights written at every checkpoint (what the `ke` method loads)."""
        return self.out / "editor.safetensors"

    def _saved_net(self, hyper: HyperConfig | None) -> HyperNetwork:
        # The checkpoint's own architecture, whatever `hyper` says now (an older run, other sizes);
        # what is not architecture (the loss's label smoothing, the text length) may change on resume.
        net = load_editor(self.checkpoint, self.adapter)
        if hyper is not None:
            net.cfg.label_smoothing, net.cfg.max_len = hyper.label_smoothing, hyper.max_len
        return net

    def _resume(self, state: Path) -> None:
        s = json.loads(state.read_text())
        opt_path = self.out / "optimizer.pt"
        if opt_path.exists():
            self.opt.load_state_dict(torch.load(opt_path, weights_only=True))
        self.step, self.lam, self.margin = s["step"], s["lam"], s["margin"]
        self.rng.seed(self.cfg.seed + self.step)

    def save(self, metrics: dict[str, float] | None = None) -> None:
        """Checkpoint weights (safetensors), optimiser and trainer state."""
        self.out.mkdir(parents=True, exist_ok=True)
        save_editor(self.net, self.checkpoint, {"step": self.step, "train": asdict(self.cfg), "metrics": metrics or {}})
        torch.save(self.opt.state_dict(), self.out / "optimizer.pt")
        (self.out / "trainer.json").write_text(json.dumps({"step": self.step, "lam": self.lam, "margin": self.margin}))

    def train_step(self) -> dict[str, float]:
        """One Lagrangian step over a batch of edits; returns its metrics.

        With cfg.sequence, edit i of the batch is the next edit of stream i: its gradient is read
        at the weights the stream's earlier edits left, its losses are scored there plus its own
        update, up to cfg.lookback earlier edits of the stream must still hold (discounted by
        age), and the retain KL is against the unedited model, so it bounds the whole sequence.
        """
        self.net.train()
        batch = [self.rng.choice(self.train) for _ in range(self.cfg.batch)]
        applied = [s.applied for s in self.streams] or [{} for _ in batch]
        grads = [edit_gradients(self.adapter, r.prompt, r.taught, r.question, self.net.cfg.label_smoothing,
                                params=edited_weights(self.adapter, a) if a else None,
                                batch=self.cache.gradient_batch(r, self.cfg.paraphrases)) for r, a in zip(batch, applied)]
        ids, mask = encode_conditions(self.adapter, [condition_text(r.original, r.taught, r.prompt) for r in batch], self.net.cfg.max_len)
        deltas = [self.project(d) for d in self.net(ids, mask, grads)]
        totals = [{n: a[n] + d[n] for n in d} if a else d for a, d in zip(applied, deltas)]
        losses, cons = zip(*(record_losses(self.cache, r, t, self.cfg, self.net.cfg.label_smoothing, batch)
                             for r, t in zip(batch, totals)))
        loss, con = torch.stack(losses).mean(), torch.stack(cons).mean()
        back = self._lookback(totals)
        # Against the unedited model, the k-th edit of a stream may have moved the retain set k
        # edits' worth: one edit's margin would leave the sequence no room but to stop editing.
        budget = self.margin * (sum(len(s.history) + 1 for s in self.streams) / len(self.streams)) if self.streams else self.margin
        total = loss + back + self.lam * (con - budget)
        self.opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.opt.step()
        # Gradient ascent on the multiplier, kept >= 0.
        self.lam = max(0.0, self.lam + self.cfg.lagrange_lr * (float(con.detach()) - budget))
        self.step += 1
        self._advance(batch, totals)
        out = {"step": self.step, "loss": float(loss.detach()), "constraint": float(con.detach()), "lambda": self.lam, "margin": self.margin}
        if self.streams:
            out["lookback"] = float(back.detach())
        return out

    def _lookback(self, totals: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The mean over streams of their earlier edits' discounted losses at the stream's new weights."""
        terms = []
        for s, t in zip(self.streams, totals):
            if s.history and self.cfg.lookback > 0:
                picks = self.rng.sample(range(len(s.history)), min(self.cfg.lookback, len(s.history)))
                earlier = [(s.history[i], len(s.history) - i) for i in picks]
                terms.append(lookback_loss(self.cache, earlier, t, self.cfg, self.net.cfg.label_smoothing))
        device = self.adapter.device
        return torch.stack(terms).sum() / len(self.streams) if terms else torch.zeros((), device=device)

    def _advance(self, batch: list[EditRecord], totals: list[dict[str, torch.Tensor]]) -> None:
        """Apply each stream's new update; a stream that reached cfg.sequence edits starts over."""
        for s, r, t in zip(self.streams, batch, totals):
            if len(s.history) + 1 >= self.cfg.sequence:
                s.applied, s.history = {}, []
            else:
                s.applied = {n: v.detach() for n, v in t.items()}
                s.history.append(r)

    def run(self, on_step: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
        """Train until cfg.steps, validating, annealing the margin and checkpointing on the way."""
        self.out.mkdir(parents=True, exist_ok=True)
        log = open(self.out / "metrics.jsonl", "a")
        metrics: dict[str, float] = {}
        started = time.monotonic()
        try:
            while self.step < self.cfg.steps:
                t = time.perf_counter()
                metrics = self.train_step()
                metrics["seconds"] = time.perf_counter() - t
                if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                    self.net.eval()
                    val = validate(self.net, self.adapter, self.val, self.project)
                    if self.cfg.eval_sequence or self.cfg.sequence:
                        stacked = self.val[: self.cfg.eval_sequence or self.cfg.sequence]
                        val.update(validate_sequence(self.net, self.adapter, stacked, self.project))
                    metrics.update({f"val_{k}": v for k, v in val.items()})
                    if val["success"] > 0.9 and self.margin > self.cfg.margin_floor:
                        self.margin = max(self.cfg.margin_floor, self.margin * self.cfg.anneal)
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                    self.save(metrics)
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                if on_step:
                    on_step(metrics)
                if self.cfg.max_seconds and time.monotonic() - started > self.cfg.max_seconds:
                    self.save(metrics)
                    break
        finally:
            log.close()
        return metrics
