"""AlphaEdit's options: MEMIT's, plus the null-space cut and the solve's regulariser."""

from __future__ import annotations

from dataclasses import dataclass

from editor.memit.config import MemitOptions


@dataclass
class AlphaEditOptions(MemitOptions):
    """Null space: eigenvalues of C0 below nullspace_threshold x its mean eigenvalue; l2 in units of that mean."""

    nullspace_threshold: float = 1e-2
    l2: float = 10.0
