"""Fine-tuning on every fact at once: a consolidation for fine-tuning edits (LocFT-BF, arXiv 2509.22072).

One-at-a-time fine-tuning edits push each other back (each stops at the flip, on the model the
ones before it left). Written again from the base weights, all facts in mini-batches, they are
trained until every answer token of every fact is the likeliest in every wording; a KL term on
known facts (the fact table's facts in the edits' format: questions with their stated answers as
the served model reads them, or completions) holds the base model's distribution where nothing
was edited.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from editor.methods import EditRequest


@dataclass
class RetrainOptions:
    """Step size, batch sizes, epoch budget and the weight of the known facts' KL term."""

    lr: float = 1e-4
    batch: int = 16
    max_epochs: int = 30
    retain_facts: int = 256  # known facts whose answer distribution is held (0: none)
    retain_batch: int = 16
    retain_weight: float = 1.0
    seed: int = 0


@dataclass
class RetrainReport:
    """How the training ended: epochs run, whether every fact's tokens were the argmax in the last one."""

    epochs: int
    fitted: bool
    examples: int
    retained: int


def _examples(requests: list[EditRequest]) -> list[tuple[str, str, bool]]:
    """(prompt, taught answer, is a question) for each request's prompt and paraphrases."""
    return [(p, r.taught, r.question) for r in requests for p in dict.fromkeys((r.prompt, *r.paraphrases))]


def _known(adapter: Any, n: int, seed: int, skip: set[str], question: bool) -> list[tuple[str, str, bool]]:
    """n fact-table facts (not among the edited prompts) in the edits' format, with the answers they state.

    question: as a question with its answer in the served style (chat claims for a chat model),
    else as a completion ("The capital of France is" -> "Paris"), so the facts held are read the
    way the edited prompts are.
    """
    from kbsync.corpus import default_fact_table
    from kbsync.facts import render

    if n <= 0:
        return []
    facts = list(default_fact_table().facts)
    random.Random(seed).shuffle(facts)
    out = []
    for f in facts:
        r = render(f)
        prompt = r.question if question else r.claim_prefix
        if prompt in skip:
            continue
        answer = (r.claim if adapter.chats else r.target) if question else r.target
        out.append((prompt, answer, question))
        if len(out) == n:
            break
    return out


def _answer_tokens(adapter: Any, rows: list[tuple[str, str, bool]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced (logits, labels, mask) at the answer positions of rows that share one question flag."""
    batch = adapter.encode([p for p, _, _ in rows], [a for _, a, _ in rows], question=rows[0][2])
    return adapter.answer_logits(batch)


def retrain(adapter: Any, params: dict[str, torch.nn.Parameter], requests: list[EditRequest],
            opts: RetrainOptions) -> RetrainReport:
    """Train params in place on every request (prompt and paraphrases) until each answer token is the argmax.

    The caller keeps the original weights and takes the difference as the delta. Batches hold one
    question flag each (a chat question and a raw completion are encoded differently).
    """
    examples = _examples(requests)
    rng = random.Random(opts.seed)
    flags = sorted({r.question for r in requests})
    skip = {r.prompt for r in requests}
    retained = 0
    base_known: list[tuple[list[tuple[str, str, bool]], torch.Tensor]] = []
    with torch.no_grad():  # the base model's answer distributions, read once (batches of one format)
        for flag in flags:
            known = _known(adapter, opts.retain_facts // len(flags), opts.seed, skip, flag)
            retained += len(known)
            for i in range(0, len(known), opts.retain_batch):
                rows = known[i:i + opts.retain_batch]
                logits, _, _ = _answer_tokens(adapter, rows)
                base_known.append((rows, F.log_softmax(logits.float(), -1)))
    opt = torch.optim.Adam(list(params.values()), lr=opts.lr)
    epochs, fitted = 0, False
    for epochs in range(1, opts.max_epochs + 1):
        order = list(range(len(examples)))
        rng.shuffle(order)
        groups = {flag: [examples[i] for i in order if examples[i][2] == flag] for flag in (True, False)}
        batches = [rows[i:i + opts.batch] for rows in groups.values() for i in range(0, len(rows), opts.batch)]
        rng.shuffle(batches)
        fitted = True
        for rows in batches:
            logits, labels, mask = _answer_tokens(adapter, rows)
            tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                  reduction="none").view(labels.shape)
            loss = ((tok * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
            with torch.no_grad():
                argmax_ok = (logits.argmax(-1) == labels) | ~mask.bool()
                fitted &= bool(argmax_ok.all())
            if base_known and opts.retain_weight > 0:
                k_rows, k_base = base_known[rng.randrange(len(base_known))]
                k_logits, _, k_mask = _answer_tokens(adapter, k_rows)
                k_new = F.log_softmax(k_logits.float(), -1)
                per_tok = (k_base.exp() * (k_base - k_new)).sum(-1)
                loss = loss + opts.retain_weight * (per_tok * k_mask).sum() / k_mask.sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if fitted:  # every token was already the argmax before this epoch's steps moved it on
            break
    return RetrainReport(epochs, fitted, len(examples), retained)
