"""One PNG of stacked-edit curves from saved runs: `kbsync eval --sequential --json` files and
`benchmarks/locate_sweep.py --json` files, and the state.json of a sequential run still going (its
--state-dir folder), their rows side by side (one line per method or configuration).

    python benchmarks/plot_curves.py RUN.json [RUN2.json ...] --out benchmarks/figures/stacked.png [--title T]

A row is drawn only from the points it saved (a run still going draws what it has so far).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editor.curves import plot_curves  # noqa: E402


def rows_of(path: Path) -> list[dict]:
    """The rows with a curve in one saved run, each labelled by its configuration (else its method)."""
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "made" in data and "curve" in data:
        # A --state-dir's state.json: a sequential run still going (its folder is the method).
        return [{"method": f"{path.parent.name} ({len(data['made'])} edits so far)", "curve": data["curve"]}]
    rows = data.get("rows", []) if isinstance(data, dict) else data
    return [{**r, "method": r.get("config") or r["method"]} for r in rows if r.get("curve")]


def main() -> None:
    """Read the runs, draw their curves, print where the PNG went."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    rows = [r for p in args.runs for r in rows_of(p)]
    if not rows:
        raise SystemExit("no row with a curve in " + ", ".join(map(str, args.runs)))
    print(plot_curves(rows, args.out, args.title))


if __name__ == "__main__":
    main()
