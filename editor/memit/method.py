"""MEMIT (Meng et al. 2023) for causal LMs: spread one target vector's residual over several MLP matrices.

Steps, one small file each: compute_z (the target vector at the last edited layer), compute_ks
(the keys at each edited layer), layer_stats (the preserved keys' covariance), and here the
closed-form solve per layer. Each layer's update is added before the next layer's keys are
read, as in the authors' code; the model is back to its weights when `edit` returns. The update
of a layer is R K^T A^-1, rank = the number of requests, so it is stored as two factors with the
keys as extras (AlphaEdit accumulates them; a revert takes them out again).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import ClassVar

import torch

from editor.delta import Delta
from editor.memit.compute_ks import compute_keys, current_outputs
from editor.memit.corpus import context_prefixes
from editor.memit.compute_z import compute_target
from editor.memit.config import MemitOptions, target_layers
from editor.memit.layer_stats import covariances_for
from editor.methods import EditMethod, EditRequest, EditResult, MethodOptions, register_method
from kbsync.errors import BadInput

KEYS = "keys/"  # extras name prefix: the keys an edit wrote, per parameter
# Extras name prefix: the target vector at that module's output. Later layers are never edited, so
# it stays a valid target whatever else is applied: a joint re-solve of many edits reuses it.
TARGET = "target/"


@register_method
class Memit(EditMethod):
    """MEMIT: closed-form least squares per layer against the covariance of preserved keys."""

    name: ClassVar[str] = "memit"
    description: ClassVar[str] = "MEMIT locate-and-edit (closed-form update of MLP output matrices)"
    options_cls: ClassVar[type[MethodOptions]] = MemitOptions

    def prepare(self) -> None:
        """Resolve the layers, load (or compute) the statistics and the context prefixes."""
        opts = self.options
        self.layers = target_layers(self.adapter, self.name, opts.layers)
        if opts.position not in ("subject", "last"):
            raise BadInput(f"option position of method {self.name} must be 'subject' or 'last', not {opts.position!r}")
        self.modules = [self.adapter.mlp_out(i) for i in self.layers]
        self.params = {m: m + ".weight" for m in self.modules}
        self.z_module = self.adapter.layer_module(self.layers[-1])
        self.cov = self.statistics(self.modules)
        self.prefixes = [""] + context_prefixes(self.adapter, opts.prefixes, opts.prefix_tokens)
        super().prepare()

    def statistics(self, modules: list[str]) -> dict[str, torch.Tensor]:
        """C0 per module, cached under the base model's fingerprint (computed on base weights if missing)."""
        return covariances_for(self.adapter, self.context, modules, self.options.stats_tokens,
                               compute=self.options.compute_stats)

    # --- the update ---------------------------------------------------------------------

    def solve(self, module: str, keys: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(left [d_out, n], right [n, d_in]) with left @ right = R K^T (K K^T + w C0)^-1."""
        k = keys.double().T  # [d_in, n]
        a = k @ k.T + self.options.mom2_weight * self.cov[module].double()
        right = torch.linalg.solve(a, k).T
        return resid.double().T.float(), right.float()

    def located(self, request: EditRequest) -> EditRequest:
        """The request as edited: at the prompt's last token (position last), else checked to name its subject."""
        if self.options.position == "last":
            return replace(request, subject="")
        if request.subject:  # checked before any work: a one-line error naming the subject
            self.adapter.subject_positions([request.prompt], request.subject, request.question)
        return request

    @contextmanager
    def written(self, requests: list[EditRequest], zs: torch.Tensor) -> Iterator[tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]]:
        """Per layer: keys, residual share, closed-form update, applied for the next layer; live for the block.

        Yields (factors, extras) of the update that moves each request's output at the target layer
        to its row of zs; the weights are restored when the block ends.
        """
        live = dict(self.adapter.model.named_parameters())
        saved = {self.params[m]: live[self.params[m]].detach().clone() for m in self.modules}
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        extras: dict[str, torch.Tensor] = {TARGET + self.z_module: zs.float()}
        try:
            for i, module in enumerate(self.modules):
                keys = compute_keys(self.adapter, module, requests, self.prefixes, self.options.paraphrases)
                cur = current_outputs(self.adapter, self.z_module, requests)
                resid = (zs - cur) / (len(self.modules) - i)
                left, right = self.solve(module, keys, resid)
                name = self.params[module]
                if self.adapter.stores_in_out(module):  # Conv1D keeps [in, out]: the update transposed
                    left, right = right.T.contiguous(), left.T.contiguous()
                factors[name] = (left, right)
                extras[KEYS + name] = keys.float()
                with torch.no_grad():
                    live[name].add_(left @ right)
            yield factors, extras
        finally:
            with torch.no_grad():
                for name, w in saved.items():
                    live[name].copy_(w)

    def edit(self, request: EditRequest) -> EditResult:
        """Target vector at the last edited layer, then the layer-by-layer write of it."""
        start = self.clock()
        request = self.located(request)
        z, _init, info = compute_target(self.adapter, request, self.z_module, self.prefixes, self.options)
        with self.written([request], z[None]) as (factors, extras):
            ok, pred = self.flipped(request)
        delta = Delta({}, {"method": self.name, "layers": self.layers, **info}, factors=factors, extras=extras)
        return EditResult(delta, ok, int(info["z_steps"]), self.clock() - start, pred, info)

    def kept_target(self, delta: Delta) -> torch.Tensor | None:
        """The target vector [d] a delta of this method kept (its last request's), or None if it has none."""
        z = delta.extras.get(TARGET + self.z_module)
        return None if z is None else z.reshape(-1, z.shape[-1])[-1]

    def consolidate(self, deltas: list[Delta]) -> Delta:
        """The joint write, on the base weights, of each prompt's newest fact (requests and target vectors from the deltas).

        Resets the method's applied-edit state (AlphaEdit's kept keys) to the base model's: the
        caller replays the served stack into it afterwards (ServedModel.replay).
        """
        newest: dict[str, tuple[EditRequest, torch.Tensor]] = {}
        for d in deltas:
            z, raw = self.kept_target(d), d.meta.get("request")
            if z is None or raw is None:
                raise BadInput(f"a {self.name} delta without its {'target vector' if z is None else 'request'} "
                               "cannot be re-solved: consolidate without it (--without ID)")
            request = EditRequest.from_dict(raw)
            newest.pop(request.prompt, None)  # the newer fact of the prompt replaces it, in its place in order
            newest[request.prompt] = (request, z)
        self.on_reset()
        delta = self.joint([r for r, _ in newest.values()], torch.stack([z for _, z in newest.values()]))
        delta.meta["joint"] = len(newest)
        return delta

    def joint(self, requests: list[EditRequest], zs: torch.Tensor, scales: torch.Tensor | None = None) -> Delta:
        """One delta writing every request's target vector (rows of zs, from their edits' extras) at once.

        MEMIT's batch solve over the current weights: applied to the base model it replaces a stack
        of one-at-a-time edits of the same facts by one least-squares write of all of them.
        scales: per request, the share of the move from the current output to z to write (the
        scale each edit was shrunk to when applied; default all of it).
        """
        requests = [self.located(r) for r in requests]
        zs = zs.to(torch.float32)
        if scales is not None:
            now = current_outputs(self.adapter, self.z_module, requests)
            zs = now + scales.to(torch.float32)[:, None] * (zs - now)
        with self.written(requests, zs) as (factors, extras):
            pass
        return Delta({}, {"method": self.name, "layers": self.layers, "joint": len(requests)},
                     factors=factors, extras=extras)
