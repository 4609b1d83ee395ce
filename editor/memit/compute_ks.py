"""Keys: the input of an MLP output matrix at the subject's last token, averaged over the fact's contexts."""

from __future__ import annotations

from typing import Any

import torch

from adapters.hooks import trace
from editor.methods import EditRequest


def contexts(request: EditRequest, prefixes: list[str], paraphrases: bool, prefixed_paraphrases: bool = True) -> list[str]:
    """The prompts a fact is read in: each wording (prompt, then paraphrases if asked) behind each prefix
    (the paraphrases bare only, without prefixed_paraphrases)."""
    out = [f"{pre} {request.prompt}".strip() if pre else request.prompt for pre in prefixes]
    for w in request.paraphrases if paraphrases else ():
        out += [f"{pre} {w}".strip() if pre else w for pre in (prefixes if prefixed_paraphrases else [""])]
    return out


@torch.no_grad()
def read_at_subject(adapter: Any, prompts: list[str], request: EditRequest, modules: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, (input, output) at the subject's last token of each prompt: [n, d_in], [n, d_out]."""
    pos = torch.tensor(adapter.subject_positions(prompts, request.subject, request.question))
    batch = adapter.encode(prompts, [request.taught] * len(prompts), question=request.question)
    with trace(adapter.model, modules) as tr:
        adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    rows = torch.arange(len(prompts))
    return {m: (tr[m].input[rows, pos], tr[m].output[rows, pos]) for m in modules}


def compute_keys(adapter: Any, module: str, requests: list[EditRequest], prefixes: list[str], paraphrases: bool) -> torch.Tensor:
    """One key per request, [n, d_in]: the module's input at the subject, averaged over the contexts."""
    return torch.stack([read_at_subject(adapter, contexts(r, prefixes, paraphrases), r, [module])[module][0].mean(0)
                        for r in requests])


def current_outputs(adapter: Any, layer_module: str, requests: list[EditRequest]) -> torch.Tensor:
    """The residual stream after the target layer at the subject of each bare prompt, [n, d]."""
    return torch.stack([read_at_subject(adapter, [r.prompt], r, [layer_module])[layer_module][1][0] for r in requests])
