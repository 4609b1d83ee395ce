"""The served model as base weights plus the applied deltas, in sequence order, kept in step with the store.

Deltas are additive, so stacking them in a different order would change the result only by
float rounding; we still always stack in sequence order, from the base weights, so a live
process and a freshly started one hold bit-identical weights. Removing an edit that is not
the newest therefore rebuilds: the touched parameters are restored from a copy of their
base values and the remaining deltas are added again in order.

Components that keep state derived from the applied edits (a stateful edit method
accumulating the keys of applied edits) register as listeners: they are told of every reset and
every applied edit, with that edit's extras and metadata (`on_reset()`, `on_applied(edit_id,
delta)`; either may be missing), and on registration get the current history replayed, so they
stay consistent across reverts, other processes' edits and restarts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from adapters.gates import bank_for, gates_off, restoring
from editor.delta import Delta, DeltaError
from kbsync.audit.log import AuditLog
from kbsync.audit.models import BASE_FINGERPRINT, CONSOLIDATES, Edit
from kbsync.store import DeltaStore


class ServedModel:
    """An adapter whose weights are base + the deltas of `edit_ids`, in that order."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        # Taken now, while the adapter holds its base weights: per-model caches (edit methods'
        # statistics) are keyed by it and must not change as edits are applied.
        self.base_fingerprint: str = model_fingerprint(adapter.model)
        self.edit_ids: list[int] = []
        # Per applied edit, its extras and meta only: the dense updates are already in the
        # weights, and keeping them would hold a second copy of every edited matrix.
        self.pushed: dict[int, Delta] = {}
        # Base values of every parameter any delta has touched, copied before the first add.
        self._base: dict[str, torch.Tensor] = {}
        self._listeners: list[Any] = []
        self._param_map: dict[str, torch.nn.Parameter] | None = None
        self._module_map: dict[str, torch.nn.Module] | None = None

    def add_listener(self, obj: Any) -> None:
        """Tell obj of every later reset and applied edit, after replaying on_reset and the applied edits in order."""
        self._listeners.append(obj)
        self.replay(obj)

    def replay(self, obj: Any = None) -> None:
        """Tell obj (None: every listener) on_reset, then on_applied of every delta held, in order."""
        for who in [obj] if obj is not None else list(self._listeners):
            _call(who, "on_reset")
            for edit_id in self.edit_ids:
                _call(who, "on_applied", edit_id, self.pushed[edit_id])

    def check_fits(self, delta: Delta, edit_id: int) -> None:
        """DeltaError naming the edit unless it was made for this base model and every tensor fits and is finite."""
        # A delta of another model with the same shapes would stack without complaint and serve
        # neither model's edits. Deltas written before the fingerprint was recorded have none in
        # their metadata: accepted, as they were (only the shapes can be checked for them).
        made_for = delta.meta.get(BASE_FINGERPRINT)
        if made_for and made_for != self.base_fingerprint:
            raise DeltaError(f"edit {edit_id}: its delta was made for base model {made_for}, "
                             f"not this base model {self.base_fingerprint}")
        params = self._params()
        for name, shape in delta.shapes().items():
            if name not in params or tuple(params[name].shape) != shape:
                raise DeltaError(f"edit {edit_id}: delta does not fit the model at parameter {name}")
        hidden = getattr(self.adapter.model.config, "hidden_size", None)
        for module, g in delta.gates.items():  # the module tree is walked only for a delta that has gates
            if module not in self._modules() or (hidden is not None and g.vectors.shape[1] != hidden):
                raise DeltaError(f"edit {edit_id}: delta's gate does not fit the model at module {module}")
        try:
            delta.check_finite()
        except DeltaError as e:
            raise DeltaError(f"edit {edit_id}: {e}") from None

    def _params(self) -> dict[str, torch.nn.Parameter]:
        # Built once: the adapter's parameters are the same objects for its life, and walking the
        # module tree per delta was a fifth of a 1,000-edit start-up.
        if self._param_map is None:
            self._param_map = dict(self.adapter.model.named_parameters())
        return self._param_map

    def _modules(self) -> dict[str, torch.nn.Module]:
        if self._module_map is None:  # built once, like _params
            self._module_map = dict(self.adapter.model.named_modules())
        return self._module_map

    @torch.no_grad()
    def push(self, delta: Delta, edit_id: int, checked: bool = False) -> None:
        """Add a committed edit's delta on top of the current weights (checked: check_fits already passed)."""
        if not checked:
            self.check_fits(delta, edit_id)  # everything before touching anything
        params = self._params()
        for name, t in delta.tensors.items():
            if name not in self._base:
                self._base[name] = params[name].detach().clone()
            # The same in-place add of the same materialised tensor as Delta.apply, so weights
            # match a process that used apply().
            params[name].add_(t.to(device=params[name].device, dtype=params[name].dtype))
        delta.release()  # a factored delta's dense products are in the weights now; keep only its factors
        if delta.gates:
            bank_for(self.adapter.model).add(edit_id, delta.gates)
        self.edit_ids.append(edit_id)
        record = Delta({}, dict(delta.meta), extras=delta.extras, gates=delta.gates)
        self.pushed[edit_id] = record
        for obj in list(self._listeners):
            _call(obj, "on_applied", edit_id, record)

    @contextmanager
    def _base_weights(self) -> Iterator[None]:
        """The base weights in place for the block, then the current ones again."""
        params = self._params()
        current = {n: params[n].detach().clone() for n in self._base}
        try:
            with torch.no_grad():
                for name, base in self._base.items():
                    params[name].copy_(base)
            yield
        finally:
            with torch.no_grad():
                for name, w in current.items():
                    params[name].copy_(w)

    @contextmanager
    def as_base(self) -> Iterator[None]:
        """The base weights in place and no gate firing for the block (statistics are of the base model), then the deltas again."""
        with self._base_weights(), gates_off(self.adapter.model):
            yield

    @contextmanager
    def bare(self) -> Iterator[None]:
        """The base model for the block, whose own gates (a candidate's, applied inside it) do fire; then the deltas again.

        as_base pauses every gate; here only the stack's are taken out, so a consolidated delta can be
        judged on the base model exactly as it would be served. Weights touched inside the block that
        no held delta touched must be restored by the caller (Delta.remove).
        """
        bank = bank_for(self.adapter.model) if any(d.gates for d in self.pushed.values()) else None
        with self._base_weights(), restoring(self.adapter.model) if bank is not None else nullcontext():
            if bank is not None:
                bank.clear()
            yield

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the base weights, bit for bit."""
        params = self._params()
        for name, base in self._base.items():
            params[name].copy_(base)
        for edit_id in self.edit_ids:
            if self.pushed[edit_id].gates:  # a model that never had a gate gets no bank (and no hooks)
                bank_for(self.adapter.model).remove(edit_id)
        self.edit_ids = []
        self.pushed = {}
        for obj in list(self._listeners):
            _call(obj, "on_reset")

    def sync(self, audit: AuditLog, store: DeltaStore) -> list[str]:
        """Make the weights base + the store's stacked deltas of this base model; returns what changed (one line each)."""
        applied: list[Edit] = audit.stack_in_order(self.base_fingerprint)
        ids = [e.id for e in applied]
        if ids == self.edit_ids:
            return []
        done: list[str] = []
        # Some edit we hold was reverted (here or by another process): rebuild from base.
        rebuild = ids[: len(self.edit_ids)] != self.edit_ids
        start = 0 if rebuild else len(self.edit_ids)
        # Load every needed delta (checksum-verified) and check it fits before changing any weight:
        # never half applied, and a refused delta (another base model's) changes nothing.
        new = [(e.id, store.load(e)) for e in applied[start:]]
        for edit_id, delta in new:
            self.check_fits(delta, edit_id)
        if rebuild:
            # Edits a new consolidation stands for are not gone: their facts come back in its delta.
            folded = {i for e in applied if e.status == "consolidation" for i in e.metrics.get(CONSOLIDATES, [])}
            gone = [i for i in self.edit_ids if i not in ids and i not in folded]
            done.append(f"rebuilt from base without edit(s) {', '.join(map(str, gone))}" if gone
                        else "rebuilt from base")
            self.reset()
        kinds = {e.id: e.status for e in applied}
        for edit_id, delta in new:
            self.push(delta, edit_id, checked=True)
            done.append(f"applied consolidation {edit_id}" if kinds[edit_id] == "consolidation"
                        else f"applied edit {edit_id}")
        return done


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (16 hex) over every parameter's name, shape and bytes: names the exact base model."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(p.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _call(obj: Any, method: str, *args: Any) -> None:
    fn = getattr(obj, method, None)
    if fn is not None:
        fn(*args)
