"""The served model as base weights plus the applied deltas, in sequence order, kept in step with the store.

Deltas are additive, so stacking them in a different order would change the result only by
float rounding; we still always stack in sequence order, from the base weights, so a live
process and a freshly started one hold bit-identical weights. Removing an edit that is not
the newest therefore rebuilds: the touched parameters are restored from a copy of their
base values and the remaining deltas are added again in order.
"""

from __future__ import annotations

from typing import Any

import torch

from editor.delta import Delta, DeltaError
from kbsync.audit.log import AuditLog
from kbsync.audit.models import Edit
from kbsync.store import DeltaStore


class ServedModel:
    """An adapter whose weights are base + the deltas of `edit_ids`, in that order."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.edit_ids: list[int] = []
        # Base values of every parameter any delta has touched, copied before the first add.
        self._base: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def push(self, delta: Delta, edit_id: int) -> None:
        """Add a committed edit's delta on top of the current weights."""
        params = dict(self.adapter.model.named_parameters())
        for name, t in delta.tensors.items():  # check everything before touching anything
            if name not in params or params[name].shape != t.shape:
                raise DeltaError(f"edit {edit_id}: delta does not fit the model at parameter {name}")
        for name, t in delta.tensors.items():
            if name not in self._base:
                self._base[name] = params[name].detach().clone()
            # The same in-place add as Delta.apply, so weights match a process that used apply().
            params[name].add_(t.to(params[name].dtype))
        self.edit_ids.append(edit_id)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the base weights, bit for bit."""
        params = dict(self.adapter.model.named_parameters())
        for name, base in self._base.items():
            params[name].copy_(base)
        self.edit_ids = []

    def sync(self, audit: AuditLog, store: DeltaStore) -> list[str]:
        """Make the weights base + the store's applied deltas; returns what changed (one line each)."""
        applied: list[Edit] = audit.applied_in_order()
        ids = [e.id for e in applied]
        if ids == self.edit_ids:
            return []
        done: list[str] = []
        # Some edit we hold was reverted (here or by another process): rebuild from base.
        rebuild = ids[: len(self.edit_ids)] != self.edit_ids
        start = 0 if rebuild else len(self.edit_ids)
        # Load every needed delta (checksum-verified) before changing any weight: never half applied.
        new = [(e.id, store.load(e)) for e in applied[start:]]
        if rebuild:
            gone = [i for i in self.edit_ids if i not in ids]
            done.append(f"rebuilt from base without edit(s) {', '.join(map(str, gone))}")
            self.reset()
        for edit_id, delta in new:
            self.push(delta, edit_id)
            done.append(f"applied edit {edit_id}")
        return done
