"""AlphaEdit's options: MEMIT's, plus the null-space cut and the solve's regulariser."""

from __future__ import annotations

from dataclasses import dataclass

from editor.memit.config import MemitOptions


@dataclass
class AlphaEditOptions(MemitOptions):
    """Null space: eigenvalues of C0 below nullspace_threshold x its mean eigenvalue; l2 in units of that mean."""

    # The paper's cut (1e-2 absolute on an 8B model's 14,336-dim keys, many near-dead) leaves no null
    # space on a small model: SmolLM2's smallest eigenvalue is 4-7% of the mean. At 0.3x the mean
    # about half the key space is null, carrying ~5-9% of the preserved energy (RESULTS.md).
    nullspace_threshold: float = 0.3
    l2: float = 10.0
    # A smaller target vector than MEMIT's paper settings (clamp 4x, loss to 0.05): on SmolLM2, 10
    # stacked edits kept retain tokens 0.90 vs 0.78 and broke 18% vs 26% of known facts (RESULTS.md).
    # On the Namibia claim edit ("The capital of Namibia is Windhoek.") neither stop makes the update
    # take: loss 0.3 ends it "Windhoerz", the per-token stop (v_token_prob 0.5) "Namibia" (RESULTS.md).
    clamp_norm: float = 1.5
    v_loss_stop: float = 0.3
    # MEMIT's soft preservation added to the solve: cov_weight * C0 beside the applied keys. Where
    # C0 has no true null space (no eigenvalue near 0, as in SmolLM2's 1536-wide MLP), the hard
    # projection alone leaves what the cut keeps exposed; with a cut above every eigenvalue
    # (P = I) this is MEMIT with the keys of earlier edits kept.
    cov_weight: float = 0.0
