"""AlphaEdit's null-space projector: the directions of key space that preserved knowledge does not use.

P = U U^T over the eigenvectors of C0 = E[k k^T] whose eigenvalue is below `threshold` times
the mean eigenvalue (a scale-free cut, so the setting transfers between models, unlike the
paper's absolute 1e-2 on raw second moments). An update dW with dW P in place of dW leaves the
output for every preserved key k (C0's range) unchanged: dW P k ~ 0.
"""

from __future__ import annotations

import torch


def null_space(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """The projector [d, d] onto C0's eigenvectors with eigenvalue < threshold * mean eigenvalue."""
    vals, vecs = torch.linalg.eigh(cov.double())
    keep = vals < threshold * vals.clamp(min=0).mean()
    u = vecs[:, keep]
    return (u @ u.T).float()


def null_dims(projector: torch.Tensor) -> int:
    """The dimension of the null space a projector keeps (its trace, rounded)."""
    return int(round(float(torch.trace(projector))))
