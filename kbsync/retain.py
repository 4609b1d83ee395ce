"""The regression check's retain set: other facts an edit must leave alone, and how much it moved them.

The retain set is sampled reproducibly (seeded) from the fact table, plus the facts of the
edits already applied, which a new edit must keep. Since most retain facts are generic
(the served model may not know them), what must not change is the model's *own* pre-edit
answer: each retain item is scored teacher-forced on (question, pre-edit answer), and the
metrics compare the output distributions at those answer positions before and after the
candidate delta.

Cost. The base side of an item (its pre-edit answer, generated greedily, and the base
model's output at its answer tokens) depends only on the served weights and the item, so it
is computed once per model state and cached (BaseCache: in memory, and on disk under
<data_dir>/retain-cache so a new process reuses it). What is cached is not log-probs but the
adapter's answer_states: for causal LMs the final hidden state at each answer token ([n, 576]
floats on SmolLM2, ~4 MB for 200 items, against ~315 MB for full-vocabulary log-probs);
the (never edited) LM head turns them back into the exact base logits, so the KL is the exact
KL, with no top-k truncation. Scoring an edit is then one pass of the transformer body with the
delta, the head and softmax applied only at answer tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.base import row_kl
from adapters.gates import active, find, firing, gated
from editor.delta import Delta, save_atomically
from kbsync.audit.models import Edit
from kbsync.corpus import FactTable
from kbsync.facts import Relation, default_relations

log = logging.getLogger(__name__)

# Examples per scoring pass: log-probs are formed at answer tokens only ([~8 x CHUNK, vocab]).
CHUNK = 32


@dataclass(frozen=True)
class RetainItem:
    """One prompt whose answer an edit must not change, and where it came from."""

    prompt: str
    question: bool
    origin: str  # "table:P36:Peru" or "edit:12"


@dataclass(frozen=True)
class RetainCheck:
    """A retain item before and after the candidate delta."""

    item: RetainItem
    before: str
    after: str
    kl: float
    unchanged: bool


@dataclass
class RetainReport:
    """Per-item checks and their summary: mean/max KL and the fraction of unchanged top-1 answers."""

    checks: list[RetainCheck]

    @property
    def mean_kl(self) -> float:
        """Mean over items of the per-token KL(before || after)."""
        return sum(c.kl for c in self.checks) / len(self.checks) if self.checks else 0.0

    @property
    def max_kl(self) -> float:
        """The largest item KL."""
        return max((c.kl for c in self.checks), default=0.0)

    @property
    def unchanged(self) -> float:
        """Fraction of items whose greedy answer tokens all stay the top-1 choice."""
        return sum(c.unchanged for c in self.checks) / len(self.checks) if self.checks else 1.0

    @property
    def finite(self) -> bool:
        """Whether every item's KL is a number; a non-finite one is recorded as inf and fails every limit."""
        return all(math.isfinite(c.kl) for c in self.checks)

    def summary(self) -> dict[str, float]:
        """The three numbers the thresholds apply to, plus the set size and whether all KLs were finite."""
        return {"mean_kl": self.mean_kl, "max_kl": self.max_kl, "unchanged": self.unchanged,
                "retain_size": len(self.checks), "finite": self.finite}

    def broken_limits(self, reg: Any) -> list[str]:
        """One reason per regression limit (reg: [regression] settings) this check breaks: mean KL, max KL, unchanged."""
        reasons = []
        if self.mean_kl > reg.max_mean_kl:
            reasons.append(f"mean retain KL {self.mean_kl:.4g} > {reg.max_mean_kl:g}")
        if self.max_kl > reg.max_kl:
            reasons.append(f"max retain KL {self.max_kl:.4g} > {reg.max_kl:g}")
        if self.unchanged < reg.min_unchanged:
            reasons.append(f"unchanged retain answers {self.unchanged:.1%} < {reg.min_unchanged:.1%}")
        return reasons

    def changed(self) -> list[RetainCheck]:
        """The items whose answer changed, worst KL first."""
        return sorted((c for c in self.checks if not c.unchanged), key=lambda c: -c.kl)


def is_question(prompt: str) -> bool:
    """Raw prompts ending in '?' are asked as questions (chat template); others are continued."""
    return prompt.rstrip().endswith("?")


def sample_retain(
    table: FactTable,
    applied: Sequence[Edit],
    size: int,
    seed: int,
    exclude_key: tuple[str, str] | Collection[tuple[str, str]] | None = None,
    exclude_prompt: str | Collection[str] = "",
    relations: dict[str, Relation] | None = None,
) -> list[RetainItem]:
    """Applied edits' facts (newest first) then a seeded sample of table facts, size items in all.

    Excludes the slot(s) being edited (subject id + property, or the raw prompt; one, or a batch's
    several) and table facts whose slot an applied edit has overwritten (the table's object is no
    longer the truth).
    """
    relations = relations or default_relations()
    items: list[RetainItem] = []
    excluded = {exclude_key} if isinstance(exclude_key, tuple) else set(exclude_key or ())
    prompts = [exclude_prompt] if isinstance(exclude_prompt, str) else list(exclude_prompt)
    seen: set[str] = {p for p in prompts if p}
    overwritten: set[tuple[str, str]] = set()
    for e in reversed(list(applied)):
        key = (e.subject_id, e.property)
        if e.property:
            overwritten.add(key)
        if (e.property and key in excluded) or not e.question or e.question in seen:
            continue
        if len(items) < size:
            seen.add(e.question)
            items.append(RetainItem(e.question, is_question(e.question), f"edit:{e.id}"))
    # Shuffle the whole table with the seed before excluding anything, then take the first
    # eligible facts: samples for different edits then differ only in the excluded slots, so
    # the cached base side of the rest is reused (BaseCache keys items by prompt).
    pool: list[tuple[RetainItem, tuple[str, str]]] = []
    asked: set[str] = set()
    for f in table.facts:
        rel = relations.get(f.property)
        if rel is None:
            continue
        q = rel.ask(f.subject.label)
        if q in asked:  # multi-valued relations repeat the same question
            continue
        asked.add(q)
        pool.append((RetainItem(q, True, f"table:{f.property}:{f.subject.label}"), f.key))
    random.Random(seed).shuffle(pool)
    for item, key in pool:
        if len(items) >= size:
            break
        if key in excluded or key in overwritten or item.prompt in seen:
            continue
        seen.add(item.prompt)
        items.append(item)
    return items


def _chunks(seq: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _grouped(items: Sequence[RetainItem]) -> list[tuple[bool, list[int]]]:
    # Questions and plain prompts are rendered differently, so they are batched apart.
    return [(q, [i for i, it in enumerate(items) if it.question == q]) for q in (True, False)]


def answers(adapter: Any, items: Sequence[RetainItem], chunk: int = 4 * CHUNK) -> list[str]:
    """The model's current answer to every item (batched greedy/beam prediction)."""
    out = [""] * len(items)
    for question, idx in _grouped(items):
        for part in _chunks(idx, chunk):
            for i, a in zip(part, adapter.predict([items[i].prompt for i in part], question=question)):
                out[i] = a
    return out


@dataclass(frozen=True)
class BaseItem:
    """The pre-edit side of one retain item: its answer and what scoring needs of the base model.

    states/labels are the adapter's answer_states for (prompt, answer) under the weights the
    item was computed on (for causal LMs the final hidden state at each answer token, [n, D];
    answer_head turns them into the exact base logits), so the KL stays the exact KL.
    """

    answer: str
    states: torch.Tensor
    labels: torch.Tensor
    # adapters.gates.firing over (prompt, answer) when computed: "" when no gated edit fired on it.
    gates: str = ""


def base_side(adapter: Any, items: Sequence[RetainItem]) -> list[BaseItem]:
    """Generate every item's current answer and score it once under the current weights (no cache)."""
    before = answers(adapter, items)
    out: list[BaseItem | None] = [None] * len(items)
    with torch.no_grad():
        for question, idx in _grouped(items):
            for part in _chunks(idx, CHUNK):
                # An empty pre-edit answer still scores the end-of-answer token.
                batch = adapter.encode([items[i].prompt for i in part], [before[i] for i in part], question=question)
                states, labels, rows = adapter.answer_states(batch)
                for j, i in enumerate(part):
                    sel = rows == j
                    out[i] = BaseItem(before[i], states[sel].clone(), labels[sel].clone(),
                                      _firing(adapter, items[i], before[i]))
    return out  # type: ignore[return-value]


def _firing(adapter: Any, item: RetainItem, answer: str) -> str:
    """The gates that fire on the item's prompt and answer (adapters.gates.firing)."""
    return firing(adapter.model, adapter.encode([item.prompt], [answer], question=item.question)["input_ids"])


class BaseCache:
    """Base sides of retain items per model state, in memory and on disk.

    The base side depends only on the served weights and the item, so it is keyed by the
    adapter's fingerprint (editable weights: base + applied deltas) plus a hash of the model
    identity and generation settings, and within that by item (question flag, prompt): the
    sampled set differs a little per edit (the edited slot is left out), so items are shared
    across edits on the same weights. An applied or reverted edit changes the fingerprint, so
    stale entries are never looked up. Gated edits (adapters/gates.py) change no weight: an item
    stays valid while the gates firing on its prompt and answer are those it was computed under
    (BaseItem.gates), so a gated edit recomputes only the items that name its subject. On disk:
    <dir>/<fingerprint>-<settings hash>.safetensors (states and labels per item, answers and
    prompts in the metadata), a few MB for 200 items.
    The metadata holds a sha256 of the items and tensors: a file that fails it (a flipped bit
    read as NaN once passed as "unchanged") or cannot be read is deleted and recomputed.
    """

    KEEP = 8  # model states kept in memory and on disk (most recently used)

    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self._mem: dict[str, dict[tuple[bool, str], BaseItem]] = {}
        self.hits = self.misses = 0

    @staticmethod
    def key(adapter: Any, fingerprint: str | None = None) -> str:
        """fingerprint-settingshash: what the base side of any item depends on besides its prompt."""
        ident = json.dumps([adapter.family, adapter.name, type(adapter).__name__, adapter.chat,
                            adapter.max_new_tokens, adapter.num_beams], default=str)
        return f"{fingerprint or adapter.fingerprint(gates=False)}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"

    def get(self, adapter: Any, items: Sequence[RetainItem], fingerprint: str | None = None) -> list[BaseItem]:
        """The base side of every item, computing (and storing) only the ones not cached for this state."""
        key = self.key(adapter, fingerprint)
        table = self._mem.pop(key, None)
        if table is None:
            table = self._read(key)
        self._mem[key] = table  # most recently used last
        while len(self._mem) > self.KEEP:
            self._mem.pop(next(iter(self._mem)))
        gates_on = active(adapter.model)  # with no gate anywhere every item's signature is ""

        def valid(it: RetainItem) -> bool:
            b = table.get((it.question, it.prompt))
            return b is not None and b.gates == (_firing(adapter, it, b.answer) if gates_on else "")

        missing = [it for it in dict.fromkeys(items) if not valid(it)]
        self.hits += len(items) - len(missing)
        self.misses += len(missing)
        if missing:
            for it, b in zip(missing, base_side(adapter, missing)):
                table[(it.question, it.prompt)] = b
            self._write(key, table)
        return [table[(it.question, it.prompt)] for it in items]

    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}.safetensors" if self.directory else None

    @staticmethod
    def _digest(items: str, tensors: dict[str, torch.Tensor]) -> str:
        """sha256 over the items' JSON and every tensor's name, dtype, shape and bytes."""
        h = hashlib.sha256(items.encode())
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def _read(self, key: str) -> dict[tuple[bool, str], BaseItem]:
        path = self._path(key)
        if path is None or not path.exists():
            return {}
        try:
            from safetensors.torch import load_file, safe_open

            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            items, tensors = metadata["items"], load_file(str(path))
            if metadata.get("sha256") != self._digest(items, tensors):
                raise ValueError("its checksum does not match")
            meta = json.loads(items)
            return {(bool(m[0]), m[1]): BaseItem(m[2], tensors[f"s{i}"], tensors[f"l{i}"], m[3] if len(m) > 3 else "")
                    for i, m in enumerate(meta)}
        except Exception as e:  # corrupt, partial or from an older version: never trust it
            log.warning("retain cache file %s is unreadable (%s: %s); discarding and recomputing it",
                        path, type(e).__name__, e)
            path.unlink(missing_ok=True)
            return {}

    def _write(self, key: str, table: dict[tuple[bool, str], BaseItem]) -> None:
        path = self._path(key)
        if path is None:
            return

        meta, tensors = [], {}
        for i, ((q, p), b) in enumerate(table.items()):
            meta.append([q, p, b.answer, b.gates])
            tensors[f"s{i}"], tensors[f"l{i}"] = b.states.contiguous(), b.labels.contiguous()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        items = json.dumps(meta)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = e.strerror or str(e)
        else:
            why = save_atomically(tensors, path, tmp, {"items": items, "sha256": self._digest(items, tensors)})
        if why:
            # Only a cache (a full disk must not fail the edit that computed it): kept in memory.
            log.warning("cannot write retain cache file %s (%s); using it from memory", path, why)
            return
        files = sorted(path.parent.glob("*.safetensors"), key=lambda f: f.stat().st_mtime)
        for old in files[:-self.KEEP]:
            old.unlink(missing_ok=True)


# Answers re-generated with the delta applied, for display, at most (worst KL first).
REGENERATE = 32


@torch.no_grad()
def measure(adapter: Any, items: Sequence[RetainItem], base: Sequence[BaseItem], delta: Delta,
            tie_margin: float = 0.0) -> RetainReport:
    """KL(before || after) and top-1 agreement on (prompt, pre-edit answer) for the candidate delta.

    tie_margin: only tokens where the base model's top-1 probability exceeds its runner-up by at
    least this much are judged for a changed top-1 (0: every token it produced greedily). The
    answers of applied edits (origin "edit:ID") are judged at every token whatever the margin: a
    near-tie there is where a later edit flips a fact the log says the model holds (the soak
    benchmark found "capital of Brazil: Abuja" turned "Ankara" at KL 0.02, passed as unchanged).

    base: each item's pre-edit side (base_side or BaseCache.get) under the live weights. The
    edited distribution comes from a functional call with the delta added to the parameters,
    so the live model is never touched; only answer positions are scored (adapter.answer_states,
    then the head). Answers are re-generated (with the delta applied) only for items whose top-1
    changed, at most REGENERATE of them (worst KL first; the rest keep after == "").
    """
    before = [b.answer for b in base]
    if not all(bool(torch.isfinite(t).all()) for t in [*delta.tensors.values(), *(g.vectors for g in delta.gates.values())]):
        # A NaN or inf weight poisons every output (peft's safe_merge refuses such merges too):
        # every item counts as changed with KL inf, and the model is not run with it.
        return RetainReport([RetainCheck(items[i], before[i], "", math.inf, False) for i in range(len(items))])
    live = dict(adapter.model.named_parameters())
    edited = {n: live[n] + t.to(live[n].dtype) for n, t in delta.tensors.items()}
    kls = [0.0] * len(items)
    same = [True] * len(items)
    # A delta of gates alone adds nothing to an input where none of its patterns occurs: the model is
    # the live one there, bit for bit (KL 0, same answer), so only the items that name its subject are
    # run (on SmolLM2 the check of a gated edit took 48 s for 200 items, nearly all of them untouched).
    scored = list(range(len(items))) if delta.tensors or not delta.gates else _named(adapter, items, base, delta)
    if scored:
        sub_kls, sub_same = [0.0] * len(scored), [True] * len(scored)
        with gated(adapter.model, delta.gates):  # a gated delta changes outputs, not parameters
            _score_items(adapter, [items[i] for i in scored], [base[i] for i in scored], edited, tie_margin,
                         sub_kls, sub_same)
        for j, i in enumerate(scored):
            kls[i], same[i] = sub_kls[j], sub_same[j]
    after = [b.answer for b in base]
    changed = [i for i in range(len(items)) if not same[i]]
    for i in changed:
        after[i] = ""
    changed = sorted(changed, key=lambda i: -kls[i])[:REGENERATE]
    if changed:
        delta.apply(adapter.model)
        try:
            for i, a in zip(changed, answers(adapter, [items[i] for i in changed])):
                after[i] = a
        finally:
            delta.remove(adapter.model)
    return RetainReport([RetainCheck(items[i], before[i], after[i], kls[i], same[i]) for i in range(len(items))])


def _named(adapter: Any, items: Sequence[RetainItem], base: Sequence[BaseItem], delta: Delta) -> list[int]:
    """The items whose prompt or base answer holds one of the gated delta's patterns (where it fires)."""
    patterns = [list(p) for g in delta.gates.values() for p, _ in g.patterns()]
    out = []
    for i, (it, b) in enumerate(zip(items, base)):
        ids = adapter.encode([it.prompt], [b.answer], question=it.question)["input_ids"]
        if len(find(ids, patterns)[0]):
            out.append(i)
    return out


def _score_items(adapter: Any, items: Sequence[RetainItem], base: Sequence[BaseItem], edited: dict[str, torch.Tensor],
                 tie_margin: float, kls: list[float], same: list[bool]) -> None:
    """Fill kls and same per item: KL(base || edited) on the answer tokens and whether no clear top-1 flipped."""
    for question, idx in _grouped(items):
        for part in _chunks(idx, CHUNK):
            batch = adapter.encode([items[i].prompt for i in part], [base[i].answer for i in part], question=question)
            states, labels, rows = adapter.answer_states(batch, edited)
            if not torch.equal(labels, torch.cat([base[i].labels for i in part])):
                raise RuntimeError("retain base side does not match the answer tokens (stale cache?)")
            base_lp = torch.log_softmax(adapter.answer_head(torch.cat([base[i].states for i in part])).float(), -1)
            new_lp = torch.log_softmax(adapter.answer_head(states).float(), -1)
            # Same quantity as Adapter.kl: per-token KL(base || edited), averaged over each item's answer tokens.
            kl = row_kl(base_lp, new_lp, rows, len(part))
            # Judge only the tokens the base model itself produces greedily (its argmax is the label):
            # this skips the end-of-answer token of an answer cut at max_new_tokens and re-tokenisation
            # seams, where the base model never committed to a token in the first place.
            top = base_lp.argmax(-1)
            two = base_lp.exp().topk(2, -1).values
            margins = torch.tensor([0.0 if items[i].origin.startswith("edit:") else tie_margin for i in part],
                                   device=rows.device)
            clear = (two[:, 0] - two[:, 1]) >= margins[rows].to(device=two.device, dtype=two.dtype)
            flipped = (top == labels) & clear & (top != new_lp.argmax(-1))
            bad = torch.zeros(len(part), dtype=torch.long).index_add_(0, rows, flipped.long())
            for j, i in enumerate(part):
                value = float(kl[j])
                # max(0.0, nan) is 0.0: a NaN KL would pass as "no change". Non-finite fails instead.
                if math.isfinite(value):
                    kls[i], same[i] = max(0.0, value), not bool(bad[j])
                else:
                    kls[i], same[i] = math.inf, False


def check_dict(c: RetainCheck) -> dict[str, Any]:
    """A retain check as plain data (for JSON output)."""
    return {**asdict(c.item), "before": c.before, "after": c.after, "kl": c.kl, "unchanged": c.unchanged}
