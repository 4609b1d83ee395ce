"""`kbsync edit/history/show/revert/check` end to end in subprocesses on the tiny Llama, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kbsync.audit import AuditLog
from kbsync.check import probes, run_probes
from kbsync.config import load_settings
from kbsync.corpus import resolve
from kbsync.facts import render
from kbsync.pipeline import EditPipeline

WORKER = Path(__file__).resolve().parent / "edit_worker.py"
LOOSE = """
[editor.options.ft-layer]
lr = 1e-3
max_steps = 50
[regression]
retain_size = 100
max_mean_kl = 100.0
max_kl = 1000.0
min_unchanged = 0.0
min_paraphrase_accuracy = 0.0
"""
TIGHT = LOOSE.replace("max_mean_kl = 100.0", "max_mean_kl = 0.0").replace("min_unchanged = 0.0", "min_unchanged = 1.0")
INDIA = "What is the capital of India?"


# Slow CLI flows whose SQL the pipeline tests already run on SQLite (test_consolidate, test_gated): here on
# PostgreSQL only, the stricter backend, to keep the suite's time (CI has it; without a URL they skip).
PG_ONLY = pytest.mark.parametrize("audit_url", ["postgres"], indirect=True)


@pytest.fixture
def cli(tmp_path, kbsync_env, tiny_llama_dir, audit_url):
    """Run `kbsync ARGS` with this test's data dir, audit URL, model and (loose) config."""
    cfg = tmp_path / "kbsync.toml"
    cfg.write_text(LOOSE)
    env = {**kbsync_env, "KBSYNC_STORE_DB": audit_url, "KBSYNC_STORE_LOCK_TIMEOUT": "120"}

    def run(*args: str, model: bool = True, config: str | None = None, worker: bool = False,
            wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
        extra = ["--model", str(tiny_llama_dir)] if model else []
        cmd = [sys.executable, str(WORKER) if worker else "-m", *([] if worker else ["kbsync.cli"]), *args]
        if args and args[0] in ("edit", "check", "consolidate"):
            cmd += [*extra, "--config", config or str(cfg)]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not wait:
            return p
        out, err = p.communicate(timeout=300)
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)

    run.data = tmp_path / "data"
    run.model = tiny_llama_dir
    run.url = audit_url
    run.tight = tmp_path / "tight.toml"
    run.tight.write_text(TIGHT)
    return run


def answers(cli, phrase: str = "capital of India") -> list[str]:
    r = cli("check", phrase, "--json")
    assert r.returncode == 0, r.stderr
    return [x["prediction"] for x in json.loads(r.stdout)["results"]]


def rows(url: str) -> list:
    with AuditLog.open(url) as log:
        return log.history(limit=None)


def delta_files(data: Path) -> list[str]:
    d = data / "deltas"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def served(cli) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A fresh in-process load of the served model (as a restart would): its weights and India answers."""
    s = load_settings(environ={})
    s.model.path, s.store.data_dir, s.store.db = str(cli.model), str(cli.data), cli.url
    p = EditPipeline(s)
    try:
        prompts = render(resolve("P36", "India"))
        got = [r.prediction for r in run_probes(p.adapter, probes(p.adapter, prompts))]
        return {k: v.clone() for k, v in p.adapter.model.state_dict().items()}, got
    finally:
        p.close()


def test_edit_history_restart_revert(cli, tiny_llama_dir):
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    _, original = served(cli)
    assert original[0] == "New Delhi"

    r = cli("edit", "capital of India", "Paris", "--method", "ft", "--json", "--actor", "alice")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "applied" and out["after"][0]["prediction"] == "Paris"
    edit_id = out["id"]

    assert answers(cli)[0] == "Paris"  # a new process sees the edit
    h = json.loads(cli("history", "--json").stdout)
    assert [(e["id"], e["status"], e["actor"]) for e in h] == [(edit_id, "applied", "alice")]
    assert "Paris" in cli("show", str(edit_id)).stdout

    r = cli("revert", str(edit_id), "--reason", "wrong")
    assert r.returncode == 0, r.stderr
    h = json.loads(cli("history", "--json").stdout)
    assert [(e["status"], e["reverts_edit_id"]) for e in h] == [("revert", edit_id), ("reverted", None)]
    assert json.loads(cli("history", "--json", "--status", "reverted").stdout)[0]["id"] == edit_id
    assert cli("history", "--subject", "india", "--property", "P36", "--since", "1h").returncode == 0
    weights, now = served(cli)
    assert now == original
    assert all(torch.equal(weights[k], base[k]) for k in base)


def test_rejected_edit_leaves_model_unchanged(cli):
    weights, original = served(cli)
    r = cli("edit", "capital of India", "Paris", "--method", "ft-layer", config=str(cli.tight))
    assert r.returncode == 4, r.stderr
    assert "rejected" in r.stdout
    (row,) = rows(cli.url)
    assert row.status == "rejected" and row.reasons and row.sequence is None
    assert delta_files(cli.data) == []
    after, now = served(cli)
    assert now == original and all(torch.equal(after[k], weights[k]) for k in weights)


def test_two_edits_at_once_both_land_in_order(cli):
    procs = [cli("edit", p, t, "--method", "ft-layer", wait=False)
             for p, t in (("capital of India", "Paris"), ("currency of Japan", "Euro"))]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    applied = [e for e in rows(cli.url) if e.status == "applied"]
    assert sorted(e.sequence for e in applied) == [1, 2]
    assert delta_files(cli.data) == sorted(f"{e.id}.safetensors" for e in applied)
    assert served(cli)[1][0] == "Paris"
    assert answers(cli, "currency of Japan")[0] == "Euro"  # a third process sees both


@pytest.mark.parametrize("audit_url", ["sqlite"], indirect=True)
def test_kill_between_delta_and_audit_row_is_reconciled(cli):
    r = cli("edit", "capital of India", "Paris", "--method", "ft-layer", worker=True)
    assert r.returncode == -9
    (row,) = rows(cli.url)
    assert row.status == "pending" and delta_files(cli.data) == [f"{row.id}.safetensors"]

    r = cli("check", "capital of India", "--json")
    assert r.returncode == 0
    assert f"edit {row.id}: pending -> failed" in r.stderr
    assert json.loads(r.stdout)["results"][0]["prediction"] == "New Delhi"  # nothing half applied
    assert rows(cli.url)[0].status == "failed" and delta_files(cli.data) == []
    assert (cli.data / "orphans" / f"{row.id}.safetensors").exists()


@pytest.mark.parametrize("audit_url", ["sqlite"], indirect=True)
def test_bad_input_is_one_line_and_writes_nothing(cli):
    r = cli("edit", "capital of India", "Paris", "--method", "ft-layer")
    assert r.returncode == 0, r.stderr
    cases = [
        (("edit", "capitol of India", "Paris"), 2, "unknown relation"),
        (("edit", "capital of Atlantis", "Paris"), 2, "no capital fact for 'Atlantis'"),
        (("edit", "capital of India", "  "), 2, "empty target"),
        (("edit", "--prompt", "The capital of India is", "--target", ""), 2, "empty target"),
        (("edit", "capital of India", "Rome", "--method", "nope"), 2, "unknown edit method"),
        (("edit", "capital of India", "Rome", "--method", "ke"), 2, "kbsync editor train"),
        (("edit", "capital of India", "Rome", "--db", "postgresql://u:pw@127.0.0.1:1/x"), 1, "connection refused"),
        (("history", "--db", "postgresql://u:pw@127.0.0.1:1/x"), 1, "cannot open audit log"),
        (("revert", "999"), 2, "no edit with id 999"),
        (("history", "--since", "yesterday"), 2, "--since"),
    ]
    for args, code, text in cases:
        before = (len(rows(cli.url)), delta_files(cli.data))
        r = cli(*args)
        assert r.returncode == code, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and text in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert "pw" not in r.stderr
        assert (len(rows(cli.url)), delta_files(cli.data)) == before, args

    # The target the model already gives: a noop row, exit 0, no delta.
    r = cli("edit", "capital of India", "Paris")
    assert r.returncode == 0 and "already answers" in r.stdout
    assert rows(cli.url)[0].status == "noop" and len(delta_files(cli.data)) == 1

    # A corrupt delta stops every load with a line naming the edit, and nothing is written.
    (applied,) = [e for e in rows(cli.url) if e.status == "applied"]
    path = cli.data / applied.delta_path
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    before = len(rows(cli.url))
    for args in (("edit", "capital of India", "Rome"), ("check", "capital of India")):
        r = cli(*args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"edit {applied.id}" in r.stderr and "sha256" in r.stderr and "Traceback" not in r.stderr
    assert len(rows(cli.url)) == before


@PG_ONLY
def test_a_gated_edit_says_what_it_fires_on(cli, tmp_path):
    """`kbsync edit` with the gated method prints the edit's scope (the texts it fires on); `kbsync show`
    has it in the row's metrics, and the model answers the edit while another country's answer stays."""
    cfg = tmp_path / "gated.toml"
    cfg.write_text('[editor]\nmethod = "gated"\nfallback = []\n[editor.options.gated]\nembeddings = true\n'
                   "prefixes = 0\n[regression]" + LOOSE.split("[regression]", 1)[1])
    before = answers(cli, "capital of Peru")
    r = cli("edit", "capital of India", "Paris", config=str(cfg))
    assert r.returncode == 0, r.stderr
    assert "scope: gated, fires only where the input has" in r.stdout and "' India'" in r.stdout, r.stdout
    edit_id = rows(cli.url)[0].id
    shown = cli("show", str(edit_id), "--json")
    assert shown.returncode == 0, shown.stderr
    assert " India" in json.loads(shown.stdout)["metrics"]["fires_on"]
    assert answers(cli)[0] == "Paris" and answers(cli, "capital of Peru") == before


def test_batch_edit_checks_the_whole_file_first_and_links_its_rows(cli, tmp_path):
    """kbsync edit --batch FILE: a bad line anywhere is one line naming it and nothing is edited; a good
    file edits each fact in order, each its own audit row, all carrying one batch id."""
    batch = tmp_path / "facts.jsonl"
    india = '{"phrase": "capital of India", "target": "Paris"}'
    cases = [
        ("", 2, "holds no edits"),
        (f"{india}\n{{not json\n", 2, "facts.jsonl line 2: not a JSON object"),
        (f'{india}\n{{"phrase": "currency of Japan", "target": "Euro"}}\n{india}\n', 2,
         "facts.jsonl line 3: the same fact as line 1"),
        ('{"phrase": "capitol of India", "target": "Paris"}\n', 2, "facts.jsonl line 1: unknown relation"),
        ('{"phrase": "capital of India", "answer": "Paris"}\n', 2, "line 1: expected the keys phrase and target"),
        ('{"phrase": "capital of India", "target": " "}\n', 2, "line 1: empty target"),
        ('{"prompt": "The capital of India is", "subject": "Peru", "target": "Paris"}\n', 2,
         "line 1: subject 'Peru' does not occur in the prompt"),
    ]
    # The file is read before any database is opened: the bad cases need no second run on PostgreSQL.
    for text, code, needle in cases if cli.url.startswith("sqlite") else []:
        batch.write_text(text)
        r = cli("edit", "--batch", str(batch))
        assert r.returncode == code and r.stderr.count("\n") == 1 and needle in r.stderr, (text, r.stderr)
        assert "Traceback" not in r.stderr and rows(cli.url) == [] and delta_files(cli.data) == []
    r = cli("edit", "capital of India", "Paris", "--batch", str(batch))
    assert r.returncode == 2 and "not both" in r.stderr, r.stderr
    if cli.url.startswith("sqlite"):
        r = cli("edit", "--batch", str(tmp_path / "missing.jsonl"))
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr, r.stderr

    batch.write_text(f'{india}\n{{"phrase": "currency of Japan", "target": "Euro"}}\n\n'
                     '{"phrase": "capital of Kenya", "target": "Nairobi"}\n')
    # --singles: one fact after another (each on the model the previous one left); a dry run writes nothing.
    r = cli("edit", "--batch", str(batch), "--method", "ft-layer", "--singles", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    dry = json.loads(r.stdout)
    assert dry["counts"] == {"applied": 2, "noop": 1} and dry["joint"] == [] and rows(cli.url) == [], dry
    r = cli("edit", "--batch", str(batch), "--method", "ft-layer", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["counts"] == {"applied": 2, "noop": 1} and [e["line"] for e in out["edits"]] == [1, 2, 4], out
    assert out["joint"] == [1, 2]  # no daemon: the two edits proposed on one model and judged together
    got = {e.id: e for e in rows(cli.url)}
    assert sorted(got) == sorted(e["edit_id"] for e in out["edits"])
    assert {e.metrics.get("batch") for e in got.values()} == {out["batch"]} and len(out["batch"]) == 12
    assert answers(cli)[0] == "Paris" and len(delta_files(cli.data)) == 2
    listed = json.loads(cli("history", "--batch", out["batch"], "--json").stdout)
    assert sorted(e["id"] for e in listed) == sorted(got)
    assert json.loads(cli("history", "--batch", "0" * 12, "--json").stdout) == []
    bad = cli("history", "--batch", "x; drop")
    assert bad.returncode == 2 and "must be 1-32 lower-case hex digits" in bad.stderr, bad.stderr


@PG_ONLY
def test_consolidate_replaces_the_stack_by_one_checked_delta_and_can_leave_an_edit_out(cli, tmp_path):
    """`kbsync consolidate` on two gated edits: one line, one consolidation row listing both, the answers
    unchanged; --without takes one fact out (that edit reverted); bad ids and an empty stack are one line."""
    cfg = tmp_path / "gated.toml"
    cfg.write_text('[editor]\nmethod = "gated"\nfallback = []\n[editor.options.gated]\nembeddings = true\n'
                   "prefixes = 0\n[regression]" + LOOSE.split("[regression]", 1)[1])
    empty = cli("consolidate", config=str(cfg))
    assert empty.returncode == 2 and "nothing to consolidate" in empty.stderr and len(empty.stderr.strip().splitlines()) == 1
    india = cli("edit", "capital of India", "Paris", config=str(cfg))
    wrong = cli("edit", "--prompt", "What is the capital of Peru?", "--subject", "Chile", "--target", "Tokyo",
                config=str(cfg))
    assert wrong.returncode == 2 and "--subject 'Chile' does not occur in the prompt" in wrong.stderr, wrong.stderr
    # A raw prompt that names its subject is gated too (no fact table entry needed).
    peru = cli("edit", "--prompt", "What is the capital of Peru?", "--subject", "Peru", "--target", "Tokyo",
               config=str(cfg))
    assert india.returncode == peru.returncode == 0, india.stderr + peru.stderr
    assert rows(cli.url)[0].method == "gated" and rows(cli.url)[0].subject_label == "Peru"
    first, second = sorted(e.id for e in rows(cli.url) if e.status == "applied")
    r = cli("consolidate", "--reason", "nightly", config=str(cfg))
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stdout.split())  # rich wraps at the terminal's width
    assert "2 applied edit(s) now served as one delta" in said and "2/2 facts answered (the stack: 2)" in said, said
    row = rows(cli.url)[0]
    assert row.status == "consolidation" and row.metrics["consolidates"] == [first, second] and row.method == "consolidate"
    assert row.metrics["reason"] == "nightly"
    assert answers(cli)[0] == "Paris" and answers(cli, "capital of Peru")[0] == "Tokyo"
    bad = cli("consolidate", "--without", "9999", config=str(cfg))
    assert bad.returncode == 2 and "edit 9999 is not an applied edit" in bad.stderr, bad.stderr
    out = cli("consolidate", "--without", str(first), "--json", config=str(cfg))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["status"] == "consolidation" and data["consolidates"] == [second] and data["without"] == [first]
    by_id = {e.id: e for e in rows(cli.url)}
    assert by_id[first].status == "reverted" and by_id[row.id].status == "superseded"
    assert answers(cli)[0] == "New Delhi" and answers(cli, "capital of Peru")[0] == "Tokyo"
    hist = cli("history", "--status", "consolidation")
    assert hist.returncode == 0 and str(data["id"]) in hist.stdout, hist.stdout
