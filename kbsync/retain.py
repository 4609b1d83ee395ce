"""The regression check's retain set: other facts an edit must leave alone, and how much it moved them.

The retain set is sampled reproducibly (seeded) from the fact table, plus the facts of the
edits already applied, which a new edit must keep. Since most retain facts are generic
(the served model may not know them), what must not change is the model's *own* pre-edit
answer: each retain item is scored teacher-forced on (question, pre-edit answer), and the
metrics compare the output distributions at those answer positions before and after the
candidate delta.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from editor.delta import Delta
from kbsync.audit.models import Edit
from kbsync.corpus import FactTable
from kbsync.facts import Relation, default_relations

# Examples per forward pass: keeps [batch, tokens, vocab] log-probs small on a 49k vocabulary.
CHUNK = 16


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

    def summary(self) -> dict[str, float]:
        """The three numbers the thresholds apply to, plus the set size."""
        return {"mean_kl": self.mean_kl, "max_kl": self.max_kl, "unchanged": self.unchanged,
                "retain_size": len(self.checks)}

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
    exclude_key: tuple[str, str] | None = None,
    exclude_prompt: str = "",
    relations: dict[str, Relation] | None = None,
) -> list[RetainItem]:
    """Applied edits' facts (newest first) then a seeded sample of table facts, size items in all.

    Excludes the slot being edited (subject id + property, or the raw prompt) and table facts
    whose slot an applied edit has overwritten (the table's object is no longer the truth).
    """
    relations = relations or default_relations()
    items: list[RetainItem] = []
    seen: set[str] = {exclude_prompt} if exclude_prompt else set()
    overwritten: set[tuple[str, str]] = set()
    for e in reversed(list(applied)):
        key = (e.subject_id, e.property)
        if e.property:
            overwritten.add(key)
        if (exclude_key and e.property and key == exclude_key) or not e.question or e.question in seen:
            continue
        if len(items) < size:
            seen.add(e.question)
            items.append(RetainItem(e.question, is_question(e.question), f"edit:{e.id}"))
    candidates: list[RetainItem] = []
    for f in table.facts:
        rel = relations.get(f.property)
        if rel is None or f.key == exclude_key or f.key in overwritten:
            continue
        q = rel.ask(f.subject.label)
        if q in seen:  # multi-valued relations repeat the same question
            continue
        seen.add(q)
        candidates.append(RetainItem(q, True, f"table:{f.property}:{f.subject.label}"))
    need = max(0, size - len(items))
    items += random.Random(seed).sample(candidates, min(need, len(candidates)))
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


@torch.no_grad()
def measure(adapter: Any, items: Sequence[RetainItem], before: Sequence[str], delta: Delta) -> RetainReport:
    """KL(before || after) and top-1 agreement on (prompt, pre-edit answer) for the candidate delta.

    The edited distribution comes from a functional call with the delta added to the
    parameters, so the live model is never touched; answers are re-generated (with the delta
    applied) only for items whose top-1 changed, to show what they became.
    """
    live = dict(adapter.model.named_parameters())
    edited = {n: live[n] + t.to(live[n].dtype) for n, t in delta.tensors.items()}
    kls = [0.0] * len(items)
    same = [True] * len(items)
    for question, idx in _grouped(items):
        for part in _chunks(idx, CHUNK):
            # An empty pre-edit answer still scores the end-of-answer token.
            batch = adapter.encode([items[i].prompt for i in part], [before[i] for i in part], question=question)
            # answer_logits is what Adapter.log_probs softmaxes; it also gives the aligned answer tokens.
            logits, labels, mask = adapter.answer_logits(batch)
            base = torch.log_softmax(logits.float(), -1)
            new, _ = adapter.log_probs(batch, edited)
            # Same quantity as Adapter.kl, sharing the edited forward pass with the top-1 comparison.
            tok = (base.exp() * (base - new)).sum(-1)
            kl = (tok * mask).sum(1) / mask.sum(1).clamp(min=1)
            # Judge only the tokens the base model itself produces greedily (its argmax is the label):
            # this skips the end-of-answer token of an answer cut at max_new_tokens and re-tokenisation
            # seams, where the base model never committed to a token in the first place.
            own = mask & (base.argmax(-1) == labels)
            agree = ((base.argmax(-1) == new.argmax(-1)) | ~own).all(1)
            for j, i in enumerate(part):
                kls[i], same[i] = max(0.0, float(kl[j])), bool(agree[j])
    after = list(before)
    changed = [i for i in range(len(items)) if not same[i]]
    if changed:
        delta.apply(adapter.model)
        try:
            for i, a in zip(changed, answers(adapter, [items[i] for i in changed])):
                after[i] = a
        finally:
            delta.remove(adapter.model)
    return RetainReport([RetainCheck(items[i], before[i], after[i], kls[i], same[i]) for i in range(len(items))])


def check_dict(c: RetainCheck) -> dict[str, Any]:
    """A retain check as plain data (for JSON output)."""
    return {**asdict(c.item), "before": c.before, "after": c.after, "kl": c.kl, "unchanged": c.unchanged}
