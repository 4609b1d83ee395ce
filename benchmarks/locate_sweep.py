"""Sweep locate-and-edit settings on stacked edits: which layers, null-space cut and regulariser hold up.

Each configuration stacks the same N records (`kbsync eval --sequential` scoring: kept = the
edit still answered by free generation after the last edit, paraphrases, retain prompts
unchanged, known-fact deterioration) from the unedited model. Configurations already in the
JSON file are skipped and a configuration cut short carries on from its last edit (its deltas
are kept in a folder beside the JSON), so the sweep is resumable; the table is printed after
each configuration, and each row has its curve (the same scores after 10, 25, ... edits).

    python benchmarks/locate_sweep.py --limit 20 --method alphaedit \\
        --grid nullspace_threshold=0.1,0.3,0.5 --grid l2=1,10
    python benchmarks/locate_sweep.py --limit 20 --method memit --grid mom2_weight=1500,15000
    python benchmarks/locate_sweep.py --limit 100 --grid shrink=true --grid consolidate_every=0,10
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COLUMNS = ("kept_em", "success_em", "equiv_em", "retain_acc", "retain_tf", "deterioration", "latency_s", "bytes_per_edit")


def grid(specs: list[str]) -> list[dict[str, Any]]:
    """Every combination of `name=v1,v2` specs, values parsed as JSON where they can be (else strings)."""
    axes = []
    for spec in specs:
        name, _, values = spec.partition("=")
        parsed = []
        for v in values.split(";" if "[" in values else ","):
            try:
                parsed.append(json.loads(v))
            except json.JSONDecodeError:
                parsed.append(v)
        axes.append([(name, tuple(v) if isinstance(v, list) else v) for v in parsed])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def key(method: str, options: dict[str, Any]) -> str:
    """A configuration's name in the table and the JSON file."""
    return method + "".join(f" {k}={v}" for k, v in sorted(options.items()))


def table(rows: list[dict[str, Any]], title: str) -> str:
    """A plain-text table of the rows so far."""
    width = max([len(r["config"]) for r in rows] + [6])
    lines = [title, f"{'config':<{width}} " + " ".join(f"{c[:10]:>10}" for c in COLUMNS)]
    for r in rows:
        lines.append(f"{r['config']:<{width}} " + " ".join(
            f"{r[c]:>10.0f}" if c == "bytes_per_edit" else f"{r[c]:>10.3f}" for c in COLUMNS))
    return "\n".join(lines)


def main() -> None:
    """Run every configuration of the grid not yet in --json, printing the table after each."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="counterfact:" + str(ROOT.parent / "shared/data/counterfact-val.json"))
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--method", action="append", help="Methods (repeatable); default alphaedit.")
    ap.add_argument("--grid", action="append", default=[], help="name=v1,v2 (repeatable; lists as [4,5];[6,7]).")
    ap.add_argument("--gold", type=int, default=50, help="Known facts for deterioration.")
    ap.add_argument("--cache-dir", help="Statistics cache (default: the settings' cache_dir).")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/out/locate_sweep.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoints", default="10,25,50,100,250,500", help="Edit counts at which to score the stack too.")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from editor.data import ground, load_records
    from editor.evaluate import known_gold, run_sequential, sequential_baseline, slug
    from editor.methods import MethodContext, make_method
    from kbsync.commands.editor import _setup
    from kbsync.served import model_fingerprint

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(out.read_text()) if out.exists() and out.stat().st_size else {}
    run = {"model": args.model, "data": args.data, "limit": args.limit, "gold": args.gold}
    if saved and saved.get("run") != run:
        sys.exit(f"{out} holds a sweep with other settings ({saved.get('run')}); pass another --json")
    rows: list[dict[str, Any]] = saved.get("rows", [])
    todo = [(m, o) for m in (args.method or ["alphaedit"]) for o in grid(args.grid)
            if key(m, o) not in {r["config"] for r in rows}]
    if not todo:
        print(table(rows, f"{args.limit} stacked edits, {args.data}"))
        return

    settings, adapter = _setup(None, args.model)
    style = adapter.answer_style("auto")
    records = ground(adapter, load_records(args.data, args.limit, answer_style=style))
    if "gold_pairs" in saved:
        gold = [tuple(p) for p in saved["gold_pairs"]]
    else:
        pool = load_records(args.data, None, answer_style=style)
        gold = known_gold(adapter, [pair for r in pool for pair in r.retain], args.gold, records[0].question)
    base = sequential_baseline(adapter, records, gold)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else settings.store.cache_path
    context = MethodContext(settings.store.data_path, cache, model_fingerprint(adapter.model))
    for method, options in todo:
        start = time.perf_counter()
        # Each configuration's applied deltas are kept beside the JSON: a killed run carries on from its last edit.
        # consolidate_every is the run's, not the method's: every N edits all facts so far are written at once.
        made = {k: v for k, v in options.items() if k != "consolidate_every"}
        row = run_sequential(adapter, make_method(method, adapter, context, **made), base, key(method, options),
                             checkpoints=tuple(int(c) for c in args.checkpoints.split(",") if c),
                             state_dir=out.with_suffix("") / slug(key(method, options)), consolidate_every=int(options.get("consolidate_every", 0)))
        row.update(config=key(method, options), options={k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
                   wall_s=time.perf_counter() - start)
        rows.append(row)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run": run, "gold_pairs": gold, "rows": rows}, indent=1))
        os.replace(tmp, out)
        print(table(rows, f"{args.limit} stacked edits, {args.data} (kept/success/equiv: greedy answer, match rules)"), flush=True)


if __name__ == "__main__":
    main()
