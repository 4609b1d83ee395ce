"""Sync throughput: watched facts polled and checked per second against the local KB (10k watched
facts), and the time from a KB change to the served answer through the running daemon.

    python benchmarks/sync_throughput.py [--model DIR|default] [--watched 10000] [--changes 3]

The daemon runs on the default edit method, options and regression limits (what a user gets);
a change that does not reach the served answer is reported with its audit rows' reasons.

Without --model a tiny Llama is trained once (a few minutes on 2 cores) and cached in
benchmarks/out/tiny-llama. Writes benchmarks/out/sync_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from kbsync.config import load_settings  # noqa: E402
from kbsync.corpus import FactTable, build_fact_table  # noqa: E402
from kbsync.daemon import Daemon, api_token  # noqa: E402
from kbsync.daemon.watchlist import _ENTITY_ID  # noqa: E402
from kbsync.daemon_client import DaemonClient  # noqa: E402
from kbsync.kb.local import LocalKB  # noqa: E402
from kbsync.kb.watch import Watcher  # noqa: E402
from kbsync.match import match  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
# KB changes for a real model (--model): (country, new capital, the KB's old one). Each must differ from
# what the model answers before it (SmolLM2 already says Istanbul for Turkey, so that was no change at all).
CHANGES = [("Nigeria", "Lagos", "Abuja"), ("Japan", "Osaka", "Tokyo"), ("Turkey", "Izmir", "Ankara")]
# The tiny Llama knows the capitals and currencies of 40 countries and nothing else: Lagos, Osaka and
# Istanbul are names it has never produced, which no edit within the default limits makes a 2-layer
# model spell (gated: answer NLL 2.7-8 after 100 target-vector steps; ft-layer: rejected for what it
# breaks). Its KB changes therefore move a capital to a city it knows.
TINY_CHANGES = [("Nigeria", "Nairobi", "Abuja"), ("Japan", "Seoul", "Tokyo"), ("Turkey", "Tehran", "Ankara")]


def tiny_model() -> Path:
    """A tiny Llama trained on real facts, cached under benchmarks/out."""
    path = OUT / "tiny-llama"
    if not (path / "config.json").exists():
        from adapters.tiny import PRESETS, build_tiny, save_tiny, tiny_facts

        save_tiny(build_tiny(PRESETS["llama"], tiny_facts(n=40)), path)
    return path


def watched_pairs(table: FactTable, n: int, first: list[str]) -> list[tuple[str, str]]:
    """n distinct (entity id, property) slots of the table, the change subjects' capitals first."""
    ids = {f.subject.label: f.subject.id for f in table.by_property("P36")}
    pairs = [(ids[s], "P36") for s in first]
    seen = set(pairs)
    for f in table.facts:
        if f.key not in seen and _ENTITY_ID.match(f.subject.id):
            seen.add(f.key)
            pairs.append(f.key)
        if len(pairs) >= n:
            break
    if len(pairs) < n:
        raise SystemExit(f"the fact table has only {len(pairs)} watchable slots")
    return pairs


def poll_rates(kb: LocalKB, pairs: list[tuple[str, str]], batch_sizes: list[int]) -> list[dict]:
    """Seconds and slots/s for a priming poll and an idle poll of all pairs, per VALUES batch size."""
    rows = []
    for batch in batch_sizes:
        w = Watcher(kb.client(), pairs=pairs, batch_size=batch)
        t0 = time.perf_counter()
        w.prime()
        prime_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        changed = w.poll()
        idle_s = time.perf_counter() - t0
        assert changed == [], "nothing changed, so an idle poll must report nothing"
        rows.append({"batch_size": batch, "queries": -(-len(pairs) // batch), "prime_s": round(prime_s, 3),
                     "idle_poll_s": round(idle_s, 3), "facts_per_s": round(len(pairs) / idle_s, 1)})
    return rows


def change_latency(root: Path, kb: LocalKB, model: str, pairs: list[tuple[str, str]], changes: list[tuple[str, str, str]],
                   interval: float, timeout: float, cache_dir: str | None = None) -> list[dict]:
    """kb.set_fact -> first API answer with the new value (match rules), through a daemon on default settings.

    The edit method, its options and the regression limits are the defaults a user gets; only the
    model, the data dir, the KB and the poll interval are set here. A change that does not reach
    the served answer within timeout is reported with the daemon's audit rows for it (status and
    reasons: rejected, failed, owed), never as a bare timeout.
    """
    s = load_settings(environ={})
    s.model.path = model
    s.store.data_dir = str(root / "data")
    if cache_dir:  # where setup.sh put the default method's statistics, if not the default cache
        s.store.cache_dir = cache_dir
    s.kb.endpoint = kb.endpoint
    s.kb.watchlist = [f"{e}|{p}" for e, p in pairs]
    s.kb.batch_size = 200
    s.daemon.engine = "builtin"
    s.daemon.poll_interval, s.daemon.jitter = interval, 0.0
    d = Daemon(s).open()
    out = []
    try:
        d.start_scheduler()
        client = DaemonClient(d.api.url, api_token(s))
        while d.last_ok is None:
            time.sleep(0.05)
        for subject, new, old in changes:
            question = f"What is the capital of {subject}?"
            before = client.ask(question)
            if match(before, new).ok:
                raise SystemExit(f"the model already answers {before!r} to {question!r}: {new!r} is no change to "
                                 f"measure; pick another (CHANGES)")
            polls, applied = d.polls, d.counts.get("applied", 0)
            t0 = time.perf_counter()
            kb.set_fact("P36", subject, new)
            # The served model changes when the daemon pushes an applied edit: watched every 50 ms on the
            # daemon's counts (no model work), then confirmed by asking. Asking back to back instead would
            # measure the answer's own second on SmolLM2 and, taking the model lock between the edit's
            # phases, slow the edit it measures. Without an applied edit, it asks every 2 s (a change
            # that is refused or owed is still asked about until the timeout).
            ok, answer, latency, asked = False, before, 0.0, t0
            while time.perf_counter() - t0 < timeout:
                pushed = d.counts.get("applied", 0) > applied
                seen = time.perf_counter()
                if pushed or seen - asked > 2.0:
                    asked = seen
                    ok = match(answer := client.ask(question), new).ok
                    if ok:
                        latency = (seen if pushed else time.perf_counter()) - t0
                        break
                    applied = d.counts.get("applied", 0) if pushed else applied  # another slot's edit
                time.sleep(0.05)
            rows = [e for e in d.audit.history(subject=subject, limit=20) if e.source == "daemon" and e.property == "P36"]
            rows.reverse()  # oldest first: the attempts for this change, in order
            edit = next((e for e in reversed(rows) if e.status == "applied"), rows[-1] if rows else None)
            out.append({"fact": f"capital of {subject}", "before": before, "after": answer, "expected_before": old,
                        "reached": ok, "latency_s": round(latency, 3) if ok else None, "polls": d.polls - polls,
                        "edit_s": edit.metrics.get("edit_seconds") if edit else None,
                        # The daemon's whole edit of the change, every attempt: probes, method, regression check.
                        "daemon_edit_s": (round(sum(s for e in rows for s in e.metrics.get("seconds", {}).values()), 3)
                                          if rows else None),
                        "method": edit.method if edit else None, "status": edit.status if edit else "no edit row",
                        "attempts": [{"id": e.id, "method": e.method, "status": e.status, "reasons": list(e.reasons)}
                                     for e in rows],
                        "kb_revision": edit.kb_revision if edit else None})
    finally:
        d.close()
    return out


def main() -> None:
    """Run the sync benchmark, print its table and write its JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Model directory, or 'default' for the embedded SmolLM2 (default: a cached tiny Llama).")
    ap.add_argument("--watched", type=int, default=10_000)
    ap.add_argument("--changes", type=int, default=3)
    ap.add_argument("--interval", type=float, default=2.0, help="Daemon poll interval for the latency run.")
    ap.add_argument("--cache-dir", help="Cache directory (converted default model, statistics); default: the settings'.")
    ap.add_argument("--timeout", type=float, default=600.0, help="Seconds a change may take to reach the served answer.")
    args = ap.parse_args()
    console = Console(width=160)  # the tables, unwrapped, also in a log file
    OUT.mkdir(parents=True, exist_ok=True)
    model = args.model or str(tiny_model())
    table = build_fact_table(min_city_population=50_000)
    changes = (CHANGES if args.model else TINY_CHANGES)[:args.changes]
    pairs = watched_pairs(table, args.watched, [c[0] for c in changes])
    with tempfile.TemporaryDirectory(prefix="kbsync-bench-") as tmp:
        t0 = time.perf_counter()
        kb = LocalKB(Path(tmp) / "kb", table=table).start()
        load_s = time.perf_counter() - t0
        try:
            rates = poll_rates(kb, pairs, [50, 200])
            latency = change_latency(Path(tmp), kb, model, pairs, changes, args.interval, args.timeout,
                                     args.cache_dir)
        finally:
            kb.stop()
    result = {"watched": len(pairs), "kb_facts": len(table), "kb_start_and_load_s": round(load_s, 2),
              "poll": rates, "change_to_answer": latency,
              "median_latency_s": (statistics.median(r["latency_s"] for r in latency)
                                   if latency and all(r["reached"] for r in latency) else None),
              # Issue 19's bar: two poll intervals plus the daemon's own edit of the change.
              "within_two_polls_plus_edit": [r["reached"] and r["latency_s"] <= 2 * args.interval + (r["daemon_edit_s"] or 0)
                                             for r in latency],
              "edit_defaults": {"method": load_settings(environ={}).editor.method,
                                "fallback": load_settings(environ={}).editor.fallback},
              "poll_interval_s": args.interval, "model": str(model),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}}
    (OUT / "sync_throughput.json").write_text(json.dumps(result, indent=2) + "\n")

    t = Table(title=f"KB polling: {len(pairs):,} watched facts (local oxigraph, {len(table):,} facts)")
    for col in ("VALUES batch", "queries", "priming poll s", "idle poll s", "facts/s"):
        t.add_column(col, justify="right")
    for r in rates:
        t.add_row(str(r["batch_size"]), str(r["queries"]), f"{r['prime_s']:.2f}", f"{r['idle_poll_s']:.2f}",
                  f"{r['facts_per_s']:,.0f}")
    console.print(t)
    t = Table(title=f"KB change -> served answer (daemon, poll every {args.interval:g} s, {len(pairs):,} watched)")
    for col in ("fact", "before", "after", "latency s", "polls", "method s", "daemon edit s", "method", "status"):
        t.add_column(col)
    for r in latency:
        t.add_row(r["fact"], r["before"], r["after"], f"{r['latency_s']:.2f}" if r["reached"] else f"> {args.timeout:g}",
                  str(r["polls"]), f"{r['edit_s']:.1f}" if r["edit_s"] is not None else "-",
                  f"{r['daemon_edit_s']:.1f}" if r["daemon_edit_s"] is not None else "-", str(r["method"]), r["status"])
    console.print(t)
    for r in latency:  # why a change did not land, or what was tried before the one that did
        for a in r["attempts"]:
            if a["status"] != "applied":
                console.print(f"  {r['fact']}: edit {a['id']} ({a['method']}) {a['status']}: {'; '.join(a['reasons'])}")
    console.print(f"wrote {OUT / 'sync_throughput.json'}")


if __name__ == "__main__":
    main()
