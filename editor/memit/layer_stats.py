"""The covariance of an MLP matrix's inputs over the statistics corpus, cached per base model.

C0 = E[k k^T] over every token position of the corpus (MEMIT's "mom2"), in float64. One pass
of the model fills the statistics of several layers at once. Files live under
<cache_dir>/stats/<base fingerprint>/, named by module and corpus size, and carry the sha256 of
their tensor: a file that fails it is an error naming the file (rebuild with
`kbsync editor stats --rebuild`), never silently trusted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapters.hooks import trace
from editor.delta import save_atomically
from kbsync.errors import KbsyncError

VERSION = 1  # bump when the corpus or the estimator changes: old files then stop matching


class StatsError(KbsyncError):
    """Statistics that are missing or do not verify."""


def stats_path(cache_dir: Path, base_fingerprint: str, module: str, tokens: int) -> Path:
    """Where the covariance of one module's inputs is cached."""
    return Path(cache_dir) / "stats" / base_fingerprint / f"{module}.t{tokens}.v{VERSION}.safetensors"


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def load_stats(path: Path) -> tuple[torch.Tensor, int]:
    """(C0, token count) from a cache file, verified; StatsError when missing or corrupt."""
    if not path.exists():
        raise StatsError(f"statistics {path} are missing; compute them with `kbsync editor stats`")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("kbsync", "{}"))
        cov = load_file(str(path))["cov"]
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise StatsError(f"statistics {path} are corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         f"rebuild with `kbsync editor stats --rebuild`") from None
    if meta.get("sha256") != _digest(cov) or not torch.isfinite(cov).all():
        raise StatsError(f"statistics {path} do not match their checksum; rebuild with `kbsync editor stats --rebuild`")
    return cov, int(meta.get("tokens", 0))


def save_stats(path: Path, cov: torch.Tensor, tokens: int) -> None:
    """Write C0 with its checksum (temp file + rename: a crash never leaves a half file under the name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cov = cov.contiguous()
    why = save_atomically({"cov": cov}, path, path.with_name(path.name + ".tmp"),
                          {"kbsync": json.dumps({"sha256": _digest(cov), "tokens": tokens})})
    if why:
        raise StatsError(f"cannot write statistics {path}: {why}")


@torch.no_grad()
def compute_covariances(adapter: Any, modules: list[str], texts: list[str], batch: int = 8, max_len: int = 128,
                        progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """E[k k^T] of each module's input over every (unpadded) token of texts, and the token count."""
    tok = adapter.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for i in range(0, len(texts), batch):
        enc = [tok(t, add_special_tokens=False)["input_ids"][:max_len] for t in texts[i:i + batch]]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, x in enumerate(enc):
            ids[j, :len(x)] = torch.tensor(x)
            mask[j, :len(x)] = 1
        ids, mask = ids.to(adapter.device), mask.to(adapter.device)
        with trace(adapter.model, modules) as tr:
            adapter.model(input_ids=ids, attention_mask=mask, use_cache=False)
        keep = mask.bool()
        for m in modules:
            k = tr[m].input[keep].double()
            sums[m] = sums.get(m, 0) + k.T @ k
        count += int(keep.sum())
        if progress:
            progress(min(i + batch, len(texts)), len(texts))
    return {m: (s / max(count, 1)).float().cpu() for m, s in sums.items()}, count


def covariances(adapter: Any, modules: list[str], cache_dir: Path, base_fingerprint: str, tokens: int,
                compute: bool = True, rebuild: bool = False,
                progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """C0 per module: from the cache, else computed on the model as it is now (which must be the base model)."""
    from editor.memit.corpus import stats_texts

    out: dict[str, torch.Tensor] = {}
    missing = []
    for m in modules:
        path = stats_path(cache_dir, base_fingerprint, m, tokens)
        if rebuild or not path.exists():
            missing.append(m)
        else:
            out[m] = load_stats(path)[0]
    if missing:
        if not compute:
            raise StatsError(f"statistics for {', '.join(missing)} are missing; compute them with `kbsync editor stats`")
        covs, n = compute_covariances(adapter, missing, stats_texts(adapter, tokens, progress=progress), progress=progress)
        for m, c in covs.items():
            save_stats(stats_path(cache_dir, base_fingerprint, m, tokens), c, n)
            out[m] = c
    return out


def covariances_for(adapter: Any, context: Any, modules: list[str], tokens: int, compute: bool = True) -> dict[str, torch.Tensor]:
    """C0 per module for a method's context: cached under its base fingerprint, computed on the base weights."""
    progress, rebuild = context.progress, context.rebuild
    if context.cache_dir is None or not context.base_fingerprint:
        # No cache to key (an evaluation on an unedited model): compute in memory on the weights as they are.
        from editor.memit.corpus import stats_texts

        return compute_covariances(adapter, modules, stats_texts(adapter, tokens, progress=progress), progress=progress)[0]
    with context.base_weights() if context.base_weights is not None else nullcontext():
        return covariances(adapter, modules, context.cache_dir, context.base_fingerprint, tokens,
                           compute=compute, rebuild=rebuild, progress=progress)
