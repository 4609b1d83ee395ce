"""A named, reversible weight delta: apply to and remove from a live model, save as safetensors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kbsync.errors import KbsyncError


class DeltaError(KbsyncError):
    """A delta that cannot be loaded or does not fit the model."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Delta:
    """Parameter name -> additive update, plus metadata (method, fact, metrics...)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    _backup: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def applied(self) -> bool:
        """Whether this delta is currently applied (and holds the weights it replaced)."""
        return self._backup is not None

    def norm(self) -> float:
        """Frobenius norm over all tensors."""
        return float(torch.sqrt(sum((t.double() ** 2).sum() for t in self.tensors.values())))

    def scaled(self, factor: float) -> Delta:
        """A copy with every tensor multiplied by factor."""
        return Delta({k: v * factor for k, v in self.tensors.items()}, dict(self.meta))

    def __add__(self, other: Delta) -> Delta:
        names = set(self.tensors) | set(other.tensors)
        zero = torch.zeros(())
        return Delta(
            {n: self.tensors.get(n, zero) + other.tensors.get(n, zero) for n in sorted(names)},
            {**self.meta, **other.meta},
        )

    def _params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        params = dict(model.named_parameters())
        for name, t in self.tensors.items():
            if name not in params:
                raise DeltaError(f"delta names parameter {name!r}, which the model does not have")
            if params[name].shape != t.shape:
                raise DeltaError(
                    f"delta for {name} has shape {tuple(t.shape)}, model has {tuple(params[name].shape)}"
                )
        return params

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        """Add the update in place, keeping the replaced weights so remove() is exact."""
        if self.applied:
            raise DeltaError("delta is already applied")
        params = self._params(model)
        self._backup = {n: params[n].detach().clone() for n in self.tensors}
        for name, t in self.tensors.items():
            params[name].add_(t.to(params[name].dtype))

    @torch.no_grad()
    def remove(self, model: torch.nn.Module) -> None:
        """Restore the weights this delta replaced, bit for bit."""
        if self._backup is None:
            raise DeltaError("delta is not applied")
        params = self._params(model)
        for name, old in self._backup.items():
            params[name].copy_(old)
        self._backup = None

    def save(self, path: str | Path) -> str:
        """Write safetensors (metadata as JSON) and return the file's sha256."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        save_file(tensors, str(tmp), metadata={"kbsync": json.dumps(self.meta, default=str)})
        tmp.replace(path)
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
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("kbsync", "{}"))
        except (SafetensorError, OSError, ValueError) as e:
            raise DeltaError(f"delta file {path} is corrupt: {e}") from None
        return cls(tensors, meta)
