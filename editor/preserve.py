"""Preservation for any method: project its delta onto the null space of preserved knowledge.

AlphaEdit's idea applied after the fact: a fine-tuning or KnowledgeEditor delta on a weight
matrix is replaced by its projection onto the null space of the covariance of that matrix's
inputs over the statistics corpus (dW P for nn.Linear's [out, in] weights, P dW for Conv1D's
[in, out]), so it no longer moves the outputs for the keys preserved knowledge produces.
Matrices whose module has no statistics (non-linear layers) are left as they are.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from editor.alphaedit.projector import null_space
from editor.delta import Delta
from editor.memit.layer_stats import covariances_for
from editor.methods import EditResult


class Preserver:
    """Null-space projectors for the matrices a method writes, and the projection of its deltas."""

    def __init__(self, adapter: Any, projectors: dict[str, torch.Tensor]) -> None:
        self.adapter = adapter
        self.projectors = projectors  # parameter name -> [d_in, d_in]

    @classmethod
    def for_method(cls, method: Any) -> Preserver:
        """Projectors for the adapter's editable matrices, from the method's cached statistics."""
        adapter, opts = method.adapter, method.options
        params = [n for n, p in adapter.editable().items() if p.dim() == 2]
        modules = sorted({n.rsplit(".", 1)[0] for n in params})
        cov = covariances_for(adapter, method.context, modules, opts.preserve_tokens)
        return cls(adapter, {m + ".weight": null_space(c, opts.preserve_threshold) for m, c in cov.items()})

    @classmethod
    def for_training(cls, adapter: Any, tokens: int, threshold: float) -> Preserver:
        """Projectors for the editable matrices from statistics computed now (editor training has no method cache)."""
        from editor.memit.corpus import stats_texts
        from editor.memit.layer_stats import compute_covariances

        modules = sorted({n.rsplit(".", 1)[0] for n, p in adapter.editable().items() if p.dim() == 2})
        cov = compute_covariances(adapter, modules, stats_texts(adapter, tokens))[0]
        return cls(adapter, {m + ".weight": null_space(c, threshold).to(adapter.device) for m, c in cov.items()})

    def project_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every matrix that has a projector replaced by its null-space projection (differentiable)."""
        out = {}
        for name, t in tensors.items():
            p = self.projectors.get(name)
            if p is None:
                out[name] = t
            elif self.adapter.stores_in_out(name.rsplit(".", 1)[0]):
                out[name] = p.to(t.dtype) @ t
            else:
                out[name] = t @ p.to(t.dtype)
        return out

    def project(self, delta: Delta) -> Delta:
        """The delta with every matrix that has a projector replaced by its null-space projection."""
        return Delta(self.project_tensors(delta.tensors), {**delta.meta, "preserve": "nullspace"}, extras=dict(delta.extras))

    def project_result(self, result: EditResult) -> EditResult:
        """The result with its delta projected (success is re-judged by the caller's checks)."""
        return replace(result, delta=self.project(result.delta), info={**result.info, "preserved": True})
