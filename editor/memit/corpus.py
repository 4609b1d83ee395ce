"""The statistics corpus, built on the machine: known facts in the served format plus the model's own text.

MEMIT and AlphaEdit estimate the covariance of an MLP matrix's inputs over 100k Wikipedia
samples (an 18 GB download their users complain about). Here it is built offline from what the
model should keep: the shipped fact table's questions and answers, rendered exactly as the
served model sees them (chat template or QA format), and text the model generates from varied
seeds, so the preserved directions are the model's own typical activations.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from kbsync.corpus import default_fact_table
from kbsync.facts import get_relation

SEEDS = (
    "The", "In 1990,", "Once upon a time", "The history of", "Scientists have found", "My favourite",
    "The city of", "Here is a recipe", "According to the report,", "def main():", "Dear friend,",
    "The best way to", "In the morning", "The president said", "Water is", "A new study",
    "The river", "When I was young", "Football is", "The museum",
)
QUESTIONS = (
    "Tell me about yourself.", "What is the weather like today?", "Write a short poem about the sea.",
    "How do I cook rice?", "What is 12 times 7?", "Give me a tip for learning a language.",
    "Who wrote Hamlet?", "Explain photosynthesis briefly.", "What is the largest planet?",
    "Summarise the plot of Cinderella.",
)


def fact_texts(adapter: Any, limit: int | None = None, seed: int = 0) -> list[str]:
    """Known facts as the served model reads them: the rendered question followed by its claim answer."""
    facts = list(default_fact_table().facts)
    random.Random(seed).shuffle(facts)
    out = []
    for f in facts[:limit]:
        rel = get_relation(f.property)
        question, claim = rel.ask(f.subject.label), rel.state(f.subject.label, f.object.label)
        answer = claim if adapter.chats else f.object.label
        out.append(adapter.render(question, True) + " " + answer)
    return out


def generated_texts(adapter: Any, n: int, tokens: int = 48, seed: int = 0, batch: int = 16,
                    progress: Callable[[int, int], None] | None = None) -> list[str]:
    """The model's own sampled continuations of varied seeds (plain text and, for chat models, answers)."""
    gen = torch.Generator().manual_seed(seed)
    starts = [adapter.render(q, True) if adapter.chats and i % 2 else s
              for i, (s, q) in enumerate(zip(SEEDS * (n // len(SEEDS) + 1), QUESTIONS * (n // len(QUESTIONS) + 1)))][:n]
    tok = adapter.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[str] = []
    for i in range(0, len(starts), batch):
        part = starts[i:i + batch]
        enc = [tok(t, add_special_tokens=False)["input_ids"] for t in part]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, x in enumerate(enc):
            ids[j, width - len(x):] = torch.tensor(x)
            mask[j, width - len(x):] = 1
        with torch.random.fork_rng(), torch.no_grad():  # seeded sampling without touching the caller's RNG
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            res = adapter.model.generate(input_ids=ids.to(adapter.device), attention_mask=mask.to(adapter.device),
                                         max_new_tokens=tokens, do_sample=True, top_k=50, temperature=1.0, pad_token_id=pad)
        texts = tok.batch_decode(res[:, width:].cpu(), skip_special_tokens=True)
        out += [s + t for s, t in zip(part, texts)]
        if progress:
            progress(len(out), len(starts))
    return out


def stats_texts(adapter: Any, tokens: int, seed: int = 0, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """About `tokens` token positions of text: half known facts, half the model's generations."""
    facts = fact_texts(adapter, seed=seed)
    per_fact = max(1, sum(len(adapter.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in facts[:20]) // 20)
    n_facts = min(len(facts), max(1, tokens // 2 // per_fact))
    n_gen = max(1, (tokens - n_facts * per_fact) // 64)
    return facts[:n_facts] + generated_texts(adapter, n_gen, seed=seed, progress=progress)


def context_prefixes(adapter: Any, n: int, tokens: int) -> list[str]:
    """Short texts the model writes itself, put before a prompt (MEMIT's context templates); seeded."""
    if n <= 0:
        return []
    texts = generated_texts(adapter, n, tokens=tokens, seed=1)
    return [" ".join(t.replace("\n", " ").split()) + "." for t in texts][:n] if texts else list(SEEDS[:n])
