"""Time each phase of `kbsync edit` (load, check, edit, shrink, regression check, commit) on the served model.

Prints seconds per phase and its ratio to one forward+backward pass of a 16-token input, and
writes benchmarks/out/edit_latency.json. Uses a throwaway data directory and SQLite log.

    python benchmarks/edit_latency.py                      # default model (SmolLM2), ft-layer
    python benchmarks/edit_latency.py --method ke-loop --model DIR
    python benchmarks/edit_latency.py --runs 2                # dry run (cold retain cache), then the edit (warm)
    python benchmarks/edit_latency.py --data-dir D            # keep D: a second invocation starts with D's cache
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PHASES = ("load", "check", "edit", "shrink", "regression", "commit")


def forward_backward_seconds(adapter: Any, repeats: int = 3) -> float:
    """Median seconds of one forward+backward through the whole model on a 1x16-token input."""
    import torch

    vocab = adapter.model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(repeats + 1):  # the first run warms up allocators and kernels
        start = time.perf_counter()
        out = adapter.model(input_ids=ids, labels=ids)
        out.loss.backward()
        times.append(time.perf_counter() - start)
        adapter.model.zero_grad(set_to_none=True)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    """Run one edit through the pipeline and report per-phase latency."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model directory, or 'default' (embedded SmolLM2)")
    ap.add_argument("--method", default="ft-layer", help="edit method (KnowledgeEditor needs a trained editor)")
    ap.add_argument("--phrase", default="capital of Namibia")
    ap.add_argument("--target", default="Windhoek")
    ap.add_argument("--option", action="append", default=[], help="method option KEY=VALUE (e.g. lr=1e-4)")
    ap.add_argument("--retain-size", type=int, default=None)
    ap.add_argument("--runs", type=int, default=1,
                    help="edit the fact this many times in one process; all but the last as dry runs, so the "
                         "served weights (and the retain cache key) stay the same and later runs find a warm cache")
    ap.add_argument("--data-dir", default=None, help="data directory to use and keep (default: a fresh temporary one)")
    ap.add_argument("--cache-dir", default=None, help="cache directory (statistics of memit/alphaedit; default: the settings')")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "edit_latency.json"))
    args = ap.parse_args()

    import torch
    from rich.console import Console

    from kbsync.commands.common import quiet_transformers
    from kbsync.commands.edit import parse_option
    from kbsync.config import load_settings
    from kbsync.corpus import fact_from_phrase
    from kbsync.pipeline import EditPipeline

    quiet_transformers()
    torch.manual_seed(0)
    settings = load_settings()
    settings.model.path = args.model
    settings.store.data_dir = args.data_dir or tempfile.mkdtemp(prefix="kbsync-bench-")
    settings.store.db = ""
    if args.cache_dir:
        settings.store.cache_dir = args.cache_dir
    settings.editor.options.update(dict(parse_option(o) for o in args.option))
    if args.retain_size is not None:
        settings.regression.retain_size = args.retain_size
    fact = fact_from_phrase(args.phrase, args.target)

    pipeline = EditPipeline(settings)
    start = time.perf_counter()
    pipeline.load_served_model()
    load = time.perf_counter() - start
    # Prepared once per served model (statistics loaded or computed, an editor read): not per edit.
    start = time.perf_counter()
    pipeline.method(args.method)
    prepare = time.perf_counter() - start
    fwd_bwd = forward_backward_seconds(pipeline.adapter)
    runs = []
    for run in range(args.runs):
        hits, misses = pipeline.retain_cache.hits, pipeline.retain_cache.misses
        out = pipeline.edit_fact(fact, method=args.method, actor="benchmark", dry_run=run < args.runs - 1)
        timings = dict(out.timings)
        if run == 0:
            timings["load"] = load + timings.get("load", 0.0)
        cache = {"hits": pipeline.retain_cache.hits - hits, "misses": pipeline.retain_cache.misses - misses}
        runs.append(report(args, pipeline, out, timings, fwd_bwd, run, cache))
        runs[-1]["prepare_seconds"] = prepare
    result = runs[-1] if len(runs) == 1 else {**runs[-1], "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    Console().print(f"wrote {args.out}")
    pipeline.close()


def report(args: argparse.Namespace, pipeline: Any, out: Any, timings: dict[str, float], fwd_bwd: float,
           run: int, cache: dict[str, int]) -> dict[str, Any]:
    """Print one run's phase table and return its JSON record."""
    import torch
    from rich.console import Console
    from rich.table import Table

    total = sum(timings.get(p, 0.0) for p in PHASES)
    kind = "dry run" if out.dry_run else "edit"
    table = Table(title=f"kbsync edit latency, run {run + 1} ({kind}): {args.phrase!r} -> {args.target} "
                        f"({args.method}, {pipeline.adapter.name}); retain cache {cache['hits']} hits, {cache['misses']} misses")
    for col in ("phase", "seconds", "x fwd+bwd"):
        table.add_column(col, justify="right" if col != "phase" else "left")
    for p in PHASES:
        if p in timings:
            table.add_row(p, f"{timings[p]:.2f}", f"{timings[p] / fwd_bwd:.0f}")
        else:
            table.add_row(p, "-", "-")  # e.g. commit is skipped for a rejected or noop edit, shrink when off
    table.add_row("total", f"{total:.2f}", f"{total / fwd_bwd:.0f}")
    console = Console()
    console.print(table)
    m = out.edit.metrics
    console.print(f"one forward+backward (1x16 tokens): {fwd_bwd * 1000:.0f} ms; status {out.status}"
                  + (f"; {m.get('edit_steps')} edit steps, retain {m.get('retain_size')}, mean KL {m.get('mean_kl', 0):.3g}, "
                     f"unchanged {m.get('unchanged', 0):.1%}" if m else "")
                  + (f"; reasons: {'; '.join(out.edit.reasons)}" if out.edit.reasons else ""))
    # Bytes on disk: the committed delta file (a dry run or a rejected edit writes none).
    path = pipeline.store.resolve(out.edit.delta_path) if getattr(out.edit, "delta_path", None) else None
    nbytes = path.stat().st_size if path is not None and path.exists() else None
    if nbytes is not None:
        console.print(f"delta on disk: {nbytes / 1024:.1f} KiB")

    return {
        "model": pipeline.adapter.name, "method": args.method, "phrase": args.phrase, "target": args.target,
        "status": out.status, "reasons": out.edit.reasons, "metrics": m, "threads": torch.get_num_threads(),
        "forward_backward_seconds": fwd_bwd, "seconds": timings,
        "ratio_to_forward_backward": {p: t / fwd_bwd for p, t in timings.items()}, "total_seconds": total,
        "dry_run": out.dry_run, "retain_cache": cache, "delta_bytes": nbytes,
    }


if __name__ == "__main__":
    main()
