"""Time the default model's forward and backward passes and its load paths (GGUF vs cached safetensors).

Usage: python benchmarks/forward_backward.py [--repeats 5] [--tokens 16] [--threads N]
Prints a table and writes benchmarks/out/forward_backward.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kbsync.commands.common import quiet_transformers  # noqa: E402


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of fn over repeats runs, after warmup untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def main() -> None:
    """Run the benchmark, print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "forward_backward.json"))
    args = ap.parse_args()
    quiet_transformers()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bar would interleave with the table

    import torch
    from rich.console import Console
    from rich.table import Table

    from adapters import load_adapter
    from adapters.loading import convert_gguf, default_model_dir, gguf_path
    from kbsync.config import load_settings

    if args.threads:
        # On a shared machine one thread gives stable numbers: busy OpenMP peers stall each other's barriers.
        torch.set_num_threads(args.threads)
    settings = load_settings()
    model_dir = default_model_dir(settings)  # converts once if the cache is empty (not timed)
    results: dict[str, object] = {"model": str(model_dir), "threads": torch.get_num_threads(),
                                  "tokens": args.tokens, "repeats": args.repeats}

    # Load paths: one run each is already seconds long, so fewer repeats.
    load_repeats = max(1, min(3, args.repeats))
    with tempfile.TemporaryDirectory() as tmp:
        gguf_s, _ = median_seconds(lambda: convert_gguf(gguf_path(), Path(tmp) / "m"), load_repeats, warmup=0)
    settings.model.path = str(model_dir)
    st_s, _ = median_seconds(lambda: load_adapter(settings), load_repeats, warmup=0)

    adapter = load_adapter(settings)
    model = adapter.model
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    editable = adapter.editable()
    n_all = sum(p.numel() for p in model.parameters())
    n_edit = sum(p.numel() for p in editable.values())

    def forward() -> None:
        with torch.no_grad():
            adapter.forward(batch)

    def set_grad(only: dict | None) -> None:
        for n, p in model.named_parameters():
            p.requires_grad_(only is None or n in only)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        adapter.loss(batch).backward()

    fwd_s, _ = median_seconds(forward, args.repeats)
    set_grad(None)
    all_s, _ = median_seconds(fwd_bwd, args.repeats)
    set_grad(editable)
    edit_s, _ = median_seconds(fwd_bwd, args.repeats)
    set_grad(None)

    results.update({
        "params_total": n_all, "params_editable": n_edit, "editable": sorted(editable),
        "forward_s": fwd_s, "forward_backward_all_s": all_s, "forward_backward_editable_s": edit_s,
        "load_gguf_s": gguf_s, "load_safetensors_s": st_s,
        "ratio_fb_all_over_forward": all_s / fwd_s, "ratio_fb_editable_over_forward": edit_s / fwd_s,
        "ratio_fb_all_over_editable": all_s / edit_s, "ratio_load_gguf_over_safetensors": gguf_s / st_s,
    })

    table = Table(title=f"{model_dir.name}: {n_all / 1e6:.1f}M params, {args.tokens} tokens, "
                        f"median of {args.repeats} ({load_repeats} for loads), {results['threads']} threads")
    table.add_column("measurement")
    table.add_column("seconds", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("forward", f"{fwd_s:.3f}", "1.0x")
    table.add_row("forward+backward, all parameters", f"{all_s:.3f}", f"{all_s / fwd_s:.1f}x forward")
    table.add_row(f"forward+backward, editable only ({len(editable)} matrices, {n_edit / 1e6:.1f}M)",
                  f"{edit_s:.3f}", f"{edit_s / fwd_s:.1f}x forward; all/editable {all_s / edit_s:.1f}x")
    table.add_row("load from GGUF (dequantise + save)", f"{gguf_s:.2f}", f"{gguf_s / st_s:.1f}x safetensors")
    table.add_row("load from cached safetensors", f"{st_s:.2f}", "1.0x")
    Console().print(table)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
