"""Soak: the daemon for N minutes with a KB whose facts change every few seconds, a client sending
completions, another reverting edits, and the daemon killed (SIGKILL) and restarted on a schedule.

    python benchmarks/soak.py                       # 30 minutes on the cached tiny Llama
    python benchmarks/soak.py --minutes 5 --restart-every 120

The daemon is `kbsync daemon start` as a user runs it (its own process, the default edit method and
regression limits, poll every 2 s) against a local oxigraph KB this script changes. At the end it
stops the changes, lets the daemon settle, stops it, and judges every slot's last KB value: answered
by the served model (applied), taken out by the reverter (reverted), already answered (noop), or
visible as owed (rejected or failed, with its reasons); anything else is a fact lost. It then
rebuilds the model from the audit log in a fresh process and asks it the same questions, so the
served weights must equal base + the log's applied deltas. Prints a table and writes
benchmarks/out/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from kbsync.audit.log import AuditLog  # noqa: E402
from kbsync.config import load_settings  # noqa: E402
from kbsync.daemon import api_token, pid_alive, read_state  # noqa: E402
from kbsync.daemon_client import DaemonClient, DaemonError  # noqa: E402
from kbsync.kb.local import LocalKB, free_port  # noqa: E402
from kbsync.match import match  # noqa: E402
from sync_throughput import tiny_model  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
# Watched countries whose capital the KB moves between capitals the tiny Llama can say.
COUNTRIES = ["Nigeria", "Japan", "Turkey", "Kenya", "Egypt", "Germany", "Brazil", "Mexico"]
CITIES = ["Nairobi", "Seoul", "Tehran", "Cairo", "Berlin", "Tokyo", "Ankara", "Abuja", "Moscow", "Paris"]


def question(country: str) -> str:
    """The question whose answer a capital change moves."""
    return f"What is the capital of {country}?"


class Soak:
    """The daemon process, the KB and the three load threads of one soak run, and what they counted."""

    def __init__(self, root: Path, model: str, interval: float, seed: int) -> None:
        self.root = root
        self.kb = LocalKB(root / "kb", port=free_port()).start()
        config = root / "kbsync.toml"
        config.write_text(f"""
[model]
path = "{model}"
[kb]
endpoint = "{self.kb.endpoint}"
watchlist = {json.dumps([f"{c}|P36" for c in COUNTRIES])}
[daemon]
poll_interval = {interval}
jitter = 0.0
""")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KBSYNC_")}
        self.env.update(KBSYNC_CONFIG=str(config), KBSYNC_STORE_DATA_DIR=str(root / "data"),
                        PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        self.settings = load_settings(environ=self.env)
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.changes: list[dict[str, Any]] = []
        self.latencies: list[float] = []
        self.counts = {"served": 0, "errors": 0, "unavailable": 0, "reverts": 0, "revert_errors": 0,
                       "restarts": 0, "restarts_survived": 0}
        self.error_lines: list[str] = []
        self.restart_seconds: list[float] = []  # SIGKILL -> the restarted daemon's first successful poll
        self.client: DaemonClient | None = None

    # --- the daemon process ------------------------------------------------------------------

    def kbsync(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`kbsync ARGS` as a user runs it, in this run's environment."""
        return subprocess.run([sys.executable, "-m", "kbsync.cli", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start_daemon(self, timeout: float = 300) -> bool:
        """`kbsync daemon start`, then wait for its first poll; whether it came up."""
        proc = self.kbsync("daemon", "start", timeout=timeout)
        if proc.returncode != 0:
            self.error_lines.append(f"daemon start: {proc.stderr.strip()[-300:]}")
            return False
        state = read_state(self.settings)
        client = DaemonClient(state["url"], api_token(self.settings), timeout=120)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if client.health().get("last_ok"):
                    self.client = client
                    return True
            except DaemonError:
                pass
            time.sleep(0.5)
        self.error_lines.append("daemon start: no successful poll within the timeout")
        return False

    def kill_daemon(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        pid = read_state(self.settings).get("pid")
        if pid and pid_alive(int(pid)):
            os.kill(int(pid), signal.SIGKILL)
            while pid_alive(int(pid)):
                time.sleep(0.05)

    # --- the load -----------------------------------------------------------------------------

    def changer(self, every: float) -> None:
        """Move a watched capital every `every` seconds (never to the value it has)."""
        current = {c: self.kb.get_facts("P36", c)[0].object.label for c in COUNTRIES}
        while not self.stop.wait(every * self.rng.uniform(0.5, 1.5)):
            country = self.rng.choice(COUNTRIES)
            city = self.rng.choice([c for c in CITIES if c != current[country]])
            try:
                self.kb.set_fact("P36", country, city)
            except Exception as e:  # noqa: BLE001  (a failed KB write is counted, not fatal)
                self.error_lines.append(f"kb write {country} -> {city}: {e}")
                continue
            current[country] = city
            with self.lock:
                self.changes.append({"country": country, "value": city, "at": time.time()})

    def asker(self, rate: float) -> None:
        """Completions at `rate` a second: latency of each answered one; errors while the daemon is down are 'unavailable'."""
        while not self.stop.wait(1.0 / rate):
            client = self.client
            if client is None:
                continue
            t0 = time.perf_counter()
            try:
                client.ask(question(self.rng.choice(COUNTRIES)))
            except DaemonError as e:
                alive = pid_alive(int(read_state(self.settings).get("pid") or 0) or -1)
                with self.lock:
                    self.counts["errors" if alive and "cannot reach" not in str(e) else "unavailable"] += 1
                    if alive and "cannot reach" not in str(e):
                        self.error_lines.append(f"ask: {e}")
                continue
            with self.lock:
                self.counts["served"] += 1
                self.latencies.append(time.perf_counter() - t0)

    def reverter(self, every: float) -> None:
        """Revert the newest applied daemon edit every `every` seconds, through `kbsync revert` (the CLI a person uses)."""
        while not self.stop.wait(every):
            with AuditLog.open(self.settings.store.db_url, read_only=True) as audit:
                applied = [e for e in audit.applied_in_order() if e.source == "daemon"]
            if not applied:
                continue
            proc = self.kbsync("revert", str(applied[-1].id), "--reason", "soak: a person takes an edit out")
            with self.lock:
                if proc.returncode == 0:
                    self.counts["reverts"] += 1
                elif "cannot reach" not in proc.stderr and "not running" not in proc.stderr:
                    self.counts["revert_errors"] += 1
                    self.error_lines.append(f"revert {applied[-1].id}: {proc.stderr.strip()[-300:]}")

    # --- judging --------------------------------------------------------------------------------

    def judge(self, answers: dict[str, str]) -> list[dict[str, Any]]:
        """Every changed slot's last KB value: how the log and the served model account for it.

        Only the daemon's rows since it last worked on another value of the slot count: an older
        edit to the same value, since overwritten by other changes, says nothing about this one.
        """
        last: dict[str, str] = {}
        for c in self.changes:
            last[c["country"]] = c["value"]
        out = []
        with AuditLog.open(self.settings.store.db_url, read_only=True) as audit:
            owed = {o.edit.id for o in audit.owed()}
            for country, value in sorted(last.items()):
                rows = []  # newest first, up to the first row of another value
                for e in audit.history(subject=country, limit=None):
                    if e.source != "daemon" or e.property != "P36":
                        continue
                    if not match(value, e.object_label).ok:
                        break
                    rows.append(e)
                statuses = {e.status for e in rows}
                answered = match(answers[country], value).ok
                if "applied" in statuses:
                    verdict = "applied, answered" if answered else "LOST: applied but not answered"
                elif "reverted" in statuses:
                    verdict = "reverted by the reverter"
                elif "noop" in statuses:
                    verdict = "already answered (noop)" if answered else "LOST: noop but not answered"
                elif rows and rows[0].id in owed:
                    verdict = "owed (" + "; ".join(rows[0].reasons)[:80] + ")"
                else:
                    verdict = "LOST: no audit row" if not rows else f"LOST: {rows[0].status}, not owed"
                out.append({"country": country, "kb_value": value, "answer": answers[country],
                            "rows": [(e.id, e.status, e.method) for e in rows], "verdict": verdict})
        return out


def rebuilt_answers(env: dict[str, str], countries: list[str]) -> dict[str, str]:
    """The answers of the model rebuilt from the audit log in a fresh process (`kbsync check --json`)."""
    out = {}
    for c in countries:
        proc = subprocess.run([sys.executable, "-m", "kbsync.cli", "check", "--json", f"capital of {c}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        out[c] = json.loads(proc.stdout)["results"][0]["prediction"] if proc.returncode == 0 else f"error: {proc.stderr.strip()}"
    return out


def main() -> None:
    """Run the soak, print its table and write its JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Model directory (default: the cached tiny Llama).")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--change-every", type=float, default=5.0, help="Mean seconds between KB changes.")
    ap.add_argument("--rate", type=float, default=10.0, help="Completion requests a second (one client).")
    ap.add_argument("--revert-every", type=float, default=90.0)
    ap.add_argument("--restart-every", type=float, default=300.0, help="Seconds between SIGKILL + restart.")
    ap.add_argument("--interval", type=float, default=2.0, help="Daemon poll interval.")
    ap.add_argument("--settle", type=float, default=180.0, help="Seconds after the last change for the daemon to catch up.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(OUT / "soak.json"))
    ap.add_argument("--keep", help="Copy the run's data directory (audit log, deltas, daemon log) here at the end.")
    args = ap.parse_args()
    model = args.model or str(tiny_model())
    console = Console(width=160)
    with tempfile.TemporaryDirectory(prefix="kbsync-soak-") as tmp:
        soak = Soak(Path(tmp), model, args.interval, args.seed)
        try:
            if not soak.start_daemon():
                raise SystemExit("the daemon did not start: " + "; ".join(soak.error_lines))
            threads = [threading.Thread(target=soak.changer, args=(args.change_every,), daemon=True),
                       threading.Thread(target=soak.asker, args=(args.rate,), daemon=True),
                       threading.Thread(target=soak.reverter, args=(args.revert_every,), daemon=True)]
            for t in threads:
                t.start()
            t0 = time.monotonic()
            end = t0 + args.minutes * 60
            next_restart = t0 + args.restart_every
            while time.monotonic() < end:
                time.sleep(1.0)
                if time.monotonic() >= next_restart and time.monotonic() < end - 60:
                    killed = time.monotonic()
                    soak.kill_daemon()
                    soak.client = None
                    soak.counts["restarts"] += 1
                    if soak.start_daemon():
                        soak.counts["restarts_survived"] += 1
                        soak.restart_seconds.append(round(time.monotonic() - killed, 1))
                    next_restart = time.monotonic() + args.restart_every
            soak.stop.set()
            for t in threads:
                t.join(timeout=120)
            # Let the daemon poll the last changes and finish their edits (or record why not).
            settle_end = time.monotonic() + args.settle
            while time.monotonic() < settle_end:
                time.sleep(5.0)
                verdicts = soak.judge({c: soak.client.ask(question(c)) if soak.client else "" for c in COUNTRIES})
                if not any(v["verdict"].startswith("LOST") for v in verdicts):
                    break
            served = {c: soak.client.ask(question(c)) if soak.client else "" for c in COUNTRIES}
            verdicts = soak.judge(served)
            soak.kbsync("daemon", "stop")
            rebuilt = rebuilt_answers(soak.env, COUNTRIES)
            with AuditLog.open(soak.settings.store.db_url, read_only=True) as audit:
                rows = audit.history(limit=None)
                owed_end = len(audit.owed())
            if args.keep:
                shutil.copytree(Path(tmp) / "data", args.keep, dirs_exist_ok=True)
        finally:
            soak.stop.set()
            soak.kill_daemon()
            soak.kb.stop()
    by_status: dict[str, int] = {}
    for e in rows:
        if e.source == "daemon":
            by_status[e.status] = by_status.get(e.status, 0) + 1
    lat = sorted(soak.latencies)
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None)
    result = {
        "minutes": args.minutes, "model": model, "poll_interval_s": args.interval,
        "kb_changes": len(soak.changes), "requests_served": soak.counts["served"],
        "request_errors": soak.counts["errors"], "unavailable_during_restarts": soak.counts["unavailable"],
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p99_s": round(pct(0.99), 3) if lat else None,
        "daemon_rows": by_status, "owed_at_end": owed_end,
        "reverts": soak.counts["reverts"], "revert_errors": soak.counts["revert_errors"],
        "restarts": soak.counts["restarts"], "restarts_survived": soak.counts["restarts_survived"],
        "restart_seconds": soak.restart_seconds,
        "facts_lost": sum(v["verdict"].startswith("LOST") for v in verdicts),
        "served_equals_rebuilt": served == rebuilt, "served": served, "rebuilt": rebuilt,
        "slots": verdicts, "errors": soak.error_lines[:50],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    t = Table(title=f"Soak: {args.minutes:g} min, a KB change every ~{args.change_every:g} s, {args.rate:g} requests/s, "
                    f"a revert every {args.revert_every:g} s, SIGKILL + restart every {args.restart_every:g} s")
    for col in ("KB changes", "requests", "errors", "unavailable", "p50 s", "p99 s", "applied", "rejected",
                "failed", "noop", "reverted", "owed at end", "restarts survived", "max restart s", "facts lost",
                "served = rebuilt"):
        t.add_column(col, justify="right")
    t.add_row(str(result["kb_changes"]), str(result["requests_served"]), str(result["request_errors"]),
              str(result["unavailable_during_restarts"]), f"{result['latency_p50_s']}", f"{result['latency_p99_s']}",
              *(str(by_status.get(k, 0)) for k in ("applied", "rejected", "failed", "noop", "reverted")),
              str(owed_end), f"{result['restarts_survived']}/{result['restarts']}",
              f"{max(soak.restart_seconds):.1f}" if soak.restart_seconds else "-", str(result["facts_lost"]),
              str(result["served_equals_rebuilt"]))
    console.print(t)
    t = Table(title="Each changed slot's last KB value")
    for col in ("slot", "KB value", "served answer", "verdict"):
        t.add_column(col)
    for v in verdicts:
        t.add_row(f"capital of {v['country']}", v["kb_value"], v["answer"], v["verdict"])
    console.print(t)
    for line in soak.error_lines[:10]:
        console.print(f"  {line}")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
