"""KnowledgeEditor vs fine-tuning baselines on a tiny Llama trained on 80 real facts.

Builds the seeded tiny model, trains the hyper-network (default 1000 steps), then edits
held-out (fact, new target) pairs with every method on the same edits and prints the
paper's Table 1 columns. NAME+shrink rows are NAME with its delta shrunk as `kbsync edit`
does (editor/shrink.py). Writes benchmarks/out/ke_tiny.json.

    OMP_NUM_THREADS=1 python benchmarks/ke_tiny.py [--steps 1000] [--edits 48]

The training knobs (--label-smoothing, --lagrange-init, --lagrange-lr, --margin,
--margin-floor, --n-retain, --batch-retain, --per-fact, --neighbours) reproduce the ablation in RESULTS.md;
--ke-only skips the fine-tuning baselines, whose numbers do not depend on them. --retain-all
scores retain over every other fact (3,792 answers instead of 192); --encoder-out, --cond-norm,
--head-weight-norm and --edit-modules are the editor variants compared in RESULTS.md;
--sequential stacks each method's edits one after another, as the daemon does, and scores the end state.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

# Run as a script, sys.path[0] is benchmarks/, and the venv's editable kbsync install points at
# another checkout: put this checkout first so the code measured is the code next to the script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from adapters.tiny import PRESETS, build_tiny, tiny_facts  # noqa: E402
from editor.analysis import update_parts  # noqa: E402
from editor.data import from_facts  # noqa: E402
from editor.evaluate import evaluate, evaluate_sequential  # noqa: E402
from editor.methods import SHRINK  # noqa: E402
from editor.hypernet import HyperConfig, load_editor  # noqa: E402
from editor.train import TrainConfig, Trainer  # noqa: E402
from kbsync.commands.editor import COLUMNS, SEQUENTIAL_COLUMNS, results_table  # noqa: E402
from kbsync.facts import render  # noqa: E402


def main() -> None:
    """Train, evaluate, print and save."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--edits", type=int, default=48)
    ap.add_argument("--out", default="benchmarks/out/ke_tiny.json")
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--lagrange-init", type=float, default=0.0)
    ap.add_argument("--lagrange-lr", type=float, default=0.1)
    ap.add_argument("--margin", type=float, default=1e-2)
    ap.add_argument("--margin-floor", type=float, default=1e-3)
    ap.add_argument("--n-retain", type=int, default=4, help="retain pairs per training record")
    ap.add_argument("--batch-retain", action="store_true")
    ap.add_argument("--neighbours", type=int, default=0, help="retain pairs of the edited property (same old answer first)")
    ap.add_argument("--test-neighbours", type=int, default=0,
                    help="of each held-out edit's 4 retain pairs, this many of the edited property (same old answer first)")
    ap.add_argument("--per-fact", type=int, default=3, help="counterfactual training targets per fact")
    ap.add_argument("--retain-all", action="store_true",
                    help="each edit's retain set is every other fact of the model (the paper's retain accuracy "
                         "over the rest of the data), not 4 drawn at random")
    ap.add_argument("--ke-only", action="store_true")
    ap.add_argument("--cond-norm", action="store_true", help="LayerNorm on the editor's condition vector")
    ap.add_argument("--edit-modules", default="", help="regex of the matrices KE edits (default: the adapter's MLP matrices)")
    ap.add_argument("--head-weight-norm", action="store_true", help="weight norm on the heads' linear layers")
    ap.add_argument("--save-editor", default="", help="keep the trained editor at this path")
    ap.add_argument("--sequential", action="store_true",
                    help="stack each method's edits one after another and score the end state (kbsync eval --sequential)")
    ap.add_argument("--encoder-out", default="tanh", choices=["tanh", "mlp"],
                    help="h = tanh(Linear) as in the paper's code, or the older unbounded Linear-tanh-Linear")
    args = ap.parse_args()
    facts = tiny_facts(n=40)
    t = time.perf_counter()
    adapter = build_tiny(PRESETS["llama"], facts)
    build_s = time.perf_counter() - t
    if args.edit_modules:  # KE and ft-layer edit these; ft-all still trains every matrix
        adapter.edit_modules = (args.edit_modules,)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        train = TrainConfig(steps=args.steps, batch=8, lr=1e-3, eval_every=100, checkpoint_every=args.steps,
                            lagrange_lr=args.lagrange_lr, lagrange_init=args.lagrange_init, margin=args.margin,
                            margin_floor=args.margin_floor, batch_retain=args.batch_retain)
        Trainer(adapter, from_facts(facts, per_fact=args.per_fact, seed=0, n_retain=args.n_retain,
                                          neighbours=args.neighbours), tmp, train,
                HyperConfig(lstm_hidden=64, ffn_hidden=128, cond_dim=128, head_hidden=128,
                            label_smoothing=args.label_smoothing, cond_norm=args.cond_norm,
                            encoder_out=args.encoder_out, head_weight_norm=args.head_weight_norm)).run()
        train_s = time.perf_counter() - t
        ck = str(Path(tmp) / "editor.safetensors")
        if args.save_editor:
            shutil.copyfile(ck, args.save_editor)
        test = from_facts(facts, per_fact=1, seed=123, neighbours=args.test_neighbours)[: args.edits]
        if args.retain_all:  # same edits (the rng draws stay the same), a wider retain set
            every = [(render(f).question, f.object.label) for f in facts]
            test = [replace(r, retain=[(q, a) for q, a in every if q != r.prompt]) for r in test]
        parts = update_parts(load_editor(ck, adapter), adapter, test)
        methods = {"ke": ("ke", {"checkpoint": ck}), "ke-loop": ("ke-loop", {"checkpoint": ck, "loop": 5}),
                   "ke+shrink": ("ke+shrink", {"checkpoint": ck}),
                   "ke-loop+shrink": ("ke-loop+shrink", {"checkpoint": ck, "loop": 5}),
                   "ft-layer lr1e-5": ("ft-layer", {"lr": 1e-5}), "ft-all lr1e-5": ("ft-all", {"lr": 1e-5}),
                   "ft-layer lr1e-4": ("ft-layer", {"lr": 1e-4}), "ft-all lr1e-4": ("ft-all", {"lr": 1e-4}),
                   "zhu lr1e-4": ("zhu", {"lr": 1e-4, "linf": 1e-2})}
        if args.ke_only:
            methods = {k: v for k, v in methods.items() if k.startswith("ke")}
        score = evaluate_sequential if args.sequential else evaluate
        rows = []
        for label, (name, opts) in methods.items():
            row = score(adapter, test, [name], {name.removesuffix(SHRINK): opts})[0]
            row["method"] = label
            rows.append(row)
    title = f"{len(test)} held-out edits{' stacked' if args.sequential else ''}, tiny Llama "
    Console(width=200).print(results_table(rows, title + f"(build {build_s:.0f}s, KE train {train_s:.0f}s)",
                                           SEQUENTIAL_COLUMNS if args.sequential else COLUMNS))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print("KE update terms over the edits:", {k: round(v, 4) for k, v in parts.items()})
    Path(args.out).write_text(json.dumps({"steps": args.steps, "args": vars(args), "train_s": train_s, "rows": rows,
                                          "update_parts": parts}, indent=2))


if __name__ == "__main__":
    main()
