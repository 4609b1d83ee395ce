"""Stacked one-at-a-time edits vs one joint write of the same facts, from the base model.

The daemon knows every fact it has written (the audit log) and each locate-and-edit delta keeps
its target vector: instead of stacking N rank-one writes, each fitted to the model as the earlier
ones left it, it can put the base weights back and write all N target vectors in one
least-squares solve (`Memit.joint`, MEMIT's batch update). This measures whether that holds more.

Reads a stacked run of `benchmarks/locate_sweep.py` (its state folder: every applied delta, with
the target vector in its extras), and at each count N: base weights, the first N records' target
vectors written at once by each solver configuration, scored as the stack's curve is (kept and
paraphrases: greedy answer under the match rules; retain prompts; known facts). Prints the
stack's curve beside it; writes JSON (resumable: finished rows are skipped).

    python benchmarks/consolidate.py --state benchmarks/out/seq100/alphaedit_shrink_True --limit 100 \\
        --at 10,25,50,100 --method memit --method alphaedit --grid cov_weight=0,15000
    python benchmarks/consolidate.py ... --method alphaedit --anchors 200 --grid anchor_weight=1,10
    python benchmarks/consolidate.py --state DIR/ft-layer --at 100 --method ft-layer --grid consolidate_lr=1e-4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COLUMNS = ("kept_em", "equiv_em", "retain_acc", "retain_tf", "deterioration", "seconds")


def targets(state: Path, n: int, method: Any) -> tuple[Any, Any]:
    """The first n applied edits' target vectors, [n, d], and the scales they were applied at, [n]."""
    import torch

    from editor.delta import Delta

    rows, scales = [], []
    for i in range(n):
        delta = Delta.load(state / f"{i:05d}.safetensors")
        z = method.kept_target(delta)
        if z is None:
            sys.exit(f"{state}: edit {i}'s delta has no target vector at {method.z_module} (a run from before they were kept)")
        rows.append(z)
        scales.append(float(delta.meta.get("scale", 1.0)))
    return torch.stack(rows), torch.tensor(scales)


def score(adapter: Any, base: Any, records: list[Any], delta: Any) -> dict[str, float]:
    """The stack's scores (editor.evaluate.score_stack) with the delta applied, the weights restored after."""
    from editor.evaluate import score_stack

    delta.apply(adapter.model)
    try:
        return score_stack(adapter, base, records)
    finally:
        delta.remove(adapter.model)


def save(out: Path, saved: dict[str, Any]) -> None:
    """Write the rows so far (atomically: a killed run resumes from them)."""
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved, indent=1))
    os.replace(tmp, out)


def main() -> None:
    """Score a joint write of the first N records for each N and solver; print beside the stack's curve."""
    from locate_sweep import grid, key

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", required=True, help="A locate_sweep configuration's state folder.")
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="counterfact:" + str(ROOT.parent / "shared/data/counterfact-val.json"))
    ap.add_argument("--limit", type=int, default=100, help="The stacked run's --limit (its retain set).")
    ap.add_argument("--gold", type=int, default=50)
    ap.add_argument("--at", default="10,25,50,100", help="Edit counts to write jointly.")
    ap.add_argument("--method", action="append", help="Solvers (repeatable): memit, alphaedit, or a fine-tuning "
                    "method (ft-layer: the base weights trained on the n facts at once); default memit.")
    ap.add_argument("--grid", action="append", default=[], help="name=v1,v2 options of the solvers.")
    ap.add_argument("--anchors", type=int, default=0,
                    help="(alphaedit) Also keep the outputs at the subject keys of this many other records (those after "
                         "--limit): facts a knowledge base says are there, the neighbours a write must not move.")
    ap.add_argument("--cache-dir")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/out/consolidate.json"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from editor.data import ground, load_records
    from editor.evaluate import known_gold, sequential_baseline
    from editor.methods import MethodContext, make_method
    from editor.delta import Delta
    from editor.memit.compute_ks import compute_keys
    from editor.memit.method import KEYS
    from editor.shrink import shrink_joint
    from kbsync.commands.editor import _setup
    from kbsync.served import model_fingerprint

    state = Path(args.state)
    log = json.loads((state / "state.json").read_text())
    made = len(log["made"])
    counts = [n for n in (int(c) for c in args.at.split(",") if c) if n <= made]
    out = Path(args.json)
    saved = json.loads(out.read_text()) if out.exists() else {"state": str(state), "rows": []}
    rows: list[dict[str, Any]] = saved["rows"]
    done = {(r["config"], r["edits"]) for r in rows}

    settings, adapter = _setup(None, args.model)
    style = adapter.answer_style("auto")
    records = ground(adapter, load_records(args.data, args.limit, answer_style=style))
    pool = load_records(args.data, None, answer_style=style)
    gold = known_gold(adapter, [pair for r in pool for pair in r.retain], args.gold, records[0].question)
    base = sequential_baseline(adapter, records, gold)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else settings.store.cache_path
    context = MethodContext(settings.store.data_path, cache, model_fingerprint(adapter.model))
    requests = [r.request() for r in records]
    scored = {p for r in records for p in (r.prompt, *r.paraphrases, *(q for q, _ in r.retain))}
    anchors = [r.request() for r in load_records(args.data, args.limit + args.anchors, answer_style=style)[args.limit:]
               if r.prompt not in scored] if args.anchors else []
    for name in args.method or ["memit"]:
        for options in grid(args.grid):
            config = key(name, options)
            # Pseudo-options of the joint write: applied_scales (each fact at the scale its edit was
            # shrunk to, from its delta's meta) and shrink (the joint delta bisected to the smallest
            # scale keeping every prompt it holds).
            # anchor_weight: how much each anchor's key counts in the solve, as an edit's own key counts 1.
            scaled, shrunk = bool(options.get("applied_scales")), bool(options.get("shrink"))
            weight = float(options.get("anchor_weight", 1.0))
            pseudo = ("applied_scales", "shrink", "anchor_weight")
            method = make_method(name, adapter, context, **{k: v for k, v in options.items() if k not in pseudo})
            if args.anchors:
                if not hasattr(method, "applied_keys"):
                    sys.exit(f"--anchors needs a method that keeps keys (alphaedit), not {name}")
                config += f" anchors={args.anchors}"
                # Read once, on the base weights (every joint write below starts from them).
                anchor_keys = {m: compute_keys(adapter, m, anchors, method.prefixes, False) * weight ** 0.5
                               for m in method.modules}
            for n in counts:
                if (config, n) in done:
                    continue
                start = time.perf_counter()
                if not hasattr(method, "joint"):  # fine-tuning: the base weights trained on the n facts at once
                    delta = method.retrain(requests[:n])
                    scores = score(adapter, base, records[:n], delta)
                    rows.append({"config": config, "edits": n, **scores, "epochs": delta.meta["epochs"],
                                 "fitted": delta.meta["fitted"], "seconds": time.perf_counter() - start})
                    save(out, saved)
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                zs, scales = targets(state, n, method)
                method.on_reset()
                if args.anchors:  # their keys join the applied keys the solve keeps
                    method.on_applied(-1, Delta({}, {}, extras={KEYS + method.params[m]: k for m, k in anchor_keys.items()}))
                delta = method.joint(requests[:n], zs, scales if scaled else None)
                if shrunk:
                    delta, _ = shrink_joint(adapter, requests[:n], delta)
                scores = score(adapter, base, records[:n], delta)
                rows.append({"config": config, "edits": n, **scores, "scale": float(delta.meta.get("scale", 1.0)),
                             "seconds": time.perf_counter() - start})
                save(out, saved)
                print(json.dumps(rows[-1]), flush=True)
    curve = {c["edits"]: c for c in log["curve"]}
    width = max([len(r["config"]) for r in rows] + [len("stacked (the run)")])
    print(f"{'configuration':<{width}} {'edits':>5} " + " ".join(f"{c[:10]:>10}" for c in COLUMNS))
    for n in counts:
        if n in curve:
            print(f"{'stacked (the run)':<{width}} {n:>5} " + " ".join(f"{curve[n].get(c, float('nan')):>10.3f}" for c in COLUMNS))
        for r in rows:
            if r["edits"] == n:
                print(f"{r['config']:<{width}} {n:>5} " + " ".join(f"{r[c]:>10.3f}" for c in COLUMNS))


if __name__ == "__main__":
    main()
