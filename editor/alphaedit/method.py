"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of preserved knowledge.

Per layer: dW = R X^T with X = (P (K K^T + K_p K_p^T + w C0) + l2 I)^-1 P K, where P projects onto
the null space of C0 (editor/alphaedit/projector.py), K_p are the keys of the edits already applied
and w (cov_weight, 0 in the paper) adds MEMIT's soft preservation where C0 has no true null space.
The applied keys are this method's state: it follows the served model (on_applied adds an
edit's keys from its delta's extras, on_reset clears them and the applied deltas are replayed),
so a revert, another process's edit or a restart leaves it consistent with the delta store.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from editor.alphaedit.config import AlphaEditOptions
from editor.alphaedit.projector import null_dims, null_space
from editor.delta import Delta
from editor.memit.method import KEYS, Memit
from editor.methods import MethodOptions, register_method


@register_method
class AlphaEdit(Memit):
    """MEMIT's solve restricted to the null space of preserved keys, with earlier edits' keys kept."""

    name: ClassVar[str] = "alphaedit"
    description: ClassVar[str] = "AlphaEdit: null-space constrained locate-and-edit (stacks many edits)"
    options_cls: ClassVar[type[MethodOptions]] = AlphaEditOptions

    def prepare(self) -> None:
        """MEMIT's preparation, then one projector per edited matrix and an empty key state."""
        super().prepare()
        self.projectors = {m: null_space(c, self.options.nullspace_threshold) for m, c in self.cov.items()}
        self.scale = {m: float(torch.trace(c.double())) / c.shape[0] for m, c in self.cov.items()}
        self.applied_keys: dict[str, torch.Tensor] = {}
        self.applied_count = 0

    def null_dims(self) -> dict[str, int]:
        """Per edited matrix, the dimension of the null space its updates are confined to."""
        return {m: null_dims(p) for m, p in self.projectors.items()}

    def on_applied(self, edit_id: int, delta: Delta) -> None:
        """Add the applied edit's keys (from its extras) to those every later update must keep."""
        for name, keys in delta.extras.items():
            if not name.startswith(KEYS):
                continue
            k = keys.double()
            param = name[len(KEYS):]
            self.applied_keys[param] = self.applied_keys.get(param, 0) + k.T @ k
        self.applied_count += 1

    def on_reset(self) -> None:
        """Back to the base model: no applied keys."""
        self.applied_keys = {}
        self.applied_count = 0

    def solve(self, module: str, keys: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(left [d_out, n], right [n, d_in]): R and X^T of AlphaEdit's projected least squares."""
        p = self.projectors[module].double()
        k = keys.double().T
        kept = self.applied_keys.get(self.params[module])
        a = k @ k.T + (kept if kept is not None else 0)
        if self.options.cov_weight:
            a = a + self.options.cov_weight * self.cov[module].double()
        m = p @ a + self.options.l2 * self.scale[module] * torch.eye(p.shape[0], dtype=torch.float64)
        x = torch.linalg.solve(m, p @ k)
        return resid.double().T.float(), x.T.float()
