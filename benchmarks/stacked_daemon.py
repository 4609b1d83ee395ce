"""Stack edits through the daemon's own path (`kbsync edit`: check, edit, regression check, commit).

`kbsync eval --sequential` applies every edit; the daemon applies only those its regression
check accepts. This runs N held-out fact-table edits (the records of `kbsync eval --data table`,
in order) through EditPipeline on the served model, once per method and per regression setting
(the configured limits, and with the limits off: every edit that takes is applied), each from
the unedited model in a fresh data directory. At the end it asks the stacked model about every
applied edit (still answers its target?) and about known facts no edit touched (still answered
as before?). Prints a table and writes benchmarks/out/stacked_daemon.json.

    python benchmarks/stacked_daemon.py --limit 10                        # ke-loop and ft, limits on and off
    python benchmarks/stacked_daemon.py --method ft --checks on --limit 20
    python benchmarks/stacked_daemon.py --method default --checks on --limit 100 --state-dir /tmp/stack  # resumable
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
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


def table_edits(limit: int) -> list[tuple[Any, str]]:
    """(fact, new target) for the first `limit` records of `kbsync eval --data table` (same shuffle and targets)."""
    from editor.data import from_facts
    from kbsync.corpus import default_fact_table

    chosen = list(default_fact_table().facts)
    random.Random(0).shuffle(chosen)
    records = from_facts(chosen, neighbours=2)
    return [(f, r.target) for f, r in zip(chosen[:limit], records[:limit])]


def limits_off(settings: Any) -> None:
    """Regression limits that accept every edit that takes (the edit's own question must still flip)."""
    reg = settings.regression
    reg.max_mean_kl = reg.max_kl = math.inf
    reg.min_unchanged = reg.min_paraphrase_accuracy = 0.0
    reg.keep_applied = False


def ask(adapter: Any, facts: list[Any]) -> list[bool]:
    """Whether the model answers each fact's question with its object, under the match rules."""
    from kbsync.check import probes, run_probes
    from kbsync.facts import render

    out = []
    for f in facts:
        pr = render(f)
        out.append(run_probes(adapter, probes(adapter, pr)[:1], pr.aliases, pr.claim_prefix)[0].ok)
    return out


def run_one(args: argparse.Namespace, method: str, checks: str, edits: list[tuple[Any, str]],
            gold: list[Any]) -> dict[str, Any]:
    """Stack the edits through a fresh pipeline; return per-edit rows and the end-state scores."""
    from kbsync.config import load_settings
    from kbsync.facts import Entity, Fact
    from kbsync.pipeline import EditPipeline

    settings = load_settings()
    settings.model.path = args.model
    editors = settings.store.data_path / "editors"
    if args.state_dir:  # kept: a killed run carries on from its last edit (the audit log has the rest)
        settings.store.data_dir = str(Path(args.state_dir) / f"{method}-{checks}")
        Path(settings.store.data_dir).mkdir(parents=True, exist_ok=True)
    else:
        settings.store.data_dir = tempfile.mkdtemp(prefix="kbsync-stack-")
    settings.store.db = ""
    if editors.is_dir() and not (settings.store.data_path / "editors").exists():  # the trained KnowledgeEditor
        (settings.store.data_path / "editors").symlink_to(editors)
    if checks == "off":
        limits_off(settings)
    log = settings.store.data_path / "rows.json"
    rows: list[dict[str, Any]] = json.loads(log.read_text()) if log.exists() else []
    pipeline = EditPipeline(settings)
    start = time.perf_counter() - sum(r.get("seconds", 0.0) for r in rows)
    try:
        for i, (fact, target) in enumerate(edits):
            if i < len(rows):
                continue
            t0 = time.perf_counter()
            # "default": the configured method and its fallback list, as the daemon edits.
            out = pipeline.edit_fact(fact, target, method=None if method == "default" else method, actor="benchmark")
            m = out.edit.metrics or {}
            rows.append({"i": i, "question": out.edit.question, "target": target, "status": out.status,
                         "method": out.edit.method, "reasons": out.edit.reasons, "mean_kl": m.get("mean_kl"),
                         "unchanged": m.get("unchanged"), "seconds": time.perf_counter() - t0})
            log.write_text(json.dumps(rows, default=str))
            print(f"  {method} checks {checks} {i + 1}/{len(edits)}: {out.status} ({out.edit.method}) {out.edit.question!r} -> {target}"
                  + (f" ({'; '.join(out.edit.reasons)})" if out.status == "rejected" else ""), flush=True)
        applied = [Fact(f.subject, f.property, Entity("", t), f.revision)
                   for (f, t), r in zip(edits, rows) if r["status"] == "applied"]
        kept = ask(pipeline.adapter, applied)
        gold_ok = ask(pipeline.adapter, gold)
    finally:
        pipeline.close()
    counts = collections.Counter(r["status"] for r in rows)
    # Every reason of every rejected edit, without its numbers ("mean retain KL 0.08 > 0.05" -> "mean retain KL").
    reasons = collections.Counter(why.split(":")[0].split(" (")[0].rstrip("0123456789.%<> ")
                                  for r in rows if r["status"] == "rejected" for why in r["reasons"])
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    by_method = collections.Counter(r.get("method", method) for r in rows if r["status"] == "applied")
    return {"method": method, "checks": checks, "edits": len(rows), "applied": counts["applied"],
            "applied_by": dict(by_method),
            "rejected": counts["rejected"], "noop": counts["noop"], "kept": mean(kept), "kept_n": sum(kept),
            "gold_kept": mean(gold_ok), "gold_n": len(gold), "reject_reasons": dict(reasons),
            "seconds": time.perf_counter() - start, "rows": rows}


def main() -> None:
    """Run every (method, regression setting) pair and print the end-state table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model directory, or 'default' (embedded SmolLM2)")
    ap.add_argument("--method", action="append", default=None,
                    help="edit method (repeatable; 'default': the configured method and its fallbacks; default ke-loop and ft)")
    ap.add_argument("--checks", action="append", choices=("on", "off"), default=None,
                    help="regression limits as configured (on) or off (repeatable; default both)")
    ap.add_argument("--limit", type=int, default=10, help="edits stacked per run")
    ap.add_argument("--gold", type=int, default=50, help="known facts (never edited) asked at the end")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "stacked_daemon.json"))
    ap.add_argument("--state-dir", help="keep each run's data directory here and resume a killed run from its last edit")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from adapters import load_adapter
    from kbsync.commands.common import quiet_transformers
    from kbsync.config import load_settings

    quiet_transformers()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # One pass over the table: the first `limit` records are the edits, the rest the gold pool.
    candidates = table_edits(args.limit + 40 * args.gold)
    edits = candidates[:args.limit]
    edited = {(f.subject.id, f.property) for f, _ in edits}
    # Gold: held-out facts the unedited model answers, from further down the same shuffled table.
    settings = load_settings()
    settings.model.path = args.model
    pool = [f for f, _ in candidates[args.limit:] if (f.subject.id, f.property) not in edited]
    saved = Path(args.state_dir) / "gold.json" if args.state_dir else None
    if saved is not None and saved.exists():  # a resumed run asks the same known facts
        keys = [tuple(k) for k in json.loads(saved.read_text())]
        by_key = {(f.subject.id, f.property): f for f in pool}
        gold = [by_key[k] for k in keys]
    else:
        base = load_adapter(settings)
        gold = []
        for i in range(0, len(pool), 32):
            part = pool[i:i + 32]
            gold += [f for f, ok in zip(part, ask(base, part)) if ok]
            if len(gold) >= args.gold:
                break
        gold = gold[:args.gold]
        del base
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps([[f.subject.id, f.property] for f in gold]))

    results = [run_one(args, m, c, edits, gold) for m in (args.method or ["ke-loop", "ft"])
               for c in (args.checks or ["on", "off"])]
    table = Table(title=f"{args.limit} table edits stacked through `kbsync edit` ({args.model}); "
                        f"end state vs {len(gold)} known facts no edit touches")
    for col in ("method", "regression limits", "applied", "applied by", "rejected", "noop", "applied & kept at end",
                "known facts kept", "rejected for", "minutes"):
        table.add_column(col, justify="left" if col in ("method", "regression limits", "applied by", "rejected for") else "right")
    for r in results:
        table.add_row(r["method"], r["checks"], str(r["applied"]), " ".join(f"{k} {v}" for k, v in r["applied_by"].items()) or "-",
                      str(r["rejected"]), str(r["noop"]),
                      f"{r['kept_n']}/{r['applied']}", f"{r['gold_kept']:.2f}",
                      ", ".join(f"{k} x{v}" for k, v in r["reject_reasons"].items()) or "-", f"{r['seconds'] / 60:.1f}")
    Console(width=200).print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "limit": args.limit, "gold_n": len(gold),
                                          "threads": torch.get_num_threads(), "results": results}, indent=2, default=str))
    Console().print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
