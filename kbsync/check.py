"""Ask the served model about a fact: the question and its paraphrases (or the claim, for classifiers)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kbsync.facts import Prompts
from kbsync.match import match


@dataclass(frozen=True)
class Probe:
    """One prompt put to the model and the answer it should give."""

    kind: str  # question | paraphrase | claim
    prompt: str
    expected: str
    question: bool = True


@dataclass(frozen=True)
class ProbeResult:
    """A probe with the model's answer and the match verdict."""

    kind: str
    prompt: str
    expected: str
    prediction: str
    ok: bool
    rule: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON and the audit log."""
        return asdict(self)


def probes(adapter: Any, prompts: Prompts, target: str | None = None) -> list[Probe]:
    """The probes for a fact: question + paraphrases for generative models, the claim for classifiers."""
    target = target or prompts.target
    if adapter.family == "classifier":
        claim = prompts.claim.replace(prompts.target, target) if target != prompts.target else prompts.claim
        return [Probe("claim", claim, "SUPPORTS", question=False)]
    return [Probe("question", prompts.question, target)] + [
        Probe("paraphrase", p, target) for p in prompts.paraphrases
    ]


def run_probes(adapter: Any, items: list[Probe], aliases: tuple[str, ...] = (), claim_prefix: str = "") -> list[ProbeResult]:
    """Predict every probe (batched by prompt style) and apply the match rules."""
    out: list[ProbeResult] = []
    for question in (True, False):
        group = [p for p in items if p.question == question]
        if not group:
            continue
        preds = adapter.predict([p.prompt for p in group], question=question)
        for p, pred in zip(group, preds):
            m = match(pred, p.expected, aliases, claim_prefix)
            out.append(ProbeResult(p.kind, p.prompt, p.expected, pred, m.ok, m.rule))
    order = {id(p): i for i, p in enumerate(items)}
    key = {(p.kind, p.prompt): order[id(p)] for p in items}
    return sorted(out, key=lambda r: key[(r.kind, r.prompt)])
