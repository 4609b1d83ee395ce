"""A named, reversible weight delta: apply to and remove from a live model, save as safetensors.

A delta holds, per parameter, either a dense additive update or low-rank factors (param +=
left @ right, as locate-and-edit methods produce: ~8 KB instead of ~3.5 MB per matrix), plus
"extras": tensors that travel with the delta (e.g. an edit's key vectors) but are never added
to the model, and "gates" (adapters/gates.py): vectors added to a module's output only at the tokens
that name a subject, fired by the model's gate bank while the delta is applied. `tensors` always
gives the dense update of every parameter, materialising factors once, so callers that only add
or inspect updates need not know how they are stored (gates are not in it: see adapters/gates.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from adapters.gates import GateSet, bank_for
from kbsync.errors import KbsyncError

# File keys. Parameter names never contain "::", so a key with it is never a dense update.
LEFT = "factor.left::"
RIGHT = "factor.right::"
EXTRA = "extra::"
GATE_VECTORS = "gate.vectors::"
GATE_IDS = "gate.ids::"
GATE_ROWS = "gate.rows::"
SEP = "::"


class DeltaError(KbsyncError):
    """A delta that cannot be loaded or does not fit the model."""


def save_atomically(tensors: Mapping[str, torch.Tensor], path: Path, tmp: Path, metadata: dict[str, str]) -> str:
    """Write a safetensors file via tmp and one rename; on failure remove tmp and return why ("" on success).

    A full disk or a failing device must leave no partial file taking what room there is.
    """
    try:
        save_file(dict(tensors), str(tmp), metadata=metadata)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
    except (OSError, SafetensorError) as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
    return ""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def materialise(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right in float32, bit for bit the same whatever the BLAS library or thread count."""
    left, right = left.detach().float(), right.detach().float()
    if left.shape[1] == 0:
        return torch.zeros(left.shape[0], right.shape[1], dtype=torch.float32, device=left.device)
    # One rank-1 term at a time with separate multiply and add (never a BLAS matmul or an
    # FMA): each element is then the same fixed sequence of IEEE roundings everywhere, where a
    # GEMM's result depends on its kernel, blocking and threads. The first term is the start
    # (not zeros + it): one pass fewer over the matrix, which is most of a rank-one product's cost.
    out = left[:, 0, None] * right[None, 0, :]
    for k in range(1, left.shape[1]):
        out.add_(left[:, k, None] * right[None, k, :])
    return out


class Delta:
    """Parameter name -> additive update (dense or factored), extras that are never applied, and metadata."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | None = None,
        meta: Mapping[str, Any] | None = None,
        *,
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
        gates: Mapping[str, GateSet] | None = None,
    ) -> None:
        self.dense: dict[str, torch.Tensor] = dict(tensors or {})
        self.gates: dict[str, GateSet] = dict(gates or {})
        for name, g in self.gates.items():
            if (g.vectors.ndim != 2 or g.ids.ndim != 2 or g.rows.ndim != 1 or g.ids.shape[0] != g.rows.shape[0]
                    or bool((g.rows < 0).any()) or bool((g.rows >= g.vectors.shape[0]).any())):
                raise DeltaError(f"gates for {name} are malformed: vectors {tuple(g.vectors.shape)}, "
                                 f"patterns {tuple(g.ids.shape)}, rows {tuple(g.rows.shape)}")
        # The caller's dict itself, as before factors existed (callers update result.delta.meta).
        self.meta: dict[str, Any] = meta if isinstance(meta, dict) else dict(meta or {})
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.extras: dict[str, torch.Tensor] = dict(extras or {})
        for name, pair in (factors or {}).items():
            if name in self.dense:
                raise DeltaError(f"delta has both a dense and a factored update for {name}")
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise DeltaError(f"factors for {name} must be a (left, right) pair")
            left, right = pair
            if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
                raise DeltaError(f"factors for {name} do not multiply: left {tuple(left.shape)}, "
                                 f"right {tuple(right.shape)}")
            self.factors[name] = (left, right)
        self._tensors: dict[str, torch.Tensor] | None = None
        self._backup: dict[str, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return (f"Delta(dense={sorted(self.dense)}, factors={sorted(self.factors)}, "
                f"extras={sorted(self.extras)}, gates={sorted(self.gates)}, meta={self.meta!r})")

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Name -> dense update of every updated parameter (factors materialised once, in float32)."""
        if self._tensors is None:
            self._tensors = {**self.dense, **{n: materialise(*lr) for n, lr in self.factors.items()}}
        return self._tensors

    def release(self) -> None:
        """Drop the materialised copies of the factored updates (rebuilt, bit for bit, when next needed)."""
        self._tensors = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each updated parameter, without materialising factors."""
        out = {n: tuple(t.shape) for n, t in self.dense.items()}
        out.update({n: (left.shape[0], right.shape[1]) for n, (left, right) in self.factors.items()})
        return out

    def _stored(self) -> Iterable[tuple[str, str, torch.Tensor]]:
        for n, t in self.dense.items():
            yield n, n, t
        for n, (left, right) in self.factors.items():
            yield n, LEFT + n, left
            yield n, RIGHT + n, right
        for k, t in self.extras.items():
            yield f"extra {k}", EXTRA + k, t
        for m, g in self.gates.items():
            yield f"gate {m}", GATE_VECTORS + m, g.vectors
            yield f"gate {m}", GATE_IDS + m, g.ids
            yield f"gate {m}", GATE_ROWS + m, g.rows

    def nbytes(self) -> int:
        """Bytes of what is stored: dense updates, factors and extras (not materialised copies)."""
        return sum(t.numel() * t.element_size() for _, _, t in self._stored())

    def check_finite(self) -> None:
        """Raise DeltaError naming the first parameter (or extra) whose stored tensor has NaN or inf."""
        for what, _, t in self._stored():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DeltaError(f"delta for {what} has NaN or inf values")
        # Finite factors can still overflow when multiplied. Each product element is a sum of rank
        # terms, each at most max|left| * max|right|: under float32's largest value that bound proves
        # the product finite without forming it (a start-up with 1,000 deltas would otherwise
        # materialise every one twice). Only factors that fail the bound are multiplied out.
        for n, (left, right) in self.factors.items():
            if left.numel() == 0 or right.numel() == 0:
                continue
            bound = float(left.detach().abs().max().double()) * float(right.detach().abs().max().double()) * left.shape[1]
            if bound < torch.finfo(torch.float32).max / 2:
                continue
            product = self._tensors[n] if self._tensors is not None else materialise(left, right)
            if not bool(torch.isfinite(product).all()):
                raise DeltaError(f"delta for {n} has NaN or inf values (its factors' product overflows)")

    @property
    def applied(self) -> bool:
        """Whether this delta is currently applied (and holds the weights it replaced)."""
        return self._backup is not None

    def norm(self) -> float:
        """Frobenius norm over all updates (factored ones exactly, without materialising)."""
        total = torch.zeros((), dtype=torch.float64)
        for t in self.dense.values():
            total += (t.detach().double() ** 2).sum().cpu()
        for left, right in self.factors.values():
            # ||L R||^2 = sum((L^T L) * (R R^T)): r x r products instead of the out x in matrix.
            lf, rf = left.detach().float().double(), right.detach().float().double()
            total += ((lf.T @ lf) * (rf @ rf.T)).sum().clamp(min=0).cpu()
        for g in self.gates.values():
            total += (g.vectors.detach().double() ** 2).sum().cpu()
        return float(torch.sqrt(total))

    def scaled(self, factor: float) -> Delta:
        """A copy with every update multiplied by factor (factored: left only; gated: the vectors); extras unchanged."""
        return Delta({k: v * factor for k, v in self.dense.items()}, dict(self.meta),
                     factors={n: (left * factor, right) for n, (left, right) in self.factors.items()},
                     extras=self.extras, gates={m: g.scaled(factor) for m, g in self.gates.items()})

    def __add__(self, other: Delta) -> Delta:
        """The sum of two deltas: factored + factored stays factored (ranks concatenated), else dense."""
        dense: dict[str, torch.Tensor] = {}
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        mine, theirs = self.shapes(), other.shapes()
        for n in sorted(mine.keys() | theirs.keys()):
            a, b = self.factors.get(n), other.factors.get(n)
            if n in mine and n in theirs and mine[n] != theirs[n]:
                raise DeltaError(f"cannot add deltas for {n}: shapes {mine[n]} and {theirs[n]}")
            if a is not None and b is not None:
                factors[n] = (torch.cat([a[0], b[0]], dim=1), torch.cat([a[1], b[1]], dim=0))
            elif n in mine and n in theirs:
                dense[n] = self.tensors[n] + other.tensors[n]
            elif a is not None or b is not None:
                factors[n] = a if a is not None else b  # type: ignore[assignment]
            else:
                dense[n] = self.dense[n] if n in self.dense else other.dense[n]
        extras = dict(self.extras)
        for k, t in other.extras.items():
            extras[k] = torch.cat([extras[k], t], dim=0) if k in extras else t
        gates = dict(self.gates)
        for m, g in other.gates.items():
            gates[m] = gates[m] + g if m in gates else g
        return Delta(dense, {**self.meta, **other.meta}, factors=factors, extras=extras, gates=gates)

    @staticmethod
    def sum(deltas: Iterable[Delta]) -> Delta:
        """The sum of many deltas, added in pairs (a fold would copy the growing gate sets n times)."""
        parts = list(deltas)
        if not parts:
            return Delta()
        while len(parts) > 1:
            parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
        return parts[0]

    def _params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        params = dict(model.named_parameters())
        for name, shape in self.shapes().items():
            if name not in params:
                raise DeltaError(f"delta names parameter {name!r}, which the model does not have")
            if tuple(params[name].shape) != shape:
                raise DeltaError(f"delta for {name} has shape {shape}, model has {tuple(params[name].shape)}")
        return params

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        """Add the update in place, keeping the replaced weights so remove() is exact."""
        if self.applied:
            raise DeltaError("delta is already applied")
        params = self._params(model)
        self.check_finite()  # never merge NaN: refuse before any weight changes
        self._backup = {n: params[n].detach().clone() for n in self.tensors}
        for name, t in self.tensors.items():
            params[name].add_(t.to(device=params[name].device, dtype=params[name].dtype))
        if self.gates:
            bank_for(model).add(self, self.gates)

    @torch.no_grad()
    def remove(self, model: torch.nn.Module) -> None:
        """Restore the weights this delta replaced, bit for bit."""
        if self._backup is None:
            raise DeltaError("delta is not applied")
        params = self._params(model)
        for name, old in self._backup.items():
            params[name].copy_(old)
        if self.gates:
            bank_for(model).remove(self)
        self._backup = None

    def save(self, path: str | Path) -> str:
        """Write safetensors (metadata as JSON) and return the file's sha256."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tensors: dict[str, torch.Tensor] = {}
        storages: set[int] = set()
        for _, key, t in self._stored():
            t = t.detach().contiguous().cpu()
            # safetensors refuses tensors that share memory (e.g. extras sliced from one tensor).
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr in storages:
                t = t.clone()
            storages.add(ptr)
            tensors[key] = t
        why = save_atomically(tensors, path, tmp, {"kbsync": json.dumps(self.meta, default=str)})
        if why:
            raise DeltaError(f"cannot write delta file {path}: {why}")
        return sha256_file(path)

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None) -> Delta:
        """Read a delta, verifying its checksum when one is given."""
        path = Path(path)
        if not path.exists():
            raise DeltaError(f"delta file {path} is missing")
        if sha256 is not None and sha256_file(path) != sha256:
            raise DeltaError(f"delta file {path} does not match its recorded sha256 (tampered or corrupt)")
        try:
            stored = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("kbsync", "{}"))
            return cls._from_keys(stored, meta)
        except (SafetensorError, OSError, ValueError, DeltaError) as e:
            why = " ".join(str(e).split())
            raise DeltaError(f"delta file {path} is corrupt: {why}") from None

    @classmethod
    def _from_keys(cls, stored: dict[str, torch.Tensor], meta: dict[str, Any]) -> Delta:
        dense: dict[str, torch.Tensor] = {}
        lefts: dict[str, torch.Tensor] = {}
        rights: dict[str, torch.Tensor] = {}
        extras: dict[str, torch.Tensor] = {}
        gate_parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in stored.items():
            if SEP not in key:
                dense[key] = t
            elif key.startswith(LEFT):
                lefts[key[len(LEFT):]] = t
            elif key.startswith(RIGHT):
                rights[key[len(RIGHT):]] = t
            elif key.startswith(EXTRA):
                extras[key[len(EXTRA):]] = t
            elif key.startswith((GATE_VECTORS, GATE_IDS, GATE_ROWS)):
                kind, _, module = key.partition(SEP)
                gate_parts.setdefault(module, {})[kind] = t
            else:
                raise DeltaError(f"unknown key {key!r}")
        for name in sorted(lefts.keys() ^ rights.keys()):
            raise DeltaError(f"factor for {name} has a {'left' if name in lefts else 'right'} "
                             f"but no {'right' if name in lefts else 'left'}")
        gates = {}
        for module, parts in gate_parts.items():
            if len(parts) != 3:
                raise DeltaError(f"gates for {module} lack {', '.join(sorted({'gate.vectors', 'gate.ids', 'gate.rows'} - parts.keys()))}")
            gates[module] = GateSet(parts["gate.vectors"], parts["gate.ids"].long(), parts["gate.rows"].long())
        return cls(dense, meta, factors={n: (lefts[n], rights[n]) for n in lefts}, extras=extras, gates=gates)
