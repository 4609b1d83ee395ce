"""Fine-tuning baselines: RMSProp on one layer or all layers, and Zhu et al. (2020) with an L-inf ball."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from editor.delta import Delta
from editor.methods import EditMethod, EditRequest, EditResult, MethodOptions, register_method


@dataclass
class FineTuneOptions(MethodOptions):
    """RMSProp learning rate, step budget, how often the answer is checked, and Zhu's L-inf radius."""

    lr: float = 1e-5
    max_steps: int = 100
    check_every: int = 5
    linf: float | None = None


@dataclass
class ZhuOptions(FineTuneOptions):
    """Zhu et al.'s default radius."""

    linf: float | None = 1e-3


class FineTune(EditMethod):
    """RMSProp on the edit loss until the prediction flips (checked every few steps) or max_steps."""

    name: ClassVar[str] = "ft-layer"
    description: ClassVar[str] = "fine-tune the editable matrices (one layer range) with RMSProp"
    options_cls: ClassVar[type[MethodOptions]] = FineTuneOptions

    def params(self) -> dict[str, torch.nn.Parameter]:
        """The parameters this baseline trains."""
        return self.adapter.editable()

    def edit(self, request: EditRequest) -> EditResult:
        """Train in place, record the change as a Delta, then restore the original weights exactly."""
        opts = self.options
        lr, max_steps, check_every, radius = opts.lr, opts.max_steps, max(1, opts.check_every), opts.linf
        params = self.params()
        start = self.clock()
        original = {n: p.detach().clone() for n, p in params.items()}
        frozen = [p for p in self.adapter.model.parameters() if p.requires_grad]
        for p in self.adapter.model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.RMSprop(list(params.values()), lr=lr)
        batch = self.adapter.encode([request.prompt], [request.taught], question=request.question)
        steps, ok, pred = 0, False, ""
        try:
            while steps < max_steps:
                loss = self.adapter.loss(batch, label_smoothing=0.0)
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
                if radius is not None:
                    with torch.no_grad():  # project back onto the L-inf ball around the original weights
                        for n, p in params.items():
                            p.copy_(torch.maximum(torch.minimum(p, original[n] + radius), original[n] - radius))
                if steps % check_every == 0 or steps == max_steps:
                    ok, pred = self.flipped(request)
                    if ok:
                        break
            # In fp32: the difference of two bf16 weights is exact there, so base + delta is the trained weight.
            delta = Delta({n: (p.detach().float() - original[n].float()) for n, p in params.items()},
                          {"method": self.name, "lr": lr, "steps": steps})
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(original[n])
            for p in frozen:
                p.requires_grad_(True)
        return EditResult(delta, ok, steps, self.clock() - start, pred)


@register_method
class FineTuneLayer(FineTune):
    """Fine-tuning of the configured editable layer range."""

    name: ClassVar[str] = "ft-layer"


@register_method
class FineTuneAll(FineTune):
    """Fine-tuning of every weight matrix in every layer (not embeddings, norms or biases)."""

    name: ClassVar[str] = "ft-all"
    description: ClassVar[str] = "fine-tune all layers' weight matrices with RMSProp"

    def params(self) -> dict[str, torch.nn.Parameter]:
        """All 2-D weights inside transformer layers."""
        return {n: p for n, p in self.adapter.model.named_parameters()
                if p.dim() == 2 and self.adapter.layer_of(n) is not None}


@register_method
class Zhu(FineTune):
    """Zhu et al. 2020: fine-tuning with the weights projected onto an L-inf ball of radius delta."""

    name: ClassVar[str] = "zhu"
    description: ClassVar[str] = "fine-tuning constrained to an L-inf ball around the original weights"
    options_cls: ClassVar[type[MethodOptions]] = ZhuOptions
