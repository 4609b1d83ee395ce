"""Start-up with many applied edits: load time and peak memory of the served model with N stored deltas.

Builds a data directory holding N applied edits whose deltas have the size and layout of an
alphaedit edit on the model (a rank-one factor pair on each of the default layers' MLP output
matrices, with its keys as extras; random values, scaled so small that the weights barely move:
only the format and size matter here), then loads the served model (reconcile, sha256 of every
delta, base weights + deltas in order) in a fresh process, beside a fresh process that loads the
base model alone. Prints a table and writes benchmarks/out/store_load.json.

    python benchmarks/store_load.py --edits 1000                 # default model (SmolLM2)
    python benchmarks/store_load.py --edits 100 --model DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def settings_for(model: str, data_dir: str, cache_dir: str | None):
    """Default settings on a model and a data directory (SQLite log inside it)."""
    from kbsync.config import load_settings

    s = load_settings(environ={})
    s.model.path = model
    s.store.data_dir = data_dir
    s.store.db = ""
    if cache_dir:
        s.store.cache_dir = cache_dir
    return s


def build(model: str, data_dir: str, cache_dir: str | None, n: int) -> int:
    """Write n applied edits with alphaedit-shaped factored deltas; returns the bytes of one delta file."""
    import torch

    from editor.delta import Delta
    from editor.memit.config import default_layers
    from kbsync.audit.models import BASE_FINGERPRINT, Edit
    from kbsync.pipeline import EditPipeline

    p = EditPipeline(settings_for(model, data_dir, cache_dir))
    served = p.load_served_model()
    ad = served.adapter
    params = dict(ad.model.named_parameters())
    names = [ad.mlp_out(i) + ".weight" for i in default_layers(ad.num_layers())]
    gen = torch.Generator().manual_seed(0)
    size = 0
    for i in range(n):
        factors, extras = {}, {}
        for name in names:
            out_dim, in_dim = params[name].shape
            left = torch.randn(out_dim, 1, generator=gen) * 1e-6
            right = torch.randn(1, in_dim, generator=gen)
            factors[name] = (left, right)
            extras["keys/" + name] = torch.randn(1, in_dim, generator=gen)
        delta = Delta({}, {"method": "alphaedit", BASE_FINGERPRINT: served.base_fingerprint},
                      factors=factors, extras=extras)
        row = Edit(question=f"synthetic fact {i}?", object_label=f"answer {i}", source="cli", actor="store_load",
                   method="alphaedit")
        edit = p.store.commit(p.audit, row, delta)
        size = p.store.resolve(edit.delta_path).stat().st_size
    p.close()
    return size


def load(model: str, data_dir: str, cache_dir: str | None) -> dict:
    """Seconds to the served model (adapter load + verify + deltas) and this process's peak RSS."""
    import resource

    import torch

    torch.set_num_threads(1)
    from kbsync.pipeline import EditPipeline

    start = time.perf_counter()
    p = EditPipeline(settings_for(model, data_dir, cache_dir))
    served = p.load_served_model()
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "edits": len(served.edit_ids),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    p.close()
    return out


def in_fresh_process(model: str, data_dir: str, cache_dir: str | None) -> dict:
    """load() in a new interpreter (no warm imports or caches from this one)."""
    args = [sys.executable, __file__, "--load-only", "--model", model, "--data-dir", data_dir]
    if cache_dir:
        args += ["--cache-dir", cache_dir]
    res = subprocess.run(args, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    """Build the store, load it and the bare model in fresh processes, print and save the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--data-dir", default=None, help="(with --load-only) the data directory to load")
    ap.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/out/store_load.json"))
    args = ap.parse_args()
    if args.load_only:
        print(json.dumps(load(args.model, args.data_dir, args.cache_dir)))
        return
    with tempfile.TemporaryDirectory(prefix="kbsync-load-") as tmp:
        empty, full = str(Path(tmp) / "empty"), str(Path(tmp) / "full")
        start = time.perf_counter()
        size = build(args.model, full, args.cache_dir, args.edits)
        build_s = time.perf_counter() - start
        # Alternating runs, so machine noise hits both sides alike; the best of each is reported.
        bare, stacked = [], []
        for _ in range(args.repeats):
            bare.append(in_fresh_process(args.model, empty, args.cache_dir))
            stacked.append(in_fresh_process(args.model, full, args.cache_dir))
    best_bare = min(bare, key=lambda r: r["seconds"])
    best = min(stacked, key=lambda r: r["seconds"])
    result = {"model": args.model, "edits": args.edits, "delta_bytes": size, "build_s": build_s,
              "base_load_s": best_bare["seconds"], "stacked_load_s": best["seconds"],
              "ratio": best["seconds"] / best_bare["seconds"], "base_peak_rss_mb": best_bare["peak_rss_mb"],
              "stacked_peak_rss_mb": best["peak_rss_mb"], "runs": {"bare": bare, "stacked": stacked}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'':<28}{'load s':>10}{'peak RSS MB':>14}")
    print(f"{'base model':<28}{best_bare['seconds']:>10.2f}{best_bare['peak_rss_mb']:>14.0f}")
    print(f"{f'+ {args.edits} applied edits':<28}{best['seconds']:>10.2f}{best['peak_rss_mb']:>14.0f}")
    print(f"ratio {result['ratio']:.2f}x; one delta file {size / 1024:.1f} KiB, {args.edits} of them "
          f"{size * args.edits / 2**20:.1f} MiB; wrote {args.out}")


if __name__ == "__main__":
    main()
