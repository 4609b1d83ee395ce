"""How an edit's effect and its collateral change scale with the size of its delta.

Proposes one edit with the chosen method (shrink off), then scores the delta scaled by each
factor: which of the question and paraphrases answer the target, and the regression check's
retain metrics (mean/max KL, unchanged top-1 answers). Prints a table and writes
benchmarks/out/shrink_sweep.json. Uses the served model of the data directory read-only.

    OMP_NUM_THREADS=1 python benchmarks/shrink_sweep.py --method ke-loop
    python benchmarks/shrink_sweep.py --method ft-layer --option lr=1e-5 --scales 1 0.5 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    """Sweep the delta scale of one edit and report success and retain metrics per scale."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="ke-loop")
    ap.add_argument("--phrase", default="capital of Namibia")
    ap.add_argument("--target", default="Windhoek")
    ap.add_argument("--option", action="append", default=[], help="method option KEY=VALUE")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.5, 0.4, 0.3])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "shrink_sweep.json"))
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from editor.methods import make_method
    from kbsync.check import run_probes
    from kbsync.commands.common import quiet_transformers
    from kbsync.commands.edit import parse_option
    from kbsync.config import load_settings
    from kbsync.corpus import fact_from_phrase
    from kbsync.pipeline import EditPipeline
    from kbsync.retain import measure

    quiet_transformers()
    settings = load_settings()
    pipeline = EditPipeline(settings)
    adapter = pipeline.adapter
    tgt = pipeline._target(fact_from_phrase(args.phrase, args.target), None, "benchmark", "benchmark", "", args.method)
    before = run_probes(adapter, tgt.probes, tgt.aliases, tgt.claim_prefix)
    tgt.request.original = before[0].prediction
    options = {"data_dir": settings.store.data_path, "loop": settings.editor.loop, **settings.editor.options,
               **dict(parse_option(o) for o in args.option), "shrink": False}
    result = make_method(args.method, adapter, **options).propose(tgt.request)
    items = pipeline._retain_items(tgt.exclude_key)
    base = pipeline.retain_cache.get(adapter, items)
    rows = []
    for scale in args.scales:
        delta = result.delta.scaled(scale)
        retain = measure(adapter, items, base, delta, settings.regression.tie_margin)
        delta.apply(adapter.model)
        try:
            after = run_probes(adapter, tgt.probes, tgt.aliases, tgt.claim_prefix)
        finally:
            delta.remove(adapter.model)
        rows.append({"scale": scale, "question": after[0].ok, "prompts_ok": sum(a.ok for a in after),
                     "prompts": len(after), **retain.summary(), "answer": after[0].prediction})
    reg = settings.regression
    table = Table(title=f"{args.phrase!r} -> {args.target} ({args.method}, {adapter.name}); delta norm "
                        f"{result.delta.norm():.3g}; limits: mean KL <= {reg.max_mean_kl:g}, unchanged >= {reg.min_unchanged:.0%}")
    for col in ("scale", "question", "prompts ok", "mean KL", "max KL", "unchanged", "answer"):
        table.add_column(col)
    for r in rows:
        table.add_row(f"{r['scale']:g}", "yes" if r["question"] else "no", f"{r['prompts_ok']}/{r['prompts']}",
                      f"{r['mean_kl']:.4f}", f"{r['max_kl']:.3f}", f"{r['unchanged']:.1%}", r["answer"])
    Console(width=160).print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"method": args.method, "phrase": args.phrase, "target": args.target,
                                          "model": adapter.name, "rows": rows}, indent=2))
    pipeline.close()


if __name__ == "__main__":
    main()
