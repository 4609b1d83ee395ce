"""Fine-tuning baselines: RMSProp on one layer or all layers, and Zhu et al. (2020) with an L-inf ball."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from editor.delta import Delta
from editor.methods import EditMethod, EditRequest, EditResult, MethodOptions, register_method
from kbsync.errors import BadInput


@dataclass
class FineTuneOptions(MethodOptions):
    """RMSProp learning rate, step budget, how often the answer is checked, and Zhu's L-inf radius."""

    lr: float = 1e-5
    max_steps: int = 100
    check_every: int = 5
    linf: float | None = None
    # `kbsync consolidate` of this method's edits: "sum" serves exactly what the stack served;
    # "retrain" fine-tunes the base weights on every fact at once, known facts held by a KL term
    # (editor/finetune_batch.py, LocFT-BF's batch training), for edits that pushed each other back.
    consolidate: str = "sum"
    consolidate_lr: float = 1e-4
    consolidate_epochs: int = 30
    consolidate_retain: int = 256
    consolidate_retain_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.consolidate not in ("sum", "retrain"):
            raise BadInput(f"option consolidate must be 'sum' or 'retrain', not {self.consolidate!r}")


@dataclass
class ZhuOptions(FineTuneOptions):
    """Zhu et al.'s default radius."""

    linf: float | None = 1e-3


@contextmanager
def training(model: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> Iterator[dict[str, torch.Tensor]]:
    """Only params require grad inside the block; yields their original values, restored exactly after."""
    original = {n: p.detach().clone() for n, p in params.items()}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    try:
        yield original
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(original[n])
        for p in params.values():
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)


def trained_delta(params: dict[str, torch.nn.Parameter], original: dict[str, torch.Tensor], meta: dict) -> Delta:
    """The trained weights minus the original, in fp32 (exact for bf16 weights, so base + delta is the trained weight)."""
    return Delta({n: (p.detach().float() - original[n].float()) for n, p in params.items()}, meta)


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
        with training(self.adapter.model, params) as original:
            opt = torch.optim.RMSprop(list(params.values()), lr=lr)
            batch = self.adapter.encode([request.prompt], [request.taught], question=request.question)
            steps, ok, pred = 0, False, ""
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
            delta = trained_delta(params, original, {"method": self.name, "lr": lr, "steps": steps})
        return EditResult(delta, ok, steps, self.clock() - start, pred)

    def consolidate(self, deltas: list[Delta]) -> Delta:
        """The sum of the deltas, or (consolidate = "retrain") the base weights trained on every fact at once."""
        if self.options.consolidate == "sum":
            return super().consolidate(deltas)
        newest: dict[str, EditRequest] = {}
        for d in deltas:
            raw = d.meta.get("request")
            if raw is None:
                raise BadInput(f"a {self.name} delta without its request cannot be retrained: consolidate without it (--without ID)")
            request = EditRequest.from_dict(raw)
            newest.pop(request.prompt, None)  # the newer fact of a prompt replaces the older
            newest[request.prompt] = request
        return self.retrain(list(newest.values()))

    def retrain(self, requests: list[EditRequest]) -> Delta:
        """One dense delta: the editable matrices trained from the current weights on every request at once."""
        from editor.finetune_batch import RetrainOptions, retrain

        opts = self.options
        params = self.params()
        with training(self.adapter.model, params) as original:
            report = retrain(self.adapter, params, requests,
                             RetrainOptions(lr=opts.consolidate_lr, max_epochs=opts.consolidate_epochs,
                                            retain_facts=opts.consolidate_retain,
                                            retain_weight=opts.consolidate_retain_weight))
            delta = trained_delta(params, original, {"method": self.name, "retrained": len(requests),
                                                     "epochs": report.epochs, "fitted": report.fitted})
        return delta


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
