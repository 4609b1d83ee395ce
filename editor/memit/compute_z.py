"""The target vector: what the residual stream after the last edited layer should hold at the subject.

MEMIT's step 1: a vector delta added to that layer's output at the subject's last token is
optimised so that the model answers the new target in every context (and, here, every
paraphrase of the question), while a KL term keeps the subject's other properties ("{subject}
is a") where they were and a norm clamp keeps the change in scale with the hidden state.
Only delta has a gradient; the model's weights are left untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from adapters.hooks import edit_output
from editor.memit.compute_ks import contexts
from editor.memit.config import TargetOptions
from editor.methods import EditRequest

# ids [b, t] -> (rows, positions) where the target vector is added.
FireAt = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _kept(adapter: Any, request: EditRequest) -> tuple[Any, torch.Tensor] | None:
    """(encoded keep prompts with the live model's answers, the subject's position in each), or None if none apply."""
    subject = request.subject.strip()
    prompts = [p for p in request.keep if subject and subject.lower() in p.lower()]
    if not prompts:
        return None
    answers = adapter.predict(prompts, question=request.question)
    pairs = [(p, a) for p, a in zip(prompts, answers) if a.strip()]
    if not pairs:
        return None
    ps = [p for p, _ in pairs]
    batch = adapter.encode(ps, [a for _, a in pairs], question=request.question)
    return batch, torch.tensor(adapter.subject_positions(ps, subject, request.question))


def compute_target(adapter: Any, request: EditRequest, layer_module: str, prefixes: list[str],
                   opts: TargetOptions, fire_at: FireAt | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(z, the current vector it replaces, info): both [d] at the bare prompt's subject token.

    fire_at: where the vector is added in a batch of ids, (rows, positions); default the subject's
    last token of each prompt. A gated edit fires wherever its patterns occur, also in a styled
    answer that names the subject again ("The official language of Ghana is ..."), so it is
    optimised where it will fire.
    """
    prompts = contexts(request, prefixes, opts.paraphrases, opts.prefixed_paraphrases)
    batch = adapter.encode(prompts, [request.taught] * len(prompts), question=request.question)
    pos = torch.tensor(adapter.subject_positions(prompts, request.subject, request.question))
    rows = torch.arange(len(prompts))
    essence_prompt = f"{request.subject} is a" if request.subject else request.prompt
    ess_ids = torch.tensor([adapter._prompt_ids(essence_prompt, False)], device=adapter.device)
    ess_pos = torch.tensor(adapter.subject_positions([essence_prompt], request.subject, False))
    ess_rows = torch.arange(1)

    kept = _kept(adapter, request) if opts.keep_weight > 0 else None
    keep_at = (torch.arange(len(kept[1])), kept[1]) if kept is not None else None
    if fire_at is not None:
        rows, at = fire_at(batch["input_ids"])
        ess_rows, ess_pos = fire_at(ess_ids)
        keep_at = fire_at(kept[0]["input_ids"]) if kept is not None else None
    else:
        at = pos

    where: dict[str, Any] = {}
    delta = torch.zeros(adapter.model.config.hidden_size, device=adapter.device, requires_grad=True)

    def add(h: torch.Tensor) -> torch.Tensor:
        r, p = where["rows"], where["pos"]
        out = h.clone()
        out[r, p] = out[r, p] + delta.to(h.dtype)
        return out

    def essence_logp() -> torch.Tensor:
        where.update(rows=ess_rows, pos=ess_pos)
        logits = adapter.model(input_ids=ess_ids, use_cache=False).logits
        return F.log_softmax(logits[0, -1].float(), -1)

    params = [p for p in adapter.model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        from adapters.hooks import trace

        with torch.no_grad(), trace(adapter.model, [layer_module]) as tr:
            adapter.model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1], use_cache=False)
            init = tr[layer_module].output[0, pos[0]].clone()
        if kept is not None:
            with torch.no_grad():
                k_logits, _, k_mask = adapter.answer_logits(kept[0])
                base_keep = F.log_softmax(k_logits.float(), -1)
        with edit_output(adapter.model, layer_module, add):
            with torch.no_grad():
                base_ess = essence_logp()
            # Scale-free rate: v_lr per unit of the hidden state's RMS (hidden scales differ by 100x between models).
            opt = torch.optim.Adam([delta], lr=opts.v_lr * float(init.norm()) / init.numel() ** 0.5)
            max_norm = opts.clamp_norm * init.norm()
            nll = torch.tensor(float("inf"))
            steps = 0
            for steps in range(1, opts.v_steps + 1):
                where.update(rows=rows, pos=at)
                logits, labels, mask = adapter.answer_logits(batch)
                tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                      reduction="none").view(labels.shape)
                nll = ((tok * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
                # Every target token at or above v_token_prob in every context: with 0.5 it is the
                # argmax, so the greedy answer is the target there, without pushing the mean loss to 0.
                worst = float(tok[mask.bool()].max().detach()) if mask.any() else 0.0
                kl = F.kl_div(essence_logp(), base_ess, log_target=True, reduction="sum")
                keep_kl = torch.zeros(())
                if kept is not None:
                    # The subject's other answers, token by token, with the changed vector there too.
                    where.update(rows=keep_at[0], pos=keep_at[1])
                    new_keep = F.log_softmax(adapter.answer_logits(kept[0])[0].float(), -1)
                    per_tok = (base_keep.exp() * (base_keep - new_keep)).sum(-1)
                    keep_kl = (per_tok * k_mask).sum() / k_mask.sum().clamp(min=1)
                wd = opts.v_weight_decay * delta.norm() ** 2 / init.norm() ** 2
                loss = nll + opts.kl_factor * kl + opts.keep_weight * keep_kl + wd
                # Stop once the target holds, but not while the subject's other answers are still off
                # where they were (an early stop would leave them where the first steps pushed them).
                kept_still = kept is None or float(keep_kl.detach()) <= opts.keep_stop
                if kept_still and (float(nll.detach()) < opts.v_loss_stop
                                   or (opts.v_token_prob and worst < -math.log(opts.v_token_prob))):
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
    finally:
        for p in params:
            p.requires_grad_(True)
    return (init + delta).detach(), init, {"z_steps": steps, "z_nll": float(nll.detach()), "z_norm_ratio": float(delta.detach().norm() / init.norm())}
